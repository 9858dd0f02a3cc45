"""The one-shot DP release of a private site's intensity statistics (site_agent/site_statistics.py) and the server's
term that pulls the generator towards them (common/intensity_statistics.py, central_server/trainer.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from asyndgan.common import serde
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
from asyndgan.common.errors import AsynDGANError, ProtocolError
from asyndgan.common.intensity_statistics import check_received, names, region_moments, statistics_loss
from asyndgan.site_agent import site_statistics
from asyndgan.formats.datasets import open_dataset
from asyndgan.site_agent.privacy import noise_for_budget, rdp_epsilon
from asyndgan.site_agent.worker import SiteWorker
from conftest import TOY_PATIENTS, TOY_SLICES

MODALITIES = ["t1", "t1ce", "t2", "flair"]
PATIENTS, SLICES = TOY_PATIENTS, TOY_SLICES


def _cfg(steps: int = 40) -> SiteFacingConfig:
    return SiteFacingConfig.model_validate({
        "model": {"image2d": {"image_size": 16, "load_size": 20, "ndf": 4, "d_layers": 1, "modalities": MODALITIES}},
        "schedule": {"steps": steps}})


@pytest.fixture
def site(toy_patient_site):
    return toy_patient_site


def _maps() -> torch.Tensor:
    maps = torch.zeros(2, 8, 8, dtype=torch.uint8)
    maps[:, 1:7, 1] = maps[:, 1:7, 6] = maps[:, 1, 1:7] = maps[:, 6, 1:7] = 1  # the brain's outline
    maps[:, 3:5, 3:5] = 3  # a tumour inside
    return maps


def test_region_moments_measure_the_brain_and_the_tumour_apart():
    maps = _maps()
    images = torch.full((2, 2, 8, 8), -1.0)
    brain = (maps > 0).clone()
    brain[:, 2:6, 2:6] = True
    images[brain[:, None].expand_as(images)] = 0.2
    images[:, :, 3:5, 3:5] = torch.tensor([0.6, -0.4])[None, :, None, None]
    m = region_moments(images, maps)
    assert torch.allclose(m["brain/mean"], torch.tensor([0.2, 0.2])) and torch.allclose(m["tumour/mean"],
                                                                                      torch.tensor([0.6, -0.4]))
    assert float(m["tumour/std"].max()) < 1e-3
    no_tumour = region_moments(images, torch.where(maps == 3, torch.ones_like(maps), maps))
    assert torch.isnan(no_tumour["tumour/mean"]).all() and torch.isfinite(no_tumour["brain/mean"]).all()


def test_one_patient_moves_the_clipped_sum_by_at_most_the_clip():
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 3, size=(15, 16))
    for p in range(15):
        without = vectors.copy()
        without[p] = 0  # zero-out neighbour
        moved = np.linalg.norm(site_statistics.clipped_sum(vectors, 2.0) - site_statistics.clipped_sum(without, 2.0))
        assert moved <= 2.0 + 1e-9
    big, without = vectors.copy(), vectors.copy()
    big[0] *= 1e6
    without[0] = 0
    moved = site_statistics.clipped_sum(big, 2.0) - site_statistics.clipped_sum(without, 2.0)
    assert np.linalg.norm(moved) == pytest.approx(2.0)  # an outlier counts with norm C exactly, no more


class _Stub:
    """A dataset of 10 patients of 2 slices, each patient the same image: its statistics are known exactly."""

    modalities = ["t1", "flair"]

    def real(self, keys):
        images = torch.full((len(keys), 2, 8, 8), -1.0)
        maps = _maps()[:1].expand(len(keys), -1, -1)
        images[(maps > 0)[:, None].expand_as(images)] = 0.1
        images[:, :, 2:6, 2:6] = 0.1
        images[:, :, 3:5, 3:5] = 0.5
        return images


def test_the_release_is_unbiased_with_the_noise_it_declares():
    maps = _maps()[:1].expand(20, -1, -1).contiguous()
    members = [np.array([2 * p, 2 * p + 1]) for p in range(10)]
    releases = [site_statistics.release(_Stub(), maps, members, noise_multiplier=2.0, clip=1.5) for _ in range(600)]
    flair_tumour = np.array([r.values["flair/tumour/mean"] for r in releases])
    assert releases[0].noise_std["flair/tumour/mean"] == pytest.approx(2.0 * 1.5 / 10)
    # the true vector (0.1, ~0, 0.5, ~0 per modality) has norm ~0.72 < clip: no clipping bias
    assert abs(flair_tumour.mean() - 0.5) < 4 * 0.3 / np.sqrt(600)
    assert flair_tumour.std() == pytest.approx(0.3, rel=0.1)


def test_a_private_site_releases_once_charges_its_ledger_and_plans_dp_sgd_for_the_rest(site, tmp_path):
    cfg = _cfg()
    privacy = PrivacyConfig(delta=1e-3, epsilon=4.0, statistics_share=0.25, trainable="all")
    worker = SiteWorker(cfg, open_dataset(site, cfg), privacy=privacy, ledger_path=tmp_path / "s.ledger.json",
                        site_id="s")
    released = worker.statistics
    assert released is not None and set(released.values) <= set(names(MODALITIES))
    assert {f"{m}/brain/mean" for m in MODALITIES} <= set(released.values)
    sigma = noise_for_budget(1.0, 1e-3, 1.0, 1)
    assert worker.ledger.history[0] == (sigma, 1.0, 1)
    assert worker.ledger.epsilon_spent == pytest.approx(1.0, rel=0.01)
    learner = worker.learner
    planned = rdp_epsilon([*worker.ledger.history, (learner.noise_multiplier, learner.sample_rate, learner.planned)],
                          1e-3)
    assert 3.9 < planned <= 4.0  # the whole budget, release included
    alone = SiteWorker(cfg, open_dataset(site, cfg), privacy=privacy.model_copy(update={"statistics_share": 0.0}),
                       ledger_path=tmp_path / "t.ledger.json", site_id="t").learner.noise_multiplier
    assert learner.noise_multiplier > alone  # less budget left for DP-SGD
    again = SiteWorker(cfg, open_dataset(site, cfg), privacy=privacy, ledger_path=tmp_path / "s.ledger.json",
                       site_id="s")
    assert again.statistics == released and again.ledger.history[0] == (sigma, 1.0, 1)
    assert len(again.ledger.history) == 1  # a second join sends the same numbers without charging again
    # the kept release belongs to these data and settings
    other = privacy.model_copy(update={"statistics_clip": 3.0})
    with pytest.raises(AsynDGANError, match="other data or settings"):
        SiteWorker(cfg, open_dataset(site, cfg), privacy=other, ledger_path=tmp_path / "s.ledger.json", site_id="s")


def test_ready_carries_the_release_and_refuses_malformed_numbers():
    ready = serde.Ready(num_chunks=1, num_samples=5, statistics={"t1/brain/mean": (0.1, 0.02)})
    back = serde.ready_from_proto(serde.ready_to_proto(ready).ready)
    assert back.statistics["t1/brain/mean"] == pytest.approx((0.1, 0.02))
    for bad in ({"t1/brain/mean": (float("nan"), 0.1)}, {"t1/brain/mean": (0.1, -1.0)},
                {f"n{i}": (0.0, 0.1) for i in range(300)}, {"": (0.0, 0.1)}):
        with pytest.raises(ProtocolError):
            serde.ready_from_proto(serde.ready_to_proto(serde.Ready(1, 5, statistics=bad)).ready)


def test_the_server_clamps_a_site_release_and_drops_unknown_names():
    got = check_received({"t1/brain/mean": (7.0, 0.1), "flair/tumour/std": (-2.0, 0.1), "evil": (1.0, 0.0)},
                         set(names(["t1", "flair"])))
    assert got == {"t1/brain/mean": (1.0, 0.1), "flair/tumour/std": (0.0, 0.1)}


def test_the_statistics_term_pulls_images_towards_the_released_numbers():
    maps = _maps()
    images = torch.zeros(2, 2, 8, 8, requires_grad=True)
    target = {"flair/tumour/mean": (0.6, 0.01), "t1/brain/mean": (-0.3, 0.5)}
    optimiser = torch.optim.Adam([images], lr=0.02)
    first = None
    for _ in range(150):
        loss = statistics_loss(images, maps, ["t1", "flair"], target, floor=0.05)
        first = float(loss.detach()) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    m = region_moments(images.detach(), maps)
    assert float(loss.detach()) < 0.01 * first
    assert float(m["tumour/mean"][1]) == pytest.approx(0.6, abs=0.02)
    # the trusted number (small noise) pulls much harder than the noisy one
    assert abs(float(m["brain/mean"][0]) + 0.3) > abs(float(m["tumour/mean"][1]) - 0.6)


def test_the_trainer_steers_with_the_released_statistics_of_private_sites(site, tmp_path):
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

    cfg = ServerConfig.model_validate({"run_dir": str(tmp_path / "run"), "tensorboard": False,
                                       "train": {"batch_size": 2}, "site": _cfg().model_dump()})
    site_cfg = cfg.site
    privacy = PrivacyConfig(delta=1e-3, epsilon=4.0, statistics_share=0.25, trainable="all")
    private = LocalSession("p", open_dataset(site, site_cfg), site_cfg, privacy=privacy,
                           ledger_path=tmp_path / "p.ledger.json")
    plain = LocalSession("q", open_dataset(site, site_cfg), site_cfg)
    assert private.statistics and not plain.statistics
    for sessions, steered in (([private, plain], True), ([plain], False)):
        trainer = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run")
        report = trainer.train_step(sessions)
        assert ("server" in report.losses) == steered
        if steered:
            assert report.losses["server"]["statistics"] > 0
    off = cfg.model_copy(update={"train": cfg.train.model_copy(update={"statistics_weight": 0.0})})
    trainer = Trainer(off, LocalRegistry([private]), CountingBank([private]), tmp_path / "run")
    assert "server" not in trainer.train_step([private]).losses


def test_frozen_public_discriminators_spend_only_the_release(site, tmp_path):
    """trainable=none: the public discriminators never change, the real images are never used, the ledger holds
    the one release and nothing else however many batches are answered; without a public start it is refused."""
    from asyndgan.common.conditions import draw_augmentation
    from asyndgan.common.errors import ConfigError

    cfg = _cfg()
    privacy = PrivacyConfig(delta=1e-3, epsilon=4.0, statistics_share=1.0, trainable="none")
    public = {k: v.clone() for k, v in SiteWorker(cfg, open_dataset(site, cfg)).learner.discriminators.state_dict()
              .items()}
    worker = SiteWorker(cfg, open_dataset(site, cfg), privacy=privacy, ledger_path=tmp_path / "s.ledger.json",
                        site_id="s", initial=public)
    assert worker.ledger.epsilon_spent == pytest.approx(4.0, rel=0.01) and len(worker.ledger.history) == 1
    worker.dataset.real = lambda keys: torch.full((len(keys), 4, 20, 20), float("nan"))  # used: NaN answers
    rng = torch.Generator().manual_seed(0)
    answers = []
    for step in range(3):
        keys = torch.randint(PATIENTS * SLICES, (2,), generator=rng)
        fake = torch.rand(2, 4, 16, 16, generator=rng) * 2 - 1
        batch = serde.SyntheticBatch(step, step, keys, fake, draw_augmentation(2, False, 20, 16, rng))
        answers.append(worker.answer(batch))
    assert all(torch.isfinite(a.gradient).all() and float(a.gradient.abs().sum()) > 0 for a in answers)
    assert len(worker.ledger.history) == 1 and set(answers[-1].losses) == {"g_adv"}
    now = worker.learner.discriminators.state_dict()
    assert all(torch.equal(now[k], public[k]) for k in public)
    with pytest.raises(ConfigError, match="public pretraining"):
        SiteWorker(cfg, open_dataset(site, cfg), privacy=privacy, ledger_path=tmp_path / "t.ledger.json", site_id="t")
    with pytest.raises(ValueError, match="leaves nothing for DP-SGD"):
        PrivacyConfig(statistics_share=1.0)


def test_the_anchor_keeps_the_generator_near_the_public_start(site, tmp_path):
    """train.anchor_weight: the server's L1 pull towards the public generator's output (no site data) keeps the
    generator's images about four times closer to the start than the same steps without it."""
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

    drift = {}
    for weight in (0.0, 100.0):
        cfg = ServerConfig.model_validate({"run_dir": str(tmp_path / f"run{weight:g}"), "tensorboard": False,
                                           "g_optim": {"lr": 0.002}, "site": _cfg().model_dump(),
                                           "train": {"batch_size": 4}})
        session = LocalSession("q", open_dataset(site, cfg.site), cfg.site)
        trainer = Trainer(cfg, LocalRegistry([session]), CountingBank([session]), cfg.run_dir)
        start = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
        if weight:
            trainer.anchor_to(start, weight)
        reports = [trainer.train_step([session]) for _ in range(20)]
        assert ("anchor" in reports[0].losses.get("server", {})) == bool(weight)
        if weight:
            assert reports[0].losses["server"]["anchor"] == 0.0  # G is its anchor at the start
            assert reports[-1].losses["server"]["anchor"] > 0.0
        trainer.anchor_to(start, weight)  # to measure how far the images moved
        planned = trainer._plan([session])
        x = trainer._conditions(planned)
        inside = torch.cat(trainer._regions(planned, x)).unsqueeze(1)  # what crosses the wire (the rest is -1)
        with torch.no_grad():
            drift[weight] = float((trainer.generator(x) - trainer.anchor(x)).abs()[inside.expand(-1, 4, -1, -1)]
                                  .mean())
    assert drift[0.0] > 0.05 and drift[100.0] < drift[0.0] / 2.5, drift


def test_the_anchor_is_on_by_default_only_with_a_public_start():
    from asyndgan.common.config import ANCHOR_DEFAULT, TrainConfig

    assert TrainConfig().anchor_for(public_start=True) == ANCHOR_DEFAULT == 100.0
    assert TrainConfig().anchor_for(public_start=False) == 0.0
    assert TrainConfig(anchor_weight=0).anchor_for(public_start=True) == 0.0
    assert TrainConfig(anchor_weight=7).anchor_for(public_start=False) == 7.0


def test_without_the_sites_gradients_only_the_released_statistics_move_the_generator(site, tmp_path):
    """train.adversarial_weight 0: a site that released nothing leaves the generator exactly as it was; a private
    site's released statistics still pull it."""
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig
    from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

    cfg = ServerConfig.model_validate({"run_dir": str(tmp_path / "run"), "tensorboard": False,
                                       "train": {"batch_size": 2, "adversarial_weight": 0.0},
                                       "site": _cfg().model_dump()})
    plain = LocalSession("q", open_dataset(site, cfg.site), cfg.site)
    private = LocalSession("p", open_dataset(site, cfg.site), cfg.site, ledger_path=tmp_path / "p.ledger.json",
                           privacy=PrivacyConfig(delta=1e-3, epsilon=4.0, statistics_share=0.25, trainable="all"))
    for sessions, moves in (([plain], False), ([private], True)):
        trainer = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run")
        before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
        assert trainer.train_step(sessions) is not None
        same = all(torch.equal(before[k], v) for k, v in trainer.generator.state_dict().items())
        assert same != moves
