"""Model families as plug-ins: everything that differs between `image2d` and `mlp1d`, behind `get_family(name)`.

The engine (trainer, protocol, site worker) only knows "condition tensor in, sample tensor out, gradient back".
A `Family` says what a condition is, whether a site uploads label maps, how augmentation is drawn, the shape of
G's output, which generator and discriminators to build, and whether a sample's key pairs its condition with a
real image (`paired`: conditional discriminators and an L1 term in L_G). Families are stateless; every method
takes the run's ModelConfig, so one object serves every run. `get_family` fails loudly on unknown names.

- image2d: label map -> multi-channel image. The condition is the site's uploaded uint8 label map, one-hot
  [n, K, H, W], cropped and flipped by the server's draw; one discriminator per modality the site holds, each
  seeing the one-hot map and that one channel (or one over every channel). Its generators and discriminator
  networks are members registered by name (`register_generator`, `register_discriminator`) and chosen in the
  server's config (`model.image2d.generator`, `model.image2d.d_network`): a new one is a function registered in
  an imported module, nothing else changes. The server builds the generator, each site its discriminators, so a
  site refuses a discriminator it does not know, and never needs to know the generator.
- mlp1d: the paper's 1-D experiment. The condition is Gaussian noise drawn by the server; nothing is uploaded,
  there is no augmentation, the discriminator is an unconditional MLP on the scalar sample.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from asyndgan.common.conditions import Augmentation, draw_augmentation, one_hot
from asyndgan.common.config import Image2DConfig, ModelConfig
from asyndgan.common.errors import ConfigError
from asyndgan.common.networks import (MultiScalePatchGAN, PatchGAN, ResNetGenerator, SPADEGenerator, UNetGenerator,
                                      initialise, mlp)


class Family(abc.ABC):
    name: ClassVar[str]
    paired: ClassVar[bool]  # a key pairs a condition with a real image: conditional D, L1 term in L_G
    uploads_maps: ClassVar[bool]  # sites upload uint8 label maps at join; the server's condition is made from them
    preview: ClassVar[Literal["grid", "histogram"]]  # what the server draws in samples/: label map | images, or 1-D

    def modalities(self, model: ModelConfig) -> list[str]:
        """The channels G emits, in order (empty when the sample has no named channels)."""
        return []

    def channels_for(self, model: ModelConfig, held: list[str]) -> list[int] | None:
        """Indices of G's channels that a site holding `held` is sent; None: all of them."""
        return None

    def stored_size(self, model: ModelConfig) -> int | None:
        """Side of the label maps and images as sites store and upload them; None without label maps."""
        return None

    def num_classes(self, model: ModelConfig) -> int | None:
        """Label values 0..K-1 in the uploaded maps; None without label maps."""
        return None

    @abc.abstractmethod
    def condition(self, model: ModelConfig, label_maps: torch.Tensor | None, n: int,
                  rng: torch.Generator | None = None) -> torch.Tensor:
        """G's input for n samples. label_maps: uint8 [n, H, W], already augmented, for families that upload
        them (None otherwise); rng: drawn from by families whose condition is random."""

    def discriminator_condition(self, model: ModelConfig, label_maps: torch.Tensor | None) -> torch.Tensor | None:
        """What a site's discriminators see beside the sample (None: they are unconditional)."""
        return None

    def draw_augmentation(self, model: ModelConfig, n: int, flip: bool, rng: torch.Generator) -> Augmentation:
        """The server's per-sample augmentation for n samples; draws nothing from rng when there is none."""
        return Augmentation.none(n)

    @abc.abstractmethod
    def sample_shape(self, model: ModelConfig, n: int, channels: int | None = None) -> tuple[int, ...]:
        """Shape of G's output for n samples (`channels`: how many of G's channels a site is sent)."""

    @abc.abstractmethod
    def build_generator(self, model: ModelConfig) -> nn.Module: ...

    @abc.abstractmethod
    def build_discriminators(self, model: ModelConfig, modalities: list[str]) -> nn.ModuleDict:
        """The discriminators of a site holding `modalities`, by name."""

    def discriminator_inputs(self, names: list[str], samples: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(discriminator name, the part of samples [n, C, ...] it judges) pairs."""
        (name,) = names
        return [(name, samples)]


_FAMILIES: dict[str, Family] = {}


def register_family(family: type[Family]) -> type[Family]:
    """Class decorator: make a family available to `get_family` under its name."""
    _FAMILIES[family.name] = family()
    return family


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(family_names())}") from None


JOINT = "joint"  # the name of the one discriminator over every modality (image2d.discriminator = "joint")

# image2d's members. A generator: (config, input channels = classes, output channels = modalities) -> module
# mapping a one-hot map [n, K, H, W] to images [n, C, H, W] in [-1, 1]. A discriminator network: (config, input
# channels) -> module mapping [n, in_ch, H, W] to logits [n, ...] (every logit is one real/fake judgement).
GeneratorBuilder = Callable[[Image2DConfig, int, int], nn.Module]
DiscriminatorBuilder = Callable[[Image2DConfig, int], nn.Module]
_GENERATORS: dict[str, GeneratorBuilder] = {}
_DISCRIMINATORS: dict[str, DiscriminatorBuilder] = {}


def register_generator(name: str) -> Callable[[GeneratorBuilder], GeneratorBuilder]:
    """Decorator: make an image2d generator available as `model.image2d.generator = name`."""
    def add(build: GeneratorBuilder) -> GeneratorBuilder:
        _GENERATORS[name] = build
        return build
    return add


def register_discriminator(name: str) -> Callable[[DiscriminatorBuilder], DiscriminatorBuilder]:
    """Decorator: make an image2d discriminator network available as `model.image2d.d_network = name`."""
    def add(build: DiscriminatorBuilder) -> DiscriminatorBuilder:
        _DISCRIMINATORS[name] = build
        return build
    return add


def image2d_members() -> dict[str, list[str]]:
    return {"generator": sorted(_GENERATORS), "d_network": sorted(_DISCRIMINATORS)}


def _member(table: dict, name: str, what: str):
    if name not in table:
        raise ConfigError(f"unknown image2d {what} {name!r}; registered: {', '.join(sorted(table))}")
    return table[name]


@register_generator("resnet")
def _resnet(cfg: Image2DConfig, in_ch: int, out_ch: int) -> nn.Module:
    """pix2pix's ResNet generator: the papers'."""
    return ResNetGenerator(in_ch, out_ch, cfg.ngf, cfg.n_blocks)


@register_generator("unet")
def _unet(cfg: Image2DConfig, in_ch: int, out_ch: int) -> nn.Module:
    return UNetGenerator(in_ch, out_ch, cfg.ngf, cfg.unet_depth)


@register_generator("spade")
def _spade(cfg: Image2DConfig, in_ch: int, out_ch: int) -> nn.Module:
    """The ResNet generator with the label map in every block of its second half (SPADE normalisation)."""
    return SPADEGenerator(in_ch, out_ch, cfg.ngf, cfg.n_blocks)


@register_discriminator("patchgan")
def _patchgan(cfg: Image2DConfig, in_ch: int) -> nn.Module:
    """pix2pix's PatchGAN; at d_scales > 1 one per scale (pix2pixHD's multi-scale discriminator)."""
    if cfg.d_scales == 1:
        return PatchGAN(in_ch, cfg.ndf, cfg.d_layers)
    return MultiScalePatchGAN(in_ch, cfg.ndf, cfg.d_layers, cfg.d_scales)


@register_family
class Image2D(Family):
    name = "image2d"
    paired = True
    uploads_maps = True
    preview = "grid"

    def modalities(self, model: ModelConfig) -> list[str]:
        return list(model.image2d.modalities)

    def channels_for(self, model: ModelConfig, held: list[str]) -> list[int] | None:
        mods = model.image2d.modalities
        unknown = [m for m in held if m not in mods]
        if unknown:
            raise ConfigError(f"modalities {unknown} are not among the server's {mods}")
        return None if set(held) == set(mods) else [i for i, m in enumerate(mods) if m in held]

    def stored_size(self, model: ModelConfig) -> int:
        return model.image2d.stored_size

    def num_classes(self, model: ModelConfig) -> int:
        return model.image2d.num_classes

    def condition(self, model, label_maps, n, rng=None):
        if label_maps is None or label_maps.shape[0] != n:
            raise ValueError(f"image2d needs {n} label maps for its condition")
        return one_hot(label_maps, model.image2d.num_classes)  # [n, K, H, W]

    def discriminator_condition(self, model, label_maps):
        return one_hot(label_maps, model.image2d.num_classes)

    def draw_augmentation(self, model, n, flip, rng):
        i2d = model.image2d
        return draw_augmentation(n, flip, i2d.stored_size, i2d.image_size, rng)

    def sample_shape(self, model, n, channels=None):
        size = model.image2d.image_size
        c = len(model.image2d.modalities) if channels is None else channels
        return (n, c, size, size)

    def build_generator(self, model):
        cfg = model.image2d
        build = _member(_GENERATORS, cfg.generator, "generator")
        return initialise(build(cfg, cfg.num_classes, len(cfg.modalities)), cfg.init)

    def build_discriminators(self, model, modalities):
        # One discriminator per modality held (the multi-modal method): input is the one-hot map plus that
        # channel; or one "joint" discriminator over the map and every held channel.
        cfg = model.image2d
        build = _member(_DISCRIMINATORS, cfg.d_network, "discriminator network (d_network)")
        if cfg.discriminator == "joint":
            return initialise(nn.ModuleDict({JOINT: build(cfg, cfg.num_classes + len(modalities))}), cfg.init)
        return initialise(nn.ModuleDict({m: build(cfg, cfg.num_classes + 1) for m in modalities}), cfg.init)

    def discriminator_inputs(self, names, samples):
        if names == [JOINT]:
            return [(JOINT, samples)]
        return [(name, samples[:, i : i + 1]) for i, name in enumerate(names)]


@register_family
class MLP1D(Family):
    name = "mlp1d"
    paired = False
    uploads_maps = False
    preview = "histogram"

    def condition(self, model, label_maps, n, rng=None):
        return torch.randn(n, model.mlp1d.noise_dim, generator=rng)  # [n, noise_dim]

    def sample_shape(self, model, n, channels=None):
        return (n, 1)

    def build_generator(self, model):
        cfg = model.mlp1d
        return mlp(cfg.noise_dim, cfg.hidden, cfg.depth, 1)

    def build_discriminators(self, model, modalities):
        cfg = model.mlp1d
        return nn.ModuleDict({"x": mlp(1, cfg.hidden, cfg.depth, 1)})
