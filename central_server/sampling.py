"""Which of each site's samples go into a step: pure functions of sizes and a random generator.

'balance': every site gets `batch_size` keys, drawn uniformly from its own samples; its gradient is later
weighted by n_j / N. 'uniform': `batch_size` keys are drawn uniformly from all N pooled samples, so a site gets
a batch in proportion to its size (possibly none) and every sample weighs the same.
"""

from __future__ import annotations

import torch


def plan_batches(sizes: dict[str, int], batch_size: int, mode: str, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """site id -> int64 keys [b_j] (sites with no keys this step are left out)."""
    sites = sorted(sizes)
    if mode == "balance":
        return {s: torch.randint(sizes[s], (batch_size,), generator=rng) for s in sites}
    if mode == "uniform":
        counts = torch.tensor([sizes[s] for s in sites])
        offsets = torch.cumsum(counts, 0) - counts
        pooled = torch.randint(int(counts.sum()), (batch_size,), generator=rng)
        owner = torch.bucketize(pooled, torch.cumsum(counts, 0), right=True)
        plan = {}
        for i, s in enumerate(sites):
            keys = pooled[owner == i] - offsets[i]
            if keys.numel():
                plan[s] = keys
        return plan
    raise ValueError(f"unknown sampling mode {mode!r}; choose balance or uniform")
