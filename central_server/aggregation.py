"""Where the server combines the sites' gradients: pure functions, no network.

The objective is L = sum_j w_j * L_G_j where L_G_j is site j's mean loss over its batch. Since fake_j is only
used by L_G_j, dL/dfake_j = w_j * g_j, and the generator's update is `fake.backward(gradient=combined)`.
Weights are renormalised over the sites that answered, so a missing site does not shrink the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SiteGradient:
    rows: slice            # this site's rows in the step's concatenated fake tensor
    channels: list[int] | None  # the output channels the site holds (None: all)
    gradient: torch.Tensor  # dL_G_j / dfake_j  [b_j, c_j, ...]
    num_samples: int       # n_j, the site's dataset size
    batch_size: int        # b_j


def site_weights(results: dict[str, SiteGradient], mode: str) -> dict[str, float]:
    """'balance': n_j / sum(n); 'uniform': b_j / sum(b) (each sample equal)."""
    key = (lambda r: r.num_samples) if mode == "balance" else (lambda r: r.batch_size)
    total = sum(key(r) for r in results.values())
    if total <= 0:
        return {s: 0.0 for s in results}
    return {s: key(r) / total for s, r in results.items()}


def combine(results: dict[str, SiteGradient], weights: dict[str, float], like: torch.Tensor) -> torch.Tensor:
    """Gradient for the whole fake tensor `like` [B, C, ...]: w_j * g_j in site j's rows and channels, else 0."""
    out = torch.zeros_like(like)
    for site, r in results.items():
        g = r.gradient.to(device=out.device, dtype=out.dtype) * weights[site]
        if r.channels is None:
            out[r.rows] = g
        else:
            out[r.rows, r.channels] = g
    return out
