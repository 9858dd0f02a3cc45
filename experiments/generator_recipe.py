"""Which generator recipe makes synthetic data that trains as well as the real thing? Each lever is measured against
the papers' recipe on the same data, the same test patients and the same segmentation recipe.

Where: one process on the sites' data pooled (the synthetic-learning experiment's Syn-All), where a generator step
is cheapest; the chosen recipe is then confirmed distributed by the synthetic-learning experiment itself.

Levers (`LEVERS`; each a named change of the baseline, measured alone):
    baseline     the papers' pix2pix recipe as the synthetic-learning experiment runs it (ResNet generator,
                 PatchGAN, L1 weight 100, tumour slices only, one synthetic case per label-map case)
    ema          train.ema_decay 0.999: the published generator is the moving average of its weights
    spade        image2d.generator spade: the label map in every block of the generator's second half
    multiscale   image2d.d_scales 2: a PatchGAN at full and at half resolution
    diffaug      site.diff_augment translation + cutout at the discriminator
    healthy      prep.healthy_ratio 0.5: healthy brain slices beside the tumour slices
    samples3     generate --samples 3: three synthetic cases per label-map case (the label maps moved); it trains
                 as the baseline does, so its GANs are the baseline's
    longer       twice the generator steps (the decay stretched with them)
    appearance   segmentation.training.appearance: the segmentation models trained on the baseline's very
                 synthetic data with random bias field, gamma, noise and blur (a lever of the segmentation recipe;
                 adopted, it holds for every row of every table)
    ema_warmup   ema with train.ema_warmup: the average's decay warmed up ((1 + n) / (10 + n) at its n-th update
                 until 0.999), so that it forgets the untrained start (added after `ema`'s first GAN measured below
                 the baseline: at a constant 0.999 the average of a 2000-step run still holds 13.5% of the first
                 step's weights)
    no_l1        site.loss.lambda_l1 0: the papers' recipe without its L1 term, as a private site must train it
                 (privacy.enabled, the sites' default, refuses the term: its gradient gives each real pixel away);
                 what dropping it costs is what privacy costs the recipe before any noise is added
The levers that need a term computed on real images (the L1 term is one) work only with privacy off; every lever
above but the baseline's L1 term is available to private sites.

Protocol: `gan_seeds` GANs per lever (seed, seed+1, ...), `segmentation_seeds` segmentation models per GAN; Dice of
the whole tumour in 3-D on the same real test patients. A lever's Dice per patient is averaged over all its GAN and
segmentation seeds; against the baseline: the mean paired per-patient difference with a 95% t-interval; the spread
between GAN seeds is reported beside it. Nothing is tuned on the test patients: every lever's setting was fixed
before any run. Cost: generator steps and seconds per GAN.

Which levers a new recipe adopts is decided on validation patients, never on the test patients: every
segmentation model is also scored on `validation_cases` patients of a validation cohort (the same phantom layout
and sites' scanners, its own random streams: no training or test patient), and a lever is adopted when its paired
difference against the baseline there has its 95% interval above zero (generator_recipe_report.ADOPT_RULE). The
test patients' numbers report what the chosen recipe gives; they choose nothing.

Resumable: every GAN, synthetic set and segmentation model is kept in OUT; two processes of the command on one OUT
share the GANs. A piece's record (OUT/pieces/<lever>_g<seed>.json) is all the report needs: records copied with
OUT/settings.json into a new OUT are kept, and only the missing pieces run.
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading
import time

import numpy as np
from pydantic import Field, field_validator

from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import DataPrepConfig, ServerConfig
from asyndgan.demo_data.phantom import PhantomConfig, write_phantom
from asyndgan.experiments import synthetic_learning as sl
from asyndgan.experiments.recipe import (LEVERS, PAPERS, SEGMENTATION_LEVERS, lever_name, lever_parts,
                                         synthesis_lever, training_lever)
from asyndgan.experiments.pieces import (ExperimentConfig, json_if_file, kept_or_reset,
                                         require_checkpoint, shared_pieces, write_json, written_once)
from asyndgan.experiments.scoring import RowScore, SeedScore, score_rows
from asyndgan.experiments.statistics import paired
from asyndgan.formats.datasets import open_dataset
from asyndgan.segmentation import SegmentationRecipe
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

log = logging.getLogger(__name__)


class GeneratorRecipeConfig(ExperimentConfig):
    phantom: sl.PhantomSection
    gan: sl.GANSection
    segmentation: SegmentationRecipe
    levers: list[str] = Field(default_factory=lambda: list(LEVERS), min_length=1,
                              description="levers to measure, each one of LEVERS or several joined by +")
    gan_seeds: int = Field(2, ge=1, description="GANs per lever (seed, seed+1, ...)")
    validation_cases: int = Field(30, ge=2, description="patients of the validation cohort the levers are chosen "
                                  "on (the test patients choose nothing)")
    segmentation_seeds: int = Field(3, ge=1, description="segmentation models per GAN")
    device: str = "cpu"
    threads: int = Field(2, ge=1)

    @field_validator("levers")
    @classmethod
    def _known_levers(cls, levers: list[str]) -> list[str]:
        names = [lever_name(lever_parts(lever)) for lever in levers]  # `no_l1+spade` is `spade+no_l1`
        if len(set(names)) != len(names):
            raise ValueError("a lever is named twice")
        return names


def preset_config(preset: str, out: pathlib.Path, seed: int = 0) -> GeneratorRecipeConfig:
    """smoke: the plumbing in a few minutes; cpu: the synthetic-learning cpu preset's data and GAN (64 px,
    ResNet-6, 2000 steps: about 34 minutes a GAN on one core, about 45 with its synthesis and 3 segmentation
    models, so the 9 levers x 2 GAN seeds take about 6 hours with two processes, resumable); gpu: its gpu
    preset's."""
    base = sl.preset_config(preset, out, seed)  # type: ignore[arg-type]
    gan = base.gan.model_copy(update={"recipe": PAPERS})  # every lever is a change of the papers' recipe
    return GeneratorRecipeConfig(preset=preset, out=out, seed=seed, phantom=base.phantom, gan=gan,  # type: ignore[arg-type]
                                 segmentation=base.segmentation, device=base.device,
                                 segmentation_seeds=1 if preset == "smoke" else 3,
                                 validation_cases=base.phantom.test_cases)


# ---- one GAN ----------------------------------------------------------------------------------------------------
def lever_settings(cfg: GeneratorRecipeConfig, lever: str, gan_seed: int, run_dir: pathlib.Path
                   ) -> tuple[ServerConfig, DataPrepConfig, int]:
    """(server settings, the pooled site's data preparation, synthetic cases per label-map case) of one GAN: the
    experiment's recipe (cfg.gan.recipe, the papers' by default) with a lever pulled (or several: `spade+no_l1`)."""
    parts = lever_parts(lever)
    recipe = cfg.gan.recipe.with_lever(lever)
    seeded = cfg.model_copy(update={"seed": gan_seed, "gan": cfg.gan.model_copy(update={"recipe": recipe})})
    scfg = sl.server_config(seeded, run_dir, 1, cfg.gan.batch_per_site * len(cfg.phantom.cases_per_site))  # type: ignore[arg-type]
    if "longer" in parts:
        scfg.site.schedule.steps = 2 * cfg.gan.steps
        scfg.checkpoint_every = max(1, scfg.site.schedule.steps // 4)
    if "no_l1" in parts:
        scfg.site.loss.lambda_l1 = 0.0
    scfg = ServerConfig.model_validate(json.loads(scfg.model_dump_json()))  # the changed settings checked
    return scfg, recipe.prep(cfg.out / "cache"), recipe.samples


def _training(scfg: ServerConfig, prep: DataPrepConfig) -> str:
    """What makes a GAN: every setting but where it is written."""
    return json.dumps([json.loads(scfg.model_dump_json(exclude={"run_dir"})),
                       json.loads(prep.model_dump_json())], sort_keys=True)


def fit(cfg: GeneratorRecipeConfig, lever: str, gan_seed: int, pooled: pathlib.Path) -> dict:
    """One GAN of one lever on the pooled data, in this process: {checkpoint, steps, seconds, samples}. A lever
    whose parts change nothing in training (samples3: only the synthesis differs; appearance+no_l1 trains as
    no_l1) uses the finished GAN of the same seed of the lever it trains as, so that the comparison isolates the
    lever exactly ("shared_with" in the record)."""
    run_dir = cfg.out / "gan" / lever / f"seed{gan_seed}"
    record = run_dir / "gan.json"
    if record.is_file():
        return json.loads(record.read_text())
    scfg, prep, samples = lever_settings(cfg, lever, gan_seed, run_dir)
    trains_as = training_lever(lever)
    base = cfg.out / "gan" / trains_as / f"seed{gan_seed}" / "gan.json"
    if trains_as != lever and base.is_file() and \
            _training(scfg, prep) == _training(*lever_settings(cfg, trains_as, gan_seed, run_dir)[:2]):
        result = {**json.loads(base.read_text()), "lever": lever, "samples": samples, "shared_with": trains_as}
        write_json(record, result)
        log.info("%s seed %d trains as %s does: its GAN is that one (%s)", lever, gan_seed, trains_as,
                 result["checkpoint"])
        return result
    steps = scfg.site.schedule.steps
    started = time.monotonic()
    if kept_or_reset(run_dir, steps) is None:
        session = LocalSession("pooled", open_dataset(pooled, scfg.site, prep), scfg.site, device=cfg.device)
        Trainer(scfg, LocalRegistry([session]), CountingBank([session]), run_dir).run(threading.Event())
    result = {"lever": lever, "gan_seed": gan_seed, "steps": steps, "samples": samples,
              "checkpoint": str(require_checkpoint(run_dir, steps)), "seconds": round(time.monotonic() - started, 1)}
    write_json(record, result)
    return result


def segmentation_recipe(cfg: GeneratorRecipeConfig, lever: str) -> SegmentationRecipe:
    """The experiment's segmentation recipe, with the lever's changes where it pulls segmentation levers."""
    change = {k: v for part in lever_parts(lever) for k, v in SEGMENTATION_LEVERS.get(part, {}).items()}
    if not change:
        return cfg.segmentation
    return cfg.segmentation.model_copy(update={"training": cfg.segmentation.training.model_copy(update=change)})


def synthetic(cfg: GeneratorRecipeConfig, name: str, gan: dict, maps: pathlib.Path) -> pathlib.Path:
    from asyndgan.synthesis.generate import GenerateConfig, run

    out = cfg.out / "synthetic" / name
    if not (out / ".done").is_file():
        run(GenerateConfig(checkpoint=pathlib.Path(gan["checkpoint"]), out=out, label_maps=maps, device=cfg.device,
                           batch_size=32, samples=gan["samples"]))
        (out / ".done").write_text("complete\n")
    return out


# ---- validation patients ------------------------------------------------------------------------------------------
VALIDATION = "validation"  # the evaluation folder of each segmentation model scored on the validation patients


def make_validation(cfg: GeneratorRecipeConfig) -> pathlib.Path:
    """The validation patients (written once; two processes of the command wait for one another): the phantom's
    layout with the cohort name `validation`, so its own random streams and case ids; only its test folder is
    used (each site gets the one case the layout needs, unused)."""
    layout = cfg.phantom.layout(cfg.seed).model_copy(update={
        "cohort": VALIDATION, "test_cases": cfg.validation_cases,
        "cases_per_site": [1] * len(cfg.phantom.cases_per_site)})
    root = written_once(cfg.out / "validation",
                        lambda folder: write_phantom(folder, PhantomConfig.model_validate(layout.model_dump())))
    return root / "test"


def validate(cfg: GeneratorRecipeConfig, name: str, seeds: list[int], cases) -> list[SeedScore]:
    """Each segmentation model of piece `name` scored on the validation patients (kept next to its test
    evaluation, in <model folder>/../validation). `cases`: a callable giving the prepared validation patients."""
    from asyndgan.segmentation import evaluate_model, write_results

    out = []
    for s in seeds:
        folder = cfg.out / "segmentation" / name / f"seed{s}"
        if not (folder / VALIDATION / "summary.json").is_file():
            write_results(evaluate_model(folder / "model", cases(), cfg.device, progress=False), folder / VALIDATION)
        out.append(SeedScore.read(folder, VALIDATION))
    return out


# ---- the experiment ---------------------------------------------------------------------------------------------
def run(cfg: GeneratorRecipeConfig) -> dict:
    from asyndgan.segmentation import load_test_cases

    start = sl.start_pooled(cfg, choose=("levers",), added=("validation_cases",))
    timings, timed, test_dir, pooled = start.timings, start.timed, start.test_dir, start.pooled
    gan_seeds, seg_seeds = start.gan_seeds, start.segmentation_seeds
    names = [f"{lever}_g{g}" for lever in cfg.levers for g in gan_seeds]
    validation_dir = timed("validation_phantom", make_validation, cfg)
    prepared: list = []

    def validation_cases():
        if not prepared:
            prepared.append(load_test_cases(validation_dir, cfg.segmentation.preprocessing, progress=False))
        return prepared[0]

    def piece(name: str) -> dict:
        lever, g = name.rsplit("_g", 1)
        gan = timed(f"gan_{name}", fit, cfg, lever, int(g), pooled)
        # a segmentation lever segments the very synthetic data of the lever it is pulled on (appearance: the
        # baseline's)
        makes = synthesis_lever(lever)
        same_data = makes != lever and gan.get("shared_with") == training_lever(makes)
        data = timed(f"synthesis_{name}", synthetic, cfg, f"{makes}_g{g}" if same_data else name, gan, pooled)
        scores = timed(f"segmentation_{name}", score_rows, cfg.out / "segmentation", {name: [data]},
                       segmentation_recipe(cfg, lever), seg_seeds, test_dir, cfg.device)[name]
        checked = timed(f"validation_{name}", validate, cfg, name, seg_seeds, validation_cases)
        out = {"gan": gan, "segmentation": [s.as_json() for s in scores],
               "validation": [s.as_json() for s in checked]}
        write_json(cfg.out / "pieces" / f"{name}.json", out)
        return out

    def finished(name: str) -> dict | None:
        record = json_if_file(cfg.out / "pieces" / f"{name}.json")
        return record if record is not None and "validation" in record else None  # earlier pieces: scored now

    done = shared_pieces(cfg, "gan", names, piece, finished)
    from asyndgan.experiments import generator_recipe_report as report

    return report.write_all(cfg, summarise(cfg, done, gan_seeds), timings)


def summarise(cfg: GeneratorRecipeConfig, done: dict, gan_seeds: list[int]) -> dict:
    """lever -> {dice, dice_per_gan, gan_sd, patients, seconds, steps, samples}, then each lever's paired
    difference against the baseline."""
    levers: dict[str, dict] = {}
    for lever in cfg.levers:
        runs = [done[f"{lever}_g{g}"] for g in gan_seeds]
        per_gan = [RowScore.of([SeedScore.from_json(s) for s in r["segmentation"]]) for r in runs]
        every = RowScore.of([SeedScore.from_json(s) for r in runs for s in r["segmentation"]])
        dice_per_gan = [p.dice for p in per_gan]
        checked = RowScore.of([SeedScore.from_json(s) for r in runs for s in r["validation"]])
        levers[lever] = {"dice": float(np.mean(dice_per_gan)), "dice_per_gan": dice_per_gan,
                         "gan_sd": float(np.std(dice_per_gan, ddof=1)) if len(dice_per_gan) > 1 else 0.0,
                         "collapsed": every.collapsed, "patients": every.patients,
                         "validation_dice": checked.dice, "validation_patients": checked.patients,
                         "steps": runs[0]["gan"]["steps"], "samples": runs[0]["gan"]["samples"],
                         "gan_seconds": float(np.mean([r["gan"]["seconds"] for r in runs]))}
    if "baseline" in levers:
        for lever, row in levers.items():
            if lever != "baseline":
                row["minus_baseline"] = paired(row["patients"], levers["baseline"]["patients"])
                row["validation_minus_baseline"] = gap = paired(row["validation_patients"],
                                                                levers["baseline"]["validation_patients"])
                row["adopted"] = bool(gap["low"] > 0)  # ADOPT_RULE
    for lever, row in levers.items():  # levers pulled together, against each measured part of them
        parts = set(lever_parts(lever))
        row["minus_parts"] = {
            other: {"test": paired(row["patients"], levers[other]["patients"]),
                    "validation": paired(row["validation_patients"], levers[other]["validation_patients"])}
            for other in levers if other != "baseline" and set(lever_parts(other)) < parts}
        if "no_l1" in row["minus_parts"]:  # PRIVATE_RULE: what the lever adds to the recipe private sites train
            row["private_default"] = bool(row["minus_parts"]["no_l1"]["validation"]["low"] > 0)
    return levers
