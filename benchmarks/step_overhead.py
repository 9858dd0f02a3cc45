"""What the network costs: the same training steps with sites in one process and with real site processes.

Both runs use the same trainer and site code (image2d, two sites); the in-process run calls the sites
directly (experiments.local_sites), the distributed one goes through gRPC on localhost with one process per
site. Prints seconds per step for each and the ratio.

    python benchmarks/step_overhead.py [--size 64] [--batch 4] [--steps 40]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

from asyndgan.central_server.trainer import Trainer
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.config import ServerConfig, load_config
from asyndgan.common.logging_setup import setup_logging
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from asyndgan.experiments.runner import Cluster
from asyndgan.formats.datasets import open_dataset
from asyndgan.demo_data.toy import write_toy_sites


def config(tmp: pathlib.Path, name: str, args) -> ServerConfig:
    return load_config(ServerConfig, None, {
        "host": "127.0.0.1", "port": 0, "run_dir": str(tmp / name), "site.schedule.steps": args.steps,
        "train.batch_size": args.batch, "train.min_sites": 2, "site.model.image2d.image_size": args.size,
        "site.model.image2d.ngf": 16, "site.model.image2d.n_blocks": 3, "site.model.image2d.ndf": 16,
        "checkpoint_every": 10**6, "sample_every": 10**6,
    })


def in_process(tmp, folders, args) -> float:
    cfg = config(tmp, "local", args)
    sessions = [LocalSession(f"site{i}", open_dataset(f, cfg.site), cfg.site) for i, f in enumerate(folders)]
    trainer = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), cfg.run_dir)
    trainer.train_step(sessions)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps - 1):
        trainer.train_step(sessions)
    return (time.perf_counter() - start) / (args.steps - 1)


def distributed(tmp, folders, args) -> float:
    cluster = Cluster(config(tmp, "grpc", args), threads=1)
    cluster.start_server()
    for i, f in enumerate(folders):
        cluster.start_site(f"site{i}", f)
    with cluster.channel() as ch:
        stub = pb_grpc.AsynDGANStub(ch)
        while (s := stub.Status(pb.StatusRequest())).step < 1:
            time.sleep(0.01)
        t0, step0 = time.perf_counter(), s.step
        while (s := stub.Status(pb.StatusRequest())).step < args.steps - 1:
            time.sleep(0.01)
        t1, step1 = time.perf_counter(), s.step
    cluster.wait(120)
    return (t1 - t0) / (step1 - step0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    setup_logging("WARNING")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        folders = write_toy_sites(tmp / "data", sites=2, per_site=[20, 20], size=args.size)
        local = in_process(tmp, folders, args)
        remote = distributed(tmp, folders, args)
    print(f"image2d {args.size}x{args.size}, batch {args.batch} per site, 2 sites, 1 torch thread per process")
    print(f"in one process:         {local * 1000:.1f} ms/step")
    print(f"over gRPC on localhost: {remote * 1000:.1f} ms/step ({remote / local:.2f} x; the sites' work runs in "
          "parallel processes here, serially in one process)")


if __name__ == "__main__":
    main()
