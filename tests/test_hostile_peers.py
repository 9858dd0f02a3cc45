"""What a hostile or broken peer could do to a real server, tried with a raw gRPC client (as a client written in
another language would): steer file names or log lines with its site id, leave undecodable calls behind so that
shutdown hangs, stream gradients nobody asked for, hold connections open without a word, read the status with a
revoked or foreign certificate. Each test failed on the code before its fix."""

from __future__ import annotations

import queue
import signal
import threading
import time

import grpc
import pytest
import torch

from asyndgan.formats.label_map_bank import LabelMapUpload, LabelMapBank
from asyndgan.central_server.session import INBOX_SIZE, SessionStats, SiteSession
from asyndgan.common import pki, serde, tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.conditions import Augmentation
from asyndgan.common.errors import ProtocolError
from asyndgan.common._generated import asyndgan_pb2_grpc as pb_grpc
from asyndgan.common.grpc_options import OPTIONS
from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, run_cli, start_site, status

TRAIN = "/asyndgan.v1.AsynDGAN/Train"


def _hello(site_id: str, modalities=("t1", "t1ce", "t2", "flair")) -> pb.SiteMessage:
    return pb.SiteMessage(hello=pb.Hello(protocol_version=1, site_id=site_id, family="image2d",
                                         modalities=list(modalities)))


def _call(address: str, messages, timeout: float = 10) -> tuple[str, str]:
    """Send `messages` on a Train stream (then keep it open until the server ends it); the final status."""
    with grpc.insecure_channel(address, options=OPTIONS) as ch:
        try:
            for _ in pb_grpc.AsynDGANStub(ch).Train(iter(messages), timeout=timeout):
                pass
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
    return "OK", ""


# ---- 1: site ids -------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.serial  # measures time: alone
def test_site_ids_that_could_steer_paths_or_forge_log_lines_are_refused(tmp_path):
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 1})
    try:
        for bad in ["../../x", "a/b", "..", "ok\nINFO forged line", "nul\x00byte", "x" * 65, " lead", ""]:
            code, details = _call(server.address, [_hello(bad)])
            assert code == "INVALID_ARGUMENT" and "site id" in details, (bad, code, details)
        assert status(server.address).sites == []
    finally:
        server.kill()
    out = server.output()
    assert "'ok\\nINFO forged line'" in out  # the id shows escaped, never as a line of its own
    assert not any(line.startswith("INFO forged") for line in out.splitlines())
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing written beside the run folder
    assert not list((tmp_path / "run").rglob("*x*.npy"))


# ---- 2: shutdown after undecodable frames --------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.serial  # measures time: alone
def test_server_exits_after_undecodable_frames_and_sigterm(tmp_path):
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 1000})
    with grpc.insecure_channel(server.address, options=OPTIONS) as ch:
        raw = ch.stream_stream(TRAIN, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for _ in range(20):  # each one may leave grpc-python's stop waiting forever (a race in grpc itself)
            with pytest.raises(grpc.RpcError) as err:
                for _ in raw(iter([b"\xff\xff\xff\xff"]), timeout=10):
                    pass
            assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    assert status(server.address) is not None  # still serving
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(60)
    finally:
        server.kill()
    assert rc == 0, server.output()
    assert time.monotonic() - started < 30
    assert "server stopped at step 0" in server.output()


# ---- 3: gradients nobody asked for ---------------------------------------------------------------------------
def _ready_session() -> SiteSession:
    s = SiteSession(serde.Hello("s", "image2d", ["t1"]), [0], LabelMapUpload(8, 5, 1 << 20), "float32",
                    on_ready=lambda s, maps, reuse: s.mark_ready(), max_gradient_bytes=1 << 20)
    maps = torch.zeros(2, 8, 8, dtype=torch.uint8)
    s.handle(pb.SiteMessage(conditions=pb.ConditionChunk(index=0, first_key=0, maps=tensor_codec.encode(maps))))
    s.handle(pb.SiteMessage(ready=pb.Ready(num_chunks=1, num_samples=2)))
    assert s.ready
    return s


def _gradient(round_: int, shape=(1, 1, 2, 2)) -> pb.SiteMessage:
    return pb.SiteMessage(gradient=pb.ImageGradient(step=0, round=round_,
                                                    gradient=tensor_codec.encode(torch.zeros(shape))))


def test_a_session_holds_only_the_answer_it_asked_for():
    s = _ready_session()
    handled = 0
    with pytest.raises(ProtocolError, match="while closed"):
        for i in range(50):  # a flood of unasked gradients: counted, dropped, and the stream is ended
            s.handle(_gradient(i))
            handled += 1
    assert handled == 3 and s._inbox.qsize() <= INBOX_SIZE
    assert s.stats.bad_messages >= 3 and s.failure and "not a batch outstanding" in s.failure


def test_late_and_duplicate_answers_are_dropped_and_the_right_one_is_kept():
    s = _ready_session()
    keys, fake = torch.tensor([0]), torch.zeros(1, 1, 2, 2)
    s.send_batch(serde.SyntheticBatch(0, 1, keys, fake, Augmentation.none(1)))
    assert s.await_gradient(1, (1, 1, 2, 2), deadline=time.monotonic() + 0.05) == "no answer before the step deadline"
    s.handle(_gradient(1))  # late: the trainer gave up on round 1
    assert s.stats.late_replies == 1 and s._inbox.qsize() == 0 and s.available
    s.send_batch(serde.SyntheticBatch(1, 2, keys, fake, Augmentation.none(1)))
    s.handle(_gradient(2))
    s.handle(_gradient(2))  # a duplicate is not asked for
    answer = s.await_gradient(2, (1, 1, 2, 2), deadline=time.monotonic() + 1)
    assert isinstance(answer, serde.ImageGradient) and answer.round == 2
    assert s.stats.bad_messages == 1 and s._inbox.qsize() == 0


# ---- 4: silent peers -----------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.serial  # measures time: alone
def test_silent_peers_are_refused_or_timed_out_and_real_sites_still_train(tmp_path):
    data = write_toy_sites(tmp_path / "d", sites=1, per_site=[4], size=16)[0]
    limits = {"limits.max_sessions": 3, "limits.status_threads": 2, "limits.hello_timeout_s": 8,
              "limits.upload_idle_s": 8}  # long enough that a real site process has started and found it full
    # enough steps that the run outlives every silent peer's deadline
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 60, "checkpoint_every": 20, **limits})
    results: queue.Queue = queue.Queue()
    release = threading.Event()

    def silent(i: int) -> None:
        def messages():  # half say Hello then nothing, half say nothing at all
            if i % 2:
                yield _hello(f"silent{i}")
            release.wait(60)

        started = time.monotonic()
        results.put((*_call(server.address, messages(), timeout=60), time.monotonic() - started))

    try:
        threads = [threading.Thread(target=silent, args=(i,), daemon=True) for i in range(10)]  # pool is 5
        for t in threads:
            t.start()
            time.sleep(0.05)
        assert status(server.address) is not None  # Status keeps its threads while streams are held
        # A real site arriving now finds the server full: it is told so, waits, and joins once the peers are cut.
        site = start_site(data, server.address, "real", tmp_path / "real.log")
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a silent peer was never cut off"
        outcomes = [results.get_nowait() for _ in threads]
        codes = sorted(code for code, _, _ in outcomes)
        assert codes.count("RESOURCE_EXHAUSTED") >= 7, outcomes  # only 3 streams may be open at once
        for code, details, seconds in outcomes:
            if code == "RESOURCE_EXHAUSTED":
                assert "maximum of 3 training connections" in details and seconds < 2
            else:  # timed out at Hello, or while joining
                assert code in ("DEADLINE_EXCEEDED", "INVALID_ARGUMENT"), (code, details)
                assert "no Hello within 8 s" in details or "no upload message for 8 s" in details
                assert seconds < 16
        assert server.wait(90) == 0, server.output()
        assert site.wait(30) == 0
    finally:
        release.set()
        server.kill()
    assert "step 60: checkpoint" in server.output()
    assert "is full" in (tmp_path / "real.log").read_text()


# ---- 5: status for revoked and foreign certificates ----------------------------------------------------------
def _status_with(address: str, kit) -> str:
    ca, key, cert = ((kit / n).read_bytes() for n in ("ca.crt", "site.key", "site.crt"))
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(address, creds) as ch:
        try:
            pb_grpc.AsynDGANStub(ch).Status(pb.StatusRequest(), timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"


@pytest.mark.integration
@pytest.mark.serial  # measures time: alone
def test_status_refuses_revoked_and_not_allowed_certificates(tmp_path):
    certs = tmp_path / "certs"
    pki.init_ca(certs)
    pki.issue_server(certs, ["localhost", "127.0.0.1"])
    for name in ("a", "b", "stranger", "operator"):
        pki.issue_site(certs, name)
    server = Server(tmp_path / "run", {**TINY_IMAGE2D, "site.schedule.steps": 1, "allowed_sites": ["a", "b"]},
                    certs=certs)
    try:
        assert _status_with(server.address, certs / "sites" / "a") == "OK"
        # one certificate cannot take more than two training slots (a reconnect may overlap its stale stream)
        creds = grpc.ssl_channel_credentials(*[(certs / "sites" / "a" / n).read_bytes()
                                               for n in ("ca.crt", "site.key", "site.crt")])
        release = threading.Event()
        with grpc.secure_channel(server.address, creds) as ch:
            stub = pb_grpc.AsynDGANStub(ch)
            held = [stub.Train(iter(release.wait, True), timeout=30) for _ in range(2)]
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as third:
                next(stub.Train(iter(release.wait, True), timeout=30))
            release.set()
            for call in held:
                call.cancel()
        assert third.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this certificate already holds 2" in third.value.details()
        assert _status_with(server.address, certs / "sites" / "operator") == "OK"  # the operator kit
        r = run_cli(["asyndgan.central_server.cli", "status", "--server", server.address, "--certs",
                     str(certs / "sites" / "operator")])
        assert r.returncode == 0 and "step 0/1" in r.stdout, r.stderr
        refused = _status_with(server.address, certs / "sites" / "stranger")
        assert refused.startswith("PERMISSION_DENIED") and "neither an allowed site nor an operator" in refused
        pki.revoke_site(certs, "b")
        refused = _status_with(server.address, certs / "sites" / "b")
        assert refused.startswith("PERMISSION_DENIED") and "has been revoked" in refused
        r = run_cli(["asyndgan.central_server.cli", "status", "--server", server.address, "--certs",
                     str(certs / "sites" / "b")])
        assert r.returncode == 2 and "has been revoked" in r.stderr
    finally:
        server.kill()


# ---- 8b: settings that validate but cannot run ---------------------------------------------------------------
def test_server_refuses_a_discriminator_too_deep_for_the_image_size(tmp_path):
    r = run_cli(["asyndgan.central_server.cli", "start", "--insecure", "--run-dir", str(tmp_path / "run"),
                 "--port", "0", "--set", "site.model.image2d.image_size=16"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: invalid configuration") and "d_layers 3" in line and "image_size 16" in line
    assert "image_size >= 24 or d_layers <= 2" in line



# ---- 6: a site re-uploads smaller maps while a step waits for it ---------------------------------------------
class _RejoiningSite:
    """Duck-types SiteSession: while the trainer waits for its gradient, its label maps are replaced by fewer."""

    def __init__(self, bank: LabelMapBank, keys_before: int):
        self.site_id, self.channels, self.num_samples = "a", None, keys_before
        self.statistics: dict = {}  # released intensity statistics: none
        self.left, self.stats = None, SessionStats()
        self.ready = self.available = True
        self.bank = bank

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        self.sent = batch

    def await_gradient(self, round_, shape, deadline):
        self.bank.put("a", 1, torch.zeros(1, 16, 16, dtype=torch.uint8))  # the rejoin, mid-step
        return serde.ImageGradient(self.sent.step, round_, torch.zeros(shape), {"d": 0.5}, shape[0])


def test_a_site_replacing_its_maps_mid_step_cannot_crash_the_step(tmp_path):
    from asyndgan.central_server.trainer import Trainer
    from asyndgan.common.config import ServerConfig, load_config
    from asyndgan.simulation.local_sites import LocalRegistry

    cfg = load_config(ServerConfig, None, {**TINY_IMAGE2D, "train.batch_size": 4, "run_dir": str(tmp_path)})
    bank = LabelMapBank()
    bank.put("a", 50, torch.randint(0, 5, (50, 16, 16), dtype=torch.uint8))
    site = _RejoiningSite(bank, 50)
    trainer = Trainer(cfg, registry=LocalRegistry([site]), bank=bank, run_dir=tmp_path)
    torch.manual_seed(0)
    for _ in range(5):  # keys drawn from 0..49; the maps now hold one: a re-read would raise IndexError
        report = trainer.train_step([site])
        assert report is not None and report.answered == ["a"]
    maps, fake = report.preview
    assert maps.shape == (4, 16, 16) and fake.shape == (4, 4, 16, 16)
    assert trainer.save_samples(report).is_file()


def test_a_site_cannot_upload_more_label_maps_than_the_server_allows(tmp_path):
    from asyndgan.central_server.registry import SiteRegistry
    from asyndgan.common.config import ServerConfig, load_config

    cfg = load_config(ServerConfig, None, {**TINY_IMAGE2D, "limits.max_label_maps": 2, "run_dir": str(tmp_path)})
    registry = SiteRegistry(cfg, LabelMapBank(tmp_path / "bank"))
    session, _ = registry.join(serde.Hello("a", "image2d", ["t1"]))
    maps = torch.zeros(3, 16, 16, dtype=torch.uint8)
    chunk = pb.SiteMessage(conditions=pb.ConditionChunk(index=0, first_key=0, maps=tensor_codec.encode(maps)))
    with pytest.raises(ProtocolError, match="more than 2 label maps"):
        session.handle(chunk)
    assert not [p for p in (tmp_path / "bank").glob("*") if p.is_file()]  # nothing of it kept on disk
