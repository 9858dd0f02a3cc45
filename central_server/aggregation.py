"""Where the server combines the sites' gradients: pure functions, no network.

The objective is L = sum_j w_j * L_G_j where L_G_j is site j's mean loss over its batch. Since fake_j is only
used by L_G_j, dL/dfake_j = w_j * g_j, and the generator's update is `fake.backward(gradient=combined)`.
Weights are renormalised over the sites that answered, so a missing site does not shrink the step.

Heterogeneous modalities (multi-modal AsynDGAN): a site that lacks a modality is not sent that channel and
returns no gradient for it (zero there). Each channel's weights are renormalised over the sites that hold it
(`channel_weights`), so a modality held by one small site is learnt at the same rate as one held everywhere,
rather than scaled down by the share of samples at sites that cannot judge it. With every site holding every
channel this is the plain weighting.
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


def channel_weights(results: dict[str, SiteGradient], weights: dict[str, float], num_channels: int
                    ) -> dict[str, torch.Tensor]:
    """Per site, float32 [c_j]: w_j / (sum of w_k over the answering sites k that hold that channel)."""
    held = torch.zeros(num_channels, dtype=torch.float64)
    for site, r in results.items():
        idx = list(range(num_channels)) if r.channels is None else r.channels
        held[idx] += weights[site]
    out = {}
    for site, r in results.items():
        idx = list(range(num_channels)) if r.channels is None else r.channels
        total = held[idx]
        out[site] = torch.where(total > 0, weights[site] / total.clamp_min(1e-300), 0.0).float()
    return out


def combine(results: dict[str, SiteGradient], weights: dict[str, float | torch.Tensor], like: torch.Tensor
            ) -> torch.Tensor:
    """Gradient for the whole fake tensor `like` [B, C, ...]: w_j * g_j in site j's rows and channels, else 0.
    A weight is a number, or one per channel the site holds ([c_j], from `channel_weights`)."""
    out = torch.zeros_like(like)
    for site, r in results.items():
        w = weights[site]
        if isinstance(w, torch.Tensor):  # [c_j] -> broadcast over the batch and the sample's other axes
            w = w.to(device=out.device, dtype=out.dtype).view(1, -1, *([1] * (r.gradient.dim() - 2)))
        g = r.gradient.to(device=out.device, dtype=out.dtype) * w
        if r.channels is None:
            out[r.rows] = g
        else:
            out[r.rows, r.channels] = g
    return out
