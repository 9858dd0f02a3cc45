"""The server's generator factory: the generator of the run's model family (see common/families.py).

The layers themselves live in common/networks.py, where sites can import them too; these names stay for the
server's callers.
"""

from __future__ import annotations

from torch import nn

from asyndgan.common.config import ModelConfig
from asyndgan.common.families import get_family
from asyndgan.common.networks import ResidualBlock, ResNetGenerator, UNetGenerator, mlp

__all__ = ["ResidualBlock", "ResNetGenerator", "UNetGenerator", "mlp", "build_generator"]


def build_generator(model: ModelConfig) -> nn.Module:
    """G for this model config; an unknown family is a ConfigError naming the known ones."""
    return get_family(model.family).build_generator(model)
