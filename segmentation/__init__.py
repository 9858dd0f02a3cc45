"""Downstream segmentation (what a researcher runs, not what runs at a hospital): a 2-D MONAI U-Net trained on
axial slices of any BraTS tree, real or synthetic, and scored per patient in 3-D on whole test volumes.

    config.py    the recipe (region, preprocessing, network, training) and the train/eval run settings
    data.py      BraTS volumes through the site's reader: training slices (tumour + some healthy), test cases
    model.py     the MONAI network and Dice+CE loss, the model folder (weights + recipe.json)
    train.py     the training loop (progress bar, TensorBoard)
    metrics.py   per-patient Dice/HD95 from MONAI with the explicit empty rule, mean and SD
    evaluate.py  whole-volume prediction, the protocol, per-patient CSV and summary.json

Library use (an experiment loads data once and trains several models on it):
    slices = load_training_slices([dir_a, dir_b], recipe); train_model(slices, recipe, out)
    test = load_test_cases(test_dir, recipe.preprocessing); evaluate_model(out, test)
"""

from asyndgan.segmentation.config import (
    REGION_LABELS, EvalRunConfig, NetworkConfig, Preprocessing, SegmentationRecipe, TrainingConfig, TrainRunConfig)
from asyndgan.segmentation.data import SliceSet, TestSet, load_test_cases, load_training_slices, pool_slices
from asyndgan.segmentation.evaluate import PROTOCOL, EvalResult, evaluate, evaluate_model, write_results
from asyndgan.segmentation.metrics import EMPTY_RULE, CaseScore, diagonal_mm, score_case, summarise
from asyndgan.segmentation.model import build_loss, build_network, load_model, save_model
from asyndgan.segmentation.train import TrainResult, train, train_model

__all__ = [
    "EMPTY_RULE", "PROTOCOL", "REGION_LABELS", "CaseScore", "EvalResult", "EvalRunConfig", "NetworkConfig",
    "Preprocessing", "SegmentationRecipe", "SliceSet", "TestSet", "TrainResult", "TrainRunConfig",
    "TrainingConfig", "build_loss", "build_network", "diagonal_mm", "evaluate", "evaluate_model",
    "load_model", "load_test_cases", "load_training_slices", "pool_slices", "save_model", "score_case",
    "summarise", "train",
    "train_model", "write_results",
]
