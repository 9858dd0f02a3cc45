"""The one place that converts between protobuf messages and domain types (`to_proto` / `from_proto` pairs).

Decoding validates: a message that is malformed, of the wrong dtype or shape, or non-finite raises
ProtocolError, never anything else, so transport code can drop it and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asyndgan.common import tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.conditions import Augmentation
from asyndgan.common.config import SiteFacingConfig, validate_json
from asyndgan.common.errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 1
MAX_LOSSES = 32


@dataclass
class Hello:
    site_id: str
    family: str
    modalities: list[str] = field(default_factory=list)
    maps_digest: str = ""
    protocol_version: int = PROTOCOL_VERSION


@dataclass
class Welcome:
    step: int
    wire_dtype: str
    run_id: str
    site_config: SiteFacingConfig
    have_maps: bool = False
    protocol_version: int = PROTOCOL_VERSION


@dataclass
class SyntheticBatch:
    step: int
    round: int
    keys: torch.Tensor  # int64 [n]
    fake: torch.Tensor  # [n, ...] floating
    aug: Augmentation


@dataclass
class ImageGradient:
    step: int
    round: int
    gradient: torch.Tensor  # same shape as the batch's fake
    losses: dict[str, float]
    num_samples: int


def hello_to_proto(h: Hello) -> pb.SiteMessage:
    return pb.SiteMessage(hello=pb.Hello(
        protocol_version=h.protocol_version, site_id=h.site_id, family=h.family, modalities=h.modalities,
        maps_digest=h.maps_digest,
    ))


def hello_from_proto(m: pb.Hello) -> Hello:
    if len(m.modalities) > 64:
        raise ProtocolError(f"site declares {len(m.modalities)} modalities")
    return Hello(site_id=m.site_id, family=m.family, modalities=[str(x)[:32] for x in m.modalities],
                 maps_digest=str(m.maps_digest)[:64], protocol_version=int(m.protocol_version))


def welcome_to_proto(w: Welcome) -> pb.ServerMessage:
    return pb.ServerMessage(welcome=pb.Welcome(
        protocol_version=w.protocol_version, step=w.step, wire_dtype=w.wire_dtype, run_id=w.run_id,
        site_config_json=w.site_config.model_dump_json(), have_maps=w.have_maps,
    ))


def welcome_from_proto(m: pb.Welcome) -> Welcome:
    if m.wire_dtype not in tensor_codec.FLOAT_WIRE_DTYPES:
        raise ProtocolError(f"server asks for wire dtype {m.wire_dtype!r}")
    try:
        cfg = validate_json(SiteFacingConfig, m.site_config_json)
    except ConfigError as exc:
        raise ProtocolError(f"server sent unusable settings: {exc}") from None
    return Welcome(step=int(m.step), wire_dtype=m.wire_dtype, run_id=m.run_id, site_config=cfg,
                   have_maps=bool(m.have_maps), protocol_version=int(m.protocol_version))


def maps_digest(maps: torch.Tensor | None) -> str:
    """sha256 of a site's label maps (shape and bytes): how a reconnecting site and the server agree that
    the server already holds them."""
    if maps is None:
        return ""
    import hashlib

    h = hashlib.sha256(str(tuple(maps.shape)).encode())
    h.update(maps.contiguous().numpy().tobytes())
    return h.hexdigest()


def batch_to_proto(b: SyntheticBatch, wire_dtype: str) -> pb.ServerMessage:
    return pb.ServerMessage(batch=pb.SyntheticBatch(
        step=b.step, round=b.round, keys=b.keys.tolist(), fake=tensor_codec.encode(b.fake, wire_dtype),
        augmentation=_aug_to_proto(b.aug),
    ))


def _aug_to_proto(a: Augmentation) -> pb.Augmentation:
    msg = pb.Augmentation(flip_h=a.flip_h.tolist(), flip_v=a.flip_v.tolist(), crop_size=a.crop_size)
    if a.crop_size:
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
    fake = tensor_codec.decode(m.fake, dtype=wire_dtype, finite=True).float()
    n = fake.shape[0] if fake.dim() else -1
    keys = torch.tensor(list(m.keys), dtype=torch.int64)
    if n <= 0 or keys.numel() != n:
        raise ProtocolError(f"batch for step {m.step} has {keys.numel()} keys for {n} samples")
    if bool((keys < 0).any()) or bool((keys >= num_samples).any()):
        raise ProtocolError(f"batch for step {m.step} names keys outside 0..{num_samples - 1}")
    aug = _aug_from_proto(m.augmentation, n, stored_size)
    return SyntheticBatch(step=int(m.step), round=int(m.round), keys=keys, fake=fake, aug=aug)


def _flags(values, n: int) -> torch.Tensor:
    if len(values) == 0:
        return torch.zeros(n, dtype=torch.bool)
    if len(values) != n:
        raise ProtocolError(f"augmentation has {len(values)} flags for {n} samples")
    return torch.tensor(list(values), dtype=torch.bool)


def gradient_to_proto(g: ImageGradient, wire_dtype: str) -> pb.SiteMessage:
    return pb.SiteMessage(gradient=pb.ImageGradient(
        step=g.step, round=g.round, gradient=tensor_codec.encode(g.gradient, wire_dtype),
        losses={k: float(v) for k, v in g.losses.items()}, num_samples=g.num_samples,
    ))


def gradient_from_proto(
    m: pb.ImageGradient, *, wire_dtype: str, shape: tuple[int, ...], max_bytes: int | None = None
) -> ImageGradient:
    """Decode and check a site's gradient against what the server sent: dtype, exact shape, finite values."""
    grad = tensor_codec.decode(m.gradient, dtype=wire_dtype, shape=shape, max_bytes=max_bytes, finite=True)
    if len(m.losses) > MAX_LOSSES:
        raise ProtocolError(f"gradient carries {len(m.losses)} losses (at most {MAX_LOSSES})")
    losses = {str(k)[:64]: float(v) for k, v in m.losses.items()}
    return ImageGradient(step=int(m.step), round=int(m.round), gradient=grad.float(), losses=losses,
                         num_samples=int(m.num_samples))
