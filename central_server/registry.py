"""The connected sites: join checks, the set of sessions, waiting for a quorum, and byte totals.

`join` validates a Hello against the server's settings and either returns a new SiteSession or raises
JoinRefused with a reason (and a kind the transport maps to a status code).
"""

from __future__ import annotations

import logging
import threading
import time

from asyndgan.common import serde
from asyndgan.common.config import ServerConfig
from asyndgan.common.families import get_family
from asyndgan.common.grpc_options import MAX_MESSAGE_BYTES
from asyndgan.common.identifiers import site_id_problem
from asyndgan.formats.label_map_bank import LabelMapBank, UploadedMaps
from asyndgan.central_server.session import SiteSession, State

log = logging.getLogger(__name__)


class JoinRefused(Exception):
    """kind: 'duplicate' | 'incompatible' | 'invalid' | 'forbidden'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class SiteRegistry:
    def __init__(self, cfg: ServerConfig, bank: LabelMapBank):
        self.cfg = cfg
        self.bank = bank
        self._sessions: dict[str, SiteSession] = {}
        self._cond = threading.Condition()
        self.departed_bytes_sent = 0
        self.departed_bytes_received = 0
        self._left: dict[str, SiteSession] = {}  # sites that left for good (Leave) and have not come back
        self._removed: dict[str, str] = {}  # sites the guard removed from this run -> why (refused until restart)

    def join(self, hello: serde.Hello, replace: bool = False) -> tuple[SiteSession, bool]:
        """Admit a site: (its new session, whether the server already holds its label maps).

        replace: an authenticated site whose id is still connected (a stale stream it lost) takes over; without
        authentication a second connection with a connected id is refused."""
        model = self.cfg.site.model
        if hello.protocol_version != serde.PROTOCOL_VERSION:
            raise JoinRefused("incompatible", f"protocol version {hello.protocol_version}; this server speaks "
                                              f"{serde.PROTOCOL_VERSION}")
        problem = site_id_problem(hello.site_id)
        if problem:  # ids end up in file names, logs and status output: one rule everywhere
            raise JoinRefused("invalid", problem)
        with self._cond:
            removed = self._removed.get(hello.site_id)
        if removed is not None:
            raise JoinRefused("forbidden", f"site {hello.site_id} was {removed}; it may join again after the server "
                                           "restarts")
        if hello.family != model.family:
            raise JoinRefused("incompatible", f"site {hello.site_id} holds {hello.family[:32]!r} data but this "
                                              f"server trains {model.family!r}")
        family = get_family(model.family)
        mods = family.modalities(model)
        if mods and (not hello.modalities or len(set(hello.modalities)) != len(hello.modalities)
                     or any(m not in mods for m in hello.modalities)):
            raise JoinRefused("incompatible", f"site {hello.site_id} holds modalities {hello.modalities}; "
                                              f"the server generates {mods}")
        channels = family.channels_for(model, hello.modalities) if mods else None
        size, num_classes = family.stored_size(model), family.num_classes(model)
        upload = self.bank.upload(size, num_classes, max_chunk_bytes=MAX_MESSAGE_BYTES,
                                  max_samples=self.cfg.limits.max_label_maps)  # streams into the bank folder
        have = self.bank.has(hello.site_id, hello.maps_digest)
        session = SiteSession(hello, channels, upload, self.cfg.train.wire_dtype, self._on_ready,
                              max_gradient_bytes=MAX_MESSAGE_BYTES,
                              known_samples=self.bank.size(hello.site_id) if have else None,
                              depth=1 + self.cfg.train.pipeline)
        with self._cond:
            old = self._sessions.get(hello.site_id)
            if old is not None and not replace:
                raise JoinRefused("duplicate", f"site id {hello.site_id!r} is already connected")
            self._sessions[hello.site_id] = session
            self._left.pop(hello.site_id, None)
            if old is not None:
                self._retire(old)
        if old is not None:
            old.close("replaced by a new connection from the same site")
        log.info("site %s connected (modalities %s); %s", hello.site_id, ", ".join(hello.modalities) or "-",
                 "its label maps are already here" if have else "waiting for its label maps")
        return session, have

    def _on_ready(self, session: SiteSession, maps: UploadedMaps | None, reused: bool) -> None:
        if not reused:
            self.bank.add_upload(session.site_id, session.num_samples, maps)
        with self._cond:
            session.mark_ready()  # only now: the trainer may sample a ready site's keys at once
            self._cond.notify_all()
        log.info("site %s is ready (%d samples)", session.site_id, session.num_samples)

    def leave(self, session: SiteSession, reason: str) -> None:
        session.close(reason)
        with self._cond:
            if self._sessions.get(session.site_id) is session:
                del self._sessions[session.site_id]
                self._retire(session)
                if session.left is not None:
                    self._left[session.site_id] = session
            self._cond.notify_all()

    def remove(self, session: SiteSession, reason: str) -> None:
        """Take a site out of the run for good (the guard's decision): its stream ends with the reason, status
        lists it as left, and it cannot rejoin until the server restarts."""
        with self._cond:
            self._removed[session.site_id] = reason
        session.left = reason
        session.close(reason, failure=True)
        self.leave(session, reason)

    def departed(self) -> list[SiteSession]:
        """Sites that left the run for good (their privacy budget spent, or settings they refused)."""
        with self._cond:
            return sorted(self._left.values(), key=lambda s: s.site_id)

    def quorum(self, min_sites: int) -> int:
        """The quorum a step needs: train.min_sites, less the sites that left for good (the run goes on with the
        others), at least one."""
        with self._cond:
            return max(1, min_sites - len(self._left))

    def _retire(self, session: SiteSession) -> None:
        """Keep a departed session's byte counts in the totals (each session is retired once)."""
        if session.retired:
            return
        session.retired = True
        self.departed_bytes_sent += session.stats.bytes_sent
        self.departed_bytes_received += session.stats.bytes_received

    def sessions(self) -> list[SiteSession]:
        with self._cond:
            return sorted(self._sessions.values(), key=lambda s: s.site_id)

    def ready(self) -> list[SiteSession]:
        return [s for s in self.sessions() if s.ready]

    def wait_for_ready(self, n: int, timeout: float) -> list[SiteSession]:
        """Block until at least n sites are available (ready, no batch outstanding) or `timeout` passes;
        returns the available sites."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                ready = [s for s in self._sessions.values() if s.available]
                remaining = end - time.monotonic()
                if len(ready) >= n or remaining <= 0:
                    return sorted(ready, key=lambda s: s.site_id)
                # Joins notify; a straggler's late answer does not, so look again soon.
                self._cond.wait(min(remaining, 0.05))

    def end_stalled_uploads(self, idle_s: float) -> list[str]:
        """Close joining sessions that sent nothing for `idle_s` seconds (their streams then end, freeing the
        threads they held); returns the site ids closed."""
        now = time.monotonic()
        stalled = [s for s in self.sessions() if s.state is State.UPLOADING and now - s.last_activity > idle_s]
        for s in stalled:
            s.close(f"no upload message for {idle_s:g} s while joining", failure=True)
            self.leave(s, "stalled while joining")
        return [s.site_id for s in stalled]

    def bytes_moved(self) -> tuple[int, int]:
        """(sent, received) over every session this server has had."""
        with self._cond:
            sent = self.departed_bytes_sent + sum(s.stats.bytes_sent for s in self._sessions.values())
            recv = self.departed_bytes_received + sum(s.stats.bytes_received for s in self._sessions.values())
        return sent, recv

    def shutdown_all(self, reason: str, final: bool) -> None:
        for s in self.sessions():
            s.send_shutdown(reason, final)
