"""Start real server and site processes for integration tests (free localhost ports, tiny CPU models)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import grpc

from asyndgan.common import tls
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

TINY_IMAGE2D = {
    "site.model.family": "image2d",
    "site.model.image2d.image_size": 16,
    "site.model.image2d.ngf": 4,
    "site.model.image2d.n_blocks": 1,
    "site.model.image2d.ndf": 4,
    "site.model.image2d.d_layers": 1,  # deeper PatchGANs on 16x16 crops end in 3x3 instance norms, whose
    # amplification of float32 rounding (~1e-4) would blur the exactness test
}


def _sets(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


class Server:
    def __init__(self, run_dir: pathlib.Path, overrides: dict, extra: list[str] = (), timeout: float = 30,
                 port: int = 0, env: dict | None = None, certs: pathlib.Path | None = None):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        port_file = run_dir / "port"
        port_file.unlink(missing_ok=True)
        self.log = open(run_dir / "server.out", "a")
        cmd = [sys.executable, "-m", "asyndgan.central_server.cli", "start", "--host", "127.0.0.1", "--port", str(port),
               "--port-file", str(port_file), "--run-dir", str(run_dir), "--threads", "1", *_sets(overrides), *extra]
        cmd += ["--certs", str(certs)] if certs else ["--insecure"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**ENV, **(env or {})})
        end = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server did not start:\n{self.output()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.run_dir / "server.out").read_text()

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port_free(port: int, timeout: float = 30) -> None:
    """Wait until `port` can be bound again on loopback (a killed server's socket may linger briefly)."""
    import socket

    end = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > end:
                    raise AssertionError(f"port {port} still in use after {timeout} s") from None
        time.sleep(0.05)


def start_site(data: pathlib.Path, server: str, site_id: str, log: pathlib.Path, extra: list[str] = (),
               certs: pathlib.Path | None = None, private: bool = False):
    """A site process. private=False (tests of the plumbing): privacy.enabled=false, since the tiny test data
    sets would spend a privacy budget in a few steps; the privacy tests pass private=True."""
    state = log.parent / "state"
    cmd = [sys.executable, "-m", "asyndgan.site_agent.cli", "join", "--data", str(data), "--server", server,
           "--site-id", site_id, "--threads", "1", "--set", f"state_dir={state}", "--set", "backoff_s=[0.2, 2]",
           "--set", f"privacy.enabled={'true' if private else 'false'}",
           *(["--certs", str(certs)] if certs else ["--insecure"]), *extra]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV)


def run_cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def status(address: str, kit: pathlib.Path | None = None):
    """The server's StatusReply, or None while it does not answer."""
    try:
        with tls.open_channel(address, kit) as ch:
            return pb_grpc.AsynDGANStub(ch).Status(pb.StatusRequest(), timeout=5)
    except grpc.RpcError:
        return None


def wait_status(predicate, address: str, what: str, timeout: float = 60, kit: pathlib.Path | None = None):
    """Poll Status until predicate(reply) holds; fail naming `what` and the last reply."""
    end = time.monotonic() + timeout
    s = None
    while time.monotonic() < end:
        s = status(address, kit)
        if s is not None and predicate(s):
            return s
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last status: {s}")


def site_status(s, name: str):
    """One site's SiteStatus in a reply, or None."""
    return next((x for x in s.sites if x.site_id == name), None)


def one_line_error(result, *needles) -> str:
    """A CLI run that failed the way users are promised: exit 2, no traceback, one `error:` line holding every
    needle; returns that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
