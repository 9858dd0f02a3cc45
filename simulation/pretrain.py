"""Public pretraining: the generator and a reference discriminator trained centrally on public data.

No site and no privacy are involved: the data are public (e.g. a public BraTS release), so the server may hold
them, and the papers' full objective (with the L1 term, when configured) is allowed. The result is a folder
(formats/public_start.py) that a run starts from with `asyndgan-server start --init DIR`: the generator from its
weights, every site's discriminators from the reference discriminator. A private site then spends its budget
adapting what public data cannot teach, instead of learning a brain from noise.

The training loop is the server's own Trainer, fed by one in-process site over the public data (the same
SiteWorker as a real site's), so the weights are exactly what a distributed run would have produced.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import pathlib
import shutil
import threading
import time

from asyndgan.formats import public_start
from asyndgan.common.config import DataPrepConfig, ServerConfig
from asyndgan.formats import checkpoint as ckpt
from asyndgan.central_server.trainer import Trainer
from asyndgan.common.errors import AsynDGANError

log = logging.getLogger(__name__)


def pretrain(cfg: ServerConfig, data: pathlib.Path, prep: DataPrepConfig | None = None) -> pathlib.Path:
    """Train on `data` into cfg.run_dir and write the public-start files there; returns the folder. A folder that
    already holds a finished pretraining is kept as it is; a cut one starts again."""
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
    from asyndgan.formats.datasets import open_dataset

    out = cfg.run_dir
    if (out / public_start.RECORD).is_file():
        public_start.read_folder(out)  # damaged or changed files are an error, not a silent retrain
        log.info("%s already holds a finished pretraining; kept", out)
        return out
    for part in ("checkpoints", "samples", "tensorboard"):
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(data, cfg.site, prep or DataPrepConfig())
    session = LocalSession("public", dataset, cfg.site, device=cfg.device)
    log.info("pretraining on %s: %d samples of %d patients, %d steps", data, len(dataset),
             dataset.patients().count, cfg.site.schedule.steps)
    atomic_config = out / "config.json"
    atomic_config.write_text(cfg.model_dump_json(indent=2))
    started = time.monotonic()
    trainer = Trainer(cfg, LocalRegistry([session]), CountingBank([session]), out)
    trainer.run(threading.Event())
    final = ckpt.checkpoint_path(out / "checkpoints", cfg.site.schedule.steps)
    if not final.is_file():
        raise AsynDGANError(f"pretraining stopped before step {cfg.site.schedule.steps}; see {out}")
    record = {
        "format": 1, "model": json.loads(cfg.site.model.model_dump_json()),
        "checkpoint": str(final.relative_to(out)), "steps": cfg.site.schedule.steps,
        "data": str(data), "samples": len(dataset), "patients": dataset.patients().count,
        "modalities": list(dataset.modalities), "seconds": round(time.monotonic() - started, 1),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    sha = public_start.write_folder(out, session.worker.learner.discriminators.state_dict(), record)
    log.info("pretraining done in %.0f s: %s (generator %s, discriminator SHA-256 %s)", record["seconds"], out,
             final.name, sha)
    return out
