"""The segmentation task both apps share: the network of the benchmark's recipe and local training steps.

This environment cannot import asyndgan (its protobuf is too new for flwr), so the recipe arrives as JSON and the
network is built here with the same MONAI constructor and arguments as asyndgan.segmentation.model; the initial
weights come from asyndgan's own network and load strictly, so any difference stops the first round.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet


def load_recipe(data_dir: str) -> dict:
    return json.loads((pathlib.Path(data_dir) / "recipe.json").read_text())


def build_network(recipe: dict) -> torch.nn.Module:
    net, prep = recipe["network"], recipe["preprocessing"]
    return UNet(spatial_dims=2, in_channels=len(prep["modalities"]), out_channels=2,
                channels=tuple(net["channels"]), strides=(2,) * (len(net["channels"]) - 1),
                num_res_units=net["num_res_units"], dropout=net["dropout"])


def load_site(data_dir: str, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float16 [N, C, s, s], masks uint8 [N, s, s]) of site `partition` (0-based); no pickle."""
    with np.load(pathlib.Path(data_dir) / f"site_{partition}.npz", allow_pickle=False) as z:
        return torch.from_numpy(z["images"]), torch.from_numpy(z["masks"])


def cosine_lr(base: float, done: int, total: int) -> float:
    """The recipe's cosine decay, over the whole federated run's steps (as centralised training decays)."""
    return base * 0.5 * (1 + math.cos(math.pi * min(done, total) / max(total, 1)))


def train_steps(net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, recipe: dict, steps: int,
                lr: float, seed: int) -> tuple[float, float]:
    """`steps` Adam steps of the recipe's loss at learning rate `lr` (fresh optimiser state, as in FedAvg);
    (mean loss, seconds)."""
    cfg = recipe["training"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    net.train()
    started, losses = time.perf_counter(), []
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(images), cfg["batch_size"]))
        x = images[idx].float()
        y = masks[idx].long()[:, None]
        if cfg["flip"]:
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(-2), x)
            y = torch.where(flip[:, None, None, None], y.flip(-2), y)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return (float(np.mean(losses)) if losses else 0.0), time.perf_counter() - started
