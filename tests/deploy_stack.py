"""The container deployment on a real Docker engine, end to end: our own dockerd (everything under one scratch
folder, no host firewall rules; stopped by its PID), the image built offline from deploy/Dockerfile (cold, then
cached), the one-host stack of deploy/compose.local.yml on a private bridge network with compose v1, then faults:
a site killed and started again, a site cut off the network for 6 s, the server restarted. Training must go on
through each, and the restarted server must continue the same run from its checkpoint. Then compose v2 (when
installed) checks the multi-machine files and brings the same stack back up: the server resumes again. Everything
is torn down at the end (containers, volumes, the engine, its mounts and folder).

    python tests/deploy_stack.py [--json timings.json]     # as root; about 5 minutes on 2 cores

tests/test_deploy.py runs it (in the background from the start of the test session, at low CPU priority, so that
it overlaps the rest of the suite). Needs root, dockerd, docker-compose and debootstrap (scripts/setup-docker.sh
installs them on Debian).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # run as a script too
from procs import free_port  # noqa: E402

log = logging.getLogger("deploy_stack")
ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = "asyndgantest"
IMAGE = "asyndgan:test"
BASE = "asyndgan-base:bookworm"
# Free disk the run needs: the engine's data root under /tmp (base, build stage, image, containers, volumes) and
# the wheels downloaded into deploy/wheelhouse. Measured: 10.3 GB at the peak (`timings["disk used GB"]`, the whole
# file system's drop while the run went on), so 12 GB with a margin.
DISK_NEEDED_GB = {"/tmp": 12.0, str(ROOT): 1.5}
# A small run: tiny networks, short deadlines (a cut-off site must not hold a step for a minute).
SERVER_TOML = """
checkpoint_every = 10
sample_every = 100000
[train]
batch_size = 2
min_sites = 1
step_deadline_s = 4
[site.model.image2d]
image_size = 32
ngf = 8
n_blocks = 1
ndf = 8
d_layers = 2
[site.schedule]
steps = 100000
"""


STARTED_ENV = "ASYNDGAN_DEPLOY_JOB"  # a folder: scripts/test.sh started the job there (outcome.json when done)


class StartedJob:
    """The job as a process the test session did not start (scripts/test.sh did, before the first tier): finished
    when its outcome.json exists. Offers what the test needs of a Popen: wait, poll, terminate."""

    owned = False

    def __init__(self, work: pathlib.Path):
        self.work = work

    def poll(self) -> int | None:
        return 0 if (self.work / "outcome.json").is_file() else None

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("deploy_stack.py", timeout)
            time.sleep(2)
        return 0

    def terminate(self) -> None:
        pid = (self.work / "pid").read_text().strip() if (self.work / "pid").is_file() else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def missing() -> str | None:
    """Why the stack cannot be tried on this machine, or None."""
    if os.geteuid() != 0:
        return "the Docker engine test needs root (it starts its own dockerd)"
    for tool in ("dockerd", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup-docker.sh installs docker.io, docker-compose, debootstrap)"
    for where, need in DISK_NEEDED_GB.items():
        free = shutil.disk_usage(where).free / 1e9
        if free < need:
            return f"building the image needs {need:.1f} GB free under {where}; {free:.1f} GB is free"
    return None


class Engine:
    """dockerd of our own under `work`, stopped by its PID."""

    def __init__(self, work: pathlib.Path):
        self.work = work
        self.sock = work / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0",
                    "COMPOSE_DOCKER_CLI_BUILD": "0"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        logf = (self.work / "dockerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.work / "root"), "--exec-root", str(self.work / "exec"),
             "--pidfile", str(self.work / "docker.pid"), "--host", f"unix://{self.sock}",
             "--storage-driver", "overlay2", "--iptables=false", "--ip6tables=false",
             "--bridge", "none"],  # no docker0 left on the host: the stack makes (and removes) its own network
            stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.run(["docker", "info"], check=False).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"dockerd did not come up: {(self.work / 'dockerd.log').read_text()[-2000:]}")

    def run(self, args: list[str], check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        docker = "/usr/bin/docker" if args[0] == "docker" and pathlib.Path("/usr/bin/docker").exists() else args[0]
        env = kw.pop("env", self.env)
        r = subprocess.run([docker, *args[1:]], env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
        return r

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        subprocess.run(["umount", str(self.work / "exec" / "netns" / "default")], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


class Stack:
    """deploy/compose.local.yml as project `project`, driven by compose v1 (`docker-compose`) or v2."""

    def __init__(self, engine: Engine, compose: list[str], project: str, env: dict[str, str]):
        self.engine = engine
        self.project = project
        self.base = [*compose, "-p", project, "-f", str(ROOT / "deploy" / "compose.local.yml")]
        self.engine.env.update(env)

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.engine.run([*self.base, *args], check=check, timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def status(self) -> dict | None:
        """The server's status, or None when it does not answer (yet): the callers poll until their own
        deadline. A call that takes over a minute is one such non-answer: this job runs at nice 19 beside the
        rest of the test suite, and a loaded machine can starve one exec without anything being wrong."""
        try:
            r = self.compose("exec", "-T", "server", "asyndgan-server", "status", "--server", "127.0.0.1:50051",
                             "--certs", "/certs/sites/operator", "--json", check=False, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def wait(self, what: str, ok, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status()
            if last is not None and ok(last):
                return last
            time.sleep(2)
        logs = self.compose("logs", "--tail", "30", check=False).stdout[-4000:]
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{logs}")


def _step(s: dict) -> int:
    return int(s.get("step", 0))


def _connected(s: dict) -> set[str]:
    """Sites in session and taking part in steps (a killed or cut-off site drops out of the list once noticed)."""
    return {x["site_id"] for x in s.get("sites", []) if x.get("ready") and not x.get("left")}


class _DiskWatch:
    """The most disk a run took under one folder's file system (sampled every 2 s), in GB."""

    def __init__(self, where: str):
        self.where, self.start = where, shutil.disk_usage(where).free
        self.low, self.done = self.start, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(2.0):
            self.low = min(self.low, shutil.disk_usage(self.where).free)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round((self.start - self.low) / 1e9, 2)


def _compose_v2(engine: Engine) -> list[str] | None:
    return ["docker", "compose"] if engine.run(["docker", "compose", "version"], check=False).returncode == 0 else None


def run() -> dict[str, float]:
    """The whole sequence; the timings per phase (seconds) and the image size. AssertionError names a failure."""
    reason = missing()
    if reason:
        raise AssertionError(reason)
    timings: dict[str, float] = {}
    work = pathlib.Path(tempfile.mkdtemp(prefix="asyndgan-dk-", dir="/tmp"))  # short: dockerd's socket paths
    engine = Engine(work)
    t0 = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.monotonic() - t0, 1)
        log.info("%s: %.1f s", name, timings[name])
        t0 = time.monotonic()

    stacks: list[Stack] = []
    config = work / "server.toml"
    disk = _DiskWatch("/tmp")
    try:
        engine.start()
        lap("engine up")
        # cold: debootstrap, wheels, image, at the lowest CPU priority beside the test tiers (scripts/test.sh): on
        # a machine busy with other work as well it ran past 15 minutes. The limit only catches a build that hangs;
        # the test waits up to 30 minutes for this job
        build = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), "--offline", "--make-base", BASE, "--tag",
                                IMAGE], env={**engine.env, "DOCKER": "/usr/bin/docker"}, capture_output=True,
                               text=True, timeout=1500)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        lap("base + wheels + image, cold")
        engine.run(["docker", "build", "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", IMAGE, "--build-arg",
                    f"BASE={BASE}", "--build-arg", "OFFLINE=1", "--network", "none", str(ROOT)], timeout=900)
        lap("image, cached")
        size = int(engine.run(["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"]).stdout.strip())
        timings["image size MB"] = round(size / 1e6)
        user = engine.run(["docker", "image", "inspect", IMAGE, "--format", "{{.Config.User}}"]).stdout.strip()
        assert user and not user.startswith("0") and user != "root"
        engine.run(["docker", "run", "--rm", "--network", "none", IMAGE, "sh", "-c",
                    "test \"$(find /certs /runs /state /data -mindepth 1 | wc -l)\" = 0 && test ! -e /src && test ! -e /wheelhouse"])
        config.write_text(SERVER_TOML)

        v1 = Stack(engine, ["docker-compose"], PROJECT, _stack_env(config, "10.233.7.0/24"))
        stacks.append(v1)
        _faults(v1, engine, lap)

        v2 = _compose_v2(engine)
        if v2 is None:
            log.warning("compose v2 (`docker compose`) is not installed: only v1 tried")
        else:
            # the same project under v2, on v1's volumes: `down` then `up` must continue the run, not redo it
            last = v1.wait("a status before down", lambda s: True)
            v1.compose("down", "--timeout", "20", timeout=300)
            lap("v1 down (volumes kept)")
            for f, extra in (("compose.server.yml", {}), ("compose.site.yml", {"SERVER": "gan.example.org:50051",
                                                                              "SITE_ID": "hospital-a",
                                                                              "DATA": str(work)})):
                engine.run([*v2, "-f", str(ROOT / "deploy" / f), "config", "-q"], env={**engine.env, **extra})
            stack = Stack(engine, v2, PROJECT, {})
            stacks[:] = [stack]
            stack.compose("up", "-d", "--no-build", timeout=600)
            s = stack.wait("three sites training (compose v2)",
                           lambda s: _step(s) >= _step(last) + 5 and len(_connected(s)) == 3)
            assert s["run_id"] == last["run_id"], "compose down + up must continue the run"
            lap("compose v2: up on v1's volumes, the run continues")
    finally:
        for stack in stacks:
            stack.compose("down", "-v", "--timeout", "20", check=False, timeout=300)
        timings["down -v"] = round(time.monotonic() - t0, 1)
        engine.stop()
        timings["disk used GB"] = disk.stop()
        log.info("timings: %s", timings)
    assert not work.exists(), f"{work} is left behind"
    leftover = subprocess.run(["pgrep", "-f", f"dockerd --data-root {work}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "dockerd is still running"
    return timings


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=pathlib.Path, help="write {ok, error, timings} here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    def on_term(signum, _frame):  # tear down (the finally blocks) when the test session ends early
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    outcome: dict = {"ok": False, "error": "", "timings": {}}
    reason = missing()
    if reason:  # nothing to try here: the test is skipped with this reason
        log.warning("the stack is not tried on this machine: %s", reason)
        outcome["skipped"] = reason
        if args.json:
            args.json.write_text(json.dumps(outcome, indent=2))
        return 0
    try:
        outcome["timings"] = run()
        outcome["ok"] = True
    except (AssertionError, subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        log.error("%s", outcome["error"])
    if args.json:
        args.json.write_text(json.dumps(outcome, indent=2))
    return 0 if outcome["ok"] else 1



def _stack_env(config: pathlib.Path, subnet: str) -> dict[str, str]:
    return {"ASYNDGAN_IMAGE": IMAGE, "ASYNDGAN_SERVER_CONFIG": str(config), "ASYNDGAN_PORT": str(free_port()),
            "ASYNDGAN_SUBNET": subnet, "ASYNDGAN_PHANTOM_CASES": "6"}


def _faults(stack: Stack, engine: Engine, lap) -> None:
    """Up, three sites training; a site killed and started; a site cut off; the server restarted."""
    stack.compose("up", "-d", "--no-build", timeout=600)
    lap("compose up (phantom, CA, server healthy)")
    health = engine.run(["docker", "inspect", "--format", "{{.State.Health.Status}}",
                         stack.container("server")]).stdout.strip()
    assert health == "healthy"
    s = stack.wait("three sites training", lambda s: _step(s) >= 5 and len(_connected(s)) == 3)
    run_id = s["run_id"]
    lap("three sites training")

    # a site killed (SIGKILL), then started again: training goes on without it and it comes back
    stack.compose("kill", "site1")
    before = _step(s)
    stack.wait("training without site1", lambda s: _step(s) >= before + 5 and "site1" not in _connected(s))
    stack.compose("start", "site1")
    s = stack.wait("site1 back", lambda s: "site1" in _connected(s) and _step(s) >= before + 10)
    lap("site killed and back")

    # a site cut off the network for a few seconds, then reconnected
    network = f"{stack.project}_asyndgan"
    site2 = stack.container("site2")
    engine.run(["docker", "network", "disconnect", network, site2])
    time.sleep(6)
    engine.run(["docker", "network", "connect", "--alias", "site2", network, site2])
    before = _step(s)
    s = stack.wait("site2 after the cut", lambda s: "site2" in _connected(s) and _step(s) >= before + 10)
    lap("site cut off 6 s and back")

    # the server restarted: the same run continues from its checkpoint, the sites rejoin on their own
    before = _step(s)
    stack.compose("restart", "server", timeout=180)
    s = stack.wait("the resumed run", lambda s: _step(s) >= before + 5 and len(_connected(s)) == 3)
    assert s["run_id"] == run_id, "a restarted server must continue the same run"
    assert "resumed from" in stack.compose("logs", "--no-color", "server").stdout
    listing = stack.compose("exec", "-T", "server", "ls", "/runs/server/checkpoints").stdout.split()
    assert len([f for f in listing if f.startswith("step_")]) >= 2
    lap("server restarted and resumed")


if __name__ == "__main__":
    sys.exit(main())
