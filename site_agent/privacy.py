"""A site's own differential privacy: its discriminators learn with DP-SGD, and a ledger it keeps bounds the total.

What leaves a private site is d(L_G)/d(fake) with L_G = sum_m BCE(D_m(x, fake_m), 1): a function of the server's
fakes, the (public) label maps and the discriminators' weights, and of nothing else the site holds. So if the
weights are differentially private, everything the site sends is post-processing of a DP mechanism and carries
the same (epsilon, delta). The weights are made DP here:

    each discriminator step: the site draws its own real samples (Poisson, rate q = privacy.sample_rate, from a
    secret random source the server cannot predict), puts them in one batch with the server's fakes, clips every
    row's gradient to max_grad_norm and adds Gaussian noise of std noise_multiplier * max_grad_norm (Opacus).
    A fake row depends on no private data, so one real sample changes the noisy sum by at most max_grad_norm:
    the subsampled Gaussian mechanism, composed over the steps with Opacus' RDP accountant.

The server chooses which keys its fakes are for; that is why the real rows are not the batch's keys (no
amplification by subsampling could be claimed for server-chosen keys) and why no L1 term (computed on the key's
real image directly) is allowed: a private site refuses a server that asks for one.

The ledger (PrivacyLedger) is a small JSON file in the site's state folder, written (atomically, fsynced) before
each step is taken: a crash can only over-count. A restart, a new run, or deleting the discriminator state never
resets it; a damaged ledger stops the site instead of starting from zero. The unit protected is one training
sample (an axial slice with its label map): a patient with k slices is covered by group privacy (weaker).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import secrets
import warnings

import torch
from torch import nn

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.serde import PrivacyStatus
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig, linear_decay
from asyndgan.common.conditions import augment
from asyndgan.common.errors import AsynDGANError, ConfigError, PrivacyBudgetExhausted
from asyndgan.site_agent.gradients import SiteLearner, generator_adversarial_loss

log = logging.getLogger(__name__)
LEDGER_FORMAT = 1


def ledger_path(state_dir: pathlib.Path, site_id: str) -> pathlib.Path:
    return state_dir / f"{site_id}.privacy-ledger.json"


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of the composition of subsampled Gaussian steps [(noise multiplier, rate, steps)]."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return float(accountant.get_epsilon(delta))


def affordable_steps(privacy: PrivacyConfig, sample_rate: float, spent: list[tuple[float, float, int]] = ()) -> int:
    """How many more discriminator steps fit in the budget after `spent` (binary search on the accountant)."""
    def fits(t: int) -> bool:
        return rdp_epsilon([*spent, (privacy.noise_multiplier, sample_rate, t)], privacy.delta) <= privacy.epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 10**9:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class PrivacyLedger:
    """The site's spent privacy, kept on disk across runs, restarts and crashes (see the module docstring)."""

    def __init__(self, path: pathlib.Path, site_id: str, privacy: PrivacyConfig):
        self.path = path
        self.privacy = privacy
        self.history: list[tuple[float, float, int]] = []
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("format") != LEDGER_FORMAT or data.get("site_id") != site_id:
                    raise ValueError(f"format {data.get('format')!r}, site {data.get('site_id')!r}")
                self.history = [(float(s), float(q), int(t)) for s, q, t in data["history"]]
                if any(not (s > 0 and 0 < q <= 1 and t >= 0) for s, q, t in self.history):
                    raise ValueError("an entry is out of range")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AsynDGANError(
                    f"the privacy ledger {path} cannot be read ({exc}); this site will not answer until it is "
                    "restored from a backup (deleting it would forget the privacy already spent)") from None
        self.site_id = site_id
        self.epsilon_spent = rdp_epsilon(self.history, privacy.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return rdp_epsilon(self._added(noise_multiplier, sample_rate, steps), self.privacy.delta)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record `steps` more DP steps before they are taken; PrivacyBudgetExhausted (nothing recorded) when
        they would take epsilon over the budget. Returns epsilon spent including them."""
        history = self._added(noise_multiplier, sample_rate, steps)
        after = rdp_epsilon(history, self.privacy.delta)
        if after > self.privacy.epsilon:
            raise PrivacyBudgetExhausted(
                f"privacy budget reached: epsilon {self.epsilon_spent:.3g} of {self.privacy.epsilon:g} spent "
                f"(delta {self.privacy.delta:g}); the next step would take it to {after:.3g}, so this site stops "
                f"answering (ledger {self.path})")
        self._write(history, after)
        self.history, self.epsilon_spent = history, after
        return after

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
                  "unit": "one training sample", "history": [list(h) for h in history],
                  "epsilon_at_delta": [epsilon, self.privacy.delta]}
        try:
            atomic_write_text(self.path, json.dumps(record, indent=1) + "\n")
        except OSError as exc:
            raise AsynDGANError(f"cannot record privacy spending in {self.path} ({exc}); this site stops answering "
                                "rather than answer unrecorded") from None


class _AllDiscriminators(nn.Module):
    """The site's discriminators as one module, so that a sample's gradient is clipped over all of them."""

    def __init__(self, learner: SiteLearner):
        super().__init__()
        self.discriminators = learner.discriminators
        for module in self.discriminators.modules():  # Opacus' hooks cannot see through in-place activations
            if hasattr(module, "inplace"):
                module.inplace = False
        self._split = learner._channels

    def forward(self, condition: torch.Tensor | None, samples: torch.Tensor) -> torch.Tensor:
        logits = []
        for name, part in self._split(samples):
            d = self.discriminators[name]
            logits.append(d(part if condition is None else torch.cat([condition, part], dim=1)).flatten(1))
        return torch.cat(logits, dim=1)  # [n, all patch logits of all discriminators]


class PrivateSiteLearner(SiteLearner):
    """SiteLearner whose discriminators learn with DP-SGD on samples the site draws itself (module docstring)."""

    def __init__(self, cfg: SiteFacingConfig, modalities: list[str], dataset, label_maps: torch.Tensor | None,
                 privacy: PrivacyConfig, ledger: PrivacyLedger, device: str = "cpu"):
        super().__init__(cfg, modalities, device)
        if self.paired and cfg.loss.lambda_l1 > 0:
            raise ConfigError(
                f"the server asks for an L1 term (loss.lambda_l1 = {cfg.loss.lambda_l1:g}), computed on this site's "
                "real images directly, which its privacy settings forbid; the server must set "
                "site.loss.lambda_l1=0 (or this site must turn privacy off: privacy.enabled=false)")
        from opacus import GradSampleModule

        n = len(dataset)
        if privacy.delta > 1.0 / max(1, n):
            raise ConfigError(f"privacy.delta {privacy.delta:g} is above 1/samples (1/{n}); choose a smaller delta")
        self.privacy, self.ledger, self.dataset, self.label_maps = privacy, ledger, dataset, label_maps
        self.sample_rate = privacy.sample_rate
        self.expected_real = self.sample_rate * n
        # A secret source for the sampling, the site's flips and the noise: cfg.seed is known to the server.
        self.secret = torch.Generator(device="cpu").manual_seed(secrets.randbits(63))
        self.noise_generator = torch.Generator(device=self.device).manual_seed(secrets.randbits(63))
        # Opacus computes every row's own gradient; _privatise clips and adds the noise (see there).
        self.model = GradSampleModule(_AllDiscriminators(self), loss_reduction="sum")
        left = affordable_steps(privacy, self.sample_rate, ledger.history)
        if self.expected_real < 8:
            log.warning("privacy: %.1f real samples per discriminator step expected (rate %g x %d samples): at "
                        "this size the DP noise drowns the discriminators' signal and the generator learns little "
                        "from this site (README, 'What it costs')", self.expected_real, self.sample_rate, n)
        log.info("privacy on: DP-SGD with noise %g, clip %g, %.1f own samples per step expected (rate %.4g); "
                 "epsilon %.3g of %g spent at delta %g; about %d more discriminator steps fit in the budget",
                 privacy.noise_multiplier, privacy.max_grad_norm, self.expected_real, self.sample_rate,
                 ledger.epsilon_spent, privacy.epsilon, privacy.delta, left)
        if left < cfg.d_steps:
            ledger.charge(privacy.noise_multiplier, self.sample_rate, cfg.d_steps)  # raises with the message

    def _own_rows(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Real samples this site draws itself: Poisson at sample_rate, its own flips, the server's crop size.
        Poisson sampling may draw none (the batch then holds the fakes only)."""
        n = len(self.dataset)
        keys = torch.nonzero(torch.rand(n, generator=self.secret) < self.sample_rate).flatten()
        if keys.numel() == 0:
            maps = None if self.label_maps is None else torch.zeros((0, *like.shape[2:]), dtype=torch.uint8)
            return maps, like.new_zeros((0, *like.shape[1:])).cpu()
        aug = self.family.draw_augmentation(self.cfg.model, int(keys.numel()), True, self.secret) \
            if self.label_maps is not None else None
        real = self.dataset.real(keys)
        maps = None
        if self.label_maps is not None:
            real = augment(real, aug)
            maps = augment(self.label_maps[keys], aug)
        return maps, real

    def _privatise(self, real_rows: int) -> None:
        """p.grad from the per-sample gradients: the discriminator loss's two halves, as in the papers,

            real half = (sum over the real rows of clip(g_i) + N(0, (noise x C)^2)) / expected real rows
            fake half = mean over the fake rows of clip(g_j)                      (public: no noise needed)
            grad      = (real half + fake half) / 2

        with clip(g) = g * min(1, C / |g|) over all discriminators' parameters at once. One real sample changes
        the noisy sum by at most C: the Gaussian mechanism on a Poisson sample, as the ledger accounts it."""
        params = [p for p in self.discriminators.parameters() if p.requires_grad]
        per_sample = [p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params]
        norms = torch.cat(per_sample, dim=1).norm(dim=1)
        scale = (self.privacy.max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
        real_w = scale.clone()
        real_w[real_rows:] = 0
        fake_w = scale.clone()
        fake_w[:real_rows] = 0
        fakes = max(1, scale.shape[0] - real_rows)
        std = self.privacy.noise_multiplier * self.privacy.max_grad_norm
        for p, g in zip(params, per_sample):
            noise = torch.normal(0.0, std, size=p.shape, device=p.device, generator=self.noise_generator)
            real_half = ((real_w @ g).view(p.shape) + noise) / self.expected_real
            fake_half = (fake_w @ g).view(p.shape) / fakes
            p.grad = 0.5 * (real_half + fake_half)
            p.grad_sample = None

    def step(self, step, label_maps, real, fake):
        """As SiteLearner.step, but `real` (the batch keys' real samples) is never used: the discriminators see
        the site's own Poisson sample, with DP-SGD, and L_G has no term on real images. Of the losses only those
        computed from DP outputs and public inputs are returned (d_fake, g_adv), with epsilon spent."""
        del real  # server-chosen keys: see the module docstring
        fake = fake.to(self.device).detach().requires_grad_(True)
        x_fake = self.family.discriminator_condition(self.cfg.model, label_maps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.d_optim.lr * linear_decay(step, self.cfg.schedule)
        self.ledger.charge(self.privacy.noise_multiplier, self.sample_rate, self.cfg.d_steps)
        for _ in range(self.cfg.d_steps):
            maps, own = self._own_rows(fake)
            x_own = self.family.discriminator_condition(self.cfg.model, maps)
            samples = torch.cat([own.to(self.device), fake.detach()])
            condition = None if x_fake is None else torch.cat([x_own, x_fake]).to(self.device)
            target = torch.cat([torch.ones(own.shape[0]), torch.zeros(fake.shape[0])]).to(self.device)
            logits = self.model(condition, samples)
            per_row = nn.functional.binary_cross_entropy_with_logits(
                logits, target[:, None].expand_as(logits), reduction="none").mean(dim=1)
            # Reported: the loss on the fakes only (D's weights are DP; the real rows' loss is not, so it stays).
            loss_fake = per_row[own.shape[0]:].mean()
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # Opacus' hooks fire on inputs that need no gradient: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                per_row.sum().backward()  # per-sample gradients in p.grad_sample
            self._privatise(real_rows=own.shape[0])
            self.optimizer.step()

        self.model.disable_hooks()
        try:
            x = None if x_fake is None else x_fake.to(self.device)
            adv = sum(generator_adversarial_loss(self._logits(name, x, f), self.cfg.loss.generator, self.gan_loss)
                      for name, f in self._channels(fake))
            (grad,) = torch.autograd.grad(adv, fake)
        finally:
            self.model.enable_hooks()
        losses = {"d_fake": float(loss_fake.detach()), "g_adv": float(adv.detach()),
                  "epsilon": float(self.ledger.epsilon_spent)}
        if not math.isfinite(losses["d_fake"]):
            log.warning("step %d: non-finite discriminator loss", step)
        return grad.detach().cpu(), losses
