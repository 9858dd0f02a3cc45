"""The privacy-utility experiment's plumbing (smoke preset: every row, audit and figure, resumed without
redoing anything) and the membership test's statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asyndgan.experiments.memorization import auc_and_tpr
from asyndgan.experiments.privacy_utility import gan_settings, preset_config, run
from asyndgan.experiments.statistics import paired


def test_auc_and_tpr_at_fpr():
    members, held = np.array([5.0, 4.0, 3.0, 0.5]), np.array([2.0, 1.0, 0.0, -1.0])
    auc, tpr = auc_and_tpr(members, held)
    assert auc == pytest.approx(14 / 16) and tpr == pytest.approx(0.75)
    assert auc_and_tpr(held, held)[0] == pytest.approx(0.5)  # ties count half


def test_paired_difference_has_an_interval_around_its_mean():
    a = {f"c{i}": 0.8 + 0.01 * (i % 3) for i in range(10)}
    b = {f"c{i}": 0.7 for i in range(10)}
    d = paired(a, b)
    assert d["low"] < d["mean"] < d["high"] and d["mean"] == pytest.approx(0.109, abs=1e-3) and d["patients"] == 10


@pytest.mark.integration
def test_smoke_preset_runs_every_row_and_resumes(tmp_path):
    cfg = preset_config("smoke", tmp_path / "pu")
    results = run(cfg)
    expected = {"real_all", "real_public", "public_only", *gan_settings(cfg)}
    assert set(results["rows"]) == expected
    for row in expected - {"real_all", "real_public"}:
        assert row in results["membership"] and 0 <= results["membership"][row]["auc"] <= 1
    for row, settings in gan_settings(cfg).items():
        sites, privacy = results["gans"][row]["sites"], settings.privacy
        assert results["gans"][row]["lambda_l1"] == (100.0 if row == "nonprivate" else 0.0)
        assert results["gans"][row]["anchor_weight"] == (
            cfg.anchor_weight if "anchored" in row else cfg.steer_anchor_weight if "steered" in row else 0.0)
        assert results["gans"][row]["adversarial_weight"] == (0.0 if "steered" in row else 1.0)
        if privacy is None:
            assert all(s["epsilon"] is None for s in sites.values())
            continue
        if row in ("public_frozen", "public_anchored"):  # nothing private is used: nothing is spent
            assert all(s["epsilon"] == 0 for s in sites.values()) and row not in results["canaries"]
            continue
        assert all(0 < s["epsilon"] <= privacy.epsilon for s in sites.values())
        if privacy.trainable == "none":  # the release alone: no DP-SGD to audit
            assert row not in results["canaries"] and all(s["released_statistics"] for s in sites.values())
            continue
        audit = results["canaries"][row]
        assert audit["epsilon_lower_bound"] <= audit["epsilon_ledger"]
    assert (cfg.out / "dice_vs_epsilon.png").stat().st_size > 10_000
    assert "| dp_eps1 |" in (cfg.out / "report.md").read_text()
    timings = json.loads((cfg.out / "timings.json").read_text())
    again = run(cfg)  # resumed: every piece kept
    assert again["rows"] == results["rows"]
    from asyndgan.experiments.privacy_utility import report_so_far

    assert report_so_far(cfg)["rows"] == results["rows"]  # --report-only: the same report, nothing trained
    assert json.loads((cfg.out / "timings.json").read_text())["pretrain"] < timings["pretrain"] + 2

    # the anchor weight is chosen on a stand-in cohort from the same public pretraining
    from asyndgan.experiments.anchor_tuning import run as tune, tuning_config

    tuned = tune(tuning_config("smoke", tmp_path / "tune", cfg.out / "gan" / "public_pretrain"))
    assert set(tuned["rows"]) == {"public_only", "anchor0", "anchor10", "steer10"} and tuned["chosen"] in (0.0, 10.0)
    assert tuned["chosen_steer"] == 10.0 and tuned["rows"]["steer10"]["adversarial_weight"] == 0.0
    assert all(0 <= r["dice"] <= 1 for r in tuned["rows"].values())
    assert "Chosen: anchor weight" in (tmp_path / "tune" / "report.md").read_text()


def test_the_cpu_preset_runs_the_measurement_and_the_diagnostics_only_when_asked(tmp_path):
    from asyndgan.experiments.pieces import check_settings
    from asyndgan.experiments.privacy_utility import row_order

    cfg = preset_config("cpu", tmp_path / "pu")
    assert not cfg.diagnostics and preset_config("smoke", tmp_path / "s").diagnostics
    assert row_order(cfg) == ["public_only", "nonprivate", "dp_anchored_eps10", "dp_anchored_eps3",
                              "dp_anchored_eps1", "slice_default", "dp_scratch_eps10"]
    everything = row_order(cfg.model_copy(update={"diagnostics": True}))
    assert everything[:7] == row_order(cfg) and len(everything) == len(set(everything))
    assert set(everything) == {"public_only", *gan_settings(cfg)}
    # which rows run is not a setting of the measurement: the same OUT resumes with the diagnostics added
    check_settings(cfg, exclude=("diagnostics",))
    check_settings(cfg.model_copy(update={"diagnostics": True}), exclude=("diagnostics",))
    with pytest.raises(Exception, match="other settings"):
        check_settings(cfg.model_copy(update={"seeds": 5}), exclude=("diagnostics",))


def test_a_run_resumes_after_a_field_was_added_deep_inside_its_settings(tmp_path):
    """settings.json written before a nested field existed (e.g. a new segmentation training option at its
    default) is the same run; a changed value anywhere is another run, refused."""
    from asyndgan.common.errors import ConfigError
    from asyndgan.experiments.pieces import check_settings

    cfg = preset_config("cpu", tmp_path / "pu")
    check_settings(cfg)
    path = cfg.out / "settings.json"
    stored = json.loads(path.read_text())
    del stored["segmentation"]["training"]["flip"], stored["dp"]["update_every"]
    path.write_text(json.dumps(stored))
    check_settings(cfg)  # resumes
    stored["segmentation"]["training"]["steps"] = 5
    path.write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="other settings"):
        check_settings(cfg)
