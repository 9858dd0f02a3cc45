"""The bank of label maps each site uploaded at join, keyed by site id and opaque sample key.

Families without a condition to upload (mlp1d) register only a sample count. A site that rejoins replaces its
entry. Uploads are checked: dtype, shape, label range, chunk order and total count.
"""

from __future__ import annotations

import threading

import torch

from asyndgan.common import tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
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
    def __init__(self):
        self._lock = threading.Lock()
        self._maps: dict[str, torch.Tensor | None] = {}
        self._sizes: dict[str, int] = {}

    def put(self, site: str, num_samples: int, maps: torch.Tensor | None) -> None:
        with self._lock:
            self._maps[site] = maps
            self._sizes[site] = num_samples

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
