"""The bandwidth benchmark's settings and presets (experiments/bandwidth.py runs it)."""

from __future__ import annotations

import logging
import pathlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from asyndgan.common.errors import ConfigError
from asyndgan.experiments.synthetic_learning import GANSection, PhantomPreset, PhantomSection, server_config
from asyndgan.segmentation import NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig

from asyndgan.experiments.pieces import ExperimentConfig

log = logging.getLogger(__name__)
Preset = Literal["smoke", "cpu", "gpu"]


ENCODINGS = ("float32/full", "float16/full", "q8/full", "q8/brain")


class LinkProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    up_mbit: float = Field(gt=0, description="site -> server")
    down_mbit: float = Field(gt=0, description="server -> site")
    rtt_ms: float = Field(ge=0)


HOSPITAL_LINKS = [LinkProfile(name="hospital-dsl", up_mbit=20, down_mbit=100, rtt_ms=40),
                  LinkProfile(name="metro-fibre", up_mbit=100, down_mbit=100, rtt_ms=10)]


class FlowerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fedavg_rounds: int = Field(ge=1)
    local_steps: int = Field(ge=1, description="FedAvg: optimiser steps per site per round")
    cwt_cycles: int = Field(ge=1)
    cwt_local_steps: int = Field(ge=1, description="cyclical weight transfer: steps per site visit")
    proportional: bool = Field(False, description="cwt: steps proportional to each site's slices (Balachandar)")
    swt_local_steps: int = Field(ge=1, description="single weight transfer: steps per site, one pass")
    save_every: int = Field(1, ge=1)
    methods: list[Literal["fedavg", "cwt", "swt"]] = Field(default_factory=lambda: ["fedavg", "cwt", "swt"])
    timeout_s: float = 3600


class BandwidthConfig(ExperimentConfig):
    phantom: PhantomSection
    gan: GANSection
    encodings: list[str] = Field(default_factory=lambda: list(ENCODINGS))
    dice_encodings: list[str] | None = Field(None, description="encodings whose GAN is trained to the end for its "
                                             "Dice (default: all); bytes are measured for every encoding")
    wire_steps: int = Field(ge=4, description="steps of each real-socket AsynDGAN run (bytes per step are "
                            "constant; Dice comes from the full in-process run)")
    flower: FlowerSection
    ensemble_steps: int = Field(ge=1)
    segmentation: SegmentationRecipe
    segmentation_seeds: int = Field(1, ge=1)
    target_fraction: float = Field(0.9, gt=0, le=1, description="target Dice: this fraction of Real-All's")
    profiles: list[LinkProfile] = Field(default_factory=lambda: list(HOSPITAL_LINKS))
    link_steps: int = Field(ge=2, description="AsynDGAN steps measured on each emulated link")
    link_encoding: str = Field("q8/full", description="the AsynDGAN encoding measured on the emulated links")
    link_rounds: int = Field(ge=0, description="FedAvg rounds measured on each emulated link (0: its time on the "
                             "link is modelled from its measured bytes and loopback rounds)")
    larger_network: NetworkConfig | None = Field(
        None, description="the model-size regime, measured: a second, larger segmentation network trained on "
        "all real data (its target), on the synthetic data of the generator already trained (no more GAN bytes) "
        "and by FedAvg on Flower; None leaves it out")
    larger_rounds: int = Field(15, ge=1, description="FedAvg rounds for the larger network")
    device: str = "cpu"
    threads: int = Field(2, ge=1)


def preset_config(preset: Preset, out: pathlib.Path, seed: int = 0,
                  phantom: PhantomPreset = "default") -> BandwidthConfig:
    cfg = _preset_config(preset, out, seed)
    return cfg.model_copy(update={"phantom": cfg.phantom.on(phantom, preset)})


def _preset_config(preset: Preset, out: pathlib.Path, seed: int = 0) -> BandwidthConfig:
    """smoke: the plumbing, Flower included, in under 2 minutes; cpu: meaningful numbers on 2 cores; gpu: the
    papers' image size and networks."""
    if preset == "smoke":
        return BandwidthConfig(
            preset=preset, out=out, seed=seed,
            phantom=PhantomSection(cases_per_site=[2, 2, 1], test_cases=2, shape=(64, 64, 40)),
            gan=GANSection(image_size=32, ngf=8, n_blocks=1, ndf=8, d_layers=2, steps=6, batch_per_site=2,
                           timeout_s=300),
            encodings=["float32/full", "q8/brain"], wire_steps=6, link_encoding="q8/brain",
            # each Flower method is a run of its own costing about 40 s (a process per site and round): the smoke
            # run measures FedAvg only; cyclical and single weight transfer are the cpu preset's
            flower=FlowerSection(fedavg_rounds=1, local_steps=2, cwt_cycles=1, cwt_local_steps=2, swt_local_steps=2,
                                 methods=["fedavg"], timeout_s=300),
            ensemble_steps=4,
            segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=32),
                                            network=NetworkConfig(channels=[8, 16, 32], num_res_units=1),
                                            training=TrainingConfig(steps=8, batch_size=8)),
            # FedAvg's link time modelled, not measured: another federation would cost 40 s (the cpu preset
            # measures it)
            profiles=HOSPITAL_LINKS[:1], link_steps=4, link_rounds=0)
    if preset == "cpu":
        return BandwidthConfig(
            preset=preset, out=out, seed=seed,
            phantom=PhantomSection(cases_per_site=[12, 6, 3], test_cases=30, shape=(160, 160, 100)),
            gan=GANSection(image_size=64, ngf=32, n_blocks=6, ndf=32, steps=1500, batch_per_site=4),
            wire_steps=60,
            # float16 halves the bytes exactly and rounds far less than q8: its Dice is not worth 16 minutes here
            dice_encodings=["float32/full", "q8/full", "q8/brain"],
            # 1000 centralised steps is the recipe; FedAvg gets 30 rounds x 40 local steps per site (1200 steps
            # of progress, 3600 site-steps), cyclical transfer 3 cycles x 120 steps per visit (1080)
            flower=FlowerSection(fedavg_rounds=30, local_steps=40, cwt_cycles=3, cwt_local_steps=120,
                                 swt_local_steps=330, save_every=3),
            ensemble_steps=1000,
            segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=64),
                                            training=TrainingConfig(steps=1000, batch_size=16)),
            segmentation_seeds=1, link_steps=30, link_rounds=2,
            larger_network=NetworkConfig(channels=[32, 64, 128, 256, 512]), larger_rounds=15)
    return BandwidthConfig(
        preset=preset, out=out, seed=seed,
        phantom=PhantomSection(cases_per_site=[30, 15, 8], test_cases=42),
        gan=GANSection(image_size=256, ngf=64, n_blocks=9, ndf=64, steps=20000, batch_per_site=4, timeout_s=36000),
        wire_steps=100,
        flower=FlowerSection(fedavg_rounds=100, local_steps=40, cwt_cycles=10, cwt_local_steps=150,
                             swt_local_steps=1300, save_every=5, timeout_s=36000),
        ensemble_steps=4000,
        segmentation=SegmentationRecipe(preprocessing=Preprocessing(image_size=128),
                                        network=NetworkConfig(channels=[32, 64, 128, 256, 512]),
                                        training=TrainingConfig(steps=4000, batch_size=16)),
        segmentation_seeds=1, link_steps=50, link_rounds=2, device="cuda")


def _split(encoding: str) -> tuple[str, str]:
    dtype, _, region = encoding.partition("/")
    from asyndgan.common.tensor_codec import FLOAT_WIRE_DTYPES, WIRE_REGIONS

    if dtype not in FLOAT_WIRE_DTYPES or region not in WIRE_REGIONS:
        raise ConfigError(f"encoding {encoding!r}: write DTYPE/REGION with DTYPE one of {', '.join(FLOAT_WIRE_DTYPES)}"
                          f" and REGION one of {', '.join(WIRE_REGIONS)}")
    return dtype, region


def _slug(encoding: str) -> str:
    return encoding.replace("/", "-")


def _wire_config(cfg: BandwidthConfig, run_dir: pathlib.Path, encoding: str, steps: int, n: int):
    dtype, region = _split(encoding)
    scfg = server_config(cfg, run_dir, n, cfg.gan.batch_per_site)
    site = scfg.site.model_copy(update={"schedule": scfg.site.schedule.model_copy(update={"steps": steps})})
    return scfg.model_copy(update={
        "train": scfg.train.model_copy(update={"wire_dtype": dtype, "wire_region": region}), "site": site,
        "checkpoint_every": max(1, steps // 4) if steps == cfg.gan.steps else 10**9,
        "sample_every": max(1, steps // 8) if steps == cfg.gan.steps else 10**9})


def quantiles(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values, float)
    return {"count": len(a), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "histogram": _log_histogram(a)}


def _log_histogram(a: np.ndarray) -> dict:
    edges = 2.0 ** np.arange(6, 31)
    counts, _ = np.histogram(a, bins=np.concatenate([[0], edges]))
    return {"upper_bytes": [int(e) for e in edges], "counts": [int(c) for c in counts]}
