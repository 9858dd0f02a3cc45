"""Hand-made BraTS-like volumes for tests: a brain-like ellipsoid with a three-label tumour."""

from __future__ import annotations

import numpy as np


def brain_with_tumour(shape: tuple[int, int, int], rng: np.random.Generator, enhancing_label: int = 4,
                      tumour_z_scale: float = 1.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(images by modality, seg in the file's label convention). tumour_z_scale > 1 keeps the tumour to the
    middle slices, so that some slices hold brain without tumour."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = x**2 + y**2 + (z / 1.2) ** 2 < 0.8
    r = np.sqrt((x - 0.2) ** 2 + (y + 0.1) ** 2 + (z * tumour_z_scale) ** 2)
    seg = np.zeros(shape, np.uint8)
    seg[(r < 0.45) & brain] = 2
    seg[(r < 0.3) & brain] = enhancing_label
    seg[(r < 0.15) & brain] = 1
    images = {m: np.where(brain, 100 + 50 * i + rng.normal(0, 5, shape) + 80 * (seg > 0), 0).astype(np.float32)
              for i, m in enumerate(("t1", "t1ce", "t2", "flair"))}
    return images, seg
