"""The anatomy every case starts from: the MNI ICBM152 2009a template (read from the nilearn wheel's data files
without importing nilearn), placed in the BraTS 240 x 240 x 155 grid or resampled from it, and each case's own
variation of it: head size, a smooth warp (the patient's own shape and folds) and atrophy (ventricles widened,
cortex thinned)."""

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

    @functools.cached_property
    def junction_seeds(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate metastasis centres: the grey-white junction anywhere in the brain (cerebellum included),
        where blood-borne tumour cells lodge; as tumour_seeds."""
        gm, wm, dist = self.gm[self.crop], self.wm[self.crop], self.dist_mm[self.crop]
        ok = (gm > 0.3) & (wm > 0.3)
        return np.argwhere(ok), dist[ok]

    @functools.cached_property
    def surface_seeds(self) -> tuple[np.ndarray, np.ndarray]:
        """Candidate meningioma attachments: brain voxels up to 3 mm under the surface, away from the skull base
        (above the temporal lobes' floor), where dura covers the convexity and the falx; as tumour_seeds."""
        dist = self.dist_mm[self.crop]
        z_mm = (self.affine @ np.c_[np.zeros((dist.shape[2], 2)), np.arange(dist.shape[2]) + self.crop[2].start,
                                    np.ones(dist.shape[2])].T)[2]
        depth = max(3.0, 1.5 * max(self.spacing))  # at least one voxel deep on coarse grids
        ok = (dist > 0.0) & (dist <= depth) & (z_mm > -10.0)[None, None, :]
        return np.argwhere(ok), dist[ok]

    @functools.cached_property
    def ventricle_field(self) -> tuple[np.ndarray, np.ndarray]:
        """(distance to the ventricles in mm [X, Y, Z], unit vectors away from them [3, X, Y, Z]) on the crop:
        what atrophy widens. The ventricles are the deep CSF (mostly CSF, over 8 mm from the brain surface)."""
        csf, dist = self.csf[self.crop], self.dist_mm[self.crop]
        vent = (csf > 0.5) & (dist > 8.0)
        d = ndi.distance_transform_edt(~vent, sampling=self.spacing).astype(np.float32)
        grad = np.stack(np.gradient(ndi.gaussian_filter(d, 1.0), *self.spacing)).astype(np.float32)
        grad /= np.maximum(np.linalg.norm(grad, axis=0), 1e-3)[None]
        return d, grad


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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: np.ndarray) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise that varies over `cell` voxels: a coarse random grid, linearly
    upsampled (cheap, and smooth enough once thresholded)."""
    coarse = tuple(max(2, int(math.ceil(n / c)) + 1) for n, c in zip(shape, cell))
    g = rng.standard_normal(coarse).astype(np.float32)
    return ndi.zoom(g, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="grid-constant")


# Atrophy: at severity 1 the ventricle walls move out by this much, fading with distance from them, and cortical
# grey matter within a few mm of the surface loses this share (the lost tissue becomes CSF: wider sulci).
ATROPHY_VENTRICLE_MM, ATROPHY_FADE_MM, ATROPHY_CORTEX = 6.0, 15.0, 0.45
WARP_WAVELENGTH_MM = 25.0


def case_anatomy(template: Template, profile: SiteProfile, rng: np.random.Generator):
    """gm, wm, brain (float32, brain is 0/1) on the template crop, scaled per axis about the brain centre (and,
    where the profile asks, warped and atrophied), the scale factors and the atrophy drawn (0 to 1)."""
    crop = template.crop
    gm, wm, brain = template.gm[crop], template.wm[crop], template.brain[crop]
    sd = profile.head_scale_sd
    head_scale = 1.0 + np.clip(rng.normal(0.0, sd, 3), -2.5 * sd, 2.5 * sd) if sd > 0 else np.ones(3)
    head_scale = head_scale * profile.head_scale_mean
    atrophy = float(rng.uniform(*profile.atrophy)) if profile.atrophy[1] > 0 else 0.0
    if profile.deformation_mm > 0 or atrophy > 0:
        return (*_warped_anatomy(template, profile, rng, head_scale, atrophy), head_scale, atrophy)
    if sd == 0 and profile.head_scale_mean == 1.0:
        return gm.copy(), wm.copy(), brain.astype(np.float32), head_scale, 0.0
    centre = (np.asarray(brain.shape) - 1) / 2.0
    inv = 1.0 / head_scale  # output voxel o samples input centre + (o - centre) / scale
    kw = dict(matrix=inv, offset=centre - centre * inv, order=1, mode="constant", cval=0.0)
    brain_f = (ndi.affine_transform(brain.astype(np.float32), **kw) > 0.5).astype(np.float32)
    gm = np.clip(ndi.affine_transform(gm, **kw), 0.0, 1.0) * brain_f
    wm = np.clip(ndi.affine_transform(wm, **kw), 0.0, 1.0) * brain_f
    return gm, wm, brain_f, head_scale, 0.0


def _warped_anatomy(template: Template, profile: SiteProfile, rng: np.random.Generator, head_scale: np.ndarray,
                    atrophy: float):
    """gm, wm, brain through one sampling map: output voxel o takes the template at
    centre + (o - centre) / scale + warp(o) - atrophy shift(o) (all in voxels). The maps are resampled together
    by torch's grid_sample (trilinear), which does in a fraction of a second what four scipy passes take
    seconds for at full size."""
    import torch  # deferred: the phantom's other paths need only numpy and scipy
    import torch.nn.functional as F

    crop, sp = template.crop, np.asarray(template.spacing)
    shape = template.brain[crop].shape
    centre = (np.asarray(shape) - 1) / 2.0
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    coords = [np.float32(centre[a]) + (grids[a] - np.float32(centre[a])) / np.float32(head_scale[a])
              for a in range(3)]
    coords = [np.broadcast_to(c, shape).copy() for c in coords]
    if profile.deformation_mm > 0:
        # A smooth random displacement per axis: unit-variance noise on a coarse grid, trilinearly upsampled.
        cell = np.maximum(WARP_WAVELENGTH_MM / sp, 2.0)
        coarse = tuple(max(2, int(math.ceil(n / c)) + 1) for n, c in zip(shape, cell))
        noise = torch.from_numpy(rng.standard_normal((1, 3, *coarse)).astype(np.float32))
        warp = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0].numpy()
        for a in range(3):
            coords[a] += warp[a] * np.float32(profile.deformation_mm / sp[a])
    if atrophy > 0:
        # Tissue at distance d from the ventricles comes from d - s(d): the ventricles grow by s(0).
        d, away = template.ventricle_field
        shift = np.float32(atrophy * ATROPHY_VENTRICLE_MM) * np.exp(-d / np.float32(ATROPHY_FADE_MM))
        for a in range(3):
            coords[a] -= shift * away[a] / np.float32(sp[a])
    # grid_sample wants (W, H, D) = (our Z, Y, X) coordinates in [-1, 1] (corners aligned).
    grid = np.stack([2.0 * coords[a] / np.float32(shape[a] - 1) - 1.0 for a in (2, 1, 0)], axis=-1)
    maps = np.stack([template.brain[crop].astype(np.float32), template.gm[crop], template.wm[crop],
                     template.dist_mm[crop]])
    out = F.grid_sample(torch.from_numpy(maps)[None], torch.from_numpy(grid)[None], mode="bilinear",
                        padding_mode="zeros", align_corners=True)[0].numpy()
    brain_f = (out[0] > 0.5).astype(np.float32)
    gm = np.clip(out[1], 0.0, 1.0) * brain_f
    wm = np.clip(out[2], 0.0, 1.0) * brain_f
    if atrophy > 0:
        surface = np.exp(-out[3] / np.float32(3.0))  # the warped template's depth under the brain surface
        gm *= 1.0 - np.float32(ATROPHY_CORTEX * atrophy) * surface
    return np.ascontiguousarray(gm), np.ascontiguousarray(wm), brain_f
