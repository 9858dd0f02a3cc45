"""Label-map upload at BraTS scale: bytes on the wire, upload time and peak memory of a site and the server.

A synthetic site with --maps label maps (default 50,000 at 256 px: mostly zeros, a one-pixel brain outline and a
nested tumour blob, like the maps a BraTS site prepares) joins a real server over loopback and uploads them.
The maps are generated once into a memory-mapped .npy under --workdir, so the benchmark itself needs no GBs of
RAM. Three processes: this one (generates the maps, runs a counting TCP proxy between site and server, prints
the table), the server (the real servicer, registry and bank, no training) and the site (the real SiteAgent,
given a PreparedImageDataset over the maps file, the class BraTS sites use). Each process reports its own peak
memory: VmHWM (peak resident set, which counts file pages a process has mapped and touched: page cache the
kernel can drop) and the peak of RssAnon sampled every 20 ms (memory the process really holds).

    python benchmarks/label_map_upload.py [--maps 50000] [--size 256] [--chunk-mb 4] [--workdir DIR]

The same script runs against older code (it only uses names that existed before the streaming upload): put a
checkout of the older commit first on PYTHONPATH (a folder `asyndgan/` with an empty __init__.py and links to its
common, central_server, site_agent, experiments, demo_data folders) to measure "before".
"""

from __future__ import annotations

import json
import logging
import pathlib
import resource
import subprocess
import sys
import tempfile
import threading
import time

import click
import numpy as np

from asyndgan.experiments.relay import Relay

log = logging.getLogger("label_map_upload")
NUM_CLASSES = 5  # BraTS: background, brain outline, and three tumour labels


# ---- synthetic maps -------------------------------------------------------------------------------------------
def write_maps(path: pathlib.Path, n: int, size: int, seed: int = 0, block: int = 64) -> None:
    """uint8 [n, size, size] into a memory-mapped .npy, `block` maps at a time (vectorised, bounded memory)."""
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part")
    out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, size, size))
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for first in range(0, n, block):
        b = min(block, n - first)
        cy, cx = (size / 2 + rng.normal(0, size / 50, (2, b, 1, 1))).astype(np.float32)
        ay, ax = (rng.uniform(0.3, 0.42, (2, b, 1, 1)) * size).astype(np.float32)
        r = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2
        maps = np.where((r <= 1) & (r > 0.96), 1, 0).astype(np.uint8)
        ty = cy + rng.uniform(-0.5, 0.5, (b, 1, 1)).astype(np.float32) * ay
        tx = cx + rng.uniform(-0.5, 0.5, (b, 1, 1)).astype(np.float32) * ax
        d = np.hypot(yy - ty, xx - tx) / rng.uniform(size / 50, size / 9, (b, 1, 1)).astype(np.float32)
        maps[d < 1], maps[d < 0.6], maps[d < 0.3] = 2, 4, 3
        out[first : first + b] = maps
    out.flush()
    del out
    tmp.rename(path)


# ---- memory of this process ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak RssAnon (sampled) of this process; VmHWM and ru_maxrss come from the kernel at the end."""

    def __init__(self, every_s: float = 0.02):
        self.peak_anon_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.peak_anon_kib = max(self.peak_anon_kib, _status_kib("RssAnon"))
            self._stop.wait(every_s)

    def report(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.peak_anon_kib = max(self.peak_anon_kib, _status_kib("RssAnon"))
        return {"peak_anon_mb": self.peak_anon_kib / 1024, "vm_hwm_mb": _status_kib("VmHWM") / 1024,
                "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---- the two roles (run as child processes) ------------------------------------------------------------------
def _server_config(run_dir: pathlib.Path, size: int):
    from asyndgan.common.config import ServerConfig

    return ServerConfig.model_validate({
        "insecure": True, "port": 0, "run_dir": str(run_dir),
        # A small model: the figures are about label maps, not about G's weights.
        "site": {"model": {"image2d": {"image_size": size, "modalities": ["t1"], "num_classes": NUM_CLASSES,
                                       "ngf": 4, "n_blocks": 1, "ndf": 4, "d_layers": 2}}},
    })


def run_server_role(run_dir: pathlib.Path, size: int, port_file: pathlib.Path, result_file: pathlib.Path) -> None:
    from asyndgan.central_server.server import build, create_server
    from asyndgan.central_server.session import SiteSession

    sampler = MemorySampler()
    payload = [0]
    handle = SiteSession.handle

    def counting_handle(self, msg):  # the encoded label-map bytes, whatever the encoding
        if msg.WhichOneof("kind") == "conditions":
            payload[0] += len(msg.conditions.maps.data)
        return handle(self, msg)

    SiteSession.handle = counting_handle
    cfg = _server_config(run_dir, size)
    _trainer, registry, servicer = build(cfg)
    server, port, _health = create_server(servicer, "127.0.0.1:0", None)
    server.start()
    base = sampler.report()  # memory before any upload (model, gRPC, imports)
    sampler = MemorySampler()
    port_file.write_text(str(port))
    while not registry.ready():
        time.sleep(0.01)
    ready_at = time.monotonic()
    session = registry.ready()[0]
    upload_s = ready_at - session.stats.joined_at
    bank_files = [p for p in (run_dir / "bank").glob("*") if p.is_file()] if (run_dir / "bank").exists() else []
    result = {"upload_s": upload_s, "bytes_received": session.stats.bytes_received, "payload": payload[0],
              "num_samples": session.num_samples, "bank_bytes": sum(p.stat().st_size for p in bank_files),
              "bank_files": [p.name for p in bank_files], "base": base, **sampler.report()}
    result_file.write_text(json.dumps(result))
    registry.shutdown_all("benchmark done", final=True)
    server.stop(2).wait(10)


def run_site_role(server: str, maps_file: pathlib.Path, workdir: pathlib.Path, chunk_mb: float,
                  result_file: pathlib.Path) -> None:
    from asyndgan.common.config import SiteConfig
    from asyndgan.formats import cache, datasets
    from asyndgan.site_agent import agent

    sampler = MemorySampler()
    labels = np.load(maps_file, mmap_mode="c", allow_pickle=False)
    n, size = labels.shape[0], labels.shape[-1]
    # Images are never read during the upload: a zero-strided view stands in for the image cache.
    images = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float16), (n, 1, size, size))
    prepared = cache.Prepared(images=images, labels=labels, modalities=["t1"], meta={"num_samples": n})
    agent.describe_dataset = lambda root, prep=None: datasets.DataSummary("image2d", "brats", ["t1"])
    agent.open_dataset = lambda root, cfg, prep=None: datasets.PreparedImageDataset(prepared)
    cfg = SiteConfig(site_id="bench", server=server, insecure=True, data=workdir, state_dir=workdir / "state",
                     upload_chunk_mb=chunk_mb)
    start = time.monotonic()
    stats = agent.SiteAgent(cfg).run()
    result = {"wall_s": time.monotonic() - start, "bytes_sent": stats.bytes_sent, **sampler.report()}
    result_file.write_text(json.dumps(result))


# ---- orchestration ---------------------------------------------------------------------------------------------
def _child(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args])


def measure(maps_file: pathlib.Path, workdir: pathlib.Path, chunk_mb: float, timeout_s: float) -> dict:
    n, size = np.load(maps_file, mmap_mode="r").shape[:2]
    run_dir = workdir / f"server-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    port_file, server_out, site_out = run_dir / "port", run_dir / "server.json", run_dir / "site.json"
    server = _child(["server", "--run-dir", str(run_dir), "--size", str(size), "--port-file", str(port_file),
                     "--result", str(server_out)])
    try:
        while not port_file.exists():
            if server.poll() is not None:
                raise click.ClickException("the server process exited before listening")
            time.sleep(0.05)
        proxy = Relay(("127.0.0.1", int(port_file.read_text())))
        site = _child(["site", "--server", f"127.0.0.1:{proxy.port}", "--maps-file", str(maps_file),
                       "--workdir", str(run_dir), "--chunk-mb", str(chunk_mb), "--result", str(site_out)])
        if site.wait(timeout_s) != 0 or server.wait(60) != 0:
            raise click.ClickException(f"site exited {site.returncode}, server {server.returncode}")
    finally:
        for p in (server,):
            if p.poll() is None:
                p.kill()
    return {"n": int(n), "size": int(size), "raw": int(n) * int(size) ** 2, "socket_up": proxy.up,
            "server": json.loads(server_out.read_text()), "site": json.loads(site_out.read_text())}


def table(r: dict) -> str:
    s, v, mb = r["site"], r["server"], 1e6
    rows = [
        ("label maps", f"{r['n']:,} x {r['size']}x{r['size']} uint8 = {r['raw'] / mb:,.1f} MB raw"),
        ("encoded label-map payload", f"{v['payload'] / mb:,.1f} MB (ratio {r['raw'] / max(1, v['payload']):.1f}x)"),
        ("protobuf bytes received by the server", f"{v['bytes_received'] / mb:,.1f} MB"),
        ("bytes on the socket, site -> server", f"{r['socket_up'] / mb:,.1f} MB (ratio {r['raw'] / max(1, r['socket_up']):.1f}x)"),
        ("upload time (server: join -> ready)", f"{v['upload_s']:.1f} s"),
        ("site wall time (dial -> shut down)", f"{s['wall_s']:.1f} s"),
        ("site peak RssAnon / VmHWM", f"{s['peak_anon_mb']:,.0f} MB / {s['vm_hwm_mb']:,.0f} MB"),
        ("server peak RssAnon / VmHWM (before upload)",
         f"{v['peak_anon_mb']:,.0f} MB / {v['vm_hwm_mb']:,.0f} MB ({v['base']['peak_anon_mb']:,.0f} / "
         f"{v['base']['vm_hwm_mb']:,.0f})"),
        ("server bank on disk", f"{v['bank_bytes'] / mb:,.1f} MB in {len(v['bank_files'])} file(s)"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


@click.group(invoke_without_command=True)
@click.option("--maps", "n", default=50_000, show_default=True, help="label maps at the synthetic site")
@click.option("--size", default=256, show_default=True, help="side of each map in pixels")
@click.option("--chunk-mb", default=4.0, show_default=True, help="site upload chunk size (raw MiB)")
@click.option("--workdir", type=click.Path(path_type=pathlib.Path), default=None,
              help="where the maps file and run folders go (default: a temporary folder); the maps file is reused")
@click.option("--timeout-s", default=1800.0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=pathlib.Path), default=None, help="also write the figures")
@click.pass_context
def main(ctx, n, size, chunk_mb, workdir, timeout_s, json_out):
    """Upload a synthetic site's label maps to a real server and report bytes, time and memory."""
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    workdir = workdir or pathlib.Path(tempfile.mkdtemp(prefix="label-maps-"))
    workdir.mkdir(parents=True, exist_ok=True)
    maps_file = workdir / f"labels-{n}x{size}.npy"
    if not maps_file.exists():
        start = time.monotonic()
        write_maps(maps_file, n, size)
        log.info("wrote %s in %.0f s", maps_file, time.monotonic() - start)
    result = measure(maps_file, workdir, chunk_mb, timeout_s)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
    click.echo(table(result))


@main.command("server", hidden=True)
@click.option("--run-dir", type=click.Path(path_type=pathlib.Path), required=True)
@click.option("--size", type=int, required=True)
@click.option("--port-file", type=click.Path(path_type=pathlib.Path), required=True)
@click.option("--result", type=click.Path(path_type=pathlib.Path), required=True)
def server_cmd(run_dir, size, port_file, result):
    logging.basicConfig(level=logging.WARNING)
    run_server_role(run_dir, size, port_file, result)


@main.command("site", hidden=True)
@click.option("--server", required=True)
@click.option("--maps-file", type=click.Path(path_type=pathlib.Path), required=True)
@click.option("--workdir", type=click.Path(path_type=pathlib.Path), required=True)
@click.option("--chunk-mb", type=float, required=True)
@click.option("--result", type=click.Path(path_type=pathlib.Path), required=True)
def site_cmd(server, maps_file, workdir, chunk_mb, result):
    logging.basicConfig(level=logging.WARNING)
    run_site_role(server, maps_file, workdir, chunk_mb, result)


if __name__ == "__main__":
    main()
