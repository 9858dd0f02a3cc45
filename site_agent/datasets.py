"""The one dataset interface every site data source plugs into, and the loaders behind it.

A `SiteDataset` gives the server-facing facts (family, sample count, modalities held, the uint8 label maps to
upload) and, privately, real samples by key. Keys are opaque positions 0..N-1; file names never leave the site.
`open_dataset` looks at a folder and picks the loader; a folder it does not recognise is a DataError that says
what it expected.

Layouts understood now:
- arrays (`meta.json` kind "arrays"): `images.npy` float32 [N, C, H, W] in [-1, 1], `labels.npy` uint8
  [N, H, W]; written by `asyndgan data toy` and usable for any pre-processed 2-D data.
- samples1d (`meta.json` kind "samples1d"): `samples.npy` float32 [N], for the 1-D experiment.
"""

from __future__ import annotations

import abc
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from asyndgan.common.config import SiteFacingConfig
from asyndgan.common.errors import DataError


class SiteDataset(abc.ABC):
    family: str
    modalities: list[str]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def label_maps(self) -> torch.Tensor | None:
        """uint8 [N, H, W] to upload at join, or None when the family has no condition to upload."""
        return None

    @abc.abstractmethod
    def real(self, keys: torch.Tensor) -> torch.Tensor:
        """Real samples for int64 keys [n]: float32 [n, C, H, W] (modalities in server order) or [n, 1]."""


class ArrayImageDataset(SiteDataset):
    family = "image2d"

    def __init__(self, root: pathlib.Path, meta: dict, cfg: SiteFacingConfig):
        images = _load_npy(root / "images.npy")
        labels = _load_npy(root / "labels.npy")
        if images.ndim != 4 or labels.ndim != 3 or images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
            raise DataError(f"{root}: images.npy {images.shape} and labels.npy {labels.shape} do not pair up "
                            "(expected [N, C, H, W] and [N, H, W])")
        held = list(meta.get("modalities", []))
        if len(held) != images.shape[1]:
            raise DataError(f"{root}/meta.json lists {len(held)} modalities for {images.shape[1]} image channels")
        wanted = cfg.model.image2d.modalities
        unknown = [m for m in held if m not in wanted]
        if unknown:
            raise DataError(f"{root}: modalities {unknown} are not among the server's {wanted}")
        order = [held.index(m) for m in wanted if m in held]
        self.modalities = [held[i] for i in order]
        num_classes = cfg.model.image2d.num_classes
        if labels.size and int(labels.max()) >= num_classes:
            raise DataError(f"{root}/labels.npy has label {int(labels.max())}; the server expects 0..{num_classes - 1}")
        size = cfg.model.image2d.stored_size
        img = torch.from_numpy(np.array(images[:, order], dtype=np.float32))
        lab = torch.from_numpy(np.array(labels, dtype=np.uint8))
        if img.shape[-1] != size or img.shape[-2] != size:
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
            lab = F.interpolate(lab[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)
        self._images = img
        self._labels = lab

    def __len__(self) -> int:
        return self._images.shape[0]

    def label_maps(self) -> torch.Tensor:
        return self._labels

    def real(self, keys: torch.Tensor) -> torch.Tensor:
        return self._images[keys]


class Samples1DDataset(SiteDataset):
    family = "mlp1d"
    modalities: list[str] = []

    def __init__(self, root: pathlib.Path):
        samples = _load_npy(root / "samples.npy")
        if samples.ndim != 1 or samples.shape[0] == 0:
            raise DataError(f"{root}/samples.npy must be a non-empty 1-D array, found shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise DataError(f"{root}/samples.npy contains NaN or infinite values")
        self._x = torch.from_numpy(np.array(samples, dtype=np.float32)).view(-1, 1)

    def __len__(self) -> int:
        return self._x.shape[0]

    def real(self, keys: torch.Tensor) -> torch.Tensor:
        return self._x[keys]


def _load_npy(path: pathlib.Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # allow_pickle must stay False: data is input
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_meta(root: pathlib.Path) -> dict:
    path = root / "meta.json"
    if not path.is_file():
        raise DataError(f"{root} holds no recognised dataset (expected meta.json with images.npy/labels.npy, "
                        "or samples.npy)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object")
    return meta


def detect_family(root: pathlib.Path) -> str:
    """The model family the data in `root` is for, without loading it."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    kind = read_meta(root).get("kind")
    families = {"arrays": "image2d", "samples1d": "mlp1d"}
    if kind not in families:
        raise DataError(f"{root}/meta.json has kind {kind!r}; known kinds: {', '.join(families)}")
    return families[kind]


def open_dataset(root: pathlib.Path, cfg: SiteFacingConfig) -> SiteDataset:
    family = detect_family(root)
    if family != cfg.model.family:
        raise DataError(f"{root} holds {family} data but the server trains the {cfg.model.family} family")
    if family == "image2d":
        return ArrayImageDataset(root, read_meta(root), cfg)
    return Samples1DDataset(root)


def modalities_of(root: pathlib.Path) -> list[str]:
    return list(read_meta(root).get("modalities", []))


class DataSummary:
    def __init__(self, family: str, num_samples: int, modalities: list[str]):
        self.family, self.num_samples, self.modalities = family, num_samples, modalities


def describe_dataset(root: pathlib.Path) -> DataSummary:
    """Family, sample count and modalities, read cheaply (memory-mapped headers) before joining."""
    family = detect_family(root)
    if family == "image2d":
        n = _load_npy(root / "labels.npy").shape[0]
        mods = modalities_of(root)
    else:
        n = _load_npy(root / "samples.npy").shape[0]
        mods = []
    if n == 0:
        raise DataError(f"{root} holds no samples")
    return DataSummary(family, int(n), mods)
