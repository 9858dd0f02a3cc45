"""What the server's asynchronous modes cost the synthetic data: the synthetic-learning experiment's phantom sites,
each a separate site with its own discriminator (in this process, so that the lateness is exactly the one named),
trained lock-step, pipelined and with a slow site whose answers come late; then a segmentation model trained on each
generator's synthetic cases, Dice on the same real test patients.

Rows:
    exact       lock-step (the default)
    pipelined   train.pipeline = 1: each step's answers applied one step later, through the weights that made them
    late        the largest site answers `lag` steps late every time; train.late_steps = lag (weight 1 / (1 + lag))
    late_catch_up  the same with train.late_weight 'catch_up' (weight 1 + lag: the steps it was absent from)
    dropped     the same slow site without train.late_steps: its answers are lost (a server that cannot wait)
The slow site is the largest (12 of the 21 training cases): the site whose answers weigh most, the worst case.

Presets: smoke (the plumbing in about a minute); cpu (the synthetic-learning cpu preset's data, test patients and
segmentation recipe, with a smaller generator: 64 px, ResNet-3 with 16 filters, 600 steps, so that rows x GAN seeds
x segmentation seeds fit in about an hour on one core). Every row gets the same GAN seeds and segmentation seeds;
against exact: the mean paired per-patient Dice difference with a 95% t-interval, and the spread between GAN seeds.

Resumable: every GAN, synthetic set and segmentation model is kept in OUT.
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading
import time
from typing import Literal

import numpy as np
from pydantic import Field

from asyndgan.experiments.recipe import PAPERS
from asyndgan.experiments import synthetic_learning as sl
from asyndgan.experiments.asynchrony import LaggingSession, _TickingRegistry
from asyndgan.experiments.pieces import (ExperimentConfig, json_if_file, kept_or_reset,
                                         require_checkpoint, write_json)
from asyndgan.experiments.scoring import RowScore, SeedScore, score_rows
from asyndgan.experiments.statistics import paired

log = logging.getLogger(__name__)
Row = Literal["exact", "pipelined", "late", "late_catch_up", "dropped"]
ROWS: tuple[Row, ...] = ("exact", "pipelined", "late", "late_catch_up", "dropped")


class AsynchronyImagesConfig(ExperimentConfig):
    phantom: sl.PhantomSection
    gan: sl.GANSection
    segmentation: sl.SegmentationRecipe
    rows: list[Row] = Field(default_factory=lambda: list(ROWS), min_length=1)
    gan_seeds: int = Field(2, ge=1, description="GANs per row (seed, seed+1, ...)")
    segmentation_seeds: int = Field(2, ge=1, description="segmentation models per GAN")
    lag: int = Field(1, ge=1, le=8, description="steps the slow site's answers come late")
    device: str = "cpu"
    threads: int = Field(1, ge=1)


def preset_config(preset: str, out: pathlib.Path, seed: int = 0) -> AsynchronyImagesConfig:
    base = sl.preset_config(preset, out, seed)  # type: ignore[arg-type]
    gan = base.gan.model_copy(update={"recipe": PAPERS})  # the reports' recipe, whatever the system ships
    if preset == "cpu":
        gan = gan.model_copy(update={"ngf": 16, "n_blocks": 3, "ndf": 16, "steps": 600})
    return AsynchronyImagesConfig(preset=preset, out=out, seed=seed, phantom=base.phantom, gan=gan,  # type: ignore[arg-type]
                                  segmentation=base.segmentation, device=base.device,
                                  gan_seeds=1 if preset == "smoke" else 2,
                                  segmentation_seeds=1 if preset == "smoke" else 2)


def fit(cfg: AsynchronyImagesConfig, row: Row, gan_seed: int, sites: list[pathlib.Path]) -> dict:
    """One GAN of one row, every site its own session in this process: {checkpoint, steps, seconds, late}."""
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig
    from asyndgan.formats.datasets import open_dataset
    from asyndgan.simulation.local_sites import CountingBank, LocalSession

    run_dir = cfg.out / "gan" / row / f"seed{gan_seed}"
    record = run_dir / "gan.json"
    if record.is_file():
        return json.loads(record.read_text())
    seeded = cfg.model_copy(update={"seed": gan_seed})
    scfg = sl.server_config(seeded, run_dir, 1, cfg.gan.batch_per_site)  # type: ignore[arg-type]
    mode = {"pipelined": {"pipeline": 1}, "late": {"late_steps": cfg.lag},
            "late_catch_up": {"late_steps": cfg.lag, "late_weight": "catch_up"}}.get(row, {})
    scfg = ServerConfig.model_validate({**json.loads(scfg.model_dump_json()), "tensorboard": False,
                                        "train": {**scfg.train.model_dump(mode="json"), **mode}})
    prep = cfg.gan.recipe.prep(cfg.out / "cache")
    slow = 0 if row in ("late", "late_catch_up", "dropped") else None  # the largest site
    started = time.monotonic()
    sessions: list = []
    if kept_or_reset(run_dir, cfg.gan.steps) is None:
        for i, folder in enumerate(sites):
            args = (f"site{i + 1}", open_dataset(folder, scfg.site, prep), scfg.site)
            sessions.append(LaggingSession(*args, lag=cfg.lag, device=cfg.device) if i == slow
                            else LocalSession(*args, device=cfg.device))
        Trainer(scfg, _TickingRegistry(sessions), CountingBank(sessions), run_dir).run(threading.Event())
    result = {"row": row, "gan_seed": gan_seed, "steps": cfg.gan.steps,
              "checkpoint": str(require_checkpoint(run_dir, cfg.gan.steps)),
              "seconds": round(time.monotonic() - started, 1),
              "slow_site_answers_applied": _applied(sessions, slow)}
    write_json(record, result)
    return result


def _applied(sessions: list, slow: int | None) -> list[int] | None:
    """[answers of the slow site the trainer took, batches it was sent]."""
    if slow is None or not sessions:
        return None
    return [sessions[slow].late_taken, sessions[slow].batches]


def run(cfg: AsynchronyImagesConfig) -> dict:
    from asyndgan.synthesis.generate import GenerateConfig
    from asyndgan.synthesis.generate import run as generate

    start = sl.start_pooled(cfg, choose=("rows",))
    timings, timed, sites, test_dir, pooled = start.timings, start.timed, start.sites, start.test_dir, start.pooled
    gan_seeds, seg_seeds = start.gan_seeds, start.segmentation_seeds
    done: dict[str, dict] = {}
    for g in gan_seeds:
        for row in cfg.rows:
            name = f"{row}_g{g}"
            path = cfg.out / "pieces" / f"{name}.json"
            if (kept := json_if_file(path)) is not None:
                done[name] = kept
                continue
            gan = timed(f"gan_{name}", fit, cfg, row, g, sites)
            data = cfg.out / "synthetic" / name
            if not (data / ".done").is_file():
                timed(f"synthesis_{name}", generate, GenerateConfig(
                    checkpoint=pathlib.Path(gan["checkpoint"]), out=data, label_maps=pooled, device=cfg.device,
                    batch_size=32))
                (data / ".done").write_text("complete\n")
            scores = timed(f"segmentation_{name}", score_rows, cfg.out / "segmentation", {name: [data]},
                           cfg.segmentation, seg_seeds, test_dir, cfg.device)[name]
            done[name] = {"gan": gan, "segmentation": [s.as_json() for s in scores]}
            write_json(path, done[name])
            log.info("%s: Dice %.3f", name, RowScore.of(scores).dice)
    summary = summarise(cfg, done, gan_seeds)
    write_json(cfg.out / "results.json", {"settings": json.loads(cfg.model_dump_json()), "rows": summary,
                                          "timings": timings})
    (cfg.out / "report.md").write_text(markdown(cfg, summary, timings))
    return summary


def summarise(cfg: AsynchronyImagesConfig, done: dict, gan_seeds: list[int]) -> dict:
    rows: dict[str, dict] = {}
    for row in cfg.rows:
        runs = [done[f"{row}_g{g}"] for g in gan_seeds]
        per_gan = [RowScore.of([SeedScore.from_json(s) for s in r["segmentation"]]).dice for r in runs]
        every = RowScore.of([SeedScore.from_json(s) for r in runs for s in r["segmentation"]])
        rows[row] = {"dice": float(np.mean(per_gan)), "dice_per_gan": per_gan,
                     "gan_sd": float(np.std(per_gan, ddof=1)) if len(per_gan) > 1 else 0.0,
                     "patients": every.patients, "collapsed": every.collapsed,
                     "gan_seconds": float(np.mean([r["gan"]["seconds"] for r in runs])),
                     "slow_site_answers_applied": [r["gan"]["slow_site_answers_applied"] for r in runs]}
    if "exact" in rows:
        for row, r in rows.items():
            if row != "exact":
                r["minus_exact"] = paired(r["patients"], rows["exact"]["patients"])
    return rows


def markdown(cfg: AsynchronyImagesConfig, rows: dict, timings: dict) -> str:
    g = cfg.gan
    lines = ["# What asynchrony costs the synthetic data: segmentation Dice", "",
             f"Command: `asyndgan experiment asynchrony-images --preset {cfg.preset} --out OUT`. Data: the "
             f"synthetic-learning phantom ({'/'.join(map(str, cfg.phantom.cases_per_site))} training cases at 3 "
             f"sites, {cfg.phantom.test_cases} real test patients). Generator: {g.image_size} px, ResNet-{g.n_blocks} "
             f"with {g.ngf} filters, {g.steps} steps, {g.batch_per_site} images per site per step; each site its own "
             f"discriminator in this process. Slow site (rows late, late_catch_up, dropped): the largest, its answers {cfg.lag} "
             f"step(s) late every time. {cfg.gan_seeds} GAN seeds x {cfg.segmentation_seeds} segmentation seeds per "
             "row; whole-tumour Dice in 3-D per test patient, averaged over every GAN and segmentation seed; "
             "against exact: mean paired per-patient difference with a 95% t-interval. Nothing was tuned.", "",
             "| row | Dice | per GAN seed | GAN seed spread | minus exact | 95% interval | slow site's answers "
             "applied | s per GAN |", "|---|---|---|---|---|---|---|---|"]
    for row, r in rows.items():
        d = r.get("minus_exact")
        diff = f"{d['mean']:+.3f} | {d['low']:+.3f} .. {d['high']:+.3f}" if d else "- | -"
        applied = ", ".join("-" if a is None else f"{a[0]}/{a[1]}" for a in r["slow_site_answers_applied"])
        lines.append(f"| {row} | {r['dice']:.3f} | {', '.join(f'{x:.3f}' for x in r['dice_per_gan'])} | "
                     f"{r['gan_sd']:.3f} | {diff} | {applied} | {r['gan_seconds']:.0f} |")
    lines += ["", f"Wall time of the whole run: {sum(timings.values()) / 60:.0f} min (pieces summed).", ""]
    return "\n".join(lines)
