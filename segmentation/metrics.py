"""Per-patient 3-D Dice and HD95 (MONAI's metrics) with an explicit rule for empty masks, and their summary.

MONAI returns nan for a surface distance when the prediction or the truth is empty, and a "mean" reduction then
silently drops that patient; `DiceMetric(ignore_empty=True)` does the same for an empty truth. A comparison that
drops exactly the patients a method gets most wrong flatters it, so every patient is scored, by the BraTS
challenge's convention:

    truth empty, prediction empty       Dice 1, HD95 0 mm      (nothing there, nothing found: perfect)
    truth non-empty, prediction empty   Dice 0, HD95 = diagonal
    truth empty, prediction non-empty   Dice 0, HD95 = diagonal

where the diagonal is the volume's extent in mm, sqrt(sum((n_i * spacing_i)^2)): 373.13 mm for BraTS'
240 x 240 x 155 at 1 mm (the value BraTS uses), the farthest two voxels of the volume can be (the DSL code's
"image side" for 2-D). HD95 is the symmetric 95th-percentile Hausdorff distance between the two surfaces, in mm
from the voxel spacing (`HausdorffDistanceMetric(percentile=95)`, spacing passed at call time).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

Empty = Literal["none", "prediction", "truth", "both"]

EMPTY_RULE = ("every patient counts: truth and prediction both empty -> Dice 1, HD95 0 mm; exactly one empty -> "
              "Dice 0, HD95 = the volume's diagonal in mm (373.13 mm for 240x240x155 at 1 mm), as BraTS scores them")


@dataclass(frozen=True)
class CaseScore:
    dice: float
    hd95_mm: float
    empty: Empty  # which side was empty, i.e. which rule scored this case ("none": MONAI's metrics)
    truth_voxels: int
    predicted_voxels: int

    def as_dict(self) -> dict:
        return asdict(self)


def diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """The volume's extent in mm: the HD95 given to a case where exactly one of the two masks is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """[1, 2, *shape] float: background and foreground channels, as MONAI's metrics expect."""
    fg = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return torch.cat([1 - fg, fg], dim=1)


def score_case(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> CaseScore:
    """Dice and HD95 (mm) of one patient's binary masks (same shape, any dimension), with the empty rule."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one value per axis of {pred.shape}")
    pred, truth = pred.astype(bool), truth.astype(bool)
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_pred == 0 and n_truth == 0:
        return CaseScore(1.0, 0.0, "both", 0, 0)
    if n_pred == 0 or n_truth == 0:
        return CaseScore(0.0, diagonal_mm(pred.shape, spacing), "prediction" if n_pred == 0 else "truth",
                         n_truth, n_pred)
    y_pred, y = _one_hot(pred), _one_hot(truth)
    dice = DiceMetric(include_background=False, reduction="none")(y_pred, y)
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` internally; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            y_pred, y, spacing=[float(s) for s in spacing])
    return CaseScore(float(dice.item()), float(hd95.item()), "none", n_truth, n_pred)


def dice_on_tumour_slices(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice restricted to the axial slices (last axis) where the truth has the region: the DSL code's protocol
    (its models saw tumour slices only), reported beside the whole-volume figures for comparison with the papers.
    None when the truth is empty (no such slice)."""
    keep = truth.reshape(-1, truth.shape[-1]).any(axis=0)
    if not keep.any():
        return None
    y_pred, y = _one_hot(pred[..., keep].astype(bool)), _one_hot(truth[..., keep].astype(bool))
    return float(DiceMetric(include_background=False, reduction="none")(y_pred, y).item())


def summarise(values: list[float]) -> dict[str, float | int]:
    """Mean and sample standard deviation (n - 1; 0 for a single patient) over patients."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "sd": sd, "n": int(arr.size)}
