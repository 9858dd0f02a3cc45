"""The main job on built-in data: a server and three site processes train `image2d` on this machine.

Generates the default data once (the MNI152-based brain-tumour phantom, three sites of uneven size, in BraTS
layout), starts the server and one process per site on localhost, trains for a few minutes on the CPU, and
writes a summary of where the sample grids, checkpoints and logs are. `--data DIR` points it at a folder with one
sub-folder per site (BraTS case folders, image folders or prepared arrays); a `test` sub-folder is left out.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from asyndgan.formats import checkpoint as ckpt
from asyndgan.common.config import ServerConfig, load_config
from asyndgan.common.errors import DataError
from asyndgan.common.devices import resolve_device
from asyndgan.experiments.runner import Cluster
from asyndgan.formats.datasets import describe_dataset
from asyndgan.demo_data.phantom import PhantomConfig, write_phantom
from asyndgan.experiments.pieces import write_json

log = logging.getLogger(__name__)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: pathlib.Path = pathlib.Path("runs/demo")
    data: pathlib.Path = pathlib.Path("data/phantom")
    phantom_cases: int = Field(18, ge=3, description="training cases when the phantom is generated")
    sites: int = Field(3, ge=1, le=16)
    steps: int = Field(300, ge=1)
    image_size: int = 64
    batch_size: int = 4
    ngf: int = 32
    n_blocks: int = 6
    ndf: int = 32
    wire_dtype: str = "q8"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when torch sees a GPU")
    private: bool = Field(False, description="sites keep their default differential privacy (lambda_L1 0); off: "
                          "the papers' algorithm (lambda_L1 100), fine on the public phantom, whose small sites "
                          "DP would drown in noise (docs/privacy.md, 'What privacy costs')")


def site_folders(cfg: DemoConfig) -> list[pathlib.Path]:
    if not cfg.data.exists():
        log.info("generating the default data set, a brain-tumour phantom, in %s (once)", cfg.data)
        write_phantom(cfg.data, PhantomConfig(sites=cfg.sites, train_cases=cfg.phantom_cases,
                                              test_cases=max(1, cfg.phantom_cases // 6), seed=0))
    folders = sorted(p for p in cfg.data.iterdir() if p.is_dir() and p.name != "test" and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{cfg.data} holds no site folders")
    for f in folders:
        describe_dataset(f)  # a bad folder fails here, with its name, before anything starts
    return folders[: cfg.sites]


def run(cfg: DemoConfig) -> dict:
    device = resolve_device(cfg.device).type  # checked before the phantom's minute of generation
    folders = site_folders(cfg)
    log.info("server and sites compute on %s", device)
    server_cfg = load_config(ServerConfig, None, {
        "device": device,
        "host": "127.0.0.1", "port": 0, "run_dir": str(cfg.out), "site.schedule.steps": cfg.steps,
        "train.batch_size": cfg.batch_size, "train.min_sites": len(folders), "train.wire_dtype": cfg.wire_dtype,
        "site.model.image2d.image_size": cfg.image_size, "site.model.image2d.ngf": cfg.ngf,
        "site.model.image2d.n_blocks": cfg.n_blocks, "site.model.image2d.ndf": cfg.ndf,
        "checkpoint_every": max(1, cfg.steps // 4), "sample_every": max(1, cfg.steps // 8),
        "train.step_deadline_s": 300,  # the first step waits while every site prepares its data on 2 cores
        "site.loss.lambda_l1": 0.0 if cfg.private else 100.0,
    })
    if not cfg.private:
        log.info("demo on the public phantom: the papers' algorithm, sites' privacy off (`asyndgan demo --private` "
                 "keeps it on; real deployments keep it on: docs/privacy.md, 'What the gradients reveal')")
    started = time.monotonic()
    cluster = Cluster(server_cfg)
    try:  # whatever goes wrong here (a child failing, Ctrl-C), no process is left behind
        address = cluster.start_server()
        log.info("server at %s; starting %d site processes; follow progress in %s, or live curves with "
                 "`tensorboard --logdir %s`", address, len(folders), cfg.out / "server.out", cfg.out / "tensorboard")
        for i, folder in enumerate(folders):
            cluster.start_site(f"site{i + 1}", folder, extra=["--set", f"prep.cache_dir={cfg.data / '.cache'}",
                                                                "--device", device],
                               privacy=cfg.private)
        cluster.follow(cfg.steps)  # raises, naming the process and its log, as soon as any child fails
        cluster.wait(timeout=600)
    finally:
        cluster.stop()
    latest = ckpt.list_checkpoints(cfg.out / "checkpoints")
    samples = sorted((cfg.out / "samples").glob("*.png"))
    summary = {
        "steps": cfg.steps,
        "device": device,
        "sites": {f"site{i + 1}": str(f) for i, f in enumerate(folders)},
        "seconds": round(time.monotonic() - started, 1),
        "checkpoint": str(latest[0]) if latest else None,
        "latest_samples": str(samples[-1]) if samples else None,
        "samples_folder": str(cfg.out / "samples"),
        "tensorboard": str(cfg.out / "tensorboard"),
        "server_log": str(cfg.out / "server.log"),
        "site_logs": [str(cfg.out / f"site{i + 1}.out") for i in range(len(folders))],
    }
    summary["privacy"] = (privacy_spent(cfg.out / "site_state", len(folders)) if cfg.private else
                          {f"site{i + 1}": "off (the papers' algorithm; --private keeps it on)" for i in range(len(folders))})
    summary.update(after_training_commands(cfg, summary["checkpoint"]))
    write_json(cfg.out / "summary.json", summary)
    return summary


def privacy_spent(state_dir: pathlib.Path, sites: int) -> dict[str, str]:
    """Each site's differential privacy after the run, from its own ledger (sites run private by default)."""
    out = {}
    for i in range(sites):
        ledger = state_dir / f"site{i + 1}.privacy-ledger.json"
        if ledger.is_file():
            epsilon, delta = json.loads(ledger.read_text())["epsilon_at_delta"]
            out[f"site{i + 1}"] = f"epsilon {epsilon:.2f} spent at delta {delta:g}"
        else:
            out[f"site{i + 1}"] = "off"
    return out


def after_training_commands(cfg: DemoConfig, checkpoint: str | None) -> dict:
    """The exact command lines that turn what the demo trained into a synthetic data set and a published
    generator: from the held-out test cases' segmentations when the data has a BraTS `test` folder (whole
    synthetic cases), else from the run's own label-map bank."""
    import shlex

    from asyndgan.formats import brats

    if checkpoint is None:
        return {"generate_command": None, "export_command": None}
    test = cfg.data / "test"
    source = ["--label-maps", str(test)] if test.is_dir() and brats.is_brats_tree(test) else []
    generate = ["asyndgan", "generate", "--checkpoint", checkpoint, *source, "--out", str(cfg.out / "synthetic")]
    export = ["asyndgan-server", "export", "--run-dir", str(cfg.out), "--out", str(cfg.out / "generator.safetensors")]
    return {"generate_command": shlex.join(generate), "export_command": shlex.join(export)}
