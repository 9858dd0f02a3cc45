"""Site data speed: phantom generation, BraTS preparation (first and second start), loader throughput.

    python benchmarks/site_data.py [--cases 20] [--size 256] [--out /tmp/asyndgan-bench-data]

Prints: seconds to generate one full-size (240 x 240 x 155) phantom case; seconds to prepare a site of
`--cases` such cases on its first start and on its second start (from the cache); slices per second that the
site's loader delivers from the cache on one core, in random batches of 8 as training asks for them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # figures only, no progress bars

import argparse
import logging
import pathlib
import shutil
import time

import numpy as np
import torch

from asyndgan.common.config import DataPrepConfig, SiteFacingConfig
from asyndgan.common.logging_setup import setup_logging
from asyndgan.demo_data import phantom
from asyndgan.formats.datasets import open_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/asyndgan-bench-data"))
    args = ap.parse_args()
    setup_logging("WARNING")
    torch.set_num_threads(1)
    logging.getLogger("asyndgan").setLevel(logging.WARNING)

    template = phantom.load_template()
    profile = phantom.default_profiles(1, 0)[0]
    times = []
    for i in range(3):
        t = time.perf_counter()
        phantom.make_case(template, profile, np.random.default_rng(i))
        times.append(time.perf_counter() - t)
    print(f"phantom: {np.mean(times):.2f} s per full-size case (mean of 3, arrays only; "
          f"template load once beforehand)")
    from asyndgan.demo_data.phantom.presets import HETEROGENEOUS_PROFILES, PUBLIC_PROFILE

    for k, prof in enumerate([*HETEROGENEOUS_PROFILES, PUBLIC_PROFILE]):
        times = []
        for i in range(3):
            t = time.perf_counter()
            phantom.make_case(template, prof, np.random.default_rng(i))
            times.append(time.perf_counter() - t)
        print(f"phantom, {prof.name}: {np.mean(times):.2f} s per full-size case (mean of 3, arrays only)")

    data = args.out / "phantom"
    if not (data / "site1").is_dir() or len(list((data / "site1").iterdir())) != args.cases:
        shutil.rmtree(data, ignore_errors=True)
        t = time.perf_counter()
        phantom.write_phantom(data, phantom.PhantomConfig(sites=1, cases_per_site=[args.cases], test_cases=0),
                              progress=False)
        print(f"phantom: wrote {args.cases} cases (NIfTI, gzip) in {time.perf_counter() - t:.1f} s")
    cache_dir = args.out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    prep = DataPrepConfig(cache_dir=cache_dir)
    cfg = SiteFacingConfig.model_validate({"model": {"image2d": {"image_size": args.size}}})
    t = time.perf_counter()
    ds = open_dataset(data / "site1", cfg, prep)
    first = time.perf_counter() - t
    t = time.perf_counter()
    ds = open_dataset(data / "site1", cfg, prep)
    second = time.perf_counter() - t
    print(f"prepare {args.cases}-case site at 240x240x155 -> {len(ds)} slices of 4x{args.size}x{args.size}: "
          f"first start {first:.1f} s, second start {second:.2f} s")

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(ds), (8,), generator=gen) for _ in range(400)]
    ds.real(batches[0])
    t = time.perf_counter()
    for keys in batches:
        ds.real(keys)
    rate = 8 * len(batches) / (time.perf_counter() - t)
    print(f"loader: {rate:.0f} slices/s from the cache on one core (random batches of 8, float32 out)")


if __name__ == "__main__":
    main()
