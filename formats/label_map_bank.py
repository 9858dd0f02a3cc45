"""The bank of label maps each site uploaded at join, keyed by site id and opaque sample key.

Scale: a large BraTS site uploads ~100k maps of 256 px (6-8 GB), so with a folder (the server's run folder) the
bank never holds maps in RAM. An upload streams chunk by chunk into a temporary file in the bank folder, each
chunk checked as it arrives (dtype, shape, label range, order, count); on Ready the file gets its final .npy
header and is renamed atomically to `<sha256 of the maps>.npy`, and `maps(site, keys)` reads rows from it
memory-mapped. File names come only from content digests (checked to be 64 hex digits), never from a site id,
so no id can steer where the bank writes or reads. Files are never rewritten in place: a site that uploads again
gets a new file, and a reader still holding the old mapping keeps reading valid rows. Without a folder (tests,
in-process use) maps stay in RAM.

Families without a condition to upload (mlp1d) register only a sample count. A site that rejoins replaces its
entry. Checkpoints keep `state()`: per site its sample count and digest; `restore` re-opens and verifies them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import threading
import uuid
from typing import BinaryIO
from dataclasses import dataclass

import numpy as np
import torch

from asyndgan.common.atomic import atomic_write
from asyndgan.common.errors import ProtocolError
from asyndgan.common.serde import LabelMapChunk, MapsDigest, maps_digest

log = logging.getLogger(__name__)

MAX_SAMPLES_PER_SITE = 5_000_000  # far above any real site (BraTS 2021: ~1,250 cases x ~80 tumour slices)
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_PREFIX = ".upload-"
# Every bank file starts with a .npy version 1.0 header of exactly this many bytes (magic, version, length, then
# the dict padded with spaces): the header of an upload is written before its row count is known and rewritten
# in place at the end, and 128 (a multiple of 64, as the format asks) fits any shape up to 20-digit dimensions.
_HEADER_BYTES = 128


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy 1.0 header for a C-ordered uint8 array of `shape`, padded to _HEADER_BYTES (numpy's format spec:
    magic, version, little-endian header length, a dict literal, spaces, newline)."""
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(int(d) for d in shape),)
    prefix = b"\x93NUMPY\x01\x00"
    room = _HEADER_BYTES - len(prefix) - 2
    if len(text) + 1 > room:
        raise ValueError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte header")
    body = text.ljust(room - 1).encode("ascii") + b"\n"
    return prefix + len(body).to_bytes(2, "little") + body


@dataclass
class UploadedMaps:
    """A finished upload: its digest, and either the bank file it was renamed to or (no folder) the maps."""

    digest: str
    num_samples: int
    path: pathlib.Path | None = None
    maps: torch.Tensor | None = None  # uint8 [N, H, W], only without a folder


class LabelMapUpload:
    """Collects one site's label-map chunks in order, checks each, and streams them to a temporary file in the
    bank folder (or, without a folder, keeps them in RAM). `discard()` removes the temporary file; the session
    calls it when the stream ends before Ready, and `finish` calls it when the upload fails its final checks."""

    def __init__(self, size: int | None, num_classes: int | None, max_chunk_bytes: int,
                 max_samples: int = MAX_SAMPLES_PER_SITE, folder: pathlib.Path | None = None):
        self.size, self.num_classes, self.max_samples = size, num_classes, max_samples
        self.max_chunk_bytes = max_chunk_bytes
        self.folder = folder
        self.chunks = 0
        self.received = 0
        self.tmp_path: pathlib.Path | None = None
        self._file: BinaryIO | None = None
        # The stream's reader thread adds chunks while another thread (the stream ending, a reaper) may discard:
        # the lock makes discard final, so no write can recreate a temporary file after it.
        self._lock = threading.Lock()
        self._discarded = False
        self._parts: list[torch.Tensor] = []
        self._digest = MapsDigest((size, size)) if size is not None else None

    def add(self, chunk: LabelMapChunk) -> None:
        """Check one decoded chunk (serde.label_map_chunk_from_proto checked its dtype, shape and size) and store it."""
        if self.size is None or self.num_classes is None or self._digest is None:
            raise ProtocolError("this family takes no label-map upload")
        maps, num_classes, digest = chunk.maps, self.num_classes, self._digest
        if chunk.index != self.chunks or chunk.first_key != self.received:
            raise ProtocolError(f"label-map chunk {chunk.index} (first key {chunk.first_key}) out of order; "
                                f"expected chunk {self.chunks} at key {self.received}")
        if maps.dim() != 3 or maps.shape[1:] != (self.size, self.size) or maps.shape[0] == 0:
            raise ProtocolError(f"label-map chunk {chunk.index} has shape {tuple(maps.shape)}; "
                                f"expected [n, {self.size}, {self.size}]")
        if self.received + maps.shape[0] > self.max_samples:
            raise ProtocolError(f"site uploads more than {self.max_samples} label maps")
        if int(maps.max()) >= num_classes:
            raise ProtocolError(f"label-map chunk {chunk.index} holds label {int(maps.max())}; "
                                f"allowed 0..{num_classes - 1}")
        with self._lock:
            if self._discarded:
                raise ProtocolError("label-map chunk after the upload was abandoned")
            digest.update(maps)
            if self.folder is None:
                self._parts.append(maps)
            else:
                self._write(maps)
            self.chunks += 1
            self.received += maps.shape[0]

    def _write(self, maps: torch.Tensor) -> None:
        assert self.folder is not None and self.size is not None  # add() writes only to a bank folder
        f = self._file
        if f is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Named by a random token, never by the site id; the header is a placeholder until finish().
            self.tmp_path = self.folder / f"{_UPLOAD_PREFIX}{uuid.uuid4().hex}.tmp"
            self._file = f = open(self.tmp_path, "wb")
            f.write(_npy_header((0, self.size, self.size)))
        try:
            f.write(maps.contiguous().numpy().data)
        except OSError:  # the server's disk, not the site, is at fault: no ProtocolError, but no temp file left
            self._drop()
            raise

    def finish(self, num_chunks: int, num_samples: int) -> UploadedMaps | None:
        """Final checks against the site's Ready; the stored upload (None for families without maps)."""
        with self._lock:
            return self._finish(num_chunks, num_samples)

    def _finish(self, num_chunks: int, num_samples: int) -> UploadedMaps | None:
        try:
            if self._discarded:
                raise ProtocolError("Ready after the upload was abandoned")
            if num_chunks != self.chunks:
                raise ProtocolError(f"site says it sent {num_chunks} chunks; {self.chunks} arrived")
            if not 0 < num_samples <= self.max_samples:
                raise ProtocolError(f"site declares {num_samples} samples (allowed 1..{self.max_samples})")
            if self.size is None:
                return None
            if self.received != num_samples:
                raise ProtocolError(f"site declared {num_samples} samples but uploaded {self.received} label maps")
            assert self._digest is not None  # made with the size
            digest = self._digest.hexdigest()
            if self.folder is None:
                return UploadedMaps(digest, num_samples, maps=torch.cat(self._parts))
            return UploadedMaps(digest, num_samples, path=self._commit(digest))
        except BaseException:
            self._drop()
            raise

    def _commit(self, digest: str) -> pathlib.Path:
        """Give the temporary file its real header, make it durable, and rename it to <digest>.npy."""
        f, self._file = self._file, None
        assert f is not None and self.folder is not None and self.tmp_path is not None and self.size is not None
        f.seek(0)
        f.write(_npy_header((self.received, self.size, self.size)))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        final = self.folder / f"{digest}.npy"
        # Same digest, same content: an existing file (an earlier upload of these maps) is kept as it is, so a
        # reader mapping it never sees it change.
        if final.exists():
            self.tmp_path.unlink()
        else:
            os.replace(self.tmp_path, final)
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.tmp_path = None
        return final

    def discard(self) -> None:
        """Drop whatever was received (the stream ended early, or the upload was refused). Idempotent; a
        finished upload's bank file is not touched."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        self._discarded = True
        f, self._file = self._file, None
        if f is not None:
            f.close()
        if self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)
            self.tmp_path = None
        self._parts = []


class LabelMapBank:
    """Label maps (or just counts) per site: memory-mapped digest-named files with a folder, RAM without."""

    def __init__(self, folder: pathlib.Path | None = None):
        self._lock = threading.Lock()
        self._maps: dict[str, np.ndarray | torch.Tensor | None] = {}
        self._sizes: dict[str, int] = {}
        self._digests: dict[str, str] = {}
        self.folder = folder
        if folder is not None and folder.is_dir():
            for stale in folder.glob(f"{_UPLOAD_PREFIX}*.tmp"):  # uploads cut off by a crash or kill
                stale.unlink(missing_ok=True)

    def upload(self, size: int | None, num_classes: int | None, max_chunk_bytes: int,
               max_samples: int = MAX_SAMPLES_PER_SITE) -> LabelMapUpload:
        """A new upload that stores into this bank's folder."""
        return LabelMapUpload(size, num_classes, max_chunk_bytes, max_samples, folder=self.folder)

    def add_upload(self, site: str, num_samples: int, uploaded: UploadedMaps | None) -> None:
        """Take a finished upload (None: a family without maps, only the count)."""
        if uploaded is None:
            self._set(site, num_samples, None, "")
        elif uploaded.path is not None:
            self._set(site, num_samples, self._open(uploaded.digest), uploaded.digest)
        else:
            self._set(site, num_samples, uploaded.maps, uploaded.digest)

    def put(self, site: str, num_samples: int, maps: torch.Tensor | None, digest: str = "") -> None:
        """Store maps already in memory (uint8 [N, H, W]); with a folder they are written once, by digest."""
        if maps is None:
            self._set(site, num_samples, None, "")
            return
        actual = maps_digest(maps)
        if digest and digest != actual:
            raise ValueError(f"digest {digest[:16]}... given for maps whose digest is {actual[:16]}...")
        if self.folder is None:
            self._set(site, num_samples, maps, actual)
            return
        path = self._path(actual)
        if not path.exists():
            arr = maps.contiguous().numpy()

            def write(f):
                f.write(_npy_header(tuple(arr.shape)))
                f.write(arr.data)

            atomic_write(path, write)
        self._set(site, num_samples, self._open(actual), actual)

    def _set(self, site: str, num_samples: int, maps, digest: str) -> None:
        with self._lock:
            self._maps[site] = maps
            self._sizes[site] = num_samples
            self._digests[site] = digest

    def _path(self, digest: str) -> pathlib.Path:
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"{digest[:80]!r} is not a label-map digest (64 lowercase hex digits)")
        assert self.folder is not None  # only a bank with a folder stores files
        return self.folder / f"{digest}.npy"

    def _open(self, digest: str) -> np.ndarray:
        return np.load(self._path(digest), mmap_mode="r", allow_pickle=False)  # allow_pickle must stay False

    def has(self, site: str, digest: str) -> bool:
        with self._lock:
            return bool(digest) and self._digests.get(site) == digest

    def size(self, site: str) -> int:
        with self._lock:
            return self._sizes[site]

    def maps(self, site: str, keys: torch.Tensor) -> torch.Tensor:
        """uint8 [b, H, W] for the keys: a fresh copy of those rows. The array is taken under the lock and read
        outside it, so a concurrent re-upload makes this return the old or the new site's rows, never a mix."""
        with self._lock:
            maps = self._maps[site]
        if maps is None:
            raise KeyError(f"site {site} uploaded no label maps")
        if isinstance(maps, torch.Tensor):
            return maps[keys]
        return torch.from_numpy(np.asarray(maps[keys.numpy()]))  # fancy indexing copies the rows

    def sites(self) -> list[str]:
        with self._lock:
            return sorted(self._sizes)

    def state(self) -> str:
        """JSON for checkpoints: per site its sample count and the digest of its maps (a verified reference)."""
        with self._lock:
            return json.dumps({s: {"num_samples": self._sizes[s], "digest": self._digests[s]} for s in self._sizes})

    def restore(self, state: str) -> list[str]:
        """Re-open the maps a checkpoint refers to, checking each file against its digest; returns the problems
        (a site whose maps are missing or altered is simply asked to upload again when it reconnects)."""
        problems = []
        for site, entry in json.loads(state).items():
            digest, num_samples = entry["digest"], int(entry["num_samples"])
            if not digest:
                self._set(site, num_samples, None, "")
                continue
            if self.folder is None:
                problems.append(f"label maps of site {site}: this bank has no folder to restore them from")
                continue
            try:
                path = self._path(digest)
                maps = self._open(digest)
            except (OSError, ValueError, TypeError) as exc:
                problems.append(f"label maps of site {site} cannot be read from the bank: {exc}")
                continue
            if maps.dtype != np.uint8 or maps.ndim != 3 or maps.shape[0] != num_samples:
                problems.append(f"label maps of site {site} in {path} are {maps.dtype} {maps.shape}; the checkpoint "
                                f"expects {num_samples} uint8 maps")
                continue
            if maps_digest(maps) != digest:
                problems.append(f"label maps of site {site} in {path} do not match the checkpoint's digest")
                continue
            self._set(site, num_samples, maps, digest)
        return problems
