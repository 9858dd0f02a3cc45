"""Private and useful at once? Patient-level DP from a public warm start, measured against its floor and ceiling.

Data (the heterogeneous phantom): a public cohort (large high-grade gliomas from one 3 T scanner family) and three
private sites that hold what it lacks (a metastasis clinic, a community hospital with low-grade gliomas on an old
5 mm protocol, a meningioma centre with elderly patients), of realistic, uneven sizes. The test patients come
from the private sites' scanners and populations (the same number from each); no setting is tuned on them.

Rows (every one: the same segmentation recipe, `seeds` segmentation seeds, the same test patients). The measurement
(`required_rows`): real_all, real_public, public_only, nonprivate, dp_anchored_eps<e> for each epsilon (the
system's private defaults from a public start), slice_default and dp_scratch_eps<e>; the others take the private
recipe apart and run with `diagnostics` (`--diagnostics`):
    real_all           the private sites' real cases pooled (the ceiling)
    real_public        the public cohort's real cases (what a consortium has without the sites)
    public_only        synthetic data from the generator pretrained on the public cohort alone, made from the
                       private sites' label maps (the floor the private data must beat)
    nonprivate         AsynDGAN fine-tuned from the public start with the three sites, privacy off, with the papers'
                       L1 term (computed at the sites on their real images: what a consortium without privacy runs)
    nonprivate_adv     the same without the L1 term: the private rows' recipe with privacy off, so that
                       dp_eps<e> - nonprivate_adv is the cost of the privacy mechanism alone
    dp_eps<e>          the same with patient-level DP at epsilon e per site (each site computes its own noise for
                       the planned steps)
    dp_eps<e>_stats    the same, plus the one-shot DP release of intensity statistics (statistics_share of epsilon)
                       that the server pulls the generator towards; DP-SGD gets the rest of the budget
    stats_only_eps<e>  the sites' discriminators stay the public ones (trainable none: their answers cost nothing);
                       the whole budget goes to the statistics release, which the server pulls the generator to
    public_frozen      the same without any release (no private data at all beyond the label maps): separates what
                       300 more steps against the public discriminators do from what the statistics add
    dp_anchored_eps<e> dp_eps<e> plus the server's anchor to the public generator's output: what a site and a
                       server run by default from a public start (the release off, the anchor on)
    anchored_eps<e>    dp_eps<e>_stats plus the server's anchor to the public generator's output (anchor_weight,
                       chosen on public data by `asyndgan experiment anchor-tuning`): the recipe after the collapse
    stats_anchored_eps<e>, public_anchored
                       stats_only / public_frozen with the anchor (what the release adds under the anchor; what the
                       anchor alone does without any private data)
    steered_eps<e>     the release alone, without the sites' gradients (adversarial weight 0): the public generator
                       pulled towards each site's released intensity statistics and anchored to its public output
    dp_scratch_eps<e>  patient-level DP without the public start (generator and discriminators from scratch)
    slice_default      the earlier default: slice-level DP (rate 0.01, noise 1), from scratch
Synthetic rows are made from the private sites' training label maps (public: they are uploaded at join), one
synthetic volume per training case. Every GAN runs with the sites in this process (the same SiteWorker as a
site process; the distributed path is tested elsewhere); only the public pretraining and the nonprivate row use the
L1 term (private sites refuse it).

Per row: Dice and HD95 (whole tumour, 3-D, per patient), epsilon per site from the ledgers, the one-run canary
audit's epsilon lower bound (a separate audit run of the smallest site's mechanism at the row's settings, with
256 gradient canaries), and the membership test of the released generator (members: the sites' training
patients; non-members: the test patients). Paired differences per test patient (Dice averaged over seeds first)
against the non-private and the public-only rows, with 95% t-intervals.

Every piece is kept in OUT and skipped on a re-run (resumable); two processes of the command share the
segmentation models.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import threading
import time
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from asyndgan.formats import checkpoint as ckpt
from asyndgan.simulation.pretrain import pretrain
from asyndgan.central_server.trainer import Trainer
from asyndgan.formats import public_start
from asyndgan.common.config import (GuardConfig, Image2DConfig, LossConfig, ModelConfig, OptimizerConfig,
                                    PrivacyConfig, ScheduleConfig, ServerConfig, SiteFacingConfig, TrainConfig)
from asyndgan.demo_data.phantom import PhantomConfig, write_phantom
from asyndgan.demo_data.phantom.presets import HETEROGENEOUS_PROFILES, phantom_config
from asyndgan.experiments import dp_audit, memorization
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession



from asyndgan.segmentation import (NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig)
from asyndgan.formats.datasets import open_dataset
from asyndgan.experiments.pieces import (ExperimentConfig, json_if_file, piece_timer, shared_pieces, write_json,
                                         written_once)
from asyndgan.common.errors import ConfigError
from asyndgan.experiments.scoring import RowScore, SeedScore, score_rows
from asyndgan.experiments.recipe import PAPERS

log = logging.getLogger(__name__)
Preset = Literal["smoke", "cpu", "gpu"]


class GANSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int
    ngf: int
    n_blocks: int
    ndf: int
    d_layers: int = 3
    batch_per_site: int = 4
    lr: float = 2e-4
    pretrain_steps: int = Field(ge=1, description="generator steps on the public cohort")
    pretrain_lambda_l1: float = Field(100.0, description="L1 weight in the public pretraining (public data)")
    nonprivate_lambda_l1: float = Field(100.0, description="L1 weight of the nonprivate row (the papers' value)")
    finetune_steps: int = Field(ge=1, description="steps with the private sites, from the public start")
    scratch_steps: int = Field(ge=1, description="steps with the private sites, from scratch")


class DPSettings(BaseModel):
    """The sites' privacy settings other than epsilon (PrivacyConfig's meaning), the same at every site."""

    model_config = ConfigDict(extra="forbid")
    delta: float = 1e-5
    sample_rate: float = 0.5
    slices_per_patient: int = 4
    augmentations: int = 2
    update_every: int = 1
    trainable: str = "auto"  # last:1 from the public start, all from scratch
    max_grad_norm: float = 1.0

    def privacy(self, epsilon: float, statistics_share: float = 0.0) -> PrivacyConfig:
        return PrivacyConfig(epsilon=epsilon, statistics_share=statistics_share, **self.model_dump())


class PrivacyUtilityConfig(ExperimentConfig):
    shape: tuple[int, int, int] = (160, 160, 100)
    public_cases: int = Field(40, ge=1)
    site_cases: list[int] = Field(default_factory=lambda: [60, 30, 15])
    site_profiles: list[int] = Field(default_factory=lambda: [1, 2, 3], description="heterogeneous preset profiles")
    test_cases: int = Field(30, ge=3)
    gan: GANSettings
    dp: DPSettings = Field(default_factory=DPSettings)
    epsilons: list[float] = Field(default_factory=lambda: [1.0, 3.0, 10.0])
    scratch_epsilon: float = 10.0
    statistics_epsilons: list[float] = Field(default_factory=lambda: [10.0, 3.0],
                                             description="epsilons of the rows with the statistics release")
    statistics_share: float = Field(0.25, gt=0, lt=1, description="share of epsilon those rows spend on it")
    stats_only_epsilons: list[float] = Field(default_factory=lambda: [10.0, 3.0, 1.0],
                                             description="epsilons of the rows with frozen public discriminators and "
                                                         "the whole budget on the statistics release")
    anchor_weight: float = Field(100.0, ge=0, description="TrainConfig.anchor_weight of the anchored rows, chosen on "
                                 "public data (`asyndgan experiment anchor-tuning`)")
    anchor_epsilons: list[float] = Field(default_factory=lambda: [10.0, 3.0, 1.0],
                                         description="epsilons of the anchored rows (DP-SGD + release + anchor)")
    shipped_epsilons: list[float] = Field(default_factory=lambda: [10.0, 3.0, 1.0],
                                          description="epsilons of the rows that run the system's defaults from a "
                                                      "public start: patient-level DP-SGD and the anchor, no release")
    steer_epsilons: list[float] = Field(default_factory=lambda: [10.0, 3.0, 1.0],
                                        description="epsilons of the steered rows: the whole budget on the statistics "
                                                    "release, the sites' gradients left out (adversarial weight 0), "
                                                    "the generator pulled to the numbers and anchored")
    steer_anchor_weight: float = Field(100.0, ge=0, description="the steered rows' anchor weight (anchor-tuning's "
                                       "steer candidates)")
    canaries: int = Field(256, ge=10)
    diagnostics: bool = Field(False, description="also the rows that take the private recipe apart (row_order); "
                              "which rows run is not a setting of the measurement: a run may add them later")
    segmentation: SegmentationRecipe
    seeds: int = Field(3, ge=1)
    device: str = "cpu"
    threads: int = Field(2, ge=1)


def preset_config(preset: Preset, out: pathlib.Path, seed: int = 0) -> PrivacyUtilityConfig:
    """smoke: the plumbing in a few minutes; cpu: the measurement on 2 cores (about 2.5 hours); gpu: larger."""
    if preset == "smoke":
        return PrivacyUtilityConfig(
            preset=preset, out=out, seed=seed, shape=(64, 64, 40), public_cases=2, site_cases=[3, 2, 2],
            test_cases=3, gan=GANSettings(image_size=32, ngf=8, n_blocks=1, ndf=8, d_layers=2, batch_per_site=2,
                                          pretrain_steps=8, finetune_steps=4, scratch_steps=4),
            dp=DPSettings(delta=1e-3), epsilons=[1.0, 10.0], statistics_epsilons=[10.0], stats_only_epsilons=[10.0],
            anchor_epsilons=[10.0], steer_epsilons=[10.0], shipped_epsilons=[10.0],
            canaries=40, diagnostics=True,
            segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=32),
                                            network=NetworkConfig(channels=[8, 16, 32], num_res_units=1),
                                            training=TrainingConfig(steps=4, batch_size=8)), seeds=1)
    recipe = SegmentationRecipe(preprocessing=Preprocessing(image_size=64),
                                training=TrainingConfig(steps=1000, batch_size=16))
    if preset == "cpu":
        return PrivacyUtilityConfig(
            preset=preset, out=out, seed=seed,
            gan=GANSettings(image_size=64, ngf=32, n_blocks=6, ndf=32, pretrain_steps=1500, finetune_steps=300,
                            scratch_steps=300),
            segmentation=recipe)
    return PrivacyUtilityConfig(
        preset=preset, out=out, seed=seed, shape=(240, 240, 155), public_cases=100, site_cases=[120, 60, 30],
        test_cases=60, gan=GANSettings(image_size=128, ngf=64, n_blocks=9, ndf=64, pretrain_steps=20000,
                                       finetune_steps=3000, scratch_steps=10000),
        segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=128),
                                        training=TrainingConfig(steps=4000, batch_size=16)), device="cuda")


# ---- data ------------------------------------------------------------------------------------------------------
def layouts(cfg: PrivacyUtilityConfig) -> dict[str, PhantomConfig]:
    profiles = [HETEROGENEOUS_PROFILES[k].model_copy() for k in cfg.site_profiles]
    private = PhantomConfig(sites=len(profiles), cases_per_site=cfg.site_cases, test_cases=cfg.test_cases,
                            seed=cfg.seed, shape=cfg.shape, profiles=profiles, cohort="private",
                            site_names=[f"site{i + 1}" for i in range(len(profiles))])
    public = phantom_config("public", seed=cfg.seed, shape=cfg.shape, cases_per_site=[cfg.public_cases])
    return {"private": private, "public": public}


def make_phantoms(cfg: PrivacyUtilityConfig) -> dict[str, pathlib.Path]:
    folders = {}
    for name, layout in layouts(cfg).items():
        folders[name] = written_once(cfg.out / "phantom" / name,
                                     lambda folder, layout=layout: write_phantom(folder, layout))
    return folders


def site_trees(cfg: PrivacyUtilityConfig, phantoms: dict[str, pathlib.Path]) -> list[pathlib.Path]:
    return [phantoms["private"] / n for n in layouts(cfg)["private"].site_names]


def pooled_maps(cfg: PrivacyUtilityConfig, sites: list[pathlib.Path]) -> pathlib.Path:
    from asyndgan.experiments.synthetic_learning import pooled_tree

    return pooled_tree(sites, cfg.out / "pooled")


# ---- GANs ------------------------------------------------------------------------------------------------------
def server_config(cfg: PrivacyUtilityConfig, run_dir: pathlib.Path, steps: int, batch: int,
                  lambda_l1: float = 0.0) -> ServerConfig:
    g = cfg.gan
    opt = OptimizerConfig(lr=g.lr)
    scfg = ServerConfig(
        host="127.0.0.1", port=0, run_dir=run_dir, device=cfg.device, checkpoint_every=max(1, steps // 2),
        sample_every=max(1, steps // 4), g_optim=opt, tensorboard=False,
        # every site is the experiment's own: the papers' n_j / N weighting, no guard against hostile sites
        train=TrainConfig(batch_size=batch, sampling="balance", step_deadline_s=600, seed=cfg.seed,
                          guard=GuardConfig.off()),
        site=SiteFacingConfig(
            model=ModelConfig(family="image2d", image2d=Image2DConfig(
                image_size=g.image_size, ngf=g.ngf, n_blocks=g.n_blocks, ndf=g.ndf, d_layers=g.d_layers)),
            d_optim=opt, loss=LossConfig(lambda_l1=lambda_l1), schedule=ScheduleConfig(steps=steps), seed=cfg.seed))
    PAPERS.apply(scfg)  # the reports' recipe, whatever the system ships
    return scfg


def run_pretrain(cfg: PrivacyUtilityConfig, phantoms: dict[str, pathlib.Path]) -> pathlib.Path:
    g = cfg.gan
    scfg = server_config(cfg, cfg.out / "gan" / "public_pretrain", g.pretrain_steps,
                         g.batch_per_site * len(cfg.site_cases), g.pretrain_lambda_l1)
    return pretrain(scfg, phantoms["public"] / "public", PAPERS.prep(cfg.out / "cache"))


class GANRow(NamedTuple):
    from_public: bool
    privacy: PrivacyConfig | None  # None: off
    steps: int
    lambda_l1: float = 0.0
    anchor_weight: float = 0.0  # the server's pull towards the public generator's output (TrainConfig.anchor_weight)
    adversarial_weight: float = 1.0  # 0: the sites' gradients are left out (TrainConfig.adversarial_weight)


def gan_settings(cfg: PrivacyUtilityConfig) -> dict[str, GANRow]:
    """GAN row -> how it is trained."""
    g = cfg.gan
    out = {"nonprivate": GANRow(True, None, g.finetune_steps, g.nonprivate_lambda_l1),
           "nonprivate_adv": GANRow(True, None, g.finetune_steps)}
    for eps in cfg.epsilons:
        out[f"dp_eps{eps:g}"] = GANRow(True, cfg.dp.privacy(eps), g.finetune_steps)
    for eps in cfg.statistics_epsilons:
        out[f"dp_eps{eps:g}_stats"] = GANRow(True, cfg.dp.privacy(eps, cfg.statistics_share), g.finetune_steps)
    frozen = cfg.dp.model_copy(update={"trainable": "none"})
    for eps in cfg.stats_only_epsilons:
        out[f"stats_only_eps{eps:g}"] = GANRow(True, frozen.privacy(eps, 1.0), g.finetune_steps)
    out["public_frozen"] = GANRow(True, frozen.privacy(1.0, 0.0), g.finetune_steps)
    a = cfg.anchor_weight
    for eps in cfg.shipped_epsilons:
        out[f"dp_anchored_eps{eps:g}"] = GANRow(True, cfg.dp.privacy(eps), g.finetune_steps, 0.0, a)
    for eps in cfg.anchor_epsilons:
        out[f"anchored_eps{eps:g}"] = GANRow(True, cfg.dp.privacy(eps, cfg.statistics_share), g.finetune_steps, 0.0, a)
    if cfg.anchor_epsilons:
        out[f"stats_anchored_eps{max(cfg.anchor_epsilons):g}"] = GANRow(
            True, frozen.privacy(max(cfg.anchor_epsilons), 1.0), g.finetune_steps, 0.0, a)
        out["public_anchored"] = GANRow(True, frozen.privacy(1.0, 0.0), g.finetune_steps, 0.0, a)
    for eps in cfg.steer_epsilons:
        out[f"steered_eps{eps:g}"] = GANRow(True, frozen.privacy(eps, 1.0), g.finetune_steps, 0.0,
                                            cfg.steer_anchor_weight, 0.0)
    out[f"dp_scratch_eps{cfg.scratch_epsilon:g}"] = GANRow(False, cfg.dp.privacy(cfg.scratch_epsilon),
                                                           g.scratch_steps)
    out["slice_default"] = GANRow(False, PrivacyConfig(unit="slice", epsilon=10.0, delta=cfg.dp.delta,
                                                       noise_multiplier=1.0, sample_rate=0.01, trainable="all"),
                                  g.scratch_steps)
    return out


def train_gan(cfg: PrivacyUtilityConfig, name: str, sites: list[pathlib.Path], pre: pathlib.Path) -> dict:
    """One GAN with the private sites in this process; {checkpoint, epsilon per site, ...}. Kept when done."""
    return fit_gan(cfg, name, cfg.out / "gan" / name, gan_settings(cfg)[name], sites, pre)


def fit_gan(cfg: PrivacyUtilityConfig, name: str, folder: pathlib.Path, settings: GANRow, sites: list[pathlib.Path],
            pre: pathlib.Path) -> dict:
    """train_gan for any settings and folder (the anchor tuning's stand-in site as well)."""
    from_public, privacy, steps, lambda_l1, anchor_weight, adversarial_weight = settings
    record = folder / "gan.json"
    if record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # a cut run (with its experiment-only ledgers) starts again
    scfg = server_config(cfg, folder, steps, cfg.gan.batch_per_site, lambda_l1)
    scfg.train.adversarial_weight = adversarial_weight
    initial = None
    if from_public:
        info, data = public_start.read_folder(pre)
        initial = public_start.weights_from_bytes(data, info["discriminator_sha256"])
    prep = PAPERS.prep(cfg.out / "cache")
    sessions = [LocalSession(f"site{i + 1}", open_dataset(path, scfg.site, prep), scfg.site, device=cfg.device,
                             privacy=privacy, ledger_path=folder / "ledgers" / f"site{i + 1}.json", initial=initial)
                for i, path in enumerate(sites)]
    trainer = Trainer(scfg, LocalRegistry(sessions), CountingBank(sessions), folder)
    if from_public:
        public_generator = ckpt.published_generator(ckpt.load_checkpoint(pre / info["checkpoint"]))
        trainer.generator.load_state_dict(public_generator)
        if anchor_weight > 0:
            trainer.anchor_to(public_generator, anchor_weight)
    started = time.monotonic()
    trainer.run(threading.Event())
    final = ckpt.checkpoint_path(folder / "checkpoints", steps)
    result = {
        "row": name, "from_public": from_public, "steps": steps, "lambda_l1": lambda_l1,
        "anchor_weight": anchor_weight, "adversarial_weight": adversarial_weight, "checkpoint": str(final),
        "seconds": round(time.monotonic() - started, 1),
        "privacy": None if privacy is None else json.loads(privacy.model_dump_json()),
        "sites": {s.site_id: {"samples": s.num_samples, "patients": s.worker.dataset.patients().count,
                              "epsilon": s.worker.epsilon_spent,
                              "noise_multiplier": getattr(s.worker.learner, "noise_multiplier", None),
                              "released_statistics": s.statistics or None}
                  for s in sessions},
    }
    write_json(record, result)
    log.info("%s: %d steps in %.0f s; epsilon per site %s", name, steps, result["seconds"],
             {k: v["epsilon"] for k, v in result["sites"].items()})
    return result


def canary_audit(cfg: PrivacyUtilityConfig, name: str, sites: list[pathlib.Path], pre: pathlib.Path) -> dict:
    """The one-run audit of the smallest site's DP mechanism at the row's settings (its own ledger, the public
    generator's fakes); {epsilon_ledger, epsilon_lower_bound, ...}. Kept when done."""
    from asyndgan.common import serde
    from asyndgan.common.conditions import augment, draw_augmentation, one_hot
    from asyndgan.site_agent.worker import SiteWorker
    from asyndgan.formats.generator_file import load_from_checkpoint

    from_public, privacy, steps = gan_settings(cfg)[name][:3]
    folder = cfg.out / "audit" / name
    record = folder / "canaries.json"
    if record.is_file():
        return json.loads(record.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    smallest = sites[int(np.argmin(cfg.site_cases))]
    scfg = server_config(cfg, folder, steps, cfg.gan.batch_per_site)
    info, data = public_start.read_folder(pre)
    initial = public_start.weights_from_bytes(data, info["discriminator_sha256"]) if from_public else None
    dataset = open_dataset(smallest, scfg.site, PAPERS.prep(cfg.out / "cache"))
    worker = SiteWorker(scfg.site, dataset, cfg.device, privacy=privacy, ledger_path=folder / "ledger.json",
                        site_id="audit", initial=initial)
    canaries = dp_audit.attach(worker.learner, count=cfg.canaries, seed=cfg.seed)
    generator = load_from_checkpoint(pre / info["checkpoint"]).generator.eval()
    rng = torch.Generator().manual_seed(cfg.seed)
    size, stored = cfg.gan.image_size, scfg.site.model.image2d.stored_size
    started = time.monotonic()
    for step in range(steps):
        keys = torch.randint(len(dataset), (cfg.gan.batch_per_site,), generator=rng)
        aug = draw_augmentation(len(keys), True, stored, size, rng)
        with torch.no_grad():
            fake = generator(one_hot(augment(worker.label_maps[keys], aug), scfg.site.model.image2d.num_classes))
        worker.answer(serde.SyntheticBatch(step=step, round=step, keys=keys, fake=fake, aug=aug))
    result = {"row": name, "site_patients": dataset.patients().count, "epsilon_ledger": worker.epsilon_spent,
              **dp_audit.conclude(canaries).as_dict(), "seconds": round(time.monotonic() - started, 1)}
    write_json(record, result)
    log.info("%s: canary audit bound %.3f against the ledger's %.3f", name, result["epsilon_lower_bound"],
             result["epsilon_ledger"])
    return result


def synthetic_set(cfg: PrivacyUtilityConfig, name: str, checkpoint: pathlib.Path, maps: pathlib.Path) -> pathlib.Path:
    from asyndgan.synthesis.generate import GenerateConfig, run

    out = cfg.out / "synthetic" / name
    run(GenerateConfig(checkpoint=checkpoint, out=out, label_maps=maps, device=cfg.device, batch_size=32))
    (out / ".done").write_text("complete\n")  # for another process of this command waiting on it
    return out


def membership(cfg: PrivacyUtilityConfig, name: str, checkpoint: pathlib.Path, sites: list[pathlib.Path],
               test_dir: pathlib.Path) -> dict:
    path = cfg.out / "audit" / name / "membership.json"
    if path.is_file() and (kept := json.loads(path.read_text())).get("method", 1) == memorization.METHOD:
        return kept
    result = memorization.audit(checkpoint, sites, [test_dir], cfg.out / "cache", seed=cfg.seed).as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


# ---- segmentation ----------------------------------------------------------------------------------------------
def segment(cfg: PrivacyUtilityConfig, rows: dict[str, list[pathlib.Path]],
            test_dir: pathlib.Path) -> dict[str, list[SeedScore]]:
    """Row -> one score per segmentation seed; models in OUT/segmentation/<row>/seed<s>."""
    return score_rows(cfg.out / "segmentation", rows, cfg.segmentation, [cfg.seed + k for k in range(cfg.seeds)],
                      test_dir, cfg.device)


def summarise_rows(evals: dict[str, list[SeedScore]]) -> dict[str, dict]:
    return {row: RowScore.of(runs).as_json() for row, runs in evals.items()}


def required_rows(cfg: PrivacyUtilityConfig) -> list[str]:
    """The generators the measurement needs, in the order they run (a cut run reports the first): the public-only
    floor, the non-private ceiling, the system's private defaults from the public start (patient-level DP-SGD and
    the anchor, no release) at each epsilon (largest first), the slice-level default, and DP from scratch last
    (the longest piece: a GAN cut half-way starts again)."""
    shipped = [f"dp_anchored_eps{e:g}" for e in sorted(cfg.shipped_epsilons, reverse=True)]
    return ["public_only", "nonprivate", *shipped, "slice_default", f"dp_scratch_eps{cfg.scratch_epsilon:g}"]


def row_order(cfg: PrivacyUtilityConfig) -> list[str]:
    """required_rows, then (with cfg.diagnostics) the rows that take the private recipe apart: DP-SGD alone and
    with the release, the release alone, the anchor alone, steering by the release alone, frozen discriminators,
    the non-private run without L1."""
    required = required_rows(cfg)
    if not cfg.diagnostics:
        return required
    eps = sorted(cfg.anchor_epsilons, reverse=True)
    dp = sorted((n for n in gan_settings(cfg) if n.startswith("dp_eps")),
                key=lambda n: (-float(n[len("dp_eps"):].removesuffix("_stats")), n.endswith("_stats")))
    first = [*dp[:2], *(f"anchored_eps{e:g}" for e in eps),
             *([f"stats_anchored_eps{eps[0]:g}", "public_anchored"] if eps else []),
             *(f"steered_eps{e:g}" for e in sorted(cfg.steer_epsilons, reverse=True))]
    return [*required, *first, *(n for n in gan_settings(cfg) if n not in required and n not in first)]


# ---- pieces shared between processes ----------------------------------------------------------------------------
# ---- the whole experiment ----------------------------------------------------------------------------------------
def run(cfg: PrivacyUtilityConfig) -> dict:
    from asyndgan.experiments.pieces import check_settings

    torch.set_num_threads(cfg.threads)
    check_settings(cfg, exclude=("diagnostics",), added=ADDED_SETTINGS)
    timings, timed = piece_timer(cfg.out / "timings.json")
    log.info("[1/4] phantoms: public cohort, three private sites and their test patients")
    phantoms = timed("phantoms", make_phantoms, cfg)
    sites, test_dir = site_trees(cfg, phantoms), phantoms["private"] / "test"
    maps = pooled_maps(cfg, sites)
    log.info("[2/4] real rows (segmentation)")
    evals = timed("segmentation_real", segment, cfg, {"real_all": sites,
                                                     "real_public": [phantoms["public"] / "public"]}, test_dir)
    log.info("[3/4] public pretraining (%d steps)", cfg.gan.pretrain_steps)
    pre = cfg.out / "gan" / "public_pretrain"
    shared_pieces(cfg, "pretrain", ["public"], lambda _: timed("pretrain", run_pretrain, cfg, phantoms),
                  lambda _: pre if (pre / public_start.RECORD).is_file() else None)
    info, _ = public_start.read_folder(pre)
    public_only = {"row": "public_only", "checkpoint": str(pre / info["checkpoint"]), "steps": info["steps"],
                   "seconds": info["seconds"], "privacy": None, "sites": {}}
    names = row_order(cfg)
    log.info("[4/4] per generator: GAN, audits, synthetic data, segmentation: %s", ", ".join(names))
    results: dict = {}

    def row(name: str) -> dict:
        """One generator's row, start to end (a piece another process may take), and the report so far."""
        if name == "public_only":
            gan = public_only
        else:
            gan = timed(f"gan_{name}", train_gan, cfg, name, sites, pre)
        checkpoint = pathlib.Path(gan["checkpoint"])
        dp_sgd = gan["privacy"] is not None and gan["privacy"]["trainable"] != "none"
        canaries = timed(f"canaries_{name}", canary_audit, cfg, name, sites, pre) if dp_sgd else None
        member = timed(f"membership_{name}", membership, cfg, name, checkpoint, sites, test_dir)
        synthetic = timed(f"synthesis_{name}", synthetic_set, cfg, name, checkpoint, maps)
        seg = timed(f"segmentation_{name}", segment, cfg, {name: [synthetic]}, test_dir)[name]
        out = {"gan": gan, "canaries": canaries, "membership": member, "segmentation": [r.as_json() for r in seg]}
        write_json(cfg.out / "rows" / f"{name}.json", out)
        results[name] = out
        _report_so_far(cfg, evals, {**_rows_done(cfg), name: out}, timings)
        return out

    done = shared_pieces(cfg, "row", names, row, lambda name: json_if_file(cfg.out / "rows" / f"{name}.json"))
    for name, out in done.items():  # rows finished before the membership audit's method changed
        if out["membership"].get("method", 1) != memorization.METHOD:
            out["membership"] = timed(f"membership_{name}", membership, cfg, name, pathlib.Path(out["gan"]["checkpoint"]),
                                      sites, test_dir)
            write_json(cfg.out / "rows" / f"{name}.json", out)
    return _report_so_far(cfg, evals, done, timings)


# settings this experiment gained after the first runs: a run without them resumes and their rows run now
ADDED_SETTINGS = ("statistics_epsilons", "statistics_share", "stats_only_epsilons", "anchor_weight", "anchor_epsilons",
                  "steer_epsilons", "steer_anchor_weight", "shipped_epsilons")


def report_so_far(cfg: PrivacyUtilityConfig) -> dict:
    """results.json, report.md and the figure from the pieces finished in OUT so far; trains nothing (a run
    still going, or one cut short, can be looked at)."""
    from asyndgan.experiments.pieces import check_settings

    if not (cfg.out / "settings.json").is_file():
        raise ConfigError(f"{cfg.out} holds no run of this experiment (no settings.json)")
    try:
        check_settings(cfg, exclude=("diagnostics",), added=ADDED_SETTINGS)
    except ConfigError:
        raise ConfigError(f"{cfg.out} holds a run made with other settings than --preset {cfg.preset} --seed "
                          f"{cfg.seed} ({cfg.out / 'settings.json'}); give the ones it was run with") from None
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    real = {}
    for row in ("real_all", "real_public"):
        folders = [cfg.out / "segmentation" / row / f"seed{s}" for s in seeds]
        if all((f / "eval" / "summary.json").is_file() for f in folders):
            real[row] = [SeedScore.read(f) for f in folders]
    timings_path = cfg.out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    return _report_so_far(cfg, real, _rows_done(cfg), timings)


def _rows_done(cfg: PrivacyUtilityConfig) -> dict:
    folder = cfg.out / "rows"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _report_so_far(cfg: PrivacyUtilityConfig, real_evals: dict, done: dict, timings: dict) -> dict:
    """results.json, report.md and the figure from the real rows and the generators finished so far."""
    from asyndgan.experiments import privacy_utility_report as report

    order = ["public_only", *gan_settings(cfg)]
    done = {k: done[k] for k in order if k in done}
    evals = {**real_evals, **{k: [SeedScore.from_json(r) for r in v["segmentation"]] for k, v in done.items()}}
    return report.write_all(cfg, summarise_rows(evals), {k: v["gan"] for k, v in done.items()},
                            {k: v["canaries"] for k, v in done.items() if v["canaries"] is not None},
                            {k: v["membership"] for k, v in done.items()}, timings)
