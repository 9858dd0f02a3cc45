"""What the trainer talks to, named: the ports of the training loop (central_server/trainer.py).

    SiteLink        one site in a step: its batch goes out, its answer comes back
    SitePool        the sites of the run: who is available, the quorum, removal
    LabelMapStore   the label maps the sites uploaded, by site and key

Two implementations of each: over gRPC (session.SiteSession, registry.SiteRegistry, formats/label_map_bank.LabelMapBank)
and in one process (simulation/local_sites.py: LocalSession, LocalRegistry, CountingBank). The trainer uses
nothing else of them; the type check (tests/test_types.py) shows that both conform.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from asyndgan.common import serde
from asyndgan.central_server.session import SessionStats


@runtime_checkable
class SiteLink(Protocol):
    site_id: str
    channels: list[int] | None  # indices of G's channels this site is sent (None: all)
    num_samples: int  # n_j: the label maps it uploaded
    statistics: dict[str, tuple[float, float]]  # a private site's released statistics (name -> value, noise std)
    stats: SessionStats
    left: str | None  # why it left the run for good, or None

    @property
    def available(self) -> bool:
        """Ready and not still working on an earlier batch."""
        ...

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        ...

    def await_gradient(self, round_: int, shape: tuple[int, ...], deadline: float, keep_late: bool = False
                       ) -> serde.ImageGradient | str:
        """The site's answer for `round_`, or a reason there is none (it missed the deadline, left, ...);
        keep_late: an answer that misses the deadline is kept for take_late."""
        ...

    def take_late(self, round_: int, shape: tuple[int, ...]) -> serde.ImageGradient | str | None:
        """A late answer kept for `round_` once it came; None while it has not; a reason when it will not."""
        ...

    def drop_late(self, round_: int) -> None:
        """No longer keep the late answer for `round_`."""
        ...


@runtime_checkable
class SitePool(Protocol):
    def wait_for_ready(self, n: int, timeout: float) -> list:
        """The available sites (SiteLink) once at least n are, or whatever is available after `timeout`."""
        ...

    def quorum(self, min_sites: int) -> int:
        ...

    def sessions(self) -> list:
        """The connected sites (SiteLink)."""
        ...

    def remove(self, session, reason: str) -> None:
        """Take a site out of the run for good (the guard's decision)."""
        ...

    def bytes_moved(self) -> tuple[int, int]:
        ...


@runtime_checkable
class LabelMapStore(Protocol):
    def size(self, site: str) -> int:
        ...

    def maps(self, site: str, keys: torch.Tensor) -> torch.Tensor:
        """uint8 [len(keys), H, W]."""
        ...

    def state(self) -> str:
        """What a checkpoint records to restore the store (JSON)."""
        ...
