"""One distributed step over gRPC with real site processes moves G exactly as the same objective in one process.

The reference below is written out with plain torch (not the site's code): the same initialisation seeds, the
same sampling draws, each site's discriminator step, then L = sum_j w_j * L_G_j and one backward through G.
SGD (lr 1) makes the parameter change equal to the gradient, so a wrong weight or a lost site shows; the test
also checks that a plausible mistake (equal weights) would have been caught.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asyndgan.formats.checkpoint import load_checkpoint
from asyndgan.central_server.guard import cap_shares
from asyndgan.central_server.sampling import plan_batches
from asyndgan.common.conditions import augment, draw_augmentation, one_hot
from asyndgan.common.config import ServerConfig, load_config
from asyndgan.common.families import get_family
from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, start_site

pytestmark = pytest.mark.integration
LAMBDA_L1 = 10.0


def _overrides(mode: str) -> dict:
    return {**TINY_IMAGE2D, "site.schedule.steps": 1, "train.sampling": mode, "train.batch_size": 3,
            "train.min_sites": 3, "train.seed": 7, "site.seed": 11, "site.loss.lambda_l1": LAMBDA_L1,
            "g_optim.name": "sgd", "g_optim.lr": 1.0, "site.d_optim.lr": 0.01,
            "site.model.image2d.load_size": 20,  # random 16x16 crops of 20x20 maps, and flips
            # the exact wire (float32, every pixel): this compares the algorithm, not the encoding
            "train.wire_dtype": "float32", "train.wire_region": "full",
            # 'balance' runs with the guard's default share cap (site1 holds 7 of 13 maps: capped at 0.5);
            # 'uniform' without it, the papers' weighting exactly (its plan here holds two sites, which the cap
            # would make equal, so that a wrong weighting could not be told apart)
            "train.guard.max_share": 0.5 if mode == "balance" else 1.0}


def _reference(cfg: ServerConfig, data: dict[str, pathlib.Path], equal_weights: bool = False) -> dict:
    """The step computed in one process with autograd; returns G's parameters after it."""
    model = cfg.site.model
    family = get_family(model.family)
    torch.manual_seed(cfg.train.seed)
    g = family.build_generator(model)
    opt = torch.optim.SGD(g.parameters(), lr=cfg.g_optim.lr)
    rng = torch.Generator().manual_seed(cfg.train.seed)
    images = {s: torch.from_numpy(np.load(p / "images.npy")) for s, p in data.items()}
    labels = {s: torch.from_numpy(np.load(p / "labels.npy")) for s, p in data.items()}
    plan = plan_batches({s: len(labels[s]) for s in data}, cfg.train.batch_size, cfg.train.sampling, rng)
    batches = []
    for s, keys in plan.items():
        i2d = model.image2d
        aug = draw_augmentation(len(keys), cfg.train.flip, i2d.stored_size, i2d.image_size, rng)
        batches.append((s, augment(labels[s][keys], aug), augment(images[s][keys], aug)))
    x = torch.cat([one_hot(maps, model.image2d.num_classes) for _, maps, _ in batches])
    fake = g(x)
    total_n = sum(len(labels[s]) for s, _, _ in batches)
    total_b = sum(len(m) for _, m, _ in batches)
    # the paper's weights, then the server guard's cap on any one site's share (train.guard.max_share)
    paper = {s: (len(labels[s]) / total_n if cfg.train.sampling == "balance" else len(m) / total_b)
             for s, m, _ in batches}
    capped = cap_shares(paper, cfg.train.guard.max_share)
    loss, start = 0.0, 0
    for s, maps, real in batches:
        b = len(maps)
        fake_s = fake[start:start + b]
        start += b
        xs = one_hot(maps, model.image2d.num_classes)
        torch.manual_seed(cfg.site.seed)
        ds = family.build_discriminators(model, model.image2d.modalities)
        d_opt = torch.optim.Adam(ds.parameters(), lr=cfg.site.d_optim.lr, betas=(0.5, 0.999))

        def logits(m, c, img):
            return ds[m](torch.cat([xs, img[:, c:c + 1]], 1))

        bce = F.binary_cross_entropy_with_logits
        loss_d = 0.0
        for c, m in enumerate(model.image2d.modalities):
            lr_, lf = logits(m, c, real), logits(m, c, fake_s.detach())
            loss_d = loss_d + 0.5 * (bce(lr_, torch.ones_like(lr_)) + bce(lf, torch.zeros_like(lf)))
        d_opt.zero_grad()
        loss_d.backward()
        d_opt.step()
        loss_g = sum(bce(lg, torch.ones_like(lg)) for lg in
                     (logits(m, c, fake_s) for c, m in enumerate(model.image2d.modalities)))
        loss_g = loss_g + LAMBDA_L1 * (fake_s - real).abs().mean()
        w = 1.0 / len(batches) if equal_weights else capped[s]
        loss = loss + w * loss_g
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: v.detach().clone() for k, v in g.state_dict().items()}


@pytest.mark.parametrize("mode", ["balance", "uniform"])
def test_one_distributed_step_equals_single_process(tmp_path, mode):
    folders = write_toy_sites(tmp_path / "data", sites=3, per_site=[7, 4, 2], size=20, seed=3)
    data = {f"site{i + 1}": f for i, f in enumerate(folders)}
    server = Server(tmp_path / "run", _overrides(mode))
    sites = [start_site(p, server.address, s, tmp_path / f"{s}.log") for s, p in data.items()]
    try:
        assert server.wait(120) == 0, server.output()
        for p in sites:
            assert p.wait(60) == 0
    finally:
        server.kill()
        for p in sites:
            p.kill()
    got = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001.pt")["generator"]
    cfg = load_config(ServerConfig, None, _overrides(mode))
    want = _reference(cfg, data)
    wrong = _reference(cfg, data, equal_weights=True)
    torch.manual_seed(cfg.train.seed)
    before = get_family(cfg.site.model.family).build_generator(cfg.site.model).state_dict()

    err = max(float((got[k] - want[k]).abs().max()) for k in want)
    moved = max(float((want[k] - before[k]).abs().max()) for k in want)
    wrong_err = max(float((got[k] - wrong[k]).abs().max()) for k in want)
    print(f"{mode}: max |distributed - single process| = {err:.3g}; step size {moved:.3g}; "
          f"with equal weights the difference would be {wrong_err:.3g}")
    assert moved > 1e-3, "the step must move G for the comparison to mean anything"
    assert err <= 1e-5
    assert wrong_err > 100 * max(err, 1e-7), "the test must be able to tell a wrong weighting apart"
