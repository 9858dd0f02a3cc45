"""Identities: certificates made by `asyndgan certs`, mutual TLS between real processes, and every way a site
can be refused (no certificate, another CA, another site's certificate, expired, revoked, not allowed)."""

from __future__ import annotations

import datetime as dt
import queue
import stat

import grpc
import pytest
from cryptography import x509

from asyndgan.common import pki, tls
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.errors import ConfigError
from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, run_cli, start_site

SITE = ["asyndgan.site_agent.cli", "join"]


@pytest.fixture
def consortium(tmp_path):
    certs = tmp_path / "certs"
    for args in (["init"], ["issue", "--server", "localhost", "--server", "127.0.0.1", "--site", "a", "--site", "b"]):
        r = run_cli(["asyndgan.cli.main", "certs", *args, "--dir", str(certs)])
        assert r.returncode == 0, r.stderr
    return certs


def test_certs_command_writes_owner_only_keys_and_names(consortium):
    for key in (consortium / "ca.key", consortium / "server.key", consortium / "sites" / "a" / "site.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server = tls.load_cert(consortium / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    kit = consortium / "sites" / "b"
    assert tls.common_name(tls.check_own_certificate(kit / "site.crt", kit / "site.key", kit / "ca.crt", "b")) == "b"
    r = run_cli(["asyndgan.cli.main", "certs", "init", "--dir", str(consortium)])
    assert r.returncode == 2 and "refusing to replace" in r.stderr


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", "bad id"])
def test_certs_issue_refuses_a_bad_site_id_and_writes_nothing(tmp_path, bad):
    certs = tmp_path / "deep" / "certs"
    assert run_cli(["asyndgan.cli.main", "certs", "init", "--dir", str(certs)]).returncode == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_cli(["asyndgan.cli.main", "certs", "issue", "--dir", str(certs), "--server", "localhost",
                 "--site", "good", "--site", bad])
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "site id" in lines[0] and "not allowed" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # not even server.crt
    with pytest.raises(ConfigError, match="not allowed"):
        pki.issue_site(certs, bad)
    with pytest.raises(ConfigError, match="not allowed"):
        pki.revoke_site(certs, bad)


def test_own_certificate_problems_are_named(consortium, tmp_path):
    kit = consortium / "sites" / "a"
    with pytest.raises(ConfigError, match="certificate of 'a', not of 'b'"):
        tls.check_own_certificate(kit / "site.crt", kit / "site.key", kit / "ca.crt", "b")
    with pytest.raises(ConfigError, match="not the private key"):
        tls.check_own_certificate(kit / "site.crt", consortium / "sites" / "b" / "site.key", kit / "ca.crt")
    other = tmp_path / "other"
    pki.init_ca(other)
    with pytest.raises(ConfigError, match="not issued by the consortium CA"):
        tls.check_own_certificate(kit / "site.crt", kit / "site.key", other / "ca.crt")
    old = pki.issue_site(consortium, "old", days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    with pytest.raises(ConfigError, match="expired on"):
        tls.check_own_certificate(old / "site.crt", old / "site.key", old / "ca.crt", "old")


def _raw_join(address: str, kit_files: tuple[bytes, bytes, bytes], site_id: str) -> tuple[str, str]:
    """Present any certificate (bypassing the site's own checks) and say Hello as `site_id`."""
    ca, key, cert = kit_files
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    out: queue.Queue = queue.Queue()
    out.put(pb.SiteMessage(hello=pb.Hello(protocol_version=1, site_id=site_id, family="image2d",
                                          modalities=["t1"])))
    with grpc.secure_channel(address, creds) as ch:
        try:
            for _ in pb_grpc.AsynDGANStub(ch).Train(iter(out.get, None), timeout=10):
                return "OK", "welcomed"
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
        finally:
            out.put(None)
    return "ENDED", ""


def _kit(folder) -> tuple[bytes, bytes, bytes]:
    return tuple((folder / n).read_bytes() for n in ("ca.crt", "site.key", "site.crt"))


@pytest.mark.integration
def test_mutual_tls_training_and_every_refusal(consortium, tmp_path):
    data = write_toy_sites(tmp_path / "d", sites=1, per_site=[4], size=16)[0]
    over = {**TINY_IMAGE2D, "site.schedule.steps": 5, "train.min_sites": 2, "allowed_sites": ["a", "b", "old"]}
    server = Server(tmp_path / "run", over, certs=consortium)
    addr = server.address
    try:
        assert "mutual TLS" in server.output()
        # 1. no certificate at all (plain text client)
        r = run_cli(SITE + ["--insecure", "--data", str(data), "--server", addr, "--site-id", "a",
                            "--set", "connect_timeout_s=3"])
        assert r.returncode == 2 and "does not answer gRPC in plain text" in r.stderr
        # 2. a certificate from another CA (self-made), presented directly
        other = tmp_path / "other"
        pki.init_ca(other)
        rogue = pki.issue_site(other, "a")
        code, _ = _raw_join(addr, ((consortium / "ca.crt").read_bytes(), *_kit(rogue)[1:]), "a")
        assert code == "UNAVAILABLE"
        # ... and through the site agent, which names the problem before dialling
        r = run_cli(SITE + ["--certs", str(rogue), "--data", str(data), "--server", addr, "--site-id", "a"])
        assert r.returncode == 2 and "not issued by the consortium CA" not in r.stderr  # its own CA: consistent
        assert "TLS handshake failed" in r.stderr
        # 3. another site's certificate
        code, details = _raw_join(addr, _kit(consortium / "sites" / "a"), "b")
        assert code == "PERMISSION_DENIED" and "certificate is for site 'a'" in details
        r = run_cli(SITE + ["--certs", str(consortium / "sites" / "a"), "--data", str(data), "--server", addr,
                            "--site-id", "b"])
        assert r.returncode == 2 and "certificate of 'a', not of 'b'" in r.stderr
        # 4. expired
        old = pki.issue_site(consortium, "old", days=1,
                             not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
        code, _ = _raw_join(addr, _kit(old), "old")
        assert code == "UNAVAILABLE"
        # 5. a site the consortium does not list
        stranger = pki.issue_site(consortium, "c")
        code, details = _raw_join(addr, _kit(stranger), "c")
        assert code == "PERMISSION_DENIED" and "not one of this consortium's allowed sites" in details
        # 6. revoked
        r = run_cli(["asyndgan.cli.main", "certs", "revoke", "--site", "b", "--dir", str(consortium)])
        assert r.returncode == 0, r.stderr
        r = run_cli(SITE + ["--certs", str(consortium / "sites" / "b"), "--data", str(data), "--server", addr,
                            "--site-id", "b"])
        assert r.returncode == 2 and "has been revoked" in r.stderr and "PERMISSION_DENIED" in r.stderr
        # A good site still trains over mutual TLS (quorum 2: a and a fresh b)
        pki.issue_site(consortium, "b")
        good = [start_site(data, addr, s, tmp_path / f"{s}.log", certs=consortium / "sites" / s) for s in "ab"]
        assert server.wait(120) == 0, server.output()
        assert [p.wait(30) for p in good] == [0, 0]
    finally:
        server.kill()
    out = server.output()
    assert "Handshake failed" in out  # gRPC's own line for the handshakes it refused
    assert "certificate is for site 'a' but the site calls itself 'b'" in out
    assert "has been revoked" in out and "not one of this consortium's allowed sites" in out
    assert "step 5: checkpoint" in out
