"""How compressible are the q8 codes of real fakes and gradients (brain region), and what do gradients look like?

Takes a bandwidth-benchmark run (its phantom sites and a GAN checkpoint), runs three generator steps with the
sites in this process, and compresses each batch's and answer's q8 codes with zlib (level 6), as they are and
after a difference along the rows.

    python benchmarks/code_compressibility.py runs/bw-cpu runs/bw-cpu/gan/float32-full/checkpoints/step_00000375.pt
"""
import pathlib
import sys
import tempfile
import zlib

import numpy as np
import torch

from asyndgan.common import tensor_codec as tc
from asyndgan.common.config import DataPrepConfig, ServerConfig
from asyndgan.central_server.trainer import Trainer
from asyndgan.simulation.local_sites import LocalSession, LocalRegistry, CountingBank
from asyndgan.formats.datasets import open_dataset

run = pathlib.Path(sys.argv[1])
ck = sys.argv[2]
work = pathlib.Path(tempfile.mkdtemp())
scfg = ServerConfig.model_validate_json(torch.load(ck, weights_only=True)["config_json"])
scfg = scfg.model_copy(update={"run_dir": work, "train": scfg.train.model_copy(update={"wire_region": "brain"})})
sites = sorted(p for p in (run / "phantom").iterdir() if p.name.startswith("site"))
prep = DataPrepConfig(cache_dir=run / "cache")
sess = [LocalSession(f"site{i+1}", open_dataset(f, scfg.site, prep), scfg.site) for i, f in enumerate(sites)]
rec = []
for s in sess:
    orig = s.send_batch
    def sb(batch, orig=orig, s=s):
        orig(batch); rec.append((batch, s._answers[batch.round]))
    s.send_batch = sb
tr = Trainer(scfg, LocalRegistry(sess), CountingBank(sess), work)
state = torch.load(ck, weights_only=True)
tr.generator.load_state_dict(state["generator"])
for _ in range(3):
    tr.train_step(sess)
tot = {"fake": [0, 0, 0], "grad": [0, 0, 0]}
for batch, ans in rec:
    for name, t, st in (("fake", batch.fake, False), ("grad", ans.gradient, True)):
        m = tc.encode(t, "q8", region=batch.region, fill=-1, stochastic=st)
        codes = m.data
        tot[name][0] += len(codes); tot[name][1] += len(zlib.compress(codes, 6))
        # delta along rows (spatial smoothness) then zlib
        tot[name][2] += len(zlib.compress(np.diff(np.frombuffer(codes, np.uint8).astype(np.int16)).astype(np.uint8).tobytes(), 6))
for k, (raw, z, dz) in tot.items():
    print(k, raw, "zlib x%.2f" % (raw / z), "delta+zlib x%.2f" % (raw / dz))
b, a = rec[0]
g = a.gradient[b.region.unsqueeze(1).expand_as(a.gradient)]
print("grad stats: abs mean", float(g.abs().mean()), "max", float(g.abs().max()), "frac < max/255", float((g.abs() < g.abs().max()/255).float().mean()))
