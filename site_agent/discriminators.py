"""Discriminator factories: the models a site owns and never sends.

image2d: one PatchGAN per modality the site holds (input: the one-hot label map plus that one channel), as in
the multi-modal method; with `d_layers=3` each has a 70x70 receptive field. mlp1d: an MLP on the scalar sample.
"""

from __future__ import annotations

from torch import nn

from asyndgan.central_server.generators import mlp
from asyndgan.common.config import ModelConfig


class PatchGAN(nn.Module):
    """[n, in_ch, H, W] -> patch logits [n, 1, h, w]."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride=stride, padding=1), nn.InstanceNorm2d(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def build_discriminators(model: ModelConfig, modalities: list[str]) -> nn.ModuleDict:
    """One discriminator per modality held (image2d) or a single one named 'x' (mlp1d)."""
    if model.family == "image2d":
        cfg = model.image2d
        return nn.ModuleDict({m: PatchGAN(cfg.num_classes + 1, cfg.ndf, cfg.d_layers) for m in modalities})
    if model.family == "mlp1d":
        cfg1 = model.mlp1d
        return nn.ModuleDict({"x": mlp(1, cfg1.hidden, cfg1.depth, 1)})
    raise ValueError(f"unknown model family {model.family!r}; choose image2d or mlp1d")
