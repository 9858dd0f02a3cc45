"""Per-modality intensity statistics of the brain and the tumour in a set of images with their label maps: what a
private site may release once under DP (site_agent/site_statistics.py) and what the server pulls its generator's
images towards (central_server/trainer.py). One definition for both, so the two sides measure the same thing."""

from __future__ import annotations

import math

import torch

from asyndgan.common.conditions import brain_region
from asyndgan.common.errors import ProtocolError

REGIONS = ("brain", "tumour")  # the brain outside the tumour; the whole tumour
MOMENTS = ("mean", "std")
TUMOUR_LABELS = (2, 3, 4)  # necrotic core, edema, enhancing tumour (the label values of the uploaded maps)
MAX_NUMBERS = 256  # a release is 4 numbers per modality; anything longer is refused


def names(modalities: list[str]) -> list[str]:
    """The released numbers' names, in release order: "<modality>/<region>/<moment>"."""
    return [f"{m}/{r}/{k}" for m in modalities for r in REGIONS for k in MOMENTS]


def _regions(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """bool [n, H, W] per region of uint8 label maps [n, H, W]."""
    tumour = torch.isin(maps, torch.tensor(TUMOUR_LABELS, dtype=maps.dtype))
    return {"brain": brain_region(maps) & ~tumour, "tumour": tumour}


def region_moments(images: torch.Tensor, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """"<region>/<moment>" -> [C] over all the images' pixels of that region (differentiable in images
    [n, C, H, W]); a region with no pixel gives NaN."""
    out = {}
    for region, mask in _regions(maps.cpu()).items():
        w = mask[:, None].to(images.device, images.dtype).expand_as(images)
        count = w.sum(dim=(0, 2, 3))
        mean = (images * w).sum(dim=(0, 2, 3)) / count
        var = ((images - mean[None, :, None, None]) ** 2 * w).sum(dim=(0, 2, 3)) / count
        out[f"{region}/mean"], out[f"{region}/std"] = mean, var.clamp_min(1e-8).sqrt()
    return out


def check_received(stats: dict[str, tuple[float, float]], known: set[str]) -> dict[str, tuple[float, float]]:
    """A site's release as the server uses it: ProtocolError for a malformed one; names the server does not
    generate are dropped; values are clamped to the range of normalised images (a site can pull the generator
    only as far as an image can go)."""
    if len(stats) > MAX_NUMBERS:
        raise ProtocolError(f"site statistics hold {len(stats)} numbers (at most {MAX_NUMBERS})")
    out = {}
    for key, (value, sd) in stats.items():
        if not (math.isfinite(value) and math.isfinite(sd) and sd >= 0):
            raise ProtocolError(f"site statistic {key[:80]!r} is {value!r} with noise {sd!r}")
        if key in known:
            out[key] = (min(1.0, max(-1.0 if key.endswith("/mean") else 0.0, value)), sd)
    return out


def statistics_loss(images: torch.Tensor, maps: torch.Tensor, modalities: list[str],
                    target: dict[str, tuple[float, float]], floor: float) -> torch.Tensor | None:
    """mean over the target's numbers of (measured - value)^2 / (noise std^2 + floor^2) on images [n, C, H, W]
    (channels in `modalities` order); None when no number can be measured on these images."""
    moments = region_moments(images, maps)
    terms = []
    for key, (value, sd) in target.items():
        modality, region, moment = key.split("/")
        if modality not in modalities:
            continue
        measured = moments[f"{region}/{moment}"][modalities.index(modality)]
        if torch.isfinite(measured):
            terms.append((measured - value) ** 2 / (sd ** 2 + floor ** 2))
    return torch.stack(terms).mean() if terms else None
