"""A site's discriminator factory: the models a site owns and never sends (see common/families.py).

The layers live in common/networks.py; a site imports nothing from the server's package.
"""

from __future__ import annotations

from torch import nn

from asyndgan.common.config import ModelConfig
from asyndgan.common.families import get_family
from asyndgan.common.networks import PatchGAN

__all__ = ["PatchGAN", "build_discriminators"]


def build_discriminators(model: ModelConfig, modalities: list[str]) -> nn.ModuleDict:
    """The discriminators of a site holding `modalities`, by name; an unknown family is a ConfigError."""
    return get_family(model.family).build_discriminators(model, modalities)
