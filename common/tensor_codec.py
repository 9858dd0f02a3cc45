"""Tensor <-> protobuf `Tensor{dtype, shape, data}`: the only way tensors cross the wire.

Bytes are little-endian and C-ordered, decoded with `torch.frombuffer`; nothing is ever unpickled. Decoding
checks everything a hostile or buggy peer could get wrong (dtype name, shape, byte count, size limit,
finiteness) and raises ProtocolError naming the problem, so callers can drop the message and go on.
"""

from __future__ import annotations

import math
import sys

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
FLOAT_WIRE_DTYPES = ("float32", "float16", "bfloat16")
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

if sys.byteorder != "little":  # torch.frombuffer reads native order; every machine we target is little-endian
    raise ImportError("asyndgan's tensor codec assumes a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot be sent; allowed: {', '.join(WIRE_DTYPES)}") from None


def encode(tensor: torch.Tensor, dtype: str | None = None) -> pb.Tensor:
    """Encode `tensor`, cast to wire dtype `dtype` (default: its own dtype)."""
    target = WIRE_DTYPES[dtype] if dtype is not None else tensor.dtype
    t = tensor.detach().to(device="cpu", dtype=target).contiguous()
    # bfloat16 has no numpy dtype: reinterpret as int16 to get at the raw bytes.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return pb.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=raw.numpy().tobytes())


def decode(
    msg: pb.Tensor,
    *,
    dtype: str | tuple[str, ...] | None = None,
    shape: tuple[int, ...] | None = None,
    max_bytes: int | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Decode a wire tensor into a new, writable CPU tensor of its wire dtype.

    dtype: the allowed dtype name(s); shape: the exact shape expected; max_bytes: refuse anything larger;
    finite: refuse NaN and infinity (floating dtypes only).
    """
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
