"""The paper's 1-D experiment, run as a user would: three site processes over gRPC plus the baselines."""

from __future__ import annotations

import json

import pytest

from procs import run_cli

pytestmark = pytest.mark.integration


def test_asyndgan_recovers_the_mixture_that_subset_gans_miss(tmp_path):
    # 800 steps, not the tuned 1500 (docs/experiments.md has those numbers): the claim already holds there (seed 0:
    # AsynDGAN W1 0.081, Syn-All 0.109, the best subset 1.40) at half the test's time
    r = run_cli(["asyndgan.cli.main", "experiment", "gaussian1d", "--out", str(tmp_path), "--seed", "0",
                 "--steps", "800"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == {"syn_all", "syn_subset_1", "syn_subset_2", "syn_subset_3", "asyndgan"}
    best_subset = min(res[f"syn_subset_{k}"] for k in (1, 2, 3))
    assert res["asyndgan"] <= 0.3
    assert res["asyndgan"] <= 1.5 * res["syn_all"]
    assert res["asyndgan"] < 0.5 * best_subset
    assert (tmp_path / "histograms.png").stat().st_size > 10_000
    assert "asyndgan" in r.stdout
