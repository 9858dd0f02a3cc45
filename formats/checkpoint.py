"""Server checkpoints: written atomically (temporary file, fsync, rename), read with weights_only=True.

A checkpoint is a dict of tensors and plain values (generator and optimiser state, step, round, the sampling
generator's state and the resolved configuration as JSON), so loading never unpickles arbitrary objects. A run
with train.ema_decay also keeps the moving average of the generator's weights ("generator_ema"): that is the
generator the run publishes (published_generator).
"""

from __future__ import annotations

import logging
import pathlib
import re

import torch

from asyndgan.common.atomic import atomic_write

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(directory: pathlib.Path, step: int) -> pathlib.Path:
    return directory / f"step_{step:08d}.pt"


def save_checkpoint(path: pathlib.Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: pathlib.Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def published_generator(state: dict) -> dict:
    """The generator weights a checkpoint stands for: the moving average where the run keeps one, else the
    trained weights themselves."""
    return state["generator_ema"] if "generator_ema" in state else state["generator"]


def list_checkpoints(directory: pathlib.Path) -> list[pathlib.Path]:
    """Checkpoints in `directory`, newest step first."""
    if not directory.is_dir():
        return []
    steps = {p: int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name))}
    return sorted(steps, key=steps.__getitem__, reverse=True)


def load_latest(directory: pathlib.Path) -> tuple[pathlib.Path, dict] | None:
    """The newest checkpoint that loads; one that fails is reported by name and the previous one is tried."""
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # any failure to read means: not usable, try the one before
            log.error("checkpoint %s cannot be loaded (%s); trying the previous one", path, exc)
    return None
