"""The site agent's connection and loop: dial the server, join, upload label maps, answer batches.

    Hello -> Welcome(settings) -> open dataset at those settings -> ConditionChunk* -> Ready
    then for each SyntheticBatch: real images for its keys (same crop and flips) -> SiteLearner.step -> ImageGradient

Only label maps (once), gradients w.r.t. synthetic images, scalar losses, the sample count and the modality
list leave the site.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from dataclasses import dataclass, field

import grpc
import torch

from asyndgan.common import serde, tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.conditions import augment
from asyndgan.common.config import SiteConfig
from asyndgan.common.errors import AsynDGANError, ProtocolError
from asyndgan.common.grpc_options import OPTIONS
from asyndgan.site_agent.datasets import SiteDataset, describe_dataset, open_dataset
from asyndgan.site_agent.gradients import SiteLearner

log = logging.getLogger(__name__)


@dataclass
class SiteStats:
    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    losses: dict[str, float] = field(default_factory=dict)


def label_map_chunks(maps: torch.Tensor, chunk_bytes: int):
    """Split uint8 [N, H, W] into ConditionChunk messages of at most ~chunk_bytes each."""
    per_map = max(1, maps[0].numel())
    per_chunk = max(1, chunk_bytes // per_map)
    total = math.ceil(maps.shape[0] / per_chunk)
    for index in range(total):
        first = index * per_chunk
        part = maps[first : first + per_chunk]
        yield pb.SiteMessage(conditions=pb.ConditionChunk(index=index, first_key=first, maps=tensor_codec.encode(part)))


class SiteAgent:
    def __init__(self, cfg: SiteConfig):
        self.cfg = cfg
        self.stats = SiteStats()
        self.dataset: SiteDataset | None = None
        self.learner: SiteLearner | None = None
        self._label_maps: torch.Tensor | None = None
        self._outbox: queue.Queue = queue.Queue()

    def _send(self, msg: pb.SiteMessage) -> None:
        self.stats.bytes_sent += msg.ByteSize()
        self._outbox.put(msg)

    def _requests(self):
        while (msg := self._outbox.get()) is not None:
            yield msg

    def run(self) -> SiteStats:
        """Join and train until the server ends the run. Raises AsynDGANError with a one-line reason."""
        summary = describe_dataset(self.cfg.data, self.cfg.prep)  # a bad path fails here, before any network
        log.info("site %s: %s data (%s layout) in %s, modalities: %s", self.cfg.site_id, summary.family,
                 summary.layout, self.cfg.data, ", ".join(summary.modalities) or "-")
        channel = grpc.insecure_channel(self.cfg.server, options=OPTIONS)
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=self.cfg.connect_timeout_s)
            except grpc.FutureTimeoutError:
                raise AsynDGANError(f"cannot reach the server at {self.cfg.server} "
                                    f"within {self.cfg.connect_timeout_s:g} s") from None
            stub = pb_grpc.AsynDGANStub(channel)
            self._send(serde.hello_to_proto(serde.Hello(
                site_id=self.cfg.site_id, family=summary.family, modalities=summary.modalities)))
            finished = False
            try:
                # Read to the end of the stream even after Shutdown, so the call completes cleanly.
                for msg in stub.Train(self._requests()):
                    self.stats.bytes_received += msg.ByteSize()
                    finished = self._handle(msg) or finished
                if not finished:
                    raise AsynDGANError(f"the server at {self.cfg.server} closed the stream without a reason")
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise AsynDGANError(f"lost the connection to the server at {self.cfg.server}: "
                                        f"{exc.details()}") from None
                raise AsynDGANError(f"the server refused site {self.cfg.site_id}: {exc.details()} "
                                    f"({code.name})") from None
        finally:
            self._outbox.put(None)
            channel.close()
        return self.stats

    def _handle(self, msg: pb.ServerMessage) -> bool:
        """Act on one server message; True once the server has ended the run."""
        kind = msg.WhichOneof("kind")
        if kind == "welcome":
            self._on_welcome(serde.welcome_from_proto(msg.welcome))
        elif kind == "batch":
            self._on_batch(msg.batch)
        elif kind == "shutdown":
            log.info("server ended the run: %s", msg.shutdown.reason)
            self._outbox.put(None)
            return True
        else:
            raise ProtocolError(f"unexpected server message {kind!r}")
        return False

    def _on_welcome(self, welcome: serde.Welcome) -> None:
        self.wire_dtype = welcome.wire_dtype
        self.dataset = open_dataset(self.cfg.data, welcome.site_config, self.cfg.prep)
        self.learner = SiteLearner(welcome.site_config, self.dataset.modalities, self.cfg.device)
        self._label_maps = self.dataset.label_maps()
        chunks = 0
        if self._label_maps is not None:
            for chunk in label_map_chunks(self._label_maps, int(self.cfg.upload_chunk_mb * 1024 * 1024)):
                self._send(chunk)
                chunks += 1
        self._send(pb.SiteMessage(ready=pb.Ready(num_chunks=chunks, num_samples=len(self.dataset))))
        log.info("joined run %s at step %d (wire dtype %s) with %d samples; uploaded %d label-map chunk(s)",
                 welcome.run_id, welcome.step, welcome.wire_dtype, len(self.dataset), chunks)

    def _on_batch(self, msg: pb.SyntheticBatch) -> None:
        if self.learner is None or self.dataset is None:
            raise ProtocolError("server sent a batch before Welcome")
        stored = self._label_maps.shape[-1] if self._label_maps is not None else None
        batch = serde.batch_from_proto(msg, self.wire_dtype, len(self.dataset), stored)
        real = augment(self.dataset.real(batch.keys), batch.aug)
        maps = None
        if self._label_maps is not None:
            maps = augment(self._label_maps[batch.keys], batch.aug)
        if real.shape != batch.fake.shape:
            raise ProtocolError(f"server sent fakes of shape {tuple(batch.fake.shape)} for real samples of "
                                f"shape {tuple(real.shape)}")
        grad, losses = self.learner.step(batch.step, maps, real, batch.fake)
        self._send(serde.gradient_to_proto(serde.ImageGradient(
            step=batch.step, round=batch.round, gradient=grad, losses=losses, num_samples=grad.shape[0]),
            self.wire_dtype))
        self.stats.steps += 1
        self.stats.losses = losses
        if self.stats.steps % 100 == 0:
            log.info("step %d: %s", batch.step, ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))


def run_site(cfg: SiteConfig) -> SiteStats:
    start = time.monotonic()
    stats = SiteAgent(cfg).run()
    log.info("site %s done: %d steps, %.1f MB sent, %.1f MB received in %.0f s", cfg.site_id, stats.steps,
             stats.bytes_sent / 1e6, stats.bytes_received / 1e6, time.monotonic() - start)
    return stats
