"""A site's own differential privacy: its discriminators learn with DP-SGD, and a ledger it keeps bounds the total.

What leaves a private site is d(L_G)/d(fake) with L_G = sum_m BCE(D_m(x, fake_m), 1): a function of the server's
fakes, the (public) label maps and the discriminators' weights, and of nothing else the site holds. So if the
weights are differentially private, everything the site sends is post-processing of a DP mechanism and carries
the same (epsilon, delta). The weights are made DP here, with one *patient* as the unit (privacy.unit):

    each DP discriminator step: the site draws its own patients (Poisson, rate q = privacy.sample_rate, from a
    secret random source the server cannot predict), takes a random subset of each drawn patient's slices
    (privacy.slices_per_patient), each seen privacy.augmentations times with its own flips; a patient's
    gradient is the mean of its rows' gradients, clipped to C = max_grad_norm over all trained parameters; the
    clipped patient gradients are summed, Gaussian noise of std sigma * C is added once, and the sum is divided
    by the public constant q * P (P = the site's patient count, unchanged by the neighbouring relation below).
    The fakes' rows depend on no private data; each is clipped too (so that neither half of the loss dominates).
    One patient changes the noisy sum by at most C: the subsampled Gaussian mechanism, composed over the steps
    with Opacus' RDP accountant.

Neighbouring relation ("zero-out"): two data sets are neighbours when one patient's images are replaced by a
null record that contributes nothing. The label maps and the sample and patient counts are public (the label
maps are uploaded at join and stay outside the guarantee); nothing else private enters the normaliser.

sigma is the site's own: unless privacy.noise_multiplier fixes it, the site computes the smallest sigma with
which the run's planned DP steps (from the server's schedule: steps left / update_every * d_steps, plus a spare
fraction) end within its remaining budget. The server can only make the site stop early (a schedule it does not
keep), never spend more: the ledger refuses any step over the budget.

The server chooses which keys its fakes are for; that is why the real rows are not the batch's keys (no
amplification by subsampling could be claimed for server-chosen keys) and why no L1 term (computed on the key's
real image directly) is allowed: a private site refuses a server that asks for one. Layers that mix the rows of
a batch (batch normalisation) would let one patient move other rows' gradients past the clip: refused.

The ledger (PrivacyLedger) is a small JSON file in the site's state folder, written (atomically, fsynced) before
each step is taken: a crash can only over-count. A restart, a new run, or deleting the discriminator state never
resets it; a damaged ledger stops the site instead of starting from zero. It records its unit: a ledger that
accounts slices is never continued as a patient ledger (its spending would not bound a patient).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
import secrets
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.serde import PrivacyStatus
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig, linear_decay, make_optimizer
from asyndgan.common.conditions import augment
from asyndgan.common.errors import AsynDGANError, ConfigError, PrivacyBudgetExhausted
from asyndgan.formats.datasets import Patients
from asyndgan.site_agent.gradients import SiteLearner, generator_adversarial_loss

log = logging.getLogger(__name__)
LEDGER_FORMAT = 2  # 2: records its unit; format-1 ledgers accounted slices
NEIGHBOURING = ("zero-out: one {unit}'s images replaced by a null record; label maps, sample and patient counts "
                "public")
UNIT_NAMES = {"patient": "patient", "slice": "training slice"}


def ledger_path(state_dir: pathlib.Path, site_id: str) -> pathlib.Path:
    return state_dir / f"{site_id}.privacy-ledger.json"


# RDP orders: a lean version of Opacus' default range (which steps by 0.1 below 11 and stops at 63), extended
# above 64, where the best order lies for large noise (long runs on small sites). On the settings this project
# uses, epsilon differs from the full range by under 0.1% (at most 1.1% at epsilon 13) at half the cost; any set
# of orders gives a valid upper bound.
RDP_ORDERS = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20, 24, 28, 32,
              40, 48, 56, 64, 80, 96, 128, 192, 256, 384, 512, 768, 1024]


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of the composition of subsampled Gaussian steps [(noise multiplier, rate, steps)]."""
    if not history:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = sum(_rdp_per_step(float(s), float(q)) * int(t) for s, q, t in history)
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": the bound stays valid (an
        warnings.simplefilter("ignore")  # upper bound on epsilon), and the searches below probe extreme noise
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, rate: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order (Opacus' analysis, the same as its RDPAccountant's);
    composition over steps is a sum, so one vector per setting serves every step count."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS), dtype=np.float64)


def _fixed_noise(privacy: PrivacyConfig) -> float:
    return privacy.noise_multiplier if privacy.noise_multiplier is not None else 1.0


def affordable_steps(privacy: PrivacyConfig, sample_rate: float, spent: Sequence[tuple[float, float, int]] = (),
                     noise_multiplier: float | None = None) -> int:
    """How many more discriminator steps fit in the budget after `spent` (binary search on the accountant)."""
    sigma = noise_multiplier if noise_multiplier is not None else _fixed_noise(privacy)

    def fits(t: int) -> bool:
        return rdp_epsilon([*spent, (sigma, sample_rate, t)], privacy.delta) <= privacy.epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 10**9:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


MAX_NOISE = 500.0


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int,
                     spent: Sequence[tuple[float, float, int]] = ()) -> float:
    """The smallest noise multiplier (to 0.1%) with which `steps` more subsampled Gaussian steps at `sample_rate`
    keep the composition with `spent` within `epsilon` at `delta`; PrivacyBudgetExhausted when none up to
    MAX_NOISE does."""
    return _noise_for_budget(float(epsilon), float(delta), float(sample_rate), int(steps),
                             tuple((float(s), float(q), int(t)) for s, q, t in spent))


@functools.lru_cache(maxsize=256)
def _noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int,
                      spent: tuple[tuple[float, float, int], ...]) -> float:
    def fits(sigma: float) -> bool:
        return rdp_epsilon([*spent, (sigma, sample_rate, max(1, steps))], delta) <= epsilon

    if not fits(MAX_NOISE):
        raise PrivacyBudgetExhausted(
            f"privacy budget reached: {steps} more discriminator steps do not fit in epsilon {epsilon:g} "
            f"(delta {delta:g}) after what this site has spent, even at noise multiplier {MAX_NOISE:g}")
    lo, hi = 0.05, MAX_NOISE
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def planned_dp_steps(cfg: SiteFacingConfig, privacy: PrivacyConfig, start_step: int) -> int:
    """DP discriminator steps the rest of the run needs: the server's steps left, one DP update per
    privacy.update_every batches, cfg.d_steps each, plus privacy.planned_spare of that for retried steps."""
    left = max(1, cfg.schedule.steps - start_step)
    updates = math.ceil(left / privacy.update_every) * cfg.d_steps
    return int(math.ceil(updates * (1 + privacy.planned_spare)))


class PrivacyLedger:
    """The site's spent privacy, kept on disk across runs, restarts and crashes (see the module docstring)."""

    def __init__(self, path: pathlib.Path, site_id: str, privacy: PrivacyConfig):
        self.path = path
        self.privacy = privacy
        self.unit = privacy.unit
        self.history: list[tuple[float, float, int]] = []
        self.details: dict = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("format") not in (1, LEDGER_FORMAT) or data.get("site_id") != site_id:
                    raise ValueError(f"format {data.get('format')!r}, site {data.get('site_id')!r}")
                self.history = [(float(s), float(q), int(t)) for s, q, t in data["history"]]
                if any(not (s > 0 and 0 < q <= 1 and t >= 0) for s, q, t in self.history):
                    raise ValueError("an entry is out of range")
                recorded = data.get("unit_key", "slice")  # format 1 accounted training slices
                self.details = data.get("details", {})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AsynDGANError(
                    f"the privacy ledger {path} cannot be read ({exc}); this site will not answer until it is "
                    "restored from a backup (deleting it would forget the privacy already spent)") from None
            if recorded != privacy.unit and self.history:
                raise ConfigError(
                    f"the privacy ledger {path} accounts one {UNIT_NAMES[recorded]} as the unit, but this site now "
                    f"protects one {UNIT_NAMES[privacy.unit]} (privacy.unit): its spending cannot be continued "
                    f"under the other unit. Keep it as the record of the earlier runs, move it aside, and start a "
                    f"new ledger (the new guarantee then does not cover what the earlier runs released), or set "
                    f"privacy.unit={recorded}")
        self.site_id = site_id
        self.epsilon_spent = rdp_epsilon(self.history, privacy.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return rdp_epsilon(self._added(noise_multiplier, sample_rate, steps), self.privacy.delta)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record `steps` more DP steps before they are taken; PrivacyBudgetExhausted (nothing recorded) when
        they would take epsilon over the budget. Returns epsilon spent including them."""
        history = self._added(noise_multiplier, sample_rate, steps)
        after = rdp_epsilon(history, self.privacy.delta)
        if after > self.privacy.epsilon * (1 + 1e-9):
            raise PrivacyBudgetExhausted(
                f"privacy budget reached: epsilon {self.epsilon_spent:.3g} of {self.privacy.epsilon:g} spent "
                f"(delta {self.privacy.delta:g}, per {UNIT_NAMES[self.unit]}); the next step would take it to "
                f"{after:.3g}, so this site stops answering (ledger {self.path})")
        self._write(history, after)
        self.history, self.epsilon_spent = history, after
        return after

    def describe(self, **details) -> None:
        """Facts a reviewer needs beside the history (patients, where the grouping came from, the mechanism's
        settings); written with the next charge."""
        self.details.update(details)

    def status(self, exhausted: bool = False) -> PrivacyStatus:
        return PrivacyStatus(True, self.privacy.epsilon, self.epsilon_spent, self.privacy.delta, exhausted)

    def _added(self, noise_multiplier: float, sample_rate: float, steps: int) -> list[tuple[float, float, int]]:
        history = list(self.history)
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            history[-1] = (noise_multiplier, sample_rate, history[-1][2] + steps)
        else:
            history.append((noise_multiplier, sample_rate, steps))
        return history

    def _write(self, history: list[tuple[float, float, int]], epsilon: float) -> None:
        record = {"format": LEDGER_FORMAT, "site_id": self.site_id, "accountant": "rdp (opacus)",
                  "unit_key": self.unit, "unit": f"one {UNIT_NAMES[self.unit]}",
                  "neighbouring": NEIGHBOURING.format(unit=UNIT_NAMES[self.unit]),
                  "history": [list(h) for h in history], "history_columns": ["noise multiplier", "rate", "steps"],
                  "epsilon_at_delta": [epsilon, self.privacy.delta], "budget": self.privacy.epsilon,
                  "details": self.details}
        try:
            atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            raise AsynDGANError(f"cannot record privacy spending in {self.path} ({exc}); this site stops answering "
                                "rather than answer unrecorded") from None


class _AllDiscriminators(nn.Module):
    """The site's discriminators as one module, so that a unit's gradient is clipped over all of them."""

    def __init__(self, learner: SiteLearner):
        super().__init__()
        self.discriminators = learner.discriminators
        for module in self.discriminators.modules():  # Opacus' hooks cannot see through in-place activations
            if hasattr(module, "inplace"):
                setattr(module, "inplace", False)
        self._split = learner._channels
        self._augmented = learner.augmented  # row by row: a row's transform depends on no other row

    def forward(self, condition: torch.Tensor | None, samples: torch.Tensor) -> torch.Tensor:
        condition, samples = self._augmented(condition, samples)
        logits = []
        for name, part in self._split(samples):
            d = self.discriminators[name]
            logits.append(d(part if condition is None else torch.cat([condition, part], dim=1)).flatten(1))
        return torch.cat(logits, dim=1)  # [n, all patch logits of all discriminators]


def check_no_batch_mixing(module: nn.Module) -> None:
    """ConfigError when a layer mixes the rows of a batch (batch normalisation, or anything Opacus refuses)."""
    from opacus.validators import ModuleValidator

    mixing = [type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    errors = ModuleValidator.validate(module, strict=False)
    if mixing or errors:
        raise ConfigError(f"the discriminators hold layers that mix the rows of a batch or that DP-SGD cannot "
                          f"clip per unit ({', '.join(mixing) or errors[0]}); a private site cannot train them")


def resolve_trainable(trainable: str, public_start: bool) -> str:
    """privacy.trainable with 'auto' made concrete: the last layer when the discriminators start from public
    weights (the body keeps what public data taught it), everything when they start from scratch."""
    if trainable != "auto":
        return trainable
    return "last:1" if public_start else "all"


def freeze_except(discriminators: nn.ModuleDict, trainable: str) -> list[nn.Parameter]:
    """Leave only the parameters privacy.trainable names trainable; returns them. 'last:K': the last K modules
    holding parameters of each discriminator."""
    if trainable == "all":
        return [p for p in discriminators.parameters() if p.requires_grad]
    k = int(trainable.split(":")[1])
    kept: list[nn.Parameter] = []
    for d in discriminators.values():
        layers = [m for m in d.modules() if any(True for _ in m.parameters(recurse=False))]
        if k > len(layers):
            raise ConfigError(f"privacy.trainable={trainable}: the discriminator has only {len(layers)} layers with "
                              "parameters")
        for p in d.parameters():
            p.requires_grad_(False)
        for m in layers[-k:]:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
                kept.append(p)
    return kept


class FrozenPublicLearner(SiteLearner):
    """privacy.trainable = 'none': the site's discriminators are the public ones and never learn. An answer is the
    gradient of L_G through them at the server's fakes and the (public) label maps: it depends on no private
    data, so it costs no privacy; what the site contributes privately is its statistics release alone
    (site_statistics.py)."""

    trainable = "none"

    def __init__(self, cfg: SiteFacingConfig, modalities: list[str], initial: dict | None, device: str = "cpu"):
        if initial is None:
            raise ConfigError("privacy.trainable=none keeps the public discriminators as they are, but the server "
                              "sent none (start the run from a public pretraining: asyndgan-server start --init)")
        super().__init__(cfg, modalities, device)
        self.load_public(initial)
        for p in self.discriminators.parameters():
            p.requires_grad_(False)

    def step(self, step, label_maps, real, fake):
        del real  # never read: the answer is a function of public weights and the server's inputs only
        fake = fake.to(self.device).detach().requires_grad_(True)
        x = self.family.discriminator_condition(self.cfg.model, label_maps)
        x = None if x is None else x.to(self.device)
        adv = sum(generator_adversarial_loss(self._logits(name, x, f), self.cfg.loss.generator, self.gan_loss)
                  for name, f in self._channels(fake))
        (grad,) = torch.autograd.grad(adv, fake)
        return grad.detach().cpu(), {"g_adv": float(adv.detach())}


class PrivateSiteLearner(SiteLearner):
    """SiteLearner whose discriminators learn with DP-SGD on patients the site draws itself (module docstring)."""

    def __init__(self, cfg: SiteFacingConfig, modalities: list[str], dataset, label_maps: torch.Tensor | None,
                 privacy: PrivacyConfig, ledger: PrivacyLedger, device: str = "cpu", start_step: int = 0,
                 initial: dict | None = None, chunk_rows: int = 64):
        """initial: public discriminator weights to start from (a state dict of every discriminator), before the
        trainable part is chosen; chunk_rows: rows whose per-sample gradients are held at once (memory)."""
        super().__init__(cfg, modalities, device)
        if self.paired and cfg.loss.lambda_l1 > 0:
            raise ConfigError(
                f"the server asks for an L1 term (loss.lambda_l1 = {cfg.loss.lambda_l1:g}), computed on this site's "
                "real images directly, which its privacy settings forbid; the server must set "
                "site.loss.lambda_l1=0 (or this site must turn privacy off: privacy.enabled=false)")
        from opacus import GradSampleModule

        if initial is not None:
            self.load_public(initial)
        check_no_batch_mixing(self.discriminators)
        self.privacy, self.ledger, self.dataset, self.label_maps = privacy, ledger, dataset, label_maps
        self.patients = dataset.patients() if privacy.unit == "patient" else Patients.one_each(len(dataset))
        self._members = self.patients.members()
        units = self.patients.count
        bound = 1.0 / (10 * units) if privacy.unit == "patient" else 1.0 / units
        if privacy.delta > bound:
            raise ConfigError(f"privacy.delta {privacy.delta:g} is above 1/{'(10 x patients)' if privacy.unit == 'patient' else 'samples'} "
                              f"({bound:.3g} for {units} {UNIT_NAMES[privacy.unit]}s); choose a smaller delta")
        self.sample_rate = privacy.sample_rate
        self.expected_units = self.sample_rate * units
        self.chunk_rows = chunk_rows
        self.trainable = resolve_trainable(privacy.trainable, initial is not None)
        self.trained = freeze_except(self.discriminators, self.trainable)
        self.optimizer = make_optimizer(self.trained, cfg.d_optim)
        # A secret source for the sampling, the site's flips and the noise: cfg.seed is known to the server.
        self.secret = torch.Generator(device="cpu").manual_seed(secrets.randbits(63))
        self.noise_generator = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
        self.model = GradSampleModule(_AllDiscriminators(self), loss_reduction="sum")
        self.planned = planned_dp_steps(cfg, privacy, start_step)
        if privacy.noise_multiplier is not None:
            self.noise_multiplier = privacy.noise_multiplier
        else:
            self.noise_multiplier = noise_for_budget(privacy.epsilon, privacy.delta, self.sample_rate,
                                                     self.planned, ledger.history)
        self.batches = 0
        self.audit = None  # a privacy audit's canaries (experiments/dp_audit.py); None in every real run
        n_trained = sum(p.numel() for p in self.trained)
        ledger.describe(units=units, grouping=self.patients.source, samples=len(dataset),
                        slices_per_patient=privacy.slices_per_patient, augmentations=privacy.augmentations,
                        max_grad_norm=privacy.max_grad_norm, trainable=self.trainable,
                        trained_parameters=n_trained, noise_per_expected_unit=self.noise_multiplier / self.expected_units)
        if privacy.unit == "patient" and self.patients.source == "one sample = one patient":
            log.warning("privacy: the data say nothing about patients, so each sample is treated as its own "
                        "patient; a patient with several samples is then protected only by group privacy (give "
                        "image folders a patients.csv)")
        left = affordable_steps(privacy, self.sample_rate, ledger.history, self.noise_multiplier)
        log.info("privacy on, per %s (%d %ss, grouping: %s): DP-SGD with noise %.3g (%s), clip %g, %.1f %ss "
                 "per step expected (rate %.4g), %d trained discriminator parameters (%s); epsilon %.3g of %g "
                 "spent at delta %g; %d DP steps planned, %d fit in the budget",
                 UNIT_NAMES[privacy.unit], units, UNIT_NAMES[privacy.unit], self.patients.source,
                 self.noise_multiplier, "fixed" if privacy.noise_multiplier is not None else "computed from the budget",
                 privacy.max_grad_norm, self.expected_units, UNIT_NAMES[privacy.unit], self.sample_rate, n_trained,
                 self.trainable, ledger.epsilon_spent, privacy.epsilon, privacy.delta, self.planned, left)
        if self.noise_multiplier / max(self.expected_units, 1e-9) > 0.5:
            log.warning("privacy: noise %.3g against %.1f expected %ss per step: the noise drowns the "
                        "discriminators' signal; more patients, a higher sample_rate, fewer planned steps or "
                        "a larger budget help (docs/privacy.md, 'What privacy costs')", self.noise_multiplier,
                        self.expected_units, UNIT_NAMES[privacy.unit])
        if left < cfg.d_steps:
            ledger.charge(self.noise_multiplier, self.sample_rate, cfg.d_steps)  # raises with the message

    # ---- the DP step ---------------------------------------------------------------------------------------
    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [r], unit of each row [r] numbered 0..drawn-1): Poisson over the units at sample_rate, each
        drawn unit's slices capped at slices_per_patient (a random subset), each row repeated `augmentations`
        times. Poisson sampling may draw no unit at all."""
        chosen = torch.nonzero(torch.rand(self.patients.count, generator=self.secret) < self.sample_rate).flatten()
        cap = self.privacy.slices_per_patient if self.privacy.unit == "patient" else 0
        keys, units = [], []
        for u, patient in enumerate(chosen.tolist()):
            rows = torch.from_numpy(self._members[patient])
            if cap and rows.numel() > cap:
                rows = rows[torch.randperm(rows.numel(), generator=self.secret)[:cap]]
            keys.append(rows.repeat(self.privacy.augmentations))
            units.append(torch.full((rows.numel() * self.privacy.augmentations,), u, dtype=torch.int64))
        if not keys:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.cat(keys), torch.cat(units)

    def _rows(self, keys: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(label maps, real samples) for `keys` with the site's own flips (and the server's crop size)."""
        if keys.numel() == 0:
            maps = None if self.label_maps is None else torch.zeros((0, *like.shape[2:]), dtype=torch.uint8)
            return maps, like.new_zeros((0, *like.shape[1:])).cpu()
        real = self.dataset.real(keys)
        if self.label_maps is None:
            return None, real
        aug = self.family.draw_augmentation(self.cfg.model, int(keys.numel()), True, self.secret)
        return augment(self.label_maps[keys], aug), augment(real, aug)

    def _clipped_sums(self, maps, samples: torch.Tensor, target: float, units: torch.Tensor,
                      ) -> tuple[list[torch.Tensor], float, torch.Tensor]:
        """Sum over units of clip(mean over the unit's rows of the rows' gradients), chunk by chunk (a unit's
        rows always in one chunk); also the rows' mean loss and every unit's gradient norm before clipping."""
        sums = [torch.zeros_like(p) for p in self.trained]
        norms, loss_total = [], 0.0
        count = int(units.max()) + 1 if units.numel() else 0
        sizes = torch.bincount(units, minlength=count)
        start_unit = 0
        while start_unit < count:
            end_unit, rows = start_unit, 0
            while end_unit < count and (rows == 0 or rows + sizes[end_unit] <= self.chunk_rows):
                rows += int(sizes[end_unit])
                end_unit += 1
            sel = torch.nonzero((units >= start_unit) & (units < end_unit)).flatten()
            x = self.family.discriminator_condition(self.cfg.model, None if maps is None else maps[sel])
            logits = self.model(None if x is None else x.to(self.device), samples[sel].to(self.device))
            per_row = nn.functional.binary_cross_entropy_with_logits(
                logits, torch.full_like(logits, target), reduction="none").mean(dim=1)
            loss_total += float(per_row.detach().sum())
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # Opacus' hooks fire on inputs that need no gradient: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                per_row.sum().backward()  # per-row gradients in p.grad_sample
            local = (units[sel] - start_unit).to(self.device)
            # [units, rows]: row r's weight in its unit's mean (a matrix product sums rows per unit much faster
            # than index_add on the CPU)
            mean_of = torch.zeros(end_unit - start_unit, local.numel(), device=self.device)
            mean_of[local, torch.arange(local.numel(), device=self.device)] = \
                1.0 / sizes[start_unit:end_unit].to(self.device, torch.float32)[local]
            per_unit = []
            for p in self.trained:
                row_grads = getattr(p, "grad_sample")  # set by Opacus' hooks: [rows, *p.shape]
                per_unit.append(mean_of @ row_grads.reshape(row_grads.shape[0], -1))
                setattr(p, "grad_sample", None)
            clipped, norm = self.clip_and_sum(per_unit)
            for total, c in zip(sums, clipped):
                total += c
            norms.append(norm.detach().cpu())
            start_unit = end_unit
        mean_loss = loss_total / max(1, samples.shape[0])
        return sums, mean_loss, torch.cat(norms) if norms else torch.zeros(0)

    def clip_and_sum(self, per_unit: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Units' gradients (one [u, numel] matrix per trained parameter) -> (sum over units of every unit's
        gradient scaled to norm <= C over all parameters together, per parameter; the norms before clipping)."""
        norm = torch.cat(per_unit, dim=1).norm(dim=1)
        scale = (self.privacy.max_grad_norm / (norm + 1e-12)).clamp(max=1.0)
        return [(scale @ g).view(p.shape) for g, p in zip(per_unit, self.trained)], norm

    def noisy_gradient(self, real_sums: list[torch.Tensor]) -> list[torch.Tensor]:
        """(sum of clipped unit gradients + N(0, (sigma C)^2)) / (q x units): the only use of private data."""
        std = self.noise_multiplier * self.privacy.max_grad_norm
        out = []
        for total in real_sums:
            noise = torch.normal(0.0, std, size=total.shape, device=total.device, generator=self.noise_generator)
            out.append((total + noise) / self.expected_units)
        return out

    def dp_update(self, fake: torch.Tensor, fake_maps: torch.Tensor | None) -> float:
        """One DP discriminator step; returns the fakes' loss (public)."""
        keys, units = self.draw()
        maps, real = self._rows(keys, fake)
        real_sums, _, _ = self._clipped_sums(maps, real, 1.0, units)
        if self.audit is not None:  # gradient canaries of a privacy audit, clipped like any unit
            for total, c in zip(real_sums, self.clip_and_sum(self.audit.units_this_step())[0]):
                total += c
        fake_sums, loss_fake, _ = self._clipped_sums(
            fake_maps, fake.detach(), 0.0, torch.arange(fake.shape[0], dtype=torch.int64))
        real_half = self.noisy_gradient(real_sums)
        if self.audit is not None:
            self.audit.observe(torch.cat([r.flatten() for r in real_half]) * self.expected_units)
        for p, r, f in zip(self.trained, real_half, fake_sums):
            p.grad = 0.5 * (r + f / max(1, fake.shape[0]))
        self.optimizer.step()
        return loss_fake

    def step(self, step, label_maps, real, fake):
        """As SiteLearner.step, but `real` (the batch keys' real samples) is never used: the discriminators see
        the site's own Poisson sample of patients, with DP-SGD, and L_G has no term on real images. Of the losses
        only those computed from DP outputs and public inputs are returned (d_fake, g_adv), with epsilon spent."""
        del real  # server-chosen keys: see the module docstring
        fake = fake.to(self.device).detach().requires_grad_(True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.d_optim.lr * linear_decay(step, self.cfg.schedule)
        losses: dict[str, float] = {}
        if step != self.learnt_at:  # not a retried step (SiteLearner.learnt_at): a repeat costs no budget
            if self.batches % self.privacy.update_every == 0:
                self.ledger.charge(self.noise_multiplier, self.sample_rate, self.cfg.d_steps)
                for _ in range(self.cfg.d_steps):
                    losses["d_fake"] = self.dp_update(fake, label_maps)
            self.batches += 1
            self.learnt_at = step

        self.model.disable_hooks()
        try:
            x = self.family.discriminator_condition(self.cfg.model, label_maps)
            x = None if x is None else x.to(self.device)
            adv = sum(generator_adversarial_loss(self._logits(name, x, f), self.cfg.loss.generator, self.gan_loss)
                      for name, f in self._channels(fake))
            (grad,) = torch.autograd.grad(adv, fake)
        finally:
            self.model.enable_hooks()
        losses.update({"g_adv": float(adv.detach()), "epsilon": float(self.ledger.epsilon_spent)})
        if not math.isfinite(losses.get("d_fake", 0.0)):
            log.warning("step %d: non-finite discriminator loss", step)
        return grad.detach().cpu(), losses
