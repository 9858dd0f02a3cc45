"""A glioma inserted into one case's anatomy: where it grows, its lobulated core (necrosis and enhancing rim for
high grade, non-enhancing solid tumour for low grade), edema spreading along white matter, the mass effect on
surrounding tissue, and the BraTS labels 1 / 2 / 4."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from asyndgan.demo_data.phantom.anatomy import Template
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


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: np.ndarray) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise that varies over `cell` voxels: a coarse random grid, linearly
    upsampled (cheap, and smooth enough once thresholded)."""
    coarse = tuple(max(2, int(math.ceil(n / c)) + 1) for n, c in zip(shape, cell))
    g = rng.standard_normal(coarse).astype(np.float32)
    return ndi.zoom(g, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="grid-constant")


def insert_tumour(gm, wm, brain, centre, radius, sp, high_grade, profile, rng) -> dict:
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

    fine = smooth_noise(rng, bshape, np.maximum(5.0 / sp, 1.0))  # ~5 mm ragged edges and texture

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

