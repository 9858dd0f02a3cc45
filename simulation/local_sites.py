"""Sites in the server's own process: the same SiteWorker as the gRPC agent behind the SiteSession interface.

Used for the single-GAN baselines of the experiments (Syn-All, Syn-Subset) and for quick simulations; the
distributed runs use real site processes over gRPC.
"""

from __future__ import annotations

import pathlib

import torch

from asyndgan.common import serde
from asyndgan.central_server.session import SessionStats
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
from asyndgan.formats.datasets import SiteDataset
from asyndgan.site_agent.worker import SiteWorker


class LocalSession:
    """Duck-types central_server.session.SiteSession for the trainer.

    channels: indices of G's channels this site is sent; by default those of the modalities its dataset holds.
    wire: a wire dtype (float32, float16, bfloat16, q8): batches and answers then go through the same encoding
    and decoding as on the network (serde), so a run in one process sees exactly what the encoding loses;
    `payload` counts the protobuf bytes each way. initial: public discriminator weights to start from."""

    def __init__(self, site_id: str, dataset: SiteDataset, cfg: SiteFacingConfig, channels: list[int] | None = None,
                 device: str = "cpu", privacy: PrivacyConfig | None = None, ledger_path: pathlib.Path | None = None,
                 wire: str | None = None, initial: dict | None = None):
        self.site_id = site_id
        self.wire = wire
        self.payload = [0, 0]  # protobuf bytes up (answers), down (batches)
        self.worker = SiteWorker(cfg, dataset, device, privacy=privacy, ledger_path=ledger_path, site_id=site_id,
                                 initial=initial)
        self.num_samples = self.worker.num_samples
        released = self.worker.statistics
        self.statistics = {} if released is None else released.as_pairs()
        if channels is None:
            channels = self.worker.family.channels_for(cfg.model, self.worker.modalities)
        self.channels = channels
        self.ready = self.available = True
        self.stats = SessionStats()  # the counters a gRPC session keeps (only the guard's are used here)
        self.left: str | None = None
        self._answers: dict[int, serde.ImageGradient] = {}  # round -> answer (computed when the batch is sent)

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        # A wrong shape raises ProtocolError here, as it would in a site process.
        if self.wire is None:
            self._answers[batch.round] = self.worker.answer(batch)
            return
        down = serde.batch_to_proto(batch, self.wire)
        received = serde.batch_from_proto(down.batch, self.wire, self.num_samples, self.worker.stored_size)
        answer = self.worker.answer(received)
        up = serde.gradient_to_proto(answer, self.wire, received.region)
        self.payload[0] += up.ByteSize()
        self.payload[1] += down.ByteSize()
        self._answers[batch.round] = serde.gradient_from_proto(up.gradient, wire_dtype=self.wire,
                                                               shape=tuple(answer.gradient.shape),
                                                               region=batch.region)

    def await_gradient(self, round_: int, shape, deadline: float, keep_late: bool = False):
        answer = self._answers.pop(round_, None)
        self._answers = {r: a for r, a in self._answers.items() if r > round_}  # older ones are never asked for
        return answer if answer is not None else "no answer"

    def take_late(self, round_: int, shape):
        return None  # answers are computed when the batch is sent: never late

    def drop_late(self, round_: int) -> None:
        return None


class LocalRegistry:
    """The registry interface the trainer's loop needs, over a fixed list of local sessions."""

    def __init__(self, sessions: list[LocalSession]):
        self._sessions = sessions

    def wait_for_ready(self, n: int, timeout: float) -> list[LocalSession]:
        return [s for s in self._sessions if s.left is None]

    def remove(self, session: LocalSession, reason: str) -> None:
        session.left = reason
        session.ready = session.available = False

    def quorum(self, min_sites: int) -> int:
        """As the gRPC registry's: train.min_sites less the sites removed from the run, at least one."""
        return max(1, min_sites - sum(s.left is not None for s in self._sessions))

    def sessions(self) -> list[LocalSession]:
        return [s for s in self._sessions if s.left is None]

    def bytes_moved(self) -> tuple[int, int]:
        return 0, 0


class CountingBank:
    """The mask-bank interface the trainer needs, backed by the local datasets."""

    def __init__(self, sessions: list[LocalSession]):
        self._by_id = {s.site_id: s for s in sessions}

    def size(self, site: str) -> int:
        return self._by_id[site].num_samples

    def maps(self, site: str, keys: torch.Tensor) -> torch.Tensor:
        maps = self._by_id[site].worker.label_maps
        if maps is None:
            raise ValueError(f"site {site} holds no label maps (its family uploads none)")
        return maps[keys]

    def state(self) -> str:
        return "{}"  # local sites hold their own data; nothing to restore
