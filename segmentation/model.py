"""The downstream network and loss (MONAI's layers; our code is the recipe) and the model folder on disk.

A model folder holds `model.pt` (the network's state_dict, read back with torch.load(weights_only=True): tensors
only, nothing executable), `recipe.json` (the SegmentationRecipe that built and trained it, and that evaluation
prepares test cases with) and, from training, `training.json` and `tensorboard/`.
"""

from __future__ import annotations

import io
import json
import pathlib

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from asyndgan.common.atomic import atomic_write, atomic_write_text
from asyndgan.common.config import validate_json
from asyndgan.common.errors import AsynDGANError, ConfigError
from asyndgan.segmentation.config import EARLIER_CHOICES, SegmentationRecipe

WEIGHTS, RECIPE = "model.pt", "recipe.json"
NUM_CLASSES = 2  # background and the chosen region


def build_network(recipe: SegmentationRecipe) -> torch.nn.Module:
    """A 2-D MONAI UNet: len(modalities) channels in, 2 logits out, [B, C, s, s] -> [B, 2, s, s]."""
    net = recipe.network
    return UNet(spatial_dims=2, in_channels=len(recipe.preprocessing.modalities), out_channels=NUM_CLASSES,
                channels=tuple(net.channels), strides=(2,) * (len(net.channels) - 1),
                num_res_units=net.num_res_units, dropout=net.dropout)


def build_loss(recipe: SegmentationRecipe | None = None) -> torch.nn.Module:
    """Dice + cross-entropy on softmax logits [B, 2, s, s] against integer targets [B, 1, s, s]. Batch Dice (one
    Dice over the whole batch) because many training slices are healthy: a per-slice Dice of an empty target is
    all smoothing term and says nothing.

    `foreground_dice_ce` (the default) takes the Dice of the region only. `dice_ce` (the earlier recipe) averaged
    it with the background's Dice, which is near 1 whatever the net does, so half the Dice term carried no signal;
    where lesions cover 0.3% of the pixels (small or low-grade tumours) the cross-entropy then kept every pixel
    below 0.5 and the model predicted nothing at all (measured: Dice 0.000 on 30 test patients after training on
    20 cases with 4-10 mm tumours; 0.66 with the region's Dice alone)."""
    loss = recipe.training.loss if recipe is not None else "foreground_dice_ce"
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=loss == "dice_ce")


def _with_legacy_fields(data: dict) -> dict:
    """recipe.json written before a field existed means the behaviour of that time: model folders trained then are
    read (and their test cases prepared) as they were trained."""
    for (section, key), value in EARLIER_CHOICES.items():
        if isinstance(data.get(section), dict):
            data[section].setdefault(key, value)
        elif section not in data:
            data[section] = {key: value}
    return data


def save_model(folder: pathlib.Path, net: torch.nn.Module, recipe: SegmentationRecipe) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    atomic_write(folder / WEIGHTS, lambda f: f.write(buf.getvalue()))
    atomic_write_text(folder / RECIPE, recipe.model_dump_json(indent=2) + "\n")


def load_model(folder: pathlib.Path) -> tuple[torch.nn.Module, SegmentationRecipe]:
    """(network in eval mode on the CPU, its recipe); a one-line error for anything that is not a model folder."""
    if not folder.is_dir():
        raise AsynDGANError(f"model folder {folder} does not exist")
    for name in (RECIPE, WEIGHTS):
        if not (folder / name).is_file():
            raise AsynDGANError(f"{folder} is not a segmentation model: no {name} (train one with "
                                "`asyndgan segment train`)")
    try:
        data = json.loads((folder / RECIPE).read_text())
        if not isinstance(data, dict):
            raise ConfigError("expected a JSON object")
        recipe = validate_json(SegmentationRecipe, json.dumps(_with_legacy_fields(data)))
    except ConfigError as exc:
        raise AsynDGANError(f"{folder / RECIPE}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AsynDGANError(f"{folder / RECIPE} cannot be read: {exc}") from None
    try:
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise AsynDGANError(f"{folder / WEIGHTS} cannot be read as weights: {str(exc).splitlines()[0]}") from None
    net = build_network(recipe)
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise AsynDGANError(f"{folder / WEIGHTS} does not match the network in {RECIPE}: "
                            f"{str(exc).splitlines()[0]}") from None
    return net.eval(), recipe
