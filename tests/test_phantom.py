"""The MNI152-based tumour phantom: contrasts, label geometry, determinism and the written layout."""

import csv

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage as ndi

from asyndgan.demo_data import phantom as P

SMALL = (96, 96, 62)  # the BraTS field of view at 2.5 mm: same anatomy, a sixteenth of the voxels
CUBE = np.ones((3, 3, 3), bool)


@pytest.fixture(scope="module")
def template():
    return P.load_template()


@pytest.fixture(scope="module")
def hgg_case(template):
    # No head scaling or mass effect, so the template's own maps label the normal tissue of this case.
    profile = P.SiteProfile(high_grade_fraction=1.0, head_scale_sd=0.0, mass_effect=0.0, bias_strength=0.0)
    return P.make_case(template, profile, np.random.default_rng(3))


def _class_means(template, images, seg):
    near_tumour = ndi.binary_dilation(seg > 0, CUBE, iterations=3)
    classes = {k: (getattr(template, k) > 0.9) & ~near_tumour for k in ("csf", "gm", "wm")}
    classes.update(necrotic=seg == 1, edema=seg == 2, enhancing=seg == 4)
    return {m: {k: float(a[v].mean()) for k, v in classes.items()} for m, a in images.items()}


def test_template_is_the_mni_brain_in_the_brats_grid(template):
    assert template.shape == P.BRATS_SHAPE
    assert 1.7e6 < template.brain.sum() < 2.0e6  # ~1.9 l of skull-stripped brain
    # Tissue fractions add up to the mask, and CSF is what grey and white matter leave.
    total = template.csf + template.gm + template.wm
    assert np.allclose(total[template.brain], 1.0, atol=1e-5)
    assert (total[~template.brain] == 0).all()
    # LPS voxel order like BraTS; world coordinates are MNI mm, so voxel -> mm -> voxel is the identity.
    assert np.allclose(np.diag(template.affine)[:3], [-1, -1, 1])
    assert template.crop[0].start > 0 and template.crop[1].start > 0


def test_contrast_orderings_on_a_full_size_case(template, hgg_case):
    images, seg = hgg_case
    assert images["t1"].shape == P.BRATS_SHAPE and images["t1"].dtype == np.float32
    mean = _class_means(template, images, seg)
    assert mean["t1ce"]["enhancing"] > 1.3 * mean["t1ce"]["wm"]
    assert mean["t1ce"]["enhancing"] > 1.5 * mean["t1"]["enhancing"]  # the contrast agent does the work
    assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
    assert mean["flair"]["csf"] < 0.4 * min(mean["flair"]["gm"], mean["flair"]["wm"])
    assert mean["t2"]["csf"] > 1.5 * max(mean["t2"]["gm"], mean["t2"]["wm"])
    assert mean["flair"]["edema"] > mean["flair"]["gm"] > mean["flair"]["wm"]
    assert mean["t1ce"]["necrotic"] < mean["t1ce"]["wm"]
    for m, a in images.items():
        assert 300 < mean[m]["gm"] < 2500, m  # BraTS-like arbitrary units


def test_label_geometry_of_a_high_grade_tumour(template, hgg_case):
    images, seg = hgg_case
    assert seg.dtype == np.uint8
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    necrotic, enhancing = seg == 1, seg == 4
    assert necrotic.sum() > 100 and enhancing.sum() > 100 and (seg == 2).sum() > enhancing.sum()
    # The enhancing rim closes around the necrotic core in all 26 directions.
    assert not (ndi.binary_dilation(necrotic, CUBE) & ~(necrotic | enhancing)).any()
    # All tumour is in the brain, the images are skull-stripped (exact zeros) and positive inside.
    assert template.brain[seg > 0].all()
    for a in images.values():
        assert (a[~template.brain] == 0).all()
        assert (a[template.brain] > 0).all()


def test_low_grade_tumours_barely_enhance():
    profile = P.SiteProfile(high_grade_fraction=0.0)
    enhancing = core = 0
    for seed in range(3):
        images, seg = P.make_case(P.load_template(SMALL), profile, np.random.default_rng(seed), SMALL)
        assert images["flair"].shape == SMALL
        assert (seg == 1).any()
        assert (images["t1ce"][seg > 0] > 0).all()  # tumour lies inside this case's (scaled) brain mask
        enhancing += int((seg == 4).sum())
        core += int(np.isin(seg, (1, 4)).sum())
    assert enhancing < 0.2 * core


def test_same_seed_same_arrays_other_seed_other_arrays():
    # A profile that takes every optional path: thick slices, misregistration, bias, mass effect.
    profile = P.SiteProfile(slice_thickness_mm=4.0, misregistration_mm=1.0, bias_strength=0.3, noise=0.05)
    template = P.load_template(SMALL)
    a_img, a_seg = P.make_case(template, profile, np.random.default_rng(7), SMALL)
    b_img, b_seg = P.make_case(template, profile, np.random.default_rng(7), SMALL)
    c_img, c_seg = P.make_case(template, profile, np.random.default_rng(8), SMALL)
    assert np.array_equal(a_seg, b_seg)
    assert all(a_img[m].tobytes() == b_img[m].tobytes() for m in a_img)
    assert not np.array_equal(a_seg, c_seg)
    assert not any(np.array_equal(a_img[m], c_img[m]) for m in a_img)


def test_config_defaults_are_uneven_deterministic_and_checked():
    cfg = P.PhantomConfig(sites=3, train_cases=60, seed=5)
    assert sum(cfg.cases_per_site) == 60 and cfg.cases_per_site[0] > 2 * cfg.cases_per_site[1]
    assert cfg.profiles == P.PhantomConfig(sites=3, seed=5).profiles
    assert cfg.profiles != P.PhantomConfig(sites=3, seed=6).profiles
    assert len({p.gain for p in cfg.profiles}) == 3
    with pytest.raises(ValidationError, match="cases_per_site"):
        P.PhantomConfig(sites=2, cases_per_site=[3])
    with pytest.raises(ValidationError, match="tumour_radius_mm"):
        P.SiteProfile(tumour_radius_mm=(20.0, 10.0))


def test_flair_nulls_csf():
    csf, wm = P.TISSUES["csf"], P.TISSUES["wm"]
    assert P.inversion_recovery(csf.t1, csf.t2, csf.pd, **P.IR_FLAIR) < 0.02 * P.inversion_recovery(
        wm.t1, wm.t2, wm.pd, **P.IR_FLAIR)


def test_write_phantom_layout(tmp_path):
    cfg = P.PhantomConfig(sites=2, cases_per_site=[1, 1], test_cases=1, seed=1, shape=SMALL)
    summary = P.write_phantom(tmp_path, cfg, progress=False)
    assert summary.cases_per_site == {"site1": 1, "site2": 1} and summary.test_cases == 1

    with open(tmp_path / "partition.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"case": "PHANTOM_S1_0000", "site": "site1", "split": "train"},
        {"case": "PHANTOM_S2_0000", "site": "site2", "split": "train"},
        {"case": "PHANTOM_TEST_0000", "site": "site1", "split": "test"},
    ]
    for row in rows:
        folder = tmp_path / (row["site"] if row["split"] == "train" else "test") / row["case"]
        for name in ("t1", "t1ce", "t2", "flair", "seg"):
            img = nib.load(folder / f"{row['case']}_{name}.nii.gz")
            data = np.asanyarray(img.dataobj)
            assert data.shape == SMALL
            assert data.dtype == (np.uint8 if name == "seg" else np.float32)
            assert np.allclose(img.header.get_zooms(), [239 / 95, 239 / 95, 154 / 61])  # corners aligned
        assert set(np.unique(data)) <= {0, 1, 2, 4} and (data > 0).any()

    notice = (tmp_path / "NOTICE").read_text()
    assert "McConnell Brain Imaging Centre" in notice and "McGill University" in notice and "2009a" in notice
    with Image.open(tmp_path / "preview.png") as png:
        assert png.size[0] > 400 and png.size[1] > 200  # 5 columns, 2 site rows
    assert P.PhantomConfig.model_validate_json((tmp_path / "config.json").read_text()) == cfg
