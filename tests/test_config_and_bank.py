"""Config validation (clear errors naming the field), label-map upload checks, site gradients."""

from __future__ import annotations


import pytest
import torch

from asyndgan.formats.label_map_bank import LabelMapUpload
from asyndgan.common import serde, tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.config import ServerConfig, SiteFacingConfig, load_config, parse_override
from asyndgan.common.errors import ConfigError, ProtocolError
from asyndgan.site_agent.agent import label_map_chunks
from asyndgan.site_agent.gradients import SiteLearner


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "server.toml"
    f.write_text('port = 6000\n[train]\nbatch_size = 4\nsampling = "uniform"\n')
    cfg = load_config(ServerConfig, f, {"train.batch_size": 8})
    assert cfg.port == 6000 and cfg.train.batch_size == 8 and cfg.train.sampling == "uniform"
    assert cfg.g_optim.lr == 2e-4 and cfg.site.loss.lambda_l1 == 0


@pytest.mark.parametrize("key, value, field", [
    ("train.batch_size", 0, "train.batch_size"),
    ("train.sampling", "random", "train.sampling"),
    ("site.model.image2d.image_size", 30, "image_size"),
    ("train.wire_dtype", "float64", "train.wire_dtype"),
    ("trian.steps", 3, "trian"),
])
def test_bad_values_name_the_field(key, value, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ServerConfig, None, {key: value})


def test_override_parsing_and_missing_file(tmp_path):
    assert parse_override("train.flip=false") == ("train.flip", False)
    assert parse_override("host=example.org") == ("host", "example.org")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ServerConfig, tmp_path / "nope.toml")


def _add(up: LabelMapUpload, msg: pb.ConditionChunk) -> None:
    up.add(serde.label_map_chunk_from_proto(msg, size=up.size, max_bytes=up.max_chunk_bytes))


def _upload(maps: torch.Tensor, declared: int, chunk_bytes: int = 100, max_samples: int = 1000) -> torch.Tensor:
    up = LabelMapUpload(size=maps.shape[-1], num_classes=5, max_chunk_bytes=1 << 20, max_samples=max_samples)
    chunks = list(label_map_chunks(maps, chunk_bytes))
    for c in chunks:
        _add(up, c.conditions)
    return up.finish(len(chunks), declared).maps


def test_chunked_upload_reassembles_exactly():
    maps = torch.randint(0, 5, (37, 8, 8), dtype=torch.uint8)
    chunks = list(label_map_chunks(maps, 200))
    assert len(chunks) == 13 and all(c.ByteSize() < 300 for c in chunks)
    assert torch.equal(_upload(maps, 37, 200), maps)


@pytest.mark.parametrize("bad, message", [
    (torch.randint(0, 5, (4, 8, 7), dtype=torch.uint8), "shape"),
    (torch.full((4, 8, 8), 9, dtype=torch.uint8), "label 9"),
])
def test_bad_uploads_are_rejected(bad, message):
    with pytest.raises(ProtocolError, match=message):
        up = LabelMapUpload(size=8, num_classes=5, max_chunk_bytes=1 << 20)
        _add(up, pb.ConditionChunk(index=0, first_key=0, maps=tensor_codec.encode(bad)))


def test_upload_count_and_order_are_checked():
    maps = torch.zeros(6, 8, 8, dtype=torch.uint8)
    with pytest.raises(ProtocolError, match="declared 7"):
        _upload(maps, 7)
    with pytest.raises(ProtocolError, match="more than 5 label maps"):
        _upload(maps, 6, max_samples=5)
    up = LabelMapUpload(size=8, num_classes=5, max_chunk_bytes=1 << 20)
    chunks = list(label_map_chunks(maps, 128))
    with pytest.raises(ProtocolError, match="out of order"):
        _add(up, chunks[1].conditions)


def test_site_gradient_is_the_gradient_of_its_loss_and_only_for_its_channels():
    cfg = SiteFacingConfig.model_validate({"model": {"image2d": {"image_size": 16, "ndf": 4, "d_layers": 2,
                                                                 "modalities": ["t1", "t2", "flair"]}},
                                           "loss": {"lambda_l1": 0.0}})
    learner = SiteLearner(cfg, ["t2"])
    maps = torch.randint(0, 5, (2, 16, 16), dtype=torch.uint8)
    real, fake = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    grad, losses = learner.step(0, maps, real, fake)
    assert grad.shape == fake.shape and set(losses) == {"d", "g_adv"}
    # Finite differences on the adversarial loss with the (already updated) discriminator.
    from asyndgan.common.conditions import one_hot
    x = one_hot(maps, 5)

    def loss(f):
        logits = learner.discriminators["t2"](torch.cat([x, f], 1))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).double()

    idx, eps = (1, 0, 5, 7), 1e-2
    plus, minus = fake.clone(), fake.clone()
    plus[idx] += eps
    minus[idx] -= eps
    with torch.no_grad():
        numeric = float((loss(plus) - loss(minus)) / (2 * eps))
    assert abs(numeric - float(grad[idx])) < 1e-3 + 0.05 * abs(numeric)
    assert float(grad.abs().sum()) > 0
