"""Training curves for TensorBoard: what the server writes to run_dir/tensorboard after every step.

Per step: each site's losses, images per second, step time and its stages (plan, dispatch, wait for the sites,
guard, update), sites that answered, and bytes each way per site
and in all; sample grids as images (columns titled with the modalities). View them with
`tensorboard --logdir RUN_DIR/tensorboard`. Without the tensorboard package the log is skipped with a warning.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

log = logging.getLogger(__name__)


class TrainingLog:
    def __init__(self, folder: pathlib.Path):
        self.folder = folder
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard comes with the server and research extras; a lean install still trains
            log.warning("tensorboard is not installed: no training curves in %s", folder)
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=str(folder), flush_secs=10)

    def log_step(self, report, images_per_second: float, bytes_by_site: dict[str, tuple[int, int]]) -> None:
        """report: trainer.StepReport; bytes_by_site: site -> (bytes sent to it, bytes received from it)."""
        w, step = self._writer, report.step + 1  # the step just taken
        if w is None:
            return
        for site, losses in report.losses.items():
            for name, value in losses.items():
                w.add_scalar(f"loss/{name}/{site}", value, step)
        w.add_scalar("speed/images_per_second", images_per_second, step)
        w.add_scalar("speed/step_seconds", report.seconds, step)
        for name, seconds in report.stages.items():
            w.add_scalar(f"speed/stage_seconds/{name}", seconds, step)
        w.add_scalar("sites/answered", len(report.answered), step)
        w.add_scalar("sites/missed", len(report.missed), step)
        for site, (sent, received) in bytes_by_site.items():
            w.add_scalar(f"bytes_to_site/{site}", sent, step)
            w.add_scalar(f"bytes_from_site/{site}", received, step)
        if bytes_by_site:
            w.add_scalar("bytes/sent", sum(s for s, _ in bytes_by_site.values()), step)
            w.add_scalar("bytes/received", sum(r for _, r in bytes_by_site.values()), step)

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: uint8 [H, W, 3]."""
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
