"""The public warm start on real processes: `asyndgan-server pretrain`, `start --init`, the public discriminator
sent to a private site after Welcome (checked by SHA-256) and the patient-level ledger the site writes."""

from __future__ import annotations

import json

import pytest

from asyndgan.formats import public_start
from asyndgan.demo_data.toy import write_toy_sites
from procs import TINY_IMAGE2D, Server, run_cli, start_site

pytestmark = pytest.mark.integration


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def test_a_run_starts_from_public_weights_and_a_private_site_adapts_them(tmp_path):
    public, private = write_toy_sites(tmp_path / "data", sites=2, per_site=[24, 30], size=20, seed=3)
    meta = json.loads((private / "meta.json").read_text())
    meta["patients"] = [f"p{i // 3}" for i in range(30)]  # 10 patients of 3 slices
    (private / "meta.json").write_text(json.dumps(meta))
    model = {**TINY_IMAGE2D, "site.model.image2d.load_size": 20}
    pre = tmp_path / "public"
    r = run_cli(["asyndgan.central_server.cli", "pretrain", "--data", str(public), "--out", str(pre), "--steps", "6",
                 "--batch-size", "2", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), *_sets(model)],
                timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    record, data = public_start.read_folder(pre)
    assert record["steps"] == 6 and record["patients"] == 24  # arrays without a patient map: one image each

    server = Server(tmp_path / "run", {**model, "site.schedule.steps": 12, "train.batch_size": 2,
                                       "train.anchor_weight": 10.0}, extra=["--init", str(pre)])
    site = start_site(private, server.address, "h1", tmp_path / "h1.log", private=True,
                      extra=["--set", "privacy.delta=1e-3", "--set", "privacy.trainable=last:1",
                             "--set", "privacy.epsilon=5"])
    try:
        assert site.wait(120) == 0, (tmp_path / "h1.log").read_text()
        assert server.wait(60) == 0, server.output()
    finally:
        server.kill()
        site.kill()
    log = (tmp_path / "h1.log").read_text()
    assert "received the public discriminator weights" in log and "verified" in log
    assert "generator starts from the public pretraining" in server.output()
    assert "anchored to the public start's output (train.anchor_weight 10" in server.output()
    kept = tmp_path / "state" / "public" / f"{record['discriminator_sha256']}.safetensors"
    assert kept.read_bytes() == data
    ledger = json.loads((tmp_path / "state" / "h1.privacy-ledger.json").read_text())
    assert ledger["unit"] == "one patient" and ledger["details"]["units"] == 10
    assert ledger["details"]["grouping"] == "meta.json" and 4.5 <= ledger["epsilon_at_delta"][0] <= 5.0

    # a pretraining folder changed after the fact, or none at all, is refused with one line
    path = pre / public_start.DISCRIMINATOR
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    r = run_cli(["asyndgan.central_server.cli", "start", "--init", str(pre), "--insecure", "--port", "0",
                 "--run-dir", str(tmp_path / "run2"), *_sets(model)])
    assert r.returncode != 0 and "does not match the digest" in (r.stdout + r.stderr)
    r = run_cli(["asyndgan.central_server.cli", "start", "--init", str(tmp_path / "nothing"), "--insecure",
                 "--port", "0", "--run-dir", str(tmp_path / "run3")])
    assert r.returncode != 0 and "not a pretraining folder" in (r.stdout + r.stderr)
    r = run_cli(["asyndgan.central_server.cli", "start", "--insecure", "--port", "0", "--run-dir",
                 str(tmp_path / "run4"), "--set", "train.anchor_weight=10"])
    assert r.returncode != 0 and "give one with --init" in (r.stdout + r.stderr)


def test_a_site_refuses_public_weight_pieces_out_of_order_or_with_another_digest(tmp_path):
    from asyndgan.common import serde
    from asyndgan.common._generated import asyndgan_pb2 as pb
    from asyndgan.common.config import SiteConfig, SiteFacingConfig
    from asyndgan.common.errors import ProtocolError
    from asyndgan.site_agent.agent import SiteAgent

    import torch

    data = public_start.weights_to_bytes({"w": torch.zeros(300_000)})  # 1.2 MB: two pieces
    sha = public_start.digest(data)
    agent = SiteAgent(SiteConfig(site_id="h", data=tmp_path, insecure=True, state_dir=tmp_path / "state",
                                 privacy={"enabled": False}))
    welcomed = []
    agent._on_welcome = welcomed.append  # what follows the last piece
    welcome = serde.Welcome(step=0, wire_dtype="q8", run_id="r", site_config=SiteFacingConfig(public_start=sha))
    pieces = [pb.PublicWeights(index=i, count=c, data=d) for i, c, d in public_start.pieces(data)]
    agent._pending = (welcome, [])
    with pytest.raises(ProtocolError, match="out of order"):
        agent._on_weights(pieces[1])
    agent._pending = (welcome, [])
    with pytest.raises(ProtocolError, match="out of order or over the limits"):
        agent._on_weights(pb.PublicWeights(index=0, count=100_000, data=b"x"))
    agent._pending = (welcome, [])
    agent._on_weights(pieces[0])
    with pytest.raises(ProtocolError, match="not the"):
        agent._on_weights(pb.PublicWeights(index=1, count=2, data=b"y" * 10))  # the joined bytes differ
    assert not welcomed and not (tmp_path / "state" / "public").exists()
    agent._pending = (welcome, [])
    for piece in pieces:
        agent._on_weights(piece)
    assert welcomed == [welcome] and (tmp_path / "state" / "public" / f"{sha}.safetensors").read_bytes() == data
    agent._on_weights(pieces[0])  # pieces after the join (the site kept the file): ignored
    assert welcomed == [welcome]
