"""Per-patient 3-D evaluation of a trained model on a BraTS tree: predictions, scores, CSV and summary.

Protocol (also written into every summary.json): each test case is read and normalised exactly as in training;
every axial slice of the volume (tumour or not, brain or not) is resized in-plane to the network's size and
segmented by the 2-D net (MONAI's SliceInferer over the stacked slices); the tumour probability is resized back
(bilinear) to the case's own in-plane grid, thresholded at 0.5 and kept inside the brain (voxels where any
modality is above 0: tumour is never outside a skull-stripped brain), and the slices are stacked in order into
a volume on the original grid. Dice and HD95 (mm, from the NIfTI voxel spacing) are then computed per patient
on that whole volume against the case's own segmentation of the model's region, with the empty rule of
metrics.py; mean and sample standard deviation are over patients, every patient counted. Beside them, and only
for comparison with the papers, Dice on the slices where the truth has tumour (the DSL code's protocol: its
models never saw a healthy slice, and false positives elsewhere would not count).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer
from tqdm import tqdm

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.errors import ConfigError
from asyndgan.segmentation.config import REGION_NAMES, EvalRunConfig, SegmentationRecipe
from asyndgan.segmentation.data import TestCase, TestSet, load_test_cases, region_mask
from asyndgan.segmentation.metrics import EMPTY_RULE, dice_on_tumour_slices, score_case, summarise
from asyndgan.segmentation.model import load_model
from asyndgan.common.devices import resolve_device

log = logging.getLogger(__name__)

PROTOCOL = ("per patient, 3-D, whole volume: every axial slice segmented by the 2-D net at the training size, "
            "tumour probability resized back to the case's in-plane grid, thresholded at 0.5, kept inside the "
            "brain (any modality > 0), slices stacked in order; Dice and HD95 (mm, NIfTI voxel spacing) from MONAI "
            "against the case's segmentation; mean and sample SD over patients")
CSV_NAME, SUMMARY_NAME = "per_patient.csv", "summary.json"
CSV_FIELDS = ("case", "dice", "hd95_mm", "empty", "truth_voxels", "predicted_voxels", "spacing_mm",
              "dice_tumour_slices")
TUMOUR_SLICES_NOTE = ("dice_tumour_slices: Dice on the slices where the truth has the region only (the DSL code's "
                      "protocol), for comparison with the papers; not the reported figure; patients without "
                      "the region have none and are left out of its mean")


@torch.no_grad()
def predict_case(net: torch.nn.Module, case: TestCase, device: torch.device, batch: int = 64) -> np.ndarray:
    """bool [X, Y, Z] on the case's original grid: the region as the net sees it, inside the brain."""
    inputs = case.inputs.to(device, torch.float32)[None]  # [1, C, s, s, Z]
    size = tuple(inputs.shape[2:4])
    inferer = SliceInferer(roi_size=size, sw_batch_size=batch, spatial_dim=2, progress=False)
    logits = inferer(inputs, net)  # [1, 2, s, s, Z]
    prob = torch.softmax(logits, dim=1)[0, 1]  # [s, s, Z]
    x, y, _ = case.seg.shape
    x0, x1, y0, y1 = case.box or (0, x, 0, y)
    prob = prob.permute(2, 0, 1)[:, None]  # [Z, 1, s, s]
    if (x1 - x0, y1 - y0) != size:
        prob = F.interpolate(prob, size=(x1 - x0, y1 - y0), mode="bilinear", align_corners=False)
    pred = np.zeros(case.seg.shape, bool)  # outside the box (outside the brain) nothing is predicted
    pred[x0:x1, y0:y1] = (prob[:, 0] > 0.5).permute(1, 2, 0).cpu().numpy()  # [X, Y, Z]
    return pred & (case.seg > 0)


@dataclass
class EvalResult:
    rows: list[dict]  # one per patient, CSV_FIELDS
    summary: dict


def evaluate_model(model: pathlib.Path | tuple[torch.nn.Module, SegmentationRecipe], test: TestSet,
                   device: str | torch.device = "auto", progress: bool = True) -> EvalResult:
    """Score a model folder (or a loaded (net, recipe)) on test cases prepared with its preprocessing."""
    net, recipe = load_model(model) if isinstance(model, pathlib.Path) else model
    # `missing` only says how incomplete training cases were read; test cases are always complete.
    if test.preprocessing.model_dump(exclude={"missing"}) != recipe.preprocessing.model_dump(exclude={"missing"}):
        raise ConfigError("the test cases were prepared with different preprocessing than the model was trained "
                          f"with ({test.preprocessing.model_dump()} vs {recipe.preprocessing.model_dump()})")
    dev = resolve_device(device) if isinstance(device, str) else device
    net = net.to(dev).eval()
    rows = []
    for case in tqdm(test.cases, desc="evaluating", unit="case", disable=not progress):
        pred = predict_case(net, case, dev)
        truth = region_mask(case.seg, recipe.region)
        score = score_case(pred, truth, case.spacing)
        on_slices = dice_on_tumour_slices(pred, truth)
        rows.append({"case": case.name, "dice": round(score.dice, 6), "hd95_mm": round(score.hd95_mm, 4),
                     "empty": score.empty, "truth_voxels": score.truth_voxels,
                     "predicted_voxels": score.predicted_voxels,
                     "spacing_mm": "x".join(f"{s:g}" for s in case.spacing),
                     "dice_tumour_slices": "" if on_slices is None else round(on_slices, 6)})
        log.debug("%s: Dice %.4f, HD95 %.2f mm (%s)", case.name, score.dice, score.hd95_mm, score.empty)
    empty = {k: sum(r["empty"] == k for r in rows) for k in ("prediction", "truth", "both")}
    summary = {
        "model": str(model) if isinstance(model, pathlib.Path) else None,
        "data": str(test.root),
        "region": recipe.region,
        "region_name": REGION_NAMES[recipe.region],
        "patients": len(rows),
        "dice": summarise([r["dice"] for r in rows]),
        "hd95_mm": summarise([r["hd95_mm"] for r in rows]),
        "empty_cases": empty,
        "dice_tumour_slices": summarise([r["dice_tumour_slices"] for r in rows if r["dice_tumour_slices"] != ""]),
        "dice_tumour_slices_note": TUMOUR_SLICES_NOTE,
        "empty_rule": EMPTY_RULE,
        "protocol": PROTOCOL,
        "recipe": recipe.model_dump(mode="json"),
    }
    return EvalResult(rows, summary)


def write_results(result: EvalResult, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """out/per_patient.csv (one row per patient) and out/summary.json."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(result.rows)
    atomic_write_text(out / CSV_NAME, buf.getvalue())
    atomic_write_text(out / SUMMARY_NAME, json.dumps(result.summary, indent=2) + "\n")
    return out / CSV_NAME, out / SUMMARY_NAME


def evaluate(cfg: EvalRunConfig) -> tuple[EvalResult, pathlib.Path]:
    """Load the model, read the test tree with the model's preprocessing, score, write; (result, out folder)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    net, recipe = load_model(cfg.model)
    dev = resolve_device(cfg.device)
    test = load_test_cases(cfg.data, recipe.preprocessing, progress=cfg.progress, workers=cfg.workers)
    result = evaluate_model((net, recipe), test, dev, progress=cfg.progress)
    result.summary["model"] = str(cfg.model)
    out = cfg.out or cfg.model / f"eval-{cfg.data.resolve().name}"
    write_results(result, out)
    log.info("%s on %s: Dice %.4f +- %.4f, HD95 %.2f +- %.2f mm over %d patients; results in %s",
             REGION_NAMES[recipe.region], cfg.data, result.summary["dice"]["mean"], result.summary["dice"]["sd"],
             result.summary["hd95_mm"]["mean"], result.summary["hd95_mm"]["sd"], len(result.rows), out)
    return result, out
