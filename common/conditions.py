"""How a family's condition tensor is made, shared by server and site so both see the same thing.

image2d: the uint8 label map a site uploaded becomes a one-hot float tensor [n, K, H, W]; augmentation is a
per-sample left-right / top-bottom flip, drawn by the server, applied to the label map before G and by the site
to its real image. mlp1d: the condition is Gaussian noise drawn by the server; there is no label map and the
discriminator is unconditional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyndgan.common.config import ModelConfig

PAIRED_FAMILIES = {"image2d"}  # families where a sample's key pairs a condition with a real image


def one_hot(label_maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """uint8 [n, H, W] -> float32 [n, K, H, W]."""
    return F.one_hot(label_maps.long(), num_classes).permute(0, 3, 1, 2).float()


@dataclass
class Augmentation:
    """Per-sample crop and flips. crop_size 0 means no crop."""

    flip_h: torch.Tensor  # bool [n]
    flip_v: torch.Tensor  # bool [n]
    crop_size: int = 0
    crop_y: torch.Tensor | None = None  # int64 [n]
    crop_x: torch.Tensor | None = None  # int64 [n]

    @staticmethod
    def none(n: int) -> "Augmentation":
        return Augmentation(torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))


def augment(t: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """Crop (if any), then flip, sample i of t [n, ..., H, W]."""
    if aug.crop_size:
        s = aug.crop_size
        t = torch.stack([t[i, ..., y : y + s, x : x + s] for i, (y, x) in
                         enumerate(zip(aug.crop_y.tolist(), aug.crop_x.tolist()))])
    return apply_flips(t, aug.flip_h, aug.flip_v)


def apply_flips(t: torch.Tensor, flip_h: torch.Tensor, flip_v: torch.Tensor) -> torch.Tensor:
    """Flip sample i of t [n, ..., H, W] left-right where flip_h[i] and top-bottom where flip_v[i]."""
    if flip_h.any():
        t = torch.where(flip_h.view(-1, *[1] * (t.dim() - 1)), t.flip(-1), t)
    if flip_v.any():
        t = torch.where(flip_v.view(-1, *[1] * (t.dim() - 1)), t.flip(-2), t)
    return t


def sample_shape(model: ModelConfig, n: int, channels: int | None = None) -> tuple[int, ...]:
    """Shape of G's output for n samples (optionally only `channels` of the image2d modalities)."""
    if model.family == "image2d":
        size = model.image2d.image_size
        c = len(model.image2d.modalities) if channels is None else channels
        return (n, c, size, size)
    return (n, 1)
