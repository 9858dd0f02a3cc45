"""The segmentation recipe (what every row of a comparison shares) and the settings of one train or eval run.

`SegmentationRecipe` is everything that decides a trained model: the tumour region, how volumes become network
inputs, the network and the training schedule. It is saved beside the weights (recipe.json), so that evaluation
prepares test volumes exactly as training did. `TrainRunConfig` / `EvalRunConfig` add where the data is, where
results go and which device computes; they do not change what is learnt.
"""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from asyndgan.common.config import BRATS_MODALITIES

Region = Literal["whole", "core", "enhancing"]
# Our label values (formats/brats.py: 2 necrotic/non-enhancing core, 3 edema, 4 enhancing) per region, in the
# BraTS definitions: whole tumour = every tumour label, tumour core = necrotic + enhancing, enhancing = enhancing.
REGION_LABELS: dict[str, tuple[int, ...]] = {"whole": (2, 3, 4), "core": (2, 4), "enhancing": (4,)}
REGION_NAMES = {"whole": "whole tumour", "core": "tumour core", "enhancing": "enhancing tumour"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preprocessing(_Section):
    """How a BraTS volume becomes 2-D network inputs; shared by training and evaluation."""

    modalities: list[str] = Field(default_factory=lambda: list(BRATS_MODALITIES), min_length=1)
    image_size: int = Field(64, ge=16, le=1024, description="in-plane side the slices are resized to (predictions "
                            "are resized back to the volume's grid before scoring)")
    clip_percentiles: tuple[float, float] = Field((0.5, 99.5), description="per volume and modality, in the brain "
                                                  "(the site's recipe)")
    missing: Literal["skip", "zero"] = Field("skip", description="a case without one of `modalities`: skip it, or "
                                             "zero-fill that modality (a blank image; what naive pooling of sites "
                                             "with different scanners' sequences gives)")
    crop: Literal["none", "brain"] = Field("brain", description="in-plane part of each slice the network sees: "
                                           "the square around the case's brain (finer pixels for small lesions) "
                                           "or the whole field of view (the recipe before small lesions were "
                                           "handled)")

    @model_validator(mode="after")
    def _check(self) -> "Preprocessing":
        unknown = [m for m in self.modalities if m not in BRATS_MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; BraTS trees hold {list(BRATS_MODALITIES)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities repeat: {self.modalities}")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"clip_percentiles {self.clip_percentiles} must satisfy 0 <= low < high <= 100")
        return self


class NetworkConfig(_Section):
    """MONAI's 2-D residual U-Net (monai.networks.nets.UNet), 2 output classes (background, region)."""

    # 1.6 M parameters. On the 18-case phantom pool the 4-level [16..128] net (0.4 M) plateaued at a training loss
    # of 0.20 (training-case Dice 0.81); this one reached 0.07 in 13 % more time (178 s for 2000 steps, 1 thread).
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256], min_length=2, max_length=8,
                                description="features per level; each level after the first halves the side")
    num_res_units: int = Field(2, ge=0, le=4)
    dropout: float = Field(0.0, ge=0, lt=1)


class TrainingConfig(_Section):
    """Dice + cross-entropy (MONAI DiceCELoss), Adam with cosine decay, a fixed number of steps (no early stopping:
    there is no validation split to stop on, and the test cases are never used for tuning)."""

    steps: int = Field(2000, ge=1, description="optimiser steps (batches), whatever the data set's size")
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(1e-5, ge=0, le=1)
    healthy_ratio: float = Field(0.5, ge=0, le=100, description="brain slices without tumour kept per tumour "
                                 "slice of a case (drawn once, seeded), so the net also sees healthy anatomy")
    flip: bool = Field(True, description="random left-right flips")
    appearance: bool = Field(False, description="random appearance changes per training slice, each with "
                             "probability 0.3 (MONAI): a smooth bias field, a gamma change, Gaussian noise, a "
                             "Gaussian blur, inside the brain only; so that a model trained on one scanner's or one "
                             "generator's look holds on another's. Off (default) until measured")
    loss: Literal["foreground_dice_ce", "dice_ce"] = Field(
        "foreground_dice_ce", description="Dice of the region + cross-entropy, or (the earlier recipe, which "
        "collapses on small lesions) Dice averaged with the background's + cross-entropy")
    seed: int = Field(0, ge=0)


class SegmentationRecipe(_Section):
    region: Region = "whole"
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="after")
    def _check(self) -> "SegmentationRecipe":
        factor = 2 ** (len(self.network.channels) - 1)
        if self.preprocessing.image_size % factor:
            raise ValueError(f"preprocessing.image_size {self.preprocessing.image_size} must be a multiple of "
                             f"{factor} (network.channels has {len(self.network.channels)} levels)")
        return self


# The recipe's choices before small and low-grade lesions were handled (whole field of view, Dice averaged with the
# background's): for comparisons with reports made then; a model folder trained then (its recipe.json lacks these
# fields) is read back with them.
EARLIER_CHOICES = {("preprocessing", "crop"): "none", ("training", "loss"): "dice_ce"}


def earlier_recipe(recipe: SegmentationRecipe) -> SegmentationRecipe:
    """`recipe` with EARLIER_CHOICES in place of its own."""
    sections = {}
    for (section, key), value in EARLIER_CHOICES.items():
        part = sections.get(section) or getattr(recipe, section)
        sections[section] = part.model_copy(update={key: value})
    return recipe.model_copy(update=sections)

Device = str  # "auto" (cuda when torch sees a GPU), "cpu", "cuda", "cuda:1"


class TrainRunConfig(_Section):
    data: list[pathlib.Path] = Field(min_length=1, description="BraTS trees (real or synthetic), pooled")
    out: pathlib.Path = Field(description="model folder: model.pt, recipe.json, training.json, tensorboard/")
    recipe: SegmentationRecipe = Field(default_factory=SegmentationRecipe)
    device: Device = "auto"
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: torch's choice)")
    workers: int = Field(1, ge=1, le=64, description="processes reading and preparing cases in parallel")
    progress: bool = True


class EvalRunConfig(_Section):
    model: pathlib.Path = Field(description="a model folder written by training")
    data: pathlib.Path = Field(description="a BraTS tree of test cases (real or synthetic)")
    out: pathlib.Path | None = Field(None, description="results folder (default: MODEL/eval-<data folder name>)")
    device: Device = "auto"
    threads: int | None = Field(None, ge=1, le=256)
    workers: int = Field(1, ge=1, le=64, description="processes reading and preparing cases in parallel")
    progress: bool = True
