"""Modality translation learnt from the generator's synthetic cases, at a site, for `asyndgan complete --method
translate`.

The papers' generator sees only a label map, so a modality it fills in shows the patient's tumour on generic
anatomy. A site can do better with the same generator and nothing but its own files: the generator makes as many
synthetic slices with *every* modality as the site wants (from the site's own label maps, flipped at random), and
a small network learns from them to map the modalities the site holds to the ones it lacks. Applied to the
site's real slices, the missing modality then follows that patient's own anatomy (ventricles, sulci, head size)
as its held modalities show it. Everything runs at the site; nothing is sent anywhere.

    train:  maps [n, S, S] --G--> synthetic [n, C_all, S, S] -> inputs (held channels, intensity-jittered)
            -> translator -> prediction of the missing channels; L1 against G's missing channels, inside the brain
    apply:  real held slices (normalised as the site normalises them) -> translator -> missing channels

The translator is MONAI's 2-D residual U-Net with a tanh head (images are in [-1, 1]). Inputs are jittered in
contrast (a random gamma per channel) during training, because the generator's images are smoother and a little
differently contrasted than real ones and the network must not rely on the exact synthetic intensities; the
amount was set a priori, not tuned on any case it is measured on. Weights are saved as safetensors with their
settings in the metadata (no pickle).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from asyndgan.common.atomic import atomic_write
from asyndgan.common.errors import AsynDGANError
from asyndgan.common.families import get_family
from asyndgan.formats.generator_file import LoadedGenerator

log = logging.getLogger(__name__)


class TranslateConfig(BaseModel):
    """How the site learns held -> missing modalities from synthetic cases."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1500, ge=1, description="optimiser steps, each on a fresh synthetic batch")
    batch_size: int = Field(16, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0, le=1)
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=2, max_length=6)
    gamma_jitter: float = Field(0.2, ge=0, le=1, description="input contrast jitter: gamma in [1/(1+j), 1+j]")
    seed: int = Field(0, ge=0)


def build_translator(n_in: int, n_out: int, cfg: TranslateConfig) -> torch.nn.Module:
    """[B, n_in, s, s] in [-1, 1] -> [B, n_out, s, s] in [-1, 1]."""
    from monai.networks.nets import UNet

    unet = UNet(spatial_dims=2, in_channels=n_in, out_channels=n_out, channels=tuple(cfg.channels),
                strides=(2,) * (len(cfg.channels) - 1), num_res_units=2)
    return torch.nn.Sequential(unet, torch.nn.Tanh())


def _jitter(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """A random gamma per sample and channel on [-1, 1] images (background -1 stays -1)."""
    if amount <= 0:
        return x
    lo, hi = -math.log1p(amount), math.log1p(amount)
    gamma = torch.exp(torch.empty(x.shape[0], x.shape[1], 1, 1).uniform_(lo, hi, generator=gen))
    return ((x + 1) / 2).clamp(0, 1).pow(gamma) * 2 - 1


def train_translator(loaded: LoadedGenerator, maps: np.ndarray, held: list[str], missing: list[str],
                     cfg: TranslateConfig, device: torch.device, progress: bool = True
                     ) -> tuple[torch.nn.Module, dict]:
    """A translator held -> missing, trained on G's images for the site's label maps `maps` uint8 [n, S, S]
    (slices with brain). Returns (network in eval mode on `device`, a summary of the training)."""
    mods = list(loaded.model.image2d.modalities)
    family = get_family(loaded.model.family)
    hi = [mods.index(m) for m in held]
    mi = [mods.index(m) for m in missing]
    if len(maps) == 0:
        raise AsynDGANError("no label map with brain to learn the translation from")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = build_translator(len(hi), len(mi), cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    from scipy import ndimage as ndi

    source = torch.from_numpy(np.ascontiguousarray(maps))
    # The loss counts the brain only (the outline filled, tumour included): background is -1 in every modality.
    inside = torch.from_numpy(np.stack([ndi.binary_fill_holes(m > 0) for m in maps]))
    losses = []
    loaded.generator.to(device).eval()
    net.train()
    for _ in tqdm(range(cfg.steps), desc=f"translate {'+'.join(held)} -> {'+'.join(missing)}", unit="step",
                  disable=not progress, dynamic_ncols=True):
        pick = torch.randint(len(source), (cfg.batch_size,), generator=gen)
        flip = (torch.rand(cfg.batch_size, generator=gen) < 0.5)[:, None, None]
        # left-right flips: brains are near symmetric, and tumours occur on either side
        batch = torch.where(flip, source[pick].flip(-1), source[pick])
        brain = torch.where(flip, inside[pick].flip(-1), inside[pick]).to(device)[:, None].float()
        with torch.no_grad():
            synthetic = loaded.generator(family.condition(loaded.model, batch, len(batch)).to(device)).float()
        x = _jitter(synthetic[:, hi].cpu(), cfg.gamma_jitter, gen).to(device)
        y = synthetic[:, mi]
        pred = net(x)
        loss = ((pred - y).abs() * brain).sum() / (brain.sum() * len(mi)).clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return net, {"steps": cfg.steps, "final_l1": round(float(np.mean(tail)), 5), "first_l1": round(losses[0], 5)}


@torch.no_grad()
def apply_translator(net: torch.nn.Module, slices: torch.Tensor, device: torch.device, batch_size: int = 32
                     ) -> torch.Tensor:
    """float32 [k, n_out, s, s] for real held slices [k, n_in, s, s] in [-1, 1]."""
    out = [net(slices[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(slices), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def save_translator(path: pathlib.Path, net: torch.nn.Module, meta: dict) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                metadata={"asyndgan": json.dumps(meta, sort_keys=True)})
    atomic_write(path, lambda f: f.write(blob))


def load_translator(path: pathlib.Path, cfg: TranslateConfig, held: list[str], missing: list[str],
                    expected: dict) -> torch.nn.Module | None:
    """The translator saved at `path` when it was trained with these settings and generator; else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("asyndgan", "{}"))
        if meta != expected:
            return None
        net = build_translator(len(held), len(missing), cfg)
        net.load_state_dict(load_file(str(path)))
    except Exception as exc:  # a damaged or foreign file is retrained, not trusted
        log.warning("ignoring %s (%s); training the translator again", path, exc)
        return None
    return net.eval()


def to_slices(volumes: list[np.ndarray], idx: np.ndarray, size: int) -> torch.Tensor:
    """float32 [k, C, size, size] from normalised volumes [X, Y, Z]: axial slices `idx`, rows along Y (the
    orientation the site's slices and the generator's images have)."""
    stack = np.stack([v[..., idx] for v in volumes])  # [C, X, Y, k]
    x = torch.from_numpy(np.ascontiguousarray(stack.transpose(3, 0, 2, 1)))  # [k, C, Y, X]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(-1, 1)


def from_slices(images: torch.Tensor, shape: tuple[int, int, int], idx: np.ndarray) -> np.ndarray:
    """float32 [C, X, Y, Z] (-1 where no slice was given) from [k, C, s, s] images of axial slices `idx`."""
    X, Y, Z = shape
    out = np.full((images.shape[1], X, Y, Z), -1.0, np.float32)
    if len(idx):
        s = images.shape[-1]
        back = F.interpolate(images, size=(Y, X), mode="bilinear", align_corners=False, antialias=s > min(X, Y))
        out[..., idx] = back.clamp_(-1, 1).numpy().transpose(1, 3, 2, 0)
    return out
