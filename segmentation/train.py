"""Training the downstream 2-D U-Net on pooled slices: a fixed number of Adam steps on Dice + cross-entropy.

`train_model(slices, recipe, out)` is the library entry (an experiment loads its slices once and trains several
models on them); `train(TrainRunConfig)` is what `asyndgan segment train` runs. Batches are drawn epoch by epoch
from a seeded permutation, so the same recipe, data and seed give the same model on the same device.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.errors import ConfigError
from asyndgan.common.devices import resolve_device
from asyndgan.segmentation.config import REGION_NAMES, SegmentationRecipe, TrainRunConfig
from asyndgan.segmentation.data import SliceSet, check_data_dir, load_training_slices
from asyndgan.segmentation.model import build_loss, build_network, save_model

log = logging.getLogger(__name__)

TRAINING_JSON = "training.json"


@dataclass
class TrainResult:
    out: pathlib.Path  # the model folder
    steps: int
    final_loss: float  # mean loss over the last 50 steps (or all, if fewer)
    seconds: float
    slices: int
    cases: int
    parameters: int
    training_dice: float  # Dice of the net's own predictions on its training slices (region pixels pooled)
    collapsed: bool  # it predicts no region pixel on any training slice: a useless model, said loudly


# A trained model whose pooled Dice on its own training slices is below this has not learnt the region at all (a
# working model scores 0.6-0.95 there; a collapsed one predicts nothing and scores 0).
COLLAPSE_DICE = 0.05


@torch.no_grad()
def training_fit(net: torch.nn.Module, slices: SliceSet, device: torch.device, batch: int = 64) -> tuple[float, int]:
    """(pooled Dice, predicted region pixels) of `net` on its training slices, unflipped, at threshold 0.5."""
    net.eval()
    inter = predicted = truth = 0
    for i in range(0, len(slices), batch):
        x = slices.images[i:i + batch].to(device, torch.float32)
        pred = net(x).argmax(1).cpu().bool()  # [B, s, s]
        mask = slices.masks[i:i + batch].bool()
        inter += int((pred & mask).sum())
        predicted += int(pred.sum())
        truth += int(mask.sum())
    net.train()
    return (2.0 * inter / (predicted + truth) if predicted + truth else 1.0), predicted


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless batches of slice indices: one seeded permutation per epoch, the last short batch carried over."""
    pending = np.zeros(0, np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(n)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


class AppearanceAugmentation:
    """TrainingConfig.appearance: per slice, each with probability 0.3, a smooth multiplicative bias field, a gamma
    change, Gaussian noise and a Gaussian blur (MONAI's transforms, seeded), applied to the intensities above the
    background; the background (-1, outside the brain) stays as it is."""

    def __init__(self, seed: int):
        from monai.transforms import (Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise,
                                      RandGaussianSmooth)

        self.transform = Compose([RandBiasField(coeff_range=(0.0, 0.3), prob=0.3),
                                  RandAdjustContrast(gamma=(0.7, 1.5), prob=0.3),
                                  RandGaussianNoise(std=0.05, prob=0.3),
                                  RandGaussianSmooth(sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.3)])
        self.transform.set_random_state(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, s, s] in [-1, 1] -> the same, each slice changed on its own."""
        brain = x > -1 + 1e-3
        shifted = (x + 1).cpu()  # intensities from 0: the bias field and gamma act on them, not on the sign
        out = torch.stack([torch.as_tensor(self.transform(s)) for s in shifted]).to(x.device, x.dtype) - 1
        return torch.where(brain, out.clamp(-1, 1), x)


def train_model(slices: SliceSet, recipe: SegmentationRecipe, out: pathlib.Path, device: str | torch.device = "auto",
                progress: bool = True) -> TrainResult:
    """Train a fresh network on `slices` and write the model folder `out` (weights, recipe, training.json,
    tensorboard/). [N, C, s, s] slices with [N, s, s] region masks in, a saved model out."""
    out = pathlib.Path(out)
    cfg = recipe.training
    size = recipe.preprocessing.image_size
    made = {"preprocessing": slices.preprocessing, "region": slices.region, "healthy_ratio": slices.healthy_ratio}
    wanted = {"preprocessing": recipe.preprocessing, "region": recipe.region, "healthy_ratio": cfg.healthy_ratio}
    differ = [k for k in made if made[k] != wanted[k]]
    if differ:  # e.g. whole-tumour masks silently used to train a model labelled "enhancing"
        raise ConfigError(f"the slices were loaded with other {', '.join(differ)} than the recipe asks for "
                          f"({', '.join(f'{k}: {made[k]!r} vs {wanted[k]!r}' for k in differ)}); load them with "
                          "this recipe")
    if tuple(slices.images.shape[1:]) != (len(recipe.preprocessing.modalities), size, size):
        raise ConfigError(f"slices are {tuple(slices.images.shape[1:])} but the recipe needs "
                          f"({len(recipe.preprocessing.modalities)}, {size}, {size})")
    dev = resolve_device(device) if isinstance(device, str) else device
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = build_network(recipe).to(dev)
    appearance = AppearanceAugmentation(cfg.seed) if cfg.appearance else None
    loss_fn = build_loss(recipe)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Cosine decay to 0 over the run: the last steps refine at a small learning rate whatever `steps` is.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    n_params = sum(p.numel() for p in net.parameters())
    log.info("training a %s U-Net (%.2f M parameters) on %d slices from %d cases for %d steps on %s",
             REGION_NAMES[recipe.region], n_params / 1e6, len(slices), len(slices.cases), cfg.steps, dev)

    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tensorboard"))
    started = time.perf_counter()
    recent: list[float] = []
    net.train()
    try:
        bar = tqdm(range(cfg.steps), desc="segmentation training", unit="step", disable=not progress)
        batches = _batches(len(slices), cfg.batch_size, rng)
        for step in bar:
            idx = torch.from_numpy(next(batches))
            x = slices.images[idx].to(dev, torch.float32)  # [B, C, s, s]
            y = slices.masks[idx].to(dev, torch.long)[:, None]  # [B, 1, s, s]
            if cfg.flip:
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(dev)
                x = torch.where(flip[:, None, None, None], x.flip(-2), x)
                y = torch.where(flip[:, None, None, None], y.flip(-2), y)
            if appearance is not None:
                x = appearance(x)
            loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ConfigError(f"the segmentation loss became {value} at step {step + 1}; lower "
                                  f"recipe.training.lr (now {cfg.lr})")
            recent = (recent + [value])[-50:]
            if step % 10 == 0 or step == cfg.steps - 1:
                writer.add_scalar("segmentation/loss", value, step + 1)
                writer.add_scalar("segmentation/lr", opt.param_groups[0]["lr"], step + 1)
                bar.set_postfix(loss=f"{np.mean(recent):.3f}")
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    fit, predicted = training_fit(net, slices, dev)
    collapsed = fit < COLLAPSE_DICE
    save_model(out, net.cpu(), recipe)
    result = TrainResult(out, cfg.steps, float(np.mean(recent)), round(seconds, 1), len(slices),
                         len(slices.cases), n_params, round(fit, 4), collapsed)
    atomic_write_text(out / TRAINING_JSON, json.dumps({
        "steps": cfg.steps, "final_loss": result.final_loss, "seconds": result.seconds, "device": str(dev),
        "parameters": n_params, "slices": {"tumour": slices.tumour_slices, "healthy": slices.healthy_slices},
        "cases": slices.cases, "training_dice": result.training_dice, "collapsed": collapsed,
    }, indent=2) + "\n")
    log.info("trained %d steps in %.1f s (final loss %.4f, Dice on its own training slices %.3f); model in %s",
             cfg.steps, seconds, result.final_loss, fit, out)
    if collapsed:
        region = REGION_NAMES[recipe.region]
        what = (f"no {region} on its own training slices" if predicted == 0 else
                f"{region} that does not match its own training masks (Dice {fit:.3f} there)")
        log.warning("the model has collapsed: it predicts %s; it is useless on new cases. Train longer, on more "
                    "cases with the region, or check the masks", what)
    return result


def check_run(cfg: TrainRunConfig) -> torch.device:
    """The checks that cost nothing (data folders, device), so that a typo fails before anything is read or
    written; the device to train on."""
    for folder in cfg.data:
        check_data_dir(folder)
    return resolve_device(cfg.device)


def train(cfg: TrainRunConfig) -> TrainResult:
    """Read the trees in cfg.data, train, write cfg.out."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = check_run(cfg)
    slices = load_training_slices(cfg.data, cfg.recipe, progress=cfg.progress, workers=cfg.workers)
    return train_model(slices, cfg.recipe, cfg.out, dev, progress=cfg.progress)
