"""Flower's deployment mode on this machine, for the baselines: a SuperLink and one SuperNode per site as real
processes on loopback, each SuperNode dialling through its own counting relay, and `flwr run` of our Flower app
(experiments/flower_app).

Flower lives in its own environment (scripts/setup-flower.sh; ASYNDGAN_FLOWER_VENV to point elsewhere): flwr 1.42
pins protobuf < 7, asyndgan's generated gRPC code needs protobuf >= 7. Runs are offline: telemetry and the update
check off (with them on, every run makes dozens of DNS look-ups to the outside), the SuperLink installs no
dependencies (by default it installs the app's into a fresh environment per run, which fails offline), every run
has its own FLWR_HOME and free ports.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from asyndgan.common.errors import AsynDGANError
from asyndgan.experiments.relay import Relay

log = logging.getLogger(__name__)

FLWR_VERSION = "1.42.0"
APP_DIR = pathlib.Path(__file__).parent / "flower_app"
FEDERATION = "bench"
STATUS_EVERY_S = 15.0


class FlowerError(AsynDGANError):
    """Flower is missing, or a Flower process or run failed."""


def flower_venv() -> pathlib.Path:
    """The environment holding flwr (checked), or FlowerError saying how to make it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    venv = pathlib.Path(os.environ.get("ASYNDGAN_FLOWER_VENV", root / ".venv-flower"))
    if not (venv / "bin" / "flower-superlink").is_file():
        raise FlowerError(f"Flower is not installed at {venv}: run ./scripts/setup-flower.sh (or set "
                          "ASYNDGAN_FLOWER_VENV to an environment with flwr==" + FLWR_VERSION + ", torch and monai)")
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunOutcome:
    run_id: str
    seconds: float  # `flwr run` to finished
    status: str


class Federation:
    """SuperLink + SuperNodes (site i with node config partition-id=i), each SuperNode behind a Relay."""

    def __init__(self, workdir: pathlib.Path, sites: int, delay_s: float = 0.0, netns: list[str] | None = None,
                 tls: bool = True):
        self.venv = flower_venv()
        self.tls = tls  # TLS on every Flower connection (a CA and SuperLink certificate made for this federation)
        self.workdir = pathlib.Path(workdir).resolve()  # FLWR_HOME and cwd: relative paths would break
        self.sites = sites
        self.delay_s = delay_s
        self.netns = netns  # per site: run its SuperNode in this network namespace (emulated links)
        self.home = self.workdir / "flwr_home"
        self.procs: list[subprocess.Popen] = []
        self.relays: list[Relay] = []
        self.port = 0

    # ---- processes -----------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "VIRTUAL_ENV"))}
        env.update(FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=f"{self.venv / 'bin'}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1")
        return env

    def _spawn(self, name: str, args: list[str], prefix: list[str] | None = None) -> subprocess.Popen:
        logf = (self.workdir / f"{name}.log").open("ab")
        p = subprocess.Popen([*(prefix or []), *args], stdout=logf, stderr=subprocess.STDOUT, env=self._env(),
                             cwd=self.workdir, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, hosts: list[str] | None = None) -> None:
        """hosts: per site, the address its relay listens on and its SuperNode dials (default 127.0.0.1)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.port = free_port()
        link_tls, node_tls, cli_tls = ["--insecure"], ["--insecure"], "insecure = true"
        if self.tls:
            certs = self._certs(["127.0.0.1", "localhost", *(hosts or [])])
            link_tls = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
                        "--ssl-keyfile", str(certs / "server.key")]
            node_tls = ["--root-certificates", str(certs / "ca.crt")]
            cli_tls = f"root-certificates = {json.dumps(str(certs / 'ca.crt'))}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{cli_tls}\n')
        bin_ = self.venv / "bin"
        self._spawn("superlink", [str(bin_ / "flower-superlink"), *link_tls, "--host", "127.0.0.1", "--port",
                                  str(self.port), "--disable-runtime-dependency-installation",
                                  "--database", str(self.workdir / "superlink.db")])
        _wait_port(self.port, 60, self.workdir / "superlink.log")
        for i in range(self.sites):
            host = hosts[i] if hosts else "127.0.0.1"
            relay = Relay(("127.0.0.1", self.port), listen=(host, 0), delay_s=self.delay_s)
            self.relays.append(relay)
            prefix = ["ip", "netns", "exec", self.netns[i]] if self.netns else None
            self._spawn(f"supernode{i}", [str(bin_ / "flower-supernode"), *node_tls, "--superlink",
                                          f"{host}:{relay.port}", "--port", str(free_port()),
                                          "--node-config", f"partition-id={i}"], prefix)
        self._wait_nodes(300)

    def _certs(self, hosts: list[str]) -> pathlib.Path:
        """A fresh CA and SuperLink certificate for `hosts` at every start (the hosts may differ between starts)."""
        from asyndgan.common import pki

        certs = self.workdir / "certs"
        shutil.rmtree(certs, ignore_errors=True)
        certs.mkdir(parents=True)
        pki.init_ca(certs, "asyndgan Flower baseline CA")
        pki.issue_server(certs, sorted(set(hosts)))
        return certs

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / "flwr"), *args], capture_output=True, text=True,
                              env=self._env(), cwd=self.workdir, timeout=timeout)

    def _wait_nodes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        said = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = self._flwr("supernode", "list", FEDERATION, "--format", "json", timeout=60)
            except subprocess.TimeoutExpired:
                said = "flwr supernode list did not answer within 60 s"
                continue
            if r.returncode == 0:
                online = [n for n in _json(r.stdout).get("nodes", []) if str(n.get("status", "")).startswith("online")]
                if len(online) >= self.sites:
                    return
                said = f"{len(online)} of {self.sites} online"
            else:
                said = (r.stderr or r.stdout).strip()[-300:]
            time.sleep(1)
        raise FlowerError(f"not every SuperNode came online within {timeout:.0f} s (last: {said}); see "
                          f"{self.workdir}/*.log")

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise FlowerError(f"a Flower process exited ({p.args[0]} ..., code {p.returncode}); see the logs "
                                  f"in {self.workdir}")

    def run(self, config: dict[str, object], timeout: float) -> RunOutcome:
        """`flwr run` of our app with `config`, waiting until the run has finished; FlowerError unless completed.

        Our ServerApp writes OUT-DIR/done when it returns; until then the run's status is asked for only every
        STATUS_EVERY_S (each `flwr` call is a Python process that costs about a second of CPU)."""
        pairs = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
        started = time.monotonic()
        r = self._flwr("run", str(APP_DIR), FEDERATION, "--run-config", pairs, "--format", "json")
        if r.returncode != 0:
            raise FlowerError(f"flwr run failed: {(r.stderr or r.stdout).strip()[-800:]}")
        run_id = str(_json(r.stdout).get("run-id") or _json(r.stdout).get("run_id") or "")
        if not run_id:
            raise FlowerError(f"flwr run printed no run id: {r.stdout.strip()[-400:]}")
        deadline = started + timeout
        done = pathlib.Path(str(config.get("out-dir", ""))) / "done"
        asked = time.monotonic()
        while True:
            self._check_alive()
            now = time.monotonic()
            if (config.get("out-dir") and done.exists()) or now - asked >= STATUS_EVERY_S:
                asked = now
                status = self.status(run_id)
                if status.startswith("finished"):
                    break
            if now > deadline:
                self._flwr("stop", run_id, FEDERATION)
                raise FlowerError(f"Flower run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(0.5)
        if status != "finished:completed":
            raise FlowerError(f"Flower run {run_id} ended {status}; see {self.workdir}/superlink.log")
        return RunOutcome(run_id, time.monotonic() - started, status)

    def status(self, run_id: str) -> str:
        r = self._flwr("list", FEDERATION, "--run-id", run_id, "--format", "json")
        if r.returncode != 0:
            return "unknown"
        runs = _json(r.stdout).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for r in self.relays:
            r.close()

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _json(text: str) -> dict:
    try:
        start = text.index("{")
        return json.loads(text[start:])
    except ValueError:
        return {}


def _wait_port(port: int, timeout: float, logfile: pathlib.Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerError(f"the SuperLink did not open port {port} within {timeout:.0f} s; see {logfile}")
