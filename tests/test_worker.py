"""The site worker in process (no gRPC), the family lookup, and the rule that a site imports no server code."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from asyndgan.common import serde
from asyndgan.common.conditions import Augmentation, augment, draw_augmentation
from asyndgan.common.config import SiteFacingConfig
from asyndgan.common.errors import ConfigError, ProtocolError
from asyndgan.common.families import family_names, get_family
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.simulation.local_sites import LocalSession
from asyndgan.formats.datasets import Samples1DDataset, open_dataset
from asyndgan.site_agent.gradients import SiteLearner
from asyndgan.site_agent.worker import SiteWorker

SITE_AGENT = pathlib.Path(__file__).resolve().parents[1] / "site_agent"


def _image_cfg(**loss) -> SiteFacingConfig:
    return SiteFacingConfig.model_validate({
        "model": {"image2d": {"image_size": 16, "load_size": 20, "ndf": 4, "d_layers": 1,
                              "modalities": ["t1", "t1ce", "t2", "flair"]}},
        "loss": {"lambda_l1": 10.0, **loss}, "d_optim": {"lr": 0.01}, "seed": 5})


@pytest.fixture
def toy(tmp_path):
    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[6], size=20, seed=1)
    return folder


def _batch(cfg: SiteFacingConfig, n: int, channels: int, seed: int = 0) -> serde.SyntheticBatch:
    rng = torch.Generator().manual_seed(seed)
    keys = torch.randint(6, (n,), generator=rng)
    aug = draw_augmentation(n, True, cfg.model.image2d.stored_size, cfg.model.image2d.image_size, rng)
    fake = torch.rand(n, channels, 16, 16, generator=rng) * 2 - 1
    return serde.SyntheticBatch(step=3, round=4, keys=keys, fake=fake, aug=aug)


def test_worker_answer_equals_a_direct_learner_step(toy):
    cfg = _image_cfg()
    ds = open_dataset(toy, cfg)
    worker = SiteWorker(cfg, ds)
    batch = _batch(cfg, 3, 4)
    assert batch.aug.crop_size == 16 and bool(batch.aug.flip_h.any())  # the batch exercises crop and flips

    got = worker.answer(batch)

    learner = SiteLearner(cfg, ds.modalities)  # seeded by cfg.seed: the same initial discriminators
    maps = augment(ds.label_maps()[batch.keys], batch.aug)
    real = augment(ds.real(batch.keys), batch.aug)
    want, losses = learner.step(batch.step, maps, real, batch.fake)
    assert (got.step, got.round, got.gradient.shape[0]) == (3, 4, 3)
    assert got.gradient.shape == (3, 4, 16, 16)
    assert float(want.abs().sum()) > 0
    assert torch.allclose(got.gradient, want, atol=1e-7, rtol=0)
    assert got.losses == pytest.approx(losses)
    assert set(got.losses) == {"d", "g_adv", "g_l1"}
    # The same batch without its augmentation gives another gradient: the worker did apply the batch's crop.
    plain = SiteLearner(cfg, ds.modalities).step(3, ds.label_maps()[batch.keys][:, 2:18, 2:18],
                                                  ds.real(batch.keys)[..., 2:18, 2:18], batch.fake)[0]
    assert float((plain - got.gradient).abs().max()) > 1e-4


def test_with_a_wire_region_the_discriminators_see_real_samples_with_the_fakes_background_outside_it(toy):
    """Region-limited wire: the fakes hold the background outside the region, so must the real samples, or the
    discriminators separate them by what lies outside (a rim the generator gets no gradient to change)."""
    cfg = _image_cfg()
    ds = open_dataset(toy, cfg)
    worker = SiteWorker(cfg, ds)
    batch = _batch(cfg, 3, 4)
    region = torch.zeros(3, 16, 16, dtype=torch.bool)
    region[:, 4:12, 3:13] = True
    batch.region = region
    batch.fake = torch.where(region[:, None], batch.fake, torch.tensor(serde.BACKGROUND))
    seen = {}
    step = worker.learner.step

    def spy(s, maps, real, fake):
        seen["real"] = real.clone()
        return step(s, maps, real, fake)

    worker.learner.step = spy
    worker.answer(batch)
    real = augment(ds.real(batch.keys), batch.aug)
    outside = ~region[:, None].expand_as(real)
    assert float((real[outside] != serde.BACKGROUND).float().mean()) > 0.1  # the toy images do have values there
    assert bool((seen["real"][outside] == serde.BACKGROUND).all())
    assert torch.equal(seen["real"][~outside], real[~outside])


def test_worker_answers_mlp1d_batches(tmp_path):
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "samples.npy", np.linspace(-1, 1, 50, dtype=np.float32))
    cfg = SiteFacingConfig.model_validate({"model": {"family": "mlp1d", "mlp1d": {"hidden": 8, "depth": 1}},
                                           "loss": {"lambda_l1": 0.0, "generator": "kl"}})
    worker = SiteWorker(cfg, Samples1DDataset(tmp_path / "s"))
    assert worker.label_maps is None and worker.stored_size is None and worker.num_samples == 50
    keys = torch.tensor([0, 7, 49])
    answer = worker.answer(serde.SyntheticBatch(0, 1, keys, torch.randn(3, 1), Augmentation.none(3)))
    assert answer.gradient.shape == (3, 1) and float(answer.gradient.abs().sum()) > 0
    with pytest.raises(ProtocolError, match=r"shape \(3, 2\)"):
        worker.answer(serde.SyntheticBatch(0, 2, keys, torch.randn(3, 2), Augmentation.none(3)))


def test_shape_mismatch_is_a_protocol_error_in_the_worker_and_in_local_sessions(toy):
    cfg = _image_cfg()
    bad = _batch(cfg, 2, 3)  # 3 channels for a site holding 4 modalities
    with pytest.raises(ProtocolError, match=r"fakes of shape \(2, 3, 16, 16\) for 2 keys; this site expects "
                                            r"\(2, 4, 16, 16\)"):
        SiteWorker(cfg, open_dataset(toy, cfg)).answer(bad)
    # In-process sessions (baselines, benchmarks) answer through the same worker, so they refuse it too.
    session = LocalSession("a", open_dataset(toy, cfg), cfg)
    with pytest.raises(ProtocolError, match="fakes of shape"):
        session.send_batch(bad)
    # Right shape, but a crop that does not give G's size: the real samples would not pair with the fakes.
    batch = _batch(cfg, 2, 4)
    batch.aug.crop_size = 12
    with pytest.raises(ProtocolError, match=r"real samples of shape \(2, 4, 12, 12\)"):
        session.send_batch(batch)


def test_local_session_sends_only_the_modalities_its_site_holds(toy):
    cfg = SiteFacingConfig.model_validate({"model": {"image2d": {
        "image_size": 16, "load_size": 20, "ndf": 4, "d_layers": 1,
        "modalities": ["t1", "t1ce", "t2", "flair", "pd"]}}})
    session = LocalSession("a", open_dataset(toy, cfg), cfg)
    assert session.channels == [0, 1, 2, 3]
    session.send_batch(_batch(cfg, 2, 4))
    assert session.await_gradient(4, None, 0.0).gradient.shape == (2, 4, 16, 16)


def test_worker_state_round_trip(toy, tmp_path):
    cfg = _image_cfg()
    worker = SiteWorker(cfg, open_dataset(toy, cfg))
    worker.answer(_batch(cfg, 2, 4))  # moves the discriminators away from their seeded start
    worker.save_state(tmp_path / "d.pt", 17)
    fresh = SiteWorker(cfg, open_dataset(toy, cfg))
    assert fresh.restore_state(tmp_path / "d.pt") == 17
    for (k, a), (_, b) in zip(worker.learner.discriminators.state_dict().items(),
                              fresh.learner.discriminators.state_dict().items()):
        assert torch.equal(a, b), k
    other_cfg = SiteFacingConfig.model_validate({**cfg.model_dump(), "model": {
        **cfg.model.model_dump(), "image2d": {**cfg.model.image2d.model_dump(), "ndf": 8}}})
    other = SiteWorker(other_cfg, open_dataset(toy, other_cfg))
    assert other.restore_state(tmp_path / "d.pt") is None  # trained under other settings: ignored


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"^unknown model family 'nope'; known families: image2d, mlp1d$"):
        get_family("nope")
    assert family_names() == ["image2d", "mlp1d"]
    assert get_family("image2d").paired and not get_family("mlp1d").paired


def test_family_drop_ins_for_the_trainer():
    """What the trainer does per family, through the family object, draws the same numbers as before."""
    cfg = _image_cfg().model
    fam = get_family("image2d")
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    aug = fam.draw_augmentation(cfg, 5, True, a)
    ref = draw_augmentation(5, True, 20, 16, b)
    assert torch.equal(aug.flip_h, ref.flip_h) and torch.equal(aug.crop_y, ref.crop_y)
    maps = torch.randint(0, 5, (5, 16, 16), dtype=torch.uint8)
    assert fam.condition(cfg, maps, 5).shape == (5, 5, 16, 16)
    assert fam.sample_shape(cfg, 5) == (5, 4, 16, 16) and fam.sample_shape(cfg, 5, 2) == (5, 2, 16, 16)
    mlp = SiteFacingConfig.model_validate({"model": {"family": "mlp1d"}}).model
    one = get_family("mlp1d")
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert one.draw_augmentation(mlp, 4, True, a).crop_size == 0
    assert torch.equal(one.condition(mlp, None, 4, a), torch.randn(4, mlp.mlp1d.noise_dim, generator=b))
    assert one.sample_shape(mlp, 4) == (4, 1)


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_site_agent_imports_nothing_from_central_server():
    # The source, lazy imports included ...
    found = {str(p.relative_to(SITE_AGENT)): name for p in SITE_AGENT.rglob("*.py") for name in _imports(p)
             if "central_server" in name}
    assert found == {}
    # ... and what importing every site_agent module pulls in, through common/ or anything else.
    code = ("import importlib, pkgutil, sys\n"
            "import asyndgan.site_agent as p\n"
            "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(m for m in sys.modules if 'central_server' in m))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_full_server_is_tried_again_within_seconds_a_lost_one_with_a_growing_delay():
    """A burst of idle connections filling the server must not keep a real site out for half a minute: its retry
    stays short (busy_backoff_s), while a lost or unreachable server is backed off from (backoff_s)."""
    from asyndgan.common.config import SiteConfig
    from asyndgan.site_agent.agent import retry_delay

    cfg = SiteConfig.model_validate({"data": "/tmp", "site_id": "a"})
    busy = [retry_delay(cfg, k, busy=True) for k in range(12)]
    lost = [retry_delay(cfg, k, busy=False) for k in range(12)]
    assert max(busy) <= 4.0 and min(busy) >= 0.25 and sum(busy) < 40
    assert max(lost) > 10 and lost[0] <= 1.0
    assert len({round(d, 6) for d in busy}) > 6  # jittered
