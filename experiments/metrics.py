"""Distances used to judge generators."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm


def w1_to_gaussian_mixture(samples: np.ndarray, components, weights=None, grid_points: int = 40_001) -> float:
    """1-Wasserstein distance between an empirical sample and a Gaussian mixture: the integral of
    |F_empirical(x) - F_mixture(x)| dx, exact up to the grid (the mixture's CDF is analytic)."""
    samples = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    comps = np.asarray(components, dtype=np.float64)
    w = np.full(len(comps), 1.0 / len(comps)) if weights is None else np.asarray(weights, float) / np.sum(weights)
    lo = min(samples[0], (comps[:, 0] - 12 * comps[:, 1]).min())
    hi = max(samples[-1], (comps[:, 0] + 12 * comps[:, 1]).max())
    x = np.linspace(lo, hi, grid_points)
    f_emp = np.searchsorted(samples, x, side="right") / samples.size
    f_true = (w[None, :] * norm.cdf((x[:, None] - comps[:, 0]) / comps[:, 1])).sum(axis=1)
    return float(np.trapezoid(np.abs(f_emp - f_true), x))
