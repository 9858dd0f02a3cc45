"""One patient as one site's scanner sees it: anatomy + tumour -> tissue signals, then the site's receiver gain,
smooth bias field, slice thickness, misregistration between sequences and Rician noise."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage as ndi

from asyndgan.common.config import BRATS_MODALITIES
from asyndgan.demo_data.phantom.anatomy import Template, case_anatomy, load_template
from asyndgan.demo_data.phantom.config import BRATS_SHAPE, SiteProfile
from asyndgan.demo_data.phantom.mr_signal import MODALITY_SCALE, tissue_signals
from asyndgan.demo_data.phantom.tumour import place_lesions

CORE_TISSUES = ("necrosis", "enhancing", "non_enhancing", "meningioma")

@dataclasses.dataclass(frozen=True)
class CaseInfo:
    """What a case was drawn as (written to partition.csv, so results can be broken down by it)."""

    lesion: str  # config.LESION_TYPES; a glioma is reported as low_grade_glioma when it drew low grade
    lesions: int  # how many separate lesions
    atrophy: float
    field_strength_t: float


# Order of precedence when lesions overlap: a voxel takes the label of the most tumour-like lesion there.
_LABEL_RANK = np.array([0, 2, 1, 0, 3], np.uint8)  # label 0, 1 necrotic/non-enhancing, 2 edema, -, 4 enhancing


def make_case(template: Template, profile: SiteProfile, rng: np.random.Generator,
              shape: tuple[int, int, int] = BRATS_SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One patient: ({t1, t1ce, t2, flair}: float32 [X, Y, Z], seg uint8 [X, Y, Z] with labels 0, 1, 2, 4).

    Images are exactly 0 outside the brain mask (skull-stripped) and positive inside it.
    """
    images, seg, _ = make_case_described(template, profile, rng, shape)
    return images, seg


def make_case_described(template: Template, profile: SiteProfile, rng: np.random.Generator,
                        shape: tuple[int, int, int] = BRATS_SHAPE):
    """make_case, and the CaseInfo of what it drew."""
    shape = tuple(int(n) for n in shape)
    if template.shape != shape:
        template = load_template(shape)
    crop, sp = template.crop, np.asarray(template.spacing)
    lesion = _draw_lesion(profile, rng)
    # The original phantom drew a glioma's grade before its anatomy; kept, so that old recipes give the same cases.
    high_grade = bool(rng.random() < profile.high_grade_fraction) if lesion == "glioma" else False

    gm, wm, brain, head_scale, atrophy = case_anatomy(template, profile, rng)
    lesions = place_lesions(template, profile, rng, head_scale, gm, wm, brain, lesion, high_grade)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    for tumour in lesions:
        for tissue in (csf, gm, wm):  # the tumour replaces normal tissue
            tissue[tumour["box"]] *= tumour["keep"]

    timing = profile.contrast_timing
    dose = profile.contrast_dose * float(rng.uniform(*timing))  # injection timing varies between patients
    signals = tissue_signals(dose, profile.field_strength_t)
    scale = float(profile.gain) * np.exp(rng.normal(0.0, 0.05, len(BRATS_MODALITIES)))  # per-session gain
    z_sigma = math.sqrt(max(profile.slice_thickness_mm ** 2 - sp[2] ** 2, 0.0)) / 2.355 / sp[2]
    xy_sigma = [math.sqrt(max(profile.inplane_mm ** 2 - s ** 2, 0.0)) / 2.355 / s for s in sp[:2]]
    brain_idx = np.flatnonzero(brain > 0.5)

    images = {}
    for m, g in zip(BRATS_MODALITIES, scale):
        s = signals[m]
        img = csf * s["csf"] + gm * s["gm"] + wm * s["wm"]  # already reduced where tumour replaces tissue
        for tumour in lesions:
            img[tumour["box"]] += tumour["edema"] * s["edema"] + tumour["texture"] * sum(
                tumour[name] * s[name] for name in CORE_TISSUES if name in tumour)
        img *= bias_field(img.shape, profile.bias_strength, rng)
        img *= np.float32(MODALITY_SCALE[m] * g)
        if max(xy_sigma) > 0.05:
            img = ndi.gaussian_filter(img, (*xy_sigma, 0.0), mode="constant")
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
    for tumour in lesions:
        here = seg_crop[tumour["box"]]
        new = tumour["labels"]
        seg_crop[tumour["box"]] = np.where(_LABEL_RANK[new] > _LABEL_RANK[here], new, here)
    seg[crop] = seg_crop
    reported = "low_grade_glioma" if lesion == "glioma" and not high_grade else lesion
    return images, seg, CaseInfo(reported, len(lesions), round(atrophy, 3), profile.field_strength_t)


def _draw_lesion(profile: SiteProfile, rng: np.random.Generator) -> str:
    """The lesion type of one patient; a profile with one type draws nothing (old recipes stay reproducible)."""
    kinds = list(profile.lesions)
    if len(kinds) == 1:
        return kinds[0]
    p = np.array([profile.lesions[k] for k in kinds], float)
    return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]


def bias_field(shape: tuple[int, int, int], strength: float, rng: np.random.Generator):
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

