"""Several generators side by side on the same label maps: for each of a few real cases, one axial slice through
its tumour, its label map, the real image and every generator's image for that map. How a reader sees what a
recipe changed (the old recipe against the new, a lever against the baseline) without reading a table.

The cases are the first `count` of the folder in sorted order and the slice is the middle one of each tumour: no
choice by image content. Each generator is fed the label map made exactly as its sites made them
(synthesis/label_sources.py), at its own stored size.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import torch

from asyndgan.common.errors import ConfigError

log = logging.getLogger(__name__)


def load(path: pathlib.Path):
    """A run's checkpoint (or run folder) or a published generator file."""
    from asyndgan.formats.generator_file import load_exported, load_from_checkpoint

    if path.is_file() and path.suffix == ".safetensors":
        return load_exported(path)
    return load_from_checkpoint(path)


def _display(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """A real slice in [-1, 1] by its brain's 0.5 and 99.5 percentiles (the sites' intensity recipe)."""
    if not brain.any():
        return np.full(image.shape, -1.0, np.float32)
    lo, hi = np.percentile(image[brain], [0.5, 99.5])
    out = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 2 - 1
    out[~brain] = -1
    return out.astype(np.float32)


def compare(generators: dict[str, pathlib.Path], cases: pathlib.Path, out: pathlib.Path, count: int = 4,
            modality: str = "flair", device: str = "cpu") -> pathlib.Path:
    """Draw the grid into `out` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from asyndgan.experiments.synthetic_learning_report import pick_slices
    from asyndgan.synthesis import label_sources as sources
    from asyndgan.synthesis.generate import synthesise

    if not generators:
        raise ConfigError("give at least one generator (--generator NAME=CHECKPOINT)")
    loaded = {name: load(path) for name, path in generators.items()}
    for name, g in loaded.items():
        if modality not in g.model.image2d.modalities:
            raise ConfigError(f"generator {name} makes {', '.join(g.model.image2d.modalities)}, not {modality}")
    chosen = sources.brats_cases(cases)[:count]
    if not chosen:
        raise ConfigError(f"{cases} holds no BraTS case with a segmentation")
    rows = []
    for case in chosen:
        row: dict = {"case": case.name}
        for name, g in loaded.items():
            vol = sources.read_volume(case, g.model.image2d.stored_size, g.model.image2d.num_classes)
            if "z" not in row:
                picked = pick_slices(vol.seg, 3)
                if not picked:
                    break
                z = row["z"] = picked[len(picked) // 2]
                row["label"] = vol.maps[z]
                real = vol.images.get(modality)
                row["real"] = None if real is None else _display(  # [X, Y] -> rows Y, as the maps are
                    np.asarray(real.dataobj, dtype=np.float32)[..., z], vol.brain[..., z]).T
            fake = synthesise(g, vol.maps[[row["z"]]], torch.device(device), 1)[0]
            row[name] = fake[g.model.image2d.modalities.index(modality)]
        if "z" in row:
            rows.append(row)
    if not rows:
        raise ConfigError(f"no case of {cases} has a tumour slice to show")
    cols = ["label", "real", *loaded]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.2 * len(cols), 2.2 * len(rows)), squeeze=False)
    for r, item in enumerate(rows):
        for c, key in enumerate(cols):
            ax = axes[r][c]
            img = item.get(key)
            if img is not None:
                ax.imshow(img, cmap="viridis" if key == "label" else "gray", origin="lower",
                          vmin=0 if key == "label" else -1, vmax=4 if key == "label" else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("label map" if key == "label" else key, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{item['case']}\nz={item['z']}", fontsize=7)
    fig.suptitle(f"{modality.upper()}: the same label maps through each generator (real slice beside them)",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log.info("wrote %s (%d cases x %d generators)", out, len(rows), len(loaded))
    return out
