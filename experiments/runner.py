"""Run a real server and real site processes from Python (experiments, benchmarks, the demo).

Processes are started with the installed console entry points' modules, each with its own log file in the run
folder; the server binds a free port and reports it through a port file. Every child is watched, not only the
server: the server's quorum may need every site, so a site that dies would otherwise leave the run waiting
forever. A child that fails (or a site that leaves while the server still trains) stops the others and raises
AsynDGANError naming it and its log file.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

from asyndgan.common.config import ServerConfig
from asyndgan.common.errors import AsynDGANError

log = logging.getLogger(__name__)


def _env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# How long the server may keep running after a site left cleanly (exit 0): a site exits 0 when the server ends
# the run, and the server then still writes its final checkpoint; longer than this, the site left mid-run.
SITE_LEFT_GRACE_S = 30.0


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class Cluster:
    """One server and its sites as child processes; `wait()` returns when every one has finished."""

    def __init__(self, cfg: ServerConfig, threads: int | None = 1, tls: bool = True):
        """tls: give the run its own consortium CA in run_dir/certs and use mutual TLS, as a real deployment
        does (plain text otherwise)."""
        self.threads = threads
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs: dict[str, pathlib.Path] = {}
        self._site_left_at: dict[str, float] = {}
        self.address = ""
        self.tls = tls
        certs = cfg.run_dir / "certs"
        self.cfg = cfg.model_copy(update={"certs": certs, "insecure": not tls})
        if tls and not (certs / "server.crt").exists():
            from asyndgan.common import pki

            pki.init_ca(certs, "asyndgan local run CA")
            pki.issue_server(certs, ["localhost", "127.0.0.1"])
            pki.issue_site(certs, "operator")

    def start_server(self, timeout: float = 60) -> str:
        run_dir = self.cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "server_config.json"
        config_file.write_text(self.cfg.model_dump_json(indent=2))
        port_file = run_dir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "asyndgan.central_server.cli", "start", "--config", str(config_file),
               "--port-file", str(port_file)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        self._spawn("server", cmd, run_dir / "server.out")
        end = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.procs[0][1].poll() is not None or time.monotonic() > end:
                raise AsynDGANError(f"the server did not start; see {run_dir / 'server.out'}")
            time.sleep(0.1)
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "[::]") else self.cfg.host
        self.address = f"{host}:{int(port_file.read_text())}"
        return self.address

    def kit(self, site_id: str) -> pathlib.Path | None:
        if not self.tls:
            return None
        kit = self.cfg.certs / "sites" / site_id
        if not kit.exists():
            from asyndgan.common import pki

            pki.issue_site(self.cfg.certs, site_id)
        return kit

    def start_site(self, site_id: str, data: pathlib.Path, extra: list[str] = (), privacy: bool | None = None,
                   prefix: list[str] | None = None) -> None:
        """privacy: None keeps the site's default (on); False for the papers' algorithm (lambda_L1 > 0).
        prefix: run the site under this command (e.g. `ip netns exec NS` for an emulated link)."""
        kit = self.kit(site_id)
        cmd = [sys.executable, "-m", "asyndgan.site_agent.cli", "join", "--data", str(data), "--server", self.address,
               "--site-id", site_id, *(["--certs", str(kit)] if kit else ["--insecure"]),
               "--set", f"state_dir={self.cfg.run_dir / 'site_state'}", *extra]
        if privacy is not None:
            cmd += ["--set", f"privacy.enabled={'true' if privacy else 'false'}"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        self._spawn(site_id, [*(prefix or []), *cmd], self.cfg.run_dir / f"{site_id}.out")

    def _spawn(self, name: str, cmd: list[str], out: pathlib.Path) -> None:
        with open(out, "w") as f:
            self.procs.append((name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(self.threads))))
        self.logs[name] = out

    def check(self) -> bool:
        """Look at every child once; True when all have exited cleanly. Raises AsynDGANError (after stopping
        the others) when one failed: the server or a site exited non-zero or was killed, or a site left
        while the server kept training for longer than SITE_LEFT_GRACE_S."""
        server_running = self.procs[0][1].poll() is None
        now = time.monotonic()
        problem = None
        for name, proc in self.procs:
            rc = proc.poll()
            if rc is None or (rc == 0 and not server_running) or (rc == 0 and name == "server"):
                continue
            if rc != 0:
                problem = f"{name} {_exit_text(rc)}"
            else:
                left = self._site_left_at.setdefault(name, now)
                if now - left > SITE_LEFT_GRACE_S:
                    problem = f"{name} left (exit 0) while the server was still training"
            if problem:
                self.stop()
                raise AsynDGANError(f"{problem}; see its log {self.logs[name]} (stopped the other processes)")
        return all(proc.poll() == 0 for _, proc in self.procs)

    def follow(self, total: int, desc: str = "train") -> None:
        """Show the server's progress (from its Status call) as a progress bar until it exits."""
        import grpc
        from tqdm import tqdm

        from asyndgan.common._generated import asyndgan_pb2 as pb
        from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc

        server = self.procs[0][1]
        with self.channel() as channel, tqdm(total=total, desc=desc, unit="step") as bar:
            stub = pb_grpc.AsynDGANStub(channel)
            while server.poll() is None:
                self.check()
                try:
                    s = stub.Status(pb.StatusRequest(), timeout=2)
                except grpc.RpcError:
                    time.sleep(1)
                    continue
                bar.update(s.step - bar.n)
                ready = sum(x.ready for x in s.sites)
                bar.set_postfix(sites=f"{ready}/{len(s.sites)}", img_s=f"{s.images_per_second:.1f}",
                                MB=f"{(s.bytes_sent + s.bytes_received) / 1e6:.0f}", refresh=False)
                if s.state == "finished":
                    break
                time.sleep(1)
            self.check()  # the server itself may have failed
            if server.wait() == 0:
                bar.update(total - bar.n)  # the server finished between two polls

    def channel(self):
        """A channel to the server for Status calls (with the run's operator kit under TLS)."""
        from asyndgan.common.tls import open_channel

        return open_channel(self.address, self.kit("operator"))

    def watch(self, observe, timeout: float, what: str) -> None:
        """Poll the server's Status until observe(reply) returns True, checking every process on the way (see
        `check`); raise naming `what` and the run's logs after `timeout` seconds."""
        import grpc

        from asyndgan.common._generated import asyndgan_pb2 as pb
        from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc

        end = time.monotonic() + timeout
        with self.channel() as channel:
            stub = pb_grpc.AsynDGANStub(channel)
            while True:
                self.check()
                if time.monotonic() > end:
                    raise AsynDGANError(f"timed out after {timeout:g} s waiting for {what}; logs in "
                                        f"{self.cfg.run_dir}")
                try:
                    reply = stub.Status(pb.StatusRequest(), timeout=5)
                except grpc.RpcError:
                    time.sleep(0.2)
                    continue
                if observe(reply):
                    return
                time.sleep(0.02)

    def wait(self, timeout: float) -> None:
        """Wait for every process to exit cleanly, watching all of them (see `check`); on a failure or after
        `timeout` seconds, stop them all and raise naming the process and its log."""
        end = time.monotonic() + timeout
        try:
            while not self.check():
                if time.monotonic() > end:
                    running = [name for name, proc in self.procs if proc.poll() is None]
                    raise AsynDGANError(f"timed out after {timeout:g} s waiting for {', '.join(running)}; logs: "
                                        f"{', '.join(str(self.logs[n]) for n in running)}")
                time.sleep(0.2)
        finally:
            self.stop()

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


