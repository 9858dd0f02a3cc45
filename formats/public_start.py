"""Public weights a run can start from: the files `asyndgan-server pretrain` writes and both sides read.

A pretraining folder holds, besides the usual run files (checkpoints/, samples/, tensorboard/):
- `public_start.json`: what was trained (model settings, steps, the public data's description) and where;
- `public_discriminator.safetensors`: the reference discriminator trained on the public data, one entry per
  parameter (`<modality>.<layer>...`), with its SHA-256 in public_start.json.

The server starts its generator from the folder's last checkpoint (`asyndgan-server start --init DIR`) and sends
the discriminator file to every site after Welcome (proto: PublicWeights), naming its SHA-256 in the site-facing
settings (`public_start`). A site reads the bytes only after their digest matched: safetensors holds raw tensors,
so even a file from a hostile server is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Iterator

import torch

from asyndgan.common.atomic import atomic_write, atomic_write_text
from asyndgan.common.errors import ConfigError, ProtocolError

RECORD = "public_start.json"
DISCRIMINATOR = "public_discriminator.safetensors"
PIECE_BYTES = 1 << 20
MAX_PIECES = 512  # 512 MiB: far above any discriminator we train, bounded for a site's memory


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def weights_from_bytes(data: bytes, expected: str) -> dict[str, torch.Tensor]:
    """The state dict in `data`, after checking its SHA-256 against `expected`; ProtocolError otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    found = digest(data)
    if found != expected:
        raise ProtocolError(f"the public discriminator weights received have SHA-256 {found[:16]}..., not the "
                            f"{expected[:16]}... the server announced: refusing them")
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise ProtocolError(f"the public discriminator weights cannot be read: {exc}") from None


def pieces(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(index, count, bytes) pieces of at most PIECE_BYTES."""
    count = max(1, -(-len(data) // PIECE_BYTES))
    for i in range(count):
        yield i, count, data[i * PIECE_BYTES:(i + 1) * PIECE_BYTES]


def write_folder(folder: pathlib.Path, discriminator: dict[str, torch.Tensor], record: dict) -> str:
    """Write the discriminator file and public_start.json (with its digest) into `folder`; returns the digest."""
    data = weights_to_bytes(discriminator)
    atomic_write(folder / DISCRIMINATOR, lambda f: f.write(data))
    sha = digest(data)
    atomic_write_text(folder / RECORD, json.dumps({**record, "discriminator_sha256": sha}, indent=1) + "\n")
    return sha


def read_folder(folder: pathlib.Path) -> tuple[dict, bytes]:
    """(public_start.json's record, the discriminator file's bytes, digest checked); ConfigError naming what is
    wrong."""
    path = folder / RECORD
    if not path.is_file():
        raise ConfigError(f"{folder} is not a pretraining folder ({RECORD} is missing); make one with "
                          "`asyndgan-server pretrain --data PUBLIC --out DIR`")
    try:
        record = json.loads(path.read_text())
        data = (folder / DISCRIMINATOR).read_bytes()
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the pretraining folder {folder}: {exc}") from None
    if digest(data) != record.get("discriminator_sha256"):
        raise ConfigError(f"{folder / DISCRIMINATOR} does not match the digest in {path}: the folder was changed "
                          "or damaged after pretraining")
    return record, data
