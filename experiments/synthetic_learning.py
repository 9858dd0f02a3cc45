"""The synthetic-learning experiment (the DSL paper's Table 3 on the phantom): does a segmentation model trained on
AsynDGAN's synthetic data match one trained on the real data it never saw?

Rows, every one trained with the same segmentation recipe and scored on the same real test cases:
    real_all            all sites' real cases pooled (the privacy-violating upper bound)
    real_site<k>        site k's real cases alone
    syn_all             synthetic cases from one GAN trained on all real cases pooled, in this process
    asyndgan            synthetic cases from AsynDGAN: a server process and one process per site, mutual TLS
    asyndgan+site<k>    AsynDGAN's synthetic cases plus the smallest site's real ones (the augmentation claim)
    public_start        synthetic cases from a generator trained on a public cohort only (a differently seeded
                        phantom stand-in): what private sites start from, and the floor they must lift
    asyndgan_private    AsynDGAN with private sites: the public start fine-tuned over mutual TLS by site processes
                        at the sites' privacy defaults (patient-level DP-SGD, epsilon 10), the server's anchor to
                        its start on (the last two rows: `private` in the settings)
Both GANs have the same generator, discriminator, steps and images per generator step; only where the data sits
differs. The generator recipe (gan.recipe, experiments/recipe.py) is every GAN's. Image quality per GAN: FID/KID against held-out real slices, SSIM/PSNR for the same label maps.

Every finished piece is kept in OUT and skipped when the same command runs again (settings.json records the
settings; another preset or seed in the same OUT is refused). Report and figures: synthetic_learning_report.py.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import (GuardConfig, Image2DConfig, LossConfig, ModelConfig,
    OptimizerConfig, ScheduleConfig, ServerConfig, SiteFacingConfig, TrainConfig)
from asyndgan.common.errors import ConfigError
from asyndgan.demo_data.phantom import PhantomConfig, write_phantom
from asyndgan.demo_data.phantom.presets import phantom_config
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from asyndgan.experiments.runner import Cluster
from asyndgan.segmentation import (
    NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig,
)
from asyndgan.formats.datasets import open_dataset
from asyndgan.experiments.pieces import (
    ExperimentConfig, piece_timer, check_settings, kept_or_reset, require_checkpoint, write_json, written_once,
)
from asyndgan.experiments.recipe import SHIPPED, GANRecipe
from asyndgan.experiments.scoring import SeedScore, score_rows

log = logging.getLogger(__name__)
Preset = Literal["smoke", "cpu", "gpu"]
GANS = ("syn_all", "asyndgan")
PRIVATE_GANS = ("public_start", "asyndgan_private")


PhantomPreset = Literal["default", "heterogeneous"]
# Sites and test cases per experiment preset on the heterogeneous phantom (four sites of equal size, each its own
# lesion type, population and scanner; test patients from all four in turn).
HETEROGENEOUS_SIZES = {"smoke": ([2, 2, 2, 2], 4), "cpu": ([10, 10, 10, 10], 40), "gpu": ([30, 30, 30, 30], 40)}


class PhantomSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cases_per_site: list[int]  # uneven on purpose: the smallest site is the one augmented
    test_cases: int = Field(ge=1)
    shape: tuple[int, int, int] = (240, 240, 155)
    preset: PhantomPreset = Field("default", description="the phantom layout (asyndgan data phantom --preset)")

    def layout(self, seed: int) -> PhantomConfig:
        return phantom_config(self.preset, seed=seed, cases_per_site=self.cases_per_site,
                              test_cases=self.test_cases, shape=self.shape)

    def on(self, preset: PhantomPreset, experiment_preset: str) -> "PhantomSection":
        """This section on another phantom layout (the heterogeneous one has its own site count and sizes)."""
        if preset == "default":
            return self
        counts, tests = HETEROGENEOUS_SIZES[experiment_preset]
        return self.model_copy(update={"preset": preset, "cases_per_site": counts, "test_cases": tests})


class GANSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int
    ngf: int
    n_blocks: int
    ndf: int
    d_layers: int = 3
    steps: int = Field(ge=1)
    batch_per_site: int = Field(ge=1, description="AsynDGAN: per site per step; Syn-All draws sites x this")
    lr: float = 2e-4
    lambda_l1: float = 100.0
    timeout_s: float = 7200
    recipe: GANRecipe = Field(default_factory=GANRecipe, description="generator, discriminator, averaging, "
                              "augmentation, healthy slices, samples per label map (default: the papers')")


class PrivateSection(BaseModel):
    """The rows with private sites. Private sites cannot learn from scratch at a useful epsilon; the system's way
    is a public start: a generator and discriminators pretrained on public data (here a phantom cohort drawn with
    another seed), which the sites then fine-tune under DP-SGD while the server anchors the generator to its start.
    Every privacy setting is the site's default, as a site that just joins would run."""

    model_config = ConfigDict(extra="forbid")
    public_cases: int = Field(ge=1, description="cases of the public cohort")
    pretrain_steps: int = Field(ge=1, description="generator steps on the public cohort (L1 on: public data)")
    finetune_steps: int = Field(ge=1, description="generator steps with the private sites")


class SyntheticLearningConfig(ExperimentConfig):
    phantom: PhantomSection
    gan: GANSection
    segmentation: SegmentationRecipe
    segmentation_seeds: int = Field(3, ge=1, description="segmentation models per row (seed, seed+1, ...)")
    private: PrivateSection | None = Field(None, description="also the rows with private sites (None: not run)")
    fid_images: int = Field(ge=2, description="held-out real slices (and as many synthetic ones) for FID/KID")
    device: str = "cpu"
    threads: int = Field(2, ge=1)


def preset_config(preset: Preset, out: pathlib.Path, seed: int = 0,
                  phantom: PhantomPreset = "default") -> SyntheticLearningConfig:
    cfg = _preset_config(preset, out, seed)
    return cfg.model_copy(update={"phantom": cfg.phantom.on(phantom, preset)})


def _preset_config(preset: Preset, out: pathlib.Path, seed: int = 0) -> SyntheticLearningConfig:
    """The three presets. smoke: the plumbing in under 2 minutes; cpu: meaningful numbers on a 2-core machine
    in about 3.5 hours (the last run without the private rows took 2.2; 30+ test patients, 3 seeds per row,
    thousands of generator steps); gpu: the papers' settings (256 px, ResNet-9 generator)."""
    if preset == "smoke":
        return SyntheticLearningConfig(
            preset=preset, out=out, seed=seed,
            phantom=PhantomSection(cases_per_site=[3, 2, 1], test_cases=3, shape=(64, 64, 40)),
            gan=GANSection(image_size=32, ngf=8, n_blocks=1, ndf=8, d_layers=2, steps=6, batch_per_site=2,
                           timeout_s=300, recipe=SHIPPED),
            segmentation=SegmentationRecipe(
                preprocessing=Preprocessing(image_size=32), network=NetworkConfig(channels=[8, 16, 32],
                                                                                  num_res_units=1),
                training=TrainingConfig(steps=8, batch_size=8)),
            segmentation_seeds=2, fid_images=6,
            private=PrivateSection(public_cases=2, pretrain_steps=6, finetune_steps=4))
    if preset == "cpu":
        return SyntheticLearningConfig(
            preset=preset, out=out, seed=seed,
            phantom=PhantomSection(cases_per_site=[12, 6, 3], test_cases=30),
            # the demo's generator (64 px, ResNet-6, 32 filters); 2000 steps is ~10 min per GAN on this machine
            gan=GANSection(image_size=64, ngf=32, n_blocks=6, ndf=32, steps=2000, batch_per_site=4, recipe=SHIPPED),
            # the segmentation package's default net; 1000 steps (~1.5 min a model) so 8 rows x 3 seeds fit
            segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=64),
                                            training=TrainingConfig(steps=1000, batch_size=16)),
            segmentation_seeds=3, fid_images=200,
            # the public start as long as the other GANs; the fine-tune as privacy-utility measured it
            private=PrivateSection(public_cases=20, pretrain_steps=2000, finetune_steps=300))
    return SyntheticLearningConfig(
        preset=preset, out=out, seed=seed,
        phantom=PhantomSection(cases_per_site=[30, 15, 8], test_cases=42),
        gan=GANSection(image_size=256, ngf=64, n_blocks=9, ndf=64, steps=20000, batch_per_site=4, timeout_s=36000,
                       recipe=SHIPPED),
        segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=128),
                                        network=NetworkConfig(channels=[32, 64, 128, 256, 512]),
                                        training=TrainingConfig(steps=4000, batch_size=16)),
        segmentation_seeds=3, fid_images=1000, device="cuda",
        private=PrivateSection(public_cases=60, pretrain_steps=20000, finetune_steps=3000))


# ---- pieces, each kept in OUT and skipped when done --------------------------------------------------------
def prepare_compute(cfg) -> None:
    """Torch threads, and the preset's device checked: the gpu preset without a GPU is one line now, not a
    traceback an hour later."""
    from asyndgan.common.devices import resolve_device

    torch.set_num_threads(cfg.threads)
    try:
        resolve_device(cfg.device)
    except ConfigError:
        raise ConfigError(f"--preset {cfg.preset} computes on {cfg.device}, which torch cannot use on this "
                          "machine (use --preset cpu)") from None


def make_phantom(cfg: SyntheticLearningConfig) -> tuple[list[pathlib.Path], pathlib.Path]:
    """(site folders, test folder); the phantom is written once (a marker file says it is complete)."""
    layout = cfg.phantom.layout(cfg.seed)
    root = written_once(cfg.out / "phantom", lambda folder: write_phantom(folder, layout))
    return [root / name for name in layout.site_names], root / "test"


@dataclass
class PooledStart:
    """What an experiment over one GAN per (variant, seed) on this phantom starts with."""

    timings: dict
    timed: Callable
    sites: list[pathlib.Path]
    test_dir: pathlib.Path
    pooled: pathlib.Path
    gan_seeds: list[int]
    segmentation_seeds: list[int]


def start_pooled(cfg, choose: tuple[str, ...] = (), added: tuple[str, ...] = ()) -> PooledStart:
    """Threads and device checked, settings checked against OUT, the phantom written (once), its sites pooled, the
    GAN and segmentation seeds: cfg.seed, cfg.seed + 1, ... `choose`: settings that pick which pieces run (a
    subset, or pieces added later), not how: another choice resumes the same OUT. `added`: settings the
    experiment gained after runs were made (check_settings)."""
    prepare_compute(cfg)
    check_settings(cfg, added=added, exclude=choose)
    timings, timed = piece_timer(cfg.out / "timings.json")
    sites, test_dir = timed("phantom", make_phantom, cfg)
    return PooledStart(timings, timed, sites, test_dir, pooled_tree(sites, cfg.out / "pooled"),
                       [cfg.seed + k for k in range(cfg.gan_seeds)],
                       [cfg.seed + k for k in range(cfg.segmentation_seeds)])


def pooled_tree(sites: list[pathlib.Path], folder: pathlib.Path) -> pathlib.Path:
    """One BraTS tree holding every site's cases (symbolic links): Syn-All's single site, and the label maps the
    synthetic training sets are generated from."""
    folder.mkdir(parents=True, exist_ok=True)
    for site in sites:
        for case in sorted(p for p in site.iterdir() if p.is_dir()):
            link, target = folder / case.name, case.resolve()
            if link.is_symlink() and link.resolve() == target:
                continue
            link.unlink(missing_ok=True)  # a link left by a run whose data was elsewhere
            try:
                os.symlink(target, link)
            except FileExistsError:  # another process of the command made it just now (the same link)
                pass
    return folder


def server_config(cfg: SyntheticLearningConfig, run_dir: pathlib.Path, min_sites: int, batch: int) -> ServerConfig:
    g = cfg.gan
    opt = OptimizerConfig(lr=g.lr)
    scfg = ServerConfig(
        host="127.0.0.1", port=0, run_dir=run_dir, device=cfg.device, checkpoint_every=max(1, g.steps // 4),
        sample_every=max(1, g.steps // 8), g_optim=opt,
        # the experiment's own sites: the papers' weighting, no guard (as when the committed reports were made)
        train=TrainConfig(batch_size=batch, sampling="balance", min_sites=min_sites, step_deadline_s=300,
                          seed=cfg.seed, guard=GuardConfig.off()),
        site=SiteFacingConfig(
            model=ModelConfig(family="image2d", image2d=Image2DConfig(
                image_size=g.image_size, ngf=g.ngf, n_blocks=g.n_blocks, ndf=g.ndf, d_layers=g.d_layers)),
            d_optim=opt, loss=LossConfig(lambda_l1=g.lambda_l1), schedule=ScheduleConfig(steps=g.steps),
            seed=cfg.seed),
    )
    g.recipe.apply(scfg)
    return scfg


def train_syn_all(cfg: SyntheticLearningConfig, pooled: pathlib.Path, n_sites: int) -> pathlib.Path:
    """One GAN, one discriminator on every real case pooled, in this process. It draws as many images per
    generator step as AsynDGAN's sites together, so both see the same number of images."""
    run_dir = cfg.out / "gan" / "syn_all"
    if done := kept_or_reset(run_dir, cfg.gan.steps):
        return done
    scfg = server_config(cfg, run_dir, 1, cfg.gan.batch_per_site * n_sites)
    prep = cfg.gan.recipe.prep(cfg.out / "cache")
    session = LocalSession("pooled", open_dataset(pooled, scfg.site, prep), scfg.site, device=cfg.device)
    started = time.monotonic()
    trainer = Trainer(scfg, LocalRegistry([session]), CountingBank([session]), run_dir)
    trainer.run(threading.Event())
    log.info("syn_all: %d steps in %.0f s", cfg.gan.steps, time.monotonic() - started)
    return require_checkpoint(run_dir, cfg.gan.steps)


def train_asyndgan(cfg: SyntheticLearningConfig, sites: list[pathlib.Path]) -> pathlib.Path:
    """The real system: a server process and one site process per site folder, over mutual TLS."""
    run_dir = cfg.out / "gan" / "asyndgan"
    if done := kept_or_reset(run_dir, cfg.gan.steps):
        return done
    scfg = server_config(cfg, run_dir, len(sites), cfg.gan.batch_per_site)
    started = time.monotonic()
    # the papers' algorithm: privacy off (lambda_L1 > 0 is refused by private sites)
    run_cluster(cfg, scfg, sites, "asyndgan", privacy=False)
    log.info("asyndgan over gRPC with mutual TLS: %d steps in %.0f s", cfg.gan.steps, time.monotonic() - started)
    return require_checkpoint(run_dir, cfg.gan.steps)


def run_cluster(cfg: SyntheticLearningConfig, scfg: ServerConfig, sites: list[pathlib.Path], desc: str,
                privacy: bool | None) -> None:
    """A server process and one `asyndgan-site join` per site folder over mutual TLS, until the run ends.
    privacy: None keeps the sites' default (on)."""
    cluster = Cluster(scfg, threads=1, tls=True)
    try:
        cluster.start_server()
        for i, folder in enumerate(sites):
            cluster.start_site(f"site{i + 1}", folder, extra=["--set", f"prep.cache_dir={cfg.out / 'cache'}",
                                                                "--device", cfg.device, *cfg.gan.recipe.site_options()],
                               privacy=privacy)
        cluster.follow(scfg.site.schedule.steps, desc=desc)
        cluster.wait(cfg.gan.timeout_s)
    finally:
        cluster.stop()


def make_public(cfg: SyntheticLearningConfig) -> pathlib.Path:
    """The public cohort's one folder (written once): the `public` phantom preset, its own random streams."""
    root, done = cfg.out / "phantom_public", cfg.out / "phantom_public.done"
    layout = phantom_config("public", seed=cfg.seed, shape=cfg.phantom.shape,
                            cases_per_site=[cfg.private.public_cases])
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_phantom(root, layout)
        done.write_text("complete\n")
    return root / layout.site_names[0]


def train_public_start(cfg: SyntheticLearningConfig, public: pathlib.Path, n_sites: int) -> pathlib.Path:
    """The public start: the recipe's GAN on the public cohort, in this process, as `asyndgan-server pretrain`
    makes it (the L1 term on: the data is public). Returns the pretraining folder (kept when finished)."""
    from asyndgan.simulation.pretrain import pretrain

    steps = cfg.private.pretrain_steps
    scfg = server_config(cfg.model_copy(update={"gan": cfg.gan.model_copy(update={"steps": steps})}),
                         cfg.out / "gan" / "public_start", 1, cfg.gan.batch_per_site * n_sites)
    scfg.tensorboard = False
    return pretrain(scfg, public, cfg.gan.recipe.prep(cfg.out / "cache"))


def train_private(cfg: SyntheticLearningConfig, sites: list[pathlib.Path], start: pathlib.Path) -> pathlib.Path:
    """AsynDGAN with private sites: `asyndgan-server start --init <public start>` and one `asyndgan-site join`
    per site with every privacy setting at its default, over mutual TLS. The L1 term is off (it compares with
    real images; private sites refuse it); the anchor to the public start is the server's default with one."""
    from asyndgan.common.config import PrivacyConfig
    from asyndgan.site_agent.privacy import PrivacyLedger, ledger_path

    steps = cfg.private.finetune_steps
    run_dir = cfg.out / "gan" / "asyndgan_private"
    record = run_dir / "privacy.json"
    if (done := kept_or_reset(run_dir, steps)) and record.is_file():
        return done
    shutil.rmtree(run_dir, ignore_errors=True)  # a cut run's ledgers go with it: the run starts again
    gan = cfg.gan.model_copy(update={"steps": steps, "lambda_l1": 0.0})
    scfg = server_config(cfg.model_copy(update={"gan": gan}), run_dir, len(sites), cfg.gan.batch_per_site)
    scfg.init = start
    started = time.monotonic()
    run_cluster(cfg, scfg, sites, "asyndgan_private", privacy=None)
    spent = {}
    for i in range(len(sites)):
        site = f"site{i + 1}"
        ledger = PrivacyLedger(ledger_path(run_dir / "site_state", site), site, PrivacyConfig())  # the defaults
        spent[site] = {"epsilon": ledger.epsilon_spent, "delta": ledger.privacy.delta, "ledger": str(ledger.path)}
    write_json(record, {"steps": steps, "seconds": round(time.monotonic() - started, 1), "sites": spent})
    log.info("asyndgan with private sites over mutual TLS: %d steps in %.0f s", steps, time.monotonic() - started)
    return require_checkpoint(run_dir, steps)


def _public_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    from asyndgan.formats import public_start

    record, _ = public_start.read_folder(folder)
    return folder / record["checkpoint"]


def synthetic_set(cfg: SyntheticLearningConfig, checkpoint: pathlib.Path, label_maps: pathlib.Path,
                  out: pathlib.Path, samples: int = 1) -> pathlib.Path:
    """Whole synthetic BraTS cases, `samples` for every case of `label_maps` (synthesis resumes a partial
    output)."""
    from asyndgan.synthesis.generate import GenerateConfig, run

    run(GenerateConfig(checkpoint=checkpoint, out=out, label_maps=label_maps, device=cfg.device, batch_size=32,
                       samples=samples))
    return out


def rows(sites: list[pathlib.Path], synthetic: dict[str, pathlib.Path] | None, sizes: list[int]) -> dict[str, list]:
    """Row name -> the training trees it pools (the real rows only while `synthetic` is None)."""
    smallest = min(range(len(sites)), key=lambda i: (sizes[i], i))
    out = {"real_all": list(sites)}
    out.update({f"real_site{i + 1}": [s] for i, s in enumerate(sites)})
    if synthetic is not None:
        out.update({"syn_all": [synthetic["syn_all"]], "asyndgan": [synthetic["asyndgan"]],
                    f"asyndgan+site{smallest + 1}": [synthetic["asyndgan"], sites[smallest]]})
        out.update({gan: [synthetic[gan]] for gan in PRIVATE_GANS if gan in synthetic})
    return out


def segment_rows(cfg: SyntheticLearningConfig, table: dict[str, list[pathlib.Path]],
                 test_dir: pathlib.Path, recipes: dict[str, SegmentationRecipe] | None = None
                 ) -> dict[str, list[SeedScore]]:
    """Row -> one score per segmentation seed; models and evaluations are kept in OUT/segmentation/<row>/seed<s>/
    and reused. `recipes`: a row's own recipe where it reads its training trees differently (e.g. zero-filled
    missing modalities); the test cases are read with cfg.segmentation's."""
    return score_rows(cfg.out / "segmentation", table, cfg.segmentation,
                      [cfg.seed + k for k in range(cfg.segmentation_seeds)], test_dir, cfg.device, recipes=recipes,
                      progress=True)


def run(cfg: SyntheticLearningConfig) -> dict:
    from asyndgan.experiments import synthetic_learning_report as report

    prepare_compute(cfg)
    check_settings(cfg, added=("private",))
    timings, timed = piece_timer(cfg.out / "timings.json")

    log.info("[1/7] phantom: %s training cases per site, %d test cases", cfg.phantom.cases_per_site,
             cfg.phantom.test_cases)
    sites, test_dir = timed("phantom", make_phantom, cfg)
    pooled = pooled_tree(sites, cfg.out / "pooled")
    # The real rows first: they need no GAN, and an interrupted run has the baselines to show.
    log.info("[2/7] segmentation on real data: %d seed(s) per row, scored on the real test cases",
             cfg.segmentation_seeds)
    timed("segmentation_real", segment_rows, cfg, rows(sites, None, cfg.phantom.cases_per_site), test_dir)
    log.info("[3/7] Syn-All: one GAN on the pooled real cases, in this process")
    checkpoints = {"syn_all": timed("gan_syn_all", train_syn_all, cfg, pooled, len(sites))}
    log.info("[4/7] AsynDGAN: a server and %d site processes over mutual TLS", len(sites))
    checkpoints["asyndgan"] = timed("gan_asyndgan", train_asyndgan, cfg, sites)
    if cfg.private is not None:
        log.info("[4/7] private sites: a public start on a public cohort, then %d site processes at their privacy "
                 "defaults over mutual TLS", len(sites))
        public = timed("phantom_public", make_public, cfg)
        start = timed("gan_public_start", train_public_start, cfg, public, len(sites))
        checkpoints["public_start"] = _public_checkpoint(start)
        checkpoints["asyndgan_private"] = timed("gan_asyndgan_private", train_private, cfg, sites, start)
    log.info("[5/7] synthetic data sets from the training cases' label maps (and the test cases', for image "
             "quality only)")
    synthetic, synthetic_test = {}, {}
    for gan in checkpoints:
        synthetic[gan] = timed(f"generate_{gan}", synthetic_set, cfg, checkpoints[gan], pooled,
                               cfg.out / "synthetic" / gan / "train", cfg.gan.recipe.samples)
        synthetic_test[gan] = timed(f"generate_{gan}", synthetic_set, cfg, checkpoints[gan], test_dir,
                                    cfg.out / "synthetic" / gan / "test")
    log.info("[6/7] image quality (FID/KID, SSIM/PSNR)")
    quality = timed("image_quality", report.image_quality, cfg, test_dir, synthetic_test)
    log.info("[7/7] segmentation on synthetic data")
    table = rows(sites, synthetic, cfg.phantom.cases_per_site)
    evals = timed("segmentation_synthetic", segment_rows, cfg, table, test_dir)
    wall = round(sum(timings.values()), 1)
    results = report.write_all(cfg, table, evals, quality, timings, wall, test_dir, synthetic_test)
    log.info("synthetic learning (%s, seed %d) done; %.0f s of work in all; report %s", cfg.preset, cfg.seed, wall,
             cfg.out / "report.md")
    return results
