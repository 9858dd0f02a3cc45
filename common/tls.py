"""Mutual TLS at run time: what the server and a site need to prove and check identities.

Loading and checking one's own certificate and key (with the reason when something is wrong), gRPC server and
channel credentials, the peer's certificate and the revocation list. Making certificates (the consortium's
administration) is common/pki.py; nothing here writes a key. Layout of a certificate folder:
    ca.crt, ca.key                     the consortium CA (keep ca.key offline; owner-only permissions)
    server.crt, server.key             the server's identity, with its host names and addresses
    sites/<name>/{ca.crt,site.crt,site.key}   one kit per site, to hand to that hospital
    revoked.txt                        serial numbers (hex) of revoked site certificates, one per line
A site's identity is its certificate's common name, and it must equal the site id it declares. Certificates
from another CA, self-signed or expired ones are refused by the TLS handshake itself; an unknown (not
allowed) or revoked site is refused by the server after the handshake, with a reason on both ends.
"""

from __future__ import annotations

import datetime as dt
import pathlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from asyndgan.common.errors import ConfigError


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def load_cert(path: pathlib.Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"certificate file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from None


def load_key(path: pathlib.Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def load_revoked(path: pathlib.Path) -> set[int]:
    if not path.is_file():
        return set()
    serials = set()
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            serials.add(int(line.split()[0], 16))
    return serials


def check_own_certificate(cert_path: pathlib.Path, key_path: pathlib.Path, ca_path: pathlib.Path,
                          expected_name: str | None = None) -> x509.Certificate:
    """Fail early, with the reason, on what the TLS handshake would otherwise reject without one."""
    cert, ca = load_cert(cert_path), load_cert(ca_path)
    key = load_key(key_path)
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ConfigError(f"{key_path} is not the private key of {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{cert_path} was not issued by the consortium CA in {ca_path}") from None
    now = now_utc()
    if cert.not_valid_after_utc < now:
        raise ConfigError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                          "ask the consortium for a new one")
    if cert.not_valid_before_utc > now:
        raise ConfigError(f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if expected_name is not None and common_name(cert) != expected_name:
        raise ConfigError(f"{cert_path} is the certificate of {common_name(cert)!r}, not of {expected_name!r}")
    return cert


def server_credentials(folder: pathlib.Path):
    import grpc

    check_own_certificate(folder / "server.crt", folder / "server.key", folder / "ca.crt")
    return grpc.ssl_server_credentials(
        [((folder / "server.key").read_bytes(), (folder / "server.crt").read_bytes())],
        root_certificates=(folder / "ca.crt").read_bytes(), require_client_auth=True)


def channel_credentials(kit: pathlib.Path, site_id: str | None = None):
    """Credentials from a kit folder (ca.crt, site.crt, site.key); with site_id, the certificate must be its."""
    import grpc

    missing = [n for n in ("ca.crt", "site.crt", "site.key") if not (kit / n).is_file()]
    if missing:
        raise ConfigError(f"no TLS kit in {kit} (missing {', '.join(missing)}): ask the consortium for one "
                          "(`asyndgan certs issue --site NAME` makes it), or pass --insecure for a local test")
    check_own_certificate(kit / "site.crt", kit / "site.key", kit / "ca.crt", expected_name=site_id)
    return grpc.ssl_channel_credentials(root_certificates=(kit / "ca.crt").read_bytes(),
                                        private_key=(kit / "site.key").read_bytes(),
                                        certificate_chain=(kit / "site.crt").read_bytes())


def open_channel(address: str, kit: pathlib.Path | None, site_id: str | None = None):
    """A gRPC channel to `address`: mutual TLS with the kit, or plain text when kit is None."""
    import grpc

    from asyndgan.common.grpc_options import OPTIONS

    if kit is None:
        return grpc.insecure_channel(address, options=OPTIONS)
    return grpc.secure_channel(address, channel_credentials(kit, site_id), options=OPTIONS)


def peer_certificate(auth_context: dict) -> x509.Certificate | None:
    pem = auth_context.get("x509_pem_cert")
    return x509.load_pem_x509_certificate(pem[0]) if pem else None
