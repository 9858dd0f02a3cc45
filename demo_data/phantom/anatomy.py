"""The anatomy every case starts from: the MNI ICBM152 2009a template (read from the nilearn wheel's data files
without importing nilearn), placed in the BraTS 240 x 240 x 155 grid or resampled from it, and each case's
head-size variation."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from asyndgan.demo_data.phantom.config import BRATS_SHAPE, SiteProfile

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


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


def case_anatomy(template: Template, profile: SiteProfile, rng: np.random.Generator):
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

