"""Segmentation scores, the record every experiment's table is built from: one U-Net per (row, seed), trained on
the row's training trees and scored on the test patients.

    SeedScore    one model: its seed, mean Dice and HD95 over the test patients, Dice per patient, collapsed or not
    RowScore     a row over its seeds: Dice per seed with mean and spread, HD95, each patient's Dice over the seeds
    score_rows   train and score every (row, seed) not yet in the folder; a piece another process of the same
                 command has claimed is waited for, not redone

Models and evaluations stay in FOLDER/<row>/seed<s>/{model,eval}; a resumed run reads them back.
"""

from __future__ import annotations

import csv
import json
import logging
import pathlib
from dataclasses import dataclass, field

import numpy as np

from asyndgan.experiments.pieces import CLAIM, claim_folder, wait_for_eval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedScore:
    """One segmentation model scored on the test patients (the means are over patients)."""

    seed: int
    dice: float
    hd95_mm: float
    patients: dict[str, float]  # case -> 3-D whole-tumour Dice
    collapsed: bool  # the training ended predicting (almost) nothing
    summary: dict = field(repr=False)  # the evaluation's summary.json, whole
    # The evaluation's per-patient table, every column as written, and its file; read from the piece, not kept in
    # an experiment's row files.
    table: tuple[dict, ...] = field(default=(), repr=False, compare=False)
    csv: str = field(default="", repr=False, compare=False)

    @classmethod
    def read(cls, folder: pathlib.Path, evaluation: str = "eval") -> SeedScore:
        """From a finished piece FOLDER (= .../seed<s>) holding model/training.json and the evaluation folder
        (`eval`: the test patients; another name: the same model scored on other patients)."""
        path = folder / evaluation / "per_patient.csv"
        with open(path, newline="") as f:
            table = tuple(csv.DictReader(f))
        training = json.loads((folder / "model" / "training.json").read_text())
        summary = json.loads((folder / evaluation / "summary.json").read_text())
        return cls(seed=int(folder.name.removeprefix("seed")), dice=float(summary["dice"]["mean"]),
                   hd95_mm=float(summary["hd95_mm"]["mean"]), patients={r["case"]: float(r["dice"]) for r in table},
                   collapsed=bool(training.get("collapsed", False)), summary=summary, table=table, csv=str(path))

    def as_json(self) -> dict:
        """As kept in an experiment's row files (the keys older runs wrote, so they resume)."""
        return {"summary": self.summary, "patients": self.patients, "collapsed": self.collapsed,
                "seed": f"seed{self.seed}", "hd95": self.hd95_mm}

    @classmethod
    def from_json(cls, data: dict) -> SeedScore:
        summary = data["summary"]
        return cls(seed=int(str(data["seed"]).removeprefix("seed")), dice=float(summary["dice"]["mean"]),
                   hd95_mm=float(summary["hd95_mm"]["mean"]), patients=dict(data["patients"]),
                   collapsed=bool(data["collapsed"]), summary=summary)


@dataclass(frozen=True)
class RowScore:
    """A row over its segmentation seeds. The spread is between seeds (the training's randomness); the paired
    intervals between rows are over `patients`."""

    dice_per_seed: list[float]
    hd95_mm: float  # mean over seeds
    collapsed: int  # seeds whose training collapsed
    patients: dict[str, float]  # case -> Dice averaged over the seeds

    @property
    def dice(self) -> float:
        return float(np.mean(self.dice_per_seed))

    @property
    def dice_sd(self) -> float:
        return float(np.std(self.dice_per_seed, ddof=1)) if len(self.dice_per_seed) > 1 else 0.0

    @classmethod
    def of(cls, runs: list[SeedScore]) -> RowScore:
        if not runs:
            raise ValueError("a row needs at least one scored seed")
        cases = sorted(runs[0].patients)
        return cls(dice_per_seed=[r.dice for r in runs], hd95_mm=float(np.mean([r.hd95_mm for r in runs])),
                   collapsed=sum(r.collapsed for r in runs),
                   patients={c: float(np.mean([r.patients[c] for r in runs])) for c in cases})

    def as_json(self) -> dict:
        return {"dice_per_seed": self.dice_per_seed, "dice": self.dice, "dice_sd": self.dice_sd,
                "hd95": self.hd95_mm, "collapsed": self.collapsed, "patients": self.patients}


def score_rows(folder: pathlib.Path, rows: dict[str, list[pathlib.Path]], recipe, seeds: list[int],
               test_dir: pathlib.Path, device: str, label: str = "segmentation", recipes: dict | None = None,
               progress: bool = False) -> dict[str, list[SeedScore]]:
    """Row -> one SeedScore per seed, in seed order. `rows`: row -> the training trees it pools (each tree is read
    once, whichever rows pool it; the same slices for every seed, since the seed is the training's, not the
    data's). `recipe`: a SegmentationRecipe; its training seed is replaced by each of `seeds`. `recipes`: a row's
    own recipe where it reads its training trees differently (e.g. zero-filled missing modalities); the test
    patients are always read with `recipe`'s preprocessing."""
    from asyndgan.segmentation import (evaluate_model, load_test_cases, load_training_slices, pool_slices,
                                       train_model, write_results)

    pieces = [(row, s) for row in rows for s in seeds]
    test, claimed, slices = None, [], {}
    for done, (row, s) in enumerate(pieces, start=1):
        piece = folder / row / f"seed{s}"
        if (piece / "eval" / "summary.json").is_file():
            continue
        if not claim_folder(piece):
            claimed.append(piece)  # another process of this command is on it
            continue
        log.info("%s %d/%d: %s, seed %d", label, done, len(pieces), row, s)
        base = (recipes or {}).get(row, recipe)
        seeded = base.model_copy(update={"training": base.training.model_copy(update={"seed": s})})
        if not (piece / "model" / "training.json").is_file():
            reading = base.model_copy(update={"training": base.training.model_copy(update={"seed": 0})})
            keys = [(t, reading.model_dump_json()) for t in rows[row]]  # a tree as this recipe reads it
            for key in keys:
                if key not in slices:
                    slices[key] = load_training_slices([key[0]], seeded, progress=progress)
            train_model(pool_slices([slices[k] for k in keys]), seeded, piece / "model", device, progress=progress)
        if test is None:
            test = load_test_cases(test_dir, recipe.preprocessing, progress=progress)
        write_results(evaluate_model(piece / "model", test, device, progress=progress), piece / "eval")
        (piece / CLAIM).unlink(missing_ok=True)
    for piece in claimed:
        wait_for_eval(piece)
    out: dict[str, list[SeedScore]] = {}
    for row, s in pieces:
        out.setdefault(row, []).append(SeedScore.read(folder / row / f"seed{s}"))
    return out
