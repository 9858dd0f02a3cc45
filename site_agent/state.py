"""A site's own state between runs: its discriminators and their optimiser, saved locally and never sent.

Written atomically (temporary file, fsync, rename) and read with weights_only=True. The file records a digest of
the settings it was trained under; state saved under other settings is ignored (with a log line) rather than
loaded into a model of another shape.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib

import torch

from asyndgan.common.atomic import atomic_write
from asyndgan.common.config import SiteFacingConfig

log = logging.getLogger(__name__)


def settings_digest(cfg: SiteFacingConfig, modalities: list[str], private: str | None = None) -> str:
    """Digest of what the saved state must match. `private`: the DP unit it was trained under ("patient",
    "slice", with ":last:K" when only part of it learnt); state trained without DP, or under a weaker unit, is
    never loaded into a private site (its weights would carry the images unprotected, or protected per slice
    only)."""
    model = cfg.model.model_dump()
    if model["image2d"]["d_network"] == "patchgan":
        del model["image2d"]["d_network"]  # the one network before members were registered: digests as before
    shape: dict[str, object] = {"model": model, "modalities": modalities, "d_optim": cfg.d_optim.name}
    if private == "slice":
        shape["dp_sgd"] = True  # as digests were before the patient unit existed
    elif private:
        shape["dp_sgd"] = private
    return hashlib.sha256(repr(sorted(shape.items())).encode()).hexdigest()[:16]


def state_path(state_dir: pathlib.Path, site_id: str) -> pathlib.Path:
    return state_dir / f"{site_id}.discriminator.pt"


def save(path: pathlib.Path, learner, digest: str, step: int) -> None:
    state = {"discriminators": learner.discriminators.state_dict(), "optimizer": learner.optimizer.state_dict(),
             "digest": digest, "step": step}
    atomic_write(path, lambda f: torch.save(state, f))


def restore(path: pathlib.Path, learner, digest: str) -> int | None:
    """Load saved state into `learner` if it matches; returns the step it was saved at, or None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=learner.device, weights_only=True)
        if state.get("digest") != digest:
            log.info("ignoring saved discriminator state %s: it was trained under other settings", path)
            return None
        learner.discriminators.load_state_dict(state["discriminators"])
        learner.optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # a damaged file must not stop the site: start its discriminators afresh
        log.warning("cannot load discriminator state %s (%s); starting afresh", path, exc)
        return None
    log.info("restored discriminator state from %s (saved at step %d)", path, state["step"])
    return int(state["step"])
