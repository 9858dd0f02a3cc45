"""Differentiable augmentation at a site's discriminators (the DiffAugment idea: Zhao et al., NeurIPS 2020).

A small site's real slices are seen hundreds of times; its discriminator then memorises them and its answers stop
teaching the generator. Each time a discriminator looks at a batch, real or synthetic, the batch is first
transformed at random; the transforms are differentiable, so the gradient the site returns still reaches every
synthetic pixel. Real and synthetic batches are transformed alike in distribution (independent draws), so the
discriminator cannot tell them apart by the transform.

    color        per sample: brightness shift U(-0.2, 0.2) and contrast scale U(0.7, 1.3) about its mean
    translation  per sample: a circular shift of up to 1/8 of the side, the label map moved with the image (the
                 border of a brain slice is background, so nothing of the brain wraps round)
    cutout       per sample: a square of 1/4 of the side set to the background value (-1), label map untouched

Every draw comes from the generator passed in, row by row: no sample's transform depends on another's, so the
per-patient gradients of differential privacy stay per patient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POLICIES = ("color", "translation", "cutout")
BACKGROUND = -1.0


def diff_augment(condition: torch.Tensor | None, sample: torch.Tensor, policy: Sequence[str],
                 rng: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(condition, sample) transformed by `policy`, in its order; sample [n, C, H, W], condition [n, K, H, W] or
    None. Differentiable with respect to `sample`."""
    for name in policy:
        if name == "color":
            sample = _color(sample, rng)
        elif name == "translation":
            condition, sample = _translation(condition, sample, rng)
        elif name == "cutout":
            sample = _cutout(sample, rng)
        else:
            raise ValueError(f"unknown augmentation {name!r} (known: {', '.join(POLICIES)})")
    return condition, sample


def _uniform(n: int, low: float, high: float, rng: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, 1, 1, 1, generator=rng)).to(like.device, like.dtype)


def _color(sample: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    n = sample.shape[0]
    shift = _uniform(n, -0.2, 0.2, rng, sample)
    scale = _uniform(n, 0.7, 1.3, rng, sample)
    mean = sample.mean(dim=(1, 2, 3), keepdim=True)
    return (sample - mean) * scale + mean + shift


def _translation(condition: torch.Tensor | None, sample: torch.Tensor, rng: torch.Generator
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    n, _, h, w = sample.shape
    most = (max(1, h // 8), max(1, w // 8))
    dy = torch.randint(-most[0], most[0] + 1, (n,), generator=rng).tolist()
    dx = torch.randint(-most[1], most[1] + 1, (n,), generator=rng).tolist()
    sample = torch.stack([s.roll((a, b), dims=(1, 2)) for s, a, b in zip(sample, dy, dx)])
    if condition is not None:
        condition = torch.stack([c.roll((a, b), dims=(1, 2)) for c, a, b in zip(condition, dy, dx)])
    return condition, sample


def _cutout(sample: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    n, _, h, w = sample.shape
    size = (max(1, h // 4), max(1, w // 4))
    top = torch.randint(0, h - size[0] + 1, (n,), generator=rng)
    left = torch.randint(0, w - size[1] + 1, (n,), generator=rng)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + size[0]).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + size[1]).view(n, 1, 1)))
    keep = (~inside).unsqueeze(1).to(sample.device, sample.dtype)
    return sample * keep + BACKGROUND * (1 - keep)
