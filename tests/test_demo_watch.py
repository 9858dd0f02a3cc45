"""The demo's process watch (experiments/runner.py Cluster): every child is watched, so a site that dies or never
starts ends the run within seconds with its name and log, instead of a server waiting forever for its quorum."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from asyndgan.common.config import ServerConfig, load_config
from asyndgan.common.errors import AsynDGANError
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.experiments.runner import Cluster
from procs import TINY_IMAGE2D, run_cli, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.serial]  # measures time or holds the machine: alone


def _cluster(tmp_path, steps: int, sites: int) -> Cluster:
    cfg = load_config(ServerConfig, None, {
        **TINY_IMAGE2D, "host": "127.0.0.1", "port": 0, "run_dir": str(tmp_path / "run"),
        "site.schedule.steps": steps, "train.min_sites": sites, "train.batch_size": 2,
        "checkpoint_every": 10**6, "sample_every": 10**6})
    return Cluster(cfg, threads=1, tls=False)


def test_a_site_killed_mid_run_ends_follow_naming_it_and_its_log(tmp_path):
    folders = write_toy_sites(tmp_path / "data", sites=2, per_site=[4, 4], size=16)
    cluster = _cluster(tmp_path, steps=10**6, sites=2)  # would train for hours: only a failure can end it
    try:
        address = cluster.start_server()
        for i, folder in enumerate(folders):
            cluster.start_site(f"site{i + 1}", folder)
        wait_status(lambda s: s.step >= 2, address, "two steps with both sites")
        errors: list[BaseException] = []

        def follow():
            try:
                cluster.follow(10**6)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()  # whether follow() is already polling or starts after the kill, it must notice
        killed_at = time.monotonic()
        os.kill(dict(cluster.procs)["site2"].pid, signal.SIGKILL)
        watcher.join(timeout=20)
        assert not watcher.is_alive(), "follow() kept waiting after a site died"
        assert time.monotonic() - killed_at < 10
        assert len(errors) == 1 and isinstance(errors[0], AsynDGANError), errors
        message = str(errors[0])
        assert "site2 was killed by SIGKILL" in message
        assert str(tmp_path / "run" / "site2.out") in message
        assert all(proc.poll() is not None for _, proc in cluster.procs), "the others must be stopped"
    finally:
        cluster.stop()


def test_a_site_that_cannot_start_ends_wait_at_once(tmp_path):
    good = write_toy_sites(tmp_path / "data", sites=1, per_site=[4], size=16)[0]
    cluster = _cluster(tmp_path, steps=5, sites=2)
    try:
        cluster.start_server()
        cluster.start_site("site1", good)
        cluster.start_site("site2", tmp_path / "missing")
        started = time.monotonic()
        with pytest.raises(AsynDGANError) as info:
            cluster.wait(timeout=120)
        assert time.monotonic() - started < 30  # the site's own start-up, not the 120 s timeout
        assert "site2 exited with status 2" in str(info.value)
        assert str(tmp_path / "run" / "site2.out") in str(info.value)
        assert "does not exist" in (tmp_path / "run" / "site2.out").read_text()
        assert all(proc.poll() is not None for _, proc in cluster.procs)
    finally:
        cluster.stop()


def test_demo_exits_2_naming_the_site_whose_data_breaks_after_joining(tmp_path):
    data = tmp_path / "data"
    write_toy_sites(data, sites=1, per_site=[4], size=16)
    broken = data / "site2"  # looks like arrays (meta.json) but has no images: fails when opened, after Hello
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"kind": "arrays", "modalities": ["t1", "t1ce", "t2", "flair"]}))
    out = tmp_path / "run"
    started = time.monotonic()
    r = run_cli(["asyndgan.cli.main", "demo", "--out", str(out), "--data", str(data), "--steps", "3",
                 "--sites", "2", "--device", "cpu"], timeout=180)
    assert r.returncode == 2, r.stderr
    assert time.monotonic() - started < 120
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    assert "site2 exited with status 2" in lines[0] and str(out / "site2.out") in lines[0], lines[0]
    assert "missing data file" in (out / "site2.out").read_text()
