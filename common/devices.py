"""Which torch device a command runs on: one rule for the demo, generation and segmentation.

`auto` picks the first CUDA GPU when torch sees one, else the CPU. A device torch cannot use (a typo, `cuda`
without a GPU, `cuda:3` on a one-GPU machine) is a ConfigError naming it, raised before any work starts.
"""

from __future__ import annotations

import torch

from asyndgan.common.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA GPU on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees only {torch.cuda.device_count()} CUDA GPU(s)")
    return device
