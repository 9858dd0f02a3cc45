"""2-D image folders (histopathology-like data): image files beside mask files, PNG or TIFF.

Two layouts are recognised: `images/<name>.<ext>` with `masks/<name>.<ext>`, or `<name>.<ext>` with
`<name>_mask.<ext>` in one folder. Images are greyscale (modality "gray") or RGB ("r", "g", "b"), scaled to
[-1, 1]; masks hold class labels (a 0/255 mask becomes 0/1) and are the generator's label map as they are.
Both are resized to the server's size (images bilinear, masks nearest) and cached like BraTS slices.
An optional `patients.csv` (`file,patient`) says which images belong to one patient, the unit a private site
protects (site_agent/privacy.py); without it each image is its own patient.
"""

from __future__ import annotations

import csv
import logging
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from asyndgan.common.config import DataPrepConfig
from asyndgan.common.errors import DataError
from asyndgan.formats import cache

log = logging.getLogger(__name__)
EXTENSIONS = (".png", ".tif", ".tiff")


def find_pairs(root: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """(image, mask) pairs in either layout; empty when the folder is not an image folder."""
    def images_in(folder):
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())

    if (root / "images").is_dir() and (root / "masks").is_dir():
        masks = {p.stem: p for p in images_in(root / "masks")}
        return [(p, masks[p.stem]) for p in images_in(root / "images") if p.stem in masks]
    files = images_in(root)
    masks = {p.stem[: -len("_mask")]: p for p in files if p.stem.endswith("_mask")}
    return [(p, masks[p.stem]) for p in files if not p.stem.endswith("_mask") and p.stem in masks]


PATIENT_MAP = "patients.csv"


def read_patient_map(root: pathlib.Path, pairs: list[tuple[pathlib.Path, pathlib.Path]]) -> list[str] | None:
    """Each pair's patient from `root/patients.csv` (columns `file,patient`; `file` is the image's name, or its
    path under `root`), or None when there is no map (then one image is one patient). A map that leaves an image
    out, or names one twice, is a DataError: a patient's images must all be known to protect the patient."""
    path = root / PATIENT_MAP
    if not path.is_file():
        return None
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read the patient map {path}: {exc}") from None
    if not rows or not {"file", "patient"} <= set(rows[0]):
        raise DataError(f"the patient map {path} needs the columns file,patient (one row per image)")
    by_file: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        file, patient = (row.get("file") or "").strip(), (row.get("patient") or "").strip()
        if not file or not patient:
            raise DataError(f"{path} line {i}: empty file or patient")
        if file in by_file:
            raise DataError(f"{path} line {i}: {file} is listed twice")
        by_file[file] = patient
    out, missing = [], []
    for image, _ in pairs:
        pid = by_file.get(str(image.relative_to(root)), by_file.get(image.name))
        if pid is None:
            missing.append(image.name)
        out.append(pid or "")
    if missing:
        raise DataError(f"the patient map {path} does not name the patient of {len(missing)} image(s), e.g. "
                        f"{missing[0]}; every image needs its patient")
    return out


def _open(path: pathlib.Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def image_modalities(path: pathlib.Path) -> list[str]:
    return ["gray"] if _open(path).mode in ("L", "I", "I;16", "F", "1") else ["r", "g", "b"]


def load_pair(image: pathlib.Path, mask: pathlib.Path, size: int, channels: int, num_classes: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(float16 [C, size, size] in [-1, 1], uint8 [size, size])."""
    img = _open(image)
    arr = np.asarray(img.convert("RGB") if channels == 3 else img, dtype=np.float32)
    if channels == 1 and arr.ndim == 3:
        raise DataError(f"{image} is a colour image in a greyscale set")
    scale = 65535.0 if img.mode.startswith("I") and arr.max() > 255 else 255.0
    arr = arr / scale * 2 - 1
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    m = read_mask(mask)
    if m.shape != arr.shape[1:]:
        raise DataError(f"{mask} is {m.shape[1]}x{m.shape[0]} but {image} is {arr.shape[2]}x{arr.shape[1]}")
    if int(m.max()) >= num_classes:
        raise DataError(f"{mask} has label {int(m.max())}; the server expects 0..{num_classes - 1}")
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(arr))[None], size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)[0].clamp(-1, 1)
    return t.numpy().astype(np.float16), resize_mask(m, size)


def read_mask(path: pathlib.Path) -> np.ndarray:
    """A mask file's class labels [H, W] (a colour mask's first channel; a 0/255 mask becomes 0/1). Shared with
    `asyndgan generate`, which must read masks the way the sites did."""
    m = np.asarray(_open(path))
    if m.ndim == 3:
        m = m[..., 0]
    if set(np.unique(m).tolist()) <= {0, 255}:
        m = (m > 0).astype(np.uint8)
    return m


def resize_mask(m: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size]: a label map resized without inventing labels (nearest-exact)."""
    mt = F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(size, size),
                       mode="nearest-exact")[0, 0]
    return mt.numpy().astype(np.uint8)


def prepare(root: pathlib.Path, prep: DataPrepConfig, size: int, num_classes: int) -> cache.Prepared:
    pairs = find_pairs(root)
    if not pairs:
        raise DataError(f"{root} holds no image/mask pairs")
    modalities = image_modalities(pairs[0][0])
    patients = read_patient_map(root, pairs)
    settings = {"size": size, "num_classes": num_classes, "modalities": modalities}
    sources = [f for p in pairs for f in p] + ([root / PATIENT_MAP] if patients is not None else [])
    name = f"images-{cache.cache_key('images', sources, settings)}"
    root_dir = cache.cache_root(prep.cache_dir)
    if (hit := cache.load(root_dir / name)) is not None:
        return hit
    writer = cache.EntryWriter(root_dir, name, len(pairs), len(modalities), size)
    keep = np.ones(len(pairs), bool)
    try:
        for i, (image, mask) in enumerate(tqdm(pairs, desc="preparing images", unit="image")):
            try:
                writer.images[i], writer.labels[i] = load_pair(image, mask, size, len(modalities), num_classes)
            except DataError as exc:
                if prep.on_bad_case == "error":
                    raise
                log.warning("skipping an image: %s", exc)
                keep[i] = False
        meta: dict[str, object] = {"kind": "images", "source": str(root)}
        if patients is not None:
            meta["patients"] = [pid for pid, kept in zip(patients, keep) if kept]
        return writer.commit(modalities, meta, keep)
    except BaseException:
        writer.discard()
        raise
