"""A white-box audit of a private site's DP-SGD with one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

m gradient canaries are made: each a fixed random direction in the space of the trained discriminator
parameters, with a raw norm far above the clipping bound (the strongest unit a correct implementation still
caps at C). The auditor flips a fair coin per canary to include it in the site's data or not. An included canary
is a unit like a patient: drawn by the site's Poisson sampling at rate q in each DP step, clipped like a patient,
summed before the noise. After the run the auditor, who sees every released noisy sum (white box), scores each
canary by the sum over steps of the release's inner product with its direction, guesses "included" for the k
highest scores and "excluded" for the k lowest, and counts correct guesses.

If the mechanism is (epsilon, 0)-DP per unit, the number of correct guesses among r is stochastically dominated
by Binomial(r, e^eps / (1 + e^eps)) (their Theorem; the delta term, negligible at delta 1e-5 against these
counts, is left out, which makes the bound slightly larger, never smaller). The audit's epsilon is the largest
eps at which the observed count is still in the upper beta tail, with a union bound over the k tried. A correct
mechanism keeps it at or below the ledger's epsilon (with probability 1 - beta); broken clipping lets the
canaries through and sends it above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class GradientCanaries:
    """The canaries of one audit: what PrivateSiteLearner.audit asks for and tells (see the module docstring)."""

    def __init__(self, shapes: list[torch.Size], count: int, rate: float, raw_norm: float, seed: int):
        self.rng = torch.Generator().manual_seed(seed)
        self.shapes = [math.prod(s) for s in shapes]
        d = sum(self.shapes)
        directions = torch.randn(count, d, generator=self.rng)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        self.included = torch.rand(count, generator=self.rng) < 0.5
        self.rate, self.raw_norm = rate, raw_norm
        self.scores = torch.zeros(count)
        self.steps = 0

    def units_this_step(self) -> list[torch.Tensor]:
        """The included canaries drawn this step (Poisson at the site's rate), as [k, numel] per parameter."""
        drawn = self.included & (torch.rand(len(self.included), generator=self.rng) < self.rate)
        rows = self.directions[drawn] * self.raw_norm
        return list(torch.split(rows, self.shapes, dim=1))

    def observe(self, release: torch.Tensor) -> None:
        """One step's released noisy sum over every trained parameter (flattened, before the public division)."""
        self.scores += self.directions @ release.detach().cpu().float()
        self.steps += 1


def _log_binom_tail(r: int, c: int, p: float) -> float:
    """log P[Binomial(r, p) >= c]."""
    if c <= 0:
        return 0.0
    if p <= 0:
        return -math.inf
    terms = [math.lgamma(r + 1) - math.lgamma(i + 1) - math.lgamma(r - i + 1) + i * math.log(p)
             + ((r - i) * math.log1p(-p) if p < 1 else (0.0 if i == r else -math.inf)) for i in range(c, r + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def epsilon_lower_bound(correct: int, guesses: int, beta: float) -> float:
    """The largest eps with P[Binomial(guesses, e^eps/(1+e^eps)) >= correct] <= beta (0 when even eps = 0 fits)."""
    if guesses == 0 or _log_binom_tail(guesses, correct, 0.5) > math.log(beta):
        return 0.0
    lo, hi = 0.0, 50.0
    if _log_binom_tail(guesses, correct, 1 / (1 + math.exp(-hi))) <= math.log(beta):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        p = 1 / (1 + math.exp(-mid))
        lo, hi = (mid, hi) if _log_binom_tail(guesses, correct, p) <= math.log(beta) else (lo, mid)
    return lo


@dataclass
class AuditResult:
    canaries: int
    steps: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    beta: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def conclude(canaries: GradientCanaries, beta: float = 0.05, fractions=(0.05, 0.1, 0.2, 0.5)) -> AuditResult:
    """Guess from the scores with k = fraction x m at each end, keep the best bound (beta split over the k)."""
    order = torch.argsort(canaries.scores, descending=True)
    m = len(order)
    best = AuditResult(m, canaries.steps, 0, 0, 0.0, beta)
    for fraction in fractions:
        k = max(1, int(fraction * m / 2))
        guessed_in, guessed_out = order[:k], order[m - k:]
        correct = int(canaries.included[guessed_in].sum()) + int((~canaries.included[guessed_out]).sum())
        eps = epsilon_lower_bound(correct, 2 * k, beta / len(fractions))
        if eps > best.epsilon_lower_bound or best.guesses == 0:
            best = AuditResult(m, canaries.steps, 2 * k, correct, eps, beta)
    return best


def attach(learner, count: int = 256, raw_norm_factor: float = 100.0, seed: int = 0) -> GradientCanaries:
    """Give a PrivateSiteLearner `count` canaries (raw norm raw_norm_factor x C); returns them for conclude()."""
    canaries = GradientCanaries([p.shape for p in learner.trained], count, learner.sample_rate,
                                raw_norm_factor * learner.privacy.max_grad_norm, seed)
    learner.audit = canaries
    return canaries
