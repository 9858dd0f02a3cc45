"""The segmentation recipe on small lesions: the earlier recipe's collapse (a model that predicts nothing) is caught
and warned about, the current recipe learns what the earlier one could not, the brain crop cuts training and
evaluation alike, and model folders trained before these choices existed are read back as they were trained."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest
import torch

from asyndgan.segmentation import NetworkConfig, Preprocessing, SegmentationRecipe, SliceSet, TrainingConfig
from asyndgan.segmentation.config import earlier_recipe
from asyndgan.segmentation.data import in_plane_box
from asyndgan.segmentation.model import load_model, save_model, build_network
from asyndgan.segmentation.train import COLLAPSE_DICE, train_model

SIDE = 32


def _small_lesions(contrast: float, n: int = 96) -> torch.Tensor:
    """Noise slices with a 2x2-pixel lesion in two of every three (0.26% of the pixels are lesion, as small
    metastases or low-grade tumours at 64 px): (images float16 [n, 4, s, s], masks uint8 [n, s, s])."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, SIDE, SIDE, generator=g) * 0.3
    m = torch.zeros(n, SIDE, SIDE, dtype=torch.uint8)
    for i in range(n):
        if i % 3:
            cx, cy = torch.randint(4, SIDE - 6, (2,), generator=g).tolist()
            m[i, cx:cx + 2, cy:cy + 2] = 1
            x[i, :, cx:cx + 2, cy:cy + 2] += contrast
    return x.half(), m


def _recipe(steps: int) -> SegmentationRecipe:
    return SegmentationRecipe(preprocessing=Preprocessing(image_size=SIDE),
                              network=NetworkConfig(channels=[8, 16, 32], num_res_units=1),
                              training=TrainingConfig(steps=steps, batch_size=16))


def _train(recipe: SegmentationRecipe, contrast: float, out: pathlib.Path):
    torch.set_num_threads(1)  # the same arithmetic on every machine
    x, m = _small_lesions(contrast)
    slices = SliceSet(x, m, recipe.preprocessing, recipe.region, recipe.training.healthy_ratio, ["synthetic"])
    return train_model(slices, recipe, out, "cpu", progress=False)


def test_the_current_recipe_learns_small_lesions_the_earlier_one_does_not(tmp_path):
    recipe = _recipe(300)
    now = _train(recipe, 0.8, tmp_path / "now")
    before = _train(earlier_recipe(recipe), 0.8, tmp_path / "before")
    assert not now.collapsed and now.training_dice > 0.2
    assert before.training_dice < now.training_dice / 2
    saved = json.loads((tmp_path / "now" / "training.json").read_text())
    assert saved["collapsed"] is False and saved["training_dice"] == pytest.approx(now.training_dice)


def test_a_collapsed_model_is_flagged_and_warned_about(tmp_path, caplog):
    recipe = earlier_recipe(_recipe(300))
    with caplog.at_level(logging.WARNING, logger="asyndgan.segmentation.train"):
        result = _train(recipe, 0.6, tmp_path / "m")
    assert result.collapsed and result.training_dice < COLLAPSE_DICE
    assert json.loads((tmp_path / "m" / "training.json").read_text())["collapsed"] is True
    assert any("collapsed" in r.getMessage() and "whole tumour" in r.getMessage() for r in caplog.records)


def test_brain_crop_is_a_square_around_the_brain_and_none_is_the_whole_slice():
    seg = np.zeros((240, 240, 20), np.uint8)
    seg[60:181, 40:211, 5:15] = 1  # a 121 x 171 voxel brain
    prep = Preprocessing()
    assert prep.crop == "brain"
    x0, x1, y0, y1 = in_plane_box(seg, prep)
    assert x1 - x0 == y1 - y0 == 171 + 8  # the longer side plus 4 mm each way
    assert x0 <= 60 and x1 >= 181 and y0 <= 40 and y1 >= 211
    assert in_plane_box(seg, Preprocessing(crop="none")) == (0, 240, 0, 240)
    # Near the edge the square slides inside the slice rather than leaving it.
    seg2 = np.zeros((100, 100, 4), np.uint8)
    seg2[0:90, 40:50, 1] = 1
    x0, x1, y0, y1 = in_plane_box(seg2, prep)
    assert (x0, x1) == (0, 98) and y1 - y0 == 98 and 0 <= y0 <= 40 and 50 <= y1 <= 100  # 90 + 2 x 4 margin


def test_a_model_folder_from_before_the_fix_reads_back_with_the_earlier_choices(tmp_path):
    recipe = _recipe(1)
    save_model(tmp_path, build_network(recipe), recipe)
    data = json.loads((tmp_path / "recipe.json").read_text())
    del data["preprocessing"]["crop"], data["training"]["loss"]  # as written before these fields existed
    (tmp_path / "recipe.json").write_text(json.dumps(data))
    _, loaded = load_model(tmp_path)
    assert loaded.preprocessing.crop == "none" and loaded.training.loss == "dice_ce"
    assert loaded == earlier_recipe(recipe)


def test_appearance_augmentation_changes_the_brain_only_and_follows_its_seed(tmp_path):
    """recipe.training.appearance: bias field, gamma, noise, blur per slice inside the brain; the background stays
    -1; the same seed gives the same changes; a model trains with it."""
    from asyndgan.segmentation.train import AppearanceAugmentation

    x = torch.full((16, 4, SIDE, SIDE), -1.0)
    x[:, :, 8:24, 8:24] = torch.rand(16, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.5 - 0.8
    y = AppearanceAugmentation(3)(x)
    assert torch.equal(y[x == -1], x[x == -1]) and float(y.min()) >= -1 and float(y.max()) <= 1
    changed = (y != x).flatten(1).any(1)
    assert 0 < int(changed.sum()) <= 16  # each change is drawn with probability 0.3: most slices get one
    assert torch.equal(AppearanceAugmentation(3)(x), y) and not torch.equal(AppearanceAugmentation(4)(x), y)
    recipe = _recipe(6)
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"appearance": True})})
    result = _train(recipe, 3.0, tmp_path / "model")
    assert result.steps == 6 and np.isfinite(result.final_loss)
