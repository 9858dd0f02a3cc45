"""Writing synthetic data so that a reader never sees half of a case.

- BraTS cases (NIfTI): each case is written into a hidden temporary folder beside its final place
  (`OUT/.<case>.tmp-<token>`) and renamed to `OUT/<case>` when every file is there; a failure (a full disk,
  Ctrl-C) removes the temporary folder. Images carry the source's affine and header (data type float32, the
  description set to "asyndgan synthetic ..."), the source's seg file is copied byte for byte, and
  `provenance.json` sits in the case folder.
- Image/mask files (PNG): `images/<name>.png`, `masks/<name>.<ext>` and the sidecar `images/<name>.json`, each
  written under a temporary name and renamed, the image last: the image-folder loader pairs an image with its
  mask, so a pair is visible only once complete. The PNG also carries the provenance in a text chunk.
- Arrays (`images.npy`, `labels.npy`, `meta.json` kind "arrays", for generators with channels that PNG cannot
  hold, such as four MRI modalities): the whole set in a temporary folder beside OUT, renamed to OUT at the end.

Intensities: G's output in [-1, 1] becomes 1 + (x + 1) * 500 inside the brain (so 1..1001) and exactly 0
outside it, like skull-stripped BraTS volumes: loaders that take "above 0" as the brain (ours, nnU-Net's
non-zero mask) find the same brain as the source's. PNG: (x + 1) * 127.5, rounded, 8 bits.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid

import nibabel as nib
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

TMP_MARK = ".tmp-"
INTENSITY_SCALE = 500.0


def remove_stale(folder: pathlib.Path) -> list[pathlib.Path]:
    """Remove temporary files and folders left by a run that was killed (they are hidden and never renamed)."""
    stale = [p for p in folder.rglob(f".*{TMP_MARK}*")] if folder.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: pathlib.Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaseFolder:
    """`with CaseFolder(out, name) as tmp:` write into tmp; on success tmp becomes out/name, on failure it goes."""

    def __init__(self, out: pathlib.Path, name: str):
        self.final = out / name
        self.tmp = out / f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> pathlib.Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def to_intensity(x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """float32 volume: 1 + (x + 1) * 500 where `inside`, 0 elsewhere (x in [-1, 1])."""
    return np.where(inside, 1.0 + (np.clip(x, -1, 1) + 1.0) * INTENSITY_SCALE, 0.0).astype(np.float32)


def save_nifti(path: pathlib.Path, data: np.ndarray, reference: nib.spatialimages.SpatialImage, note: str,
               dtype=np.float32) -> None:
    """`data` with the reference image's affine and header (`dtype`, no scaling, description `note`)."""
    header = reference.header.copy()
    img = type(reference)(data.astype(dtype, copy=False), reference.affine, header)
    img.set_data_dtype(dtype)
    if hasattr(img.header, "set_slope_inter"):
        img.header.set_slope_inter(1.0, 0.0)
    if "descrip" in img.header:
        img.header["descrip"] = note.encode("ascii", "replace")[:79]
    nib.save(img, str(path))


def write_json(path: pathlib.Path, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> uint8 [H, W] (one channel) or [H, W, 3]."""
    u = np.round((np.clip(image, -1, 1) + 1.0) * 127.5).astype(np.uint8)
    return u[0] if u.shape[0] == 1 else u.transpose(1, 2, 0)


def write_png_pair(out: pathlib.Path, name: str, image: np.ndarray, label_map: np.ndarray,
                   mask_file: pathlib.Path | None, provenance: dict) -> None:
    """images/<name>.png, masks/<name>.<ext> and images/<name>.json, renamed into place image last."""
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    targets = [images / f"{name}.json", masks / f"{name}{mask_file.suffix if mask_file else '.png'}",
               images / f"{name}.png"]
    tmps = [t.with_name(f".{t.name}{TMP_MARK}{token}") for t in targets]
    done: list[pathlib.Path] = []
    try:
        write_json(tmps[0], provenance)
        if mask_file is not None:
            shutil.copyfile(mask_file, tmps[1])
        else:
            Image.fromarray(label_map).save(tmps[1], format="PNG")
        info = PngInfo()
        info.add_text("asyndgan", json.dumps(provenance))
        Image.fromarray(to_uint8(image)).save(tmps[2], format="PNG", pnginfo=info)
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
            done.append(target)
    except BaseException:
        for p in [*tmps, *done]:
            p.unlink(missing_ok=True)
        raise


class ArraysWriter:
    """The arrays layout (images.npy float32 [N, C, S, S] in [-1, 1], labels.npy uint8 [N, S, S], meta.json),
    built in a temporary folder beside `out` and renamed to `out` by `commit`."""

    def __init__(self, out: pathlib.Path, n: int, channels: int, size: int):
        self.out = out
        for stale in out.parent.glob(f".{out.name}{TMP_MARK}*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = out.parent / f".{out.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        try:
            self.images = np.lib.format.open_memmap(self.tmp / "images.npy", "w+", np.float32, (n, channels, size, size))
            self.labels = np.lib.format.open_memmap(self.tmp / "labels.npy", "w+", np.uint8, (n, size, size))
            # Reserve the blocks now: a write into a memory map of a sparse file on a full disk is a SIGBUS, not
            # an OSError, and would leave no chance to clean up or say what happened.
            for name in ("images.npy", "labels.npy"):
                with open(self.tmp / name, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except BaseException:
            self.discard()
            raise

    def commit(self, modalities: list[str], provenance: dict) -> None:
        for arr in (self.images, self.labels):
            arr.flush()
        del self.images, self.labels
        write_json(self.tmp / "meta.json", {"kind": "arrays", "modalities": modalities, "synthetic": True})
        write_json(self.tmp / "provenance.json", provenance)
        if self.out.is_dir():
            self.out.rmdir()  # checked empty before writing began
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
