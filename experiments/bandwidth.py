"""The bandwidth benchmark: AsynDGAN (per wire encoding) against FedAvg, cyclical and single weight transfer (on
Flower) and ensembling, on the same phantom sites, segmentation recipe and real test cases; bytes on real sockets,
Dice, and wall time on emulated hospital links.

Pieces, each kept in OUT and skipped when the same command runs again (another preset or seed is refused):
    phantom, real_all        the sites, the test cases, and the pooled-real segmentation (the target Dice is
                             `target_fraction` of it)
    wire/<encoding>          AsynDGAN as real processes (server + one site process per site, mutual TLS), every
                             site dialling through a counting relay, for `wire_steps` steps: one-time bytes (join,
                             label maps) and bytes per step, message sizes, seconds per step
    gan/<encoding>           the GAN trained to the end with the same encode/decode code in one process (on 2
                             cores, 4 processes take ~2.4x as long for the same arithmetic); its synthetic data
                             set, segmented and scored -> the encoding's Dice
    flower/<method>          FedAvg, cyclical and single weight transfer of the segmentation U-Net on Flower's
                             deployment mode, each SuperNode behind a counting relay; the global model is scored
                             every `save_every` rounds -> Dice against cumulative bytes
    ensemble                 one model per site, trained locally, averaged; bytes modelled (one model per site)
    links/<profile>          `link_encoding` and FedAvg again with every site in its own network namespace
                             behind `tc tbf` rate limits and a delaying relay: seconds per step / round measured
                             on each link (needs root; otherwise modelled and said so)
Then report.md, results.json and the figures (experiments/bandwidth_report.py).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import threading
import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import DataPrepConfig
from asyndgan.common.errors import ConfigError
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from asyndgan.experiments.relay import DOWN, UP, Relay, Traffic
from asyndgan.experiments.runner import Cluster, piece_timer, write_json
from asyndgan.experiments.synthetic_learning import (
    GANSection, PhantomPreset, PhantomSection, _kept_or_reset, _require_checkpoint, check_settings, make_phantom, pooled_tree,
    prepare_compute, segment_rows, server_config, synthesise,
)
from asyndgan.segmentation import (
    NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig, build_network, evaluate_model,
    load_test_cases, load_training_slices, train_model,
)
from asyndgan.site_agent.datasets import open_dataset

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


class BandwidthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Preset
    out: pathlib.Path
    seed: int = Field(0, ge=0)
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
            # single weight transfer is one cycle of cyclical transfer: the smoke run leaves it out (40 s)
            flower=FlowerSection(fedavg_rounds=1, local_steps=2, cwt_cycles=1, cwt_local_steps=2, swt_local_steps=2,
                                 methods=["fedavg", "cwt"], timeout_s=300),
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


# ---- AsynDGAN bytes on real sockets ---------------------------------------------------------------------------
def _traffic_summary(traffic: list[Traffic], first: float, last: float, steps: int, seconds: float) -> dict:
    """Totals over the sites; recurring bytes per step between the ends of the first and the last step (relay
    times), one-time = everything else."""
    up = sum(t.up for t in traffic)
    down = sum(t.down for t in traffic)
    span = max(1, steps - 1)
    per_step = sum(t.total_at(last) - t.total_at(first) for t in traffic) / span
    up_per_step = sum(t.up_at(last) - t.up_at(first) for t in traffic) / span
    bursts = {d: sorted(b for t in traffic for b in t.bursts[d]) for d in (UP, DOWN)}
    return {
        "sites": len(traffic), "steps": steps, "seconds": seconds, "up": up, "down": down,
        "per_step": per_step, "one_time": max(0.0, up + down - per_step * steps),
        "per_step_per_site": per_step / len(traffic),
        "largest_message": {d: max(b, default=0) for d, b in bursts.items()},
        "message_sizes": {d: _quantiles(b) for d, b in bursts.items()},
        "up_per_step": up_per_step, "down_per_step": per_step - up_per_step,
    }


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values, float)
    return {"count": len(a), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "histogram": _log_histogram(a)}


def _log_histogram(a: np.ndarray) -> dict:
    edges = 2.0 ** np.arange(6, 31)
    counts, _ = np.histogram(a, bins=np.concatenate([[0], edges]))
    return {"upper_bytes": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def wire_run(cfg: BandwidthConfig, encoding: str, sites: list[pathlib.Path], steps: int, name: str,
             link: "LinkSet | None" = None) -> dict:
    """AsynDGAN as real processes for `steps` steps, each site through a counting (and, on a link, delaying)
    relay: what crossed the sockets."""
    path = cfg.out / name / "traffic.json"
    if path.is_file():
        return json.loads(path.read_text())
    run_dir = cfg.out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    scfg = _wire_config(cfg, run_dir / "run", encoding, steps, len(sites))
    hosts = ["localhost", "127.0.0.1", *(link.host_addresses if link else [])]
    _server_cert(scfg.run_dir / "certs", hosts)
    cluster = Cluster(scfg, threads=1, tls=True)
    relays: list[Relay] = []
    try:
        host, port = cluster.start_server().rsplit(":", 1)
        for i, folder in enumerate(sites):
            listen = (link.host_addresses[i], 0) if link else ("127.0.0.1", 0)
            relay = Relay((host, int(port)), listen=listen, delay_s=link.delay_s if link else 0.0)
            relays.append(relay)
            extra = ["--server", relay.address, "--set", f"prep.cache_dir={cfg.out / 'cache'}", "--device", cfg.device]
            cluster.start_site(f"site{i + 1}", folder, extra=extra, privacy=False,
                               prefix=link.prefix(i) if link else None)
        started = time.monotonic()
        cluster.wait(cfg.gan.timeout_s)
        seconds = time.monotonic() - started
    finally:
        cluster.stop()
        for r in relays:
            r.close()
    ends = step_end_times(scfg.run_dir / "tensorboard")
    if len(ends) < steps:
        raise ConfigError(f"the server logged {len(ends)} of {steps} steps in {scfg.run_dir / 'tensorboard'}")
    wall0 = relays[0].started_wall
    first, last = ends[1] - wall0, ends[steps] - wall0
    summary = _traffic_summary([r.traffic() for r in relays], first, last, steps, seconds)
    summary["seconds_per_step"] = (last - first) / max(1, steps - 1)
    summary["encoding"] = encoding
    write_json(path, summary)
    return summary


def step_end_times(tensorboard: pathlib.Path) -> dict[int, float]:
    """Step -> wall time the server finished it (its TensorBoard log, written right after each update)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.wall_time for e in acc.Scalars("speed/step_seconds")}


def _server_cert(certs: pathlib.Path, hosts: list[str]) -> None:
    from asyndgan.common import pki

    if not (certs / "ca.crt").exists():
        pki.init_ca(certs, "asyndgan bandwidth benchmark CA")
        pki.issue_server(certs, hosts)
        pki.issue_site(certs, "operator")


# ---- AsynDGAN Dice per encoding -------------------------------------------------------------------------------
def train_gan(cfg: BandwidthConfig, encoding: str, sites: list[pathlib.Path]) -> tuple[pathlib.Path, dict]:
    """The GAN trained to the end with the encoding's encode/decode on every batch and answer (in process)."""
    run_dir = cfg.out / "gan" / _slug(encoding)
    info_path = run_dir / "payload.json"
    if (done := _kept_or_reset(run_dir, cfg.gan.steps)) and info_path.is_file():
        return done, json.loads(info_path.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    dtype, _ = _split(encoding)
    scfg = _wire_config(cfg, run_dir, encoding, cfg.gan.steps, len(sites))
    prep = DataPrepConfig(cache_dir=cfg.out / "cache")
    sessions = [LocalSession(f"site{i + 1}", open_dataset(f, scfg.site, prep), scfg.site, device=cfg.device,
                             wire=dtype) for i, f in enumerate(sites)]
    started = time.monotonic()
    Trainer(scfg, LocalRegistry(sessions), CountingBank(sessions), run_dir).run(threading.Event())
    info = {"seconds": time.monotonic() - started, "payload_up": sum(s.payload[0] for s in sessions),
            "payload_down": sum(s.payload[1] for s in sessions),
            "slices": {s.site_id: s.num_samples for s in sessions}}
    write_json(info_path, info)
    log.info("GAN %s: %d steps in %.0f s", encoding, cfg.gan.steps, info["seconds"])
    return _require_checkpoint(run_dir, cfg.gan.steps), info


# ---- Flower baselines -----------------------------------------------------------------------------------------
def flower_data(cfg: BandwidthConfig, sites: list[pathlib.Path], recipe: SegmentationRecipe | None = None,
                name: str = "flower") -> tuple[pathlib.Path, int]:
    """OUT/<name>/data: site_<i>.npz (the recipe's training slices of each site), recipe.json, init.safetensors;
    (folder, P). recipe: cfg.segmentation unless given."""
    from safetensors.torch import save_file

    folder = cfg.out / name / "data"
    recipe = recipe or cfg.segmentation
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"seed": cfg.seed})})
    torch.manual_seed(cfg.seed)
    net = build_network(recipe)
    params = sum(v.numel() for v in net.state_dict().values())
    if (folder / "init.safetensors").is_file():
        return folder, params
    folder.mkdir(parents=True, exist_ok=True)
    for i, site in enumerate(sites):
        s = load_training_slices([site], recipe, progress=False)
        np.savez(folder / f"site_{i}.npz", images=s.images.numpy(), masks=s.masks.numpy())
    (folder / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "init.safetensors"))
    return folder, params


def flower_methods(cfg: BandwidthConfig) -> dict[str, dict]:
    n = len(cfg.phantom.cases_per_site)
    f = cfg.flower
    every = {
        "fedavg": {"method": "fedavg", "rounds": f.fedavg_rounds, "local-steps": f.local_steps},
        "cwt": {"method": "cwt", "rounds": f.cwt_cycles * n, "local-steps": f.cwt_local_steps,
                "proportional": f.proportional},
        "swt": {"method": "cwt", "rounds": n, "local-steps": f.swt_local_steps, "proportional": f.proportional},
    }
    return {m: every[m] for m in f.methods}


def flower_runs(cfg: BandwidthConfig, data: pathlib.Path, methods: list[str], name: str = "flower",
                link: "LinkSet | None" = None, rounds: int | None = None) -> dict[str, dict]:
    """Each method as one `flwr run` on one federation (SuperLink + a SuperNode per site, each behind a relay);
    per method the relay traffic and the rounds' log."""
    from asyndgan.experiments.flower_runner import Federation

    out = cfg.out / name
    results = {m: json.loads((out / m / "traffic.json").read_text()) for m in methods
               if (out / m / "traffic.json").is_file()}
    todo = [m for m in methods if m not in results]
    if not todo:
        return results
    n = len(cfg.phantom.cases_per_site)
    specs = flower_methods(cfg)
    fed = Federation(out / "federation", n, delay_s=link.delay_s if link else 0.0,
                     netns=[link.namespaces[i] for i in range(n)] if link else None)
    try:
        fed.start(link.host_addresses if link else None)
        for m in todo:
            shutil.rmtree(out / m, ignore_errors=True)
            before = [r.traffic() for r in fed.relays]
            started_wall, relay_t0 = time.time(), fed.relays[0].now()
            spec = dict(specs[m], **({"rounds": rounds} if rounds else {}))
            run_config = {"data-dir": str(data.resolve()), "out-dir": str((out / m).resolve()), "sites": n,
                          "threads": 1,
                          "save-every": cfg.flower.save_every if not link else 10**6, **spec}
            outcome = fed.run(run_config, cfg.flower.timeout_s)
            after = [r.traffic() for r in fed.relays]
            rounds_log = [json.loads(line) for line in (out / m / "rounds.jsonl").read_text().splitlines()]
            for r in rounds_log:  # cumulative bytes (all sites) at the end of each round, this run only
                t = relay_t0 + (r["time"] - started_wall)
                r["bytes"] = sum(a.total_at(t) - b.cumulative[-1] if b.cumulative else a.total_at(t)
                                 for a, b in zip(after, before))
            bursts = {d: sorted(x for a, b in zip(after, before) for x in a.bursts[d][len(b.bursts[d]):])
                      for d in (UP, DOWN)}
            up = sum(a.up - b.up for a, b in zip(after, before))
            down = sum(a.down - b.down for a, b in zip(after, before))
            total_rounds = spec["rounds"]
            result = {"method": m, "tls": fed.tls, "rounds": total_rounds, "local_steps": spec["local-steps"], "up": up,
                      "down": down, "seconds": outcome.seconds, "rounds_log": rounds_log,
                      "largest_message": {d: max(b, default=0) for d, b in bursts.items()},
                      "message_sizes": {d: _quantiles(b) for d, b in bursts.items()},
                      "per_round": (up + down) / total_rounds,
                      "compute_s": sum(r.get("compute_s", 0.0) for r in rounds_log),
                      "round_seconds": [r["seconds"] for r in rounds_log if r["round"] > 0]}
            write_json(out / m / "traffic.json", result)
            results[m] = result
            log.info("Flower %s: %d rounds, %.1f MB up, %.1f MB down, %.0f s", m, total_rounds, up / 1e6,
                     down / 1e6, outcome.seconds)
    finally:
        fed.stop()
    return results


def score_rounds(cfg: BandwidthConfig, method: str, test, name: str = "flower",
                 recipe: SegmentationRecipe | None = None) -> list[dict]:
    """Dice of every kept global model of a Flower run (OUT/<name>/<method>), on the real test cases."""
    from safetensors.torch import load_file

    folder = cfg.out / name / method
    path = folder / "dice.json"
    if path.is_file():
        return json.loads(path.read_text())
    recipe = recipe or cfg.segmentation
    rows = []
    for f in sorted(folder.glob("round_*.safetensors")):
        net = build_network(recipe)
        net.load_state_dict(load_file(str(f)))
        result = evaluate_model((net, recipe), test, cfg.device, progress=False)
        rows.append({"round": int(f.stem.split("_")[1]), "dice": result.summary["dice"]["mean"]})
    write_json(path, rows)
    return rows


# ---- ensembling ---------------------------------------------------------------------------------------------
class Ensemble(torch.nn.Module):
    """Mean of the members' class probabilities, as logits (log of the mean)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0).clamp_min(1e-8).log()


def ensemble(cfg: BandwidthConfig, sites: list[pathlib.Path], test) -> dict:
    from asyndgan.segmentation import load_model

    path = cfg.out / "ensemble" / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    recipe = cfg.segmentation.model_copy(update={"training": cfg.segmentation.training.model_copy(
        update={"steps": cfg.ensemble_steps, "seed": cfg.seed})})
    members = []
    for i, site in enumerate(sites):
        folder = cfg.out / "ensemble" / f"site{i + 1}"
        if not (folder / "training.json").is_file():
            train_model(load_training_slices([site], recipe, progress=False), recipe, folder, cfg.device,
                        progress=False)
        members.append(load_model(folder)[0])
    net = Ensemble(members).eval()
    result = evaluate_model((net, recipe), test, cfg.device, progress=False)
    out = {"dice": result.summary["dice"]["mean"], "members": len(members)}
    write_json(path, out)
    return out


# ---- emulated links -----------------------------------------------------------------------------------------
class LinkSet:
    """One network namespace per site, joined to the host by a veth pair: `tc tbf` on the host side limits the
    server -> site rate, on the site side the site -> server rate; a relay on the host side of each pair adds half
    the round trip each way. Needs root and iproute2; traffic stays inside the namespaces made here."""

    def __init__(self, profile: LinkProfile, sites: int, tag: int):
        self.profile, self.sites = profile, sites
        self.namespaces = [f"abw{tag}s{i}" for i in range(sites)]
        self.host_ifs = [f"abw{tag}h{i}" for i in range(sites)]
        self.host_addresses = [f"10.232.{(tag * 8 + i) % 250}.1" for i in range(sites)]
        self.delay_s = profile.rtt_ms / 2000.0

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    @staticmethod
    def available() -> str | None:
        """None when links can be emulated here, else why not."""
        if os.geteuid() != 0:
            return "emulating links needs root (network namespaces and tc)"
        if shutil.which("ip") is None or shutil.which("tc") is None:
            return "emulating links needs iproute2 (ip, tc)"
        return None

    def __enter__(self) -> "LinkSet":
        self.__exit__()  # what a killed run may have left under the same names
        try:
            for i, (ns, hif, addr) in enumerate(zip(self.namespaces, self.host_ifs, self.host_addresses)):
                nif, site_addr = f"{hif}n", addr[:-1] + "2"
                _ip("netns", "add", ns)
                _ip("link", "add", hif, "type", "veth", "peer", "name", nif)
                _ip("link", "set", nif, "netns", ns)
                _ip("addr", "add", f"{addr}/30", "dev", hif)
                _ip("link", "set", hif, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{site_addr}/30", "dev", nif)
                _ip("netns", "exec", ns, "ip", "link", "set", nif, "up")
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
                _tbf([], hif, self.profile.down_mbit)
                _tbf(["ip", "netns", "exec", ns], nif, self.profile.up_mbit)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns, hif in zip(self.namespaces, self.host_ifs):
            subprocess.run(["ip", "link", "del", hif], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _tbf(prefix: list[str], dev: str, mbit: float) -> None:
    # burst: at least one MTU and ~4 ms of traffic at the rate; queue of 100 ms at the rate
    rate_bytes = mbit * 1e6 / 8
    burst = max(16_000, int(rate_bytes * 0.004))
    r = subprocess.run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst",
                        str(burst), "latency", "100ms"], capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"tc tbf on {dev}: {r.stderr.strip()}")


def link_runs(cfg: BandwidthConfig, sites: list[pathlib.Path], data: pathlib.Path) -> dict:
    """Per profile: seconds per AsynDGAN step (cfg.link_encoding) and per FedAvg round on the emulated link."""
    why = LinkSet.available()
    if why:
        log.warning("links are modelled, not measured: %s", why)
        return {"measured": False, "why": why}
    out: dict = {"measured": True, "profiles": {}}
    for k, profile in enumerate(cfg.profiles):
        name = f"links/{profile.name}"
        tag = (os.getpid() + k) % 1000
        try:
            link = LinkSet(profile, len(sites), tag).__enter__()
        except ConfigError as exc:  # root, but no network namespaces or tc here (e.g. an unprivileged container)
            log.warning("links are modelled, not measured: %s", exc)
            return {"measured": False, "why": str(exc)}
        try:
            wire = wire_run(cfg, cfg.link_encoding, sites, cfg.link_steps, f"{name}/asyndgan", link)
            flower = (flower_runs(cfg, data, ["fedavg"], f"{name}/flower", link, rounds=cfg.link_rounds)["fedavg"]
                      if cfg.link_rounds else None)
        finally:
            link.__exit__()
        out["profiles"][profile.name] = {"asyndgan": wire, "fedavg": flower}
    return out


# ---- the model-size regime ----------------------------------------------------------------------------------
def larger_network_runs(cfg: BandwidthConfig, timed, sites: list[pathlib.Path], test_dir: pathlib.Path,
                        synthetic: dict[str, pathlib.Path], test) -> dict:
    """A larger segmentation network on the same task: its Real-All target, the generator's synthetic data (the
    link encoding's generator, already trained and paid for), FedAvg on Flower; everything measured."""
    encoding = cfg.link_encoding if cfg.link_encoding in synthetic else next(iter(synthetic))
    recipe = cfg.segmentation.model_copy(update={"network": cfg.larger_network})
    log.info("[6b/7] a larger network (channels %s): real, synthetic (%s) and FedAvg on Flower",
             cfg.larger_network.channels, encoding)
    rows = {"larger_real_all": sites, f"larger_asyndgan_{_slug(encoding)}": [synthetic[encoding]]}
    evals = timed("larger_segmentation", segment_rows, cfg, rows, test_dir, {r: recipe for r in rows})
    data, params = timed("larger_flower_data", flower_data, cfg, sites, recipe, "flower_larger")
    flower = timed("larger_flower", flower_runs, cfg, data, ["fedavg"], "flower_larger", None, cfg.larger_rounds)
    curve = timed("larger_score_fedavg", score_rounds, cfg, "fedavg", test, "flower_larger", recipe)
    return {"encoding": encoding, "channels": list(cfg.larger_network.channels), "parameters": params,
            "real_all": evals["larger_real_all"], "asyndgan": evals[f"larger_asyndgan_{_slug(encoding)}"],
            "flower": flower, "curve": curve}


# ---- the run ------------------------------------------------------------------------------------------------
def run(cfg: BandwidthConfig) -> dict:
    from asyndgan.experiments import bandwidth_report as report
    from asyndgan.experiments.flower_runner import flower_venv

    prepare_compute(cfg)
    for e in cfg.encodings:
        _split(e)
    flower_venv()  # refuse now, not after an hour of GANs
    check_settings(cfg, added=("larger_network", "larger_rounds"))
    timings, timed = piece_timer(cfg.out / "timings.json")
    log.info("[1/7] phantom sites and test cases; segmentation on all real data pooled (the target)")
    sites, test_dir = timed("phantom", make_phantom, cfg)
    pooled = pooled_tree(sites, cfg.out / "pooled")
    real = timed("real_all", segment_rows, cfg, {"real_all": sites}, test_dir)
    test = None
    log.info("[2/7] AsynDGAN on real sockets, per encoding (%s)", ", ".join(cfg.encodings))
    wire = {e: timed(f"wire_{_slug(e)}", wire_run, cfg, e, sites, cfg.wire_steps, f"wire/{_slug(e)}")
            for e in cfg.encodings}
    log.info("[3/7] AsynDGAN trained to the end per encoding; synthetic data; segmentation")
    gans, synthetic = {}, {}
    for e in cfg.dice_encodings or cfg.encodings:
        ckpt, info = timed(f"gan_{_slug(e)}", train_gan, cfg, e, sites)
        gans[e] = info
        synthetic[e] = timed(f"generate_{_slug(e)}", synthesise, cfg, ckpt, pooled, cfg.out / "synthetic" / _slug(e))
    syn = timed("segmentation_synthetic", segment_rows, cfg,
                {f"asyndgan_{_slug(e)}": [synthetic[e]] for e in synthetic}, test_dir)
    log.info("[4/7] Flower: FedAvg, cyclical and single weight transfer")
    data, params = timed("flower_data", flower_data, cfg, sites)
    flower = timed("flower", flower_runs, cfg, data, list(flower_methods(cfg)))
    test = load_test_cases(test_dir, cfg.segmentation.preprocessing, progress=False)
    curves = {m: timed(f"score_{m}", score_rounds, cfg, m, test) for m in flower}
    log.info("[5/7] ensembling of single-site models")
    ens = timed("ensemble", ensemble, cfg, sites, test)
    log.info("[6/7] emulated hospital links (%s)", ", ".join(p.name for p in cfg.profiles))
    links = timed("links", link_runs, cfg, sites, data)
    larger = None
    if cfg.larger_network is not None:
        larger = larger_network_runs(cfg, timed, sites, test_dir, synthetic, test)
    log.info("[7/7] report")
    results = report.write_all(cfg, real, wire, gans, syn, flower, curves, ens, links, params, timings, larger)
    log.info("bandwidth benchmark (%s, seed %d) done; %.0f s of work; report %s", cfg.preset, cfg.seed,
             sum(timings.values()), cfg.out / "report.md")
    return results
