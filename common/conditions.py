"""Label-map conditions and their augmentation, shared by server and site so both see the same thing.

A uint8 label map becomes a one-hot float tensor [n, K, H, W]. Augmentation (a crop, left-right / top-bottom
flips) is drawn by the server, applied to the label map before G and by the site to its real image. Which
family uses these, and how, is in common/families.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi


def brain_region(label_maps: torch.Tensor) -> torch.Tensor:
    """bool [n, H, W]: each map's brain, i.e. its labelled pixels (outline and tumour) with the holes filled."""
    maps = label_maps.numpy() > 0
    return torch.from_numpy(np.stack([ndi.binary_fill_holes(m) for m in maps]) if len(maps) else maps)


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
    if aug.crop_size and aug.crop_y is not None and aug.crop_x is not None:
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


def draw_augmentation(n: int, flip: bool, stored_size: int, crop_size: int, rng: torch.Generator) -> Augmentation:
    """Left-right flips with probability 1/2 (when `flip`), no top-bottom flips, and a uniformly placed
    crop_size crop when the stored maps are larger. Draws flips first, then crop rows, then crop columns."""
    flip_h = torch.rand(n, generator=rng) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    aug = Augmentation(flip_h, torch.zeros(n, dtype=torch.bool))
    if stored_size > crop_size:
        aug.crop_size = crop_size
        aug.crop_y = torch.randint(stored_size - crop_size + 1, (n,), generator=rng)
        aug.crop_x = torch.randint(stored_size - crop_size + 1, (n,), generator=rng)
    return aug
