"""The network layers of the model families, importable by both the server and the sites.

Generators (the server's): pix2pix's ResNet generator (reflection padding, instance norm, 2 down-samplings,
n residual blocks, tanh output), the same with the label map in every block of its second half (SPADE), a U-Net
with skip connections, and a small MLP. Discriminators (a site's): PatchGAN (at one scale or several), and the same
MLP. They live in `common` so that a site never imports server code; which family uses which, at what size, is
decided in common/families.py. Every module maps a tensor to a tensor (no hidden state).
Initial weights are chosen explicitly by `initialise` (ModelConfig.image2d.init).
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(in_ch: int, ngf: int) -> list[nn.Module]:
    """pix2pix's ResNet encoder: a 7x7 convolution, then 2 down-samplings; ngf * 4 channels out."""
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for ch in (ngf, ngf * 2):
        layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ch * 2), nn.ReLU(True)]
    return layers


class ResNetGenerator(nn.Module):
    """[n, in_ch, H, W] -> [n, out_ch, H, W] in [-1, 1]; H and W multiples of 4."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers = _encoder(in_ch, ngf)
        ch = ngf * 4
        layers += [ResidualBlock(ch) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ch // 2), nn.ReLU(True),
            ]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_ch, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _SPADEBlock(nn.Module):
    """A residual block whose normalisations take their scale and shift from the label map (SPADE)."""

    def __init__(self, ch: int, label_nc: int, hidden: int):
        from monai.networks.blocks.spade_norm import SPADE

        super().__init__()
        self.norm1, self.norm2 = SPADE(label_nc, ch, hidden_channels=hidden), SPADE(label_nc, ch, hidden_channels=hidden)
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x, seg)))
        return x + self.conv2(self.act(self.norm2(h, seg)))


class SPADEGenerator(nn.Module):
    """[n, in_ch, H, W] (the one-hot label map) -> [n, out_ch, H, W] in [-1, 1]; H and W multiples of 4.

    The ResNet generator's encoder, then residual blocks and up-samplings whose normalisations are SPADE (MONAI's
    block: a parameter-free instance norm, scaled and shifted per pixel by convolutions of the label map resized to
    the layer): the label map is seen again in every block, so tumour and tissue boundaries are not washed out by
    the normalisations, as in GauGAN (Park et al., CVPR 2019)."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, n_blocks: int = 9):
        from monai.networks.blocks.spade_norm import SPADE

        super().__init__()
        self.encoder = nn.Sequential(*_encoder(in_ch, ngf))
        ch = ngf * 4
        hidden = min(128, ngf * 2)
        self.blocks = nn.ModuleList(_SPADEBlock(ch, in_ch, hidden) for _ in range(n_blocks))
        self.up = nn.ModuleList()
        self.up_norms = nn.ModuleList()
        for _ in range(2):
            self.up.append(nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1))
            self.up_norms.append(SPADE(in_ch, ch // 2, hidden_channels=hidden))
            ch //= 2
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ch, out_ch, 7), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h, x)
        for up, norm in zip(self.up, self.up_norms):
            h = torch.relu(norm(up(h), x))
        return self.out(h)


class UNetGenerator(nn.Module):
    """U-Net with `depth` stride-2 down-samplings and skip connections; H and W multiples of 2**depth."""

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, depth: int = 7):
        super().__init__()
        widths = [min(ngf * 2**i, ngf * 8) for i in range(depth)]
        self.down = nn.ModuleList()
        prev = in_ch
        for i, w in enumerate(widths):
            block: list[nn.Module] = [nn.LeakyReLU(0.2, True)] if i else []
            block.append(nn.Conv2d(prev, w, 4, stride=2, padding=1))
            if 0 < i < depth - 1:
                block.append(nn.InstanceNorm2d(w))
            self.down.append(nn.Sequential(*block))
            prev = w
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            in_w = widths[i] if i == depth - 1 else widths[i] * 2
            out_w = widths[i - 1] if i else out_ch
            block = [nn.ReLU(True), nn.ConvTranspose2d(in_w, out_w, 4, stride=2, padding=1)]
            block.append(nn.InstanceNorm2d(out_w) if i else nn.Tanh())
            self.up.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the first up-sampling directly
        for layer in self.up:
            x = layer(x)
            if skips:
                x = torch.cat([x, skips.pop()], dim=1)
        return x


def mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """[n, in_dim] -> [n, out_dim] through `depth` hidden layers of LeakyReLU(0.2)."""
    layers: list[nn.Module] = []
    prev = in_dim
    for _ in range(depth):
        layers += [nn.Linear(prev, hidden), nn.LeakyReLU(0.2)]
        prev = hidden
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


class PatchGAN(nn.Module):
    """[n, in_ch, H, W] -> patch logits [n, 1, h, w]; with n_layers=3 each logit sees a 70x70 patch."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiScalePatchGAN(nn.Module):
    """PatchGANs at `scales` resolutions (the full one, then halved by average pooling each time), as in
    pix2pixHD: the coarse ones judge the global layout, the fine one the texture. [n, in_ch, H, W] -> every patch
    logit of every scale, [n, P] (the GAN losses average over them)."""

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3, scales: int = 2):
        super().__init__()
        self.scales = nn.ModuleList(PatchGAN(in_ch, ndf, n_layers) for _ in range(scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for k, d in enumerate(self.scales):
            out.append(d(x if k == 0 else nn.functional.avg_pool2d(x, 2**k)).flatten(1))
        return torch.cat(out, dim=1)


def initialise(module: nn.Module, scheme: str) -> nn.Module:
    """Set `module`'s initial weights by `scheme` and return it. 'pytorch': every layer keeps the default its
    constructor drew (nothing is redrawn, so a seed gives the weights it always gave); 'normal': pix2pix's N(0, 0.02)
    for every convolution and linear weight, biases 0 (norm layers keep weight 1, bias 0)."""
    if scheme == "pytorch":
        return module
    if scheme != "normal":
        raise ValueError(f"unknown initialisation {scheme!r}; choose pytorch or normal")
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(layer.weight, 0.0, 0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return module
