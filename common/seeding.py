"""Seeded construction without touching the process's global random state.

Networks are initialised by PyTorch's default rule for each layer (Kaiming-uniform weights, uniform biases; the
instance norms of the image models start at weight 1, bias 0), drawn from a source seeded with the run's seed,
so that the same seed gives the same weights in every process (a one-process reference can rebuild the server's
generator or a site's discriminators exactly). `seeded` gives that source without reseeding the global one: code
that runs after a constructor sees the global state it had before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws from torch's CPU source inside the block come from `seed`; afterwards it is as it was before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
