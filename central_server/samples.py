"""Pictures a person looks at during training: label map | synthetic modalities grids, 1-D histograms."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
from PIL import Image

# Label colours: background, brain outline, then tumour classes (necrotic, edema, enhancing, ...).
PALETTE = np.array([[0, 0, 0], [128, 128, 128], [220, 50, 50], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180]], dtype=np.uint8)


def label_to_rgb(labels: np.ndarray) -> np.ndarray:
    """uint8 [H, W] -> uint8 [H, W, 3]."""
    return PALETTE[np.minimum(labels, len(PALETTE) - 1)]


def image_to_rgb(img: np.ndarray) -> np.ndarray:
    """float [H, W] in [-1, 1] -> uint8 grey [H, W, 3]."""
    grey = ((np.clip(img, -1, 1) + 1) * 127.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


MIN_TILE = 192  # small training crops (64 px) are enlarged so that a person can see the anatomy
TITLE_H = 22


def save_image_grid(path: pathlib.Path, label_maps: torch.Tensor, fake: torch.Tensor, max_rows: int = 4,
                    titles: list[str] | None = None) -> np.ndarray:
    """One row per sample: label map, then each generated channel, under a row of column titles (e.g. the
    modalities). label_maps uint8 [n, H, W]; fake [n, C, H, W]. Returns the picture, uint8 [H, W, 3]."""
    from PIL import ImageDraw

    scale = max(1, -(-MIN_TILE // fake.shape[-1]))
    rows = []
    for i in range(min(max_rows, fake.shape[0])):
        tiles = [label_to_rgb(label_maps[i].numpy())]
        tiles += [image_to_rgb(fake[i, c].float().numpy()) for c in range(fake.shape[1])]
        row = np.concatenate(tiles, axis=1)
        rows.append(row.repeat(scale, axis=0).repeat(scale, axis=1))  # nearest: no invented detail
    grid = np.concatenate(rows, axis=0)
    if titles:
        header = Image.new("RGB", (grid.shape[1], TITLE_H), (255, 255, 255))
        draw = ImageDraw.Draw(header)
        tile_w = grid.shape[1] // (fake.shape[1] + 1)
        for col, title in enumerate(titles[: fake.shape[1] + 1]):
            draw.text((col * tile_w + 6, 5), title, fill=(0, 0, 0))
        grid = np.concatenate([np.asarray(header), grid], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


def save_histogram(path: pathlib.Path, samples: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(samples, bins=200, range=(-10, 10), density=True, color="tab:blue")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
