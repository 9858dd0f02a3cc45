"""Tensor codec and message conversion: round trips, and clean ProtocolErrors for malformed input."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from asyndgan.common import serde, tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.conditions import Augmentation
from asyndgan.common.config import SiteFacingConfig
from asyndgan.common.errors import ProtocolError


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "uint8", "int64"])
def test_tensor_round_trip_is_exact_in_its_dtype(dtype):
    t = (torch.randn(3, 2, 5) * 10).to(tensor_codec.WIRE_DTYPES[dtype])
    msg = tensor_codec.encode(t)
    assert msg.dtype == dtype and list(msg.shape) == [3, 2, 5]
    assert len(msg.data) == t.numel() * t.element_size()
    back = tensor_codec.decode(msg)
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_bytes_are_little_endian_raw_values():
    msg = tensor_codec.encode(torch.tensor([1.0, -2.0]))
    assert msg.data == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


def test_wire_dtype_halves_the_payload():
    t = torch.randn(4, 4, 32, 32)
    full = tensor_codec.encode(t, "float32")
    half = tensor_codec.encode(t, "bfloat16")
    assert len(half.data) * 2 == len(full.data)
    assert torch.allclose(tensor_codec.decode(half).float(), t, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: setattr(m, "dtype", "float64"), "unknown tensor dtype"),
    (lambda m: m.shape.append(2), "bytes"),
    (lambda m: setattr(m, "data", m.data[:-1]), "bytes"),
    (lambda m: m.shape.__setitem__(0, -4), "negative"),
])
def test_malformed_tensors_are_rejected(mutate, message):
    msg = tensor_codec.encode(torch.zeros(4, 3))
    mutate(msg)
    with pytest.raises(ProtocolError, match=message):
        tensor_codec.decode(msg)


def test_checks_dtype_shape_size_and_finiteness():
    msg = tensor_codec.encode(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ProtocolError, match="float16"):
        tensor_codec.decode(msg, dtype="float16")
    with pytest.raises(ProtocolError, match="shape"):
        tensor_codec.decode(msg, shape=(2, 1))
    with pytest.raises(ProtocolError, match="limit"):
        tensor_codec.decode(msg, max_bytes=4)
    with pytest.raises(ProtocolError, match="NaN"):
        tensor_codec.decode(msg, finite=True)
    assert tensor_codec.decode(msg).shape == (1, 2)


def test_decoded_tensor_does_not_alias_the_message():
    msg = tensor_codec.encode(torch.ones(3))
    t = tensor_codec.decode(msg)
    t += 1
    assert torch.equal(tensor_codec.decode(msg), torch.ones(3))


@settings(max_examples=300, deadline=None)
@given(dtype=st.text(max_size=10), shape=st.lists(st.integers(-3, 1 << 40), max_size=5), data=st.binary(max_size=64))
def test_fuzzed_tensors_only_raise_protocol_errors(dtype, shape, data):
    msg = pb.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        t = tensor_codec.decode(msg, max_bytes=1 << 20, finite=True)
    except ProtocolError:
        return
    assert t.numel() * t.element_size() == len(data)


def test_batch_and_gradient_round_trip():
    aug = Augmentation(torch.tensor([True, False]), torch.tensor([False, False]), 8, torch.tensor([0, 2]),
                       torch.tensor([1, 0]))
    batch = serde.SyntheticBatch(step=5, round=9, keys=torch.tensor([3, 0]), fake=torch.randn(2, 4, 8, 8), aug=aug)
    msg = serde.batch_to_proto(batch, "float32")
    back = serde.batch_from_proto(msg.batch, "float32", num_samples=4, stored_size=10)
    assert (back.step, back.round) == (5, 9)
    assert torch.equal(back.keys, batch.keys) and torch.equal(back.fake, batch.fake)
    assert torch.equal(back.aug.flip_h, aug.flip_h) and back.aug.crop_size == 8
    assert torch.equal(back.aug.crop_y, aug.crop_y) and torch.equal(back.aug.crop_x, aug.crop_x)
    with pytest.raises(ProtocolError, match="crop offsets"):
        serde.batch_from_proto(msg.batch, "float32", num_samples=4, stored_size=9)
    grad = serde.ImageGradient(step=5, round=9, gradient=torch.randn(2, 4, 8, 8), losses={"d": 0.5})
    gmsg = serde.gradient_to_proto(grad, "float16")
    gback = serde.gradient_from_proto(gmsg.gradient, wire_dtype="float16", shape=(2, 4, 8, 8))
    assert gback.losses == {"d": 0.5} and gback.round == 9
    assert torch.allclose(gback.gradient, grad.gradient, atol=1e-2, rtol=1e-2)


def test_batch_with_keys_out_of_range_is_rejected():
    batch = serde.SyntheticBatch(1, 1, torch.tensor([7]), torch.zeros(1, 1), Augmentation.none(1))
    with pytest.raises(ProtocolError, match="keys outside"):
        serde.batch_from_proto(serde.batch_to_proto(batch, "float32").batch, "float32", num_samples=3)


def test_gradient_of_the_wrong_shape_or_dtype_is_rejected():
    gmsg = serde.gradient_to_proto(serde.ImageGradient(1, 1, torch.zeros(2, 3), {}), "float32").gradient
    with pytest.raises(ProtocolError, match="shape"):
        serde.gradient_from_proto(gmsg, wire_dtype="float32", shape=(2, 4))
    with pytest.raises(ProtocolError, match="dtype"):
        serde.gradient_from_proto(gmsg, wire_dtype="bfloat16", shape=(2, 3))


def test_welcome_and_hello_round_trip():
    cfg = SiteFacingConfig(seed=4)
    w = serde.welcome_from_proto(serde.welcome_to_proto(serde.Welcome(3, "bfloat16", "abc", cfg)).welcome)
    assert w.site_config == cfg and w.wire_dtype == "bfloat16" and w.step == 3
    h = serde.hello_from_proto(serde.hello_to_proto(serde.Hello("a", "image2d", ["t1"])).hello)
    assert (h.site_id, h.family, h.modalities) == ("a", "image2d", ["t1"])
    with pytest.raises(ProtocolError, match="modalities"):
        serde.hello_from_proto(pb.Hello(site_id="a", modalities=["m"] * 100))


# ---- cheaper encodings: q8 and the brain region -----------------------------------------------------------------
def _q8_steps(msg, shape):
    return torch.tensor(list(msg.q_step)).view(shape[0], shape[1], *[1] * (len(shape) - 2))


def test_q8_round_trips_within_half_a_step_and_is_one_byte_per_value():
    x = torch.randn(3, 4, 16, 16) * torch.tensor([0.01, 1.0, 5.0, 100.0]).view(1, 4, 1, 1)  # very different scales
    msg = tensor_codec.encode(x, "q8")
    assert len(msg.data) == x.numel() and len(msg.q_low) == len(msg.q_step) == 12
    back = tensor_codec.decode(msg, dtype="q8", shape=tuple(x.shape), finite=True)
    err = (back - x).abs() / _q8_steps(msg, x.shape)
    assert float(err.max()) <= 0.5 + 1e-3
    # each row's extremes are exact, whatever its scale
    assert torch.allclose(back.amax(dim=(2, 3)), x.amax(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_q8_stochastic_rounding_is_within_one_step_and_unbiased():
    x = torch.randn(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    draws = [tensor_codec.decode(tensor_codec.encode(x, "q8", stochastic=True, generator=g)) for _ in range(400)]
    step = _q8_steps(tensor_codec.encode(x, "q8"), x.shape)
    assert float(max(((d - x).abs() / step).max() for d in draws)) < 1.0 + 1e-3
    mean_err = (torch.stack(draws).mean(0) - x) / step
    assert float(mean_err.abs().max()) < 0.12  # 400 draws: standard error of the mean <= 0.025 steps


def test_a_constant_row_and_an_empty_tensor_survive_q8():
    x = torch.zeros(2, 2, 4, 4)
    x[1, 0] = 3.0
    assert torch.equal(tensor_codec.decode(tensor_codec.encode(x, "q8")), x)
    empty = torch.zeros(0, 4, 8, 8)
    assert tensor_codec.decode(tensor_codec.encode(empty, "q8")).shape == (0, 4, 8, 8)


@pytest.mark.parametrize("dtype", ["float32", "float16", "q8"])
def test_region_sends_only_the_inside_and_fills_the_rest(dtype):
    x = torch.randn(3, 4, 16, 16)
    region = torch.rand(3, 16, 16) > 0.6
    region[1] = False  # a sample with nothing inside
    msg = tensor_codec.encode(x, dtype, region=region, fill=-1.0)
    itemsize = {"float32": 4, "float16": 2, "q8": 1}[dtype]
    assert len(msg.data) == int(region.sum()) * 4 * itemsize
    assert torch.equal(tensor_codec.decoded_region(msg), region)
    back = tensor_codec.decode(msg, dtype=dtype, finite=True)
    inside = region.unsqueeze(1).expand_as(x)
    assert bool((back[~inside] == -1).all())
    tolerance = {"float32": 0.0, "float16": 2e-3 * float(x.abs().max()), "q8": 0.51 * float(x.max() - x.min()) / 255}
    assert float((back[inside] - x[inside]).abs().max()) <= tolerance[dtype] + 1e-6
    # the answer on the same region leaves the region out; the receiver supplies it, and outside is zero
    answer = tensor_codec.encode(x, dtype, region=region, send_region=False, stochastic=True)
    assert not answer.region and len(answer.data) == len(msg.data)
    got = tensor_codec.decode(answer, dtype=dtype, region=region, shape=tuple(x.shape))
    assert bool((got[~inside] == 0).all())
    with pytest.raises(ProtocolError, match="region of its own"):
        tensor_codec.decode(msg, region=region)
    with pytest.raises(ProtocolError, match="bytes"):
        tensor_codec.decode(answer, region=~region)


def test_malformed_regions_and_scales_are_protocol_errors():
    x = torch.randn(2, 1, 8, 8)
    region = torch.ones(2, 8, 8, dtype=torch.bool)
    bad = tensor_codec.encode(x, "q8", region=region)
    bad.region = b"not zlib"
    with pytest.raises(ProtocolError, match="zlib"):
        tensor_codec.decode(bad)
    bomb = tensor_codec.encode(x, "float32", region=region)
    bomb.region = zlib.compress(b"\xff" * 10_000)
    with pytest.raises(ProtocolError, match="bits"):
        tensor_codec.decode(bomb)
    scales = tensor_codec.encode(x, "q8")
    del scales.q_step[:]
    with pytest.raises(ProtocolError, match="scales"):
        tensor_codec.decode(scales)
    nan = tensor_codec.encode(x, "q8")
    nan.q_low[0] = math.nan
    with pytest.raises(ProtocolError, match="scale"):
        tensor_codec.decode(nan)
    huge = tensor_codec.encode(x, "q8")
    huge.shape[:] = [1 << 20, 1 << 20]
    with pytest.raises(ProtocolError, match="limit"):
        tensor_codec.decode(huge)


def test_brain_region_fills_the_outline():
    from asyndgan.common.conditions import brain_region

    maps = torch.zeros(1, 9, 9, dtype=torch.uint8)
    maps[0, 2, 2:7] = maps[0, 6, 2:7] = maps[0, 2:7, 2] = maps[0, 2:7, 6] = 1  # a square outline
    maps[0, 4, 4] = 3  # a tumour pixel inside
    region = brain_region(maps)[0]
    assert int(region.sum()) == 25 and bool(region[3:6, 3:6].all()) and not region[0].any()


def test_auto_region_is_the_brain_for_brats_modalities_only():
    from asyndgan.common.config import ModelConfig, TrainConfig

    auto = TrainConfig(wire_region="auto")
    assert auto.region_for(ModelConfig()) == "brain"
    gray = ModelConfig.model_validate({"image2d": {"modalities": ["gray"]}})
    assert auto.region_for(gray) == "full"
    assert auto.region_for(ModelConfig(family="mlp1d")) == "full"
    assert TrainConfig(wire_region="full").region_for(ModelConfig()) == "full"
