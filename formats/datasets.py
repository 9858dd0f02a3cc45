"""The one dataset interface every site data source plugs into, and the loaders behind it.

A `SiteDataset` gives the server-facing facts (family, sample count, modalities held, the uint8 label maps to
upload) and, privately, real samples by key. Keys are opaque positions 0..N-1; file names never leave the site.
`open_dataset` looks at a folder and picks the loader; a folder it does not recognise is a DataError that says
what it expected.

Layouts understood:
- brats: one folder per case with BraTS 2018-2021 or 2023+ NIfTI names (formats/brats.py);
- images: 2-D image files beside mask files, PNG or TIFF (formats/image_folders.py);
- arrays (`meta.json` kind "arrays"): `images.npy` float32 [N, C, H, W] in [-1, 1], `labels.npy` uint8
  [N, H, W], optionally `"patients": [id per sample]` in meta.json; written by `asyndgan data toy` and usable
  for any pre-processed 2-D data;
- samples1d (`meta.json` kind "samples1d"): `samples.npy` float32 [N], for the 1-D experiment.
BraTS and image folders are prepared once at the server's size and cached (formats/cache.py).
"""

from __future__ import annotations

import abc
import json
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from asyndgan.common.config import DataPrepConfig, SiteFacingConfig
from asyndgan.common.errors import DataError
from asyndgan.formats import brats, cache, image_folders


@dataclass(frozen=True)
class Patients:
    """Which patient each sample belongs to: the unit a private site protects (site_agent/privacy.py).

    index: int64 [N], patient number 0..count-1 of every sample; source: how the grouping was found ("case
    folders", "patient map", "meta.json", or "one sample = one patient" where the data say nothing)."""

    index: np.ndarray
    count: int
    source: str

    @classmethod
    def from_ids(cls, ids: list, source: str) -> "Patients":
        names: dict = {}
        index = np.array([names.setdefault(i, len(names)) for i in ids], dtype=np.int64)
        return cls(index, len(names), source)

    @classmethod
    def one_each(cls, n: int) -> "Patients":
        return cls(np.arange(n, dtype=np.int64), n, "one sample = one patient")

    def members(self) -> list[np.ndarray]:
        """Sample keys of every patient, patient by patient."""
        order = np.argsort(self.index, kind="stable")
        bounds = np.searchsorted(self.index[order], np.arange(self.count + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(self.count)]


class SiteDataset(abc.ABC):
    family: str
    modalities: list[str]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def patients(self) -> Patients:
        """The patient of every sample; by default each sample is its own patient."""
        return Patients.one_each(len(self))

    def label_maps(self) -> torch.Tensor | None:
        """uint8 [N, H, W] to upload at join, or None when the family has no condition to upload. May be
        memory-mapped (read only as needed): treat it as read-only."""
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
        ids = meta.get("patients")
        if ids is not None and (not isinstance(ids, list) or len(ids) != img.shape[0]):
            raise DataError(f"{root}/meta.json 'patients' must list one patient id per sample ({img.shape[0]})")
        self._patients = Patients.one_each(img.shape[0]) if ids is None else Patients.from_ids(ids, "meta.json")

    def patients(self) -> Patients:
        return self._patients

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


class PreparedImageDataset(SiteDataset):
    """Slices prepared into the site's cache: memory-mapped, read per batch."""

    family = "image2d"

    def __init__(self, prepared: cache.Prepared):
        self.prepared = prepared
        self.modalities = list(prepared.modalities)

    def __len__(self) -> int:
        return self.prepared.labels.shape[0]

    def patients(self) -> Patients:
        meta = self.prepared.meta
        if meta.get("kind") == "brats":  # one case folder = one patient; rows are in case order
            ids = [name for name, n in meta["cases"] for _ in range(int(n))]
            source = "case folders"
        elif "patients" in meta:
            ids, source = meta["patients"], "patient map"
        else:
            return Patients.one_each(len(self))
        if len(ids) != len(self):
            raise DataError(f"the prepared cache's patient list ({len(ids)} rows) does not match its {len(self)} "
                            "samples; delete the cache entry to prepare it again")
        return Patients.from_ids(ids, source)

    def label_maps(self) -> torch.Tensor:
        """The cache's labels.npy memory-mapped, not copied: pages are read as the upload and batches need them."""
        return torch.from_numpy(self.prepared.labels)

    def real(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.prepared.images[keys.numpy()].astype(np.float32))


def _load_npy(path: pathlib.Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # allow_pickle must stay False: data is input
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_meta(root: pathlib.Path) -> dict:
    path = root / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object")
    return meta


_FAMILIES = {"arrays": "image2d", "samples1d": "mlp1d", "brats": "image2d", "images": "image2d"}


def detect_layout(root: pathlib.Path) -> str:
    """'brats' | 'images' | 'arrays' | 'samples1d', or a DataError saying what was expected."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    if (root / "meta.json").is_file():
        kind = read_meta(root).get("kind")
        if kind not in ("arrays", "samples1d"):
            raise DataError(f"{root}/meta.json has kind {kind!r}; known kinds: arrays, samples1d")
        return kind
    if brats.is_brats_tree(root):
        return "brats"
    if image_folders.find_pairs(root):
        return "images"
    raise DataError(f"{root} holds no recognised dataset: expected BraTS case folders "
                    "(<case>/<case>_seg.nii.gz or <case>/<case>-seg.nii.gz), image/mask files "
                    "(images/ + masks/, or <name>.png + <name>_mask.png), or meta.json")


@dataclass
class DataSummary:
    family: str
    layout: str
    modalities: list[str]


def describe_dataset(root: pathlib.Path, prep: DataPrepConfig | None = None) -> DataSummary:
    """Family, layout and modalities, found cheaply (no volume is read) before joining."""
    prep = prep or DataPrepConfig()
    layout = detect_layout(root)
    if layout == "brats":
        mods = brats.held_modalities(root, prep)
    elif layout == "images":
        mods = image_folders.image_modalities(image_folders.find_pairs(root)[0][0])
    elif layout == "arrays":
        mods = list(read_meta(root).get("modalities", []))
    else:
        mods = []
    return DataSummary(_FAMILIES[layout], layout, mods)


def open_dataset(root: pathlib.Path, cfg: SiteFacingConfig, prep: DataPrepConfig | None = None) -> SiteDataset:
    """The dataset at the server's settings (preparing and caching it on the first start)."""
    prep = prep or DataPrepConfig()
    summary = describe_dataset(root, prep)
    if summary.family != cfg.model.family:
        raise DataError(f"{root} holds {summary.family} data but the server trains the {cfg.model.family} family")
    if summary.layout == "samples1d":
        return Samples1DDataset(root)
    if summary.layout == "arrays":
        return ArrayImageDataset(root, read_meta(root), cfg)
    i2d = cfg.model.image2d
    unknown = [m for m in summary.modalities if m not in i2d.modalities]
    if unknown:
        raise DataError(f"{root}: modalities {unknown} are not among the server's {i2d.modalities}")
    if summary.layout == "brats":
        if i2d.num_classes < brats.NUM_CLASSES:
            raise DataError(f"BraTS label maps need num_classes >= {brats.NUM_CLASSES}; the server has "
                            f"{i2d.num_classes}")
        ordered = [m for m in i2d.modalities if m in summary.modalities]
        return PreparedImageDataset(brats.prepare(root, ordered, prep, i2d.stored_size))
    return PreparedImageDataset(image_folders.prepare(root, prep, i2d.stored_size, i2d.num_classes))
