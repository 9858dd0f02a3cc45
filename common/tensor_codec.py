"""Tensor <-> protobuf `Tensor{dtype, shape, data}`: the only way tensors cross the wire.

Bytes are little-endian and C-ordered, decoded with `torch.frombuffer`; nothing is ever unpickled. Decoding
checks everything a hostile or buggy peer could get wrong (dtype name, shape, byte count, size limit,
finiteness) and raises ProtocolError naming the problem, so callers can drop the message and go on.
"""

from __future__ import annotations

import math
import sys
import zlib

import numpy as np
import torch

from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.errors import ProtocolError

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
# "q8" is not a torch dtype: 8-bit codes with a per-row (sample, channel) offset and step, decoded to float32.
Q8 = "q8"
FLOAT_WIRE_DTYPES = ("float32", "float16", "bfloat16", Q8)
WIRE_REGIONS = ("full", "brain")
MAX_PACKED_VALUES = 1 << 28  # a q8 or region tensor may not decode to more values than this (1 GiB of float32)
_Q_LEVELS = 255
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

if sys.byteorder != "little":  # torch.frombuffer reads native order; every machine we target is little-endian
    raise ImportError("asyndgan's tensor codec assumes a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; allowed: {', '.join(WIRE_DTYPES)}") from None


def encode(tensor: torch.Tensor, dtype: str | None = None, *, region: torch.Tensor | None = None,
           fill: float = 0.0, send_region: bool = True, stochastic: bool = False,
           generator: torch.Generator | None = None) -> pb.Tensor:
    """Encode `tensor`, cast to wire dtype `dtype` (default: its own dtype).

    region: bool [n, *spatial] for a tensor [n, c, *spatial]: only the values inside it are sent (for every
    channel); the receiver fills the rest with `fill`. send_region False leaves the region out of the message
    (an answer on a region both sides know). dtype "q8": 8-bit codes per (sample, channel) row, rounded to the
    nearest code, or stochastically (unbiased) with `stochastic`.
    """
    t = tensor.detach().to(device="cpu")
    values = t
    if region is not None:
        inside = _region_of(tuple(t.shape), region)
        values = t[inside]  # C order of the full tensor
    msg = pb.Tensor(shape=list(t.shape))
    if region is not None:
        msg.fill = float(fill)
        if send_region:
            msg.region = zlib.compress(np.packbits(region.to(torch.bool).numpy()).tobytes(), 3)
    if dtype == Q8:
        low, step, codes = _quantise(t.float(), None if region is None else inside, stochastic, generator)
        msg.dtype, msg.data = Q8, codes.numpy().tobytes()
        msg.q_low.extend(low.tolist())
        msg.q_step.extend(step.tolist())
        return msg
    target = WIRE_DTYPES[dtype] if dtype is not None else t.dtype
    v = values.to(dtype=target).contiguous()
    # bfloat16 has no numpy dtype: reinterpret as int16 to get at the raw bytes.
    raw = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
    msg.dtype, msg.data = dtype_name(v.dtype), raw.numpy().tobytes()
    return msg


def _region_of(shape: tuple[int, ...], region: torch.Tensor) -> torch.Tensor:
    """bool mask of `shape`: region [n, *spatial] repeated over the channel dimension 1."""
    if len(shape) < 3 or tuple(region.shape) != (shape[0], *shape[2:]):
        raise ProtocolError(f"region of shape {tuple(region.shape)} for a tensor of shape {shape}")
    return region.to(torch.bool).unsqueeze(1).expand(shape)


def _rows(shape: tuple[int, ...]) -> int:
    """q8 scale rows: one per (sample, channel); a tensor of fewer than two dimensions is one row."""
    return shape[0] * shape[1] if len(shape) >= 2 else 1


def _quantise(t: torch.Tensor, inside: torch.Tensor | None, stochastic: bool,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low [rows], step [rows], uint8 codes of the values sent) for float t."""
    rows = _rows(tuple(t.shape))
    flat = t.reshape(rows, math.prod(t.shape) // rows if rows else 0)
    mask = None if inside is None else inside.reshape(flat.shape)
    big = torch.finfo(torch.float32).max
    lo = (flat if mask is None else torch.where(mask, flat, big)).amin(dim=1) if flat.shape[1] else flat.new_zeros(
        flat.shape[0])
    hi = (flat if mask is None else torch.where(mask, flat, -big)).amax(dim=1) if flat.shape[1] else lo
    empty = lo > hi  # a row with nothing inside the region
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    step = (hi - lo) / _Q_LEVELS
    scaled = (flat - lo[:, None]) / torch.where(step > 0, step, torch.ones_like(step))[:, None]
    if stochastic:
        scaled = torch.floor(scaled + torch.rand(scaled.shape, generator=generator))
    else:
        scaled = torch.round(scaled)
    codes = scaled.clamp_(0, _Q_LEVELS).to(torch.uint8)
    codes = codes[mask] if mask is not None else codes.reshape(-1)
    return lo, step, codes


def decode(
    msg: pb.Tensor,
    *,
    dtype: str | tuple[str, ...] | None = None,
    shape: tuple[int, ...] | None = None,
    max_bytes: int | None = None,
    finite: bool = False,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a wire tensor into a new, writable CPU tensor of its wire dtype (float32 for "q8").

    dtype: the allowed dtype name(s); shape: the exact shape expected; max_bytes: refuse anything larger;
    finite: refuse NaN and infinity (floating dtypes only); region: the region this tensor answers on (a message
    may not then carry its own).
    """
    if msg.dtype == Q8 or msg.region or region is not None:
        return _decode_packed(msg, dtype=dtype, shape=shape, max_bytes=max_bytes, finite=finite, region=region)
    if msg.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"unknown tensor dtype {msg.dtype!r}")
    allowed = (dtype,) if isinstance(dtype, str) else dtype
    if allowed is not None and msg.dtype not in allowed:
        raise ProtocolError(f"tensor dtype {msg.dtype} where {' or '.join(allowed)} was expected")
    dims = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in dims):
        raise ProtocolError(f"tensor shape {dims} has a negative dimension")
    if shape is not None and dims != tuple(shape):
        raise ProtocolError(f"tensor shape {dims} where {tuple(shape)} was expected")
    torch_dtype = WIRE_DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(dims) * itemsize
    if max_bytes is not None and expected > max_bytes:
        raise ProtocolError(f"tensor of {expected} bytes exceeds the limit of {max_bytes}")
    if len(msg.data) != expected:
        raise ProtocolError(f"tensor data has {len(msg.data)} bytes; shape {dims} of {msg.dtype} needs {expected}")
    if expected == 0:
        return torch.empty(dims, dtype=torch_dtype)
    # bytearray: a private, writable copy, so the tensor never aliases the message buffer.
    t = torch.frombuffer(bytearray(msg.data), dtype=torch_dtype).reshape(dims)
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ProtocolError("tensor contains NaN or infinite values")
    return t


def decoded_region(msg: pb.Tensor) -> torch.Tensor | None:
    """The bool region [n, *spatial] a message carries (checked against its shape), or None."""
    if not msg.region:
        return None
    dims = _dims(msg)
    if len(dims) < 3:
        raise ProtocolError(f"a region on a tensor of shape {dims}")
    rshape = (dims[0], *dims[2:])
    nbits = math.prod(rshape)
    nbytes = (nbits + 7) // 8
    d = zlib.decompressobj()
    try:
        packed = d.decompress(msg.region, nbytes + 1)
    except zlib.error as exc:
        raise ProtocolError(f"tensor region is not a zlib stream: {exc}") from None
    if len(packed) != nbytes or d.unconsumed_tail or not d.eof:
        raise ProtocolError(f"tensor region does not hold the {nbits} bits of shape {rshape}")
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=nbits)
    return torch.from_numpy(bits.astype(bool)).reshape(rshape)


def _dims(msg: pb.Tensor) -> tuple[int, ...]:
    dims = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in dims):
        raise ProtocolError(f"tensor shape {dims} has a negative dimension")
    return dims


def _decode_packed(msg: pb.Tensor, *, dtype, shape, max_bytes, finite, region) -> torch.Tensor:
    """Decode "q8" and/or region-limited tensors to float (q8: float32; else the wire dtype)."""
    allowed = (dtype,) if isinstance(dtype, str) else dtype
    if allowed is not None and msg.dtype not in allowed:
        raise ProtocolError(f"tensor dtype {msg.dtype} where {' or '.join(allowed)} was expected")
    if msg.dtype != Q8 and msg.dtype not in FLOAT_WIRE_DTYPES:
        raise ProtocolError(f"a region on a tensor of dtype {msg.dtype!r}")
    dims = _dims(msg)
    if shape is not None and dims != tuple(shape):
        raise ProtocolError(f"tensor shape {dims} where {tuple(shape)} was expected")
    if region is not None and msg.region:
        raise ProtocolError("an answer carries a region of its own")
    count = math.prod(dims)
    itemsize = 1 if msg.dtype == Q8 else torch.empty((), dtype=WIRE_DTYPES[msg.dtype]).element_size()
    if count > MAX_PACKED_VALUES or (max_bytes is not None and count * itemsize > max_bytes):
        raise ProtocolError(f"tensor of shape {dims} exceeds the size limit")
    inside = None
    if region is None:
        region = decoded_region(msg)
    if region is not None:
        inside = _region_of(dims, region)
        count = int(region.sum()) * dims[1]
    if len(msg.data) != count * itemsize:
        raise ProtocolError(f"tensor data has {len(msg.data)} bytes; {count} values of {msg.dtype} need "
                            f"{count * itemsize}")
    if msg.dtype == Q8:
        rows = _rows(dims)
        if len(msg.q_low) != rows or len(msg.q_step) != rows:
            raise ProtocolError(f"q8 tensor has {len(msg.q_low)}/{len(msg.q_step)} scales for {rows} rows")
        low = torch.tensor(list(msg.q_low), dtype=torch.float32)
        step = torch.tensor(list(msg.q_step), dtype=torch.float32)
        if not bool(torch.isfinite(low).all() & torch.isfinite(step).all()) or bool((step < 0).any()):
            raise ProtocolError("q8 tensor with a non-finite or negative scale")
        codes = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8) if count else torch.empty(0, dtype=torch.uint8)
        # dense codes (0 outside the region), then one scale per row: a few whole-tensor operations
        dense = torch.zeros(dims, dtype=torch.uint8)
        if inside is not None:
            dense[inside] = codes
        else:
            dense = codes.reshape(dims)
        flat = dense.reshape(rows, math.prod(dims) // rows if rows else 0).float()
        full = torch.addcmul(low[:, None], flat, step[:, None]).reshape(dims)  # low + code x step
        if finite and not bool(torch.isfinite(full).all()):
            raise ProtocolError("tensor contains NaN or infinite values")
        if inside is None:
            return full
        if not math.isfinite(msg.fill):
            raise ProtocolError("tensor fill value is not finite")
        return full.masked_fill_(~inside, float(msg.fill))
    else:
        torch_dtype = WIRE_DTYPES[msg.dtype]
        values = torch.frombuffer(bytearray(msg.data), dtype=torch_dtype) if count else torch.empty(0, dtype=torch_dtype)
    if finite and not bool(torch.isfinite(values).all()):
        raise ProtocolError("tensor contains NaN or infinite values")
    if inside is None:
        return values.reshape(dims)
    if not math.isfinite(msg.fill):
        raise ProtocolError("tensor fill value is not finite")
    out = torch.full(dims, float(msg.fill), dtype=values.dtype)
    out[inside] = values
    return out
