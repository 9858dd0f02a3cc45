"""The one place that converts between protobuf messages and domain types (`to_proto` / `from_proto` pairs).

Decoding validates: a message that is malformed, of the wrong dtype or shape, or non-finite raises
ProtocolError, never anything else, so transport code can drop it and carry on.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from asyndgan.common import tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.conditions import Augmentation
from asyndgan.common.config import SiteFacingConfig, validate_json
from asyndgan.common.errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 1
BACKGROUND = -1.0  # image value outside the brain: what a region-limited fake holds outside its region
MAX_LOSSES = 32


@dataclass
class PrivacyStatus:
    """A site's differential-privacy guarantee as it reports it (the site enforces it; see site_agent/privacy.py).
    enabled False with everything else zero: privacy off, or a site too old to say."""

    enabled: bool = False
    epsilon_budget: float = 0.0
    epsilon_spent: float = 0.0
    delta: float = 0.0
    exhausted: bool = False

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        state = "budget spent" if self.exhausted else "on"
        return f"{state}: epsilon {self.epsilon_spent:.2f} of {self.epsilon_budget:g} (delta {self.delta:g})"


def privacy_to_proto(p: PrivacyStatus | None) -> pb.Privacy | None:
    if p is None:
        return None
    return pb.Privacy(enabled=p.enabled, epsilon_budget=p.epsilon_budget, epsilon_spent=p.epsilon_spent,
                      delta=p.delta, exhausted=p.exhausted)


def privacy_from_proto(m: pb.Privacy) -> PrivacyStatus:
    values = [float(m.epsilon_budget), float(m.epsilon_spent), float(m.delta)]
    if not all(np.isfinite(v) and v >= 0 for v in values):
        raise ProtocolError(f"privacy report with values out of range: {values}")
    budget, spent, delta = values
    return PrivacyStatus(bool(m.enabled), budget, spent, delta, exhausted=bool(m.exhausted))


@dataclass
class Hello:
    site_id: str
    family: str
    modalities: list[str] = field(default_factory=list)
    maps_digest: str = ""
    protocol_version: int = PROTOCOL_VERSION
    privacy: PrivacyStatus = field(default_factory=PrivacyStatus)


@dataclass
class Leave:
    """The site stops for good (its privacy budget is spent, or it refuses the server's settings)."""

    reason: str
    privacy: PrivacyStatus = field(default_factory=PrivacyStatus)


MAX_REASON = 500


def leave_to_proto(m: Leave) -> pb.SiteMessage:
    return pb.SiteMessage(leave=pb.Leave(reason=m.reason[:MAX_REASON], privacy=privacy_to_proto(m.privacy)))


def leave_from_proto(m: pb.Leave) -> Leave:
    # The reason reaches logs and status: printable characters only, bounded.
    reason = "".join(c for c in str(m.reason)[:MAX_REASON] if c.isprintable())
    return Leave(reason=reason, privacy=privacy_from_proto(m.privacy))


@dataclass
class Welcome:
    step: int
    wire_dtype: str
    run_id: str
    site_config: SiteFacingConfig
    have_maps: bool = False
    protocol_version: int = PROTOCOL_VERSION
    wire_region: str = "full"


@dataclass
class SyntheticBatch:
    step: int
    round: int
    keys: torch.Tensor  # int64 [n]
    fake: torch.Tensor  # [n, ...] floating
    aug: Augmentation
    region: torch.Tensor | None = None  # bool [n, H, W]: the pixels that cross the wire (None: all)


@dataclass
class ImageGradient:
    step: int
    round: int
    gradient: torch.Tensor  # same shape as the batch's fake
    losses: dict[str, float]
    privacy: PrivacyStatus | None = None  # a private site's guarantee after this answer


def hello_to_proto(h: Hello) -> pb.SiteMessage:
    return pb.SiteMessage(hello=pb.Hello(
        protocol_version=h.protocol_version, site_id=h.site_id, family=h.family, modalities=h.modalities,
        maps_digest=h.maps_digest, privacy=privacy_to_proto(h.privacy),
    ))


def hello_from_proto(m: pb.Hello) -> Hello:
    if len(m.modalities) > 64:
        raise ProtocolError(f"site declares {len(m.modalities)} modalities")
    return Hello(site_id=m.site_id, family=m.family, modalities=[str(x)[:32] for x in m.modalities],
                 maps_digest=str(m.maps_digest)[:64], protocol_version=int(m.protocol_version),
                 privacy=privacy_from_proto(m.privacy))


def welcome_to_proto(w: Welcome) -> pb.ServerMessage:
    return pb.ServerMessage(welcome=pb.Welcome(
        protocol_version=w.protocol_version, step=w.step, wire_dtype=w.wire_dtype, run_id=w.run_id,
        site_config_json=w.site_config.model_dump_json(), have_maps=w.have_maps, wire_region=w.wire_region,
    ))


def welcome_from_proto(m: pb.Welcome) -> Welcome:
    if m.wire_dtype not in tensor_codec.FLOAT_WIRE_DTYPES:
        raise ProtocolError(f"server asks for wire dtype {m.wire_dtype!r}")
    region = m.wire_region or "full"
    if region not in tensor_codec.WIRE_REGIONS:
        raise ProtocolError(f"server asks for wire region {region!r}")
    try:
        cfg = validate_json(SiteFacingConfig, m.site_config_json)
    except ConfigError as exc:
        raise ProtocolError(f"server sent unusable settings: {exc}") from None
    return Welcome(step=int(m.step), wire_dtype=m.wire_dtype, run_id=m.run_id, site_config=cfg,
                   have_maps=bool(m.have_maps), protocol_version=int(m.protocol_version), wire_region=region)


# ---- label maps (join upload), Ready, Shutdown ---------------------------------------------------------------
LABEL_MAP_ENCODINGS = ("raw", "zlib")
# zlib level 3 on realistic 256 px BraTS-like maps (outline + tumour, ~95% zeros): ~40x smaller at ~530 MB/s on
# one core; level 6 reaches ~70x but at ~230 MB/s, which would make compression, not a 100 Mbit/s+ hospital
# uplink, the bottleneck of a one-time multi-GB upload.
ZLIB_LEVEL = 3
_DIGEST_SLICE_BYTES = 64 << 20  # hash a memory-mapped array in slices of this size: nothing is copied whole


@dataclass
class LabelMapChunk:
    index: int  # 0-based chunk number
    first_key: int  # key of the first map in the chunk
    maps: torch.Tensor  # uint8 [n, H, W] (on the site often a slice of a memory-mapped tensor)


@dataclass
class Ready:
    num_chunks: int
    num_samples: int
    # a private site's released statistics: name -> (value, noise std) (site_agent/site_statistics.py)
    statistics: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class Shutdown:
    reason: str
    final: bool  # True: the run is over; False: the server is stopping, reconnect later


def _uint8_rows(maps: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous uint8 numpy view of `maps` (a copy only when the input is not contiguous)."""
    arr = maps.numpy() if isinstance(maps, torch.Tensor) else maps
    if arr.dtype != np.uint8:
        raise ValueError(f"label maps must be uint8, not {arr.dtype}")
    return np.ascontiguousarray(arr)


class MapsDigest:
    """sha256 of a site's label maps, fed in key order chunk by chunk: how a reconnecting site and the server agree
    that the server already holds them, and the name of the server's bank file.

    It covers the per-map shape and the bytes of every map in order; the count follows from the byte length. The
    row count is deliberately not hashed first, so a server can digest an upload as it arrives, before it knows
    how many maps will come.
    """

    def __init__(self, map_shape: tuple[int, ...]):
        self._h = hashlib.sha256(f"asyndgan label maps v2 uint8 {list(map_shape)}\n".encode())
        self.map_shape = tuple(map_shape)
        self.count = 0

    def update(self, maps: torch.Tensor | np.ndarray) -> None:
        arr = _uint8_rows(maps)
        if arr.shape[1:] != self.map_shape:
            raise ValueError(f"maps of shape {arr.shape[1:]} in a digest of {self.map_shape} maps")
        self._h.update(arr.data)
        self.count += arr.shape[0]

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def maps_digest(maps: torch.Tensor | np.ndarray | None) -> str:
    """MapsDigest of a whole uint8 [N, H, W] array; a memory-mapped one is read in slices, never copied whole."""
    if maps is None:
        return ""
    digest = MapsDigest(tuple(maps.shape[1:]))
    per_slice = max(1, _DIGEST_SLICE_BYTES // max(1, int(np.prod(maps.shape[1:]))))
    for first in range(0, maps.shape[0], per_slice):
        digest.update(maps[first : first + per_slice])
    return digest.hexdigest()


def label_map_chunk_to_proto(c: LabelMapChunk, encoding: str = "zlib") -> pb.SiteMessage:
    """Encode one chunk; `zlib` compresses the raw bytes (the only copy made: the maps may be memory-mapped)."""
    arr = _uint8_rows(c.maps)
    if encoding == "zlib":
        data = zlib.compress(arr.data, ZLIB_LEVEL)
    elif encoding == "raw":
        data = arr.tobytes()
    else:
        raise ValueError(f"unknown label-map encoding {encoding!r}; known: {', '.join(LABEL_MAP_ENCODINGS)}")
    return pb.SiteMessage(conditions=pb.ConditionChunk(
        index=c.index, first_key=c.first_key, encoding=encoding,
        maps=pb.Tensor(dtype="uint8", shape=list(arr.shape), data=data),
    ))


def label_map_chunk_from_proto(m: pb.ConditionChunk, *, size: int | None, max_bytes: int) -> LabelMapChunk:
    """Decode and check one chunk: uint8 [n > 0, size, size] of at most max_bytes decoded.

    A compressed chunk is inflated with a ceiling of exactly the bytes its declared shape needs, so a hostile site
    cannot make the server allocate more than max_bytes (a zip bomb stops at the ceiling and is refused); a stream
    that yields fewer bytes, more bytes or trailing garbage is refused too. The label range is the caller's check.
    """
    if size is None:
        raise ProtocolError("this family takes no label-map upload")
    encoding = m.encoding or "raw"
    if encoding not in LABEL_MAP_ENCODINGS:
        raise ProtocolError(f"label-map chunk {m.index} has unknown encoding {encoding[:32]!r}; "
                            f"known: {', '.join(LABEL_MAP_ENCODINGS)}")
    t = m.maps
    if t.dtype != "uint8":
        raise ProtocolError(f"label-map chunk {m.index} has dtype {t.dtype[:32]!r}; expected uint8")
    dims = tuple(int(d) for d in t.shape)
    if len(dims) != 3 or dims[1:] != (size, size) or dims[0] <= 0:
        raise ProtocolError(f"label-map chunk {m.index} has shape {dims[:8]}; expected [n, {size}, {size}]")
    expected = dims[0] * size * size
    if expected > max_bytes:
        raise ProtocolError(f"label-map chunk {m.index} of {expected} bytes exceeds the limit of {max_bytes}")
    if encoding == "raw":
        maps = tensor_codec.decode(t, dtype="uint8", shape=dims, max_bytes=max_bytes)
    else:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(t.data, expected)
            # With the output full, what input remains may only be the stream's end (its checksum): one more
            # byte of output means the stream holds more than the shape says.
            extra = inflater.decompress(inflater.unconsumed_tail, 1) if inflater.unconsumed_tail else b""
        except zlib.error as exc:
            raise ProtocolError(f"label-map chunk {m.index} is not a valid zlib stream: {exc}") from None
        if extra or inflater.unconsumed_tail:
            raise ProtocolError(f"label-map chunk {m.index} inflates to more than the {expected} bytes of its "
                                f"shape {dims}")
        if not inflater.eof:
            raise ProtocolError(f"label-map chunk {m.index} is a zlib stream cut short")
        if inflater.unused_data or len(raw) != expected:
            raise ProtocolError(f"label-map chunk {m.index} inflates to {len(raw)} bytes (with "
                                f"{len(inflater.unused_data)} bytes after the stream); shape {dims} needs {expected}")
        # bytearray: a private, writable copy, so the tensor never aliases a read-only buffer.
        maps = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(dims)
    return LabelMapChunk(index=int(m.index), first_key=int(m.first_key), maps=maps)


def ready_to_proto(r: Ready) -> pb.SiteMessage:
    stats = [pb.Statistic(name=k, value=v, noise_std=sd) for k, (v, sd) in r.statistics.items()]
    return pb.SiteMessage(ready=pb.Ready(num_chunks=r.num_chunks, num_samples=r.num_samples, statistics=stats))


MAX_STATISTICS = 256  # a release is 4 numbers per modality


def ready_from_proto(m: pb.Ready) -> Ready:
    if m.num_chunks < 0 or m.num_samples < 0:
        raise ProtocolError(f"Ready declares {m.num_chunks} chunks and {m.num_samples} samples")
    if len(m.statistics) > MAX_STATISTICS:
        raise ProtocolError(f"Ready carries {len(m.statistics)} statistics (at most {MAX_STATISTICS})")
    stats: dict[str, tuple[float, float]] = {}
    for s in m.statistics:
        if not (0 < len(s.name) <= 100) or s.name in stats or not (math.isfinite(s.value) and
                                                                      math.isfinite(s.noise_std) and s.noise_std >= 0):
            raise ProtocolError(f"Ready carries a malformed statistic ({s.name[:100]!r}: {s.value!r}, noise "
                                f"{s.noise_std!r})")
        stats[s.name] = (float(s.value), float(s.noise_std))
    return Ready(num_chunks=int(m.num_chunks), num_samples=int(m.num_samples), statistics=stats)


def shutdown_to_proto(s: Shutdown) -> pb.ServerMessage:
    return pb.ServerMessage(shutdown=pb.Shutdown(reason=s.reason, final=s.final))


def shutdown_from_proto(m: pb.Shutdown) -> Shutdown:
    # The reason ends up in the site's log: one bounded line, whatever the server sent.
    reason = " ".join(str(m.reason).split())[:500]
    return Shutdown(reason=reason, final=bool(m.final))


def batch_to_proto(b: SyntheticBatch, wire_dtype: str) -> pb.ServerMessage:
    return pb.ServerMessage(batch=pb.SyntheticBatch(
        step=b.step, round=b.round, keys=b.keys.tolist(),
        fake=tensor_codec.encode(b.fake, wire_dtype, region=b.region, fill=BACKGROUND),
        augmentation=_aug_to_proto(b.aug),
    ))


def _aug_to_proto(a: Augmentation) -> pb.Augmentation:
    msg = pb.Augmentation(flip_h=a.flip_h.tolist(), flip_v=a.flip_v.tolist(), crop_size=a.crop_size)
    if a.crop_size and a.crop_y is not None and a.crop_x is not None:
        msg.crop_y.extend(a.crop_y.tolist())
        msg.crop_x.extend(a.crop_x.tolist())
    return msg


def _aug_from_proto(m: pb.Augmentation, n: int, stored_size: int | None) -> Augmentation:
    aug = Augmentation(_flags(m.flip_h, n), _flags(m.flip_v, n))
    if m.crop_size:
        if stored_size is None or not 0 < m.crop_size <= stored_size:
            raise ProtocolError(f"crop of {m.crop_size} for samples of size {stored_size}")
        if len(m.crop_y) != n or len(m.crop_x) != n:
            raise ProtocolError(f"augmentation has {len(m.crop_y)}/{len(m.crop_x)} crop offsets for {n} samples")
        ys, xs = torch.tensor(list(m.crop_y)), torch.tensor(list(m.crop_x))
        limit = stored_size - m.crop_size
        if bool(((ys < 0) | (ys > limit) | (xs < 0) | (xs > limit)).any()):
            raise ProtocolError(f"crop offsets outside 0..{limit}")
        aug.crop_size, aug.crop_y, aug.crop_x = int(m.crop_size), ys, xs
    return aug


def batch_from_proto(m: pb.SyntheticBatch, wire_dtype: str, num_samples: int,
                     stored_size: int | None = None) -> SyntheticBatch:
    region = tensor_codec.decoded_region(m.fake)
    fake = tensor_codec.decode(m.fake, dtype=wire_dtype, finite=True).float()
    n = fake.shape[0] if fake.dim() else -1
    keys = torch.tensor(list(m.keys), dtype=torch.int64)
    if n <= 0 or keys.numel() != n:
        raise ProtocolError(f"batch for step {m.step} has {keys.numel()} keys for {n} samples")
    if bool((keys < 0).any()) or bool((keys >= num_samples).any()):
        raise ProtocolError(f"batch for step {m.step} names keys outside 0..{num_samples - 1}")
    aug = _aug_from_proto(m.augmentation, n, stored_size)
    return SyntheticBatch(step=int(m.step), round=int(m.round), keys=keys, fake=fake, aug=aug, region=region)


def _flags(values, n: int) -> torch.Tensor:
    if len(values) == 0:
        return torch.zeros(n, dtype=torch.bool)
    if len(values) != n:
        raise ProtocolError(f"augmentation has {len(values)} flags for {n} samples")
    return torch.tensor(list(values), dtype=torch.bool)


def gradient_to_proto(g: ImageGradient, wire_dtype: str, region: torch.Tensor | None = None) -> pb.SiteMessage:
    """The answer to a batch: on the batch's region (not sent back), 8-bit codes rounded stochastically (unbiased:
    the server averages many of them)."""
    gradient = tensor_codec.encode(g.gradient, wire_dtype, region=region, send_region=False, stochastic=True)
    return pb.SiteMessage(gradient=pb.ImageGradient(
        step=g.step, round=g.round, gradient=gradient,
        losses={k: float(v) for k, v in g.losses.items()}, privacy=privacy_to_proto(g.privacy),
    ))


def gradient_from_proto(
    m: pb.ImageGradient, *, wire_dtype: str, shape: tuple[int, ...], max_bytes: int | None = None,
    region: torch.Tensor | None = None,
) -> ImageGradient:
    """Decode and check a site's gradient against what the server sent: dtype, exact shape, finite values, and
    values only on the region of the batch (zero outside it)."""
    grad = tensor_codec.decode(m.gradient, dtype=wire_dtype, shape=shape, max_bytes=max_bytes, finite=True,
                               region=region)
    if len(m.losses) > MAX_LOSSES:
        raise ProtocolError(f"gradient carries {len(m.losses)} losses (at most {MAX_LOSSES})")
    # Loss names reach logs, status output and TensorBoard tags: printable characters only.
    losses = {"".join(c for c in str(k)[:64] if c.isprintable()): float(v) for k, v in m.losses.items()}
    return ImageGradient(step=int(m.step), round=int(m.round), gradient=grad.float(), losses=losses,
                         privacy=privacy_from_proto(m.privacy))
