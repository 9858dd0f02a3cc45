"""Who a connecting site is: its certificate's common name, checked against the id it declares, the
revocation list and the optional list of allowed sites. Called by the servicer with the TLS auth context."""

from __future__ import annotations

import logging
import pathlib

from asyndgan.common import tls
from asyndgan.central_server.registry import JoinRefused

log = logging.getLogger(__name__)


class Authorizer:
    def __init__(self, certs: pathlib.Path | None, allowed_sites: list[str] | None, operators: list[str] | tuple[str, ...] = ()):
        self.certs = certs  # None: --insecure, nobody is authenticated
        self.allowed = set(allowed_sites) if allowed_sites else None
        self.operators = set(operators)

    @property
    def secure(self) -> bool:
        return self.certs is not None

    def check(self, site_id: str, auth_context: dict) -> None:
        """Raise JoinRefused('forbidden', reason) unless this peer may join as `site_id`."""
        if not self.secure:
            return
        name = self._valid_name(auth_context)
        if name != site_id:
            raise JoinRefused("forbidden", f"the certificate is for site {name!r} but the site calls itself "
                                           f"{site_id!r}")
        if self.allowed is not None and name not in self.allowed:
            raise JoinRefused("forbidden", f"site {name!r} is not one of this consortium's allowed sites")

    def check_reader(self, auth_context: dict) -> None:
        """Raise JoinRefused('forbidden', reason) unless this peer may read the server's status: a certificate
        that could join (same CA, not revoked, allowed) or one of the operators'."""
        if not self.secure:
            return
        name = self._valid_name(auth_context)
        if self.allowed is not None and name not in self.allowed and name not in self.operators:
            raise JoinRefused("forbidden", f"{name!r} is neither an allowed site nor an operator")

    def peer_name(self, auth_context: dict) -> str | None:
        """The name on the peer's certificate (None without TLS or certificate); no other check."""
        if not self.secure:
            return None
        cert = tls.peer_certificate(auth_context)
        return None if cert is None else tls.common_name(cert)

    def _valid_name(self, auth_context: dict) -> str:
        """The peer certificate's name, after the checks every caller needs (present, not revoked)."""
        cert = tls.peer_certificate(auth_context)
        if cert is None:
            raise JoinRefused("forbidden", "no client certificate was presented")
        name = tls.common_name(cert)
        # Read at every call, so that revoking takes effect without restarting the server.
        assert self.certs is not None  # a peer certificate exists only with TLS, i.e. with a certs folder
        if cert.serial_number in tls.load_revoked(self.certs / "revoked.txt"):
            raise JoinRefused("forbidden", f"the certificate of {name!r} (serial {cert.serial_number:x}) "
                                           "has been revoked")
        return name
