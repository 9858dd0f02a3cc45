"""The missing-modality experiment (the DSL paper's Table 4 on the phantom): hospitals that scan different MRI
sequences, one generator that learns every modality, and completion of what a site lacks.

The phantom is written once with every modality; the heterogeneous sites are views of it (per-file links) that
leave out one modality each (`missing`, default the DSL setting: site1 no t2, site2 no flair, site3 no t1ce), so
the dropped files are the held-out truth for completion. Rows, every one trained with the same segmentation
recipe and scored on the same real test cases (which keep all four modalities):
    real_all              every site's real cases with all modalities, pooled (upper bound)
    hetero_real           the heterogeneous sites' real cases, missing modalities zero-filled, pooled
    hetero_asyndgan       synthetic cases from a generator trained against the heterogeneous sites
    completed_labels      the heterogeneous sites' real cases completed by `asyndgan complete --method labels`
    completed_translate   the same with `--method translate`
    homo_asyndgan         synthetic cases from a generator trained with every modality at every site
Both generators have the same networks, steps and images per step; synthetic training sets are generated from
the training sites' own segmentations. Completion fidelity: PSNR, SSIM and MAE inside the brain against the
dropped files, per modality and method. Every finished piece is kept in OUT and skipped when the same command
runs again; another preset or seed in the same OUT is refused.

GANs run as real processes (a server and one site process per site, mutual TLS) with `gan.distributed`, else
with the same site code in this process (simulation/local_sites.py, what the Syn-All row of synthetic learning
uses): on a 2-core machine four processes take 2.4x as long per step for the same arithmetic, and the
equivalence of both paths is tested (tests/test_distributed_equivalence.py).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Literal

import numpy as np
from pydantic import Field

from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import BRATS_MODALITIES
from asyndgan.common.errors import ConfigError
from asyndgan.demo_data.phantom import write_phantom
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from asyndgan.experiments.runner import Cluster
from asyndgan.experiments.synthetic_learning import (
    GANSection, PhantomPreset, PhantomSection, pooled_tree, prepare_compute, segment_rows, server_config, synthetic_set,
)
from asyndgan.segmentation import NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig
from asyndgan.formats import brats
from asyndgan.formats.datasets import open_dataset
from asyndgan.synthesis.translation import TranslateConfig
from asyndgan.experiments.pieces import (
    ExperimentConfig, write_json, piece_timer, check_settings, kept_or_reset, require_checkpoint,
)

log = logging.getLogger(__name__)
Preset = Literal["smoke", "cpu", "gpu"]
DSL_MISSING = {"site1": ["t2"], "site2": ["flair"], "site3": ["t1ce"]}
METHODS = ("labels", "translate")
ROWS = ("real_all", "hetero_real", "hetero_asyndgan", "completed_labels", "completed_translate", "homo_asyndgan")


class MissingModalityConfig(ExperimentConfig):
    phantom: PhantomSection
    missing: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DSL_MISSING.items()})
    gan: GANSection
    distributed: bool = Field(True, description="GANs as real server and site processes (else in this process)")
    translate: TranslateConfig
    segmentation: SegmentationRecipe
    segmentation_seeds: int = Field(3, ge=1)
    device: str = "cpu"
    threads: int = Field(2, ge=1)


def preset_config(preset: Preset, out: pathlib.Path, seed: int = 0,
                  phantom: PhantomPreset = "default") -> MissingModalityConfig:
    cfg = _preset_config(preset, out, seed)
    return cfg.model_copy(update={"phantom": cfg.phantom.on(phantom, preset)})


def _preset_config(preset: Preset, out: pathlib.Path, seed: int = 0) -> MissingModalityConfig:
    """smoke: the plumbing in about half a minute; cpu: meaningful numbers on 2 cores in about 90 minutes; gpu: the
    papers' sizes. Every preset trains its GANs with real server and site processes over mutual TLS."""
    if preset == "smoke":
        return MissingModalityConfig(
            preset=preset, out=out, seed=seed,
            phantom=PhantomSection(cases_per_site=[2, 2, 1], test_cases=2, shape=(64, 64, 40)),
            gan=GANSection(image_size=32, ngf=8, n_blocks=1, ndf=8, d_layers=2, steps=6, batch_per_site=2,
                           lambda_l1=100.0, timeout_s=300),
            distributed=True,
            translate=TranslateConfig(steps=5, batch_size=4, channels=[8, 16]),
            segmentation=SegmentationRecipe(
                preprocessing=Preprocessing(image_size=32),
                network=NetworkConfig(channels=[8, 16, 32], num_res_units=1),
                training=TrainingConfig(steps=8, batch_size=8)),
            segmentation_seeds=1)
    if preset == "cpu":
        return MissingModalityConfig(
            preset=preset, out=out, seed=seed,
            # 160 x 160 x 100 voxels (the template resampled): every piece that reads or writes whole volumes is
            # about 3x cheaper than at BraTS size; slices still go to the networks at 64 px.
            phantom=PhantomSection(cases_per_site=[12, 6, 3], test_cases=30, shape=(160, 160, 100)),
            gan=GANSection(image_size=64, ngf=32, n_blocks=6, ndf=32, steps=1500, batch_per_site=4),
            distributed=True,
            translate=TranslateConfig(steps=1500, batch_size=16),
            segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=64),
                                            training=TrainingConfig(steps=1000, batch_size=16)),
            segmentation_seeds=3)
    return MissingModalityConfig(
        preset=preset, out=out, seed=seed,
        phantom=PhantomSection(cases_per_site=[30, 15, 8], test_cases=42),
        gan=GANSection(image_size=256, ngf=64, n_blocks=9, ndf=64, steps=20000, batch_per_site=4, timeout_s=36000),
        distributed=True,
        translate=TranslateConfig(steps=6000, batch_size=16, channels=[32, 64, 128, 256, 512]),
        segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=128),
                                        network=NetworkConfig(channels=[32, 64, 128, 256, 512]),
                                        training=TrainingConfig(steps=4000, batch_size=16)),
        segmentation_seeds=3, device="cuda")


# ---- data ---------------------------------------------------------------------------------------------------
def make_phantom(cfg: MissingModalityConfig) -> tuple[list[pathlib.Path], pathlib.Path]:
    """(full site folders, test folder): every modality, written once."""
    root, done = cfg.out / "phantom", cfg.out / "phantom.done"
    layout = cfg.phantom.layout(cfg.seed)
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_phantom(root, layout)
        done.write_text("complete\n")
    return [root / name for name in layout.site_names], root / "test"


def hetero_view(site: pathlib.Path, drop: list[str], folder: pathlib.Path) -> pathlib.Path:
    """A BraTS tree of `site` whose cases lack the modalities `drop` (every other file linked, not copied)."""
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    dropped = {f"_{m}.nii.gz" for m in drop}
    for case in sorted(p for p in site.iterdir() if p.is_dir()):
        (folder / case.name).mkdir(parents=True)
        for f in sorted(case.iterdir()):
            if not any(f.name.endswith(d) for d in dropped):
                os.symlink(f.resolve(), folder / case.name / f.name)
    (folder / ".complete").write_text("complete\n")
    return folder


# ---- GANs ---------------------------------------------------------------------------------------------------
def train_gan(cfg: MissingModalityConfig, name: str, sites: list[pathlib.Path]) -> pathlib.Path:
    """AsynDGAN against these sites (each holding what its files hold); the last checkpoint."""
    run_dir = cfg.out / "gan" / name
    if done := kept_or_reset(run_dir, cfg.gan.steps):
        return done
    scfg = server_config(cfg, run_dir, len(sites), cfg.gan.batch_per_site)
    started = time.monotonic()
    if cfg.distributed:
        cluster = Cluster(scfg, threads=1, tls=True)
        try:
            cluster.start_server()
            for i, folder in enumerate(sites):
                cluster.start_site(f"site{i + 1}", folder, extra=["--set", f"prep.cache_dir={cfg.out / 'cache'}",
                                                                    "--device", cfg.device,
                                                                    *cfg.gan.recipe.site_options()], privacy=False)
            cluster.follow(cfg.gan.steps, desc=name)
            cluster.wait(cfg.gan.timeout_s)
        finally:
            cluster.stop()
    else:
        prep = cfg.gan.recipe.prep(cfg.out / "cache")
        sessions = [LocalSession(f"site{i + 1}", open_dataset(f, scfg.site, prep), scfg.site, device=cfg.device)
                    for i, f in enumerate(sites)]
        for s in sessions:
            log.info("%s: %s holds %s (%d slices)", name, s.site_id, ", ".join(s.worker.modalities), s.num_samples)
        Trainer(scfg, LocalRegistry(sessions), CountingBank(sessions), run_dir).run(threading.Event())
    log.info("%s: %d steps in %.0f s", name, cfg.gan.steps, time.monotonic() - started)
    return require_checkpoint(run_dir, cfg.gan.steps)


# ---- completion ---------------------------------------------------------------------------------------------
def complete_sites(cfg: MissingModalityConfig, checkpoint: pathlib.Path, sites: list[pathlib.Path], method: str
                   ) -> tuple[list[pathlib.Path], dict]:
    """Each heterogeneous site completed by `asyndgan complete --method <method>` (as the site would run it)."""
    from asyndgan.synthesis.complete import CompleteConfig, run

    outs, info = [], {}
    for site in sites:
        out = cfg.out / "completed" / method / site.name
        done = out / ".complete.json"
        if done.is_file():
            info[site.name] = json.loads(done.read_text())
        else:
            summary = run(CompleteConfig(checkpoint=checkpoint, data=site, out=out, method=method,
                                         translate=cfg.translate.model_copy(update={"seed": cfg.seed}),
                                         device=cfg.device))
            info[site.name] = summary
            write_json(done, summary)
        outs.append(out)
    return outs, info


def fidelity(cfg: MissingModalityConfig, full_sites: list[pathlib.Path]) -> dict:
    """Per method and modality: PSNR, SSIM (inside the brain, per axial slice, averaged) and MAE (brain voxels),
    of the completed volume against the dropped real one, both normalised as the site normalises; mean and SD
    over cases."""
    from asyndgan.experiments.image_quality import paired_ssim_psnr

    path = cfg.out / "fidelity.json"
    if path.is_file():
        return json.loads(path.read_text())
    out: dict = {}
    for method in METHODS:
        for site in full_sites:
            for m in cfg.missing.get(site.name, []):
                for case in sorted(p for p in site.iterdir() if p.is_dir()):
                    raw = brats.read_volume(case / f"{case.name}_{m}.nii.gz")  # the dropped file: the truth
                    truth, brain = brats.normalise(raw, 0.5, 99.5), raw > 0
                    done = cfg.out / "completed" / method / site.name / case.name / f"{case.name}_{m}.nii.gz"
                    made = brats.normalise(brats.read_volume(done), 0.5, 99.5)
                    ssim, psnr = [], []
                    for z in range(brain.shape[2]):
                        if brain[..., z].sum() >= 50:
                            s, p = paired_ssim_psnr(truth[None, ..., z], made[None, ..., z], brain[..., z])
                            ssim.append(s)
                            psnr.append(p)
                    mae = float(np.abs(truth[brain] - made[brain]).mean())
                    out.setdefault(method, {}).setdefault(m, []).append(
                        {"case": case.name, "site": site.name, "psnr": float(np.mean(psnr)),
                         "ssim": float(np.mean(ssim)), "mae": mae})
    summary = {method: {m: {k: _mean_sd([r[k] for r in rows]) for k in ("psnr", "ssim", "mae")} | {"cases": len(rows)}
                        for m, rows in mods.items()} for method, mods in out.items()}
    result = {"summary": summary, "per_case": out}
    write_json(path, result)
    return result


def _mean_sd(values: list[float]) -> dict:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


# ---- the run ------------------------------------------------------------------------------------------------
def run(cfg: MissingModalityConfig) -> dict:
    from asyndgan.experiments import missing_modality_report as report

    prepare_compute(cfg)
    n = len(cfg.phantom.cases_per_site)
    unknown = [s for s in cfg.missing if s not in {f"site{i + 1}" for i in range(n)}]
    if unknown or any(m not in BRATS_MODALITIES for v in cfg.missing.values() for m in v):
        raise ConfigError(f"missing {cfg.missing} names sites or modalities the phantom does not have")
    check_settings(cfg)
    timings, timed = piece_timer(cfg.out / "timings.json")

    log.info("[1/7] phantom with every modality; heterogeneous views without %s", cfg.missing)
    full, test_dir = timed("phantom", make_phantom, cfg)
    hetero = [hetero_view(s, cfg.missing.get(s.name, []), cfg.out / "hetero" / s.name) for s in full]
    pooled = pooled_tree(full, cfg.out / "pooled")
    log.info("[2/7] segmentation on real data (all modalities; heterogeneous, zero-filled)")
    zero = cfg.segmentation.model_copy(update={"preprocessing": cfg.segmentation.preprocessing.model_copy(
        update={"missing": "zero"})})
    timed("segmentation_real", segment_rows, cfg, {"real_all": full, "hetero_real": hetero}, test_dir,
          {"hetero_real": zero})
    log.info("[3/7] AsynDGAN against the heterogeneous sites")
    ckpt = {"hetero": timed("gan_hetero", train_gan, cfg, "hetero", hetero)}
    log.info("[4/7] AsynDGAN with every modality at every site")
    ckpt["homo"] = timed("gan_homo", train_gan, cfg, "homo", full)
    log.info("[5/7] synthetic training sets, and completion of the heterogeneous sites (labels, translate)")
    synthetic = {g: timed(f"generate_{g}", synthetic_set, cfg, ckpt[g], pooled, cfg.out / "synthetic" / g)
                 for g in ("hetero", "homo")}
    completed, completion_info = {}, {}
    for method in METHODS:
        completed[method], completion_info[method] = timed(f"complete_{method}", complete_sites, cfg,
                                                           ckpt["hetero"], hetero, method)
    log.info("[6/7] completion fidelity against the dropped files")
    fid = timed("fidelity", fidelity, cfg, full)
    log.info("[7/7] segmentation on synthetic and completed data")
    table = {"real_all": full, "hetero_real": hetero, "hetero_asyndgan": [synthetic["hetero"]],
             "completed_labels": completed["labels"], "completed_translate": completed["translate"],
             "homo_asyndgan": [synthetic["homo"]]}
    evals = timed("segmentation_rest", segment_rows, cfg, table, test_dir, {"hetero_real": zero})
    results = report.write_all(cfg, table, evals, fid, completion_info, timings, full, hetero)
    log.info("missing modality (%s, seed %d) done; %.0f s of work; report %s", cfg.preset, cfg.seed,
             sum(timings.values()), cfg.out / "report.md")
    return results
