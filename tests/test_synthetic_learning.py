"""The synthetic-learning experiment: the smoke preset end to end as a user runs it (real server and site
processes over mutual TLS), and the pure pieces it is built from (slice choice, FID/KID, SSIM/PSNR, targets)."""

from __future__ import annotations

import csv
import json
import math
import time

import numpy as np
import pytest
import torch

from procs import run_cli

from asyndgan.common.errors import ConfigError
from asyndgan.experiments import image_quality as iq
from asyndgan.experiments import synthetic_learning as sl
from asyndgan.experiments.synthetic_learning_report import check_targets, mean_sd, pick_slices

ROWS = {"real_all", "real_site1", "real_site2", "real_site3", "syn_all", "asyndgan", "asyndgan+site3",
        "public_start", "asyndgan_private"}


@pytest.mark.integration
def test_smoke_preset_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "sl"
    args = ["asyndgan.cli.main", "experiment", "synthetic-learning", "--preset", "smoke", "--out", str(out)]
    t0 = time.monotonic()
    r = run_cli(args, timeout=300)
    first = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == ROWS
    test_cases = sorted(p.name for p in (out / "phantom" / "test").iterdir() if p.is_dir())
    assert len(test_cases) == 3
    seeds = res["segmentation_seeds"]
    assert seeds == [0, 1]
    for row in ROWS:
        with open(out / "per_patient" / f"{row}.csv", newline="") as f:
            patients = list(csv.DictReader(f))
        # every test patient under every seed, each with a finite Dice in [0, 1]
        assert sorted((p["seed"], p["case"]) for p in patients) == sorted((str(s), c) for s in seeds
                                                                          for c in test_cases)
        assert all(0 <= float(p["dice"]) <= 1 and math.isfinite(float(p["hd95_mm"])) for p in patients)
        assert math.isfinite(res["rows"][row]["dice"]["mean"]) and res["rows"][row]["patients"] == 3
    for gan in ("syn_all", "asyndgan", "public_start", "asyndgan_private"):
        q = res["image_quality"][gan]
        assert all(math.isfinite(q[k]) for k in ("fid", "kid_mean")) and q["fid"] > 0
        assert -1 <= q["ssim"]["mean"] <= 1 and math.isfinite(q["psnr_db"]["mean"])
        assert len(list((out / "synthetic" / gan / "train").glob("*/provenance.json"))) == 6
    # the AsynDGAN row came from the distributed system over mutual TLS: a CA, a kit per site, a log per site
    assert (out / "gan" / "asyndgan" / "certs" / "ca.crt").is_file()
    assert all((out / "gan" / "asyndgan" / f"site{i}.out").is_file() for i in (1, 2, 3))
    # the private row: site processes at their privacy defaults from the public start, each with its own ledger
    spent = res["private"]["sites"]
    assert sorted(spent) == ["site1", "site2", "site3"] and all(0 < v["epsilon"] <= 10 for v in spent.values())
    assert all((out / "gan" / "asyndgan_private" / "site_state" / f"site{i}.privacy-ledger.json").is_file()
               for i in (1, 2, 3))
    assert "anchored to the public start" in (out / "gan" / "asyndgan_private" / "server.out").read_text()
    assert (out / "phantom_public" / "public").is_dir() and (out / "gan" / "public_start" / "public_start.json").is_file()
    assert len(res["targets"]) == 6
    pairs = {(c["a"], c["b"]): c for c in res["paired"]}
    assert {("asyndgan", "real_all"), ("asyndgan", "syn_all"), ("asyndgan_private", "public_start")} <= set(pairs)
    assert all(c["low"] <= c["mean"] <= c["high"] and c["patients"] == 3 for c in pairs.values())
    report = (out / "report.md").read_text()
    assert "| asyndgan+site3 |" in report and "## Protocol" in report
    for fig in ("dice.png", "real_vs_synthetic.png"):
        assert (out / "figures" / fig).stat().st_size > 5_000
    assert "real_all" in r.stdout

    # A re-run keeps every piece: nothing is retrained, and the numbers are the same.
    models = sorted(out.glob("segmentation/*/seed*/model/model.pt"))
    stamps = [p.stat().st_mtime_ns for p in models]
    t0 = time.monotonic()
    r = run_cli(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - t0 < first / 2
    assert [p.stat().st_mtime_ns for p in models] == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == res["rows"]

    # Other settings in the same folder are refused in one line.
    r = run_cli([*args, "--seed", "1"], timeout=120)
    assert r.returncode == 2 and "other settings" in r.stderr and "Traceback" not in r.stderr

    # The privacy trade-off on the same run: the AsynDGAN row again with the sites' DP-SGD (one setting: each is
    # a distributed run of its own).
    r = run_cli(["asyndgan.cli.main", "experiment", "privacy-tradeoff", "--run", str(out),
                 "--settings", "dp-1.0"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    trade = json.loads((out / "privacy" / "results.json").read_text())
    assert trade["rows"]["asyndgan"] == res["rows"]["asyndgan"]  # the reference row is the run's own
    assert "privacy_dp-1.0" in trade["rows"] and "privacy_l1-off" not in trade["rows"]
    eps = [v["epsilon"] for v in trade["gans"]["dp-1.0"]["sites"].values()]
    assert len(eps) == 3 and all(0 < e < 100 for e in eps)
    assert max(eps) == eps[2]  # the smallest site samples at the highest rate: it spends the most
    assert "| dp-1.0 | 0 | 1.0 | 8 |" in (out / "privacy" / "report.md").read_text()


def test_presets_validate_and_differ_in_scale(tmp_path):
    smoke, cpu, gpu = (sl.preset_config(p, tmp_path) for p in ("smoke", "cpu", "gpu"))
    assert smoke.gan.steps < cpu.gan.steps < gpu.gan.steps
    assert gpu.gan.image_size == 256 and gpu.gan.n_blocks == 9
    assert cpu.phantom.test_cases >= 30 and cpu.segmentation_seeds == 3


def test_resuming_with_other_settings_is_refused(tmp_path):
    sl.check_settings(sl.preset_config("smoke", tmp_path / "a", seed=0))
    sl.check_settings(sl.preset_config("smoke", tmp_path / "a", seed=0))  # the same: resumes
    with pytest.raises(ConfigError, match="other settings"):
        sl.check_settings(sl.preset_config("smoke", tmp_path / "a", seed=3))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        sl.check_settings(sl.preset_config("smoke", tmp_path / "b"))


def test_rows_augment_the_smallest_site(tmp_path):
    sites = [tmp_path / f"site{i}" for i in (1, 2, 3)]
    table = sl.rows(sites, {"syn_all": tmp_path / "s", "asyndgan": tmp_path / "a"}, [5, 2, 9])
    assert table["asyndgan+site2"] == [tmp_path / "a", sites[1]]
    assert table["real_all"] == sites and table["real_site3"] == [sites[2]]
    assert set(sl.rows(sites, None, [5, 2, 9])) == {"real_all", "real_site1", "real_site2", "real_site3"}


def test_the_pooled_tree_links_every_case_once_whoever_made_it_first(tmp_path):
    from asyndgan.experiments.synthetic_learning import pooled_tree

    sites = [tmp_path / "site1", tmp_path / "site2"]
    for k, site in enumerate(sites):
        (site / f"CASE_{k}").mkdir(parents=True)
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    (pooled / "CASE_0").symlink_to(sites[0] / "CASE_0")  # a second process of the command linked it already
    (pooled / "CASE_1").symlink_to(tmp_path / "gone")  # left by a run whose data was elsewhere: made right
    assert pooled_tree(sites, pooled) == pooled and pooled_tree(sites, pooled) == pooled
    assert {p.name: p.resolve() for p in pooled.iterdir()} == {"CASE_0": (sites[0] / "CASE_0").resolve(),
                                                               "CASE_1": (sites[1] / "CASE_1").resolve()}


def test_pick_slices_spreads_through_the_tumour_only():
    seg = np.zeros((4, 4, 20), np.uint8)
    seg[..., 5:15] = 1  # brain only: not picked
    seg[1, 1, 8:13] = 3
    assert pick_slices(seg, 3) == [8, 10, 12]
    assert pick_slices(seg, 50) == [8, 9, 10, 11, 12]
    assert pick_slices(np.ones((4, 4, 5), np.uint8), 3) == []


def test_mean_sd_ignores_non_finite():
    assert mean_sd([1.0, 3.0, float("nan")]) == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_sd([0.5]) == {"mean": 0.5, "sd": 0.0, "n": 1}


def test_targets_report_the_margins():
    d = {"real_all": 0.80, "real_site1": 0.70, "real_site2": 0.76, "real_site3": 0.60, "syn_all": 0.77,
         "asyndgan": 0.78, "asyndgan+site3": 0.65}
    targets = check_targets({k: {"dice": {"mean": v}} for k, v in d.items()})
    # above the best site; 0.97 x 0.80 = 0.776; within 0.02 of syn_all; 0.65 < 0.80 - 0.01; above its site
    assert [t["met"] for t in targets] == [True, True, True, False, True]
    assert targets[0]["margin"] == pytest.approx(0.02) and "real_site2" in targets[0]["target"]
    assert targets[1]["margin"] == pytest.approx(0.004) and targets[3]["margin"] == pytest.approx(-0.14)
    d.update({"syn_all": 0.70, "asyndgan+site3": 0.795, "asyndgan": 0.77, "public_start": 0.6, "asyndgan_private": 0.58})
    targets = check_targets({k: {"dice": {"mean": v}} for k, v in d.items()})
    assert [t["met"] for t in targets] == [True, False, False, True, True, False]
    assert targets[2]["margin"] == pytest.approx(0.07) and targets[5]["margin"] == pytest.approx(-0.02)


def test_paired_ssim_psnr_counts_the_brain_only():
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, (2, 32, 32)).astype(np.float32)
    brain = np.zeros((32, 32), bool)
    brain[8:24, 8:24] = True
    fake = real.copy()
    fake[:, ~brain] = 0.7  # outside the brain: must not count
    ssim, psnr = iq.paired_ssim_psnr(real, fake, brain)
    assert ssim == pytest.approx(1.0, abs=1e-5) and psnr > 60
    fake[:, brain] += 0.1  # a constant error of 0.1 on a range of 2 inside the brain: PSNR 20 log10(2 / 0.1)
    _, psnr = iq.paired_ssim_psnr(real, fake, brain)
    assert psnr == pytest.approx(20 * math.log10(2 / 0.1), abs=0.05)
    with pytest.raises(ValueError, match="no brain"):
        iq.paired_ssim_psnr(real, fake, np.zeros((32, 32), bool))


@pytest.fixture(scope="module")
def inception():
    return iq.InceptionFeatures()


def test_inception_ships_in_the_wheel_and_gives_2048_features(inception):
    assert iq.inception_path().name == "default_1.pt"
    assert inception(torch.zeros(2, 3, 40, 40)).shape == (2, 2048)  # small images are resized to 299


def test_fid_kid_near_zero_for_the_same_images_and_larger_for_noise(inception):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 3, 48, 48, generator=g) * 2 - 1
    noisy = (real + 0.8 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    scores = iq.fid_kid(real, {"same": real.clone(), "noisy": noisy}, features=inception, kid_subset=4)
    assert abs(scores["same"]["fid"]) < 1e-2
    # KID's unbiased estimator is not 0 for identical sets of 4 (it leaves out k(x, x)), only small against noise
    assert scores["noisy"]["fid"] > 10 and scores["noisy"]["kid_mean"] > scores["same"]["kid_mean"] + 0.02


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without a GPU")
def test_gpu_preset_without_a_gpu_is_one_line_before_any_work(tmp_path):
    r = run_cli(["asyndgan.cli.main", "experiment", "synthetic-learning", "--preset", "gpu", "--out",
                 str(tmp_path / "g")], timeout=120)
    assert r.returncode == 2 and "--preset gpu" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "g" / "settings.json").exists() and not (tmp_path / "g" / "phantom").exists()
