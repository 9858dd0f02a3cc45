"""Faults with real processes: sites killed and restarted, the server killed (also mid-checkpoint) and
resumed, and sites that send garbage. Each test states what must survive."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from asyndgan.formats.checkpoint import list_checkpoints, load_checkpoint, load_latest
from asyndgan.common import pki
from asyndgan.demo_data.toy import write_toy_sites
from procs import ENV, TINY_IMAGE2D, Server, free_port, start_site, wait_port_free
from procs import site_status as _site
from procs import status as _status
from procs import wait_status as _wait

pytestmark = [pytest.mark.integration, pytest.mark.serial]  # measures time or holds the machine: alone
HERE = os.path.dirname(__file__)


def _overrides(**extra) -> dict:
    return {**TINY_IMAGE2D, "site.model.image2d.load_size": 20, "train.step_deadline_s": 3.0,
            "checkpoint_every": 10, "sample_every": 10**6, **extra}


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "mtls"])
def test_server_killed_then_resumed_sites_reconnect_on_their_own(tmp_path, secure):
    folders = write_toy_sites(tmp_path / "d", sites=2, per_site=[6, 4], size=20)
    over = _overrides(**{"site.schedule.steps": 150, "train.min_sites": 2})
    certs = None
    if secure:
        certs = tmp_path / "certs"
        pki.init_ca(certs)
        pki.issue_server(certs, ["127.0.0.1"])
        for name in ("s0", "s1", "operator"):
            pki.issue_site(certs, name)
    kit = (lambda name: certs / "sites" / name) if secure else (lambda name: None)
    status = lambda: _status(server.address, kit("operator"))  # noqa: E731
    # Plain: the container way, the same command at every start ("resume if possible" starts a new run on an
    # empty folder and continues otherwise), with the health listener. mTLS: --resume for the restart only.
    health_port = free_port()
    first = ["--resume-if-possible", "--health-port", str(health_port)] if not secure else []
    again = first if not secure else ["--resume"]
    server = Server(tmp_path / "run", over, extra=first, certs=certs)
    port = server.port
    sites = [start_site(f, server.address, f"s{i}", tmp_path / f"s{i}.log", certs=kit(f"s{i}"))
             for i, f in enumerate(folders)]
    try:
        run_id = _wait(lambda s: s.step >= 35, server.address, "35 steps", kit=kit("operator")).run_id
        if not secure:
            probe = subprocess.run([sys.executable, "-m", "asyndgan.central_server.cli", "health", "--address",
                                    f"127.0.0.1:{health_port}"], capture_output=True, text=True, env=ENV, timeout=60)
            assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stderr
            assert "starting a new run" in server.output()
        server.proc.kill()  # kill -9: no checkpoint, no goodbye
        server.wait()
        before = load_latest(tmp_path / "run" / "checkpoints")[1]["step"]
        assert before >= 30
        wait_port_free(port)
        server = Server(tmp_path / "run", over, extra=again, port=port, certs=certs)
        s = _wait(lambda s: s.step > before + 5 and len(s.sites) == 2, server.address, "training after resume",
                  kit=kit("operator"))
        assert status() is not None
        assert len(run_id) == 12 and s.run_id == run_id  # the same run continues
        assert server.wait(120) == 0, server.output()
        assert [p.wait(60) for p in sites] == [0, 0]
    finally:
        server.kill()
        for p in sites:
            p.kill()
    out = server.output()
    assert "resumed from" in out and f"at step {before}" in out
    if not secure:  # the server has exited: the probe says so
        probe = subprocess.run([sys.executable, "-m", "asyndgan.central_server.cli", "health", "--address",
                                f"127.0.0.1:{health_port}", "--timeout", "2"], capture_output=True, text=True,
                               env=ENV, timeout=60)
        assert probe.returncode == 1 and "not healthy" in probe.stderr
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000150.pt")
    assert final["step"] == 150
    for i in range(2):
        log = (tmp_path / f"s{i}.log").read_text()
        assert "reconnecting in" in log and "the server already holds our label maps" in log


def test_server_killed_while_writing_a_checkpoint_loses_nothing_older(tmp_path):
    folders = write_toy_sites(tmp_path / "d", sites=1, per_site=[6], size=20)
    over = _overrides(**{"site.schedule.steps": 40, "checkpoint_every": 5})
    hold = {"ASYNDGAN_TEST_HOLD_WRITES_S": "1"}
    ckdir = tmp_path / "run" / "checkpoints"
    server = Server(tmp_path / "run", over, env=hold)
    port = server.port
    site = start_site(folders[0], server.address, "s0", tmp_path / "s0.log")
    try:
        kills = 0
        for _ in range(3):  # three crashes, each in the middle of a checkpoint write
            end = time.monotonic() + 60
            while not any(p.name.endswith(".tmp") for p in ckdir.glob(".*")) or not list_checkpoints(ckdir):
                assert time.monotonic() < end, server.output()
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGKILL)
            server.wait()
            kills += 1
            for path in list_checkpoints(ckdir):
                load_checkpoint(path)  # every complete checkpoint still loads
            server = Server(tmp_path / "run", over, extra=["--resume"], port=port, env=hold)
        assert server.wait(180) == 0, server.output()
        assert site.wait(60) == 0
    finally:
        server.kill()
        site.kill()
    assert kills == 3
    steps = [load_checkpoint(p)["step"] for p in list_checkpoints(ckdir)]
    assert steps[0] == 40 and steps == sorted(steps, reverse=True)
    assert server.output().count("resumed from") == 3


def test_a_site_killed_mid_step_is_dropped_and_rejoins_with_its_state(tmp_path):
    folders = write_toy_sites(tmp_path / "d", sites=2, per_site=[6, 4], size=20)
    server = Server(tmp_path / "run", _overrides(**{"site.schedule.steps": 10**6, "train.min_sites": 1}))
    a = start_site(folders[0], server.address, "a", tmp_path / "a.log", ["--set", "save_every=5"])
    b = start_site(folders[1], server.address, "b", tmp_path / "b.log", ["--set", "save_every=5"])
    try:
        s = _wait(lambda s: (x := _site(s, "b")) is not None and x.steps_answered >= 20, server.address, "b busy")
        b.send_signal(signal.SIGKILL)
        b.wait()
        killed_at = s.step
        _wait(lambda s: s.step >= killed_at + 20 and _site(s, "b") is None, server.address, "training without b")
        b = start_site(folders[1], server.address, "b", tmp_path / "b2.log")
        _wait(lambda s: (x := _site(s, "b")) is not None and x.steps_answered >= 5, server.address, "b back")
        assert a.poll() is None
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(60)
        for p in (a, b):
            p.kill()
    log = (tmp_path / "b2.log").read_text()
    assert "restored discriminator state" in log  # a new process: it uploads its maps again, keeps its D
    # Killed during a step the trainer waits for ("left out (disconnected)"), or between steps, when the server
    # sees the connection go first (under load the generator update is long enough for either).
    assert re.search(r"site b left( out \(disconnected\)|: connection (lost|closed))", server.output())


@pytest.mark.parametrize("mode", ["nan", "shape", "dtype", "huge", "oversized", "order"])
def test_a_site_sending_garbage_is_dropped_while_the_others_train(tmp_path, mode):
    folders = write_toy_sites(tmp_path / "d", sites=1, per_site=[6], size=20)
    server = Server(tmp_path / "run", _overrides(**{"site.schedule.steps": 10**6, "train.min_sites": 1}))
    good = start_site(folders[0], server.address, "good", tmp_path / "good.log")
    bad = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_site.py"), server.address, "evil", mode],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        out, _ = bad.communicate(timeout=60)
        assert bad.returncode == 3, out  # the server ended its stream with an error status
        assert ("RESOURCE_EXHAUSTED" if mode == "oversized" else "INVALID_ARGUMENT") in out
        s = _status(server.address)
        step = s.step
        _wait(lambda s: s.step >= step + 10, server.address, "training going on")
        assert [x.site_id for x in _status(server.address).sites] == ["good"]
        assert good.poll() is None and server.proc.poll() is None
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(60)
        good.kill()
    out = server.output()
    if mode not in ("order", "oversized"):
        assert "3 bad gradients in a row" in out


def test_a_straggler_never_holds_training_up_and_its_late_replies_are_dropped(tmp_path):
    folders = write_toy_sites(tmp_path / "d", sites=1, per_site=[6], size=20)
    server = Server(tmp_path / "run", _overrides(**{"site.schedule.steps": 10**6, "train.min_sites": 1,
                                                    "train.step_deadline_s": 0.5}))
    good = start_site(folders[0], server.address, "good", tmp_path / "good.log")
    slow = subprocess.Popen([sys.executable, os.path.join(HERE, "hostile_site.py"), server.address, "slow", "late"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=ENV)
    try:
        s = _wait(lambda s: (x := _site(s, "slow")) is not None and x.late_replies >= 3, server.address,
                  "late replies from the straggler", timeout=90)
        t0, step0 = time.monotonic(), s.step
        s = _wait(lambda s: s.step >= step0 + 20, server.address, "20 more steps")
        # Each step waits at most the 0.5 s deadline for the straggler, never its 1.5 s.
        assert (time.monotonic() - t0) / (s.step - step0) < 0.75
        x = _site(s, "slow")
        assert x.steps_answered == 0 and x.steps_missed >= 3 and x.bad_messages == 0
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(60)
        good.kill()
        slow.kill()
    assert "dropped a late reply" in server.output()
