"""Model factories: shapes, the published parameter counts, loud failures on unknown names."""

from __future__ import annotations

import pytest
import torch

from asyndgan.common.config import ModelConfig
from asyndgan.common.errors import ConfigError
from asyndgan.common.families import get_family


def build_generator(model: ModelConfig):
    return get_family(model.family).build_generator(model)


def build_discriminators(model: ModelConfig, modalities: list[str]):
    return get_family(model.family).build_discriminators(model, modalities)


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_default_image2d_models_match_the_papers_sizes():
    cfg = ModelConfig()
    g = build_generator(cfg)
    d = build_discriminators(cfg, ["t1"])["t1"]
    assert abs(_count(g) / 1e6 - 11.4) < 0.1
    assert abs(_count(d) / 1e6 - 2.77) < 0.05


@pytest.mark.parametrize("generator", ["resnet", "spade", "unet"])
def test_image2d_generators_map_label_maps_to_images(generator):
    cfg = ModelConfig.model_validate({"image2d": {"generator": generator, "image_size": 32, "ngf": 4,
                                                  "n_blocks": 1, "unet_depth": 4}})
    x = torch.rand(2, 5, 32, 32)
    y = build_generator(cfg)(x)
    assert y.shape == (2, 4, 32, 32)
    assert float(y.detach().abs().max()) <= 1.0


def test_the_spade_generator_sees_the_label_map_in_every_block():
    """Where the encoder's features are the same, a change of the label map still reaches the output through the
    SPADE normalisations of the residual blocks and up-samplings (the resnet generator, only through its input)."""
    from asyndgan.common.networks import SPADEGenerator

    torch.manual_seed(0)
    g = SPADEGenerator(5, 4, ngf=4, n_blocks=2).eval()
    x = torch.zeros(1, 5, 32, 32)
    x[:, 0] = 1
    y = x.clone()
    y[:, 0, 8:16, 8:16], y[:, 3, 8:16, 8:16] = 0, 1  # a tumour square
    g.encoder.register_forward_hook(lambda _m, _i, _o: torch.zeros(1, 16, 8, 8))  # features blind to the map
    with torch.no_grad():
        assert float((g(x) - g(y)).abs().max()) > 1e-3
    from monai.networks.blocks.spade_norm import SPADE

    assert sum(isinstance(m, SPADE) for m in g.modules()) == 2 * 2 + 2  # two per residual block, one per up-sampling


def test_one_patchgan_per_held_modality():
    cfg = ModelConfig.model_validate({"image2d": {"ndf": 4}})
    ds = build_discriminators(cfg, ["t2", "flair"])
    assert list(ds.keys()) == ["t2", "flair"]
    assert ds["t2"](torch.rand(1, 6, 64, 64)).shape == (1, 1, 6, 6)


def test_a_registered_member_is_chosen_in_the_config_and_an_unknown_one_is_named():
    """A new generator or discriminator network is a registered function chosen by name in the server's config;
    the engine needs no other change, and a name nobody registered fails in one line listing the known ones."""
    from pydantic import ValidationError
    from torch import nn

    from asyndgan.common import families

    @families.register_generator("test_pointwise")
    def _pointwise(cfg, in_ch, out_ch):
        return nn.Conv2d(in_ch, out_ch, 1)

    @families.register_discriminator("test_pixel")
    def _pixel(cfg, in_ch):
        return nn.Conv2d(in_ch, 1, 1)  # one logit per pixel

    try:
        cfg = ModelConfig.model_validate({"image2d": {"generator": "test_pointwise", "d_network": "test_pixel"}})
        assert build_generator(cfg)(torch.rand(2, 5, 16, 16)).shape == (2, 4, 16, 16)
        assert build_discriminators(cfg, ["t1"])["t1"](torch.rand(2, 6, 16, 16)).shape == (2, 1, 16, 16)
        assert {"resnet", "spade", "unet", "test_pointwise"} <= set(families.image2d_members()["generator"])
    finally:
        families._GENERATORS.pop("test_pointwise")
        families._DISCRIMINATORS.pop("test_pixel")
    with pytest.raises(ValidationError, match="generator"):
        ModelConfig.model_validate({"image2d": {"generator": "Bad Name"}})  # not a name anything can register
    bad = ModelConfig.model_validate({"image2d": {"generator": "gaugan2"}})
    with pytest.raises(ConfigError, match=r"unknown image2d generator 'gaugan2'; registered: resnet, spade, unet"):
        build_generator(bad)
    bad = ModelConfig.model_validate({"image2d": {"d_network": "oasis"}})
    with pytest.raises(ConfigError, match=r"unknown image2d discriminator network \(d_network\) 'oasis'; "
                                          r"registered: patchgan"):
        build_discriminators(bad, ["t1"])


def test_mlp1d_models():
    cfg = ModelConfig(family="mlp1d")
    assert build_generator(cfg)(torch.randn(7, cfg.mlp1d.noise_dim)).shape == (7, 1)
    assert build_discriminators(cfg, [])["x"](torch.randn(7, 1)).shape == (7, 1)


def test_unknown_family_fails_loudly():
    cfg = ModelConfig()
    object.__setattr__(cfg, "family", "vae")
    for build in (build_generator, lambda c: build_discriminators(c, ["t1"])):
        with pytest.raises(ConfigError, match="unknown model family 'vae'; known families: image2d, mlp1d"):
            build(cfg)


def test_networks_are_built_from_the_seed_without_touching_the_global_random_state(tmp_path):
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig, SiteFacingConfig
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry
    from asyndgan.site_agent.gradients import SiteLearner

    torch.manual_seed(123)
    before = torch.get_rng_state()
    small = {"image2d": {"image_size": 16, "ngf": 4, "n_blocks": 1, "ndf": 4, "d_layers": 1}}
    cfg = ServerConfig.model_validate({"run_dir": str(tmp_path), "site": {"model": small}, "train": {"seed": 7}})
    a = Trainer(cfg, LocalRegistry([]), CountingBank([]), tmp_path)
    b = Trainer(cfg, LocalRegistry([]), CountingBank([]), tmp_path)
    other = Trainer(cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 8})}), LocalRegistry([]),
                    CountingBank([]), tmp_path)
    site_cfg = SiteFacingConfig.model_validate({"model": small, "seed": 3})
    d1, d2 = SiteLearner(site_cfg, ["t1"]), SiteLearner(site_cfg, ["t1"])
    assert torch.equal(torch.get_rng_state(), before)  # constructors leave the global source alone
    for x, y in ((a.generator, b.generator), (d1.discriminators, d2.discriminators)):
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.generator.parameters(), other.generator.parameters()))
    norms = [m for m in a.generator.modules() if isinstance(m, torch.nn.InstanceNorm2d) and m.affine]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)


@pytest.mark.parametrize("scheme", ["pytorch", "normal"])
def test_initial_weights_follow_the_stated_scheme(scheme):
    """image2d.init: 'pytorch' keeps each layer's default (convolution weights inside Kaiming-uniform's bound
    1/sqrt(fan_in), nonzero biases), 'normal' draws N(0, 0.02) with zero biases; a seed gives the same weights."""
    from asyndgan.common.seeding import seeded

    model = ModelConfig.model_validate({"image2d": {"image_size": 32, "ngf": 8, "n_blocks": 1, "ndf": 8,
                                                    "d_layers": 2, "init": scheme}})
    family = get_family("image2d")
    with seeded(5):
        g = family.build_generator(model)
        d = family.build_discriminators(model, ["t1", "flair"])
    with seeded(5):
        g2 = family.build_generator(model)
    assert all(torch.equal(p, q) for p, q in zip(g.state_dict().values(), g2.state_dict().values()))
    convs = [m for net in (g, d) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.flatten() for m in convs])
    biases = torch.cat([m.bias.flatten() for m in convs if m.bias is not None])
    if scheme == "normal":
        assert float(weights.std()) == pytest.approx(0.02, rel=0.05) and float(biases.abs().max()) == 0.0
    else:
        for m in convs:
            fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)  # as PyTorch's reset_parameters
            assert float(m.weight.abs().max()) <= 1 / fan_in ** 0.5 + 1e-6
        assert float(biases.abs().max()) > 0 and float(weights.std()) != pytest.approx(0.02, rel=0.05)


def test_a_multi_scale_discriminator_judges_the_sample_at_each_resolution():
    """image2d.d_scales: one PatchGAN per scale (full, then halved), every patch logit of each in one row per
    sample; it keeps rows apart (a private site clips per patient) and is refused where the coarsest scale is too
    small for d_layers."""
    from asyndgan.common.networks import MultiScalePatchGAN
    from asyndgan.site_agent.privacy import check_no_batch_mixing

    cfg = ModelConfig.model_validate({"image2d": {"image_size": 32, "ndf": 4, "d_layers": 2, "d_scales": 2}})
    d = build_discriminators(cfg, ["t1", "flair"])
    assert isinstance(d["t1"], MultiScalePatchGAN) and len(d["t1"].scales) == 2
    x = torch.rand(3, 6, 32, 32)
    out = d["t1"](x)
    single = d["t1"].scales[0](x).flatten(1).shape[1]
    assert out.shape[0] == 3 and out.shape[1] > single  # the coarse scale's patches are added
    check_no_batch_mixing(d)
    x2 = x.clone()
    x2[1:] = torch.rand_like(x2[1:])
    assert torch.equal(d["t1"](x2)[0], out[0])  # one sample's logits depend on that sample only
    with pytest.raises(Exception, match="too deep for image_size 32 at d_scales 3"):
        ModelConfig.model_validate({"image2d": {"image_size": 32, "d_layers": 3, "d_scales": 3}})
