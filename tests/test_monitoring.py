"""The server's TensorBoard log and sample grids: what a person watching training sees."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from asyndgan.central_server.monitoring import TrainingLog
from asyndgan.central_server.samples import MIN_TILE, TITLE_H, save_image_grid
from asyndgan.central_server.trainer import StepReport


def test_step_figures_and_sample_grids_land_in_tensorboard(tmp_path):
    tb = TrainingLog(tmp_path / "tb")
    for step in range(3):
        report = StepReport(step, images=8, seconds=0.5 + step, answered=["a", "b"], missed={"c": "disconnected"},
                            losses={"a": {"d": 0.7 - step / 10, "g_l1": 0.2}, "b": {"d": 0.6}})
        tb.log_step(report, images_per_second=16.0, bytes_by_site={"a": (1000 * step, 10), "b": (500, 20 * step)})
    grid = save_image_grid(tmp_path / "g.png", torch.zeros(2, 16, 16, dtype=torch.uint8), torch.zeros(2, 4, 16, 16),
                           titles=["label map", "t1", "t1ce", "t2", "flair"])
    tb.log_image("samples", grid, 3)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/d/a", "loss/g_l1/a", "loss/d/b", "speed/images_per_second", "speed/step_seconds",
            "sites/answered", "sites/missed", "bytes_to_site/a", "bytes_from_site/b", "bytes/sent",
            "bytes/received"} <= tags
    d_a = [(e.step, round(e.value, 4)) for e in acc.Scalars("loss/d/a")]
    assert d_a == [(1, 0.7), (2, 0.6), (3, 0.5)]
    assert [e.value for e in acc.Scalars("bytes/sent")] == [500, 1500, 2500]
    assert [e.value for e in acc.Scalars("sites/missed")] == [1, 1, 1]
    (image,) = acc.Images("samples")
    assert (image.width, image.height) == (grid.shape[1], grid.shape[0])


def test_sample_grid_is_large_enough_to_look_at_and_titled(tmp_path):
    maps = torch.zeros(4, 64, 64, dtype=torch.uint8)
    maps[:, 20:40, 20:40] = 2
    fake = torch.linspace(-1, 1, 64).expand(4, 4, 64, 64).clone()
    grid = save_image_grid(tmp_path / "g.png", maps, fake, titles=["label map", "t1", "t1ce", "t2", "flair"])
    saved = np.asarray(Image.open(tmp_path / "g.png"))
    assert saved.shape == grid.shape
    tile = -(-MIN_TILE // 64) * 64
    assert saved.shape == (TITLE_H + 4 * tile, 5 * tile, 3)  # 5 columns of >= MIN_TILE px, 4 rows, a title row
    header = saved[:TITLE_H]
    assert (header < 128).any() and (header == 255).mean() > 0.8  # dark text on white
    assert (saved[TITLE_H + 25 * 3, 25 * 3] == [220, 50, 50]).all()  # the tumour label, enlarged in place
