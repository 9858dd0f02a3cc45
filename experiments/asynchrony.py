"""What the server's asynchronous modes cost in quality: the 1-D experiment (three sites, one Gaussian each) trained
lock-step, pipelined, and with a slow site whose answers come late, per seed, W1 to the true mixture.

Rows (the same data, seeds and hyperparameters as `asyndgan experiment gaussian1d`; the sites in this process, so
that the lateness is exactly the one named, free of this machine's timing):
    exact       lock-step: every answer applied through the weights that made its fakes, in its own step
    pipelined   train.pipeline = 1: each step's answers applied one step later (through the weights that made them)
    late        train.late_steps = lag: site 3 answers `lag` steps late every time, so it is sent a batch in one
                step of lag + 1, and its answers are weighted by 1 / (1 + lag) (train.late_weight 'discount')
    late_catch_up  the same with train.late_weight 'catch_up': its answers weighted by 1 + lag, the steps it was
                absent from
    dropped     the same slow site without train.late_steps: its late answers are dropped, so its Gaussian is
                learnt only from the steps it made in time (none): what a server that cannot wait loses
Reported: W1 per seed and row, and each row's paired difference from exact over the seeds (mean, 95% t-interval).
"""

from __future__ import annotations

import logging
import pathlib
import threading

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from asyndgan.experiments.pieces import write_json
from asyndgan.simulation.local_sites import LocalSession

log = logging.getLogger(__name__)
ROWS = ("exact", "pipelined", "late", "late_catch_up", "dropped")


class LaggingSession(LocalSession):
    """A site in this process whose every answer comes `lag` steps after its batch: until then it is busy (no new
    batch), and the trainer either takes the answer late (train.late_steps) or finds it gone (dropped)."""

    def __init__(self, *args, lag: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.lag = lag
        self._held: dict[int, tuple[object, int]] = {}  # round -> (answer, steps still to wait)
        self.available = True
        self.batches = self.late_taken = 0  # batches it was sent; answers the trainer took late

    def send_batch(self, batch) -> None:
        self.batches += 1
        super().send_batch(batch)

    def await_gradient(self, round_: int, shape, deadline: float, keep_late: bool = False):
        answer = self._answers.pop(round_, None)
        if answer is None:
            return "no answer"
        if keep_late:
            self._held[round_] = (answer, self.lag)
        self.available = False  # busy until its answer comes, `lag` steps from now
        self._ticks = self.lag
        return "no answer before the step deadline"

    def take_late(self, round_: int, shape):
        answer, wait = self._held.get(round_, (None, 0))
        if answer is None:
            return None
        if wait > 1:
            self._held[round_] = (answer, wait - 1)
            return None
        del self._held[round_]
        self.late_taken += 1
        return answer

    def drop_late(self, round_: int) -> None:
        self._held.pop(round_, None)

    def tick(self) -> None:
        """One step of the server has passed: the site is free again once its answer has come (lag steps)."""
        if not self.available:
            self._ticks -= 1
            self.available = self._ticks < 0


class _TickingRegistry:
    """LocalRegistry that tells lagging sites a step has passed each time the trainer asks who is available."""

    def __init__(self, sessions):
        from asyndgan.simulation.local_sites import LocalRegistry

        self.inner = LocalRegistry(sessions)
        self.sessions_ = sessions

    def wait_for_ready(self, n: int, timeout: float):
        for s in self.sessions_:
            if isinstance(s, LaggingSession):
                s.tick()
        return [s for s in self.sessions_ if s.available]

    def __getattr__(self, name):
        return getattr(self.inner, name)


class AsynchronyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: pathlib.Path
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=2)
    steps: int = Field(1500, ge=2)
    samples_per_site: int = Field(10_000, ge=100)
    eval_samples: int = Field(100_000, ge=1000)
    lag: int = Field(2, ge=1, le=8, description="steps the slow site's answers come late")


def train(cfg: AsynchronyConfig, row: str, seed: int, folders: list[pathlib.Path]):
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.experiments.gaussian1d import Gaussian1DConfig, server_config
    from asyndgan.formats.datasets import Samples1DDataset
    from asyndgan.simulation.local_sites import CountingBank

    g1 = Gaussian1DConfig(out=cfg.out / f"seed{seed}" / row, seed=seed, steps=cfg.steps,
                          samples_per_site=cfg.samples_per_site, eval_samples=cfg.eval_samples)
    scfg = server_config(g1, g1.out, min_sites=1)
    mode = {"pipelined": {"pipeline": 1}, "late": {"late_steps": cfg.lag},
            "late_catch_up": {"late_steps": cfg.lag, "late_weight": "catch_up"}}.get(row, {})
    scfg = scfg.model_copy(update={"train": type(scfg.train).model_validate({**scfg.train.model_dump(), **mode}),
                                   "tensorboard": False})
    sessions = []
    for i, folder in enumerate(folders):
        args = (f"site{i + 1}", Samples1DDataset(folder), scfg.site)
        slow = row in ("late", "late_catch_up", "dropped") and i == len(folders) - 1
        sessions.append(LaggingSession(*args, lag=cfg.lag) if slow else LocalSession(*args))
    trainer = Trainer(scfg, _TickingRegistry(sessions), CountingBank(sessions), g1.out)
    trainer.run(threading.Event())
    return trainer.generator, g1


def run(cfg: AsynchronyConfig) -> dict:
    import torch

    from asyndgan.demo_data.toy import GAUSSIAN_SUBSETS, write_gaussian_sites
    from asyndgan.experiments.gaussian1d import sample
    from asyndgan.experiments.metrics import w1_to_gaussian_mixture

    torch.set_num_threads(1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "results.json"
    import json

    w1: dict[str, dict[str, float]] = json.loads(path.read_text())["w1"] if path.is_file() else {}
    for seed in cfg.seeds:
        folders = write_gaussian_sites(cfg.out / f"seed{seed}" / "data", per_site=cfg.samples_per_site, seed=seed)
        for row in ROWS:
            if str(seed) in w1.get(row, {}):
                continue  # finished before (the run resumes)
            g, g1 = train(cfg, row, seed, folders)
            w1.setdefault(row, {})[str(seed)] = float(w1_to_gaussian_mixture(
                sample(g, cfg.eval_samples, g1.noise_dim, seed), GAUSSIAN_SUBSETS))
            log.info("seed %d, %s: W1 %.4f", seed, row, w1[row][str(seed)])
            write_json(path, {"settings": cfg.model_dump(mode="json"), "w1": w1})
    summary = {row: paired(w1["exact"], w1[row]) for row in ROWS}
    write_json(path, {"settings": cfg.model_dump(mode="json"), "w1": w1, "against_exact": summary})
    (cfg.out / "report.md").write_text(markdown(cfg, w1, summary))
    return {"w1": w1, "against_exact": summary}


def paired(base: dict[str, float], other: dict[str, float]) -> dict[str, float]:
    """Mean of other - base over the seeds both have, with a 95% t-interval, and the seeds' spread of base."""
    from scipy import stats

    seeds = sorted(set(base) & set(other))
    d = np.array([other[s] - base[s] for s in seeds])
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half),
            "mean_w1": float(np.mean([other[s] for s in seeds])), "seeds": len(seeds)}


def markdown(cfg: AsynchronyConfig, w1: dict, summary: dict) -> str:
    spread = float(np.std([w1["exact"][s] for s in w1["exact"]], ddof=1))
    lines = ["# What asynchrony costs in quality: the 1-D experiment", "",
             f"Command: `asyndgan experiment asynchrony --out OUT`. Three sites (N(-3, 2), N(1, 1), N(3, 0.5)), "
             f"{cfg.samples_per_site} samples each, {cfg.steps} steps, the 1-D experiment's hyperparameters, "
             f"seeds {', '.join(map(str, cfg.seeds))}; W1 of {cfg.eval_samples} generated samples to the true "
             f"mixture (lower is better). Slow site: site 3 (N(3, 0.5)), {cfg.lag} steps late every time. Paired "
             "differences from exact over the seeds, 95% t-interval.", "",
             "| row | mean W1 | minus exact | 95% interval |", "|---|---|---|---|"]
    for row in ROWS:
        s = summary[row]
        lines.append(f"| {row} | {s['mean_w1']:.4f} | {s['mean']:+.4f} | {s['low']:+.4f} .. {s['high']:+.4f} |")
    lines += ["", f"Seed spread of exact (standard deviation of W1 over seeds): {spread:.4f}.", ""]
    return "\n".join(lines)
