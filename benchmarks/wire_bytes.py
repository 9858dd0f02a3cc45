"""Bytes on the wire per step per site, against the raw tensor payload.

Runs a real server and two site processes on localhost; each site dials through a counting TCP proxy, so the
figures are what crosses the socket (HTTP/2 framing, headers and protobuf included), not a model of it. The
label-map upload at join is excluded by snapshotting the counters once training is under way.

    python benchmarks/wire_bytes.py [--size 64] [--batch 4] [--steps 60] [--wire-dtype float32]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import tempfile
import time


from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.config import load_config, ServerConfig
from asyndgan.common.logging_setup import setup_logging
from asyndgan.experiments.runner import Cluster
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.experiments.relay import Relay

log = logging.getLogger("wire_bytes")


def status(cluster: Cluster) -> pb.StatusReply:
    with cluster.channel() as ch:
        return pb_grpc.AsynDGANStub(ch).Status(pb.StatusRequest(), timeout=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "bfloat16", "q8"])
    ap.add_argument("--wire-region", default="full", choices=["full", "brain"])
    ap.add_argument("--insecure", action="store_true", help="plain text instead of mutual TLS")
    args = ap.parse_args()
    setup_logging("WARNING")
    sites = 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        folders = write_toy_sites(tmp / "data", sites=sites, per_site=[40, 20], size=args.size)
        cfg = load_config(ServerConfig, None, {
            "host": "127.0.0.1", "port": 0, "run_dir": str(tmp / "run"), "site.schedule.steps": args.steps,
            "train.batch_size": args.batch, "train.min_sites": sites, "train.wire_dtype": args.wire_dtype,
            "train.wire_region": args.wire_region,
            "site.model.image2d.image_size": args.size, "site.model.image2d.ngf": 8,
            "site.model.image2d.n_blocks": 2, "site.model.image2d.ndf": 8, "checkpoint_every": 10**6,
            "sample_every": 10**6,
        })
        cluster = Cluster(cfg, tls=not args.insecure)
        address = cluster.start_server()
        host, port = address.rsplit(":", 1)
        proxy = Relay((host, int(port)))
        for i, f in enumerate(folders):
            cluster.start_site(f"site{i + 1}", f, extra=["--server", f"127.0.0.1:{proxy.port}"])
        while (s := status(cluster)).step < 5:
            time.sleep(0.05)
        step0, (up0, down0) = s.step, proxy.counts()
        while (s := status(cluster)).step < args.steps - 5:
            time.sleep(0.05)
        step1, (up1, down1) = s.step, proxy.counts()
        cluster.wait(300)
    steps = step1 - step0
    raw = args.batch * 4 * args.size * args.size * 4  # float32, every pixel: one direction, one site, one step
    down = (down1 - down0) / steps / sites
    up = (up1 - up0) / steps / sites
    print(f"image2d {args.size}x{args.size}, 4 channels, batch {args.batch} per site, wire {args.wire_dtype} ({args.wire_region}), "
          f"{'plain text' if args.insecure else 'mutual TLS'}, {steps} steps measured, {sites} sites")
    print(f"raw float32 payload per site per step: {raw} B each way ({2 * raw} B both)")
    print(f"on the wire per site per step: down {down:.0f} B ({down / raw:.4f} x raw), "
          f"up {up:.0f} B ({up / raw:.4f} x raw), both {(up + down) / (2 * raw):.4f} x raw")


if __name__ == "__main__":
    main()
