"""gRPC transport only: turns streams into SiteSession traffic and Status calls into a snapshot.

Train: take one of a fixed number of stream slots (or refuse with RESOURCE_EXHAUSTED), wait a bounded time for
Hello, ask the registry to admit the site (or abort with a status naming why), then a reader thread feeds the
site's messages to its session while this generator streams the session's outbox back. Status answers only
peers that Train would accept (or the consortium's operators).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Callable

import grpc

from asyndgan.common import serde
from asyndgan.formats import public_start
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.config import LimitsConfig
from asyndgan.common.errors import ProtocolError
from asyndgan.central_server.identity import Authorizer
from asyndgan.central_server.registry import JoinRefused, SiteRegistry
from asyndgan.central_server.session import SiteSession

log = logging.getLogger(__name__)

# A site's new stream may overlap the stale one it lost for a moment; more at once from one certificate is not a
# reconnect.
MAX_STREAMS_PER_IDENTITY = 2

_REFUSAL_CODES = {
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "incompatible": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}


class _StreamReader:
    """Reads one stream on its own thread: the first message (Hello) into a hand-off the servicer waits on with a
    deadline, then every later message straight into the session, in order. Reading on a separate thread is what
    lets a silent peer be timed out; the thread ends when the stream does (gRPC wakes a blocked read then)."""

    def __init__(self, request_iterator, peer: str):
        self._it = request_iterator
        self._first: queue.Queue = queue.Queue(maxsize=1)
        self._session: queue.Queue = queue.Queue(maxsize=1)
        threading.Thread(target=self._run, daemon=True, name=f"read-{peer}").start()

    def first(self, timeout: float):
        """The first message, None if the stream ended before one, or raises queue.Empty after `timeout`."""
        return self._first.get(timeout=timeout)

    def attach(self, session: SiteSession | None) -> None:
        """Hand the rest of the stream to `session` (None: stop reading). Call exactly once."""
        self._session.put(session)

    def _run(self) -> None:
        try:
            first = next(self._it)
        except Exception:  # end of stream, a lost connection, or bytes that do not parse
            first = None
        self._first.put(first)
        if first is None:
            return
        session = self._session.get()
        if session is not None:
            _read_site(self._it, session)


class AsynDGANServicer(pb_grpc.AsynDGANServicer):
    def __init__(self, registry: SiteRegistry, welcome: Callable[[bool], serde.Welcome],
                 status: Callable[[], pb.StatusReply], authorizer: Authorizer, limits: LimitsConfig,
                 public_weights: bytes | None = None):
        """public_weights: the public discriminator file every site starts from (sent after Welcome)."""
        self.registry = registry
        self.public_weights = public_weights
        self.authorizer = authorizer
        self.welcome = welcome
        self.status = status
        self.limits = limits
        # Each training stream holds a worker thread for its whole life; past this many, refuse at once so that
        # Status, health and the sites already training keep their threads.
        self._slots = threading.BoundedSemaphore(limits.max_sessions)
        # Under TLS every stream is tied to a certificate from its first byte: one identity may not take many slots.
        self._per_identity: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def Train(self, request_iterator, context):
        if not self._slots.acquire(blocking=False):
            log.warning("refused a stream from %s: %d training connections already open", context.peer(),
                        self.limits.max_sessions)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server already has its maximum of "
                          f"{self.limits.max_sessions} training connections open; try again later")
        identity = self.authorizer.peer_name(context.auth_context())
        try:
            if identity is not None:
                with self._lock:
                    held = self._per_identity[identity]
                    if held < MAX_STREAMS_PER_IDENTITY:
                        self._per_identity[identity] += 1
                if held >= MAX_STREAMS_PER_IDENTITY:
                    identity = None  # nothing taken, nothing to give back
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this certificate already holds "
                                  f"{MAX_STREAMS_PER_IDENTITY} training connections")
            yield from self._train(request_iterator, context)
        finally:
            if identity is not None:
                with self._lock:
                    self._per_identity[identity] -= 1
            self._slots.release()

    def _train(self, request_iterator, context):
        reader = _StreamReader(request_iterator, context.peer())
        session, have_maps = None, False
        try:
            try:
                first = reader.first(timeout=self.limits.hello_timeout_s)
            except queue.Empty:
                log.warning("dropped a stream from %s: no Hello within %g s", context.peer(),
                            self.limits.hello_timeout_s)
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no Hello within {self.limits.hello_timeout_s:g} s")
            if first is None:
                return
            if first.WhichOneof("kind") != "hello":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message on a training stream must be Hello")
            session, have_maps = self._join(first, context)
        finally:
            reader.attach(session)
        context.add_callback(lambda: self.registry.leave(session, "connection closed"))
        yield serde.welcome_to_proto(self.welcome(have_maps))
        if self.public_weights is not None:
            for index, count, data in public_start.pieces(self.public_weights):
                yield pb.ServerMessage(weights=pb.PublicWeights(index=index, count=count, data=data))
        while (msg := session.next_message()) is not None:
            yield msg
        self.registry.leave(session, "stream finished")
        if session.failure:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.failure)

    def _join(self, first: pb.SiteMessage, context) -> tuple[SiteSession, bool]:
        try:
            hello = serde.hello_from_proto(first.hello)
            self.authorizer.check(hello.site_id, context.auth_context())
            # An authenticated site may take over its own stale connection; an unauthenticated one may not.
            session, have_maps = self.registry.join(hello, replace=self.authorizer.secure)
        except JoinRefused as exc:
            log.warning("refused a site from %s: %s", context.peer(), exc)
            context.abort(_REFUSAL_CODES[exc.kind], str(exc))
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return session, have_maps

    def Status(self, request, context):
        try:
            self.authorizer.check_reader(context.auth_context())
        except JoinRefused as exc:
            log.warning("refused a status request from %s: %s", context.peer(), exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        return self.status()


def _read_site(request_iterator, session: SiteSession) -> None:
    try:
        for msg in request_iterator:
            session.handle(msg)
        session.close("site closed its stream")
    except ProtocolError as exc:
        log.warning("site %s broke the protocol: %s", session.site_id, exc)
        session.close(str(exc), failure=True)
    except grpc.RpcError:
        session.close("connection lost")
    except Exception as exc:  # never let one site's bad message take the server down
        log.exception("site %s: unexpected error handling a message", session.site_id)
        session.close(f"server error handling a message: {exc}", failure=True)
