"""Lesions inserted into one case's anatomy: where they grow, their lobulated cores, edema spreading along white
matter, the mass effect on surrounding tissue, and the BraTS labels 1 / 2 / 4.

Kinds (`insert_tumour(kind=...)`): a glioma (high grade: necrosis inside an enhancing rim; low grade: solid,
non-enhancing, a faint focus of enhancement at most), a metastasis (small, round, ring-enhancing or solid when
tiny, edema far beyond its size; a patient has several, at the grey-white junction) and a meningioma
(extra-axial: attached at the brain surface, partly outside the brain it pushes in, evenly enhancing, little
edema). `place_lesions` draws a patient's lesions of one type and inserts them all."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from asyndgan.demo_data.phantom.anatomy import Template, smooth_noise
from asyndgan.demo_data.phantom.config import SiteProfile

def tumour_centre(template: Template, profile: SiteProfile, rng: np.random.Generator,
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


def _centre_from(seeds: tuple[np.ndarray, np.ndarray], template: Template, rng: np.random.Generator,
                 head_scale: np.ndarray, min_dist: float, max_dist: float = np.inf) -> np.ndarray:
    """A random seed whose distance to the brain surface is in [min_dist, max_dist], in the scaled crop."""
    idx, dist = seeds
    if dist.size == 0:  # a grid too coarse to hold this kind of seed: anywhere in the cerebral white matter
        idx, dist = template.tumour_seeds
    ok = np.flatnonzero((dist >= min_dist) & (dist <= max_dist))
    if ok.size == 0:  # nothing that deep or that shallow: the seeds nearest to the range
        gap = np.maximum(min_dist - dist, dist - max_dist)
        ok = np.flatnonzero(gap <= gap.min())
    pick = idx[ok[rng.integers(ok.size)]].astype(float)
    centre = (np.asarray(template.brain[template.crop].shape) - 1) / 2.0
    return centre + (pick - centre) * head_scale


def place_lesions(template: Template, profile: SiteProfile, rng: np.random.Generator, head_scale: np.ndarray,
                  gm, wm, brain, lesion: str, high_grade: bool = False) -> list[dict]:
    """A patient's lesions of type `lesion` (config.LESION_TYPES), inserted one after another (gm, wm and, for
    a meningioma, brain change in place); one insert_tumour result per lesion. A glioma's grade is drawn by the
    caller (before the anatomy, as the original phantom drew it)."""
    sp = np.asarray(template.spacing)
    if lesion in ("glioma", "low_grade_glioma"):
        centre, radius = tumour_centre(template, profile, rng, head_scale)
        return [insert_tumour(gm, wm, brain, centre, radius, sp, high_grade, profile, rng)]
    if lesion == "metastases":
        lo, hi = profile.metastasis_count
        out = []
        for _ in range(int(rng.integers(lo, hi + 1))):
            radius = float(rng.uniform(*profile.metastasis_radius_mm))
            centre = _centre_from(template.junction_seeds, template, rng, head_scale, radius + 3.0)
            out.append(insert_tumour(gm, wm, brain, centre, radius, sp, radius >= 3.5, profile, rng,
                                     kind="metastasis"))
        return out
    if lesion == "meningioma":
        radius = float(rng.uniform(*profile.meningioma_radius_mm))
        centre = _centre_from(template.surface_seeds, template, rng, head_scale, 0.0, 3.0)
        return [insert_tumour(gm, wm, brain, centre, radius, sp, False, profile, rng, kind="meningioma")]
    raise ValueError(f"unknown lesion type {lesion!r}")


def insert_tumour(gm, wm, brain, centre, radius, sp, high_grade, profile, rng, kind: str = "glioma") -> dict:
    """Pushes gm / wm away from the tumour (in place; a meningioma also adds itself to `brain`, since it lies
    partly outside it); returns the tumour box (slices into the crop), its labels, the per-compartment signal
    weights there and `keep`, the share of normal tissue left. For a metastasis `high_grade` means a necrotic
    centre inside the ring."""
    if kind == "glioma":
        edema_factor = rng.uniform(1.4, 2.0) if high_grade else rng.uniform(1.15, 1.5)
    elif kind == "metastasis":
        edema_factor = rng.uniform(2.2, 3.8)  # vasogenic edema out of proportion to the lesion
    else:  # meningioma: half show no edema at all
        edema_factor = 1.0 if rng.random() < 0.5 else rng.uniform(1.1, 1.35)
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

    fine = smooth_noise(rng, bshape, np.maximum(5.0 / sp, 1.0))  # ~5 mm ragged edges and texture

    # Core: a randomly oriented ellipsoid, lobulated. phi < 1 is the core. Metastases and meningiomas are
    # rounder and smoother than gliomas.
    axes = rng.uniform(0.75, 1.25, 3) if kind == "glioma" else rng.uniform(0.9, 1.1, 3)
    axes /= np.prod(axes) ** (1 / 3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q = (rot @ np.diag(1.0 / (axes * radius) ** 2) @ rot.T).astype(np.float32)
    rho2 = (q[0, 0] * d[0] ** 2 + q[1, 1] * d[1] ** 2 + q[2, 2] * d[2] ** 2
            + 2 * (q[0, 1] * d[0] * d[1] + q[0, 2] * d[0] * d[2] + q[1, 2] * d[1] * d[2]))
    lobulation = rng.uniform(0.08, 0.2) if kind == "glioma" else rng.uniform(0.02, 0.07)
    phi = np.sqrt(rho2) / (1.0 + lobes(lobulation) + np.float32(0.06) * fine)
    if kind == "meningioma":
        # Extra-axial: the mass occupies the space it pushed the brain out of, inside the skull-stripped volume.
        brain[box] = np.maximum(brain[box], (phi < 1.0).astype(np.float32))
    in_brain = brain[box] > 0.5
    core = (phi < 1.0) & in_brain

    full3 = np.ones((3, 3, 3), bool)
    rim_vox = max(1, int(round(1.0 / float(sp.min()))))
    meningioma = np.zeros_like(core)
    if kind == "meningioma":
        necrotic = np.zeros_like(core)
        enhancing = np.zeros_like(core)
        non_enhancing = np.zeros_like(core)
        meningioma = core
    elif kind == "metastasis" and not high_grade:  # a tiny metastasis enhances solidly
        necrotic = np.zeros_like(core)
        enhancing = core
        non_enhancing = np.zeros_like(core)
    elif high_grade:
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
    if kind != "meningioma" or edema_factor > 1.0:
        edema |= ndi.binary_dilation(core, full3, iterations=rim_vox) & in_brain & ~core
    else:
        edema[:] = False
    edema_frac = np.where(edema, np.clip(0.95 - 0.45 * psi / reach, 0.5, 0.95), 0.0).astype(np.float32)

    labels = np.zeros(bshape, np.uint8)
    labels[edema] = 2
    labels[necrotic | non_enhancing] = 1
    labels[enhancing | meningioma] = 4  # a meningioma is enhancing tumour throughout (BraTS-MEN's label 3)

    # Signal weights: slightly blurred compartments (partial volume at their borders); normal tissue keeps
    # what the tumour leaves.
    blur = 0.6 / sp
    compartments = (("necrosis", necrotic), ("enhancing", enhancing), ("non_enhancing", non_enhancing))
    if kind == "meningioma":
        compartments += (("meningioma", meningioma),)
    w = {name: ndi.gaussian_filter(mask.astype(np.float32), blur) * in_brain for name, mask in compartments}
    w["edema"] = ndi.gaussian_filter(edema_frac, blur) * in_brain
    keep = np.clip(1.0 - sum(w.values()), 0.0, 1.0)
    return {"box": box, "labels": labels, "keep": keep, "texture": 1.0 + np.float32(0.12) * fine, **w}

