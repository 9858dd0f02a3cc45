"""Steps per second over slow links and with a slow site: lock-step against the server's asynchronous modes.

A real server and N real sites (one process each, mutual TLS), each site behind its own delaying relay
(experiments/relay.py: every chunk held `delay` seconds each way, so a round trip gains twice that; the kernel's
`netem` is not available here). For each round trip and each mode:

    exact       lock-step (the default): each step waits for every site's answer
    pipelined   train.pipeline = 1: the next step's fakes go out while the last step's answers come back
    late        train.late_steps (with train.straggler_wait): a step waits for the fastest sites and a little more;
                a slower site's answer is applied when it comes, weighted by 1 / (1 + its lateness)

and, at one round trip, the same modes with one site whose answers take `slow_factor` times as long as the others'
(emulated on its link: the extra time is added to its relay's delay, from the lock-step run's measured step time).
Measured over the steps after a warm-up, from the server's Status: steps per second, and for the slow site the share
of steps whose data reached the generator (its answers applied, in time or late, per step).
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import sys
import time

from pydantic import BaseModel, ConfigDict, Field

from asyndgan.experiments.pieces import write_json
from asyndgan.experiments.recipe import PAPERS

log = logging.getLogger(__name__)
MODES = {"exact": {}, "pipelined": {"pipeline": 1}, "late": {"late_steps": 4, "straggler_wait": 1.0}}


class LinksConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: pathlib.Path
    sites: int = Field(3, ge=2)
    rtts_ms: list[float] = Field(default_factory=lambda: [0.0, 40.0, 80.0], min_length=1)
    modes: list[str] = Field(default_factory=lambda: list(MODES))
    slow_rtt_ms: float = Field(40.0, ge=0, description="the round trip of the runs with a slow site")
    slow_factor: float = Field(3.0, ge=1, description="how many times as long the slow site's answers take")
    straggler_wait: float = Field(1.0, gt=0, description="the late mode's train.straggler_wait")
    steps: int = Field(60, ge=3)
    warmup: int = Field(10, ge=1)
    image_size: int = Field(32, ge=16)
    batch_per_site: int = Field(2, ge=1)
    cases_per_site: int = Field(20, ge=1)
    tls: bool = True
    seed: int = 0

    def model_post_init(self, _context) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
        if self.warmup >= self.steps - 1:
            raise ValueError(f"warmup ({self.warmup}) must leave steps to measure (steps {self.steps})")


def server_config(cfg: LinksConfig, run_dir: pathlib.Path, mode: str):
    from asyndgan.experiments.scale import ScaleConfig
    from asyndgan.experiments.scale import server_config as scale_server

    base = scale_server(ScaleConfig(out=cfg.out, steps=cfg.steps, warmup=cfg.warmup, image_size=cfg.image_size,
                                    batch_per_site=cfg.batch_per_site, seed=cfg.seed), run_dir, cfg.sites)
    # every mode runs with a quorum of one, so that the late mode can go on without the slow site; the schedule
    # is long (the measurement stops the run once every site has joined and `steps` more have passed)
    extra = {**MODES[mode], **({"straggler_wait": cfg.straggler_wait} if mode == "late" else {})}
    train = base.train.model_copy(update={"min_sites": 1, "step_deadline_s": 60.0, **extra})
    site = base.site.model_copy(update={"schedule": base.site.schedule.model_copy(update={"steps": 10**6})})
    return base.model_copy(update={"train": type(base.train).model_validate(train.model_dump()),
                                   "site": site, "checkpoint_every": 10**6, "sample_every": 10**6})


def measure(cfg: LinksConfig, mode: str, delays_s: list[float], data: pathlib.Path, name: str) -> dict:
    """One run: the server, a relay per site with its delay, the sites; steps per second after the warm-up."""
    from asyndgan.experiments.relay import Relay
    from asyndgan.experiments.runner import Cluster

    run_dir = cfg.out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cluster = Cluster(server_config(cfg, run_dir, mode), threads=1, tls=cfg.tls)
    relays: list[Relay] = []
    try:
        cluster.start_server()
        host, port = cluster.address.rsplit(":", 1)
        ids = [f"site{i + 1}" for i in range(cfg.sites)]
        kits = cluster.cfg.certs / "sites" if cfg.tls else run_dir
        for site, delay in zip(ids, delays_s):
            cluster.kit(site)
            relay = Relay((host, int(port)), delay_s=delay)
            relays.append(relay)
            cmd = [sys.executable, "-m", "asyndgan.experiments.site_pool", "--server", relay.address,
                   "--kits", str(kits), "--data", str(data), "--sites", site, "--state", str(run_dir / "state"),
                   "--set", "privacy.enabled=false", "--set", f"prep.cache_dir={cfg.out / 'cache'}",
                   *PAPERS.site_options(), *([] if cfg.tls else ["--set", "insecure=true"])]
            cluster._spawn(site, cmd, run_dir / f"{site}.out")
        marks: dict[str, tuple] = {}

        def observe(s) -> bool:
            answered = {x.site_id: x.steps_answered for x in s.sites}
            if "joined" not in marks and sum(1 for x in s.sites if x.steps_answered > 0) == cfg.sites:
                marks["joined"] = (time.monotonic(), s.step, answered)
            if "joined" in marks and "start" not in marks and s.step >= marks["joined"][1] + cfg.warmup:
                marks["start"] = (time.monotonic(), s.step, answered)
            if "start" in marks and s.step >= marks["start"][1] + cfg.steps - cfg.warmup:
                marks["end"] = (time.monotonic(), s.step, answered)
            return "end" in marks

        cluster.watch(observe, 600 + 10 * cfg.steps, f"{name}: {cfg.steps} steps after every site joined")
    finally:
        cluster.stop()
        for relay in relays:
            relay.close()
    (t0, s0, a0), (t1, s1, a1) = marks["start"], marks["end"]
    steps = max(1, s1 - s0)
    reached = {site: (a1.get(site, 0) - a0.get(site, 0)) / steps for site in ids}
    return {"name": name, "mode": mode, "delays_ms": [1000 * d for d in delays_s], "steps_measured": steps,
            "steps_per_second": steps / (t1 - t0), "ms_per_step": 1000 * (t1 - t0) / steps,
            "share_applied": reached}


def run(cfg: LinksConfig) -> dict:
    from asyndgan.demo_data.toy import write_toy_sites

    cfg.out.mkdir(parents=True, exist_ok=True)
    write_toy_sites(cfg.out / "data", sites=cfg.sites, per_site=[cfg.cases_per_site] * cfg.sites,
                    size=cfg.image_size, seed=cfg.seed)
    rows = []
    for rtt in cfg.rtts_ms:
        for mode in cfg.modes:
            name = f"rtt{rtt:g}-{mode}"
            rows.append({"rtt_ms": rtt, "slow": False, **measure(cfg, mode, [rtt / 2000] * cfg.sites,
                                                                  cfg.out / "data", name)})
            log.info("%s: %.1f steps/s", name, rows[-1]["steps_per_second"])
    # the slow site: its answers take slow_factor x the lock-step run's step time at this round trip
    base = next((r for r in rows if r["rtt_ms"] == cfg.slow_rtt_ms and r["mode"] == "exact"), None)
    if base is None:
        base = {"rtt_ms": cfg.slow_rtt_ms, "slow": False, **measure(
            cfg, "exact", [cfg.slow_rtt_ms / 2000] * cfg.sites, cfg.out / "data", f"rtt{cfg.slow_rtt_ms:g}-exact")}
        rows.append(base)
    extra = (cfg.slow_factor - 1) * base["ms_per_step"] / 2000  # seconds per direction
    delays = [cfg.slow_rtt_ms / 2000] * (cfg.sites - 1) + [cfg.slow_rtt_ms / 2000 + extra]
    for mode in cfg.modes:
        name = f"rtt{cfg.slow_rtt_ms:g}-{mode}-slow"
        rows.append({"rtt_ms": cfg.slow_rtt_ms, "slow": True, **measure(cfg, mode, delays, cfg.out / "data", name)})
        log.info("%s: %.1f steps/s", name, rows[-1]["steps_per_second"])
    results = {"settings": cfg.model_dump(mode="json"), "rows": rows}
    write_json(cfg.out / "results.json", results)
    (cfg.out / "report.md").write_text(markdown(cfg, rows))
    return results


def markdown(cfg: LinksConfig, rows: list[dict]) -> str:
    loop = {r["mode"]: r["steps_per_second"] for r in rows if r["rtt_ms"] == 0 and not r["slow"]}
    fast = {r["mode"]: r["steps_per_second"] for r in rows if r["rtt_ms"] == cfg.slow_rtt_ms and not r["slow"]}
    slow_site = f"site{cfg.sites}"
    lines = ["# Slow links and a slow site", "",
             f"Command: `asyndgan bench links --out OUT`: a real server and {cfg.sites} site processes "
             f"({'mutual TLS' if cfg.tls else 'plain text'}), each site behind its own delaying relay; "
             f"{cfg.image_size} px, the scale benchmark's tiny generator and discriminator, {cfg.batch_per_site} "
             f"images per site per step; measured over {cfg.steps - cfg.warmup} steps, {cfg.warmup} steps after every site had answered once. Modes: exact (lock-step, "
             f"the default), pipelined (`train.pipeline=1`), late (`train.late_steps=4`, `train.straggler_wait="
             f"{cfg.straggler_wait:g}`). "
             f"The slow site ({slow_site}) answers {cfg.slow_factor:g}x as slowly as the others (emulated on its "
             "link). All processes share this machine's two cores.", "",
             "| round trip ms | slow site | mode | steps / s | vs exact on loopback | vs the same mode without the "
             f"slow site | share of steps with {slow_site}'s data |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = loop.get("exact")
        same = fast.get(r["mode"]) if r["slow"] else None
        lines.append(f"| {r['rtt_ms']:g} | {'yes' if r['slow'] else 'no'} | {r['mode']} | "
                     f"{r['steps_per_second']:.2f} | {_ratio(r['steps_per_second'], ref)} | "
                     f"{_ratio(r['steps_per_second'], same)} | {r['share_applied'][slow_site]:.2f} |")
    lines.append("")
    return "\n".join(lines)


def _ratio(x: float, ref: float | None) -> str:
    return "-" if not ref else f"{x / ref:.2f}"
