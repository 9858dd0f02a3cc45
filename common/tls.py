"""Consortium identities: a CA, a server certificate, one certificate per site, and mutual TLS.

Built on the `cryptography` library (ECDSA P-256 keys, SHA-256 signatures). Layout of a certificate folder:
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
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asyndgan.common.errors import ConfigError

CA_DAYS = 3650
LEAF_DAYS = 825


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: pathlib.Path, key) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # owner-only from the first byte
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: pathlib.Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_cert(path: pathlib.Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"certificate file {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from None


def _load_key(path: pathlib.Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"key file {path} does not exist") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def init_ca(folder: pathlib.Path, name: str = "asyndgan consortium CA", days: int = CA_DAYS) -> pathlib.Path:
    if (folder / "ca.key").exists():
        raise ConfigError(f"{folder / 'ca.key'} already exists; refusing to replace the consortium CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(folder / "ca.key", key)
    _write_cert(folder / "ca.crt", cert)
    return folder / "ca.crt"


def _issue(folder: pathlib.Path, cn: str, sans: list[x509.GeneralName], usage, days: int,
           not_before: dt.datetime | None = None):
    ca_cert, ca_key = load_cert(folder / "ca.crt"), _load_key(folder / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def issue_server(folder: pathlib.Path, hosts: list[str], days: int = LEAF_DAYS) -> pathlib.Path:
    """server.crt/.key for `hosts` (names and IP addresses the sites will dial)."""
    if not hosts:
        raise ConfigError("a server certificate needs at least one host name or address")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key, cert = _issue(folder, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, days)
    _write_key(folder / "server.key", key)
    _write_cert(folder / "server.crt", cert)
    return folder / "server.crt"


def issue_site(folder: pathlib.Path, site: str, days: int = LEAF_DAYS,
               not_before: dt.datetime | None = None) -> pathlib.Path:
    """sites/<site>/ holding ca.crt, site.crt and site.key: the kit a hospital needs."""
    kit = folder / "sites" / site
    key, cert = _issue(folder, site, [x509.DNSName(site)], ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before)
    _write_key(kit / "site.key", key)
    _write_cert(kit / "site.crt", cert)
    (kit / "ca.crt").write_bytes((folder / "ca.crt").read_bytes())
    return kit


def revoke_site(folder: pathlib.Path, site: str) -> int:
    cert = load_cert(folder / "sites" / site / "site.crt")
    with open(folder / "revoked.txt", "a") as f:
        f.write(f"{cert.serial_number:x} {site} {_now().isoformat(timespec='seconds')}\n")
    return cert.serial_number


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
    key = _load_key(key_path)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ConfigError(f"{key_path} is not the private key of {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{cert_path} was not issued by the consortium CA in {ca_path}") from None
    now = _now()
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
