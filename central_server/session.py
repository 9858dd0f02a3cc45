"""One connected site as the training loop sees it: send a batch, get its gradient or a failure.

The servicer feeds incoming messages to `handle` (join upload, gradients) from the stream's reader thread and
streams `next_message()` out; the training loop calls `send_batch` and `await_gradient`. No gRPC here.

The per-site work stays off the training loop's path where it can: a batch is encoded for the wire by the thread
that streams it (next_message), and an answer is decoded and checked by the thread that reads it, as it arrives,
while the training loop still waits for the other sites.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from asyndgan.common import serde
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.errors import ProtocolError
from asyndgan.formats.label_map_bank import LabelMapUpload, UploadedMaps

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 3  # gradients failing checks (or not asked for) in a row before a site is disconnected
INBOX_SIZE = 4  # the answers to the (at most two) batches outstanding, a stale one, the close marker
_CLOSED = object()


@dataclass(frozen=True)
class _Answer:
    """A site's answer as its reader thread checked it: the decoded gradient, or why it was refused."""

    round: int
    step: int
    result: serde.ImageGradient | str


class State(enum.Enum):
    UPLOADING = "uploading"
    READY = "ready"
    CLOSED = "closed"


@dataclass
class SessionStats:
    joined_at: float = field(default_factory=time.monotonic)
    steps_answered: int = 0
    steps_missed: int = 0
    bad_messages: int = 0
    late_replies: int = 0        # answers that came after their step stopped waiting
    late_applied: int = 0        # of those, the ones still applied (train.late_steps)
    answer_seconds: float = 0.0  # from a batch going out to its answer coming in, averaged over recent steps
    gradients_rejected: int = 0  # answers the server's guard left out (central_server/guard.py)
    rows_clipped: int = 0        # rows of answers it scaled down
    bytes_sent: int = 0
    bytes_received: int = 0
    losses: dict[str, float] = field(default_factory=dict)


class SiteSession:
    def __init__(
        self,
        hello: serde.Hello,
        channels: list[int] | None,
        upload: LabelMapUpload,
        wire_dtype: str,
        on_ready: Callable[["SiteSession", UploadedMaps | None, bool], None],
        max_gradient_bytes: int,
        known_samples: int | None = None,
        depth: int = 1,
    ):
        self.site_id = hello.site_id
        self.num_samples = 0  # known at Ready
        self.retired = False  # its byte counts moved into the registry's totals (registry._retire)
        self.statistics: dict[str, tuple[float, float]] = {}  # a private site's released statistics (at Ready)
        self.modalities = hello.modalities
        self.channels = channels
        self.wire_dtype = wire_dtype
        self.state = State.UPLOADING
        self.failure: str | None = None
        self.left: str | None = None  # the site's reason when it left the run for good (Leave)
        self.privacy = hello.privacy  # as the site reports it; updated with every gradient
        self.stats = SessionStats()
        self.outbox: queue.Queue = queue.Queue()  # ServerMessage, or a SyntheticBatch encoded as it is streamed
        # Holds at most the answer to the one batch outstanding (plus a stale one and the close marker): gradients
        # nobody asked for are counted and dropped in handle(), so a peer cannot fill the server's memory.
        self._inbox: queue.Queue = queue.Queue(maxsize=INBOX_SIZE)
        self.last_activity = time.monotonic()  # last message from the site (the reaper ends stalled uploads)
        self._upload: LabelMapUpload | None = upload  # None once Ready has taken it
        self._on_ready = on_ready
        self._max_gradient_bytes = max_gradient_bytes
        self._regions: dict[int, torch.Tensor | None] = {}  # round -> region of the batches not yet answered
        self._shapes: dict[int, tuple[int, ...]] = {}  # round -> shape of its fakes (and of its answer)
        self._sent_at: dict[int, float] = {}  # round -> when it went out
        self._consecutive_bad = 0
        self._known_samples = known_samples  # the server already holds this site's maps (a reconnect)
        self._depth = depth  # batches the site may hold at once (1 + train.pipeline)
        self._outstanding: list[int] = []  # rounds of the batches the site has not answered yet, oldest first
        self._awaited: set[int] = set()  # rounds the trainer still waits for
        self._late_ok: set[int] = set()  # rounds the trainer gave up on but still takes late (train.late_steps)
        self._late: dict[int, _Answer] = {}  # their answers, once they came
        self._early: dict[int, _Answer] = {}  # answers taken off the inbox before the trainer asked
        self._lock = threading.Lock()

    # ---- called from the transport -------------------------------------------------------------------------
    def handle(self, msg: pb.SiteMessage) -> None:
        """Take one message from the site. Raises ProtocolError for a message that breaks the protocol."""
        self.stats.bytes_received += msg.ByteSize()
        self.last_activity = time.monotonic()
        kind = msg.WhichOneof("kind")
        upload = self._upload  # present exactly while UPLOADING
        if kind == "conditions" and self.state is State.UPLOADING and upload is not None:
            # Decoded with a ceiling (compressed chunks), checked and streamed to the bank's folder by the upload.
            upload.add(serde.label_map_chunk_from_proto(msg.conditions, size=upload.size,
                                                        max_bytes=upload.max_chunk_bytes))
        elif kind == "ready" and self.state is State.UPLOADING and upload is not None:
            ready = serde.ready_from_proto(msg.ready)
            n, chunks = ready.num_samples, ready.num_chunks
            reuse = self._known_samples is not None and chunks == 0
            if reuse and n != self._known_samples:
                raise ProtocolError(f"site now declares {n} samples; the maps it uploaded before hold "
                                    f"{self._known_samples}")
            maps = None if reuse else upload.finish(chunks, n)  # a refused upload leaves no file behind
            if reuse:
                upload.discard()
            self.num_samples = n
            self.statistics = ready.statistics  # checked against what G makes when the trainer uses them
            self._upload = None
            self._on_ready(self, maps, reuse)  # the bank takes the maps, then the registry marks us ready
        elif kind == "gradient" and self.state is State.READY:
            self._take_gradient(msg.gradient)
        elif kind == "leave":
            leave = serde.leave_from_proto(msg.leave)
            self.left, self.privacy = leave.reason or "no reason given", leave.privacy
            log.warning("site %s leaves the run for good: %s", self.site_id, self.left)
            self.close(f"left the run: {self.left}")
        else:
            raise ProtocolError(f"unexpected {kind or 'empty'} message while {self.state.value}")

    def _take_gradient(self, g: pb.ImageGradient) -> None:
        """Keep a gradient only if it answers a batch outstanding and the trainer still waits for it (or, given
        up on, still takes it late)."""
        with self._lock:
            asked = g.round in self._outstanding
            if asked:
                self._outstanding.remove(g.round)  # answered (in time or late): the site may get the next batch
                sent = self._sent_at.pop(g.round, None)
                if sent is not None:
                    took = time.monotonic() - sent
                    s = self.stats
                    s.answer_seconds = took if s.answer_seconds == 0 else 0.7 * s.answer_seconds + 0.3 * took
                wanted = g.round in self._awaited
                late_ok = g.round in self._late_ok
                region, shape = self._regions.pop(g.round, None), self._shapes.pop(g.round, None)
        if not asked:
            self._bad(f"a gradient for round {g.round}, which is not a batch outstanding")
            return
        if not wanted:
            self.stats.late_replies += 1
            if not late_ok:
                log.info("site %s: dropped a late reply (step %d, round %d)", self.site_id, g.step, g.round)
                return
        answer = _Answer(g.round, g.step, self._check(g, shape, region))  # here, not in the training loop
        if wanted:
            self._deliver(answer)
            return
        with self._lock:
            if g.round in self._late_ok:  # still wanted late
                self._late[g.round] = answer

    def _deliver(self, item) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:  # only stale answers can be in the way: the newest item wins
            with contextlib.suppress(queue.Empty):
                self._inbox.get_nowait()
            self._inbox.put_nowait(item)

    def close(self, reason: str, failure: bool = False) -> None:
        """End the session: the stream finishes (with an error status if `failure`)."""
        with self._lock:
            if self.state is State.CLOSED:
                return
            self.state = State.CLOSED
            if failure:
                self.failure = reason
        log.info("site %s left: %s", self.site_id, reason)
        upload = self._upload
        if upload is not None:  # left before Ready: drop the partial upload's temporary file
            upload.discard()
        self._deliver(_CLOSED)
        self.outbox.put(None)

    def mark_ready(self) -> None:
        with self._lock:
            if self.state is State.UPLOADING:
                self.state = State.READY

    def send_shutdown(self, reason: str, final: bool) -> None:
        self._push(serde.shutdown_to_proto(serde.Shutdown(reason=reason, final=final)))
        self.close(reason)

    # ---- called from the training loop --------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def available(self) -> bool:
        """Ready and not still working on an earlier batch. A straggler gets no new batch until it has answered
        the last one (late), so batches never pile up behind a slow or cut-off site."""
        return self.state is State.READY and len(self._outstanding) < self._depth

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        with self._lock:
            self._outstanding.append(batch.round)
            self._awaited.add(batch.round)
            self._regions[batch.round] = batch.region
            self._sent_at[batch.round] = time.monotonic()
            self._shapes[batch.round] = tuple(batch.fake.shape)
        self.outbox.put(batch)  # encoded by the thread that streams it (next_message), not by the training loop

    def next_message(self) -> pb.ServerMessage | None:
        """The next message for the site's stream (blocks); None when the stream is to finish."""
        item = self.outbox.get()
        if isinstance(item, serde.SyntheticBatch):
            item = serde.batch_to_proto(item, self.wire_dtype)
        if item is not None:
            self.stats.bytes_sent += item.ByteSize()
        return item

    def await_gradient(self, round_: int, shape: tuple[int, ...], deadline: float, keep_late: bool = False
                       ) -> serde.ImageGradient | str:
        """The site's checked gradient for `round_`, or a one-line reason why there is none. keep_late: if the
        deadline passes, its answer is kept when it comes (take_late) instead of dropped."""
        while True:
            msg = self._early.pop(round_, None)
            if msg is None:
                try:
                    msg = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    self._give_up(round_, keep_late)
                    return "no answer before the step deadline"
            if msg is _CLOSED:
                self._deliver(_CLOSED)  # stays closed for later calls
                self._give_up(round_, False)
                return "disconnected"
            if msg.round > round_:  # the answer to a later batch (pipelined steps): its step takes it
                self._early = {r: m for r, m in self._early.items() if r in self._awaited}
                self._early[msg.round] = msg
                continue
            if msg.round != round_:
                self.stats.late_replies += 1
                log.info("site %s: dropped a late reply (step %d, round %d; now round %d)", self.site_id,
                         msg.step, msg.round, round_)
                continue
            with self._lock:
                self._awaited.discard(round_)
            return self._accept(msg, shape)

    def take_late(self, round_: int, shape: tuple[int, ...]) -> serde.ImageGradient | str | None:
        """The late answer for a round given up on with keep_late, once it came (then checked like any answer);
        None while it has not; a reason when it will not (the site left)."""
        with self._lock:
            msg = self._late.pop(round_, None)
            if msg is not None:
                self._late_ok.discard(round_)
        if msg is not None:
            return self._accept(msg, shape)
        return "disconnected" if self.state is State.CLOSED else None

    def drop_late(self, round_: int) -> None:
        """No longer take the late answer for this round (it would be too late to apply)."""
        with self._lock:
            self._late_ok.discard(round_)
            self._late.pop(round_, None)
            self._regions.pop(round_, None)
            self._shapes.pop(round_, None)

    def _check(self, msg: pb.ImageGradient, shape: tuple[int, ...] | None, region: torch.Tensor | None
               ) -> serde.ImageGradient | str:
        """Decode and check an answer against its batch (from the reader thread, as it arrives)."""
        if shape is None:
            return "bad gradient: its batch's shape is not known"
        try:
            grad = serde.gradient_from_proto(msg, wire_dtype=self.wire_dtype, shape=shape,
                                             max_bytes=self._max_gradient_bytes, region=region)
        except ProtocolError as exc:
            self._bad(str(exc))
            return f"bad gradient: {exc}"
        self._consecutive_bad = 0
        return grad

    def _accept(self, answer: "_Answer", shape: tuple[int, ...]) -> serde.ImageGradient | str:
        """The checked answer as the training loop takes it (counted here: answers dropped later are not)."""
        grad = answer.result
        if isinstance(grad, str):
            return grad
        if tuple(grad.gradient.shape) != tuple(shape):  # the trainer's own record of the batch disagrees
            return f"bad gradient: shape {tuple(grad.gradient.shape)}, expected {tuple(shape)}"
        self.stats.steps_answered += 1
        self.stats.losses = grad.losses
        if grad.privacy is not None:
            self.privacy = grad.privacy
        return grad

    def _give_up(self, round_: int, keep_late: bool) -> None:
        with self._lock:
            self._awaited.discard(round_)  # its answer, should it come, is late
            if keep_late and round_ in self._outstanding:
                self._late_ok.add(round_)
            elif round_ not in self._outstanding:
                self._regions.pop(round_, None)
                self._shapes.pop(round_, None)
        self.stats.steps_missed += 1

    # ---- internals ----------------------------------------------------------------------------------------
    def _push(self, msg: pb.ServerMessage) -> None:
        self.outbox.put(msg)  # counted in bytes_sent as it is streamed (next_message)

    def _bad(self, reason: str) -> None:
        """Count a gradient that fails the checks or was not asked for (called from the reader and the trainer)."""
        with self._lock:
            self.stats.bad_messages += 1
            self._consecutive_bad += 1
            too_many = self._consecutive_bad >= MAX_CONSECUTIVE_BAD
        log.warning("site %s sent a bad gradient (%s)", self.site_id, reason)
        if too_many:
            self.close(f"{MAX_CONSECUTIVE_BAD} bad gradients in a row (last: {reason})", failure=True)
