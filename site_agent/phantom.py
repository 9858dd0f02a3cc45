"""A multi-site brain-tumour phantom in BraTS layout, built on the real MNI ICBM152 2009a template.

This module owns everything about the generated data: loading the template that ships inside the nilearn
wheel (found without importing nilearn), placing it in the BraTS 240 x 240 x 155 grid, inserting a tumour with
nested compartments (necrotic / non-enhancing core inside an enhancing rim inside edema that spreads along
white matter), turning tissue fractions into T1, T1ce, T2 and FLAIR images with spin-echo and
inversion-recovery signal equations, applying per-site scanner effects (gain, bias field, Rician noise,
contrast dose, slice thickness, misregistration), and writing the folders, `partition.csv`, the template's
NOTICE and a preview figure.

Layout written by `write_phantom` (BraTS 2018-2021 names and labels 0, 1 necrotic/non-enhancing core, 2 edema,
4 enhancing):
    out/site<k>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz   training cases of site k (1-based)
    out/test/<case>/...              pooled test cases; partition.csv names the site whose scanner made each
    out/partition.csv (case,site,split), out/config.json (the resolved config), out/NOTICE, out/preview.png
Volumes are stored like BraTS: voxel axes run to patient Left, Posterior, Superior (affine diag(-1, -1, 1)),
1 mm at full size, with world coordinates equal to MNI millimetres.

Every case draws from its own generator seeded by (seed, stream, index), so a case does not change when the
number of cases or sites around it changes, and the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import logging
import math
import pathlib
import time

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import ndimage as ndi
from tqdm import tqdm

from asyndgan.common.config import BRATS_MODALITIES

log = logging.getLogger(__name__)

BRATS_SHAPE = (240, 240, 155)
# FeTS 2021 institution sizes (REFERENCE.md); the default split takes the largest few, so that a 3-site run is
# as uneven as real institutions without leaving a site with a single case.
FETS_2021_PARTITION_SIZES = (129, 14, 5, 9, 22, 34, 12, 8, 4, 8, 6, 9, 27, 3, 11, 34, 6)

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

NOTICE_TEXT = """\
This phantom data set is derived from the MNI ICBM152 non-linear symmetric 2009a template
(T1 image and grey/white matter probability maps, as shipped in the nilearn package).

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors
and McGill University make no representations about the suitability of this software for any purpose.
It is provided "as is" without express or implied warranty. The authors are not responsible for any data
loss, equipment damage, property loss, or injury to subjects or patients resulting from the use or misuse
of this software package.

References: V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli, D.L. Collins, "Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood", NeuroImage 47 (2009) S102; V. Fonov et al.,
"Unbiased average age-appropriate atlases for pediatric studies", NeuroImage 54 (2011) 313-327.

The tumours, image contrasts and scanner effects are synthetic (asyndgan.site_agent.phantom). No patient
data is contained.
"""


# --------------------------------------------------------------------------------------------- tissue physics

@dataclasses.dataclass(frozen=True)
class Tissue:
    t1: float  # ms
    t2: float  # ms
    pd: float  # relative proton density


# REFERENCE.md starting values, except that GM/WM T2 are set apart (95 / 75 ms, Stanisz et al. 2005 at 1.5 T
# report 95 / 72): with both at 85 ms white matter would come out brighter than grey matter in FLAIR and T2,
# the opposite of every real scan.
TISSUES = {
    "csf": Tissue(3000.0, 2500.0, 1.00),
    "gm": Tissue(1050.0, 95.0, 0.80),
    "wm": Tissue(700.0, 75.0, 0.70),
    "edema": Tissue(1400.0, 180.0, 0.90),
    "necrosis": Tissue(2200.0, 250.0, 0.95),
    "enhancing": Tissue(1300.0, 110.0, 0.85),
    # Solid non-enhancing tumour of low-grade gliomas (label 1 there): long T1 and T2, below edema.
    "non_enhancing": Tissue(1500.0, 140.0, 0.90),
}
ENHANCING_T1_POST_MS = 350.0  # at contrast dose 1; the dose scales the change in R1 = 1/T1

SE_T1 = {"tr": 500.0, "te": 12.0}
SE_T2 = {"tr": 4000.0, "te": 100.0}
IR_FLAIR = {"tr": 9000.0, "te": 120.0, "ti": 1930.0}  # TI ~ T1_csf * ln 2 nulls CSF


def spin_echo(t1, t2, pd, tr: float, te: float):
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(t1, t2, pd, tr: float, te: float, ti: float):
    # Magnitude reconstruction, as FLAIR images are stored: tissue with T1 below the null point stays
    # positive.
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def post_contrast_t1(t1_pre: float, dose: float) -> float:
    """T1 of enhancing tumour after gadolinium; dose 1 gives ENHANCING_T1_POST_MS."""
    delta_r1 = 1.0 / ENHANCING_T1_POST_MS - 1.0 / TISSUES["enhancing"].t1
    return 1.0 / (1.0 / t1_pre + dose * delta_r1)


def tissue_signals(dose: float) -> dict[str, dict[str, float]]:
    """Noise-free signal per modality and tissue (arbitrary units, before the modality scale)."""
    out: dict[str, dict[str, float]] = {m: {} for m in BRATS_MODALITIES}
    for name, t in TISSUES.items():
        t1_post = post_contrast_t1(t.t1, dose) if name == "enhancing" else t.t1
        out["t1"][name] = float(spin_echo(t.t1, t.t2, t.pd, **SE_T1))
        out["t1ce"][name] = float(spin_echo(t1_post, t.t2, t.pd, **SE_T1))
        out["t2"][name] = float(spin_echo(t.t1, t.t2, t.pd, **SE_T2))
        out["flair"][name] = float(inversion_recovery(t.t1, t.t2, t.pd, **IR_FLAIR))
    return out


_NOMINAL = tissue_signals(1.0)
# Receiver scale per modality: the brightest normal tissue maps to 1000, so gain, bias and enhancement land in
# a BraTS-like 0..~2500 range. Fixed (not recomputed per dose) so that the dose changes the image.
MODALITY_SCALE = {m: 1000.0 / max(_NOMINAL[m][k] for k in ("csf", "gm", "wm")) for m in BRATS_MODALITIES}


# ------------------------------------------------------------------------------------------------- config

class SiteProfile(BaseModel):
    """Scanner and population effects of one site. Defaults are a clean 1 mm 3D protocol."""

    model_config = ConfigDict(extra="forbid")

    gain: float = Field(1.0, gt=0, le=10, description="global intensity multiplier (receiver gain)")
    bias_strength: float = Field(0.12, ge=0, le=1, description="std of the log of the smooth bias field")
    noise: float = Field(0.02, ge=0, le=0.5, description="Rician sigma / brightest normal tissue")
    contrast_dose: float = Field(1.0, ge=0, le=3, description="gadolinium effect; 1: enhancing T1 350 ms")
    slice_thickness_mm: float = Field(1.0, gt=0, le=10, description="acquired thickness; >1 blurs along z")
    tumour_radius_mm: tuple[float, float] = Field((8.0, 20.0), description="range of the tumour core radius")
    high_grade_fraction: float = Field(0.75, ge=0, le=1, description="share with necrosis + enhancing rim")
    misregistration_mm: float = Field(0.0, ge=0, le=5, description="max shift of t1/t2/flair vs t1ce and seg")
    head_scale_sd: float = Field(0.03, ge=0, le=0.1, description="std of per-axis head size / template")
    mass_effect: float = Field(0.5, ge=0, le=1, description="displaced-tissue radius / core radius")

    @field_validator("tumour_radius_mm")
    @classmethod
    def _radius_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (2.0 <= lo <= hi <= 40.0):
            raise ValueError(f"need 2 <= low <= high <= 40 mm, got {v}")
        return v


class PhantomConfig(BaseModel):
    """What to generate. Unset `cases_per_site` and `profiles` are filled in at validation, so the validated
    config is the full recipe (it is saved as out/config.json)."""

    model_config = ConfigDict(extra="forbid")

    sites: int = Field(3, ge=1, le=64)
    cases_per_site: list[int] | None = None
    train_cases: int = Field(60, ge=1, description="total training cases when cases_per_site is not given")
    test_cases: int = Field(12, ge=0)
    seed: int = Field(0, ge=0)
    shape: tuple[int, int, int] = BRATS_SHAPE
    profiles: list[SiteProfile] | None = None

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 24 <= n <= 512 for n in v):
            raise ValueError(f"each dimension must be in 24..512, got {v}")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> PhantomConfig:
        if self.cases_per_site is None:
            self.cases_per_site = default_cases_per_site(self.sites, self.train_cases)
        if len(self.cases_per_site) != self.sites or any(n < 1 for n in self.cases_per_site):
            raise ValueError(f"cases_per_site needs {self.sites} positive counts, got {self.cases_per_site}")
        if self.profiles is None:
            self.profiles = default_profiles(self.sites, self.seed)
        if len(self.profiles) != self.sites:
            raise ValueError(f"profiles needs {self.sites} entries, got {len(self.profiles)}")
        return self


class PhantomSummary(BaseModel):
    out: pathlib.Path
    cases_per_site: dict[str, int]
    test_cases: int
    seconds: float
    seconds_per_case: float


def default_cases_per_site(sites: int, total: int) -> list[int]:
    """Split `total` in proportion to the largest FeTS 2021 institutions (at least 2 per site)."""
    ranked = sorted(FETS_2021_PARTITION_SIZES, reverse=True)
    weights = np.array([ranked[i % len(ranked)] for i in range(sites)], float)
    share = weights / weights.sum() * max(total, 2 * sites)
    counts = np.maximum(np.floor(share).astype(int), 2)
    # Largest remainder for what is left, so the counts add up to the total where the minimum allows.
    for i in np.argsort(-(share - np.floor(share)))[: max(0, int(total - counts.sum()))]:
        counts[i] += 1
    return [int(n) for n in counts]


def default_profiles(sites: int, seed: int) -> list[SiteProfile]:
    """Deterministically different scanners and populations, one per site."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROFILE_STREAM]))
    out = []
    for k in range(sites):
        lo = float(rng.uniform(6.0, 12.0))
        out.append(SiteProfile(
            gain=round(float(rng.uniform(0.7, 1.4)), 3),
            bias_strength=round(float(rng.uniform(0.05, 0.3)), 3),
            noise=round(float(rng.uniform(0.01, 0.05)), 4),
            contrast_dose=round(float(rng.uniform(0.6, 1.3)), 3),
            # A third of sites acquire thick slices, as older 2D protocols in the BraTS collections did.
            slice_thickness_mm=round(float(rng.uniform(3.0, 5.0)), 2) if k % 3 == 2 else 1.0,
            tumour_radius_mm=(round(lo, 1), round(lo + float(rng.uniform(6.0, 14.0)), 1)),
            high_grade_fraction=round(float(rng.uniform(0.5, 0.95)), 3),
            misregistration_mm=round(float(rng.uniform(0.5, 1.5)), 2) if k % 3 == 1 else 0.0,
        ))
    return out


_PROFILE_STREAM = 7919
_TEST_STREAM = 0  # training cases of site k use stream k (1-based)


# ----------------------------------------------------------------------------------------------- template

@dataclasses.dataclass(frozen=True)
class Template:
    """MNI152 2009a in a BraTS grid. Maps are float32 in [0, 1]; arrays are read-only (they are cached)."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray  # brain - gm - wm, clipped
    brain: np.ndarray  # bool, the template's skull-stripped mask
    dist_mm: np.ndarray  # float32 distance to the outside of the brain
    spacing: tuple[float, float, float]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)

    @functools.cached_property
    def crop(self) -> tuple[slice, slice, slice]:
        """Brain bounding box plus a margin that head-size changes and blur can spill into."""
        out = []
        for ax in range(3):
            hit = np.flatnonzero(self.brain.any(axis=tuple(a for a in range(3) if a != ax)))
            margin = int(math.ceil(8.0 / self.spacing[ax]))
            out.append(slice(max(0, hit[0] - margin), min(self.brain.shape[ax], hit[-1] + 1 + margin)))
        return tuple(out)

    @functools.cached_property
    def tumour_seeds(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate tumour centres (crop voxel indices [n, 3]) and their distance to the brain surface (mm):
        white matter of the cerebrum, where gliomas mostly arise."""
        gm, wm, dist = self.gm[self.crop], self.wm[self.crop], self.dist_mm[self.crop]
        z_mm = (self.affine @ np.c_[np.zeros((gm.shape[2], 2)), np.arange(gm.shape[2]) + self.crop[2].start,
                                    np.ones(gm.shape[2])].T)[2]
        ok = (wm > 0.6) & (z_mm > -20.0)[None, None, :]  # above the cerebellum and brainstem
        idx = np.argwhere(ok)
        return idx, dist[ok]


def template_dir() -> pathlib.Path:
    # Found through the import system without importing nilearn, which takes seconds and pulls in sklearn.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the phantom needs the MNI152 template shipped with nilearn: "
                                "pip install nilearn")
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@functools.lru_cache(maxsize=4)
def load_template(shape: tuple[int, int, int] = BRATS_SHAPE) -> Template:
    """The template placed (not resampled) in the 1 mm BraTS grid, brain centred; other shapes are a linear
    resampling of that grid, so the field of view stays 240 x 240 x 155 mm."""
    shape = tuple(int(n) for n in shape)
    if shape != BRATS_SHAPE:
        return _resample_template(load_template(BRATS_SHAPE), shape)
    folder = template_dir()
    raw, src_affine = {}, None
    for key, name in _TEMPLATE_FILES.items():
        img = nib.load(folder / name)
        raw[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0  # stored as uint8 0..255
        src_affine = img.affine
    brain_src = ndi.binary_fill_holes(raw["t1"] > 0)

    # Per axis: offset that centres the brain's bounding box; the template's 34 empty top slices fall off.
    offsets = []
    for ax in range(3):
        hit = np.flatnonzero(brain_src.any(axis=tuple(a for a in range(3) if a != ax)))
        offsets.append(int(round(BRATS_SHAPE[ax] / 2 - (hit[0] + hit[-1] + 1) / 2)))

    def place(a: np.ndarray) -> np.ndarray:
        out = np.zeros(BRATS_SHAPE, a.dtype)
        dst, src = [], []
        for ax, off in enumerate(offsets):
            lo, hi = max(0, off), min(BRATS_SHAPE[ax], a.shape[ax] + off)
            dst.append(slice(lo, hi))
            src.append(slice(lo - off, hi - off))
        out[tuple(dst)] = a[tuple(src)]
        return np.ascontiguousarray(out[::-1, ::-1, :])  # RAS -> LPS voxel order, as BraTS files are stored

    brain = place(brain_src)
    gm = place(raw["gm"]) * brain
    wm = place(raw["wm"]) * brain
    # The output voxel (i, j, k) is template voxel (239 - i - off_x, 239 - j - off_y, k - off_z).
    to_src = np.array([[-1, 0, 0, BRATS_SHAPE[0] - 1 - offsets[0]],
                       [0, -1, 0, BRATS_SHAPE[1] - 1 - offsets[1]],
                       [0, 0, 1, -offsets[2]],
                       [0, 0, 0, 1]], float)
    return _freeze(Template(
        t1=place(raw["t1"]) * brain, gm=gm, wm=wm, csf=np.clip(brain - gm - wm, 0.0, 1.0), brain=brain,
        dist_mm=ndi.distance_transform_edt(brain).astype(np.float32), spacing=(1.0, 1.0, 1.0),
        affine=src_affine @ to_src))


def _resample_template(full: Template, shape: tuple[int, int, int]) -> Template:
    factors = [n / m for n, m in zip(shape, BRATS_SHAPE)]
    # ndi.zoom aligns the corner voxels, so output index o is input index o * (m - 1) / (n - 1).
    step = [(m - 1) / (n - 1) for n, m in zip(shape, BRATS_SHAPE)]
    z = functools.partial(ndi.zoom, zoom=factors, order=1)
    brain = z(full.brain.astype(np.float32)) > 0.5
    gm = np.clip(z(full.gm), 0, 1) * brain
    wm = np.clip(z(full.wm), 0, 1) * brain
    return _freeze(Template(
        t1=np.clip(z(full.t1), 0, 1) * brain, gm=gm, wm=wm, csf=np.clip(brain - gm - wm, 0.0, 1.0),
        brain=brain,
        dist_mm=ndi.distance_transform_edt(brain, sampling=step).astype(np.float32),
        spacing=tuple(float(s) for s in step), affine=full.affine @ np.diag([*step, 1.0])))


def _freeze(t: Template) -> Template:
    for f in ("t1", "gm", "wm", "csf", "dist_mm"):
        getattr(t, f).setflags(write=False)
    t.brain.setflags(write=False)
    t.affine.setflags(write=False)
    return t


# ------------------------------------------------------------------------------------------------- a case

def make_case(template: Template, profile: SiteProfile, rng: np.random.Generator,
              shape: tuple[int, int, int] = BRATS_SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One patient: ({t1, t1ce, t2, flair}: float32 [X, Y, Z], seg uint8 [X, Y, Z] with labels 0, 1, 2, 4).

    Images are exactly 0 outside the brain mask (skull-stripped) and positive inside it.
    """
    shape = tuple(int(n) for n in shape)
    if template.shape != shape:
        template = load_template(shape)
    crop, sp = template.crop, np.asarray(template.spacing)
    high_grade = bool(rng.random() < profile.high_grade_fraction)

    gm, wm, brain, head_scale = _case_anatomy(template, profile, rng)
    centre, radius = _tumour_centre(template, profile, rng, head_scale)
    tumour = _insert_tumour(gm, wm, brain, centre, radius, sp, high_grade, profile, rng)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    for tissue in (csf, gm, wm):  # the tumour replaces normal tissue
        tissue[tumour["box"]] *= tumour["keep"]

    dose = profile.contrast_dose * float(rng.uniform(0.85, 1.15))  # injection timing varies between patients
    signals = tissue_signals(dose)
    scale = float(profile.gain) * np.exp(rng.normal(0.0, 0.05, len(BRATS_MODALITIES)))  # per-session gain
    z_sigma = math.sqrt(max(profile.slice_thickness_mm ** 2 - sp[2] ** 2, 0.0)) / 2.355 / sp[2]
    brain_idx = np.flatnonzero(brain > 0.5)

    images = {}
    for m, g in zip(BRATS_MODALITIES, scale):
        s = signals[m]
        img = csf * s["csf"] + gm * s["gm"] + wm * s["wm"]  # already reduced where tumour replaces tissue
        box = tumour["box"]
        img[box] += tumour["edema"] * s["edema"] + tumour["texture"] * (
            tumour["necrosis"] * s["necrosis"] + tumour["enhancing"] * s["enhancing"]
            + tumour["non_enhancing"] * s["non_enhancing"])
        img *= _bias_field(img.shape, profile.bias_strength, rng)
        img *= np.float32(MODALITY_SCALE[m] * g)
        if z_sigma > 0.05:
            img = ndi.gaussian_filter1d(img, z_sigma, axis=2, mode="constant")
        if profile.misregistration_mm > 0 and m != "t1ce":  # t1ce is the space the seg was drawn in
            shift = rng.uniform(-1.0, 1.0, 3) * profile.misregistration_mm / sp
            img = ndi.shift(img, shift, order=1, mode="constant")
        vals = img.ravel()[brain_idx]
        sigma = np.float32(profile.noise * 1000.0 * g)
        n = rng.standard_normal((2, vals.size), dtype=np.float32) * sigma
        out = np.zeros(img.shape, np.float32)
        out.ravel()[brain_idx] = np.sqrt((vals + n[0]) ** 2 + n[1] ** 2)  # Rician: magnitude of complex noise
        full = np.zeros(shape, np.float32)
        full[crop] = out
        images[m] = full

    seg = np.zeros(shape, np.uint8)
    seg_crop = np.zeros(brain.shape, np.uint8)
    seg_crop[tumour["box"]] = tumour["labels"]
    seg[crop] = seg_crop
    return images, seg


def _case_anatomy(template: Template, profile: SiteProfile, rng: np.random.Generator):
    """gm, wm, brain (float32, brain is 0/1) on the template crop, scaled per axis about the brain centre,
    and the scale factors."""
    crop = template.crop
    gm, wm, brain = template.gm[crop], template.wm[crop], template.brain[crop]
    sd = profile.head_scale_sd
    head_scale = 1.0 + np.clip(rng.normal(0.0, sd, 3), -2.5 * sd, 2.5 * sd) if sd > 0 else np.ones(3)
    if sd == 0:
        return gm.copy(), wm.copy(), brain.astype(np.float32), head_scale
    centre = (np.asarray(brain.shape) - 1) / 2.0
    inv = 1.0 / head_scale  # output voxel o samples input centre + (o - centre) / scale
    kw = dict(matrix=inv, offset=centre - centre * inv, order=1, mode="constant", cval=0.0)
    brain_f = (ndi.affine_transform(brain.astype(np.float32), **kw) > 0.5).astype(np.float32)
    gm = np.clip(ndi.affine_transform(gm, **kw), 0.0, 1.0) * brain_f
    wm = np.clip(ndi.affine_transform(wm, **kw), 0.0, 1.0) * brain_f
    return gm, wm, brain_f, head_scale


def _tumour_centre(template: Template, profile: SiteProfile, rng: np.random.Generator,
                   head_scale: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre in crop voxels of the scaled anatomy, core radius mm)."""
    radius = float(rng.uniform(*profile.tumour_radius_mm))
    idx, dist = template.tumour_seeds
    # Deep enough that the lobulated core (up to ~1.35 radius) stays inside the brain.
    ok = np.flatnonzero(dist > 1.35 * radius + 3.0)
    if ok.size == 0:
        ok = np.flatnonzero(dist >= np.quantile(dist, 0.99))
        radius = min(radius, float(dist[ok].min()) / 1.35)
    pick = idx[ok[rng.integers(ok.size)]].astype(float)
    centre = (np.asarray(template.brain[template.crop].shape) - 1) / 2.0
    return centre + (pick - centre) * head_scale, radius


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: np.ndarray) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise that varies over `cell` voxels: a coarse random grid, linearly
    upsampled (cheap, and smooth enough once thresholded)."""
    coarse = tuple(max(2, int(math.ceil(n / c)) + 1) for n, c in zip(shape, cell))
    g = rng.standard_normal(coarse).astype(np.float32)
    return ndi.zoom(g, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="grid-constant")


def _insert_tumour(gm, wm, brain, centre, radius, sp, high_grade, profile, rng) -> dict:
    """Pushes gm / wm away from the tumour (in place); returns the tumour box (slices into the crop), its
    labels, the per-compartment signal weights there and `keep`, the share of normal tissue left."""
    edema_factor = rng.uniform(1.4, 2.0) if high_grade else rng.uniform(1.15, 1.5)
    r_edema = radius * edema_factor
    half = np.ceil((1.3 * 1.35 * r_edema + 4.0) / sp).astype(int)
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half + 1, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(hi - lo)

    # Millimetre offsets from the centre, broadcastable [X,1,1], [1,Y,1], [1,1,Z].
    d = [((np.arange(lo[a], hi[a], dtype=np.float32) - np.float32(centre[a])) * np.float32(sp[a])).reshape(
        [-1 if b == a else 1 for b in range(3)]) for a in range(3)]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + np.float32(1e-3)

    # Mass effect: tissue that was at radius r' is pushed to r with r^3 = r'^3 + R0^3 (incompressible).
    if profile.mass_effect > 0:
        r0 = profile.mass_effect * radius
        ratio = np.cbrt(np.maximum(r ** 3 - np.float32(r0 ** 3), 0.0)) / r
        coords = [np.broadcast_to(np.float32(centre[a]) + d[a] / np.float32(sp[a]) * ratio, bshape)
                  for a in range(3)]
        for m in (gm, wm):
            m[box] = ndi.map_coordinates(m, coords, order=1, mode="constant") * brain[box]

    # Lobulation: a few random plane waves on the unit sphere of directions, combined differently per field.
    k = 8
    waves = rng.normal(0.0, 1.0, (k, 3))
    waves *= (rng.uniform(1.5, 4.0, k) / np.linalg.norm(waves, axis=1))[:, None]
    phases = rng.uniform(0, 2 * np.pi, k)
    inv_r = 1.0 / r
    basis = [np.cos((d[0] * np.float32(w[0]) + d[1] * np.float32(w[1]) + d[2] * np.float32(w[2])) * inv_r
                    + np.float32(p)) for w, p in zip(waves, phases)]

    def lobes(amplitude: float) -> np.ndarray:
        c = rng.normal(0.0, 1.0, k)
        c *= amplitude / math.sqrt(float(np.sum(c ** 2)) / 2.0)  # std ~ amplitude
        return sum(np.float32(ci) * b for ci, b in zip(c, basis))

    fine = _smooth_noise(rng, bshape, np.maximum(5.0 / sp, 1.0))  # ~5 mm ragged edges and texture

    # Core: a randomly oriented ellipsoid, lobulated. phi < 1 is the core.
    axes = rng.uniform(0.75, 1.25, 3)
    axes /= np.prod(axes) ** (1 / 3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q = (rot @ np.diag(1.0 / (axes * radius) ** 2) @ rot.T).astype(np.float32)
    rho2 = (q[0, 0] * d[0] ** 2 + q[1, 1] * d[1] ** 2 + q[2, 2] * d[2] ** 2
            + 2 * (q[0, 1] * d[0] * d[1] + q[0, 2] * d[0] * d[2] + q[1, 2] * d[1] * d[2]))
    phi = np.sqrt(rho2) / (1.0 + lobes(rng.uniform(0.08, 0.2)) + np.float32(0.06) * fine)
    in_brain = brain[box] > 0.5
    core = (phi < 1.0) & in_brain

    full3 = np.ones((3, 3, 3), bool)
    rim_vox = max(1, int(round(1.0 / float(sp.min()))))
    if high_grade:
        necrotic = (phi < rng.uniform(0.6, 0.9) * (1.0 + lobes(0.12))) & core
        # The enhancing rim closes around the necrosis everywhere, also where the brain edge clips the core.
        necrotic &= ndi.binary_erosion(core, full3, iterations=rim_vox)
        enhancing = core & ~necrotic
        non_enhancing = np.zeros_like(core)
    else:
        necrotic = np.zeros_like(core)
        enhancing = np.zeros_like(core)
        if rng.random() < 0.35 and core.any():  # some low-grade tumours show a faint focus of enhancement
            spot = np.argwhere(core)[rng.integers(int(core.sum()))]
            rs = rng.uniform(1.5, 4.0)
            dd = sum(((np.arange(bshape[a], dtype=np.float32) - spot[a]) * sp[a]).reshape(
                [-1 if b == a else 1 for b in range(3)]) ** 2 for a in range(3))
            enhancing = core & (dd < rs ** 2)
        non_enhancing = core & ~enhancing

    # Edema: reaches r_edema * (0.3 + 0.9 wm): far along white matter, barely into cortex.
    psi = (r / np.float32(r_edema)) / (1.0 + lobes(rng.uniform(0.1, 0.25)) + np.float32(0.1) * fine)
    reach = np.float32(0.3) + np.float32(0.9) * wm[box]
    csf_box = np.clip(brain[box] - gm[box] - wm[box], 0.0, 1.0)
    edema = (psi < reach) & in_brain & (csf_box < 0.7) & ~core
    edema |= ndi.binary_dilation(core, full3, iterations=rim_vox) & in_brain & ~core
    edema_frac = np.where(edema, np.clip(0.95 - 0.45 * psi / reach, 0.5, 0.95), 0.0).astype(np.float32)

    labels = np.zeros(bshape, np.uint8)
    labels[edema] = 2
    labels[necrotic | non_enhancing] = 1
    labels[enhancing] = 4

    # Signal weights: slightly blurred compartments (partial volume at their borders); normal tissue keeps
    # what the tumour leaves.
    blur = 0.6 / sp
    compartments = (("necrosis", necrotic), ("enhancing", enhancing), ("non_enhancing", non_enhancing))
    w = {name: ndi.gaussian_filter(mask.astype(np.float32), blur) * in_brain for name, mask in compartments}
    w["edema"] = ndi.gaussian_filter(edema_frac, blur) * in_brain
    keep = np.clip(1.0 - (w["necrosis"] + w["enhancing"] + w["non_enhancing"] + w["edema"]), 0.0, 1.0)
    return {"box": box, "labels": labels, "keep": keep, "texture": 1.0 + np.float32(0.12) * fine, **w}


def _bias_field(shape: tuple[int, int, int], strength: float, rng: np.random.Generator):
    """exp(smooth random polynomial of degree <= 3), log-std ~ strength over the volume; built separably."""
    if strength <= 0:
        return np.float32(1.0)
    leg = [np.polynomial.legendre.legval(np.linspace(-1, 1, n), np.eye(4)).astype(np.float32) for n in shape]
    field = np.zeros(shape, np.float32)
    coef = rng.normal(0.0, 1.0, (4, 4, 4))
    coef[0, 0, 0] = 0.0
    degree = np.add.outer(np.add.outer(np.arange(4), np.arange(4)), np.arange(4))
    coef[degree > 3] = 0.0
    # Over [-1, 1]^3 the product P_a P_b P_c has mean square 1 / ((2a+1)(2b+1)(2c+1)).
    odd = np.arange(4) * 2 + 1
    mean_sq = 1.0 / np.multiply.outer(np.multiply.outer(odd, odd), odd)
    coef *= strength / math.sqrt(float(np.sum(coef ** 2 * mean_sq)))
    for c in range(4):
        plane = np.einsum("ab,ax,by->xy", coef[:, :, c], leg[0], leg[1]).astype(np.float32)
        field += plane[:, :, None] * leg[2][c][None, None, :]
    return np.exp(field)


# ------------------------------------------------------------------------------------------------ writing

def write_phantom(out: pathlib.Path, cfg: PhantomConfig, progress: bool = True) -> PhantomSummary:
    """Generate every case of `cfg` into `out` (layout in the module docstring); existing files are
    replaced."""
    out = pathlib.Path(out)
    started = time.perf_counter()
    log.info("phantom config: %s", cfg.model_dump_json())
    template = load_template(cfg.shape)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    (out / "NOTICE").write_text(NOTICE_TEXT)

    jobs = []  # (case id, site name, split, folder, profile index, rng stream, index in stream)
    for k, n in enumerate(cfg.cases_per_site):
        for i in range(n):
            name = f"site{k + 1}"
            jobs.append((f"PHANTOM_S{k + 1}_{i:04d}", name, "train", out / name, k, k + 1, i))
    for i in range(cfg.test_cases):
        k = i % cfg.sites  # the pooled test set draws on every site's scanner in turn
        jobs.append((f"PHANTOM_TEST_{i:04d}", f"site{k + 1}", "test", out / "test", k, _TEST_STREAM, i))

    preview: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    rows = []
    bar = tqdm(jobs, desc="phantom cases", unit="case", disable=not progress)
    for case, site, split, folder, k, stream, i in bar:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, stream, i]))
        images, seg = make_case(template, cfg.profiles[k], rng, cfg.shape)
        case_dir = folder / case
        case_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in [*images.items(), ("seg", seg)]:
            _save_nifti(case_dir / f"{case}_{name}.nii.gz", arr, template.affine)
        rows.append((case, site, split))
        if split == "train" and site not in preview:
            z = _tumour_slice(seg)
            preview[site] = ({m: a[:, :, z].copy() for m, a in images.items()}, seg[:, :, z].copy())

    with open(out / "partition.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "site", "split"])
        writer.writerows(rows)
    write_preview(out / "preview.png", preview)

    seconds = time.perf_counter() - started
    summary = PhantomSummary(
        out=out, cases_per_site={f"site{k + 1}": n for k, n in enumerate(cfg.cases_per_site)},
        test_cases=cfg.test_cases, seconds=round(seconds, 2),
        seconds_per_case=round(seconds / max(len(jobs), 1), 2))
    log.info("wrote %d cases to %s in %.1f s", len(jobs), out, seconds)
    return summary


def _tumour_slice(seg: np.ndarray) -> int:
    """Axial slice with the most tumour core (1 or 4), or the most tumour if there is no core."""
    core = np.isin(seg, (1, 4)).sum(axis=(0, 1))
    return int(np.argmax(core if core.any() else (seg > 0).sum(axis=(0, 1))))


def _save_nifti(path: pathlib.Path, arr: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner-anatomical, as BraTS files carry
    img.set_sform(affine, code=1)
    nib.save(img, path)


_SEG_COLOURS = {1: (0.9, 0.15, 0.15), 2: (0.2, 0.8, 0.2), 4: (1.0, 0.85, 0.1)}


def write_preview(path: pathlib.Path, slices: dict[str, tuple[dict[str, np.ndarray], np.ndarray]]) -> None:
    """One row per site: the four modalities and FLAIR with the labels over it, at the slice of most tumour
    core."""
    import matplotlib  # deferred: only the preview needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not slices:
        return
    cols = [*BRATS_MODALITIES, "seg"]
    fig, axes = plt.subplots(len(slices), len(cols), figsize=(2.2 * len(cols), 2.4 * len(slices)),
                             squeeze=False)
    for row, (site, (images, seg)) in enumerate(slices.items()):
        for col, name in enumerate(cols):
            ax = axes[row, col]
            # Array axes are (patient left, posterior): transposed, that is the radiological view.
            base = images["flair" if name == "seg" else name].T
            ax.imshow(base, cmap="gray", vmin=0, vmax=max(float(np.percentile(base, 99.5)), 1e-6))
            if name == "seg":
                rgba = np.zeros((*base.shape, 4), np.float32)
                for label, colour in _SEG_COLOURS.items():
                    rgba[seg.T == label] = (*colour, 0.45)
                ax.imshow(rgba)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(site)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
