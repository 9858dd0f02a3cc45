"""A site's own differential privacy (site_agent/privacy.py): the accountant, the ledger, the private learner,
and a private site process that reaches its budget while the run goes on with the others."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from asyndgan.common import serde
from asyndgan.common.conditions import draw_augmentation
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
from asyndgan.common.errors import AsynDGANError, ConfigError, PrivacyBudgetExhausted
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.site_agent import state
from asyndgan.formats.datasets import open_dataset
from asyndgan.site_agent.privacy import PrivacyLedger, affordable_steps, rdp_epsilon
from asyndgan.site_agent.worker import SiteWorker


def _cfg(lambda_l1: float = 0.0) -> SiteFacingConfig:
    return SiteFacingConfig.model_validate({
        "model": {"image2d": {"image_size": 16, "load_size": 20, "ndf": 4, "d_layers": 1,
                              "modalities": ["t1", "t1ce", "t2", "flair"]}},
        "loss": {"lambda_l1": lambda_l1}, "d_optim": {"lr": 0.01}, "seed": 5})


def _batch(n: int, step: int, samples: int, rng: torch.Generator) -> serde.SyntheticBatch:
    keys = torch.randint(samples, (n,), generator=rng)
    aug = draw_augmentation(n, True, 20, 16, rng)
    fake = torch.rand(n, 4, 16, 16, generator=rng) * 2 - 1
    return serde.SyntheticBatch(step=step, round=step, keys=keys, fake=fake, aug=aug)


@pytest.fixture
def toy(tmp_path):
    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[40], size=20, seed=1)
    return folder


# ---- the accountant ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q, sigma, steps, delta", [
    (4 / 196, 1.0, 2000, 1e-5),      # the cpu preset's smallest site, a whole run
    (0.02, 0.8, 500, 1e-5),
    (6 / 4661, 1.0, 155_400, 1e-5),  # a BraTS-size site, a DSL-length run: epsilon ~3.0 (RDP) in both
    ((4 / 196, 1.0, 700), (4 / 150, 1.3, 300), None, 1e-6),  # a history with two settings
])
def test_our_accountant_matches_google_dp_accounting_within_5_percent(q, sigma, steps, delta):
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    history = [(sigma, q, steps)] if steps is not None else [(q[1], q[0], q[2]), (sigma[1], sigma[0], sigma[2])]
    theirs = rdp_privacy_accountant.RdpAccountant()
    for s, rate, t in history:
        theirs.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(s)), t))
    ours = rdp_epsilon(history, delta)
    assert ours > 0.5
    assert abs(ours - theirs.get_epsilon(delta)) <= 0.05 * ours


def test_affordable_steps_is_the_last_step_within_the_budget():
    privacy = PrivacyConfig(epsilon=3.0, delta=1e-5)
    t = affordable_steps(privacy, 0.02)
    assert 100 < t < 100_000
    assert rdp_epsilon([(1.0, 0.02, t)], 1e-5) <= 3.0 < rdp_epsilon([(1.0, 0.02, t + 1)], 1e-5)


# ---- the ledger ----------------------------------------------------------------------------------------------
def test_the_ledger_persists_accumulates_and_refuses_past_the_budget(tmp_path):
    path = tmp_path / "s.privacy-ledger.json"
    privacy = PrivacyConfig(epsilon=5.0, delta=1e-5)
    ledger = PrivacyLedger(path, "s", privacy)
    assert ledger.epsilon_spent == 0 and not path.exists()
    first = ledger.charge(1.0, 0.05, 10)
    again = PrivacyLedger(path, "s", privacy)  # a restart reads what was spent
    assert again.epsilon_spent == pytest.approx(first) and first > 0
    second = again.charge(1.0, 0.05, 10)
    assert second > first and json.loads(path.read_text())["history"] == [[1.0, 0.05, 20]]

    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget reached: epsilon .* of 5 spent"):
        again.charge(1.0, 0.05, 10_000)
    assert path.read_bytes() == before  # nothing recorded for a step not taken


def test_a_damaged_or_foreign_ledger_stops_the_site_instead_of_starting_from_zero(tmp_path):
    path = tmp_path / "s.privacy-ledger.json"
    path.write_text("{not json")
    with pytest.raises(AsynDGANError, match=r"cannot be read .* \(deleting it would forget"):
        PrivacyLedger(path, "s", PrivacyConfig())
    PrivacyLedger(tmp_path / "t.json", "other", PrivacyConfig()).charge(1.0, 0.1, 1)
    with pytest.raises(AsynDGANError, match="site 'other'"):
        PrivacyLedger(tmp_path / "t.json", "s", PrivacyConfig())


# ---- the private learner -------------------------------------------------------------------------------------
def test_a_private_site_refuses_an_l1_term_from_the_server(toy, tmp_path):
    cfg = _cfg(lambda_l1=100.0)
    with pytest.raises(ConfigError, match="lambda_l1 = 100.*forbid"):
        SiteWorker(cfg, open_dataset(toy, cfg), privacy=PrivacyConfig(delta=1e-3), ledger_path=tmp_path / "l.json")


def test_a_private_site_answers_with_dp_sgd_and_stops_at_its_budget(toy, tmp_path):
    cfg = _cfg()
    privacy = PrivacyConfig(epsilon=2.0, delta=1e-3, sample_rate=0.1, noise_multiplier=1.0, unit="slice")
    worker = SiteWorker(cfg, open_dataset(toy, cfg), privacy=privacy, ledger_path=tmp_path / "l.json", site_id="s")
    expected = affordable_steps(privacy, 0.1)
    rng = torch.Generator().manual_seed(0)
    answered, grads = 0, []
    with pytest.raises(PrivacyBudgetExhausted):
        for step in range(expected + 5):
            answer = worker.answer(_batch(3, step, 40, rng))
            answered += 1
            grads.append(answer.gradient)
            assert set(answer.losses) == {"d_fake", "g_adv", "epsilon"}  # nothing computed on real images
            assert answer.privacy.enabled and answer.privacy.epsilon_spent == pytest.approx(answer.losses["epsilon"])
    assert answered == expected
    assert worker.epsilon_spent <= 2.0 and grads[-1].shape == (3, 4, 16, 16) and torch.isfinite(grads[-1]).all()
    assert float(grads[-1].abs().sum()) > 0


def test_discriminator_state_trained_without_dp_is_never_loaded_into_a_private_site(toy, tmp_path):
    cfg = _cfg()
    ds = open_dataset(toy, cfg)
    plain = SiteWorker(cfg, ds)
    plain.save_state(tmp_path / "d.pt", 7)
    private = SiteWorker(cfg, ds, privacy=PrivacyConfig(delta=1e-3), ledger_path=tmp_path / "l.json")
    assert private.restore_state(tmp_path / "d.pt") is None
    assert state.settings_digest(cfg, ds.modalities) != state.settings_digest(cfg, ds.modalities, private="patient")


def test_privacy_settings_are_validated():
    with pytest.raises(Exception, match="noise_multiplier"):
        PrivacyConfig(noise_multiplier=0.01)
    with pytest.raises(Exception, match="epsilon"):
        PrivacyConfig(epsilon=0)


# ---- real processes ------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_the_ledger_survives_kill_9_and_a_site_at_its_budget_leaves_while_the_run_goes_on(tmp_path):
    from procs import TINY_IMAGE2D, Server, site_status, start_site, status

    folders = write_toy_sites(tmp_path / "data", sites=2, per_site=[40, 40], size=20, seed=3)
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 300, "train.batch_size": 2,
                                       "train.min_sites": 2, "checkpoint_every": 1000})
    ledger = tmp_path / "state" / "private.privacy-ledger.json"
    budget = ["--set", "privacy.epsilon=1.5", "--set", "privacy.delta=1e-3", "--set", "privacy.sample_rate=0.05",
                  "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.unit=slice"]
    other = start_site(folders[1], server.address, "other", tmp_path / "other.log")  # privacy off
    site = start_site(folders[0], server.address, "private", tmp_path / "p1.log", budget, private=True)
    try:
        end = time.monotonic() + 60
        while not (ledger.exists() and json.loads(ledger.read_text())["history"][0][2] >= 5):
            assert time.monotonic() < end and site.poll() is None, (tmp_path / "p1.log").read_text()
            time.sleep(0.1)
        os.kill(site.pid, signal.SIGKILL)
        site.wait(10)
        spent = json.loads(ledger.read_text())
        steps_before = spent["history"][-1][2]
        for f in (tmp_path / "state").glob("private.discriminator.pt"):
            f.unlink()  # a deleted discriminator state resets nothing of the budget

        site = start_site(folders[0], server.address, "private", tmp_path / "p2.log", budget, private=True)
        assert site.wait(90) == 0, (tmp_path / "p2.log").read_text()  # left at its budget: exit 0
        log = (tmp_path / "p2.log").read_text()
        assert "privacy budget reached" in log
        after = json.loads(ledger.read_text())
        assert after["history"][-1][2] > steps_before  # the restart went on from the ledger, not from zero
        assert after["epsilon_at_delta"][0] <= 1.5

        left = site_status(status(server.address), "private")  # the server shows why, and what was spent
        assert "privacy budget reached" in left.left and left.privacy.exhausted and left.privacy.enabled
        assert 1.0 < left.privacy.epsilon_spent <= 1.5
        assert server.wait(120) == 0, server.output()  # the run finished with the other site
        assert other.wait(30) == 0
    finally:
        for p in (site, other):
            p.kill()
        server.kill()


def test_status_text_shows_each_sites_privacy_and_why_it_left():
    from asyndgan.central_server.status import format_status
    from asyndgan.common._generated import asyndgan_pb2 as pb

    reply = pb.StatusReply(step=10, total_steps=100, family="image2d", state="training", run_id="r",
                           modalities=["t1", "t1ce", "t2", "flair"])
    reply.sites.append(pb.SiteStatus(site_id="a", ready=True, modalities=["t1", "t2"], privacy=pb.Privacy(
        enabled=True, epsilon_budget=10, epsilon_spent=1.25, delta=1e-5)))
    reply.sites.append(pb.SiteStatus(site_id="b", left="privacy budget reached", modalities=["flair"], privacy=pb.Privacy(
        enabled=True, epsilon_budget=10, epsilon_spent=9.98, delta=1e-5, exhausted=True)))
    reply.sites.append(pb.SiteStatus(site_id="c", ready=True, modalities=["t1"]))
    text = format_status(reply)
    # what each site holds, and the modalities nobody connected holds (b left; it held flair)
    assert "holds t1+t2" in text and "modalities no connected site holds (not learnt): t1ce, flair" in text
    assert "sites connected: 2" in text and "privacy on: epsilon 1.25 of 10 (delta 1e-05)" in text
    assert "privacy budget spent: epsilon 9.98 of 10" in text and "left the run: privacy budget reached" in text
    assert text.rstrip().endswith("privacy off")


def test_a_privacy_report_with_values_out_of_range_is_a_protocol_error():
    from asyndgan.common._generated import asyndgan_pb2 as pb
    from asyndgan.common.errors import ProtocolError

    with pytest.raises(ProtocolError, match="out of range"):
        serde.privacy_from_proto(pb.Privacy(enabled=True, epsilon_spent=float("nan")))
    leave = serde.leave_from_proto(pb.Leave(reason="budget\nspent\x00" + "x" * 900))
    assert "\n" not in leave.reason and len(leave.reason) <= serde.MAX_REASON
