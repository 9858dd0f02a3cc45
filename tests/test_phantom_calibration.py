"""The phantom calibration experiment as a user runs it (smoke preset, through the CLI), its resumption and its
refusals, the `asyndgan data phantom` options, and the pure summaries (paired gaps, targets)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from procs import one_line_error, run_cli

from asyndgan.experiments import phantom_calibration_report as pc_report

ROWS = ["real_all", "real_site1", "real_site2", "real_site3", "real_site4", "public", "small_lesions", "low_grade"]


@pytest.mark.integration
def test_smoke_preset_end_to_end_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "cal"
    args = ["asyndgan.cli.main", "experiment", "phantom-calibration", "--preset", "smoke", "--out", str(out)]
    r = run_cli(args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    after = {row["row"]: row for row in res["rows"] if row["recipe"] == "after"}
    assert list(after) == ROWS
    assert {row["row"] for row in res["rows"] if row["recipe"] == "before"} == set(ROWS)
    assert {row["row"] for row in res["rows"] if row["recipe"] == "loss_only"} == {"real_all", "small_lesions",
                                                                                  "low_grade"}
    test_cases = sorted(p.name for p in (out / "phantom" / "heterogeneous" / "test").iterdir() if p.is_dir())
    assert len(test_cases) == 4 and res["test_patients"] == 4
    with open(out / "phantom" / "heterogeneous" / "partition.csv", newline="") as f:
        lesions = {r["case"]: r["lesion"] for r in csv.DictReader(f)}
    for row in after.values():
        assert row["seeds"] == [0, 1] and sorted(row["patient_dice"]) == test_cases
        assert all(0 <= d <= 1 for d in row["patient_dice"].values())
        # the lesion breakdown is the mean over exactly the test patients of that lesion type
        for lesion, value in row["by_lesion"].items():
            mine = [row["patient_dice"][c] for c in test_cases if lesions[c] == lesion]
            assert value == pytest.approx(sum(mine) / len(mine))
    assert {g["row"] for g in res["gaps_to_real_all"]} == set(ROWS) - {"real_all"}
    assert any(t["name"].startswith("Real-All - real_site") for t in res["targets"])
    report = (out / "report.md").read_text()
    assert "## Calibration (current recipe)" in report and "before and after" in report
    for fig in ("dice.png", "dice_by_lesion.png", "preview_sites.png", "preview_lesions.png"):
        assert (out / "figures" / fig).stat().st_size > 5_000
    # the public cohort and the private sites share no case
    public = {p.name for p in (out / "phantom" / "public" / "public").iterdir()}
    assert public and not public & set(lesions)

    # The same command again keeps every piece; other settings in the same folder are refused.
    before = (out / "segmentation" / "after" / "real_all" / "seed0" / "model" / "model.pt").stat().st_mtime_ns
    r = run_cli(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "segmentation" / "after" / "real_all" / "seed0" / "model" / "model.pt").stat().st_mtime_ns == before
    one_line_error(run_cli(args[:-1] + [str(out), "--seed", "3"]), "other settings")


def test_phantom_command_presets_config_and_errors(tmp_path):
    r = run_cli(["asyndgan.cli.main", "data", "phantom", "--out", str(tmp_path / "p"), "--preset",
                 "heterogeneous", "--shape", "48,48,32", "--cases-per-site", "1,1,1,1", "--test-cases", "4"],
                timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "site4: 1 cases" in r.stdout and "preview_lesions.png" in r.stdout
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["cohort"] == "heterogeneous" and len(cfg["profiles"]) == 4 and cfg["shape"] == [48, 48, 32]
    (tmp_path / "bad.toml").write_text("sites = 2\n[[profiles]]\nlesions = { glioma = -1.0 }\n[[profiles]]\n")
    one_line_error(run_cli(["asyndgan.cli.main", "data", "phantom", "--out", str(tmp_path / "q"),
                            "--config", str(tmp_path / "bad.toml")]), "invalid phantom settings", "lesions")
    one_line_error(run_cli(["asyndgan.cli.main", "data", "phantom", "--out", str(tmp_path / "q"),
                            "--config", str(tmp_path / "nope.toml")]), "nope.toml", "does not exist")
    one_line_error(run_cli(["asyndgan.cli.main", "data", "phantom", "--out", str(tmp_path / "q"),
                            "--shape", "48,48"]), "invalid phantom settings")


def _row(name, patients, seeds=(0.5,)):
    return pc_report.RowResult(row=name, recipe="after", description="", training_cases=1, seeds=list(range(len(seeds))),
                        dice_per_seed=list(seeds), patient_dice=patients, collapsed_seeds=0)


def test_paired_gap_is_the_mean_per_patient_difference_with_a_t_interval():
    ref = _row("real_all", {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6})
    other = _row("real_site1", {"a": 0.7, "b": 0.7, "c": 0.4, "d": 0.5})
    gap = pc_report.paired_gap(ref, other)
    assert gap.mean == pytest.approx(0.175) and gap.patients == 4
    assert gap.low < 0.175 < gap.high and gap.low > 0  # the differences 0.2, 0.1, 0.3, 0.1 are all positive
    same = pc_report.paired_gap(ref, ref)
    assert same.mean == 0 and same.low == 0 == same.high
    assert math.isfinite(gap.high)


@pytest.mark.parametrize("module", ["synthetic_learning", "missing_modality", "bandwidth"])
def test_experiments_run_on_the_heterogeneous_phantom(module):
    import importlib
    import pathlib

    mod = importlib.import_module(f"asyndgan.experiments.{module}")
    for preset in ("smoke", "cpu"):
        default = mod.preset_config(preset, pathlib.Path("x"))
        het = mod.preset_config(preset, pathlib.Path("x"), phantom="heterogeneous")
        assert default.phantom.preset == "default" and default.phantom.layout(0).cohort == ""
        layout = het.phantom.layout(0)
        assert het.phantom.preset == "heterogeneous" and layout.sites == 4 and layout.cohort == "heterogeneous"
        assert len(set(layout.cases_per_site)) == 1 and layout.test_cases % 4 == 0
        assert layout.shape == default.phantom.shape  # only the layout changes, not the experiment's grid
        # everything else about the experiment stays as its preset says
        assert het.model_dump(exclude={"phantom"}) == default.model_dump(exclude={"phantom"})
