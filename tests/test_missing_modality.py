"""Heterogeneous modalities: sites that lack a modality return exactly zero gradient on it while the generator still
learns every modality from the sites that hold it; a phantom written without modalities; `asyndgan complete`
(both methods) copies real files byte for byte and writes missing ones in the case's geometry; segmentation
zero-fills on request; the missing-modality smoke preset end to end (real server and site processes)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from procs import TINY_IMAGE2D, run_cli
from test_generate import make_run, write_tree

from asyndgan.central_server import trainer as trainer_module
from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import DataPrepConfig, ServerConfig, load_config
from asyndgan.demo_data.phantom import PhantomConfig, write_phantom
from asyndgan.demo_data.phantom.config import parse_missing
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.cli import main as asyndgan_cli
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession
from asyndgan.segmentation import Preprocessing, SegmentationRecipe, TrainingConfig, load_training_slices
from asyndgan.formats.datasets import open_dataset


# ---- the generator with sites that hold different modalities ------------------------------------------------
def _subset_site(folder, keep: list[int], names: list[str]):
    images = np.load(folder / "images.npy")
    np.save(folder / "images.npy", images[:, keep])
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "modalities": names}))
    return folder


def test_missing_channels_get_exactly_zero_gradient_and_every_modality_is_still_learnt(tmp_path, monkeypatch):
    a, b = write_toy_sites(tmp_path / "toy", sites=2, per_site=[24, 24], size=16, seed=3)
    _subset_site(a, [0, 1], ["t1", "t1ce"])  # site1 holds t1, t1ce
    _subset_site(b, [2, 3], ["t2", "flair"])  # site2 holds t2, flair: no modality is held by both
    cfg = load_config(ServerConfig, None, {**TINY_IMAGE2D, "run_dir": str(tmp_path / "run"),
                                           "site.model.image2d.ngf": 8, "site.schedule.steps": 60,
                                           "train.batch_size": 4, "checkpoint_every": 1000, "sample_every": 1000,
                                           "site.loss.lambda_l1": 100.0, "g_optim.lr": 2e-3,
                                           # every pixel: the L1 below is measured over whole images
                                           "train.wire_region": "full"})
    prep = DataPrepConfig(cache_dir=tmp_path / "cache")
    sessions = [LocalSession(f"site{i + 1}", open_dataset(f, cfg.site, prep), cfg.site) for i, f in enumerate((a, b))]
    assert [s.channels for s in sessions] == [[0, 1], [2, 3]]
    trainer = Trainer(cfg, LocalRegistry(sessions), CountingBank(sessions), tmp_path / "run")

    def per_channel_l1() -> np.ndarray:
        """|G(maps) - real| per channel, each site's channels against its own images (fixed samples)."""
        trainer.generator.eval()
        out = []
        with torch.no_grad():
            for s, chans in zip(sessions, ([0, 1], [2, 3])):
                keys = torch.arange(12)
                x = trainer.family.condition(cfg.site.model, s.worker.label_maps[keys], 12)
                fake = trainer.generator(x)[:, chans]
                out += (fake - s.worker.dataset.real(keys)).abs().mean(dim=(0, 2, 3)).tolist()
        return np.array(out)

    before = per_channel_l1()
    combined = []
    real_combine = trainer_module.combine

    def recording(results, weights, like):
        g = real_combine(results, weights, like)
        combined.append((g.clone(), {k: (r.rows, r.channels) for k, r in results.items()}))
        return g

    monkeypatch.setattr(trainer_module, "combine", recording)
    trainer.run(__import__("threading").Event())
    after = per_channel_l1()

    assert len(combined) == 60
    for g, placed in combined:
        rows1, ch1 = placed["site1"]
        rows2, ch2 = placed["site2"]
        assert ch1 == [0, 1] and ch2 == [2, 3]
        # exactly zero where a site holds nothing, non-zero where it does
        assert torch.count_nonzero(g[rows1][:, [2, 3]]) == 0 and torch.count_nonzero(g[rows2][:, [0, 1]]) == 0
        assert torch.count_nonzero(g[rows1][:, [0, 1]]) > 0 and torch.count_nonzero(g[rows2][:, [2, 3]]) > 0
    # every modality, each learnt only from the one site holding it, comes much closer to that site's images
    print("per-channel L1 before", before, "after", after)
    assert np.all(after < 0.6 * before), (before, after)


# ---- phantom without modalities ------------------------------------------------------------------------------
def test_phantom_sites_can_lack_modalities_and_the_test_cases_keep_all(tmp_path):
    cfg = PhantomConfig(sites=2, cases_per_site=[1, 1], test_cases=1, shape=(32, 32, 24),
                        missing=parse_missing("site1=t2,site2=flair+t1"))
    write_phantom(tmp_path, cfg, progress=False)
    names = lambda folder: sorted(p.name.split("_")[-1].split(".")[0] for p in folder.glob("*/*.nii.gz"))  # noqa: E731
    assert names(tmp_path / "site1") == ["flair", "seg", "t1", "t1ce"]
    assert names(tmp_path / "site2") == ["seg", "t1ce", "t2"]
    assert names(tmp_path / "test") == ["flair", "seg", "t1", "t1ce", "t2"]
    assert json.loads((tmp_path / "config.json").read_text())["missing"] == {"site1": ["t2"], "site2": ["flair", "t1"]}
    # the site agent sees what is there
    from asyndgan.formats.datasets import describe_dataset

    assert describe_dataset(tmp_path / "site2").modalities == ["t1ce", "t2"]


@pytest.mark.parametrize("spec, words", [("site9=t2", "no site 'site9'"), ("site1=t3", "unknown modalities"),
                                         ("site1", "must look like"),
                                         ("site1=t1+t1ce+t2+flair", "would keep no image")])
def test_bad_missing_specs_are_one_line(tmp_path, spec, words):
    r = CliRunner().invoke(asyndgan_cli.main, ["data", "phantom", "--out", str(tmp_path / "p"), "--sites", "3",
                                               "--missing", spec])
    assert r.exit_code == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


# ---- asyndgan complete ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 3-case BraTS tree: case 0 lacks t2, case 1 lacks flair and t1, case 2 has everything; and a run whose
    generator emits all four."""
    root = tmp_path_factory.mktemp("complete")
    tree = write_tree(root / "site", 3)
    (tree / "CASE_000" / "CASE_000_t2.nii.gz").unlink()
    (tree / "CASE_001" / "CASE_001_flair.nii.gz").unlink()
    (tree / "CASE_001" / "CASE_001_t1.nii.gz").unlink()
    full = write_tree(root / "full", 1)
    cfg = load_config(ServerConfig, None, TINY_IMAGE2D)
    ds = open_dataset(full, cfg.site, DataPrepConfig(cache_dir=root / "cache", min_tumour_pixels=1))
    return {"tree": tree, "checkpoint": make_run(root / "run", TINY_IMAGE2D, ds.label_maps().clone())}


def _complete(args):
    return CliRunner().invoke(asyndgan_cli.main, ["complete", "--device", "cpu", "--log-level", "WARNING", *args])


@pytest.mark.parametrize("method", ["labels", "translate"])
def test_complete_copies_real_files_byte_for_byte_and_fills_the_rest_in_the_cases_geometry(site, tmp_path, method):
    out = tmp_path / method
    r = _complete(["--checkpoint", str(site["checkpoint"]), "--data", str(site["tree"]), "--out", str(out),
                   "--method", method, "--steps", "3"])
    assert r.exit_code == 0, (r.output, r.stderr)
    assert "3 synthetic volumes" in r.stdout
    expected_synthetic = {"CASE_000": ["t2"], "CASE_001": ["flair", "t1"], "CASE_002": []}
    for case, filled in expected_synthetic.items():
        src, dst = site["tree"] / case, out / case
        sidecar = json.loads((dst / "completion.json").read_text())
        assert sidecar["synthetic_modalities"] == sorted(filled) and sidecar["method"] == method
        assert sidecar["synthetic"] == sorted(f"{case}_{m}.nii.gz" for m in filled)
        for f in src.iterdir():  # the site's own files, byte for byte
            assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
            assert f.name in sidecar["real"]
        seg = nib.load(str(src / f"{case}_seg.nii.gz"))
        for m in filled:
            img = nib.load(str(dst / f"{case}_{m}.nii.gz"))
            assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)
            data = np.asarray(img.dataobj)
            assert np.isfinite(data).all() and data.max() > 0 and data.min() == 0  # a brain, background 0
        assert sorted(p.name for p in dst.iterdir()) == sorted(
            [*(f.name for f in src.iterdir()), *(f"{case}_{m}.nii.gz" for m in filled), "completion.json"])
    # the completed tree is a full BraTS tree for every reader
    prep = DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1)
    ds = open_dataset(out, load_config(ServerConfig, None, TINY_IMAGE2D).site, prep)
    assert ds.modalities == ["t1", "t1ce", "t2", "flair"] and len(ds) > 0
    # the same command again keeps everything; other settings in the same folder are refused
    again = _complete(["--checkpoint", str(site["checkpoint"]), "--data", str(site["tree"]), "--out", str(out),
                       "--method", method, "--steps", "3"])
    assert again.exit_code == 0 and "3 already there" in again.stdout, again.stdout
    other = "labels" if method == "translate" else "translate"
    refused = _complete(["--checkpoint", str(site["checkpoint"]), "--data", str(site["tree"]), "--out", str(out),
                         "--method", other])
    assert refused.exit_code == 2 and "another generator, data or settings" in refused.stderr


def test_complete_bad_input_is_one_line(site, tmp_path):
    r = _complete(["--checkpoint", str(site["checkpoint"]), "--data", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    r = _complete(["--data", str(site["tree"]), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "exactly one of --checkpoint and --generator" in r.stderr


# ---- segmentation with zero-filled modalities ----------------------------------------------------------------
def test_zero_fill_reads_cases_without_a_modality_that_skip_leaves_out(site):
    recipe = SegmentationRecipe(preprocessing=Preprocessing(image_size=16),
                                training=TrainingConfig(steps=1, batch_size=2))
    skipped = load_training_slices([site["tree"]], recipe, progress=False)
    assert [c.split("/")[1] for c in skipped.cases] == ["CASE_002"]
    zero = recipe.model_copy(update={"preprocessing": recipe.preprocessing.model_copy(update={"missing": "zero"})})
    filled = load_training_slices([site["tree"]], zero, progress=False)
    assert [c.split("/")[1] for c in filled.cases] == ["CASE_000", "CASE_001", "CASE_002"]
    n0 = len(filled) - len(skipped)
    first = filled.images[:n0 // 2].float()  # CASE_000's slices come first: its t2 (channel 2) is blank
    assert torch.all(first[:, 2] == -1) and not torch.all(first[:, 0] == -1)


# ---- the experiment ------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "mm"
    r = run_cli(["asyndgan.cli.main", "experiment", "missing-modality", "--preset", "smoke", "--out",
                 str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rows = ["real_all", "hetero_real", "hetero_asyndgan", "completed_labels", "completed_translate", "homo_asyndgan"]
    assert list(res["rows"]) == rows
    for row in rows:
        with open(out / "per_patient" / f"{row}.csv", newline="") as f:
            patients = list(csv.DictReader(f))
        assert len(patients) == 2 and all(0 <= float(p["dice"]) <= 1 for p in patients)
    # the heterogeneous GAN ran as real processes, each site declaring only what it holds
    server_log = (out / "gan" / "hetero" / "server.out").read_text()
    for site, mods in (("site1", "t1, t1ce, flair"), ("site2", "t1, t1ce, t2"), ("site3", "t1, t2, flair")):
        assert f"site {site} connected (modalities {mods})" in server_log
    # fidelity per method and dropped modality, finite
    for method in ("labels", "translate"):
        for m in ("t2", "flair", "t1ce"):
            f = res["fidelity"][method][m]
            assert math.isfinite(f["psnr"]["mean"]) and -1 <= f["ssim"]["mean"] <= 1 and f["mae"]["mean"] > 0
    # completed sites: real files are the hetero sites' bytes; the dropped modality is synthetic
    for method in ("labels", "translate"):
        case = sorted(p for p in (out / "completed" / method / "site1").iterdir()
                      if p.is_dir() and not p.name.startswith("."))[0]
        src = out / "hetero" / "site1" / case.name
        assert json.loads((case / "completion.json").read_text())["synthetic_modalities"] == ["t2"]
        for f in src.iterdir():
            assert (case / f.name).read_bytes() == f.read_bytes()
    assert len(res["targets"]) == 7
    for fig in ("dice.png", "completion_t2.png", "completion_flair.png", "completion_t1ce.png"):
        assert (out / "figures" / fig).stat().st_size > 5_000
    assert "Hetero-AsynDGAN" in (out / "report.md").read_text()
    # a second run keeps every piece
    again = run_cli(["asyndgan.cli.main", "experiment", "missing-modality", "--preset", "smoke", "--out",
                     str(out)], timeout=300)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    shutil.rmtree(out / "cache", ignore_errors=True)


def test_a_site_told_to_ignore_modalities_it_has_is_sent_only_the_others(site, tmp_path):
    cfg = load_config(ServerConfig, None, TINY_IMAGE2D)
    full = site["tree"].parent / "full"
    prep = DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1, modalities=["flair", "t1"])
    session = LocalSession("s", open_dataset(full, cfg.site, prep), cfg.site)
    assert session.worker.modalities == ["t1", "flair"] and session.channels == [0, 3]
    assert session.worker.expected_shape(2) == (2, 2, 16, 16)
    assert list(session.worker.learner.discriminators.keys()) == ["t1", "flair"]
