"""Downstream segmentation: per-patient Dice/HD95 with the empty rule on hand-made volumes, the slice and region
recipe, and a tiny train + eval round through `asyndgan segment` on hand-made BraTS trees (2018 and 2023 names)."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from asyndgan.common.errors import AsynDGANError, ConfigError, DataError
from asyndgan.segmentation import (
    Preprocessing, SegmentationRecipe, diagonal_mm, evaluate_model, load_model, load_test_cases,
    load_training_slices, score_case, summarise, train_model)
from asyndgan.segmentation.data import BRAIN, region_mask, training_slice_indices
from asyndgan.segmentation.metrics import dice_on_tumour_slices
from procs import one_line_error, run_cli

SPACING = (0.8, 1.2, 2.5)  # mm along X, Y, Z: every axis different, so a swapped axis shows


def _cube(shape=(40, 40, 40), lo=(10, 10, 10), side=10) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side] = True
    return m


@pytest.mark.parametrize("axis, shift", [(0, 2), (1, 3), (2, 2)])
def test_offset_cubes_have_the_known_dice_and_hd95_in_mm(axis, shift):
    # A 10-voxel cube moved by `shift` voxels along one axis: overlap (10 - shift) / 10, so Dice = 1 - shift / 10.
    # The moved cube's leading face (a sixth of its surface, > 5 %) lies shift * spacing from the truth's face and
    # no surface point lies farther, so the 95th percentile of the surface distances is exactly shift * spacing.
    truth = _cube()
    lo = [10, 10, 10]
    lo[axis] += shift
    pred = _cube(lo=tuple(lo))
    score = score_case(pred, truth, SPACING)
    assert score.dice == pytest.approx(1 - shift / 10, abs=1e-6)
    assert score.hd95_mm == pytest.approx(shift * SPACING[axis], abs=1e-5)
    assert score.empty == "none" and score.truth_voxels == score.predicted_voxels == 1000


def test_plates_with_a_known_partial_overlap():
    # One-voxel plates are all surface: the prediction holds the truth's plate (distance 0) and a second plate
    # 4 voxels away along X (0.8 mm each); half the predicted surface is at 3.2 mm, so HD95 = 3.2 mm, Dice = 2/3.
    truth = np.zeros((30, 30, 30), bool)
    truth[10, 5:15, 5:15] = True
    pred = truth.copy()
    pred[14, 5:15, 5:15] = True
    score = score_case(pred, truth, SPACING)
    assert score.dice == pytest.approx(2 / 3, abs=1e-6)
    assert score.hd95_mm == pytest.approx(3.2, abs=1e-5)
    # Symmetric: swapping prediction and truth gives the same numbers.
    swapped = score_case(truth, pred, SPACING)
    assert (swapped.dice, swapped.hd95_mm) == pytest.approx((score.dice, score.hd95_mm))


def test_empty_masks_follow_the_documented_rule():
    truth, nothing = _cube(), np.zeros((40, 40, 40), bool)
    diag = math.sqrt((40 * 0.8) ** 2 + (40 * 1.2) ** 2 + (40 * 2.5) ** 2)
    missed = score_case(nothing, truth, SPACING)  # MONAI alone would give nan here
    assert (missed.dice, missed.hd95_mm, missed.empty) == (0.0, pytest.approx(diag), "prediction")
    invented = score_case(truth, nothing, SPACING)
    assert (invented.dice, invented.hd95_mm, invented.empty) == (0.0, pytest.approx(diag), "truth")
    both = score_case(nothing, nothing, SPACING)
    assert (both.dice, both.hd95_mm, both.empty) == (1.0, 0.0, "both")
    assert diagonal_mm((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.01)  # BraTS' value
    with pytest.raises(ValueError, match="shape"):
        score_case(truth[:-1], truth, SPACING)


def test_tumour_slice_dice_ignores_false_positives_on_other_slices():
    truth = _cube()  # slices 10..19 along the last axis
    pred = truth.copy()
    pred[10:20, 10:20, 30] = True  # a false positive on a slice without tumour
    assert score_case(pred, truth, SPACING).dice == pytest.approx(2000 / 2100, abs=1e-6)  # whole volume
    assert dice_on_tumour_slices(pred, truth) == pytest.approx(1.0)
    assert dice_on_tumour_slices(pred, np.zeros_like(truth)) is None


def test_summary_is_mean_and_sample_sd_over_every_patient():
    s = summarise([0.9, 0.7, 0.0])  # the 0.0 (an empty prediction) counts, it is not dropped
    assert s["mean"] == pytest.approx(0.5333333) and s["sd"] == pytest.approx(0.4725816, abs=1e-6)
    assert s["n"] == 3
    assert summarise([0.8]) == {"mean": 0.8, "sd": 0.0, "n": 1}


def test_regions_follow_the_brats_definitions():
    seg = np.array([0, BRAIN, 2, 3, 4], np.uint8)  # outside, brain, necrotic core, edema, enhancing
    assert region_mask(seg, "whole").tolist() == [False, False, True, True, True]
    assert region_mask(seg, "core").tolist() == [False, False, True, False, True]
    assert region_mask(seg, "enhancing").tolist() == [False, False, False, False, True]


def test_training_slices_are_every_tumour_slice_plus_some_healthy_ones():
    seg = np.zeros((8, 8, 40), np.uint8)
    seg[2:6, 2:6, 5:35] = BRAIN  # brain on slices 5..34
    seg[3:5, 3:5, 10:14] = 3  # tumour on slices 10..13
    idx, n_tumour = training_slice_indices(seg, healthy_ratio=1.5, name="case_a")
    assert n_tumour == 4 and len(idx) == 4 + 6
    assert set(range(10, 14)) <= set(idx.tolist()) and all(5 <= i < 35 for i in idx)
    again, _ = training_slice_indices(seg, 1.5, "case_a")
    other, _ = training_slice_indices(seg, 1.5, "case_b")
    assert again.tolist() == idx.tolist() and other.tolist() != idx.tolist()
    assert len(training_slice_indices(seg, 100.0, "case_a")[0]) == 30  # capped at the brain's slices


# --- hand-made BraTS trees --------------------------------------------------------------------------------------

SHAPE = (36, 28, 12)  # not square and not cubic: a transposed axis anywhere breaks the round trip
TREE_SPACING = (1.5, 1.25, 3.0)
SCHEMES = {  # modality suffixes and the file labels for necrotic, edema, enhancing
    "2018": ("_", ("t1", "t1ce", "t2", "flair"), (1, 2, 4)),
    "2023": ("-", ("t1n", "t1c", "t2w", "t2f"), (1, 2, 3)),
}


def _write_case(root: pathlib.Path, name: str, scheme: str, rng: np.random.Generator, tumour: bool = True):
    """A brain ellipsoid of signal ~100 and, if `tumour`, a box of edema around a necrotic core and an enhancing
    part, brighter in every modality (so a tiny net learns it in a few dozen steps)."""
    sep, suffixes, (nec, ede, enh) = SCHEMES[scheme]
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    brain = x**2 + y**2 + z**2 < 0.9
    seg = np.zeros(SHAPE, np.uint8)
    if tumour:
        cx, cy, cz = rng.integers(9, 20), rng.integers(8, 14), rng.integers(1, 3)  # off-centre along Z too
        seg[cx:cx + 10, cy:cy + 7, cz:cz + 6] = ede
        seg[cx + 2:cx + 8, cy + 2:cy + 5, cz + 1:cz + 5] = enh
        seg[cx + 3:cx + 6, cy + 3:cy + 4, cz + 2:cz + 4] = nec
        seg[~brain] = 0
    affine = np.diag([*TREE_SPACING, 1.0])
    folder = root / name
    folder.mkdir(parents=True)
    for k, suffix in enumerate(suffixes):
        img = (100 + 5 * rng.standard_normal(SHAPE) + 80 * (seg > 0) + 10 * k) * brain
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), folder / f"{name}{sep}{suffix}.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), folder / f"{name}{sep}seg.nii.gz")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    rng = np.random.default_rng(0)
    for i in range(4):
        _write_case(root / "train2018", f"Brats18_A_{i}", "2018", rng)
        _write_case(root / "train2023", f"BraTS-GLI-{i:05d}-000", "2023", rng)
    for i in range(3):
        _write_case(root / "test", f"Brats18_T_{i}", "2018", rng)
    _write_case(root / "test", "Brats18_T_healthy", "2018", rng, tumour=False)
    return root


TINY = ["--size", "16", "--steps", "120", "--batch-size", "8", "--threads", "1", "--no-progress",
        "--set", "recipe.network.channels=[8,16,32]", "--set", "recipe.network.num_res_units=1",
        "--set", "recipe.training.lr=0.01", "--set", "recipe.training.healthy_ratio=1.0"]


def test_training_masks_follow_the_region(trees):
    whole = load_training_slices([trees / "train2023"], SegmentationRecipe(region="whole"), progress=False)
    core = load_training_slices([trees / "train2023"], SegmentationRecipe(region="core"), progress=False)
    enhancing = load_training_slices([trees / "train2023"], SegmentationRecipe(region="enhancing"), progress=False)
    assert len(whole) == len(core) == len(enhancing) and torch.equal(whole.images, core.images)
    w, c, e = (s.masks.sum().item() for s in (whole, core, enhancing))
    assert w > c > e > 0  # 2023 labels: enhancing is 3, read as the site reads it
    assert bool(((core.masks == 1) <= (whole.masks == 1)).all() and ((enhancing.masks == 1) <= (core.masks == 1)).all())
    assert whole.images.shape[1:] == (4, 64, 64) and whole.images.dtype == torch.float16


@pytest.fixture(scope="module")
def trained(trees, tmp_path_factory):
    model = tmp_path_factory.mktemp("seg") / "model"
    r = run_cli(["asyndgan.cli.main", "segment", "train", "--data", str(trees / "train2018"),
                 str(trees / "train2023"), "--out", str(model), *TINY], timeout=120)
    assert r.returncode == 0, r.stderr
    return model, r


@pytest.fixture(scope="module")
def evaluated(trees, trained):
    """The trained model scored on the test tree through the CLI: (results folder, the command's result)."""
    model, _ = trained
    out = model.parent / "results"
    r = run_cli(["asyndgan.cli.main", "segment", "eval", "--model", str(model), "--data",
                 str(trees / "test"), "--out", str(out), "--threads", "1", "--no-progress"], timeout=120)
    assert r.returncode == 0, r.stderr
    return out, r


def test_train_then_eval_through_the_cli(trees, trained, evaluated):
    model, r = trained
    assert "trained 120 steps" in r.stdout and "from 8 cases" in r.stdout  # both naming schemes pooled
    assert {"model.pt", "recipe.json", "training.json", "train.log"} <= {p.name for p in model.iterdir()}
    assert list((model / "tensorboard").glob("events.out.tfevents.*"))
    training = json.loads((model / "training.json").read_text())
    assert training["slices"]["healthy"] > 0 and training["slices"]["tumour"] > 0  # healthy anatomy seen too
    assert math.isfinite(training["final_loss"])

    out, r = evaluated
    assert "whole tumour, 4 patients: Dice" in r.stdout
    with open(out / "per_patient.csv") as f:
        rows = {row["case"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["Brats18_T_0", "Brats18_T_1", "Brats18_T_2", "Brats18_T_healthy"]  # one per patient
    assert all(row["spacing_mm"] == "1.5x1.25x3" for row in rows.values())  # the NIfTI spacing, not 1 mm
    healthy = rows["Brats18_T_healthy"]
    assert healthy["truth_voxels"] == "0" and healthy["empty"] in ("truth", "both")
    assert healthy["dice_tumour_slices"] == ""  # no tumour slice: left out of that secondary figure
    if healthy["empty"] == "both":
        assert (float(healthy["dice"]), float(healthy["hd95_mm"])) == (1.0, 0.0)
    else:
        assert float(healthy["dice"]) == 0.0
        assert float(healthy["hd95_mm"]) == pytest.approx(diagonal_mm(SHAPE, TREE_SPACING), abs=1e-3)
    # A tumour this bright is learnt even by this tiny run; a slice put back transposed or out of order would
    # land on the wrong voxels and score near 0.
    tumour_dice = [float(rows[f"Brats18_T_{i}"]["dice"]) for i in range(3)]
    assert min(tumour_dice) > 0.6, tumour_dice

    summary = json.loads((out / "summary.json").read_text())
    dice = [float(row["dice"]) for row in rows.values()]
    hd = [float(row["hd95_mm"]) for row in rows.values()]
    assert summary["patients"] == 4 and summary["region"] == "whole"
    assert summary["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert summary["dice"]["sd"] == pytest.approx(np.std(dice, ddof=1), abs=1e-6)
    assert summary["hd95_mm"]["mean"] == pytest.approx(np.mean(hd), abs=1e-4)
    assert summary["hd95_mm"]["sd"] == pytest.approx(np.std(hd, ddof=1), abs=1e-4)
    assert "every axial slice" in summary["protocol"] and "Dice 1, HD95 0 mm" in summary["empty_rule"]
    assert summary["dice_tumour_slices"]["n"] == 3


def test_library_evaluation_matches_the_recipe_and_refuses_other_preprocessing(trees, trained, evaluated):
    model, _ = trained
    net, recipe = load_model(model)
    assert recipe.preprocessing.image_size == 16 and recipe.network.channels == [8, 16, 32]
    test = load_test_cases(trees / "test", recipe.preprocessing, progress=False)
    assert [tuple(c.inputs.shape) for c in test.cases] == [(4, 16, 16, SHAPE[2])] * 4
    in_two = load_test_cases(trees / "test", recipe.preprocessing, progress=False, workers=2)  # worker processes
    assert [c.name for c in in_two.cases] == [c.name for c in test.cases]
    assert all(torch.equal(a.inputs, b.inputs) and (a.seg == b.seg).all() for a, b in zip(test.cases, in_two.cases))
    result = evaluate_model(model, test, "cpu", progress=False)
    with open(evaluated[0] / "per_patient.csv") as f:  # what the CLI wrote
        assert [row["dice"] for row in csv.DictReader(f)] == [str(r["dice"]) for r in result.rows]  # deterministic
    other = load_test_cases(trees / "test", Preprocessing(image_size=32), progress=False)
    with pytest.raises(ConfigError, match="different preprocessing"):
        evaluate_model(model, other, "cpu", progress=False)


def test_bad_paths_give_one_line_and_exit_2(trees, trained, tmp_path):
    model, _ = trained
    r = run_cli(["asyndgan.cli.main", "segment", "train", "--data", str(trees / "train2018"),
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    one_line_error(r, "nowhere", "does not exist")
    assert not (tmp_path / "m").exists()  # nothing written for a run that never started
    r = run_cli(["asyndgan.cli.main", "segment", "train", "--data", str(tmp_path), "--out",
                 str(tmp_path / "m")])
    one_line_error(r, "holds no BraTS case")
    if not torch.cuda.is_available():
        r = run_cli(["asyndgan.cli.main", "segment", "train", "--data", str(trees / "train2018"), "--out",
                     str(tmp_path / "m"), "--device", "cuda"])
        one_line_error(r, "no CUDA GPU")
        assert not (tmp_path / "m").exists()
    r = run_cli(["asyndgan.cli.main", "segment", "eval", "--model", str(trees / "test"), "--data",
                 str(trees / "test")])
    one_line_error(r, "is not a segmentation model")
    r = run_cli(["asyndgan.cli.main", "segment", "eval", "--model", str(model), "--data",
                 str(tmp_path / "nowhere")])
    one_line_error(r, "nowhere", "does not exist")


def test_weights_that_do_not_fit_the_recipe_are_refused(trained, tmp_path):
    model, _ = trained
    (tmp_path / "recipe.json").write_text((model / "recipe.json").read_text())
    torch.save({"not": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(AsynDGANError, match="does not match the network"):
        load_model(tmp_path)
    with pytest.raises(ValidationError, match="multiple of 4"):
        SegmentationRecipe.model_validate({"preprocessing": {"image_size": 18},
                                           "network": {"channels": [8, 16, 32]}})


def test_an_incomplete_case_is_skipped_for_training_but_stops_evaluation(trees, tmp_path):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(trees / "test", tree)
    (tree / "Brats18_T_1" / "Brats18_T_1_flair.nii.gz").unlink()
    slices = load_training_slices([tree], SegmentationRecipe(), progress=False)
    assert sorted(slices.cases) == ["tree/Brats18_T_0", "tree/Brats18_T_2"]  # the healthy case has no tumour slice
    with pytest.raises(DataError, match="Brats18_T_1_flair"):
        load_test_cases(tree, Preprocessing(), progress=False)


def test_same_recipe_data_and_seed_give_the_same_model(trees, tmp_path):
    recipe = SegmentationRecipe.model_validate({
        "preprocessing": {"image_size": 16}, "network": {"channels": [4, 8], "num_res_units": 0},
        "training": {"steps": 5, "batch_size": 4}})
    slices = load_training_slices([trees / "train2018"], recipe, progress=False)
    states = []
    for name in ("a", "b"):
        train_model(slices, recipe, tmp_path / name, "cpu", progress=False)
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    seeded = recipe.model_copy(update={"training": recipe.training.model_copy(update={"seed": 1})})
    train_model(slices, seeded, tmp_path / "c", "cpu", progress=False)
    other = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert not all(torch.equal(states[0][k], other[k]) for k in other)
    enhancing = recipe.model_copy(update={"region": "enhancing"})
    with pytest.raises(ConfigError, match="region: 'whole' vs 'enhancing'"):  # masks made for another region
        train_model(slices, enhancing, tmp_path / "d", "cpu", progress=False)
