"""gRPC transport only: turns streams into SiteSession traffic and Status calls into a snapshot.

Train: read Hello, ask the registry to admit the site (or abort with a status naming why), then a reader
thread feeds the site's messages to its session while this generator streams the session's outbox back.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc

from asyndgan.common import serde
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.errors import ProtocolError
from asyndgan.central_server.identity import Authorizer
from asyndgan.central_server.registry import JoinRefused, SiteRegistry
from asyndgan.central_server.session import SiteSession

log = logging.getLogger(__name__)

_REFUSAL_CODES = {
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "incompatible": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
}


class AsynDGANServicer(pb_grpc.AsynDGANServicer):
    def __init__(self, registry: SiteRegistry, welcome: Callable[[bool], serde.Welcome],
                 status: Callable[[], pb.StatusReply], authorizer: Authorizer):
        self.registry = registry
        self.authorizer = authorizer
        self.welcome = welcome
        self.status = status

    def Train(self, request_iterator, context):
        try:
            first = next(request_iterator)
        except (StopIteration, grpc.RpcError):
            return
        if first.WhichOneof("kind") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message on a training stream must be Hello")
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
        context.add_callback(lambda: self.registry.leave(session, "connection closed"))
        threading.Thread(target=_read_site, args=(request_iterator, session), daemon=True,
                         name=f"read-{session.site_id}").start()
        yield serde.welcome_to_proto(self.welcome(have_maps))
        while (msg := session.outbox.get()) is not None:
            yield msg
        self.registry.leave(session, "stream finished")
        if session.failure:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.failure)

    def Status(self, request, context):
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
