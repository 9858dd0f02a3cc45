"""Consortium administration: the CA, the server's certificate, site kits and revocation (`asyndgan certs`).

Run by whoever holds the consortium's CA key, never by the server or a site at run time (they use
common/tls.py, which only reads). ECDSA P-256 keys, SHA-256 signatures, via the `cryptography` library; keys
are written owner-only from their first byte. Site names go through the one site-id rule
(common/identifiers.py) before anything is written, because the name becomes a folder under sites/ and the
certificate's identity.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asyndgan.common.errors import ConfigError
from asyndgan.common.identifiers import check_site_id
from asyndgan.common.tls import load_cert, load_key, now_utc

CA_DAYS = 3650
LEAF_DAYS = 825


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


def init_ca(folder: pathlib.Path, name: str = "asyndgan consortium CA", days: int = CA_DAYS) -> pathlib.Path:
    if (folder / "ca.key").exists():
        raise ConfigError(f"{folder / 'ca.key'} already exists; refusing to replace the consortium CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = now_utc()
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
    ca_cert, ca_key = load_cert(folder / "ca.crt"), load_key(folder / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or now_utc() - dt.timedelta(minutes=5)
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
    kit = folder / "sites" / check_site_id(site)  # the id becomes a folder name: no '..', no separators
    key, cert = _issue(folder, site, [x509.DNSName(site)], ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before)
    _write_key(kit / "site.key", key)
    _write_cert(kit / "site.crt", cert)
    (kit / "ca.crt").write_bytes((folder / "ca.crt").read_bytes())
    return kit


def revoke_site(folder: pathlib.Path, site: str) -> int:
    cert = load_cert(folder / "sites" / check_site_id(site) / "site.crt")
    with open(folder / "revoked.txt", "a") as f:
        f.write(f"{cert.serial_number:x} {site} {now_utc().isoformat(timespec='seconds')}\n")
    return cert.serial_number


