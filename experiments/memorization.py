"""Does the released generator remember its training patients? A membership test and nearest-neighbour distances.

The attacker holds the published generator and one patient's scan with its label maps, and asks: was this
patient in a site's training data? Score: how closely G reproduces the patient's own images from the patient's
label maps (mean squared error inside the brain, averaged over the patient's slices; lower = more likely a
member). Members are training patients of the sites; non-members are held-out patients of the same sites'
scanners and populations, so that only membership differs. AUC 0.5 means no signal; also TPR at FPR 0.1.

Nearest neighbours: for synthetic slices made from members' label maps, the distance to the closest real
training slice, against the same distance for held-out real slices (how far a new real patient naturally lies
from the training set). Synthetic slices much closer than that would be copies.

Both compare images inside each label map's brain region only (the outline's inside, tumour included), where the
generator is trained: outside it the server replaces G's output by the background before anything is sent, so
G's raw output there was never judged and says nothing about memory. Every slice is set to the background
outside its brain region before distances are taken (METHOD 2; METHOD 1 measured the error on the outline and
tumour pixels only and the distances over the whole image, where untrained background dominated).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np
import torch

from asyndgan.common import serde
from asyndgan.common.conditions import brain_region
from asyndgan.common.config import SiteFacingConfig
from asyndgan.common.families import get_family
from asyndgan.formats.datasets import open_dataset
from asyndgan.experiments.recipe import PAPERS

log = logging.getLogger(__name__)
METHOD = 2  # see the module docstring


@dataclasses.dataclass
class MembershipResult:
    members: int
    nonmembers: int
    auc: float
    tpr_at_fpr_0_1: float
    member_error: float  # mean over patients
    nonmember_error: float
    nn_synthetic_to_train: float  # median distance (per pixel RMS) of synthetic slices to the closest training slice
    nn_heldout_to_train: float  # the same for held-out real slices

    def as_dict(self) -> dict:
        return {**self.__dict__, "method": METHOD}


def auc_and_tpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.1) -> tuple[float, float]:
    """Scores where higher means 'member': (ROC AUC with ties as halves, TPR at the threshold giving <= fpr)."""
    m, n = member_scores[:, None], nonmember_scores[None, :]
    auc = float(((m > n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))
    threshold = np.quantile(nonmember_scores, 1 - fpr, method="higher")
    return auc, float((member_scores > threshold).mean())


@torch.no_grad()
def _patient_errors(generator, model, dataset, batch: int = 64) -> tuple[dict[int, float], torch.Tensor, torch.Tensor]:
    """(patient -> mean brain MSE of G(map) against the real slice, real slices [N, C, H, W], fakes [N, ...])."""
    family = get_family(model.family)
    maps = dataset.label_maps()
    keys = torch.arange(len(dataset))
    reals, fakes = [], []
    for start in range(0, len(keys), batch):
        k = keys[start:start + batch]
        m = maps[k]
        fakes.append(generator(family.condition(model, m, len(k))).float())
        reals.append(dataset.real(k))
    inside = brain_region(torch.as_tensor(np.asarray(maps)))[:, None]
    background = torch.tensor(serde.BACKGROUND)
    real = torch.where(inside, torch.cat(reals).float(), background)
    fake = torch.where(inside, torch.cat(fakes), background)
    brain = inside.float()
    err = (((fake - real) ** 2) * brain).sum(dim=(1, 2, 3)) / (brain.sum(dim=(1, 2, 3)) * real.shape[1]).clamp(min=1)
    patients = dataset.patients()
    out = {p: float(err[torch.from_numpy(idx)].mean()) for p, idx in enumerate(patients.members())}
    return out, real, fake


def _nearest(queries: torch.Tensor, pool: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-pixel RMS distance of each query to its nearest slice in `pool`."""
    pool_flat = pool.flatten(1)
    best = []
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk].flatten(1)
        best.append(torch.cdist(q, pool_flat).min(dim=1).values)
    return torch.cat(best) / np.sqrt(pool_flat.shape[1])


def audit(checkpoint: pathlib.Path, members: list[pathlib.Path], nonmembers: list[pathlib.Path],
          cache_dir: pathlib.Path, nn_slices: int = 300, seed: int = 0) -> MembershipResult:
    """Membership AUC and nearest-neighbour distances of the generator in `checkpoint` (module docstring)."""
    from asyndgan.formats.generator_file import load_from_checkpoint

    loaded = load_from_checkpoint(checkpoint)
    model = loaded.model
    cfg = SiteFacingConfig(model=model)
    prep = PAPERS.prep(cache_dir)  # tumour slices: where a patient's images are most their own
    generator = loaded.generator.eval()

    def scores(trees):
        errors, reals, fakes = [], [], []
        for tree in trees:
            e, r, f = _patient_errors(generator, model, open_dataset(tree, cfg, prep))
            errors += list(e.values())
            reals.append(r)
            fakes.append(f)
        return np.array(errors), torch.cat(reals), torch.cat(fakes)

    member_err, member_real, member_fake = scores(members)
    non_err, non_real, _ = scores(nonmembers)
    auc, tpr = auc_and_tpr(-member_err, -non_err)
    rng = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(member_fake), generator=rng)[:nn_slices]
    held = torch.randperm(len(non_real), generator=rng)[:nn_slices]
    nn_syn = float(_nearest(member_fake[pick], member_real).median())
    nn_held = float(_nearest(non_real[held], member_real).median())
    return MembershipResult(len(member_err), len(non_err), auc, tpr, float(member_err.mean()), float(non_err.mean()),
                            nn_syn, nn_held)
