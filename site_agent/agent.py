"""The site agent's connection and loop: dial the server, join, upload label maps, answer batches.

    Hello -> Welcome(settings) -> open dataset at those settings -> ConditionChunk* -> Ready
    then for each SyntheticBatch: SiteWorker.answer (site_agent/worker.py) -> ImageGradient

This module keeps the connection, reconnects and the protocol; what a site computes is the worker's.

Only label maps (once), gradients w.r.t. synthetic images, scalar losses, the sample count and the modality
list leave the site.
"""

from __future__ import annotations

import logging
import math
import pathlib
import queue
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch

from asyndgan.common import serde, tls
from asyndgan.formats import public_start
from asyndgan.common.atomic import atomic_write
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.config import SiteConfig, SiteFacingConfig
from asyndgan.common.errors import AsynDGANError, ConfigError, PrivacyBudgetExhausted, ProtocolError
from asyndgan.site_agent import privacy, state
from asyndgan.formats.datasets import SiteDataset, describe_dataset, open_dataset
from asyndgan.site_agent.worker import SiteWorker

log = logging.getLogger(__name__)


@dataclass
class SiteStats:
    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    losses: dict[str, float] = field(default_factory=dict)


def _maps_per_chunk(maps: torch.Tensor, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, maps[0].numel()))


def label_map_chunk_count(maps: torch.Tensor, chunk_bytes: int) -> int:
    """How many messages label_map_chunks yields (Ready declares it; known before any chunk is made)."""
    return math.ceil(maps.shape[0] / _maps_per_chunk(maps, chunk_bytes))


def label_map_chunks(maps: torch.Tensor, chunk_bytes: int, encoding: str = "zlib") -> Iterator[pb.SiteMessage]:
    """ConditionChunk messages of at most ~chunk_bytes of uint8 [N, H, W] maps each (before compression), made
    lazily: each slice of a memory-mapped `maps` is read and compressed only when the stream asks for it, so the
    site never holds its whole upload in memory."""
    per_chunk = _maps_per_chunk(maps, chunk_bytes)
    for index in range(label_map_chunk_count(maps, chunk_bytes)):
        first = index * per_chunk
        chunk = serde.LabelMapChunk(index=index, first_key=first, maps=maps[first : first + per_chunk])
        yield serde.label_map_chunk_to_proto(chunk, encoding)


class _Left(Exception):
    """This site left the run for good and told the server why (Leave). budget: its privacy budget is spent."""

    def __init__(self, message: str, budget: bool):
        super().__init__(message)
        self.budget = budget


def retry_delay(cfg: SiteConfig, attempt: int, busy: bool) -> float:
    """Seconds before try `attempt` + 1: a lost or unreachable server backs off by doubling (backoff_s), a full one
    is tried again soon (busy_backoff_s, growing by half); both jittered so that sites do not arrive together."""
    first, cap = cfg.busy_backoff_s if busy else cfg.backoff_s
    return min(cap, first * (1.5 if busy else 2.0) ** attempt) * random.uniform(0.5, 1.0)


class _Retry(Exception):
    """The connection was lost (or could not be made) in a way that reconnecting may fix. busy: the server is
    up but has no room for another connection right now (worth waiting for even before the first join)."""

    def __init__(self, message: str, busy: bool = False):
        super().__init__(message)
        self.busy = busy


# Status codes after which a reconnect may succeed; the others (refusals, protocol errors) are final.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED}


def _unreachable(cfg: SiteConfig) -> str:
    """Why the channel never became ready: nothing listening, or a TLS handshake that failed."""
    host, _, port = cfg.server.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError:
        return f"cannot reach the server at {cfg.server} within {cfg.connect_timeout_s:g} s"
    if cfg.insecure:
        return f"the server at {cfg.server} does not answer gRPC in plain text (does it require TLS?)"
    return (f"reached {cfg.server} but the TLS handshake failed: the server's certificate must come from this "
            "site's consortium CA and name the address dialled, and the server must accept this site's "
            "certificate (not expired, same CA)")


class SiteAgent:
    def __init__(self, cfg: SiteConfig, channel_factory=None):
        self.cfg = cfg
        self.stats = SiteStats()
        self.worker: SiteWorker | None = None
        self.dataset: SiteDataset | None = None
        self._label_maps: torch.Tensor | None = None
        self._maps_digest = ""
        self._site_config: SiteFacingConfig | None = None
        self._last_step = 0
        self._joined_once = False
        self._outbox: queue.Queue = queue.Queue()
        self._leaving: _Left | None = None
        self._pending: tuple[serde.Welcome, list[bytes]] | None = None  # a Welcome waiting for public weights
        self._ledger_path = None
        if cfg.privacy.enabled:
            self._ledger_path = privacy.ledger_path(cfg.state_dir, cfg.site_id)
            self._privacy_status()  # a damaged ledger stops the site here, before any network
        else:
            log.warning("privacy is OFF for site %s: the gradients it returns are not protected and let the server "
                        "reconstruct its images (docs/privacy.md, 'What the gradients reveal')", cfg.site_id)
        if cfg.insecure:
            log.warning("connecting WITHOUT TLS (--insecure): for local tests only")
            kit = None
        else:
            kit = cfg.certs or pathlib.Path("certs") / "sites" / cfg.site_id
            tls.channel_credentials(kit, cfg.site_id)  # a missing, expired or foreign certificate fails here
        self._channel_factory = channel_factory or (lambda: tls.open_channel(cfg.server, kit, cfg.site_id))

    def _send(self, msg: pb.SiteMessage | Iterator[pb.SiteMessage]) -> None:
        """Queue a message, or an iterator of messages that the stream drains lazily (the label-map upload)."""
        self._outbox.put(msg)

    def _requests(self, outbox: queue.Queue):
        """The gRPC request iterator: gRPC pulls the next message only once the previous one went out, so an
        iterator in the queue (the upload) is read, and its chunks made, at the pace of the stream."""
        while (item := outbox.get()) is not None:
            for msg in (item,) if isinstance(item, pb.SiteMessage) else item:
                self.stats.bytes_sent += msg.ByteSize()
                yield msg

    def run(self) -> SiteStats:
        """Join and train until the server ends the run; reconnect with backoff after losing a server it had
        joined. Raises AsynDGANError with a one-line reason."""
        summary = describe_dataset(self.cfg.data, self.cfg.prep)  # a bad path fails here, before any network
        log.info("site %s: %s data (%s layout) in %s, modalities: %s", self.cfg.site_id, summary.family,
                 summary.layout, self.cfg.data, ", ".join(summary.modalities) or "-")
        attempt, busy, give_up_at = 0, 0, None
        try:
            while True:
                try:
                    self._connect_once(summary)
                    return self.stats
                except _Left as exc:
                    if exc.budget:  # the site did its part; not an error a restart policy should retry
                        log.warning("%s", exc)
                        return self.stats
                    raise AsynDGANError(str(exc)) from None
                except _Retry as exc:
                    if not self._joined_once and not exc.busy:
                        raise AsynDGANError(str(exc)) from None
                    now = time.monotonic()
                    if give_up_at is None or self._joined_recently:
                        attempt, busy, give_up_at = 0, 0, now + self.cfg.reconnect_for_s
                        self._joined_recently = False
                    if now >= give_up_at:
                        raise AsynDGANError(f"{exc}; gave up reconnecting after "
                                            f"{self.cfg.reconnect_for_s:g} s") from None
                    delay = retry_delay(self.cfg, busy if exc.busy else attempt, exc.busy)
                    log.warning("%s; reconnecting in %.1f s", exc, delay)
                    time.sleep(delay)
                    if exc.busy:
                        busy += 1
                    else:
                        attempt, busy = attempt + 1, 0
        finally:
            self._save_state()

    def _connect_once(self, summary) -> None:
        """One connection: returns when the server ends the run; raises _Retry or AsynDGANError otherwise."""
        self._outbox = outbox = queue.Queue[pb.SiteMessage | None]()
        self._joined_recently = False
        self._pending = None  # public-weight pieces of a lost connection are not continued on a new one
        channel = self._channel_factory()
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=self.cfg.connect_timeout_s)
            except grpc.FutureTimeoutError:
                raise _Retry(_unreachable(self.cfg)) from None
            stub = pb_grpc.AsynDGANStub(channel)
            self._send(serde.hello_to_proto(serde.Hello(
                site_id=self.cfg.site_id, family=summary.family, modalities=summary.modalities,
                maps_digest=self._maps_digest, privacy=self._privacy_status())))
            finished = False
            try:
                # Read to the end of the stream even after Shutdown, so the call completes cleanly.
                for msg in stub.Train(self._requests(outbox)):
                    self.stats.bytes_received += msg.ByteSize()
                    finished = self._handle(msg) or finished
            except grpc.RpcError as exc:
                if self._leaving is not None:
                    raise self._leaving from None
                code = exc.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "training connections" in (exc.details() or ""):
                    raise _Retry(f"the server at {self.cfg.server} is full: {exc.details()}", busy=True) from None
                if code in _RETRYABLE:
                    raise _Retry(f"lost the connection to the server at {self.cfg.server}: {exc.details()}") from None
                if code == grpc.StatusCode.ALREADY_EXISTS and self._joined_once:
                    # Our previous stream is still registered until the server notices it is dead.
                    raise _Retry(f"the server still holds this site's previous connection ({exc.details()})") from None
                raise AsynDGANError(f"the server refused site {self.cfg.site_id}: {exc.details()} "
                                    f"({code.name})") from None
            if self._leaving is not None:
                raise self._leaving
            if not finished:
                raise _Retry(f"the server at {self.cfg.server} closed the stream without a reason")
        finally:
            outbox.put(None)
            channel.close()

    def _handle(self, msg: pb.ServerMessage) -> bool:
        """Act on one server message; True once the server has ended the run."""
        kind = msg.WhichOneof("kind")
        if self._leaving is not None and kind != "shutdown":
            return False  # we told the server we are leaving: nothing more to answer
        if kind == "welcome":
            self._on_welcome(serde.welcome_from_proto(msg.welcome))
        elif kind == "weights":
            self._on_weights(msg.weights)
        elif kind == "batch":
            self._on_batch(msg.batch)
        elif kind == "shutdown":
            shutdown = serde.shutdown_from_proto(msg.shutdown)
            self._outbox.put(None)
            if not shutdown.final:
                raise _Retry(f"the server is stopping ({shutdown.reason})")
            log.info("server ended the run: %s", shutdown.reason)
            return True
        else:
            raise ProtocolError(f"unexpected server message {kind!r}")
        return False

    def _public_file(self, sha: str) -> pathlib.Path:
        return self.cfg.state_dir / "public" / f"{sha}.safetensors"

    def _public_weights(self, sha: str | None) -> dict | None:
        """The public discriminator weights with digest `sha`, from this site's copy (None: none kept yet)."""
        if sha is None:
            return None
        path = self._public_file(sha)
        if not path.is_file():
            return None
        try:
            return public_start.weights_from_bytes(path.read_bytes(), sha)
        except (OSError, ProtocolError) as exc:
            log.warning("the kept public weights %s cannot be used (%s); taking the server's copy", path, exc)
            return None

    def _on_weights(self, msg: pb.PublicWeights) -> None:
        """A piece of the public discriminator file (after Welcome); the last one completes the join."""
        if self._pending is None:
            return  # this site keeps the file from an earlier join
        welcome, pieces = self._pending
        if msg.index != len(pieces) or msg.count <= msg.index or msg.count > public_start.MAX_PIECES or \
                len(msg.data) > public_start.PIECE_BYTES:
            raise ProtocolError(f"public weights piece {msg.index} of {msg.count} ({len(msg.data)} bytes) after "
                                f"{len(pieces)} pieces: out of order or over the limits ({public_start.MAX_PIECES} "
                                f"pieces of {public_start.PIECE_BYTES} bytes)")
        pieces.append(bytes(msg.data))
        if len(pieces) < msg.count:
            return
        sha = welcome.site_config.public_start
        if sha is None:
            raise ProtocolError("the server sent public weights without announcing their digest in Welcome")
        data = b"".join(pieces)
        public_start.weights_from_bytes(data, sha)  # checks the digest before the file is kept
        atomic_write(self._public_file(sha), lambda f: f.write(data))
        self._pending = None
        log.info("received the public discriminator weights (%.1f MB, SHA-256 %s... verified)", len(data) / 1e6,
                 sha[:16])
        self._on_welcome(welcome)

    def _on_welcome(self, welcome: serde.Welcome) -> None:
        self.wire_dtype = welcome.wire_dtype
        self._joined_once = self._joined_recently = True
        if welcome.site_config != self._site_config:  # first join, or the server's settings changed
            sha = welcome.site_config.public_start
            initial = None
            if sha is not None:
                initial = self._public_weights(sha)
                if initial is None:  # wait for the pieces that follow Welcome
                    self._pending = (welcome, [])
                    return
            self._save_state()
            dataset = open_dataset(self.cfg.data, welcome.site_config, self.cfg.prep)
            try:
                self.worker = SiteWorker(welcome.site_config, dataset, self.cfg.device, privacy=self.cfg.privacy,
                                         ledger_path=self._ledger_path, site_id=self.cfg.site_id,
                                         start_step=welcome.step, initial=initial)
            except (ConfigError, PrivacyBudgetExhausted) as exc:  # settings it refuses, or no budget left
                self._leave(str(exc), budget=isinstance(exc, PrivacyBudgetExhausted))
                return
            self.dataset, self._label_maps = dataset, self.worker.label_maps
            self._maps_digest = self.worker.maps_digest
            self._site_config = welcome.site_config
            self.worker.restore_state(self._state_file)
        worker, held = self.worker, self.dataset
        assert worker is not None and held is not None  # made at the first Welcome, kept for later ones
        chunks = 0
        if self._label_maps is not None and not welcome.have_maps:
            chunk_bytes = int(self.cfg.upload_chunk_mb * 1024 * 1024)
            chunks = label_map_chunk_count(self._label_maps, chunk_bytes)
            self._send(label_map_chunks(self._label_maps, chunk_bytes))  # lazy: made as the stream pulls
        released = worker.statistics
        stats = {} if released is None else released.as_pairs()
        self._send(serde.ready_to_proto(serde.Ready(num_chunks=chunks, num_samples=len(held),
                                                    statistics=stats)))
        log.info("joined run %s at step %d (wire %s, %s) with %d samples; %s", welcome.run_id, welcome.step,
                 welcome.wire_dtype, "brain region only" if welcome.wire_region == "brain" else "every pixel",
                 len(held),
                 "the server already holds our label maps" if welcome.have_maps and self._label_maps is not None
                 else f"uploading {chunks} label-map chunk(s)")

    def _privacy_status(self, exhausted: bool = False) -> serde.PrivacyStatus:
        if self._ledger_path is None:
            return serde.PrivacyStatus()
        return privacy.PrivacyLedger(self._ledger_path, self.cfg.site_id, self.cfg.privacy).status(exhausted)

    def _leave(self, reason: str, budget: bool) -> None:
        """Tell the server this site stops for good (and why), end our side of the stream, and stop answering."""
        log.warning("site %s leaves the run: %s", self.cfg.site_id, reason)
        self._send(serde.leave_to_proto(serde.Leave(reason=reason, privacy=self._privacy_status(budget))))
        self._outbox.put(None)
        self._leaving = _Left(reason, budget)

    @property
    def _state_file(self):
        return state.state_path(self.cfg.state_dir, self.cfg.site_id)

    def _save_state(self) -> None:
        if self.worker is not None:
            try:
                self.worker.save_state(self._state_file, self._last_step)
            except OSError as exc:
                log.warning("cannot save discriminator state to %s: %s", self._state_file, exc)

    def _on_batch(self, msg: pb.SyntheticBatch) -> None:
        if self.worker is None:
            raise ProtocolError("server sent a batch before Welcome")
        batch = serde.batch_from_proto(msg, self.wire_dtype, self.worker.num_samples, self.worker.stored_size)
        try:
            answer = self.worker.answer(batch)  # checks the fakes' shape against this site's samples
        except PrivacyBudgetExhausted as exc:
            self._leave(str(exc), budget=True)
            return
        losses = answer.losses
        self._send(serde.gradient_to_proto(answer, self.wire_dtype, batch.region))
        self.stats.steps += 1
        self.stats.losses = losses
        self._last_step = batch.step
        if self.stats.steps % self.cfg.save_every == 0:
            self._save_state()
        if self.stats.steps % 100 == 0:
            log.info("step %d: %s", batch.step, ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))


def run_site(cfg: SiteConfig) -> SiteStats:
    start = time.monotonic()
    stats = SiteAgent(cfg).run()
    log.info("site %s done: %d steps, %.1f MB sent, %.1f MB received in %.0f s", cfg.site_id, stats.steps,
             stats.bytes_sent / 1e6, stats.bytes_received / 1e6, time.monotonic() - start)
    return stats
