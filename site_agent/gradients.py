"""Where a site computes its gradient: its discriminator step(s), then d(L_G)/d(fake). No transport here.

For the batch the server generated for this site's keys:
    D step:   L_D = 1/2 [ BCE(D(x, real), 1) + BCE(D(x, fake), 0) ]   (one discriminator per modality, summed)
    G loss:   L_G = sum_m BCE(D_m(x, fake_m), 1) + lambda_L1 * mean|fake - real|   (with the updated D)
    returned: g = dL_G / dfake, same shape as fake.
For unpaired families (mlp1d) the discriminator is unconditional and L_G has no L1 term; what D sees and how
the sample splits between discriminators is the family's (common/families.py).

Why a second adversarial loss (`loss.generator = "kl"`, -exp(logit), f-GAN's forward KL): with an optimal D_j,
exp(logit_j) estimates p_j / p_G, so the sites' weighted gradients sum to that of p_mix / p_G and the pooled
mixture is the generator's fixed point even when G has no site-specific input, as in the 1-D experiment. With
the vanilla loss each site's push is weighted by p_G / (p_j + p_G), and the sum does not vanish at the mixture:
measured on the 1-D mixture, G settles where the sites' Gaussians overlap (W1 about 2 instead of 0.06). With
label-map conditioning (image2d), each D_j judges fakes for its own label maps and the vanilla loss is sound.
"""

from __future__ import annotations

import torch
from torch import nn

from asyndgan.common.diff_augment import diff_augment
from asyndgan.common.seeding import seeded
from asyndgan.common.config import SiteFacingConfig, linear_decay, make_optimizer
from asyndgan.common.families import get_family


class GANLoss(nn.Module):
    """Vanilla GAN loss (BCE with logits) against a constant real/fake target held as buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = self.get_buffer("real_label" if target_is_real else "fake_label")
        return self.bce(logits, target.expand_as(logits))


KL_LOGIT_CAP = 5.0  # exp(logit) is capped so one confident discriminator cannot blow the gradient up


def generator_adversarial_loss(logits: torch.Tensor, kind: str, gan_loss: "GANLoss") -> torch.Tensor:
    if kind == "vanilla":
        return gan_loss(logits, True)
    if kind == "kl":
        return -torch.exp(torch.clamp(logits, max=KL_LOGIT_CAP)).mean()
    raise ValueError(f"unknown generator loss {kind!r}; choose vanilla or kl")


class SiteLearner:
    """A site's discriminators, their optimiser, and the computation of the generator gradient."""

    def __init__(self, cfg: SiteFacingConfig, modalities: list[str], device: str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.family = get_family(cfg.model.family)
        self.paired = self.family.paired
        with seeded(cfg.seed):  # the same weights for the same seed (common/seeding.py)
            self.discriminators = self.family.build_discriminators(cfg.model, modalities).to(self.device)
        self.optimizer = make_optimizer(self.discriminators.parameters(), cfg.d_optim)
        self.gan_loss = GANLoss().to(self.device)
        # Draws of the differentiable augmentation (cfg.diff_augment), apart from every other random source.
        self.augment_rng = torch.Generator().manual_seed(cfg.seed)
        # The generator step the discriminators last learnt at: a batch for the same step again is the server
        # retrying it (a missed quorum), and the discriminators must not get ahead of the generator.
        self.learnt_at: int | None = None

    def load_public(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from public discriminator weights (a state dict over every modality's discriminator): this
        site's discriminators take their entries; ConfigError when they do not fit."""
        from asyndgan.common.errors import ConfigError

        own = self.discriminators.state_dict()
        missing = [k for k in own if k not in weights]
        wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
        if missing or wrong:
            raise ConfigError(f"the public discriminator weights do not fit this site's discriminators "
                              f"({len(missing)} entries missing, {len(wrong)} of another shape, e.g. "
                              f"{(missing + wrong)[0]})")
        self.discriminators.load_state_dict({k: weights[k].to(own[k].dtype) for k in own})

    def augmented(self, x: torch.Tensor | None, sample: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """What a discriminator is shown: (condition, sample) through cfg.diff_augment's transforms, fresh draws
        each time (common/diff_augment.py); unchanged without them."""
        if not self.cfg.diff_augment:
            return x, sample
        return diff_augment(x, sample, self.cfg.diff_augment, self.augment_rng)

    def _logits(self, name: str, x: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor:
        x, sample = self.augmented(x, sample)
        d = self.discriminators[name]
        return d(sample) if x is None else d(torch.cat([x, sample], dim=1))

    def _channels(self, t: torch.Tensor):
        """(discriminator name, that discriminator's slice of t) pairs."""
        return self.family.discriminator_inputs(list(self.discriminators.keys()), t)

    def step(
        self, step: int, label_maps: torch.Tensor | None, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """label_maps uint8 [n, H, W] or None; real, fake [n, C, ...] -> (dL_G/dfake [n, C, ...], losses)."""
        x = self.family.discriminator_condition(self.cfg.model, label_maps)
        if x is not None:
            x = x.to(self.device)
        real = real.to(self.device)
        fake = fake.to(self.device).detach().requires_grad_(True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.d_optim.lr * linear_decay(step, self.cfg.schedule)

        losses: dict[str, float] = {}
        for _ in range(self.cfg.d_steps if step != self.learnt_at else 0):
            loss_d = torch.zeros((), device=self.device)
            for (name, r), (_, f) in zip(self._channels(real), self._channels(fake.detach())):
                loss_d = loss_d + 0.5 * (self.gan_loss(self._logits(name, x, r), True)
                                         + self.gan_loss(self._logits(name, x, f), False))
            self.optimizer.zero_grad(set_to_none=True)
            loss_d.backward()
            self.optimizer.step()
            losses["d"] = float(loss_d.detach())
        self.learnt_at = step

        kind = self.cfg.loss.generator
        adv = torch.stack([generator_adversarial_loss(self._logits(name, x, f), kind, self.gan_loss)
                           for name, f in self._channels(fake)]).sum()
        loss_g = adv
        losses["g_adv"] = float(adv.detach())
        if self.paired and self.cfg.loss.lambda_l1 > 0:
            l1 = (fake - real).abs().mean()
            loss_g = loss_g + self.cfg.loss.lambda_l1 * l1
            losses["g_l1"] = float(l1.detach())
        # Only the fake's gradient is wanted; D's parameter gradients from this pass are not kept.
        (grad,) = torch.autograd.grad(loss_g, fake)
        return grad.detach().cpu(), losses
