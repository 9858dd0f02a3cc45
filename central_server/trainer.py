"""The server's training loop: the one place to read how a step happens. No gRPC here.

One step (see DESIGN.md):
    keys_j  <- plan_batches(...)                 for every ready site j (sampling.py)
    x_j     <- label maps for keys_j, augmented  (or noise, for mlp1d)
    fake    <- G(cat_j x_j)                      one forward for all sites
    send fake_j (only the channels site j holds); wait for g_j until the step deadline (session.py)
    g       <- combine(w_j * g_j)                (aggregation.py)
    fake.backward(gradient=g); Adam step
The random generator is drawn in a fixed order (plan, then each site's augmentation in site-id order, then noise
in the same order), so a one-process reference can replay a step exactly.
"""

from __future__ import annotations

import logging
import pathlib
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from asyndgan.common import serde
from asyndgan.common.conditions import Augmentation, augment, one_hot, sample_shape
from asyndgan.common.config import ServerConfig, linear_decay, make_optimizer
from asyndgan.central_server import checkpoint as ckpt
from asyndgan.central_server.aggregation import SiteGradient, combine, site_weights
from asyndgan.central_server.generators import build_generator
from asyndgan.central_server.mask_bank import MaskBank
from asyndgan.central_server.registry import SiteRegistry
from asyndgan.central_server.samples import save_histogram, save_image_grid
from asyndgan.central_server.sampling import draw_augmentation, plan_batches
from asyndgan.central_server.session import SiteSession

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    step: int
    images: int
    seconds: float
    answered: list[str]
    missed: dict[str, str] = field(default_factory=dict)
    losses: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class _Planned:
    session: SiteSession
    keys: torch.Tensor
    aug: Augmentation
    rows: slice


class Trainer:
    def __init__(self, cfg: ServerConfig, registry: SiteRegistry, bank: MaskBank, run_dir: pathlib.Path):
        self.cfg = cfg
        self.registry = registry
        self.bank = bank
        self.run_dir = run_dir
        self.model_cfg = cfg.site.model
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.train.seed)
        self.generator = build_generator(self.model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.generator.parameters(), cfg.g_optim)
        self.rng = torch.Generator().manual_seed(cfg.train.seed)
        self.step = 0
        self.round = 0
        self.run_id = uuid.uuid4().hex[:12]
        self.state = "waiting"
        self.images_per_second = 0.0
        self.last_report: StepReport | None = None
        self._last_sample: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- one step -----------------------------------------------------------------------------------------
    def _condition(self, site: str, keys: torch.Tensor, aug: Augmentation) -> torch.Tensor:
        if self.model_cfg.family == "image2d":
            maps = augment(self.bank.maps(site, keys), aug)
            return one_hot(maps, self.model_cfg.image2d.num_classes)
        return torch.randn(len(keys), self.model_cfg.mlp1d.noise_dim, generator=self.rng)

    def train_step(self, sessions: list[SiteSession]) -> StepReport | None:
        """One generator step with these sites. None when fewer than the quorum answered (no update)."""
        started = time.monotonic()
        by_id = {s.site_id: s for s in sessions}
        plan = plan_batches({s: self.bank.size(s) for s in by_id}, self.cfg.train.batch_size,
                            self.cfg.train.sampling, self.rng)
        image2d = self.model_cfg.family == "image2d"
        planned: list[_Planned] = []
        start = 0
        for site, keys in plan.items():
            if image2d:
                i2d = self.model_cfg.image2d
                aug = draw_augmentation(len(keys), self.cfg.train.flip, i2d.stored_size, i2d.image_size, self.rng)
            else:
                aug = Augmentation.none(len(keys))
            planned.append(_Planned(by_id[site], keys, aug, slice(start, start + len(keys))))
            start += len(keys)
        x = torch.cat([self._condition(p.session.site_id, p.keys, p.aug) for p in planned])
        self.generator.train()
        fake = self.generator(x.to(self.device))  # [B, C, ...]

        self.round += 1
        fake_cpu = fake.detach().cpu()
        for p in planned:
            part = fake_cpu[p.rows] if p.session.channels is None else fake_cpu[p.rows][:, p.session.channels]
            p.session.send_batch(serde.SyntheticBatch(self.step, self.round, p.keys, part, p.aug))

        deadline = time.monotonic() + self.cfg.train.step_deadline_s
        results: dict[str, SiteGradient] = {}
        report = StepReport(self.step, 0, 0.0, [])
        for p in planned:
            channels = p.session.channels
            shape = sample_shape(self.model_cfg, len(p.keys), None if channels is None else len(channels))
            answer = p.session.await_gradient(self.round, shape, deadline)
            if isinstance(answer, str):
                report.missed[p.session.site_id] = answer
                continue
            results[p.session.site_id] = SiteGradient(p.rows, channels, answer.gradient, p.session.num_samples,
                                                      len(p.keys))
            report.losses[p.session.site_id] = answer.losses
        for site, why in report.missed.items():
            log.warning("step %d: site %s left out (%s)", self.step, site, why)
        # In 'uniform' sampling a small site may get no keys in a step; it cannot count against the quorum.
        quorum = min(self.cfg.train.min_sites, len(planned))
        if len(results) < quorum:
            log.warning("step %d: %d of %d sites answered, quorum is %d; retrying the step", self.step,
                        len(results), len(planned), quorum)
            return None

        gradient = combine(results, site_weights(results, self.cfg.train.sampling), fake)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.g_optim.lr * linear_decay(self.step, self.cfg.site.schedule)
        self.optimizer.zero_grad(set_to_none=True)
        fake.backward(gradient=gradient)
        self.optimizer.step()

        self.step += 1
        report.answered = sorted(results)
        report.images = sum(r.batch_size for r in results.values())
        report.seconds = time.monotonic() - started
        if self.model_cfg.family == "image2d":
            first = planned[0]
            self._last_sample = (augment(self.bank.maps(first.session.site_id, first.keys), first.aug),
                                 fake_cpu[first.rows])
        return report

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        total = self.cfg.site.schedule.steps
        min_sites = self.cfg.train.min_sites
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        last_wait_log = 0.0
        t0, bytes0 = time.monotonic(), sum(self.registry.bytes_moved())
        try:
            while self.step < total and not stop.is_set():
                sessions = self.registry.wait_for_ready(min_sites, timeout=0.5)
                if len(sessions) < min_sites:
                    self.state = "waiting"
                    if time.monotonic() - last_wait_log > 15:
                        log.info("waiting for sites: %d ready, quorum %d", len(sessions), min_sites)
                        last_wait_log = time.monotonic()
                    continue
                self.state = "training"
                report = self.train_step(sessions)
                if report is None:
                    continue
                self.last_report = report
                now = time.monotonic()
                rate = report.images / max(report.seconds, 1e-9)
                self.images_per_second = rate if self.step == 1 else 0.9 * self.images_per_second + 0.1 * rate
                moved = sum(self.registry.bytes_moved())
                bar.set_postfix(img_s=f"{self.images_per_second:.1f}",
                                MB_s=f"{(moved - bytes0) / max(now - t0, 1e-9) / 1e6:.2f}",
                                sites=len(report.answered), refresh=False)
                bar.update(1)
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step % self.cfg.sample_every == 0:
                    self.save_samples()
        finally:
            bar.close()
        self.state = "finished" if self.step >= total else "stopped"
        if self.step % self.cfg.checkpoint_every:
            self.save_checkpoint()
        if self.step % self.cfg.sample_every:
            self.save_samples()

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "round": self.round,
            "rng": self.rng.get_state(),
            "config_json": self.cfg.model_dump_json(),
            "run_id": self.run_id,
            "bank": self.bank.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.round = int(state["round"])
        self.rng.set_state(state["rng"])
        self.run_id = str(state["run_id"])

    def save_checkpoint(self) -> pathlib.Path:
        path = ckpt.checkpoint_path(self.run_dir / "checkpoints", self.step)
        ckpt.save_checkpoint(path, self.state_dict())
        log.info("step %d: checkpoint %s", self.step, path)
        return path

    def save_samples(self) -> pathlib.Path | None:
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        if self.model_cfg.family == "image2d":
            if self._last_sample is None:
                return None
            save_image_grid(path, *self._last_sample)
        else:
            with torch.no_grad():
                z = torch.randn(20_000, self.model_cfg.mlp1d.noise_dim)
                x = self.generator(z.to(self.device)).cpu().numpy().ravel()
            save_histogram(path, x, f"generator samples, step {self.step}")
        return path
