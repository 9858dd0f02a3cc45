"""How the server's cost grows with the number of sites: a real server, real gRPC streams with mutual TLS, N sites.

For each N: one server process (one torch thread) and the N sites spread over a few processes (`site_pool`: each
site a SiteAgent thread with its own channel and certificate, as `asyndgan-site join` runs it; sharing processes
lets 64 sites fit in memory). Every site holds a small data set of its own of the same size and the same tiny
discriminator, so the per-site compute is fixed and the server's growth is the server's. The server waits for every
site each step (quorum N), as a synchronous run does.

Measured per N, over the steps after a warm-up (from the server's Status and its /proc entry):
    server CPU time per step, and per step per site       (user + system time of the server process)
    wall time per step                                    (the slowest site and the round trips included)
    bytes per step                                        (sent and received by the server, gRPC payloads)
    server memory (resident) with N sites joined, and its growth per site over the server before any site
    the label-map bank's size on disk
The sites share the machine's cores with the server: the wall time is this machine's, the CPU time the server's.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys
import time

from pydantic import BaseModel, ConfigDict, Field

from asyndgan.experiments.pieces import write_json
from asyndgan.experiments.recipe import PAPERS

log = logging.getLogger(__name__)


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: pathlib.Path
    sites: list[int] = Field(default_factory=lambda: [1, 4, 16, 64], min_length=1)
    steps: int = Field(40, ge=3, description="generator steps per N")
    warmup: int = Field(10, ge=1, description="steps left out of the measurement (joining, first allocations)")
    image_size: int = Field(32, ge=16)
    batch_per_site: int = Field(2, ge=1)
    cases_per_site: int = Field(20, ge=1, description="label maps each site uploads")
    sites_per_process: int = Field(16, ge=1)
    tls: bool = True
    seed: int = 0

    def model_post_init(self, _context) -> None:
        if self.warmup >= self.steps - 1:
            raise ValueError(f"warmup ({self.warmup}) must leave steps to measure (steps {self.steps})")


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _folder_mb(folder: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.is_dir() else 0.0


def server_config(cfg: ScaleConfig, run_dir: pathlib.Path, n: int):
    from asyndgan.common.config import (Image2DConfig, ModelConfig, ScheduleConfig, ServerConfig, SiteFacingConfig,
                                        TrainConfig)

    scfg = ServerConfig(
        host="127.0.0.1", port=0, run_dir=run_dir, device="cpu", tensorboard=False,
        checkpoint_every=cfg.steps, sample_every=cfg.steps,
        train=TrainConfig(batch_size=cfg.batch_per_site, min_sites=n, step_deadline_s=300, seed=cfg.seed),
        site=SiteFacingConfig(model=ModelConfig(family="image2d", image2d=Image2DConfig(
            image_size=cfg.image_size, ngf=8, n_blocks=1, ndf=8, d_layers=2)),
            schedule=ScheduleConfig(steps=cfg.steps), seed=cfg.seed))
    PAPERS.apply(scfg)  # the reports' recipe, whatever the system ships
    return scfg


def measure(cfg: ScaleConfig, n: int, data: pathlib.Path) -> dict:
    """One N: start the server and the sites, measure, stop; the numbers as a dict."""
    from asyndgan.experiments.runner import Cluster

    run_dir = cfg.out / f"n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cluster = Cluster(server_config(cfg, run_dir, n), threads=1, tls=cfg.tls)
    try:
        cluster.start_server()
        pid = cluster.procs[0][1].pid
        time.sleep(1.0)
        rss_alone = _rss_mb(pid)
        ids = [f"site{i + 1}" for i in range(n)]  # the toy data's folder names
        for i in ids:
            cluster.kit(i)
        kits = cluster.cfg.certs / "sites" if cfg.tls else run_dir
        for k in range(0, n, cfg.sites_per_process):
            group = ids[k:k + cfg.sites_per_process]
            cmd = [sys.executable, "-m", "asyndgan.experiments.site_pool", "--server", cluster.address,
                   "--kits", str(kits), "--data", str(data), "--sites", ",".join(group), "--state",
                   str(run_dir / "site_state"), "--set", "privacy.enabled=false",
                   "--set", f"prep.cache_dir={cfg.out / 'cache'}", *PAPERS.site_options(),
                   *([] if cfg.tls else ["--set", "insecure=true"])]
            cluster._spawn(f"pool{k // cfg.sites_per_process}", cmd, run_dir / f"pool{k // cfg.sites_per_process}.out")
        marks: dict[str, tuple] = {}
        rss_peak = [0.0]

        def observe(s) -> bool:
            now = (time.monotonic(), _cpu_seconds(pid), s.bytes_sent + s.bytes_received, s.step)
            if s.step >= cfg.warmup and "start" not in marks:
                marks["start"] = now
            if "start" in marks:
                rss_peak[0] = max(rss_peak[0], _rss_mb(pid))
            if s.step >= cfg.steps - 1 and "start" in marks:
                marks["end"] = now
            return "end" in marks

        cluster.watch(observe, 600 + 5 * cfg.steps, f"{n} sites to reach step {cfg.steps - 1}")
        cluster.wait(120)
    finally:
        cluster.stop()
    stages = server_stages(run_dir / "server.out")
    (t0, c0, b0, s0), (t1, c1, b1, s1) = marks["start"], marks["end"]
    steps = max(1, s1 - s0)
    cpu_ms = 1000 * (c1 - c0) / steps
    return {"sites": n, "steps_measured": steps, "server_cpu_ms_per_step": cpu_ms,
            "server_cpu_ms_per_site_step": cpu_ms / n, "wall_ms_per_step": 1000 * (t1 - t0) / steps,
            "bytes_per_step": (b1 - b0) / steps, "server_rss_mb_alone": rss_alone, "server_rss_mb": rss_peak[0],
            "server_rss_mb_per_site": (rss_peak[0] - rss_alone) / n, "bank_mb": _folder_mb(run_dir / "bank"),
            "stages_ms": stages}


def server_stages(log_file: pathlib.Path) -> dict[str, float]:
    """The server's own account of a step, from its last 'per step on average' line: stage -> ms (plan,
    dispatch, wait for the sites, guard, update)."""
    import re

    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if "per step on average" in ln]
    if not lines:
        return {}
    return {name: float(ms) for name, ms in re.findall(r"(\w+) ([0-9.]+) ms", lines[-1].split("):", 1)[-1])}


def run(cfg: ScaleConfig) -> dict:
    from asyndgan.demo_data.toy import write_toy_sites

    cfg.out.mkdir(parents=True, exist_ok=True)
    biggest = max(cfg.sites)
    write_toy_sites(cfg.out / "data", sites=biggest, per_site=[cfg.cases_per_site] * biggest, size=cfg.image_size,
                    seed=cfg.seed)  # each site its own data: site<k>/
    data = cfg.out / "data"
    rows = []
    for n in cfg.sites:
        log.info("%d sites ...", n)
        rows.append(measure(cfg, n, data))
        log.info("%d sites: server CPU %.1f ms per step (%.2f per site), wall %.0f ms per step, %.1f MB resident",
                 n, rows[-1]["server_cpu_ms_per_step"], rows[-1]["server_cpu_ms_per_site_step"],
                 rows[-1]["wall_ms_per_step"], rows[-1]["server_rss_mb"])
    for before, row in zip(rows, rows[1:]):  # what one more site costs, free of the server's fixed start-up
        added = row["sites"] - before["sites"]
        row["server_rss_mb_per_added_site"] = (row["server_rss_mb"] - before["server_rss_mb"]) / added if added else None
    results = {"settings": cfg.model_dump(mode="json"), "rows": rows}
    write_json(cfg.out / "results.json", results)
    plot(cfg.out / "scale.png", rows)
    (cfg.out / "report.md").write_text(markdown(cfg, rows))
    return results


def markdown(cfg: ScaleConfig, rows: list[dict]) -> str:
    lines = ["# The server at scale", "",
             f"Command: `asyndgan bench scale --out OUT --sites {','.join(map(str, cfg.sites))}`: a real server "
             f"(one torch thread), {'mutual TLS' if cfg.tls else 'plain text'}, N sites in processes of "
             f"{cfg.sites_per_process} (each its own channel and certificate); {cfg.image_size} px, a tiny generator "
             f"and discriminator, {cfg.batch_per_site} images per site per step, {cfg.cases_per_site} label maps "
             f"per site; measured over steps {cfg.warmup}-{cfg.steps - 1}. The sites share this machine's cores with "
             "the server.", "",
             "| sites | server CPU ms / step | per site | wall ms / step | bytes / step | server MB | MB per site | "
             "MB per added site | bank MB | server's step: plan / dispatch / wait / guard / update ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sites']} | {r['server_cpu_ms_per_step']:.1f} | {r['server_cpu_ms_per_site_step']:.2f} | "
                     f"{r['wall_ms_per_step']:.0f} | {r['bytes_per_step'] / 1e3:.1f} k | {r['server_rss_mb']:.0f} | "
                     f"{r['server_rss_mb_per_site']:.2f} | "
                     f"{_num(r.get('server_rss_mb_per_added_site'))} | "
                     f"{r['bank_mb']:.2f} | {' / '.join(f'{v:.1f}' for v in r['stages_ms'].values()) or '-'} |")
    lines += ["", "MB per site: the server's growth over itself before any site joined, divided by N (its first "
              "allocations included); MB per added site: the growth from the previous N, per site added. Figure: "
              "`scale.png`.", ""]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot(path: pathlib.Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["sites"] for r in rows]
    panels = [("server_cpu_ms_per_site_step", "server CPU ms per site per step"),
              ("wall_ms_per_step", "wall ms per step"), ("bytes_per_step", "bytes per step"),
              ("server_rss_mb_per_site", "server MB per site")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(n, [r[key] for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sites")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
