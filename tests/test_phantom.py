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
    assert [(r["case"], r["site"], r["split"], r["lesion"]) for r in rows] == [
        ("PHANTOM_S1_0000", "site1", "train", "glioma"),
        ("PHANTOM_S2_0000", "site2", "train", "glioma"),
        ("PHANTOM_TEST_0000", "site1", "test", "glioma"),
    ]
    assert all(r["lesions"] == "1" and r["atrophy"] == "0.0" and r["field_strength_t"] == "1.5" for r in rows)
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


# ---- heterogeneity: lesion types, anatomy, protocols, presets ------------------------------------------------
def _described(profile, seed=0, shape=SMALL):
    from asyndgan.demo_data.phantom.acquisition import make_case_described

    return make_case_described(P.load_template(shape), profile, np.random.default_rng(seed), shape)


def _components(mask):
    return ndi.label(mask, CUBE)[1]


def test_metastases_are_several_small_ring_enhancing_lesions_with_wide_edema():
    profile = P.SiteProfile(lesions={"metastases": 1.0}, metastasis_count=(3, 4), metastasis_radius_mm=(4.0, 6.0))
    images, seg, info = _described(profile, seed=2, shape=(160, 160, 100))
    assert info.lesion == "metastases" and info.lesions in (3, 4)
    assert _components(np.isin(seg, (1, 4))) >= 2  # separate cores, not one tumour
    core = int(np.isin(seg, (1, 4)).sum())
    assert (seg == 2).sum() > 3 * core  # edema out of proportion to the lesions
    assert (seg == 4).sum() > (seg == 1).sum()  # ring (and small solid ones) enhance
    # Each core is small: no single core larger than a 7 mm-radius ball (1.5 mm voxels).
    labels, n = ndi.label(np.isin(seg, (1, 4)), CUBE)
    biggest = max(int((labels == k).sum()) for k in range(1, n + 1))
    assert biggest * 1.5 ** 3 < 4 / 3 * np.pi * 7.5 ** 3


def test_meningioma_is_extra_axial_and_homogeneously_enhancing(template):
    profile = P.SiteProfile(lesions={"meningioma": 1.0}, head_scale_sd=0.0, mass_effect=0.5, bias_strength=0.0)
    images, seg, info = _described(profile, seed=1, shape=P.BRATS_SHAPE)
    assert info.lesion == "meningioma"
    tumour = seg > 0
    assert set(np.unique(seg[tumour])) <= {2, 4} and (seg == 4).sum() > 0.8 * tumour.sum()
    # It lies at the brain's surface and partly outside the template's brain, and is part of the skull-stripped
    # volume (images positive there).
    assert (~template.brain & (seg == 4)).sum() > 50
    assert template.dist_mm[seg == 4].min() == 0
    assert (images["t1ce"][seg == 4] > 0).all()
    # Homogeneous: the enhancing mass is much brighter than white matter after contrast, and evenly so.
    wm = (template.wm > 0.9) & ~ndi.binary_dilation(tumour, CUBE, iterations=3)
    vals = images["t1ce"][ndi.binary_erosion(seg == 4, CUBE)]
    assert vals.mean() > 1.3 * images["t1ce"][wm].mean()
    assert vals.std() / vals.mean() < 0.2


def test_low_grade_glioma_type_never_enhances_much():
    for seed in range(2):
        _, seg, info = _described(P.SiteProfile(lesions={"low_grade_glioma": 1.0}), seed=seed)
        assert info.lesion == "low_grade_glioma"
        assert (seg == 4).sum() < 0.2 * np.isin(seg, (1, 4)).sum()


def test_atrophy_widens_ventricles_and_deformation_changes_the_anatomy():
    shape = (160, 160, 100)
    base = P.SiteProfile(head_scale_sd=0.0, noise=0.0, bias_strength=0.0)
    flair = {}
    for name, extra in {"none": {}, "atrophy": {"atrophy": (1.0, 1.0)}, "warp": {"deformation_mm": 4.0}}.items():
        images, seg, info = _described(base.model_copy(update=extra), seed=4, shape=shape)
        flair[name] = (images["flair"], seg, info)
    # CSF is dark in FLAIR: atrophy turns tissue into CSF (ventricles, sulci), so many more brain voxels are dark.
    def dark(name):
        img, seg, _ = flair[name]
        inside = (img > 0) & (seg == 0)
        return float((img[inside] < 0.35 * np.median(img[inside])).mean())
    assert flair["atrophy"][2].atrophy == 1.0 and flair["none"][2].atrophy == 0.0
    assert dark("atrophy") > dark("none") + 0.03
    # A warp moves tissue: brain masks of the same patient differ, by a few percent of the brain.
    a, b = flair["none"][0] > 0, flair["warp"][0] > 0
    assert 0.01 < (a ^ b).sum() / a.sum() < 0.3


def test_field_strength_and_protocol_change_the_contrast():
    from asyndgan.demo_data.phantom.mr_signal import tissue_signals

    at15, at3 = tissue_signals(1.0, 1.5), tissue_signals(1.0, 3.0)
    assert at15 == tissue_signals(1.0)  # the default is the original 1.5 T table
    # Longer T1 at 3 T: another grey/white contrast in the T1-dependent sequences, CSF unchanged.
    for m in ("t1", "t1ce", "flair"):
        assert abs(at3[m]["wm"] / at3[m]["gm"] - at15[m]["wm"] / at15[m]["gm"]) > 0.01, m
    assert at3["t1"]["csf"] == at15["t1"]["csf"]
    # In-plane resolution blurs: the image's in-plane gradients inside the brain shrink.
    sharp, _, _ = _described(P.SiteProfile(noise=0.0), seed=3)
    blurred, _, _ = _described(P.SiteProfile(noise=0.0, inplane_mm=5.0), seed=3)
    inner = ndi.binary_erosion(sharp["t1"] > 0, CUBE, iterations=2)[1:] & ndi.binary_erosion(
        blurred["t1"] > 0, CUBE, iterations=2)[:-1]

    def grad(a):
        return float(np.abs(np.diff(a, axis=0))[inner].mean())

    assert grad(blurred["t1"]) < 0.8 * grad(sharp["t1"])


def test_lesion_mix_is_drawn_per_patient_and_cohorts_do_not_share_cases(tmp_path):
    from asyndgan.demo_data.phantom.presets import phantom_config

    cfg = phantom_config("heterogeneous", shape=(48, 48, 32), cases_per_site=[3, 3, 3, 3], test_cases=4)
    assert [p.name for p in cfg.profiles] and len(set(p.name for p in cfg.profiles)) == 4
    assert cfg.cohort == "heterogeneous"
    summary = P.write_phantom(tmp_path / "het", cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "het" / "partition.csv")))
    assert {r["site"] for r in rows if r["split"] == "test"} == {"site1", "site2", "site3", "site4"}
    assert len(summary.lesions) >= 3 and sum(summary.lesions.values()) == 16
    assert rows[0]["case"].startswith("PHANTOM_HETEROGENEOUS_S1_")
    assert (tmp_path / "het" / "preview_lesions.png").is_file()
    # Same seed, another cohort name: other random streams, other cases.
    other = cfg.model_copy(update={"cohort": "other"})
    assert cfg.case_seed(1, 0).entropy != other.case_seed(1, 0).entropy
    assert P.PhantomConfig().case_seed(1, 0).entropy == [0, 1, 0]  # the original phantom's streams, unchanged


def test_presets_config_files_and_overrides(tmp_path):
    from asyndgan.common.errors import ConfigError
    from asyndgan.demo_data.phantom.presets import phantom_config, read_layout_file

    assert phantom_config("default") == P.PhantomConfig()
    public = phantom_config("public")
    assert public.site_names == ["public"] and public.test_cases == 0
    assert set(public.profiles[0].lesions) == {"glioma"}
    het = phantom_config("heterogeneous")
    assert {lt for p in het.profiles for lt in p.lesions} == {"glioma", "low_grade_glioma", "metastases", "meningioma"}
    # A file starting from a preset, and a command-line override on top.
    (tmp_path / "layout.toml").write_text('preset = "heterogeneous"\ntest_cases = 8\n[[profiles]]\n'
                                          'lesions = {metastases = 1.0}\n' * 1)
    with pytest.raises(ValidationError, match="profiles"):
        phantom_config(file_fields=read_layout_file(tmp_path / "layout.toml"))  # 1 profile for 4 sites
    (tmp_path / "layout.json").write_text('{"preset": "heterogeneous", "test_cases": 8}')
    cfg = phantom_config(file_fields=read_layout_file(tmp_path / "layout.json"), seed=5)
    assert cfg.test_cases == 8 and cfg.seed == 5 and cfg.sites == 4
    with pytest.raises(ConfigError, match="unknown phantom preset"):
        phantom_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        read_layout_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="give --sites 4"):
        phantom_config("heterogeneous", sites=3)
    with pytest.raises(ValidationError, match="lesions"):
        P.SiteProfile(lesions={"teratoma": 1.0})


def test_the_documented_layout_file_is_valid():
    import pathlib

    from asyndgan.demo_data.phantom.presets import phantom_config, read_layout_file

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = phantom_config(file_fields=read_layout_file(root / "docs" / "phantom-layout.toml"))
    assert cfg.sites == 4 and cfg.cases_per_site == [20, 10, 10, 5] and cfg.test_cases == 48 and cfg.seed == 3
    assert cfg.profiles[1].lesions == {"metastases": 0.8, "glioma": 0.2} and cfg.cohort == "heterogeneous"
