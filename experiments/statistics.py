"""Paired comparisons of two rows of an experiment on the same test patients: the mean per-patient difference
with a 95% t-interval (each patient's value first averaged over seeds by the caller)."""

from __future__ import annotations

import math

import numpy as np


def paired(a: dict[str, float], b: dict[str, float]) -> dict:
    """Mean of a - b over the patients both have, with a 95% t-interval: {mean, low, high, patients}; the
    interval is NaN with a single patient."""
    from scipy import stats

    cases = sorted(set(a) & set(b))
    d = np.array([a[c] - b[c] for c in cases])
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half),
            "patients": len(d)}
