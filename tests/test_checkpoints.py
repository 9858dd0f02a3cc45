"""Checkpoints: atomic writes, no pickle on load, a damaged newest checkpoint falls back to the one before,
and the label-map bank is restored only when its files match the checkpoint's digests."""

from __future__ import annotations

import logging

import pytest
import torch

from asyndgan.formats import checkpoint as ckpt
from asyndgan.formats.label_map_bank import LabelMapBank
from asyndgan.common.serde import maps_digest


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    for step in (10, 20):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"step": step, "w": torch.ones(3) * step})
    newest = ckpt.checkpoint_path(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a disk that filled up
    with caplog.at_level(logging.ERROR):
        path, state = ckpt.load_latest(tmp_path)
    assert path == ckpt.checkpoint_path(tmp_path, 10) and state["step"] == 10
    assert str(newest) in caplog.text
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoints_refuse_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "x": Evil()}, path)
    assert ckpt.load_latest(tmp_path) is None  # weights_only=True refuses it


def test_bank_restores_verified_maps_and_reports_altered_ones(tmp_path):
    bank = LabelMapBank(tmp_path / "bank")
    a, b = torch.randint(0, 5, (4, 8, 8), dtype=torch.uint8), torch.randint(0, 5, (2, 8, 8), dtype=torch.uint8)
    bank.put("a", 4, a, maps_digest(a))
    bank.put("b", 2, b, maps_digest(b))
    bank.put("g", 100, None, "")
    state = bank.state()
    altered = tmp_path / "bank" / f"{maps_digest(b)}.npy"  # bank files are named by digest, never by site id
    import numpy as np

    np.save(altered, np.zeros((2, 8, 8), np.uint8))
    fresh = LabelMapBank(tmp_path / "bank")
    problems = fresh.restore(state)
    assert fresh.has("a", maps_digest(a)) and torch.equal(fresh.maps("a", torch.arange(4)), a)
    assert not fresh.has("b", maps_digest(b)) and len(problems) == 1 and "site b" in problems[0]
    assert fresh.size("g") == 100


def test_a_resumed_run_reports_its_throughput_from_its_first_step(tmp_path):
    """The speed shown after --resume was an average that started at 0 (it was seeded only at step 1)."""
    import threading

    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig
    from asyndgan.demo_data.toy import write_toy_sites
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
    from asyndgan.formats.datasets import open_dataset

    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[8], size=20, seed=1)
    cfg = ServerConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "tensorboard": False, "train": {"batch_size": 2},
        "site": {"model": {"image2d": {"image_size": 16, "load_size": 20, "ngf": 4, "n_blocks": 1, "ndf": 4,
                                       "d_layers": 1, "modalities": ["t1", "t1ce", "t2", "flair"]}},
                 "schedule": {"steps": 4}}})
    sessions = [LocalSession("a", open_dataset(folder, cfg.site), cfg.site)]
    first = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run")
    first.cfg = cfg.model_copy(update={"site": cfg.site.model_copy(update={"schedule": cfg.site.schedule.model_copy(
        update={"steps": 2})})})
    first.run(threading.Event())
    resumed = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run")
    resumed.load_state_dict(first.state_dict())
    resumed.cfg = cfg.model_copy(update={"site": cfg.site.model_copy(update={"schedule": cfg.site.schedule.model_copy(
        update={"steps": 3})})})
    resumed.run(threading.Event())
    report = resumed.last_report
    assert report.step == 2 and resumed.step == 3
    assert resumed.images_per_second == report.images / report.seconds


def test_the_moving_average_of_the_generator_is_kept_resumed_and_published(tmp_path):
    """train.ema_decay: the average starts at the first step's weights and moves by (1 - decay) per step; the
    checkpoint keeps it, a resumed trainer continues it, and the published generator (export, generate) is it."""
    import threading

    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig
    from asyndgan.demo_data.toy import write_toy_sites
    from asyndgan.formats.datasets import open_dataset
    from asyndgan.formats.generator_file import load_from_checkpoint
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[8], size=20, seed=1)
    cfg = ServerConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "tensorboard": False, "train": {"batch_size": 2, "ema_decay": 0.5},
        "site": {"model": {"image2d": {"image_size": 16, "load_size": 20, "ngf": 4, "n_blocks": 1, "ndf": 4,
                                       "d_layers": 1, "modalities": ["t1", "t1ce", "t2", "flair"]}},
                 "schedule": {"steps": 3}}})
    sessions = [LocalSession("a", open_dataset(folder, cfg.site), cfg.site)]
    trainer = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run")
    after_each_step: list[dict] = []
    trainer.optimizer.register_step_post_hook(lambda *_: after_each_step.append(
        {k: v.detach().clone() for k, v in trainer.generator.state_dict().items()}))
    trainer.run(threading.Event())
    assert len(after_each_step) == 3
    name = next(k for k, v in after_each_step[0].items() if v.is_floating_point() and v.numel() > 10)
    w1, w2, w3 = (w[name] for w in after_each_step)
    expected = 0.5 * (0.5 * w1 + 0.5 * w2) + 0.5 * w3
    ema = trainer.ema.module.state_dict()[name]
    assert torch.allclose(ema, expected, atol=1e-6) and not torch.allclose(ema, w3, atol=1e-4)

    state = trainer.state_dict()
    assert state["ema_updates"] == 3 and torch.equal(state["generator_ema"][name], ema)
    published = load_from_checkpoint(tmp_path / "run").generator.state_dict()[name]
    assert torch.equal(published, ema)  # export and generate use the average, not the last step's weights

    resumed = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run2")
    resumed.load_state_dict(state)
    assert int(resumed.ema.n_averaged) == 3 and torch.equal(resumed.ema.module.state_dict()[name], ema)
    assert ckpt.published_generator({"generator": {"w": 1}}) == {"w": 1}  # a run without the average


def test_a_warmed_up_moving_average_forgets_the_untrained_start():
    """train.ema_warmup: the n-th update moves the average by 1 - min(decay, (1 + n) / (10 + n)), so after 2000
    updates almost nothing of the first weights is left, where a constant 0.999 keeps 0.999^2000 = 13.5% of them."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from asyndgan.central_server.trainer import warm_ema

    warm, constant = warm_ema(0.999), get_ema_multi_avg_fn(0.999)
    a, b = [torch.zeros(3)], [torch.zeros(3)]  # the copy of the first weights (0); every later weight is 1
    for n in range(1, 2001):
        warm(a, [torch.ones(3)], torch.tensor(n))
        constant(b, [torch.ones(3)], torch.tensor(n))
    assert float(1 - b[0][0]) == pytest.approx(0.999 ** 2000, rel=1e-3)
    assert float(1 - a[0][0]) < 1e-3  # the start's share
    one = [torch.zeros(1)]
    warm(one, [torch.ones(1)], torch.tensor(1))
    assert float(one[0][0]) == pytest.approx(1 - 2 / 11)  # the first move: min(0.999, 2 / 11)
    counters = [torch.zeros(1, dtype=torch.long)]
    warm(counters, [torch.full((1,), 10, dtype=torch.long)], torch.tensor(1))
    assert counters[0].dtype == torch.long and int(counters[0]) == 8
