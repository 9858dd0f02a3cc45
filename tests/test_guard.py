"""The server's guard on each step's gradients (central_server/guard.py): bounded size and share, repeat offenders
removed, a retried step that leaves the discriminators in step with the generator."""

from __future__ import annotations

import pytest
import torch

from asyndgan.central_server import guard
from asyndgan.central_server.aggregation import SiteGradient
from asyndgan.formats.label_map_bank import LabelMapBank
from asyndgan.central_server.registry import JoinRefused, SiteRegistry
from asyndgan.common import serde
from asyndgan.common.config import GuardConfig, ServerConfig, SiteFacingConfig, load_config
from asyndgan.formats.datasets import open_dataset
from asyndgan.site_agent.gradients import SiteLearner
from procs import TINY_IMAGE2D


def _answer(scale: float, rows: int = 4, start: int = 0, seed: int = 0) -> SiteGradient:
    g = torch.randn(rows, 2, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale
    return SiteGradient(slice(start, start + rows), None, g, num_samples=10, batch_size=rows)


def test_a_loud_site_is_rejected_and_a_large_row_clipped_against_the_others():
    results = {"a": _answer(1.0, seed=1), "b": _answer(1.2, seed=2), "c": _answer(100.0, seed=3)}
    verdict = guard.check_step(results, GuardConfig())
    assert set(verdict.accepted) == {"a", "b"} and "c" in verdict.rejected
    assert 0.9 < verdict.reference < 1.3  # set by the honest sites, not the loud one
    loud_row = _answer(1.0, seed=4)
    loud_row.gradient[0] *= 50  # one row far out, the site's median normal: clipped, not rejected
    verdict = guard.check_step({"a": _answer(1.0, seed=1), "b": _answer(1.0, seed=2), "c": loud_row}, GuardConfig())
    assert set(verdict.accepted) == {"a", "b", "c"} and verdict.clipped_rows == {"c": 1}
    rms = guard.row_rms(verdict.accepted["c"].gradient)
    assert float(rms[0]) == pytest.approx(4.0 * verdict.reference, rel=1e-4)
    assert torch.equal(verdict.accepted["c"].gradient[1:], loud_row.gradient[1:])  # the other rows untouched


def test_honest_sites_and_a_lone_site_pass_untouched():
    results = {"a": _answer(1.0, seed=1), "b": _answer(2.0, seed=2), "c": _answer(0.7, seed=3)}
    verdict = guard.check_step(results, GuardConfig())
    assert not verdict.rejected and not verdict.clipped_rows
    assert all(verdict.accepted[s].gradient is results[s].gradient for s in results)
    alone = {"a": _answer(1e6)}
    assert guard.check_step(alone, GuardConfig()).accepted == alone  # nothing to compare with


@pytest.mark.parametrize("weights,cap,want", [
    ({"a": 0.8, "b": 0.1, "c": 0.1}, 0.5, {"a": 0.5, "b": 0.25, "c": 0.25}),
    ({"a": 0.4, "b": 0.35, "c": 0.25}, 0.5, {"a": 0.4, "b": 0.35, "c": 0.25}),
    ({"a": 0.9, "b": 0.1}, 0.5, {"a": 0.5, "b": 0.5}),
    ({"a": 1.0}, 0.5, {"a": 1.0}),
    ({"a": 0.6, "b": 0.3, "c": 0.1}, 0.4, {"a": 0.4, "b": 0.4, "c": 0.2}),
])
def test_no_site_buys_more_than_its_capped_share(weights, cap, want):
    got = guard.cap_shares(weights, cap)
    assert got == pytest.approx(want) and sum(got.values()) == pytest.approx(1.0)


def test_a_retried_step_does_not_move_the_discriminators_again(tmp_path):
    from asyndgan.demo_data.toy import write_toy_sites

    (folder,) = write_toy_sites(tmp_path / "data", sites=1, per_site=[6], size=16, seed=1)
    cfg = SiteFacingConfig.model_validate({"model": {"image2d": {"image_size": 16, "ndf": 4, "d_layers": 1}}})
    data = open_dataset(folder, cfg)
    learner = SiteLearner(cfg, data.modalities)
    maps, real = data.label_maps()[:2], data.real(torch.arange(2))
    fake = torch.rand_like(real) * 2 - 1

    def weights():
        return [p.detach().clone() for p in learner.discriminators.parameters()]

    before = weights()
    learner.step(7, maps, real, fake)
    after_first = weights()
    _, losses = learner.step(7, maps, real, fake)  # the server retries step 7 (a missed quorum)
    assert all(torch.equal(a, b) for a, b in zip(after_first, weights())) and "d" not in losses
    learner.step(8, maps, real, fake)
    assert not all(torch.equal(a, b) for a, b in zip(before, after_first))
    assert not all(torch.equal(a, b) for a, b in zip(after_first, weights()))


def test_a_removed_site_cannot_rejoin(tmp_path):
    cfg = load_config(ServerConfig, None, {**TINY_IMAGE2D, "run_dir": str(tmp_path)})
    registry = SiteRegistry(cfg, LabelMapBank(tmp_path / "bank"))
    session, _ = registry.join(serde.Hello("a", "image2d", ["t1"]))
    registry.remove(session, "removed from the run: out of bounds")
    assert [s.site_id for s in registry.departed()] == ["a"] and not registry.sessions()
    with pytest.raises(JoinRefused, match="was removed from the run") as refused:
        registry.join(serde.Hello("a", "image2d", ["t1"]), replace=True)
    assert refused.value.kind == "forbidden"
    assert registry.quorum(3) == 2


@pytest.mark.integration
def test_a_hostile_site_painting_a_square_is_removed_and_the_generator_stays_near_an_honest_run(tmp_path):
    """The poisoning benchmark, short: the loud targeted attack moves the generator without the guard; with it,
    the site is rejected, removed after max_rejections answers, and the run finishes with the two others."""
    from asyndgan.experiments.poisoning import PoisoningConfig, run

    result = run(PoisoningConfig(out=tmp_path, steps=12, image_size=16, samples_per_site=8, attacks=["targeted"],
                                 seed_spread=False))
    on, off = result["rows"]
    assert (on["guard"], off["guard"]) == ("on", "off")
    assert on["removed"] and on["rejected"] == 5 and on["steps"] == 12 and on["finite"]
    assert not off["removed"] and off["rejected"] == 0
    assert on["distance"] < 0.5 * off["distance"], result
    assert "| targeted | on |" in (tmp_path / "report.md").read_text()
    cost = result["honest_cost"]["image_distance_to_on"]  # what the guard costs honest sites, in image terms
    assert cost["on"] == 0.0 and 0.0 <= cost["off"] < 1.0 and result["honest_cost"]["seed_spread_image_distance"] is None
    assert "What each guard costs an honest run" in (tmp_path / "report.md").read_text()


@pytest.mark.integration
def test_the_median_of_parameter_gradients_limits_a_quiet_attacker(tmp_path):
    """A site that pushes within the size bound, always towards the same picture, passes the size guard; the
    coordinate-wise median over three sites' parameter gradients (train.guard.robust) holds most of it back."""
    from asyndgan.experiments.poisoning import PoisoningConfig, run

    result = run(PoisoningConfig(out=tmp_path, steps=20, image_size=16, samples_per_site=8,
                                 attacks=["targeted_quiet"], guards=["on", "median"], seed_spread=False))
    on, median = result["rows"]
    assert (on["guard"], median["guard"]) == ("on", "median") and not on["removed"] and not median["removed"]
    assert median["finite"] and median["distance"] < 0.6 * on["distance"], result
