"""Real server and site processes: sites join while training runs, a site that dies is dropped and the rest
go on, status reports it all; and nothing a site sends contains its image bytes."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.config import SiteConfig
from asyndgan.site_agent.agent import SiteAgent
from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, run_cli, site_status, start_site
from procs import status as _status
from procs import wait_status as _wait

pytestmark = pytest.mark.integration


def _answered(s: pb.StatusReply, site: str) -> int:
    x = site_status(s, site)
    return -1 if x is None else x.steps_answered


def test_sites_join_while_training_and_a_killed_site_is_dropped(tmp_path):
    folders = write_toy_sites(tmp_path / "d", sites=2, per_site=[6, 4], size=16)
    overrides = {**TINY_IMAGE2D, "site.schedule.steps": 100_000, "train.min_sites": 1, "checkpoint_every": 50,
                 "sample_every": 50, "train.step_deadline_s": 5.0}
    server = Server(tmp_path / "run", overrides)
    a = start_site(folders[0], server.address, "a", tmp_path / "a.log")
    b = None
    try:
        _wait(lambda s: s.step >= 5, server.address, "training with site a")
        b = start_site(folders[1], server.address, "b", tmp_path / "b.log")
        s = _wait(lambda s: _answered(s, "b") >= 5, server.address, "site b taking part")
        assert _answered(s, "a") > _answered(s, "b")
        assert s.state == "training" and s.bytes_received > 0
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(server.address) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="asyndgan.v1.AsynDGAN"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        cli = run_cli(["asyndgan.central_server.cli", "status", "--insecure", "--server", server.address])
        assert cli.returncode == 0, cli.stderr
        assert "sites connected: 2" in cli.stdout and "a " in cli.stdout and "b " in cli.stdout
        assert "holds t1+t1ce+t2+flair" in cli.stdout and "not learnt" not in cli.stdout, cli.stdout

        os.kill(b.pid, signal.SIGKILL)
        b.wait()
        killed_at = _status(server.address).step
        s = _wait(lambda s: s.step >= killed_at + 20 and len(s.sites) == 1, server.address, "training without b")
        assert s.sites[0].site_id == "a"
        assert a.poll() is None
    finally:
        server.proc.send_signal(signal.SIGTERM)  # graceful stop: checkpoint, tell the sites
        rc = server.wait(60)
        if b is not None and b.poll() is None:
            b.kill()
    assert rc == 0, server.output()
    # The server said it is stopping, not that the run is over: site a waits for it to come back.
    end = time.monotonic() + 30
    while "reconnecting in" not in (tmp_path / "a.log").read_text():
        assert time.monotonic() < end and a.poll() is None, (tmp_path / "a.log").read_text()
        time.sleep(0.2)
    a.send_signal(signal.SIGTERM)
    assert a.wait(30) == 0
    assert (tmp_path / "state" / "a.discriminator.pt").exists()
    assert "site b left" in server.output()
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    samples = sorted((tmp_path / "run" / "samples").glob("step_*.png"))
    assert checkpoints and samples
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"loss/d/a", "loss/d/b", "speed/images_per_second", "bytes_from_site/b"} <= set(curves.Tags()["scalars"])
    assert curves.Tags()["images"] == ["samples"]


def _windows(arr: np.ndarray, n: int) -> set[bytes]:
    """Every run of n consecutive values of arr (C order), as raw bytes; constant runs are skipped because the
    background value -1 could legitimately appear anywhere."""
    flat = arr.ravel()
    out = set()
    for i in range(flat.size - n + 1):
        w = flat[i:i + n]
        if not np.all(w == w[0]):
            out.add(w.tobytes())
    return out




def test_no_message_a_site_sends_contains_its_image_bytes(tmp_path):
    folder = write_toy_sites(tmp_path / "d", sites=1, per_site=[5], size=16, seed=5)[0]
    images = np.load(folder / "images.npy")  # [5, 4, 16, 16] float32
    n = 8
    forms = {
        "float32": (_windows(images, n), 4 * n),
        "float16": (_windows(images.astype(np.float16), n), 2 * n),
        "bfloat16": (_windows((images.view(np.uint32) >> 16).astype(np.uint16), n), 2 * n),
    }
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 3, "train.batch_size": 4})
    sent: list[bytes] = []
    agent = SiteAgent(SiteConfig(site_id="private", server=server.address, data=folder, insecure=True,
                                 state_dir=tmp_path / "state"))
    original = agent._requests

    def spy(outbox):  # every message as it goes on the wire (the upload is made lazily, as the stream pulls)
        for msg in original(outbox):
            sent.append(msg.SerializeToString())
            yield msg

    agent._requests = spy
    try:
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        thread.join(90)
        assert not thread.is_alive(), "the site agent did not finish"
        assert server.wait(30) == 0, server.output()
    finally:
        server.kill()
    kinds = {pb.SiteMessage.FromString(m).WhichOneof("kind") for m in sent}
    assert {"hello", "conditions", "ready", "gradient"} <= kinds and agent.stats.steps == 3

    def leaks(blob: bytes) -> list[str]:
        found = []
        for name, (windows, width) in forms.items():
            if any(blob[i:i + width] in windows for i in range(len(blob) - width + 1)):
                found.append(name)
        return found

    for m in sent:
        assert leaks(m) == [], "a site message contains raw image values"
    # The check can fail: the same scan finds one image row hidden in a message.
    planted = sent[-1] + images[2, 1, 7].tobytes()
    assert leaks(planted) == ["float32"]


def test_sites_train_on_brats_phantom_trees(tmp_path):
    from asyndgan.demo_data.phantom import PhantomConfig, write_phantom

    write_phantom(tmp_path / "data", PhantomConfig(sites=2, cases_per_site=[2, 1], test_cases=0, shape=(48, 48, 32)),
                  progress=False)
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 3, "train.min_sites": 2,
                                       "site.model.image2d.load_size": 20, "sample_every": 3})
    sites = [start_site(tmp_path / "data" / s, server.address, s, tmp_path / f"{s}.log",
                        ["--set", f"prep.cache_dir={tmp_path / 'cache'}"]) for s in ("site1", "site2")]
    try:
        assert server.wait(120) == 0, server.output()
        assert [p.wait(30) for p in sites] == [0, 0]
    finally:
        server.kill()
    log = (tmp_path / "site1.log").read_text()
    assert "brats layout" in log
    assert (tmp_path / "run" / "checkpoints" / "step_00000003.pt").exists()
    assert (tmp_path / "run" / "samples" / "step_00000003.png").exists()
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("brats-")]) == 2
