"""A network cut between two hosts heals and training resumes: the site runs in its own network namespace,
joined to the server's by a veth pair that the test takes down and brings back up.

Needs root and iproute2 (skipped otherwise). Traffic stays inside the namespaces this test creates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from asyndgan.demo_data.toy import write_toy_sites
from procs import ENV, TINY_IMAGE2D, Server, site_status, start_site, status

pytestmark = [pytest.mark.integration, pytest.mark.serial]  # measures time or holds the machine: alone


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = f"{os.getpid() % 10000}"
    ns, host_if, ns_if = f"asyn{tag}", f"ah{tag}", f"an{tag}"
    subnet = f"10.231.{os.getpid() % 250}"
    if _ip("netns", "add", ns, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{subnet}.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_if, f"{subnet}.1"
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


def _answered(address: str, site: str) -> int:
    x = site_status(status(address), site)
    return -1 if x is None else x.steps_answered


def _wait_answered(address, site, n, timeout=60):
    end = time.monotonic() + timeout
    while (got := _answered(address, site)) < n:
        assert time.monotonic() < end, f"{site} answered {got} < {n}"
        time.sleep(0.2)
    return got


def test_a_cut_link_heals_and_the_far_site_trains_again(tmp_path, namespace):
    ns, host_if, host_ip = namespace
    folders = write_toy_sites(tmp_path / "d", sites=2, per_site=[6, 4], size=20)
    over = {**TINY_IMAGE2D, "site.model.image2d.load_size": 20, "site.schedule.steps": 10**6,
            "train.min_sites": 1, "train.step_deadline_s": 1.0, "checkpoint_every": 10**6, "sample_every": 10**6}
    server = Server(tmp_path / "run", over, extra=["--host", "0.0.0.0"])
    near = start_site(folders[0], server.address, "near", tmp_path / "near.log")
    far_cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "asyndgan.site_agent.cli", "join", "--insecure",
               "--data", str(folders[1]), "--server", f"{host_ip}:{server.port}", "--site-id", "far",
               "--threads", "1", "--set", f"state_dir={tmp_path / 'state'}", "--set", "backoff_s=[0.5, 2]"]
    far = subprocess.Popen(far_cmd, stdout=open(tmp_path / "far.log", "w"), stderr=subprocess.STDOUT, env=ENV)
    try:
        _wait_answered(server.address, "far", 10)
        _ip("link", "set", host_if, "down")  # the cut
        time.sleep(1.5)
        during = _answered(server.address, "far")
        near_during = _answered(server.address, "near")
        time.sleep(6)
        assert _answered(server.address, "far") <= during + 1  # nothing gets through
        assert _answered(server.address, "near") >= near_during + 3  # the near site keeps training
        _ip("link", "set", host_if, "up")  # the link heals
        _wait_answered(server.address, "far", during + 10, timeout=90)
        assert far.poll() is None and near.poll() is None
    finally:
        server.proc.terminate()
        server.wait(60)
        for p in (near, far):
            p.kill()
