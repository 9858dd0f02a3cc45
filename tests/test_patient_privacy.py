"""Patient-level DP at a site (site_agent/privacy.py): the mechanism's parts, each tested so that it can fail,
and a one-run canary audit (experiments/dp_audit.py) that stays below the ledger and exceeds it when clipping
is broken."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from asyndgan.formats import public_start
from asyndgan.common.conditions import draw_augmentation
from asyndgan.common import serde
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
from asyndgan.common.errors import AsynDGANError, ConfigError, ProtocolError
from asyndgan.experiments import dp_audit
from asyndgan.formats.datasets import Patients, open_dataset
from asyndgan.formats.image_folders import read_patient_map
from asyndgan.site_agent.privacy import (PrivacyLedger, check_no_batch_mixing, noise_for_budget, planned_dp_steps,
                                         rdp_epsilon)
from asyndgan.site_agent.worker import SiteWorker

from conftest import TOY_PATIENTS as PATIENTS, TOY_SLICES as SLICES  # the toy site: 60 slices of 20 patients


def _cfg(steps: int = 50, **extra) -> SiteFacingConfig:
    return SiteFacingConfig.model_validate({
        "model": {"image2d": {"image_size": 16, "load_size": 20, "ndf": 4, "d_layers": 1,
                              "modalities": ["t1", "t1ce", "t2", "flair"]}},
        "d_optim": {"lr": 0.01}, "seed": 5, "schedule": {"steps": steps}, **extra})


@pytest.fixture
def site(toy_patient_site):
    return toy_patient_site


def _worker(site, tmp_path, cfg=None, **privacy) -> SiteWorker:
    cfg = cfg or _cfg()
    settings = {"delta": 1e-3, "trainable": "all", **privacy}
    return SiteWorker(cfg, open_dataset(site, cfg), privacy=PrivacyConfig(**settings),
                      ledger_path=tmp_path / "ledger.json", site_id="s")


def _batch(step: int, rng: torch.Generator, n: int = 3) -> serde.SyntheticBatch:
    keys = torch.randint(PATIENTS * SLICES, (n,), generator=rng)
    fake = torch.rand(n, 4, 16, 16, generator=rng) * 2 - 1
    return serde.SyntheticBatch(step=step, round=step, keys=keys, fake=fake, aug=draw_augmentation(n, True, 20, 16, rng))


def _seed(learner, seed: int) -> None:
    """Replace the site's secret sources by known ones (tests only: in a site they come from secrets)."""
    learner.secret.manual_seed(seed)
    learner.noise_generator.manual_seed(seed + 1)


# ---- who the patients are ------------------------------------------------------------------------------------
def test_patients_come_from_meta_json_and_group_the_slices(site):
    patients = open_dataset(site, _cfg()).patients()
    assert patients.count == PATIENTS and patients.source == "meta.json"
    assert [len(m) for m in patients.members()] == [SLICES] * PATIENTS
    assert set(patients.members()[4].tolist()) == {12, 13, 14}


def test_a_patient_map_names_every_image_or_is_refused(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    pairs = [(tmp_path / n, tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    assert read_patient_map(tmp_path, pairs) is None
    (tmp_path / "patients.csv").write_text("file,patient\na.png,X\nb.png,X\nc.png,Y\n")
    ids = read_patient_map(tmp_path, pairs)
    assert Patients.from_ids(ids, "patient map").count == 2
    (tmp_path / "patients.csv").write_text("file,patient\na.png,X\nb.png,X\n")
    with pytest.raises(AsynDGANError, match="does not name the patient of 1 image"):
        read_patient_map(tmp_path, pairs)


def test_brats_case_folders_are_the_patients(tmp_path):
    from asyndgan.demo_data.phantom.presets import phantom_config
    from asyndgan.demo_data.phantom.writer import write_phantom

    cfg = phantom_config("default", set(), sites=1, cases_per_site=[3], test_cases=0, shape=(48, 48, 30), seed=2)
    write_phantom(tmp_path / "ph", cfg)
    site_cfg = _cfg()
    site_cfg.model.image2d.load_size = None
    ds = open_dataset(tmp_path / "ph" / "site1", site_cfg,
                      __import__("asyndgan.common.config", fromlist=["DataPrepConfig"]).DataPrepConfig(
                          cache_dir=tmp_path / "cache"))
    patients = ds.patients()
    assert patients.count == 3 and patients.source == "case folders" and len(ds) > 3
    assert sum(len(m) for m in patients.members()) == len(ds)


# ---- the mechanism -------------------------------------------------------------------------------------------
def test_delta_must_be_at_most_one_tenth_over_the_patients(site, tmp_path):
    with pytest.raises(ConfigError, match=r"1/\(10 x patients\)"):
        _worker(site, tmp_path, delta=1 / (10 * PATIENTS) * 1.01)
    _worker(site, tmp_path, delta=1 / (10 * PATIENTS))


def test_the_noise_is_computed_so_that_the_planned_run_ends_at_the_budget(site, tmp_path):
    cfg = _cfg(steps=200)
    learner = _worker(site, tmp_path, cfg, epsilon=3.0, sample_rate=0.5, update_every=2).learner
    planned = planned_dp_steps(cfg, learner.privacy, 0)
    assert planned == math.ceil(100 * 1.05)
    eps = rdp_epsilon([(learner.noise_multiplier, 0.5, planned)], 1e-3)
    assert 0.98 * 3.0 <= eps <= 3.0
    # a server that announces fewer steps makes the noise smaller, but the ledger still stops at the budget
    assert noise_for_budget(3.0, 1e-3, 0.5, 10) < learner.noise_multiplier


def test_the_server_cannot_set_the_noise_it_only_announces_steps(site, tmp_path):
    hostile = _cfg(steps=1)  # "one step", then it keeps asking
    worker = _worker(site, tmp_path, hostile, epsilon=1.0, sample_rate=1.0)
    rng = torch.Generator().manual_seed(0)
    answered = 0
    with pytest.raises(AsynDGANError, match="privacy budget reached"):
        for step in range(100):
            worker.answer(_batch(step, rng))
            answered += 1
    assert 1 <= answered < 100 and worker.epsilon_spent <= 1.0


def test_poisson_rate_and_slice_cap(site, tmp_path):
    learner = _worker(site, tmp_path, sample_rate=0.3, slices_per_patient=2, augmentations=3).learner
    _seed(learner, 0)
    drawn = []
    for _ in range(400):
        keys, units = learner.draw()
        count = int(units.max()) + 1 if units.numel() else 0
        drawn.append(count)
        assert keys.numel() == count * 2 * 3  # 2 slices of each drawn patient, 3 views each
        for u in range(count):  # one unit's rows all belong to one patient
            assert len({int(k) // SLICES for k in keys[units == u]}) == 1
    rate = np.mean(drawn) / PATIENTS
    assert abs(rate - 0.3) < 3 * math.sqrt(0.3 * 0.7 / (400 * PATIENTS))


def test_full_batch_dp_draws_every_patient(site, tmp_path):
    learner = _worker(site, tmp_path, sample_rate=1.0, slices_per_patient=0).learner
    keys, units = learner.draw()
    assert sorted(keys.tolist()) == list(range(PATIENTS * SLICES)) and int(units.max()) == PATIENTS - 1


def test_one_patient_moves_the_sum_by_at_most_the_clipping_bound(site, tmp_path):
    learner = _worker(site, tmp_path, max_grad_norm=0.01).learner
    learner.chunk_rows = 4  # units spread over several chunks
    fake = torch.zeros(1, 4, 16, 16)
    keys = torch.arange(12)
    units = torch.arange(12) // SLICES
    maps, real = learner._rows(keys, fake)
    sums, _, norms = learner._clipped_sums(maps, real, 1.0, units)
    assert (norms > 0.01).all()  # every patient's raw gradient is above the bound: all are clipped
    total = torch.cat([s.flatten() for s in sums]).norm()
    assert total <= 4 * 0.01 * (1 + 1e-4)
    without_one, _, _ = learner._clipped_sums(maps[:9], real[:9], 1.0, units[:9])
    diff = torch.cat([(a - b).flatten() for a, b in zip(sums, without_one)]).norm()
    assert 0.01 * 0.999 <= diff <= 0.01 * (1 + 1e-4)


def test_the_noise_has_the_standard_deviation_sigma_times_c(site, tmp_path):
    learner = _worker(site, tmp_path, noise_multiplier=2.5, max_grad_norm=0.4).learner
    _seed(learner, 3)
    zeros = [torch.zeros(4000)]
    noisy = learner.noisy_gradient(zeros)[0] * learner.expected_units
    assert abs(float(noisy.std()) - 2.5 * 0.4) < 0.04 and abs(float(noisy.mean())) < 0.04


def test_the_keys_the_server_chose_are_ignored(site, tmp_path):
    grads = []
    for real_value in (0.0, 1e6):
        worker = _worker(site, tmp_path / str(real_value))
        _seed(worker.learner, 11)
        rng = torch.Generator().manual_seed(4)
        batch = _batch(0, rng)
        maps = torch.zeros(3, 16, 16, dtype=torch.uint8)
        grad, _ = worker.learner.step(0, maps, torch.full((3, 4, 16, 16), real_value), batch.fake)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])


def test_layers_that_mix_the_rows_of_a_batch_are_refused():
    with pytest.raises(ConfigError, match="mix the rows"):
        check_no_batch_mixing(nn.ModuleDict({"t1": nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))}))
    check_no_batch_mixing(nn.ModuleDict({"t1": nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4))}))


def test_only_the_declared_part_of_the_discriminator_learns(site, tmp_path):
    worker = _worker(site, tmp_path, trainable="last:1")
    learner = worker.learner
    before = {k: v.clone() for k, v in learner.discriminators.state_dict().items()}
    rng = torch.Generator().manual_seed(0)
    for step in range(3):
        worker.answer(_batch(step, rng))
    after = learner.discriminators.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    last = [n for n, p in learner.discriminators.named_parameters() if p.requires_grad]
    assert changed == sorted(last) and 0 < len(last) < len(before)
    assert learner.trained and sum(p.numel() for p in learner.trained) < sum(v.numel() for v in before.values())


def test_the_ledger_composes_across_restarts_and_keeps_its_unit(tmp_path):
    privacy = PrivacyConfig(epsilon=4.0, delta=1e-5)
    first = PrivacyLedger(tmp_path / "l.json", "s", privacy)
    sigma = noise_for_budget(4.0, 1e-5, 0.5, 100)
    first.charge(sigma, 0.5, 60)
    again = PrivacyLedger(tmp_path / "l.json", "s", privacy)  # a restart
    assert again.history == [(sigma, 0.5, 60)] and again.epsilon_spent == pytest.approx(first.epsilon_spent)
    sigma2 = noise_for_budget(4.0, 1e-5, 0.5, 100, again.history)  # the next run plans 100 more
    assert sigma2 > sigma
    again.charge(sigma2, 0.5, 100)
    assert 0.97 * 4.0 <= again.epsilon_spent <= 4.0
    record = json.loads((tmp_path / "l.json").read_text())
    assert record["unit"] == "one patient" and "zero-out" in record["neighbouring"]
    with pytest.raises(ConfigError, match="accounts one patient"):
        PrivacyLedger(tmp_path / "l.json", "s", PrivacyConfig(epsilon=4.0, delta=1e-5, unit="slice"))


# ---- the audit -----------------------------------------------------------------------------------------------
def _audited_run(site, tmp_path, broken: bool) -> tuple[dp_audit.AuditResult, float]:
    worker = _worker(site, tmp_path, _cfg(steps=30), epsilon=1.0, sample_rate=0.5, trainable="all")
    learner = worker.learner
    _seed(learner, 21)
    canaries = dp_audit.attach(learner, count=200, seed=5)
    if broken:  # clipping deliberately broken: every unit's gradient passes as it is
        learner.clip_and_sum = lambda per_unit: (
            [g.sum(dim=0).view(p.shape) for g, p in zip(per_unit, learner.trained)],
            torch.cat(per_unit, dim=1).norm(dim=1))
    rng = torch.Generator().manual_seed(0)
    for step in range(30):
        worker.answer(_batch(step, rng))
    return dp_audit.conclude(canaries), worker.epsilon_spent


def test_the_canary_audit_stays_below_the_ledger_and_catches_broken_clipping(site, tmp_path):
    honest, ledger_eps = _audited_run(site, tmp_path / "honest", broken=False)
    assert 0.9 <= ledger_eps <= 1.0
    assert honest.epsilon_lower_bound <= ledger_eps
    broken, _ = _audited_run(site, tmp_path / "broken", broken=True)
    assert broken.epsilon_lower_bound > ledger_eps and broken.correct == broken.guesses


def test_epsilon_lower_bound_grows_with_correct_guesses():
    assert dp_audit.epsilon_lower_bound(50, 100, 0.05) == 0.0
    assert 0 < dp_audit.epsilon_lower_bound(70, 100, 0.05) < dp_audit.epsilon_lower_bound(90, 100, 0.05)
    # all of 100 correct: p >= 0.05 ** (1 / 100), eps = log(p / (1 - p))
    p = 0.05 ** (1 / 100)
    assert dp_audit.epsilon_lower_bound(100, 100, 0.05) == pytest.approx(math.log(p / (1 - p)), rel=1e-3)


# ---- public weights --------------------------------------------------------------------------------------------
def test_public_weights_are_read_only_after_their_digest_matched(site, tmp_path):
    worker = _worker(site, tmp_path)
    data = public_start.weights_to_bytes(worker.learner.discriminators.state_dict())
    state = public_start.weights_from_bytes(data, public_start.digest(data))
    assert set(state) == set(worker.learner.discriminators.state_dict())
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ProtocolError, match="not the"):
        public_start.weights_from_bytes(tampered, public_start.digest(data))
    with pytest.raises(ConfigError, match="do not fit"):
        worker.learner.load_public({k: v[..., :1] for k, v in state.items()})


def test_one_joint_discriminator_over_every_modality_learns_under_dp(site, tmp_path):
    cfg = _cfg()
    cfg.model.image2d.discriminator = "joint"
    worker = _worker(site, tmp_path, cfg, trainable="all")
    assert list(worker.learner.discriminators) == ["joint"]
    assert worker.learner.discriminators["joint"].net[0].in_channels == 5 + 4
    before = [p.clone() for p in worker.learner.trained]
    grad = worker.answer(_batch(0, torch.Generator().manual_seed(0))).gradient
    assert grad.shape == (3, 4, 16, 16) and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, worker.learner.trained))
