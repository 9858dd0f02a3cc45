"""The server's guard on a step's gradients: what one site's answer may do to the generator (train.guard).

Every answer is already checked for form when it is decoded (dtype, shape, finite, zero outside the batch's
region: common/serde.py). Here it is checked for size, because a site that answers with gradients 100 times too
large, pointing at a picture of its choosing, would otherwise steer the generator alone: the combination is a
weighted sum, and Adam normalises whatever it is given. Sites see different fakes, so their gradients cannot be
compared coordinate by coordinate; their sizes can. Per step, with at least two sites answering:

    row RMS      the root mean square of each fake's gradient (one row of a site's answer)
    reference    the lower median, over the answering sites, of each site's median row RMS: with three or more
                 sites one hostile site can neither raise nor lower it past an honest site's
    reject       a site whose median row RMS exceeds reject_factor x reference is left out of the step (counted
                 in its status; rejected in max_rejections of the last `window` steps, it is removed from the run)
    clip         every other row above clip_factor x reference is scaled down to it
    share        no site weighs more than max_share of the combination while others answered (its n_j, i.e. the
                 label maps it uploaded, buys no more), the rest renormalised
    finite       the combined gradient is checked finite before it reaches the generator

So one site's push on the generator is bounded by clip_factor x an honest site's typical size, times its share.
A bounded push in a fixed direction still accumulates over steps: the guard limits how fast a hostile site moves
the generator, and the rejection counter removes the loud ones; `asyndgan bench poisoning` measures both.
With one site there is nothing to compare with: its answers are only checked for form.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from asyndgan.common.config import GuardConfig


@dataclass
class Verdict:
    """What the guard did to one step's answers."""

    accepted: dict = field(default_factory=dict)     # site -> SiteGradient (rows clipped where needed)
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why
    clipped_rows: dict[str, int] = field(default_factory=dict)
    reference: float | None = None


def row_rms(gradient: torch.Tensor) -> torch.Tensor:
    """[b]: the root mean square of each row of a gradient [b, ...]."""
    return gradient.float().flatten(1).pow(2).mean(dim=1).sqrt()


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def check_step(results: dict, cfg: GuardConfig) -> Verdict:
    """The guarded answers of one step (module docstring); `results`: site -> SiteGradient."""
    from dataclasses import replace

    if len(results) < 2:
        return Verdict(accepted=dict(results))
    rms = {site: row_rms(r.gradient) for site, r in results.items()}
    medians = {site: float(v.median()) for site, v in rms.items()}
    reference = lower_median(list(medians.values()))
    if not reference > 0:  # nothing to scale against (e.g. every discriminator saturated this step)
        return Verdict(accepted=dict(results), reference=reference)
    verdict = Verdict(reference=reference)
    for site, r in results.items():
        if cfg.reject_factor > 0 and medians[site] > cfg.reject_factor * reference:
            verdict.rejected[site] = (f"gradient {medians[site] / reference:.3g} x the step's reference size "
                                      f"(limit {cfg.reject_factor:g})")
            continue
        if cfg.clip_factor > 0:
            bound = cfg.clip_factor * reference
            over = rms[site] > bound
            if bool(over.any()):
                scale = torch.where(over, bound / rms[site].clamp_min(1e-30), torch.ones_like(rms[site]))
                r = replace(r, gradient=r.gradient * scale.view(-1, *([1] * (r.gradient.dim() - 1))).to(
                    r.gradient.dtype))
                verdict.clipped_rows[site] = int(over.sum())
        verdict.accepted[site] = r
    return verdict


def cap_shares(weights: dict[str, float], cap: float) -> dict[str, float]:
    """Weights (summing to 1) with none above `cap` when more than one site has weight; the excess is spread
    over the others in proportion to their weights (water-filling). A lone site keeps its whole weight."""
    out = dict(weights)
    positive = [s for s, w in out.items() if w > 0]
    if len(positive) < 2 or cap * len(positive) < 1:
        cap = max(cap, 1.0 / max(1, len(positive)))
    fixed: set[str] = set()
    while True:
        over = [s for s in positive if s not in fixed and out[s] > cap + 1e-12]
        if not over:
            return out
        for s in over:
            out[s] = cap
            fixed.add(s)
        free = [s for s in positive if s not in fixed]
        room = 1.0 - cap * len(fixed)
        total = sum(weights[s] for s in free)
        for s in free:
            out[s] = room * weights[s] / total if total > 0 else room / len(free)


class RejectionLog:
    """Per site, whether each of its last `window` answers was rejected; says when a site must be removed."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self._log: dict[str, deque[bool]] = {}

    def record(self, site: str, rejected: bool) -> bool:
        """Record one answer; True when the site has now been rejected max_rejections times in the window."""
        log = self._log.setdefault(site, deque(maxlen=self.cfg.window))
        log.append(rejected)
        return sum(log) >= self.cfg.max_rejections

    def forget(self, site: str) -> None:
        self._log.pop(site, None)
