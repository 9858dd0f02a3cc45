"""Tensor codec and message conversion: round trips, and clean ProtocolErrors for malformed input."""

from __future__ import annotations

import math

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
    grad = serde.ImageGradient(step=5, round=9, gradient=torch.randn(2, 4, 8, 8), losses={"d": 0.5}, num_samples=2)
    gmsg = serde.gradient_to_proto(grad, "float16")
    gback = serde.gradient_from_proto(gmsg.gradient, wire_dtype="float16", shape=(2, 4, 8, 8))
    assert gback.losses == {"d": 0.5} and gback.round == 9
    assert torch.allclose(gback.gradient, grad.gradient, atol=1e-2, rtol=1e-2)


def test_batch_with_keys_out_of_range_is_rejected():
    batch = serde.SyntheticBatch(1, 1, torch.tensor([7]), torch.zeros(1, 1), Augmentation.none(1))
    with pytest.raises(ProtocolError, match="keys outside"):
        serde.batch_from_proto(serde.batch_to_proto(batch, "float32").batch, "float32", num_samples=3)


def test_gradient_of_the_wrong_shape_or_dtype_is_rejected():
    gmsg = serde.gradient_to_proto(serde.ImageGradient(1, 1, torch.zeros(2, 3), {}, 2), "float32").gradient
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
