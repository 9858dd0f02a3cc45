"""The server's training loop: the one place to read how a step happens. No gRPC here.

One step (the dataflow drawn in docs/architecture.md), in named stages:
    plan        keys_j and augmentation for every available site j      (sampling.py, the family's draw)
    conditions  x_j <- the family's condition (label maps read once, augmented; or noise)
    dispatch    fake <- G(cat_j x_j), one forward for all sites; send fake_j (only the channels j holds)
    collect     wait for each g_j until the step deadline                 (session.py)
    guard       bound each site's gradient against the others' (guard.py); a site rejected too often is removed
    update      g <- adversarial_weight x combine(w_j * g_j) (aggregation.py), plus the server's own terms:
                the statistics term when private sites released intensity statistics
                (common/intensity_statistics.py) and the anchor to the public start's generator
                (train.anchor_weight); fake.backward(gradient=g); optimiser step
The random generator is drawn in a fixed order (plan, then each site's augmentation in site-id order, then noise
in the same order), so a one-process reference can replay a step exactly. Each stage takes and returns plain
values; the step's preview (label maps and fakes for the sample grid) comes back in its StepReport.

Asynchrony (off by default; docs/architecture.md, "Asynchrony"). A batch out at the sites is a _Flight: its fakes,
their graph, and the weights that made them. train.pipeline = 1 sends the next flight before collecting the last
one's answers, so the gradient of step t is applied at step t+1. train.late_steps = k keeps a flight's graph for
the sites that missed its step, and applies their answers when they come (up to k steps later, weighted by
1 / (1 + lateness)). In both, a flight is made from a copy of the weights, so that its answers are applied exactly
through the weights that made its fakes (the optimiser's updates in between do not touch that copy).
"""

from __future__ import annotations

import enum
import logging
import pathlib
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from asyndgan.common import serde
from asyndgan.common.conditions import Augmentation, augment, brain_region
from asyndgan.common.config import ServerConfig, linear_decay, make_optimizer
from asyndgan.common.families import get_family
from asyndgan.common.intensity_statistics import check_received, statistics_loss
from asyndgan.common.seeding import seeded
from asyndgan.common.intensity_statistics import names as statistics_names
from asyndgan.formats import checkpoint as ckpt
from asyndgan.central_server import guard
from asyndgan.central_server.aggregation import SiteGradient, channel_weights, combine, site_weights
from asyndgan.central_server.monitoring import TrainingLog
from asyndgan.central_server.ports import LabelMapStore, SiteLink, SitePool
from asyndgan.central_server.samples import save_histogram, save_image_grid
from asyndgan.central_server.sampling import plan_batches

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    WAITING = "waiting"  # fewer sites available than the quorum
    TRAINING = "training"
    FINISHED = "finished"  # the schedule is done
    STOPPED = "stopped"  # stopped early (signal); a restart with --resume continues


@dataclass
class StepReport:
    step: int
    images: int
    seconds: float
    answered: list[str]
    missed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # answers the guard left out (guard.py)
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    preview: tuple[torch.Tensor, torch.Tensor] | None = None  # (label maps uint8 [n, H, W], fakes [n, C, H, W])
    # seconds per stage of the step (STAGES); "wait" is the time the sites took, the rest is the server's own work
    stages: dict[str, float] = field(default_factory=dict)


STAGES = ("plan", "dispatch", "wait", "guard", "update")


@dataclass
class _Planned:
    """One site's part of a step: its keys, augmentation, rows of the joint batch and (once read) label maps."""

    session: SiteLink
    keys: torch.Tensor  # int64 [b]
    aug: Augmentation
    rows: slice
    maps: torch.Tensor | None = None  # uint8 [b, H, W], augmented; read from the bank once per step


@dataclass
class _Flight:
    """One batch of fakes out at the sites, and what their answers are applied through."""

    planned: list[_Planned]
    x: torch.Tensor
    fake: torch.Tensor  # with its graph
    params: list[torch.Tensor] | None  # the copy of the weights that made it; None: the generator's own
    anchor: tuple[torch.Tensor, float] | None
    round: int
    sent_at: float
    late: set[str] = field(default_factory=set)  # sites given up on whose answers it still takes
    applied_at: int = -1  # the step its in-time answers were applied in


def warm_ema(decay: float):
    """The moving average's update with train.ema_warmup: the n-th update (n >= 1; the first, n = 0, copies)
    moves the average by 1 - min(decay, (1 + n) / (10 + n))."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = int(n_averaged)
        step = 1 - min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, step)
        else:  # integer buffers (counters): the same rule, rounded
            for a, c in zip(averaged, current, strict=True):
                a.copy_(torch.round(a * (1 - step) + c * step).to(a.dtype))

    return update


class Trainer:
    def __init__(self, cfg: ServerConfig, registry: SitePool, bank: LabelMapStore, run_dir: pathlib.Path):
        self.cfg = cfg
        self.registry = registry
        self.bank = bank
        self.run_dir = run_dir
        self.model_cfg = cfg.site.model
        self.family = get_family(self.model_cfg.family)
        self.device = torch.device(cfg.device)
        with seeded(cfg.train.seed):  # the same weights for the same seed (common/seeding.py)
            self.generator = self.family.build_generator(self.model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.generator.parameters(), cfg.g_optim)
        # The moving average of the weights (train.ema_decay): its first update copies the generator as it is then
        # (a public start loaded after this constructor included), each later one moves it by (1 - decay).
        self.ema = None if cfg.train.ema_decay is None else AveragedModel(
            self.generator, use_buffers=True, multi_avg_fn=warm_ema(cfg.train.ema_decay) if cfg.train.ema_warmup
            else get_ema_multi_avg_fn(cfg.train.ema_decay))
        self.rng = torch.Generator().manual_seed(cfg.train.seed)
        self.step = 0
        self.round = 0
        self.run_id = uuid.uuid4().hex[:12]
        self.state = RunState.WAITING
        self.images_per_second = 0.0
        self.last_report: StepReport | None = None
        self.monitor: TrainingLog | None = None
        self.rejections = guard.RejectionLog(cfg.train.guard)
        self.anchor: torch.nn.Module | None = None  # the public start's generator, frozen (anchor_to)
        self.anchor_weight = 0.0
        self._in_flight: _Flight | None = None  # train.pipeline: the batch sent in the last step, not yet applied
        self._waiting_late: list[_Flight] = []  # train.late_steps: flights whose late answers are still wanted

    def anchor_to(self, weights: dict, weight: float) -> None:
        """Keep a frozen generator with these weights (the public start) for the anchor term: each step then adds
        weight x mean |G(x) - G_public(x)| over the pixels that cross the wire (train.anchor_weight). It reads no
        site data: the sites' privacy budgets pay nothing for it."""
        self.anchor_weight = weight
        with seeded(self.cfg.train.seed):  # its drawn weights are replaced at once; the global source stays alone
            anchor = self.family.build_generator(self.model_cfg).to(self.device)
        anchor.load_state_dict(weights)
        self.anchor = anchor.eval().requires_grad_(False)

    # ---- one step, stage by stage ------------------------------------------------------------------------
    def _plan(self, sessions: list[SiteLink]) -> list[_Planned]:
        by_id = {s.site_id: s for s in sessions}
        keys = plan_batches({s: self.bank.size(s) for s in by_id}, self.cfg.train.batch_size,
                            self.cfg.train.sampling, self.rng)
        planned, start = [], 0
        for site, k in keys.items():
            aug = self.family.draw_augmentation(self.model_cfg, len(k), self.cfg.train.flip, self.rng)
            planned.append(_Planned(by_id[site], k, aug, slice(start, start + len(k))))
            start += len(k)
        return planned

    def _conditions(self, planned: list[_Planned]) -> torch.Tensor:
        """G's input for every planned row [B, ...]; reads each site's label maps once and keeps them on the plan
        (a site that re-uploads meanwhile cannot change what this step uses)."""
        parts = []
        for p in planned:
            if self.family.uploads_maps:
                p.maps = augment(self.bank.maps(p.session.site_id, p.keys), p.aug)
            parts.append(self.family.condition(self.model_cfg, p.maps, len(p.keys), self.rng))
        return torch.cat(parts)

    def _dispatch(self, planned: list[_Planned], x: torch.Tensor, round_: int
                  ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(fake = G(x) [B, C, ...] with its graph, the copy of the weights it was made with or None); each site
        is sent its rows and channels, tagged with the round (one per batch sent, retries included) its answer
        must carry."""
        self.generator.train()
        params = None
        if self.cfg.train.pipeline or self.cfg.train.late_steps:
            # Answers applied after the next update go through the weights as they are now, not as they will be.
            named = {n: p.detach().clone().requires_grad_(p.requires_grad)
                     for n, p in self.generator.named_parameters()}
            params = list(named.values())
            fake = torch.func.functional_call(self.generator, named, (x.to(self.device),))
        else:
            fake = self.generator(x.to(self.device))
        regions = self._regions(planned, fake)
        if regions is not None:
            # Only the brain crosses the wire: outside it G's output is replaced by the background, exactly what
            # the site fills in, so the sites' discriminators judge what the server used (and its gradient is 0).
            inside = torch.cat(regions).to(self.device).unsqueeze(1)
            fake = torch.where(inside, fake, torch.full_like(fake, serde.BACKGROUND))
        fake_cpu = fake.detach().cpu()
        for i, p in enumerate(planned):
            part = fake_cpu[p.rows] if p.session.channels is None else fake_cpu[p.rows][:, p.session.channels]
            region = None if regions is None else regions[i]
            p.session.send_batch(serde.SyntheticBatch(self.step, round_, p.keys, part, p.aug, region))
        return fake, params

    def _regions(self, planned: list[_Planned], fake: torch.Tensor) -> list[torch.Tensor] | None:
        """Each site's brain regions [b, H, W] when only the brain goes on the wire (image families), else None."""
        maps = [p.maps for p in planned]
        if self.cfg.train.region_for(self.model_cfg) != "brain" or fake.dim() != 4 or any(m is None for m in maps):
            return None
        return [brain_region(m) for m in maps if m is not None]

    def _shape(self, p: _Planned) -> tuple[int, ...]:
        channels = p.session.channels
        return self.family.sample_shape(self.model_cfg, len(p.keys), None if channels is None else len(channels))

    def _collect(self, flight: _Flight
                 ) -> tuple[dict[str, SiteGradient], dict[str, str], dict[str, dict[str, float]]]:
        """(each site's checked gradient, why each other site was left out, each answer's losses), waiting until
        the step deadline; with train.straggler_wait, the fastest sites first and the rest only a while after."""
        train = self.cfg.train
        deadline = flight.sent_at + train.step_deadline_s
        results: dict[str, SiteGradient] = {}
        missed: dict[str, str] = {}
        losses: dict[str, dict[str, float]] = {}
        order = flight.planned
        if train.straggler_wait is not None:
            order = sorted(order, key=lambda p: p.session.stats.answer_seconds)
        late = {"keep_late": True} if train.late_steps else {}
        for p in order:
            answer = p.session.await_gradient(flight.round, self._shape(p), deadline, **late)
            if isinstance(answer, str):
                missed[p.session.site_id] = answer
                if train.late_steps and answer.startswith("no answer"):
                    flight.late.add(p.session.site_id)
                    log.info("step %d: site %s answers late (taken up to %d steps later)", self.step,
                             p.session.site_id, train.late_steps)
                else:
                    log.warning("step %d: site %s left out (%s)", self.step, p.session.site_id, answer)
                continue
            if not results and train.straggler_wait is not None:
                now = time.monotonic()
                deadline = min(deadline, now + train.straggler_wait * (now - flight.sent_at))
            results[p.session.site_id] = SiteGradient(p.rows, p.session.channels, answer.gradient,
                                                      p.session.num_samples, len(p.keys))
            losses[p.session.site_id] = answer.losses
        return results, missed, losses

    def _collect_late(self, losses: dict[str, dict[str, float]]) -> list[tuple[_Flight, str, SiteGradient, int]]:
        """(flight, site, its checked gradient, lateness in steps) for the late answers that came since the last
        step (train.late_steps); those too late are no longer wanted."""
        out = []
        for flight in self._waiting_late:
            for p in [p for p in flight.planned if p.session.site_id in flight.late]:
                site, lateness = p.session.site_id, self.step - flight.applied_at
                answer = p.session.take_late(flight.round, self._shape(p))
                if answer is None and lateness < self.cfg.train.late_steps:
                    continue  # may still come
                flight.late.discard(site)
                if answer is None or isinstance(answer, str):
                    p.session.drop_late(flight.round)
                    log.info("step %d: site %s's late answer to step %d dropped (%s)", self.step, site,
                             flight.applied_at, answer or f"over {self.cfg.train.late_steps} steps late")
                    continue
                p.session.stats.late_applied += 1
                losses[site] = answer.losses
                out.append((flight, site, SiteGradient(p.rows, p.session.channels, answer.gradient,
                                                       p.session.num_samples, len(p.keys)), lateness))
        self._waiting_late = [f for f in self._waiting_late if f.late]
        return out

    def _statistics_term(self, planned: list[_Planned], fake: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(d/d fake, value) of statistics_weight x the mean over the sites that released statistics of
        intensity_statistics.statistics_loss on their rows; None when no site released any."""
        if self.cfg.train.statistics_weight == 0 or fake.dim() != 4:
            return None
        modalities = self.family.modalities(self.model_cfg)
        terms = []
        for p in planned:
            released = p.session.statistics
            if not released or p.maps is None:
                continue
            target = check_received(released, set(statistics_names(modalities)))
            term = statistics_loss(fake[p.rows], p.maps, modalities, target, self.cfg.train.statistics_floor)
            if term is not None:
                terms.append(term)
        if not terms:
            return None
        loss = self.cfg.train.statistics_weight * torch.stack(terms).mean()
        (grad,) = torch.autograd.grad(loss, fake, retain_graph=True)
        return grad, float(loss.detach())

    def _guard(self, owners: dict[str, SiteLink], results: dict[str, SiteGradient], report: StepReport
               ) -> dict[str, SiteGradient]:
        """The answers the guard accepts (clipped where needed); rejections counted, repeat offenders removed.
        owners: the site of each answer (an answer's key is its site's id, or names a late answer)."""
        verdict = guard.check_step(results, self.cfg.train.guard)
        removed: set[str] = set()
        for key in results:
            session = owners[key]
            site = session.site_id
            session.stats.rows_clipped += verdict.clipped_rows.get(key, 0)
            if key in verdict.rejected:
                session.stats.gradients_rejected += 1
                report.rejected[key] = verdict.rejected[key]
                log.warning("step %d: site %s's gradient rejected: %s", self.step, key, verdict.rejected[key])
            if self.rejections.record(site, key in verdict.rejected) and site not in removed:
                g = self.cfg.train.guard
                reason = (f"removed from the run: {g.max_rejections} of its last {g.window} answers were rejected "
                          f"as out of bounds (last: {verdict.rejected.get(key, '-')})")
                log.error("site %s %s", site, reason)
                self.rejections.forget(site)
                self.registry.remove(session, reason)
                removed.add(site)
        return verdict.accepted

    def _anchor_term(self, planned: list[_Planned], x: torch.Tensor, fake: torch.Tensor
                     ) -> tuple[torch.Tensor, float] | None:
        """(d/d fake, value) of anchor_weight x mean |fake - G_public(x)| (outside the brain region both are the
        background when only the brain crosses the wire); None without an anchor."""
        if self.anchor is None or self.anchor_weight == 0:
            return None
        with torch.no_grad():
            target = self.anchor(x.to(self.device))
            regions = self._regions(planned, target)
            if regions is not None:
                inside = torch.cat(regions).to(self.device).unsqueeze(1)
                target = torch.where(inside, target, torch.full_like(target, serde.BACKGROUND))
        loss = self.anchor_weight * (fake - target).abs().mean()
        (grad,) = torch.autograd.grad(loss, fake, retain_graph=True)
        return grad, float(loss.detach())

    def _weights(self, results: dict[str, SiteGradient], lateness: dict[str, int], channels: int | None
                 ) -> dict[str, float | torch.Tensor]:
        """Each answer's weight (aggregation.py): the sampling mode's share, a late answer's divided or multiplied
        by 1 + its lateness (train.late_weight), renormalised and capped (guard.max_share); per channel when the
        sites hold different ones."""
        shares = site_weights(results, self.cfg.train.sampling)
        if lateness:
            power = -1 if self.cfg.train.late_weight == "discount" else 1
            shares = {k: v * (1 + lateness.get(k, 0)) ** power for k, v in shares.items()}
            total = sum(shares.values())
            shares = {k: v / total for k, v in shares.items()} if total > 0 else shares
        shares = guard.cap_shares(shares, self.cfg.train.guard.max_share)
        if channels is not None and any(r.channels is not None for r in results.values()):
            # Sites holding different modalities: each channel's weights over the sites that hold it.
            return dict(channel_weights(results, shares, channels))
        return dict(shares)

    def _update(self, flight: _Flight, results: dict[str, SiteGradient], report: StepReport,
                late: list[tuple[_Flight, str, SiteGradient, int]] | None = None) -> bool:
        """The generator's step from the accepted answers to this flight and the late answers to earlier ones;
        False (nothing changed) when a combined gradient is not finite."""
        fake = flight.fake
        late = late or []
        late_by_key = {key: (f, r) for f, key, r, _ in late}
        union = {**results, **{key: r for key, (_, r) in late_by_key.items()}}
        weights = self._weights(union, {key: n for _, key, _, n in late}, fake.shape[1] if fake.dim() >= 2 else None)
        adversarial = self.cfg.train.adversarial_weight
        gradient = combine(results, weights, fake) * adversarial
        own: torch.Tensor | None = None  # the server's own terms' gradient (no site data beyond what was released)
        answered = [p for p in flight.planned if p.session.site_id in results]
        for name, term in (("statistics", self._statistics_term(answered, fake)), ("anchor", flight.anchor)):
            if term is not None:
                own = term[0] if own is None else own + term[0]
                report.losses.setdefault("server", {})[name] = term[1]
        if own is not None:
            gradient = gradient + own
        backwards = [(flight, gradient)] + [(f, combine({k: r}, weights, f.fake) * adversarial)
                                            for k, (f, r) in late_by_key.items()]
        if not all(bool(torch.isfinite(g).all()) for _, g in backwards):
            log.warning("step %d: the combined gradient is not finite; the step is not taken", self.step)
            return False
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.g_optim.lr * linear_decay(self.step, self.cfg.site.schedule)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.guard.robust == "median" and len(results) >= 3:
            self._median_backward(fake, results, own)
        else:
            for f, g in backwards:
                # a flight that still waits for late answers keeps its graph for them
                f.fake.backward(gradient=g, retain_graph=bool(f.late) or any(f is o for o, _ in backwards[1:]))
                self._take_grads(f)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.generator)
        return True

    def _take_grads(self, flight: _Flight) -> None:
        """Add the gradients a backward left on a flight's copy of the weights to the generator's own."""
        if flight.params is None:
            return
        for live, used in zip(self.generator.parameters(), flight.params):
            if used.grad is not None:
                live.grad = used.grad if live.grad is None else live.grad + used.grad
                used.grad = None

    def _median_backward(self, fake: torch.Tensor, results: dict[str, SiteGradient],
                         steer: torch.Tensor | None) -> None:
        """G's parameter gradients as the coordinate-wise median over the sites of each site's own gradient
        (its rows of the fakes, unweighted), plus the server's own terms' (train.guard.robust = 'median')."""
        params = [p for p in self.generator.parameters() if p.requires_grad]
        proposals = [torch.autograd.grad(fake, params, grad_outputs=combine({s: r}, {s: 1.0}, fake),
                                         retain_graph=True, allow_unused=True)
                     for s, r in results.items()]
        own = None if steer is None else torch.autograd.grad(fake, params, grad_outputs=steer, allow_unused=True)
        for i, p in enumerate(params):
            site_grads = [torch.zeros_like(p) if g[i] is None else g[i] for g in proposals]
            median = torch.stack(site_grads).median(dim=0).values * self.cfg.train.adversarial_weight
            if own is not None and own[i] is not None:
                median = median + own[i]
            p.grad = median

    def _send(self, sessions: list[SiteLink]) -> _Flight:
        """Plan, make and send one batch of fakes (the stages plan and dispatch)."""
        planned = self._plan(sessions)
        x = self._conditions(planned)
        self.round += 1  # one per batch sent: a late answer to a retried step carries an older round
        sent_at = time.monotonic()
        fake, params = self._dispatch(planned, x, self.round)
        anchor = self._anchor_term(planned, x, fake)  # before waiting: it overlaps with the sites' work
        return _Flight(planned, x, fake, params, anchor, self.round, sent_at)

    def train_step(self, sessions: list[SiteLink]) -> StepReport | None:
        """One generator step with these sites. None when fewer than the quorum answered (no update), or when
        the first pipelined batch went out (nothing to apply yet)."""
        started = time.monotonic()
        marks = [started]
        if not self.cfg.train.pipeline:
            flight = self._send(sessions)
            marks += [flight.sent_at, time.monotonic()]
        else:
            # Send the next batch (unless the one out is the schedule's last), then apply the one sent before it.
            out = self._in_flight
            wanted = self.step + (out is not None) < self.cfg.site.schedule.steps
            self._in_flight = self._send(sessions) if wanted else None
            marks += [self._in_flight.sent_at if self._in_flight else started, time.monotonic()]
            if out is None:
                return None
            flight = out
        answered, missed, losses = self._collect(flight)
        late = self._collect_late(losses) if self.cfg.train.late_steps else []
        marks.append(time.monotonic())
        report = StepReport(self.step, 0, 0.0, [], missed=missed, losses=losses)
        owners = {p.session.site_id: p.session for p in flight.planned}
        late_keys = {}
        for f, site, r, lateness in late:
            key = f"{site} (late {lateness})"
            owners[key] = next(p.session for p in f.planned if p.session.site_id == site)
            late_keys[key] = (f, r, lateness)
        accepted = self._guard(owners, {**answered, **{k: r for k, (_, r, _) in late_keys.items()}}, report)
        results = {k: r for k, r in accepted.items() if k in answered}
        kept = [(f, k, accepted[k], n) for k, (f, _, n) in late_keys.items() if k in accepted]
        marks.append(time.monotonic())
        # In 'uniform' sampling a small site may get no keys in a step; it cannot count against the quorum.
        quorum = min(self._quorum(), len(flight.planned))
        if len(results) < quorum:
            log.warning("step %d: %d of %d sites answered within bounds, quorum is %d; retrying the step",
                        self.step, len(results), len(flight.planned), quorum)
            return self._abandon(flight)
        if not self._update(flight, results, report, kept):
            return self._abandon(flight)
        flight.applied_at = self.step
        if flight.late:
            self._waiting_late.append(flight)
        marks.append(time.monotonic())
        self.step += 1
        report.answered = sorted(results)
        report.images = sum(r.batch_size for r in results.values()) + sum(r.batch_size for _, _, r, _ in kept)
        report.seconds = time.monotonic() - started
        report.stages = {name: b - a for name, a, b in zip(STAGES, marks, marks[1:])}
        first = flight.planned[0]
        if first.maps is not None:
            report.preview = (first.maps, flight.fake.detach().cpu()[first.rows])
        return report

    @staticmethod
    def _abandon(flight: _Flight) -> None:
        """A flight whose step is not taken: the late answers it waited for are not wanted either."""
        for p in flight.planned:
            if p.session.site_id in flight.late:
                p.session.drop_late(flight.round)
        flight.late.clear()

    def _quorum(self) -> int:
        return self.registry.quorum(self.cfg.train.min_sites)

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        total = self.cfg.site.schedule.steps
        if self.cfg.tensorboard and self.monitor is None:
            self.monitor = TrainingLog(self.run_dir / "tensorboard")
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
        last_wait_log, first = 0.0, True
        stage_totals: dict[str, float] = {}  # seconds per stage over this process's steps (logged at the end)
        steps_timed = 0
        t0, bytes0 = time.monotonic(), sum(self.registry.bytes_moved())
        try:
            while self.step < total and not stop.is_set():
                min_sites = self._quorum()
                sessions = self.registry.wait_for_ready(min_sites, timeout=0.5)
                if len(sessions) < min_sites:
                    self.state = RunState.WAITING
                    if time.monotonic() - last_wait_log > 15:
                        log.info("waiting for sites: %d ready, quorum %d", len(sessions), min_sites)
                        last_wait_log = time.monotonic()
                    continue
                self.state = RunState.TRAINING
                report = self.train_step(sessions)
                if report is None:
                    continue
                self.last_report = report
                for name, seconds in report.stages.items():
                    stage_totals[name] = stage_totals.get(name, 0.0) + seconds
                steps_timed += 1
                now = time.monotonic()
                rate = report.images / max(report.seconds, 1e-9)
                # the first step of this process (a resumed run starts past step 1) sets the average
                self.images_per_second = rate if first else 0.9 * self.images_per_second + 0.1 * rate
                first = False
                moved = sum(self.registry.bytes_moved())
                bar.set_postfix(img_s=f"{self.images_per_second:.1f}",
                                MB_s=f"{(moved - bytes0) / max(now - t0, 1e-9) / 1e6:.2f}",
                                sites=len(report.answered), refresh=False)
                bar.update(1)
                if self.monitor is not None:
                    self.monitor.log_step(report, self.images_per_second, self._bytes_by_site())
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step % self.cfg.sample_every == 0:
                    self.save_samples(report)
        finally:
            bar.close()
        self.state = RunState.FINISHED if self.step >= total else RunState.STOPPED
        if stage_totals:
            log.info("per step on average (%d steps): %s", steps_timed, ", ".join(
                f"{name} {1000 * stage_totals[name] / steps_timed:.1f} ms" for name in STAGES))
        if self.step % self.cfg.checkpoint_every:
            self.save_checkpoint()
        if self.step % self.cfg.sample_every:
            self.save_samples(self.last_report)
        if self.monitor is not None:
            self.monitor.close()

    def _bytes_by_site(self) -> dict[str, tuple[int, int]]:
        """(sent to, received from) per connected site, for the training log."""
        return {s.site_id: (s.stats.bytes_sent, s.stats.bytes_received) for s in self.registry.sessions()}

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
            **({} if self.ema is None else {"generator_ema": self.ema.module.state_dict(),
                                            "ema_updates": int(self.ema.n_averaged)}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        if self.ema is not None and "generator_ema" in state:
            self.ema.module.load_state_dict(state["generator_ema"])
            self.ema.n_averaged.fill_(int(state["ema_updates"]))
        elif self.ema is not None:  # a run that turned the average on when resumed: it starts from here
            self.ema.n_averaged.zero_()
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

    def save_samples(self, report: StepReport | None) -> pathlib.Path | None:
        """The picture for this step: label maps | generated modalities (image2d), or a histogram (mlp1d)."""
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        if self.family.preview == "grid":
            if report is None or report.preview is None:
                return None
            grid = save_image_grid(path, *report.preview, titles=["label map", *self.family.modalities(self.model_cfg)])
            if self.monitor is not None:
                self.monitor.log_image("samples", grid, self.step)
        else:
            with torch.no_grad():
                z = self.family.condition(self.model_cfg, None, 20_000)
                x = self.generator(z.to(self.device)).cpu().numpy().ravel()
            save_histogram(path, x, f"generator samples, step {self.step}")
        return path
