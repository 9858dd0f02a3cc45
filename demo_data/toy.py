"""Small generated data sets for tests and demos, written in the `arrays` / `samples1d` layouts.

`write_toy_sites`: brain-like ellipses with a tumour (necrotic core, enhancing rim, edema) and four channels
whose contrasts loosely follow T1, T1ce, T2 and FLAIR; label map = brain outline + tumour labels, as the
generator's input. Per-site gain and noise differ. Fast stand-in for MRI in tests and benchmarks (the phantom,
beside it, is the realistic one).
`write_gaussian_sites`: the 1-D experiment's subsets, one Gaussian per site.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from asyndgan.common.config import BRATS_MODALITIES

# Label values: 0 background, 1 brain outline, 2 necrotic core, 3 edema, 4 enhancing tumour.
# Mean intensity per tissue (brain, necrotic, edema, enhancing) for t1, t1ce, t2, flair, in [-1, 1].
_CONTRAST = {
    "t1": (0.2, -0.5, -0.1, 0.0),
    "t1ce": (0.2, -0.5, -0.1, 0.8),
    "t2": (-0.2, 0.8, 0.6, 0.3),
    "flair": (0.0, -0.3, 0.7, 0.4),
}


def toy_sample(size: int, rng: np.random.Generator, gain: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [4, size, size] in [-1, 1], label map uint8 [size, size])."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ay, ax = rng.uniform(0.36, 0.45), rng.uniform(0.30, 0.40)
    brain = (yy / ay) ** 2 + (xx / ax) ** 2 <= 1.0
    inner = (yy / (ay - 2.0 / size)) ** 2 + (xx / (ax - 2.0 / size)) ** 2 <= 1.0
    cy, cx = rng.uniform(-0.15, 0.15, size=2)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    r_edema, r_rim = rng.uniform(0.12, 0.2), rng.uniform(0.05, 0.1)
    r_core = r_rim * rng.uniform(0.3, 0.7)
    labels = np.zeros((size, size), np.uint8)
    labels[brain & ~inner] = 1
    tissue = np.zeros((size, size), np.int64)  # 0 brain, 1 necrotic, 2 edema, 3 enhancing
    tissue[(r < r_edema) & inner] = 2
    tissue[(r < r_rim) & inner] = 3
    tissue[(r < r_core) & inner] = 1
    labels[tissue == 2] = 3
    labels[tissue == 3] = 4
    labels[tissue == 1] = 2
    texture = np.sin(xx * rng.uniform(10, 20) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(10, 20)) * 0.1
    channels = []
    for m in BRATS_MODALITIES:
        mean = np.asarray(_CONTRAST[m], np.float32)[tissue]
        img = np.where(brain, gain * (mean + texture) + rng.normal(0, noise, (size, size)), -1.0)
        channels.append(np.clip(img, -1, 1))
    return np.stack(channels).astype(np.float32), labels


def write_toy_sites(out: pathlib.Path, sites: int = 3, per_site: list[int] | None = None, size: int = 64,
                    seed: int = 0) -> list[pathlib.Path]:
    per_site = per_site or [120, 60, 30][:sites] + [40] * max(0, sites - 3)
    rng = np.random.default_rng(seed)
    folders = []
    for j in range(sites):
        gain, noise = rng.uniform(0.85, 1.15), rng.uniform(0.02, 0.08)
        pairs = [toy_sample(size, rng, gain, noise) for _ in range(per_site[j])]
        folder = out / f"site{j + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "images.npy", np.stack([p[0] for p in pairs]))
        np.save(folder / "labels.npy", np.stack([p[1] for p in pairs]))
        (folder / "meta.json").write_text(json.dumps({"kind": "arrays", "modalities": list(BRATS_MODALITIES),
                                                      "source": "asyndgan toy", "seed": seed}))
        folders.append(folder)
    return folders


GAUSSIAN_SUBSETS = ((-3.0, 2.0), (1.0, 1.0), (3.0, 0.5))  # (mean, standard deviation), as in the paper


def write_gaussian_sites(out: pathlib.Path, per_site: int = 10_000, seed: int = 0,
                         subsets=GAUSSIAN_SUBSETS) -> list[pathlib.Path]:
    rng = np.random.default_rng(seed)
    folders = []
    for j, (mu, sd) in enumerate(subsets):
        folder = out / f"site{j + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "samples.npy", rng.normal(mu, sd, per_site).astype(np.float32))
        (folder / "meta.json").write_text(json.dumps({"kind": "samples1d", "mean": mu, "std": sd, "seed": seed}))
        folders.append(folder)
    return folders
