"""Sites in the server's own process: the same SiteLearner behind the SiteSession interface, no network.

Used for the single-GAN baselines of the experiments (Syn-All, Syn-Subset) and for quick simulations; the
distributed runs use real site processes over gRPC.
"""

from __future__ import annotations

import torch

from asyndgan.common import serde
from asyndgan.common.conditions import augment
from asyndgan.common.config import SiteFacingConfig
from asyndgan.site_agent.datasets import SiteDataset
from asyndgan.site_agent.gradients import SiteLearner


class LocalSession:
    """Duck-types central_server.session.SiteSession for the trainer."""

    def __init__(self, site_id: str, dataset: SiteDataset, cfg: SiteFacingConfig, channels: list[int] | None = None):
        self.site_id = site_id
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.channels = channels
        self.ready = self.available = True
        self.learner = SiteLearner(cfg, dataset.modalities)
        self._maps = dataset.label_maps()
        self._answer: serde.ImageGradient | None = None

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        real = augment(self.dataset.real(batch.keys), batch.aug)
        maps = None if self._maps is None else augment(self._maps[batch.keys], batch.aug)
        grad, losses = self.learner.step(batch.step, maps, real, batch.fake.float())
        self._answer = serde.ImageGradient(batch.step, batch.round, grad, losses, grad.shape[0])

    def await_gradient(self, round_: int, shape, deadline: float):
        answer, self._answer = self._answer, None
        return answer if answer is not None and answer.round == round_ else "no answer"


class LocalRegistry:
    """The registry interface the trainer's loop needs, over a fixed list of local sessions."""

    def __init__(self, sessions: list[LocalSession]):
        self._sessions = sessions

    def wait_for_ready(self, n: int, timeout: float) -> list[LocalSession]:
        return list(self._sessions)

    def bytes_moved(self) -> tuple[int, int]:
        return 0, 0


class CountingBank:
    """The mask-bank interface the trainer needs, backed by the local datasets."""

    def __init__(self, sessions: list[LocalSession]):
        self._by_id = {s.site_id: s for s in sessions}

    def size(self, site: str) -> int:
        return self._by_id[site].num_samples

    def maps(self, site: str, keys: torch.Tensor) -> torch.Tensor:
        return self._by_id[site]._maps[keys]

    def state(self) -> str:
        return "{}"  # local sites hold their own data; nothing to restore
