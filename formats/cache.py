"""The site's cache of prepared slices: memory-mapped arrays keyed by a hash of the sources and settings.

The first start turns NIfTI volumes or image files into `images.npy` (float16 [N, C, S, S] in [-1, 1]) and
`labels.npy` (uint8 [N, S, S]) under cache_dir/<kind>-<hash>/; later starts map them in seconds. The key covers
every source file's path, size and modification time plus every setting that changes the result, so a changed
file or setting builds a new entry (content is not hashed: reading every volume to hash it would cost as much
as preparing it). Entries are written to a temporary folder and renamed into place, so a crash mid-way never
leaves a half-written entry that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass

import numpy as np

from asyndgan.common.errors import DataError

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the preparation code changes what it writes (2: meta lists each row's patient)


@dataclass
class Prepared:
    images: np.ndarray  # float16 [N, C, S, S], memory-mapped
    labels: np.ndarray  # uint8 [N, S, S], memory-mapped
    modalities: list[str]
    meta: dict


def cache_key(kind: str, files: list[pathlib.Path], settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "version": CACHE_VERSION, "settings": settings}, sort_keys=True,
                        default=str).encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load(entry: pathlib.Path) -> Prepared | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r", allow_pickle=False)
        # Copy-on-write rather than read-only: torch can then wrap the mapping without a copy (label_maps() of a
        # BraTS site is gigabytes), and a stray write would change a private page, never the cache file.
        labels = np.load(entry / "labels.npy", mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if images.shape[0] != labels.shape[0] or images.shape[0] != meta.get("num_samples"):
        return None
    return Prepared(images, labels, meta["modalities"], meta)


class EntryWriter:
    """Fill a new cache entry of known size, then `commit()` it (or it is discarded)."""

    def __init__(self, root: pathlib.Path, name: str, n: int, channels: int, size: int):
        self.final = root / name
        self.tmp = root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        self.tmp.mkdir(parents=True)
        self.images = np.lib.format.open_memmap(self.tmp / "images.npy", "w+", np.float16, (n, channels, size, size))
        self.labels = np.lib.format.open_memmap(self.tmp / "labels.npy", "w+", np.uint8, (n, size, size))

    def commit(self, modalities: list[str], meta: dict, keep: np.ndarray | None = None) -> Prepared:
        """Write meta.json and move into place. `keep` (bool [N]) drops rows of cases that failed late."""
        images, labels = self.images, self.labels
        if keep is not None and not keep.all():
            n = int(keep.sum())
            compact_i = np.lib.format.open_memmap(self.tmp / "images2.npy", "w+", np.float16, (n, *images.shape[1:]))
            compact_l = np.lib.format.open_memmap(self.tmp / "labels2.npy", "w+", np.uint8, (n, *labels.shape[1:]))
            compact_i[:] = images[keep]
            compact_l[:] = labels[keep]
            del images, labels, self.images, self.labels
            compact_i.flush()
            compact_l.flush()
            os.replace(self.tmp / "images2.npy", self.tmp / "images.npy")
            os.replace(self.tmp / "labels2.npy", self.tmp / "labels.npy")
            images, labels = compact_i, compact_l
        images.flush()
        labels.flush()
        count = int(labels.shape[0])
        if count == 0:
            self.discard()
            raise DataError("no usable samples were found")
        (self.tmp / "meta.json").write_text(json.dumps({**meta, "modalities": modalities, "num_samples": count},
                                                       indent=2))
        if self.final.exists():  # another process built the same entry meanwhile: keep theirs
            self.discard()
        else:
            os.replace(self.tmp, self.final)
        prepared = load(self.final)
        if prepared is None:
            raise DataError(f"cache entry {self.final} cannot be read back")
        return prepared

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def cache_root(cache_dir: pathlib.Path) -> pathlib.Path:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {cache_dir}: {exc}") from None
    return cache_dir
