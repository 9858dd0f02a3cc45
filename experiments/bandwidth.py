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
import threading
import time


from asyndgan.central_server.trainer import Trainer
from asyndgan.common.errors import ConfigError
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from asyndgan.experiments.relay import DOWN, UP, Relay, Traffic
from asyndgan.experiments.runner import Cluster
from asyndgan.experiments.synthetic_learning import (
    make_phantom, pooled_tree, prepare_compute, segment_rows, synthetic_set,
)
from asyndgan.segmentation import (
    load_test_cases,
)
from asyndgan.formats.datasets import open_dataset

log = logging.getLogger(__name__)

from asyndgan.experiments.bandwidth_config import (  # noqa: F401  (preset_config, HOSPITAL_LINKS: the benchmark's API)
    ENCODINGS, HOSPITAL_LINKS, BandwidthConfig, LinkProfile, Preset, _slug, _split, _wire_config, preset_config, quantiles,
)
from asyndgan.experiments.bandwidth_baselines import flower_data, flower_methods, flower_runs, score_rounds, ensemble
from asyndgan.experiments.bandwidth_links import LinkSet
from asyndgan.experiments.pieces import write_json, piece_timer, check_settings, kept_or_reset, require_checkpoint


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
        "message_sizes": {d: quantiles(b) for d, b in bursts.items()},
        "up_per_step": up_per_step, "down_per_step": per_step - up_per_step,
    }


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
            extra = ["--server", relay.address, "--set", f"prep.cache_dir={cfg.out / 'cache'}", "--device", cfg.device,
                     *cfg.gan.recipe.site_options()]
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
    if (done := kept_or_reset(run_dir, cfg.gan.steps)) and info_path.is_file():
        return done, json.loads(info_path.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    dtype, _ = _split(encoding)
    scfg = _wire_config(cfg, run_dir, encoding, cfg.gan.steps, len(sites))
    prep = cfg.gan.recipe.prep(cfg.out / "cache")
    sessions = [LocalSession(f"site{i + 1}", open_dataset(f, scfg.site, prep), scfg.site, device=cfg.device,
                             wire=dtype) for i, f in enumerate(sites)]
    started = time.monotonic()
    Trainer(scfg, LocalRegistry(sessions), CountingBank(sessions), run_dir).run(threading.Event())
    info = {"seconds": time.monotonic() - started, "payload_up": sum(s.payload[0] for s in sessions),
            "payload_down": sum(s.payload[1] for s in sessions),
            "slices": {s.site_id: s.num_samples for s in sessions}}
    write_json(info_path, info)
    log.info("GAN %s: %d steps in %.0f s", encoding, cfg.gan.steps, info["seconds"])
    return require_checkpoint(run_dir, cfg.gan.steps), info


# ---- emulated links ---------------------------------------------------------------------------------------
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
        synthetic[e] = timed(f"generate_{_slug(e)}", synthetic_set, cfg, ckpt, pooled, cfg.out / "synthetic" / _slug(e))
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
    results = report.write_all(cfg, report.Measured(real, wire, gans, syn, flower, curves, ens, links, params, timings,
                                                    larger))
    log.info("bandwidth benchmark (%s, seed %d) done; %.0f s of work; report %s", cfg.preset, cfg.seed,
             sum(timings.values()), cfg.out / "report.md")
    return results
