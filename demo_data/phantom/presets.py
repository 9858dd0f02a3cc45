"""Named phantom layouts, and reading a layout from a file.

    default        the original phantom (3 uneven sites, gliomas only, scanners drawn from the seed): every report
                   made before the other presets existed was measured on it, and it stays byte-identical
    heterogeneous  a consortium whose sites see different parts of the distribution: four sites of similar size,
                   each dominated by its own lesion type, population and scanner; the test set draws on all four
                   in turn (ten patients each at the default 40)
    public         a public cohort that lacks what the private sites have: large high-grade gliomas only, from one
                   scanner family (3 T, thin slices, standard dose), no elderly population; one folder `public/`,
                   with its own random streams and case ids, so it never repeats a private case

A layout file (TOML or JSON) holds PhantomConfig's fields, optionally with `preset = "NAME"` to start from one of
the above; what the file sets replaces the preset's value, and command-line options replace both.
"""

from __future__ import annotations

import pathlib
from typing import Any

from asyndgan.common.config import read_config_file
from asyndgan.common.errors import ConfigError
from asyndgan.demo_data.phantom.config import PhantomConfig, SiteProfile

PRESETS = ("default", "heterogeneous", "public")

# Scanner families shared by the presets: the public cohort's scanners are the academic centre's.
_ACADEMIC_3T = dict(field_strength_t=3.0, slice_thickness_mm=1.0, inplane_mm=1.0, contrast_dose=1.0,
                    contrast_timing=(0.9, 1.1), gain=1.2, bias_strength=0.1, noise=0.015)

HETEROGENEOUS_PROFILES = (
    SiteProfile(
        name="university glioma centre, 3 T, 1 mm 3-D",
        lesions={"glioma": 1.0}, high_grade_fraction=0.85, tumour_radius_mm=(10.0, 22.0),
        head_scale_sd=0.03, deformation_mm=2.5, atrophy=(0.0, 0.3), **_ACADEMIC_3T),
    SiteProfile(
        name="cancer centre, metastases, 1.5 T, double dose",
        lesions={"metastases": 0.85, "glioma": 0.15}, metastasis_count=(2, 6), metastasis_radius_mm=(2.5, 7.0),
        tumour_radius_mm=(8.0, 18.0), high_grade_fraction=0.9, head_scale_sd=0.03, deformation_mm=2.5,
        atrophy=(0.2, 0.6), field_strength_t=1.5, slice_thickness_mm=1.0, contrast_dose=1.6, gain=0.8,
        bias_strength=0.2, noise=0.03),
    SiteProfile(
        name="community hospital, low-grade gliomas, old 1.5 T, 5 mm 2-D",
        lesions={"low_grade_glioma": 0.7, "glioma": 0.3}, tumour_radius_mm=(6.0, 14.0), high_grade_fraction=0.5,
        head_scale_mean=0.97, head_scale_sd=0.04, deformation_mm=3.0, atrophy=(0.3, 0.8), field_strength_t=1.5,
        slice_thickness_mm=5.0, inplane_mm=1.5, contrast_dose=0.6, contrast_timing=(0.6, 1.0), gain=1.0,
        bias_strength=0.3, noise=0.05, misregistration_mm=1.2),
    SiteProfile(
        name="neurosurgery centre, meningiomas, elderly, 3 T 3 mm",
        lesions={"meningioma": 0.85, "glioma": 0.15}, meningioma_radius_mm=(8.0, 18.0), tumour_radius_mm=(8.0, 18.0),
        high_grade_fraction=0.8, head_scale_mean=1.03, head_scale_sd=0.03, deformation_mm=3.0, atrophy=(0.4, 1.0),
        field_strength_t=3.0, slice_thickness_mm=3.0, inplane_mm=1.0, contrast_dose=1.0, gain=1.4,
        bias_strength=0.15, noise=0.025),
)

# A public glioma collection as the public BraTS releases are: pre-operative high-grade gliomas (mostly
# glioblastoma, large at diagnosis), adults without marked atrophy, from one family of research 3 T scanners. It
# lacks what the private sites add: low-grade and small tumours, metastases, meningiomas, elderly anatomy,
# thick-slice 2-D protocols, double or low contrast doses.
PUBLIC_PROFILE = SiteProfile(
    name="public glioma collection: high-grade, one 3 T scanner family",
    lesions={"glioma": 1.0}, high_grade_fraction=1.0, tumour_radius_mm=(12.0, 22.0), head_scale_sd=0.03,
    deformation_mm=2.5, atrophy=(0.0, 0.2), **_ACADEMIC_3T)


def preset_fields(name: str) -> dict[str, Any]:
    """The PhantomConfig fields of a named layout (before any override)."""
    if name == "default":
        return {}
    if name == "heterogeneous":
        return dict(sites=4, cases_per_site=[10, 10, 10, 10], test_cases=40, cohort="heterogeneous",
                    profiles=[p.model_copy() for p in HETEROGENEOUS_PROFILES])
    if name == "public":
        return dict(sites=1, cases_per_site=[30], test_cases=0, cohort="public", site_names=["public"],
                    profiles=[PUBLIC_PROFILE.model_copy()])
    raise ConfigError(f"unknown phantom preset {name!r}; choose one of {', '.join(PRESETS)}")


def read_layout_file(path: pathlib.Path) -> dict[str, Any]:
    """A layout file's fields (TOML or JSON); a one-line error for a missing or unreadable file."""
    data = read_config_file(pathlib.Path(path))
    if not isinstance(data, dict):
        raise ConfigError(f"phantom config {path} must hold a table of settings")
    return data


def phantom_config(preset: str = "default", file_fields: dict[str, Any] | None = None,
                   **overrides: Any) -> PhantomConfig:
    """A validated PhantomConfig: the preset (or the file's own `preset`), then the file's fields, then the
    overrides that are not None. Changing `sites` without giving profiles or counts lets them be derived again."""
    fields = dict(file_fields or {})
    preset = fields.pop("preset", None) or preset
    merged = preset_fields(preset)
    merged.update(fields)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if merged.get("sites") is not None and "profiles" in merged and "profiles" not in fields and \
            "profiles" not in overrides and len(merged["profiles"]) != merged["sites"]:
        n = len(merged["profiles"])
        raise ConfigError(f"the {preset} preset has {n} site profile{'s' if n > 1 else ''}; give --sites {n} or a "
                          "config file with a profile per site")
    return PhantomConfig(**merged)
