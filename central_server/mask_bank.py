"""The bank of label maps each site uploaded at join, keyed by site id and opaque sample key.

Families without a condition to upload (mlp1d) register only a sample count. A site that rejoins replaces its
entry. Uploads are checked: dtype, shape, label range, chunk order and total count.
"""

from __future__ import annotations

import json
import pathlib
import threading

import numpy as np
import torch

from asyndgan.common import tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.atomic import atomic_write
from asyndgan.common.errors import ProtocolError


MAX_SAMPLES_PER_SITE = 5_000_000  # far above any real site (BraTS 2021: ~1,250 cases x ~80 tumour slices)


class LabelMapUpload:
    """Collects one site's ConditionChunk messages in order and checks each."""

    def __init__(self, size: int | None, num_classes: int | None, max_chunk_bytes: int,
                 max_samples: int = MAX_SAMPLES_PER_SITE):
        self.size, self.num_classes, self.max_samples = size, num_classes, max_samples
        self.max_chunk_bytes = max_chunk_bytes
        self.parts: list[torch.Tensor] = []
        self.received = 0

    def add(self, chunk: pb.ConditionChunk) -> None:
        if self.size is None:
            raise ProtocolError("this family takes no label-map upload")
        if chunk.index != len(self.parts) or chunk.first_key != self.received:
            raise ProtocolError(f"label-map chunk {chunk.index} (first key {chunk.first_key}) out of order; "
                                f"expected chunk {len(self.parts)} at key {self.received}")
        maps = tensor_codec.decode(chunk.maps, dtype="uint8", max_bytes=self.max_chunk_bytes)
        if maps.dim() != 3 or maps.shape[1:] != (self.size, self.size) or maps.shape[0] == 0:
            raise ProtocolError(f"label-map chunk {chunk.index} has shape {tuple(maps.shape)}; "
                                f"expected [n, {self.size}, {self.size}]")
        if self.received + maps.shape[0] > self.max_samples:
            raise ProtocolError(f"site uploads more than {self.max_samples} label maps")
        if int(maps.max()) >= self.num_classes:
            raise ProtocolError(f"label-map chunk {chunk.index} holds label {int(maps.max())}; "
                                f"allowed 0..{self.num_classes - 1}")
        self.parts.append(maps)
        self.received += maps.shape[0]

    def finish(self, num_chunks: int, num_samples: int) -> torch.Tensor | None:
        if num_chunks != len(self.parts):
            raise ProtocolError(f"site says it sent {num_chunks} chunks; {len(self.parts)} arrived")
        if not 0 < num_samples <= self.max_samples:
            raise ProtocolError(f"site declares {num_samples} samples (allowed 1..{self.max_samples})")
        if self.size is None:
            return None
        if self.received != num_samples:
            raise ProtocolError(f"site declared {num_samples} samples but uploaded {self.received} label maps")
        return torch.cat(self.parts)


class MaskBank:
    """Label maps (or just counts) per site. With a folder, each upload is also written there once, named by
    its digest, so a checkpoint can refer to it and a restarted server can verify and reload it."""

    def __init__(self, folder: pathlib.Path | None = None):
        self._lock = threading.Lock()
        self._maps: dict[str, torch.Tensor | None] = {}
        self._sizes: dict[str, int] = {}
        self._digests: dict[str, str] = {}
        self.folder = folder

    def put(self, site: str, num_samples: int, maps: torch.Tensor | None, digest: str = "") -> None:
        if maps is not None and self.folder is not None:
            self._write(site, maps, digest)
        with self._lock:
            self._maps[site] = maps
            self._sizes[site] = num_samples
            self._digests[site] = digest

    def _path(self, site: str, digest: str) -> pathlib.Path:
        return self.folder / f"{site}-{digest[:16]}.npy"

    def _write(self, site: str, maps: torch.Tensor, digest: str) -> None:
        path = self._path(site, digest)
        if not path.exists():
            atomic_write(path, lambda f: np.save(f, maps.numpy(), allow_pickle=False))

    def has(self, site: str, digest: str) -> bool:
        with self._lock:
            return bool(digest) and self._digests.get(site) == digest

    def size(self, site: str) -> int:
        with self._lock:
            return self._sizes[site]

    def maps(self, site: str, keys: torch.Tensor) -> torch.Tensor:
        """uint8 [b, H, W] for the keys."""
        with self._lock:
            maps = self._maps[site]
        if maps is None:
            raise KeyError(f"site {site} uploaded no label maps")
        return maps[keys]

    def sites(self) -> list[str]:
        with self._lock:
            return sorted(self._sizes)

    def state(self) -> str:
        """JSON for checkpoints: per site its sample count and the digest of its maps (a verified reference)."""
        with self._lock:
            return json.dumps({s: {"num_samples": self._sizes[s], "digest": self._digests[s]} for s in self._sizes})

    def restore(self, state: str) -> list[str]:
        """Reload the maps a checkpoint refers to, checking each file against its digest; returns the problems
        (a site whose maps are missing or altered is simply asked to upload again when it reconnects)."""
        from asyndgan.common.serde import maps_digest

        problems = []
        for site, entry in json.loads(state).items():
            digest = entry["digest"]
            if not digest:
                self.put(site, entry["num_samples"], None)
                continue
            path = self._path(site, digest) if self.folder is not None else None
            try:
                maps = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError, TypeError) as exc:
                problems.append(f"label maps of site {site} cannot be read from {path}: {exc}")
                continue
            if maps_digest(maps) != digest:
                problems.append(f"label maps of site {site} in {path} do not match the checkpoint's digest")
                continue
            with self._lock:
                self._maps[site], self._sizes[site], self._digests[site] = maps, int(entry["num_samples"]), digest
        return problems
