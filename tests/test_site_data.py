"""Site data sources: BraTS trees in both naming schemes, bad cases, the cache, and 2-D image folders."""

from __future__ import annotations

import logging
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from asyndgan.common.config import DataPrepConfig, SiteFacingConfig
from asyndgan.common.errors import DataError
from asyndgan.formats import brats
from asyndgan.formats.datasets import describe_dataset, open_dataset
from volumes import brain_with_tumour

SHAPE = (40, 40, 12)
NAMES_2018 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
NAMES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


def write_tree(root: pathlib.Path, cases: int, names: dict, sep: str, enhancing: int, ext=".nii.gz"):
    rng = np.random.default_rng(0)
    for c in range(cases):
        name = f"CASE_{c:03d}"
        (root / name).mkdir(parents=True)
        images, seg = brain_with_tumour(SHAPE, rng, enhancing)
        for key, arr in [*images.items(), ("seg", seg)]:
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / name / f"{name}{sep}{names[key]}{ext}"))
    return root


def _cfg(size=32):
    return SiteFacingConfig.model_validate({"model": {"image2d": {"image_size": size}}})


@pytest.mark.parametrize("names, sep, enhancing, ext", [
    (NAMES_2018, "_", 4, ".nii.gz"), (NAMES_2023, "-", 3, ".nii"),
])
def test_both_brats_naming_schemes_give_the_same_normalised_slices(tmp_path, names, sep, enhancing, ext):
    root = write_tree(tmp_path / "site", 2, names, sep, enhancing, ext)
    prep = DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1)
    summary = describe_dataset(root, prep)
    assert (summary.layout, summary.modalities) == ("brats", ["t1", "t1ce", "t2", "flair"])
    ds = open_dataset(root, _cfg(), prep)
    maps = ds.label_maps()
    assert len(ds) == 2 * int(((brain_with_tumour(SHAPE, np.random.default_rng(0), 4)[1] > 0).sum((0, 1)) > 0).sum())
    assert maps.shape == (len(ds), 32, 32) and maps.dtype == torch.uint8
    assert set(torch.unique(maps).tolist()) == {0, 1, 2, 3, 4}  # outline, necrotic, edema, enhancing
    real = ds.real(torch.arange(len(ds)))
    assert real.shape == (len(ds), 4, 32, 32) and real.dtype == torch.float32
    assert float(real.min()) == -1.0 and float(real.max()) <= 1.0 and float(real.max()) > 0.9
    # Tumour is brighter than the rest of the brain in these volumes: the normalisation must keep that.
    tumour = maps >= 2
    assert float(real[:, 0][tumour].mean()) > float(real[:, 0][(maps == 0) & (real[:, 0] > -1)].mean())


def test_second_start_uses_the_cache_and_a_changed_file_or_setting_rebuilds(tmp_path, caplog):
    root = write_tree(tmp_path / "site", 2, NAMES_2018, "_", 4)
    prep = DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1)
    first = open_dataset(root, _cfg(), prep)
    with caplog.at_level(logging.INFO):
        second = open_dataset(root, _cfg(), prep)
    assert "using prepared slices" in caplog.text
    assert torch.equal(first.real(torch.tensor([0, 3])), second.real(torch.tensor([0, 3])))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    open_dataset(root, _cfg(), prep.model_copy(update={"min_tumour_pixels": 30}))
    seg = root / "CASE_001" / "CASE_001_seg.nii.gz"
    os.utime(seg, ns=(seg.stat().st_atime_ns, seg.stat().st_mtime_ns + 10**9))
    open_dataset(root, _cfg(), prep)
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 3


@pytest.mark.parametrize("breakage, needle", [
    ("missing", "missing file"),
    ("corrupt", "cannot read"),
    ("shape", "has shape"),
    ("labels", "unexpected labels [7.0]"),
])
def test_a_bad_case_is_skipped_with_a_warning_naming_it_or_stops_when_asked(tmp_path, caplog, breakage, needle):
    root = write_tree(tmp_path / "site", 3, NAMES_2018, "_", 4)
    bad = root / "CASE_001"
    if breakage == "missing":
        (bad / "CASE_001_t2.nii.gz").unlink()
    elif breakage == "corrupt":
        (bad / "CASE_001_flair.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    elif breakage == "shape":
        nib.save(nib.Nifti1Image(np.ones((40, 40, 11), np.float32), np.eye(4)), str(bad / "CASE_001_t1.nii.gz"))
    else:
        seg = np.asarray(nib.load(str(bad / "CASE_001_seg.nii.gz")).dataobj)
        seg[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(bad / "CASE_001_seg.nii.gz"))
    prep = DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1)
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(root, _cfg(), prep)
    good = open_dataset(write_tree(tmp_path / "ok", 2, NAMES_2018, "_", 4), _cfg(), prep)
    assert len(ds) == len(good)  # the two good cases, nothing of the bad one
    assert needle in caplog.text and "CASE_001" in caplog.text
    with pytest.raises(DataError, match="CASE_001"):
        open_dataset(root, _cfg(), prep.model_copy(update={"on_bad_case": "error",
                                                           "cache_dir": tmp_path / "cache2"}))


def test_only_the_configured_modalities_are_used(tmp_path):
    root = write_tree(tmp_path / "site", 1, NAMES_2018, "_", 4)
    for m in ("t1", "flair"):
        (root / "CASE_000" / f"CASE_000_{m}.nii.gz").unlink()
    prep = DataPrepConfig(cache_dir=tmp_path / "cache", min_tumour_pixels=1, modalities=["t2", "t1ce"])
    assert describe_dataset(root, prep).modalities == ["t2", "t1ce"]
    ds = open_dataset(root, _cfg(), prep)
    assert ds.modalities == ["t1ce", "t2"]  # the server's order
    assert ds.real(torch.tensor([0])).shape[1] == 2


def test_percentile_normalisation():
    v = np.zeros((4, 4, 4), np.float32)
    v[1:3, 1:3, 1:3] = np.arange(8).reshape(2, 2, 2) * 100 + 1
    out = brats.normalise(v, 0, 100)
    assert out[0, 0, 0] == -1 and out.max() == 1.0 and np.isclose(out[v > 0].min(), -1.0)


def _write_png_folder(root: pathlib.Path, n: int, layout: str):
    rng = np.random.default_rng(1)
    for i in range(n):
        img = (rng.random((24, 30, 3)) * 255).astype(np.uint8)
        mask = np.zeros((24, 30), np.uint8)
        mask[5:15, 8:20] = 255
        if layout == "split":
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / f"tile{i}.png")
            Image.fromarray(mask).save(root / "masks" / f"tile{i}.png")
        else:
            root.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / f"tile{i}.tif")
            Image.fromarray(mask).save(root / f"tile{i}_mask.tif")


@pytest.mark.parametrize("layout", ["split", "suffix"])
def test_image_folders(tmp_path, layout):
    root = tmp_path / "tiles"
    _write_png_folder(root, 3, layout)
    summary = describe_dataset(root)
    assert (summary.layout, summary.family, summary.modalities) == ("images", "image2d", ["r", "g", "b"])
    cfg = SiteFacingConfig.model_validate({"model": {"image2d": {"image_size": 16, "d_layers": 2, "modalities": ["r", "g", "b"],
                                                                 "num_classes": 2}}})
    ds = open_dataset(root, cfg, DataPrepConfig(cache_dir=tmp_path / "cache"))
    assert len(ds) == 3
    maps = ds.label_maps()
    assert maps.shape == (3, 16, 16) and set(torch.unique(maps).tolist()) == {0, 1}
    real = ds.real(torch.tensor([2]))
    assert real.shape == (1, 3, 16, 16) and -1 <= float(real.min()) < float(real.max()) <= 1


def test_unrecognised_folder_says_what_it_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="BraTS case folders"):
        describe_dataset(tmp_path)


def test_parallel_preparation_gives_the_same_slices(tmp_path):
    root = write_tree(tmp_path / "site", 3, NAMES_2018, "_", 4)
    one = open_dataset(root, _cfg(), DataPrepConfig(cache_dir=tmp_path / "c1", min_tumour_pixels=1))
    two = open_dataset(root, _cfg(), DataPrepConfig(cache_dir=tmp_path / "c2", min_tumour_pixels=1, workers=2))
    keys = torch.arange(len(one))
    assert len(one) == len(two) and torch.equal(one.real(keys), two.real(keys))
    assert torch.equal(one.label_maps(), two.label_maps())


def _tree_with_healthy_slices(root: pathlib.Path, cases: int) -> pathlib.Path:
    """Cases whose tumour keeps to the middle slices, so that brain slices without tumour exist."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 24)
    for c in range(cases):
        name = f"CASE_{c:03d}"
        (root / name).mkdir(parents=True)
        images, seg = brain_with_tumour(shape, rng, 4, tumour_z_scale=3.0)
        for key, arr in [*images.items(), ("seg", seg)]:
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(root / name / f"{name}_{key}.nii.gz"))
    return root


def test_healthy_slices_join_the_tumour_slices_in_the_stated_proportion(tmp_path):
    """data.healthy_ratio: that many brain slices without tumour per tumour slice (fewer where a case has fewer),
    from the middle of the brain, each the case's own (the patient grouping holds), in axial order; 0 keeps the
    papers' tumour slices only."""
    root = _tree_with_healthy_slices(tmp_path / "site", 2)
    only = open_dataset(root, _cfg(), DataPrepConfig(cache_dir=tmp_path / "c0", min_tumour_pixels=1))
    mixed = open_dataset(root, _cfg(), DataPrepConfig(cache_dir=tmp_path / "c1", min_tumour_pixels=1,
                                                      healthy_ratio=0.5))
    tumour_per_case = len(only) // 2
    maps = mixed.label_maps()
    healthy = (maps >= 2).flatten(1).sum(1) == 0
    assert int(healthy.sum()) == 2 * round(0.5 * tumour_per_case) and len(mixed) == len(only) + int(healthy.sum())
    assert bool(((maps[healthy] == 1).flatten(1).sum(1) > 20).all())  # each has a brain outline
    assert bool((maps[~healthy] >= 2).flatten(1).any(1).all())
    patients = mixed.patients()
    assert patients.count == 2 and sorted(np.bincount(patients.index).tolist()) == [len(mixed) // 2] * 2
    # the prepared tumour slices are the same ones, healthy rows only added
    assert torch.equal(only.label_maps(), maps[~healthy])
    # more than the case has: every candidate, no more
    lots = open_dataset(root, _cfg(), DataPrepConfig(cache_dir=tmp_path / "c2", min_tumour_pixels=1, healthy_ratio=4))
    brain_only = int(((lots.label_maps() >= 2).flatten(1).sum(1) == 0).sum())
    assert int(healthy.sum()) < brain_only < 2 * 4 * tumour_per_case
