"""Calibrating the heterogeneous phantom: do its sites really see different parts of the distribution, and does the
segmentation recipe learn every lesion type?

Every row trains the same segmentation recipe on one set of real training cases and is scored on the same pooled
test patients (the heterogeneous preset's test split, drawn from every site's scanner and population in turn):
    real_all        the four sites pooled (the upper bound a consortium would want to reach)
    real_site<k>    one site alone (sites are of similar size, so a gap is not just case count)
    public          the public cohort (large high-grade gliomas, one scanner family; its own random streams)
    small_lesions, low_grade   the two training cohorts on which the earlier recipe collapsed (20 cases with
                    4-10 mm tumours, 20 low-grade 7-12 mm; the original phantom's scanner), kept as a regression
Each row runs with the current recipe over `seeds` segmentation seeds; the earlier recipe (`before`, on
`before_rows`) and the fix's loss alone on the whole field of view (`loss_only`, on `loss_only_rows`) run over
`before_seeds`, so the tables show Dice per lesion type before and after the recipe's fix and what each of its two
changes does. Results are typed records (`RowResult`), which results.json, report.md and the figures all read.

Pieces (phantoms, each model and its evaluation) are kept in OUT and skipped on a re-run; other settings in the
same OUT are refused.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from asyndgan.demo_data.phantom import PhantomConfig, SiteProfile, write_phantom
from asyndgan.demo_data.phantom.config import LESION_TYPES
from asyndgan.demo_data.phantom.presets import phantom_config
from asyndgan.demo_data.phantom.writer import read_partition
from asyndgan.experiments import phantom_calibration_report as report
from asyndgan.experiments.phantom_calibration_report import RowResult


from asyndgan.segmentation import (
    NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig,
)
from asyndgan.segmentation.config import earlier_recipe
from asyndgan.experiments.pieces import ExperimentConfig, check_settings, piece_timer, written_once
from asyndgan.experiments.scoring import RowScore, SeedScore, score_rows

log = logging.getLogger(__name__)
Preset = Literal["smoke", "cpu"]


class CalibrationConfig(ExperimentConfig):
    shape: tuple[int, int, int] = (160, 160, 100)
    cases_per_site: list[int] = Field(default_factory=lambda: [10, 10, 10, 10])
    test_cases: int = Field(40, ge=4)
    public_cases: int = Field(30, ge=1)
    regression_cases: int = Field(20, ge=1, description="cases in each of the small-lesion and low-grade cohorts")
    recipe: SegmentationRecipe = Field(description="the current recipe (after the fix)")
    before: SegmentationRecipe = Field(description="the recipe before the fix, for the before/after table")
    loss_only: SegmentationRecipe = Field(description="the fix's loss on the whole field of view (no brain crop)")
    seeds: int = Field(3, ge=1)
    before_seeds: int = Field(1, ge=0, description="seeds per row for the earlier recipe and for loss_only")
    before_rows: list[str] = Field(
        default_factory=lambda: ["real_all", "real_site1", "real_site2", "real_site3", "real_site4", "public",
                                 "small_lesions", "low_grade"], description="rows trained with the earlier recipe")
    loss_only_rows: list[str] = Field(default_factory=lambda: ["real_all", "small_lesions", "low_grade"],
                                      description="rows trained with the fix's loss alone")
    device: str = "cpu"
    threads: int = Field(2, ge=1)


def preset_config(preset: Preset, out: pathlib.Path, seed: int = 0) -> CalibrationConfig:
    """smoke: the plumbing in about a minute; cpu: the calibration on 2 cores (about an hour)."""
    if preset == "smoke":
        recipe = SegmentationRecipe(preprocessing=Preprocessing(image_size=32),
                                    network=NetworkConfig(channels=[8, 16, 32], num_res_units=1),
                                    training=TrainingConfig(steps=6, batch_size=8))
        return CalibrationConfig(
            preset=preset, out=out, seed=seed, shape=(64, 64, 40), cases_per_site=[2, 2, 2, 2], test_cases=4,
            public_cases=2, regression_cases=2, recipe=recipe, before=earlier_recipe(recipe),
            loss_only=_loss_only(recipe), seeds=2, before_seeds=1)
    # The experiments' cpu segmentation budget: 64 px, 1000 steps (~1.5 min a model on this machine).
    recipe = SegmentationRecipe(preprocessing=Preprocessing(image_size=64), training=TrainingConfig(steps=1000))
    return CalibrationConfig(preset=preset, out=out, seed=seed, recipe=recipe, before=earlier_recipe(recipe),
                             loss_only=_loss_only(recipe))


def _loss_only(recipe: SegmentationRecipe) -> SegmentationRecipe:
    return recipe.model_copy(update={"preprocessing": recipe.preprocessing.model_copy(update={"crop": "none"})})


# ---- pieces ---------------------------------------------------------------------------------------------------
def phantom_layouts(cfg: CalibrationConfig) -> dict[str, PhantomConfig]:
    """The four phantoms: the heterogeneous consortium (with the test split), the public cohort, and the two
    regression cohorts (the original phantom's default scanner, tumours as the collapse was reported on)."""
    het = phantom_config("heterogeneous", seed=cfg.seed, shape=cfg.shape, cases_per_site=cfg.cases_per_site,
                         test_cases=cfg.test_cases)
    public = phantom_config("public", seed=cfg.seed, shape=cfg.shape, cases_per_site=[cfg.public_cases])
    regression = {
        "small_lesions": SiteProfile(tumour_radius_mm=(4.0, 10.0)),
        "low_grade": SiteProfile(tumour_radius_mm=(7.0, 12.0), high_grade_fraction=0.0),
    }
    out = {"heterogeneous": het, "public": public}
    for name, profile in regression.items():
        out[name] = PhantomConfig(sites=1, cases_per_site=[cfg.regression_cases], test_cases=0, seed=cfg.seed,
                                  shape=cfg.shape, profiles=[profile], cohort=name, site_names=[name])
    return out


def make_phantoms(cfg: CalibrationConfig) -> dict[str, pathlib.Path]:
    """Layout name -> its folder under OUT/phantom (each written once; a marker says it is complete). A second
    process of this command waits on the lock while the first writes them."""
    folders = {}
    for name, layout in phantom_layouts(cfg).items():
        folders[name] = written_once(cfg.out / "phantom" / name,
                                     lambda folder, layout=layout: write_phantom(folder, layout))
    return folders


def training_rows(cfg: CalibrationConfig, phantoms: dict[str, pathlib.Path]) -> dict[str, tuple[list, str]]:
    """Row -> (training trees, description)."""
    het = phantoms["heterogeneous"]
    layout = phantom_layouts(cfg)["heterogeneous"]
    rows = {"real_all": ([het / n for n in layout.site_names], "all four sites pooled")}
    for name, profile in zip(layout.site_names, layout.profiles):
        rows[f"real_{name}"] = ([het / name], profile.name)
    rows["public"] = ([phantoms["public"] / "public"], "public cohort: large high-grade gliomas, one 3 T scanner family")
    rows["small_lesions"] = ([phantoms["small_lesions"] / "small_lesions"], "regression: 4-10 mm tumours")
    rows["low_grade"] = ([phantoms["low_grade"] / "low_grade"], "regression: low grade, 7-12 mm")
    return rows


def train_and_score(cfg: CalibrationConfig, rows: dict[str, tuple[list, str]], test_dir: pathlib.Path,
                    recipe_name: str) -> dict[str, list[SeedScore]]:
    """Row -> one score per segmentation seed; models and evaluations kept in
    OUT/segmentation/<recipe>/<row>/seed<s>/."""
    recipe = {"after": cfg.recipe, "before": cfg.before, "loss_only": cfg.loss_only}[recipe_name]
    n_seeds = cfg.seeds if recipe_name == "after" else cfg.before_seeds
    wanted = {"after": list(rows), "before": cfg.before_rows, "loss_only": cfg.loss_only_rows}[recipe_name]
    return score_rows(cfg.out / "segmentation" / recipe_name, {row: rows[row][0] for row in rows if row in wanted},
                      recipe, [cfg.seed + k for k in range(n_seeds)], test_dir, cfg.device,
                      label=f"segmentation ({recipe_name} recipe)")


# Two processes running the same command on the same OUT share the work (two single-threaded trainings use 2 cores
# better than one with two threads): each piece is claimed by a file holding the claimant's PID; a claim whose
# process is gone is taken over.
# ---- summaries ------------------------------------------------------------------------------------------------
def summarise(cfg: CalibrationConfig, rows: dict[str, tuple[list, str]], evals: dict[str, dict[str, list[SeedScore]]],
              partition: dict[str, dict[str, str]], profile_names: dict[str, str]) -> list[RowResult]:
    results = []
    for recipe_name, by_row in evals.items():
        for row, runs in by_row.items():
            if not runs:
                continue
            patient = RowScore.of(runs).patients
            cases = sorted(patient)
            lesion = {lt: _mean([patient[c] for c in cases if partition[c]["lesion"] == lt]) for lt in LESION_TYPES}
            profile = {site: _mean([patient[c] for c in cases if partition[c]["site"] == site])
                       for site in profile_names}
            results.append(RowResult(
                row=row, recipe=recipe_name, description=rows[row][1],
                training_cases=_count_cases(rows[row][0]), seeds=[r.seed for r in runs],
                dice_per_seed=[r.dice for r in runs], patient_dice=patient,
                collapsed_seeds=sum(r.collapsed for r in runs),
                by_lesion={k: v for k, v in lesion.items() if v is not None},
                by_profile={k: v for k, v in profile.items() if v is not None}))
    return results


def _count_cases(trees: list[pathlib.Path]) -> int:
    return sum(1 for t in trees for p in t.iterdir() if p.is_dir())


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def run(cfg: CalibrationConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    check_settings(cfg)
    timings, timed = piece_timer(cfg.out / "timings.json")
    log.info("[1/3] phantoms: heterogeneous consortium, public cohort, regression cohorts")
    phantoms = timed("phantoms", make_phantoms, cfg)
    test_dir = phantoms["heterogeneous"] / "test"
    rows = training_rows(cfg, phantoms)
    log.info("[2/3] segmentation, current recipe: %d rows x %d seeds", len(rows), cfg.seeds)
    evals = {"after": timed("segmentation_after", train_and_score, cfg, rows, test_dir, "after")}
    log.info("[3/3] segmentation, earlier recipe and the fix's loss alone: %d rows x %d seeds each", len(rows),
             cfg.before_seeds)
    evals["before"] = timed("segmentation_before", train_and_score, cfg, rows, test_dir, "before")
    evals["loss_only"] = timed("segmentation_loss_only", train_and_score, cfg, rows, test_dir, "loss_only")
    partition = read_partition(phantoms["heterogeneous"])
    layout = phantom_layouts(cfg)["heterogeneous"]
    profile_names = {n: p.name for n, p in zip(layout.site_names, layout.profiles)}
    results = summarise(cfg, rows, evals, partition, profile_names)
    return report.write_all(cfg, results, phantoms, partition, profile_names, timings)
