"""Differentiable augmentation at the sites' discriminators: each transform does what it says, keeps the label map
on the image, lets the gradient through, never mixes rows, and reaches the plain and the private learners."""

from __future__ import annotations

import pytest
import torch

from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
from asyndgan.common.diff_augment import diff_augment
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.formats.datasets import open_dataset
from asyndgan.site_agent.gradients import SiteLearner
from asyndgan.site_agent.worker import SiteWorker


def _pair(n: int = 4, size: int = 16):
    """A one-hot condition (background / square) and an image drawn from it: -1 outside, 0.5 inside."""
    inside = torch.zeros(n, 1, size, size)
    inside[:, :, 5:9, 6:10] = 1
    condition = torch.cat([1 - inside, inside], dim=1)
    return condition, inside * 1.5 - 1.0 + 0.0


def test_translation_moves_the_label_map_with_the_image():
    condition, image = _pair()
    c, x = diff_augment(condition, image, ["translation"], torch.Generator().manual_seed(1))
    assert torch.equal(x, c[:, 1:] * 1.5 - 1.0)  # still drawn from its (moved) label map
    assert not torch.equal(x, image)  # something moved
    assert torch.equal(x.sum(dim=(1, 2, 3)), image.sum(dim=(1, 2, 3)))  # a shift, nothing lost


def test_cutout_sets_one_square_per_sample_to_the_background():
    image = torch.rand(5, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    _, x = diff_augment(None, image, ["cutout"], torch.Generator().manual_seed(2))
    changed = (x != image).any(dim=1)
    assert (changed.sum(dim=(1, 2)) == 16).all()  # a 4 x 4 square in each sample
    assert (x[changed.unsqueeze(1).expand_as(x)] == -1).all()


def test_color_is_a_per_sample_brightness_and_contrast_change_the_gradient_passes():
    image = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    _, x = diff_augment(None, image, ["color"], torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((x * torch.arange(x.numel()).view_as(x)).sum(), image)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    for k in range(3):  # x = a * image + b for each sample on its own
        a = ((x[k] - x[k].mean()) / (image[k] - image[k].mean())).detach()
        assert float(a.std()) < 1e-4 and 0.7 <= float(a.mean()) <= 1.3


def test_no_row_depends_on_another_rows_content():
    """Differential privacy clips per patient: a patient's augmented rows must not change with the others'."""
    condition, image = _pair(3)
    policy = ["color", "translation", "cutout"]
    first = diff_augment(condition, image, policy, torch.Generator().manual_seed(4))[1]
    other = image.clone()
    other[1:] = torch.rand_like(other[1:])
    again = diff_augment(condition, other, policy, torch.Generator().manual_seed(4))[1]
    assert torch.equal(first[0], again[0]) and not torch.equal(first[1], again[1])
    with pytest.raises(ValueError, match="unknown augmentation"):
        diff_augment(None, image, ["zoom"], torch.Generator())


def _cfg(augment: list[str]) -> SiteFacingConfig:
    return SiteFacingConfig.model_validate({
        "model": {"image2d": {"image_size": 16, "load_size": 20, "ndf": 4, "d_layers": 1,
                              "modalities": ["t1", "t1ce", "t2", "flair"]}},
        "d_optim": {"lr": 0.01}, "seed": 5, "diff_augment": augment})


def test_the_plain_and_the_private_sites_answer_through_the_augmentation(tmp_path, monkeypatch):
    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[6], size=20, seed=1)
    maps = torch.zeros(3, 16, 16, dtype=torch.uint8)
    maps[:, 4:12, 4:12] = 1
    fake = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain = SiteLearner(_cfg([]), ["t1", "t1ce", "t2", "flair"]).step(1, maps, real, fake)[0]
    augmented = SiteLearner(_cfg(["color", "translation", "cutout"]), ["t1", "t1ce", "t2", "flair"])
    grad = augmented.step(1, maps, real, fake)[0]
    assert grad.shape == plain.shape and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    assert float((grad - plain).abs().max()) > 1e-4

    from asyndgan.site_agent import gradients

    seen = []
    monkeypatch.setattr(gradients, "diff_augment", lambda c, x, p, r: (seen.append(x.shape[1]), diff_augment(c, x, p, r))[1])
    cfg = _cfg(["translation", "cutout"])
    private = SiteWorker(cfg, open_dataset(folder, cfg), privacy=PrivacyConfig(delta=1e-3, epsilon=10.0),
                         ledger_path=tmp_path / "l.json", site_id="s")
    out = private.learner.step(1, maps, real, fake)[0]
    assert out.shape == (3, 4, 16, 16) and torch.isfinite(out).all()
    # the DP-SGD update (all discriminators at once: 4 channels) and the answer (one per modality) looked through it
    assert 4 in seen and 1 in seen


def test_augmentation_is_for_images_only():
    with pytest.raises(Exception, match="diff_augment transforms images"):
        SiteFacingConfig.model_validate({"model": {"family": "mlp1d"}, "diff_augment": ["color"]})
