"""What the server does per site per step, without the network or any site's compute.

N echo sites in this process: each encodes the batch it is sent exactly as a gRPC session does (q8, brain
region), and answers with a gradient already encoded as a site would send it; the trainer decodes, guards,
combines and steps G as in a real run. The scale benchmark's model (32 px, tiny generator, 2 images per site).
Reported per N: the server's CPU time per step and per site; G's forward and backward on the same images alone
(the model's own work, which grows with the images, i.e. with N); and the rest per site (planning, reading and
augmenting label maps, encoding each site's fakes, decoding, guarding and combining each answer).

    python benchmarks/server_per_site.py [--sites 1,4,16,64] [--steps 20]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

from asyndgan.central_server.session import SessionStats
from asyndgan.central_server.trainer import Trainer
from asyndgan.common import serde
from asyndgan.experiments.scale import ScaleConfig, server_config
from asyndgan.simulation.local_sites import LocalRegistry


class _Bank:
    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self._maps = {f"s{i}": torch.randint(0, 4, (20, size, size), generator=g, dtype=torch.uint8) for i in range(n)}

    def size(self, site: str) -> int:
        return 20

    def maps(self, site: str, keys: torch.Tensor) -> torch.Tensor:
        return self._maps[site][keys]

    def state(self) -> str:
        return "{}"


class _Echo:
    """A site that costs the server what a real one does on the wire and nothing else."""

    def __init__(self, site_id: str):
        self.site_id, self.channels, self.num_samples, self.statistics = site_id, None, 20, {}
        self.stats, self.left, self.available, self.ready = SessionStats(), None, True, True

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        serde.batch_to_proto(batch, "q8")  # the server's encoding of this site's fakes
        self.region = batch.region
        with _site_side():
            g = serde.ImageGradient(batch.step, batch.round, torch.randn_like(batch.fake) * 1e-3, {"d": 0.5})
            self.answer = serde.gradient_to_proto(g, "q8", batch.region).gradient

    def await_gradient(self, round_, shape, deadline, **_):
        return serde.gradient_from_proto(self.answer, wire_dtype="q8", shape=shape, region=self.region)


_SITE_SIDE = [0.0]


class _site_side:
    """Time spent making the echo sites' answers (the sites' work, subtracted from the server's; one thread, so
    its wall time is its CPU time)."""

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *_):
        _SITE_SIDE[0] += time.perf_counter() - self.t


def measure(n: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = pathlib.Path(tmp)
        cfg = server_config(ScaleConfig(out=run), run, n).model_copy(update={"tensorboard": False})
        sessions = [_Echo(f"s{i}") for i in range(n)]
        trainer = Trainer(cfg, LocalRegistry(sessions), _Bank(n, cfg.site.model.image2d.image_size), run)
        for _ in range(3):
            trainer.train_step(sessions)
        _SITE_SIDE[0] = 0.0
        t0 = time.process_time()
        for _ in range(steps):
            trainer.train_step(sessions)
        total = (time.process_time() - t0 - _SITE_SIDE[0]) * 1000 / steps
        # G's own forward and backward on the same number of images, alone
        x = torch.randn(n * cfg.train.batch_size, *trainer._conditions(trainer._plan(sessions[:1]))[:1].shape[1:])
        t0 = time.process_time()
        for _ in range(steps):
            trainer.generator(x).sum().backward()
        model = (time.process_time() - t0) * 1000 / steps
    return {"sites": n, "server_ms_per_step": total, "per_site": total / n, "model_ms": model,
            "rest_ms_per_site": (total - model) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| sites | server CPU ms / step | per site | G forward + backward alone ms | the rest per site ms |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in args.sites.split(",")]:
        r = measure(n, args.steps)
        print(f"| {n} | {r['server_ms_per_step']:.1f} | {r['per_site']:.2f} | {r['model_ms']:.1f} | "
              f"{r['rest_ms_per_site']:.2f} |")


if __name__ == "__main__":
    main()
