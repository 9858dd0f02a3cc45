"""Asynchrony (train.pipeline, train.late_steps): what each mode applies, and through which weights.

In one process (simulation/local_sites.py) the sites answer when a batch is sent, so every difference from lock-step
below comes from the trainer alone. The real-process test runs a pipelined server with two site processes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import ServerConfig, load_config
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.formats.datasets import open_dataset
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from procs import TINY_IMAGE2D


def _trainer(tmp_path, sessions_of=LocalSession, **train) -> tuple[Trainer, list]:
    cfg = load_config(ServerConfig, None, {**TINY_IMAGE2D, "run_dir": str(tmp_path / "run"), "tensorboard": False,
                                           "site.schedule.steps": 4, "train.batch_size": 2, "train.seed": 3,
                                           "train.min_sites": 1, "g_optim.name": "sgd", "g_optim.lr": 1.0,
                                           **{f"train.{k}": v for k, v in train.items()}})
    folders = write_toy_sites(tmp_path / "data", sites=2, per_site=[6, 4], size=20, seed=1)
    sessions = [sessions_of(f"site{i + 1}", open_dataset(f, cfg.site), cfg.site) for i, f in enumerate(folders)]
    return Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run"), sessions


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.generator.parameters()]


def test_a_pipelined_step_applies_the_last_batch_through_the_weights_that_made_it(tmp_path):
    exact, exact_sites = _trainer(tmp_path / "a")
    assert exact.train_step(exact_sites) is not None
    piped, piped_sites = _trainer(tmp_path / "b", pipeline=1)
    start = _weights(piped)
    assert piped.train_step(piped_sites) is None and piped.step == 0  # the first batch is out, nothing applied
    assert all(torch.equal(a, b) for a, b in zip(start, _weights(piped)))
    report = piped.train_step(piped_sites)  # sends the second batch, applies the first
    assert report is not None and piped.step == 1 and piped.round == 2
    # the same draws, the same answers, the same weights: the first update is the lock-step one exactly
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_weights(exact), _weights(piped)))
    assert not all(torch.equal(a, b) for a, b in zip(start, _weights(piped)))


def test_a_pipelined_run_applies_every_batch_it_sends_and_no_more(tmp_path):
    import threading

    piped, _ = _trainer(tmp_path, pipeline=1)
    piped.run(threading.Event())
    assert piped.step == 4 and piped.round == 4 and piped._in_flight is None


class _Site2LateOnce(LocalSession):
    """site2's answer to its first batch misses the step and comes in before the next one; every answer the
    trainer takes in time is kept in `answered` (round -> gradient)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered: dict[int, torch.Tensor] = {}
        self.kept = None

    def await_gradient(self, round_, shape, deadline, keep_late=False):
        if self.site_id == "site2" and round_ == 1:
            assert keep_late  # train.late_steps asks to keep it
            self.kept = self._answers.pop(round_)
            return "no answer before the step deadline"
        answer = super().await_gradient(round_, shape, deadline, keep_late)
        self.answered[round_] = answer.gradient
        return answer

    def take_late(self, round_, shape):
        kept, self.kept = self.kept, None
        return kept


@pytest.mark.parametrize("late_weight,factor", [("discount", 0.5), ("catch_up", 2.0)])
def test_a_late_answer_is_applied_once_through_its_own_weights_and_weighted(tmp_path, late_weight, factor):
    trainer, (fast, slow) = _trainer(tmp_path, sessions_of=_Site2LateOnce, late_steps=2, late_weight=late_weight,
                                     **{"guard.max_share": 1.0, "guard.clip_factor": 0, "guard.reject_factor": 0,
                                        "wire_region": "full"})
    flights, grads = [], []
    send = trainer._send
    trainer._send = lambda s: flights.append(send(s)) or flights[-1]
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda: grads.append([p.grad.clone() for p in trainer.generator.parameters()]) or step()
    before = copy.deepcopy(trainer.generator)
    first = trainer.train_step([fast, slow])
    assert first is not None and first.answered == ["site1"] and "site2" in first.missed
    late = slow.kept.gradient
    after_first = copy.deepcopy(trainer.generator)
    second = trainer.train_step([fast])  # site2 still holds its batch: it is sent nothing
    assert second is not None and slow.stats.late_applied == 1 and second.answered == ["site1"]
    assert "site2" in second.losses and second.images == 4  # 2 in time + 2 late
    third = trainer.train_step([fast, slow])
    assert third is not None and slow.stats.late_applied == 1  # applied once

    # Step 2's parameter gradient written out: site1's answer through the weights after step 1, site2's late
    # answer through the weights before step 1 (its fakes' weights), its share divided ('discount') or multiplied
    # ('catch_up') by 1 + its lateness (1), then both renormalised.
    n_fast, n_slow = fast.num_samples, slow.num_samples * factor
    w_fast, w_slow = n_fast / (n_fast + n_slow), n_slow / (n_fast + n_slow)
    def through(model, flight, session, g, w):
        rows = next(p.rows for p in flight.planned if p.session is session)
        model.zero_grad()
        fake = model(flight.x)
        full = torch.zeros_like(fake)
        full[rows] = w * g
        fake.backward(full)
        return [p.grad.clone() for p in model.parameters()]

    now = through(after_first, flights[1], fast, fast.answered[2], w_fast)
    then = through(before, flights[0], slow, late, w_slow)
    assert all(torch.allclose(got, a + b, atol=1e-5) for got, a, b in zip(grads[1], now, then))
    # plausible mistakes would show: the late answer at its plain share, or through the current weights
    plain_now = [g * (n_fast + n_slow) / (n_fast + slow.num_samples) for g in now]
    plain_then = [g * (n_fast + n_slow) / (n_fast + slow.num_samples) / factor for g in then]
    assert not all(torch.allclose(got, a + b, atol=1e-5) for got, a, b in zip(grads[1], plain_now, plain_then))
    wrong = through(after_first, flights[0], slow, late, w_slow)
    assert not all(torch.allclose(got, a + b, atol=1e-5) for got, a, b in zip(grads[1], now, wrong))
    assert not all(torch.equal(a, b) for a, b in zip(before.parameters(), after_first.parameters()))


def test_asynchrony_refuses_settings_that_cannot_work_together(tmp_path):
    from asyndgan.common.errors import ConfigError

    with pytest.raises(ConfigError, match="straggler_wait needs train.late_steps"):
        load_config(ServerConfig, None, {**TINY_IMAGE2D, "train.straggler_wait": 1.0})
    with pytest.raises(ConfigError, match="median"):
        load_config(ServerConfig, None, {**TINY_IMAGE2D, "train.pipeline": 1, "train.guard.robust": "median"})


@pytest.mark.integration
def test_a_pipelined_server_takes_a_slow_sites_late_answers_with_real_processes(tmp_path):
    """A real server (pipeline 1, late answers up to 8 steps) with a real site and a slow one that answers
    0.15 s after each batch, past the 0.1 s deadline: the run goes on, the slow site's answers are applied late,
    none counts as bad, and the server stops cleanly."""
    import os
    import signal
    import subprocess
    import sys

    from procs import ENV, Server, site_status, start_site, wait_status

    folders = write_toy_sites(tmp_path / "d", sites=1, per_site=[6], size=20)
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.model.image2d.load_size": 20,
                                       "site.schedule.steps": 10**6, "train.min_sites": 1,
                                       "train.step_deadline_s": 0.1, "train.pipeline": 1, "train.late_steps": 8,
                                       "train.wire_dtype": "float32", "train.wire_region": "full",
                                       "checkpoint_every": 10**6, "sample_every": 10**6})
    good = start_site(folders[0], server.address, "good", tmp_path / "good.log")
    slow = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "hostile_site.py"),
                             server.address, "slow", "slow"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=ENV)
    try:
        s = wait_status(lambda s: (x := site_status(s, "slow")) is not None and x.late_applied >= 3, server.address,
                        "late answers applied", timeout=90)
        x, g = site_status(s, "slow"), site_status(s, "good")
        assert x.bad_messages == 0 and x.late_replies >= x.late_applied >= 3 and g.steps_answered > 3
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code = server.wait(60)
        for p in (good, slow):
            p.kill()
    assert code == 0, server.output()[-2000:]


def test_the_asynchrony_experiment_reports_each_mode_against_lock_step(tmp_path):
    from asyndgan.experiments.asynchrony import AsynchronyConfig, run

    cfg = AsynchronyConfig(out=tmp_path, seeds=[0, 1], steps=12, samples_per_site=200, eval_samples=2000)
    result = run(cfg)
    w1 = result["w1"]
    assert set(w1) == {"exact", "pipelined", "late", "late_catch_up", "dropped"}
    assert all(len(v) == 2 for v in w1.values())
    assert result["against_exact"]["exact"]["mean"] == 0.0
    assert w1["late"] != w1["dropped"] and w1["pipelined"] != w1["exact"]  # each mode changes what is learnt
    assert "| late |" in (tmp_path / "report.md").read_text()
    again = run(cfg)  # resumes: nothing is trained again
    assert again["w1"] == w1


def test_the_image_experiment_takes_the_slow_sites_answers_late_or_loses_them(tmp_path):
    from asyndgan.experiments.asynchrony_images import preset_config, run

    cfg = preset_config("smoke", tmp_path).model_copy(update={"rows": ["exact", "late", "dropped"]})
    rows = run(cfg)
    late, dropped = rows["late"]["slow_site_answers_applied"][0], rows["dropped"]["slow_site_answers_applied"][0]
    steps = cfg.gan.steps
    # lag 1: the slow site is busy every other step, so it gets a batch in half the steps; late takes every answer
    # that came before the run ended, dropped none of them
    assert late[1] == dropped[1] == steps // 2 and late[0] >= late[1] - 1 and dropped[0] == 0
    assert rows["exact"]["slow_site_answers_applied"] == [None]
    assert rows["late"]["minus_exact"]["patients"] == cfg.phantom.test_cases
    report = (tmp_path / "report.md").read_text()
    assert "| late |" in report and f"{late[0]}/{late[1]}" in report
    assert run(cfg) == rows  # resumes: every piece kept
    more = run(cfg.model_copy(update={"rows": ["exact", "late_catch_up"]}))  # another choice of rows, same OUT
    assert more["exact"] == rows["exact"]  # kept, not trained again
    assert more["late_catch_up"]["slow_site_answers_applied"][0][1] == steps // 2
