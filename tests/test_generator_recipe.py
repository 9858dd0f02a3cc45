"""The generator-recipe experiment's plumbing: every lever trains, generates and is scored against the baseline
with an interval, resumes without redoing anything, and a lever name it does not know is one line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from asyndgan.cli.main import main
from asyndgan.experiments.generator_recipe import LEVERS, lever_settings, preset_config


def test_each_lever_changes_one_thing(tmp_path):
    cfg = preset_config("cpu", tmp_path)
    base, base_prep, base_samples = lever_settings(cfg, "baseline", 0, tmp_path / "b")
    changed = {}
    for lever in LEVERS[1:]:
        scfg, prep, samples = lever_settings(cfg, lever, 0, tmp_path / lever)
        diff = {k for k, v in json.loads(scfg.model_dump_json()).items() if v != json.loads(base.model_dump_json())[k]}
        changed[lever] = (diff, prep.healthy_ratio != base_prep.healthy_ratio, samples != base_samples)
    assert changed["ema"] == ({"train", "run_dir"}, False, False)
    assert changed["spade"] == ({"site", "run_dir"}, False, False) and changed["diffaug"][0] == {"site", "run_dir"}
    assert changed["healthy"] == ({"run_dir"}, True, False) and changed["samples3"] == ({"run_dir"}, False, True)
    assert changed["longer"][0] == {"site", "checkpoint_every", "run_dir"}
    assert lever_settings(cfg, "baseline", 1, tmp_path / "b").__getitem__(0).train.seed == 1  # a GAN seed is its own


def test_smoke_runs_the_levers_against_the_baseline_and_resumes(tmp_path):
    out = tmp_path / "gr"
    args = ["experiment", "generator-recipe", "--preset", "smoke", "--out", str(out), "--levers", "spade",
            "--threads", "1", "--log-level", "WARNING"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, (r.output, r.exception)
    results = json.loads((out / "results.json").read_text())
    assert list(results["levers"]) == ["baseline", "spade"]
    for lever in ("spade",):
        row = results["levers"][lever]
        assert len(row["dice_per_gan"]) == 2 and 0 <= row["dice"] <= 1
        gap = row["minus_baseline"]
        assert gap["patients"] == 3 and gap["low"] <= gap["mean"] <= gap["high"]
    assert "| spade |" in (out / "report.md").read_text()
    assert (out / "levers.png").stat().st_size > 5_000 and (out / "samples.png").stat().st_size > 1_000
    timings = json.loads((out / "timings.json").read_text())
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text())["levers"] == results["levers"]
    assert json.loads((out / "timings.json").read_text())["gan_spade_g1"] < timings["gan_spade_g1"] + 1
    bad = CliRunner().invoke(main, [*args[:6], "--levers", "zoom", "--log-level", "WARNING"])
    assert bad.exit_code == 2 and "zoom" in bad.output
