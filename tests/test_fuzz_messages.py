"""Fuzzing what a site can send: any bytes, any message in any state, only clean ProtocolErrors come out and
a session that rejects a message stays consistent."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings, strategies as st

from asyndgan.formats.label_map_bank import LabelMapUpload
from asyndgan.central_server.session import SiteSession, State
from asyndgan.common import serde, tensor_codec
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.conditions import Augmentation
from asyndgan.common.errors import ProtocolError


def _session() -> SiteSession:
    return SiteSession(serde.Hello("s", "image2d", ["t1"]), [0], LabelMapUpload(8, 5, 1 << 20), "float32",
                       on_ready=lambda s, maps, reuse: s.mark_ready(), max_gradient_bytes=1 << 20)


tensors = st.builds(
    pb.Tensor,
    dtype=st.sampled_from(["float32", "uint8", "int64", "bfloat16", "complex", ""]),
    shape=st.lists(st.integers(-2, 10), max_size=4),
    data=st.binary(max_size=700),
)
messages = st.one_of(
    st.builds(lambda t, i, k: pb.SiteMessage(conditions=pb.ConditionChunk(index=i, first_key=k, maps=t)),
              tensors, st.integers(-1, 3), st.integers(-1, 100)),
    st.builds(lambda c, n: pb.SiteMessage(ready=pb.Ready(num_chunks=c, num_samples=n)),
              st.integers(-1, 3), st.integers(-1, 10**7)),
    st.builds(lambda t, s, r: pb.SiteMessage(gradient=pb.ImageGradient(step=s, round=r, gradient=t)),
              tensors, st.integers(-5, 5), st.integers(-5, 5)),
    st.just(pb.SiteMessage()),
    st.just(pb.SiteMessage(hello=pb.Hello(site_id="x"))),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=6))
def test_any_sequence_of_messages_gives_only_protocol_errors(seq):
    session = _session()
    for msg in seq:
        try:
            session.handle(msg)
        except ProtocolError:
            pass
        assert session.state in (State.UPLOADING, State.READY)
        if session.state is State.READY:
            assert session.num_samples > 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_get_past_parsing_as_anything_but_protocol_errors(blob):
    try:
        msg = pb.SiteMessage.FromString(blob)
    except DecodeError:
        return  # gRPC itself fails a stream whose bytes do not parse
    session = _session()
    try:
        session.handle(msg)
    except ProtocolError:
        pass


VALID = pb.Tensor(dtype="float32", shape=[1, 1, 2, 2], data=b"\0" * 16)


@settings(max_examples=200, deadline=None)
@given(tensors, st.integers(0, 3))
@example(VALID, 1)  # hypothesis alone almost never builds a well-formed gradient: make sure that branch runs
def test_fuzzed_gradients_are_checked_against_what_was_sent(tensor, round_):
    session = _session()
    session.state = State.READY
    session.send_batch(serde.SyntheticBatch(0, 1, torch.tensor([0]), torch.zeros(1, 1, 2, 2), Augmentation.none(1)))
    session.handle(pb.SiteMessage(gradient=pb.ImageGradient(step=0, round=round_, gradient=tensor)))
    answer = session.await_gradient(1, (1, 1, 2, 2), deadline=0)
    if tensor == VALID and round_ == 1:
        assert isinstance(answer, serde.ImageGradient) and bool((answer.gradient == 0).all())
    if isinstance(answer, serde.ImageGradient):
        assert answer.gradient.shape == (1, 1, 2, 2) and bool(torch.isfinite(answer.gradient).all())
        assert round_ == 1  # only the answer to the batch outstanding is ever taken
    else:
        assert session.stats.bad_messages + session.stats.steps_missed >= 1


def test_a_valid_upload_makes_the_session_ready():
    session = _session()
    maps = torch.randint(0, 5, (3, 8, 8), dtype=torch.uint8)
    session.handle(pb.SiteMessage(conditions=pb.ConditionChunk(index=0, first_key=0, maps=tensor_codec.encode(maps))))
    with pytest.raises(ProtocolError, match="declared 4"):
        session.handle(pb.SiteMessage(ready=pb.Ready(num_chunks=1, num_samples=4)))
    session2 = _session()
    session2.handle(pb.SiteMessage(conditions=pb.ConditionChunk(index=0, first_key=0, maps=tensor_codec.encode(maps))))
    session2.handle(pb.SiteMessage(ready=pb.Ready(num_chunks=1, num_samples=3)))
    assert session2.ready and session2.num_samples == 3


def test_answers_are_checked_as_they_arrive_and_batches_encoded_as_they_are_streamed():
    session = _session()
    session.state = State.READY
    batch = serde.SyntheticBatch(0, 1, torch.tensor([0]), torch.zeros(1, 1, 2, 2), Augmentation.none(1))
    session.send_batch(batch)
    assert session.stats.bytes_sent == 0  # not encoded by the training loop
    msg = session.next_message()  # the stream's thread encodes it
    assert msg.batch.round == 1 and session.stats.bytes_sent == msg.ByteSize() > 16
    wrong = pb.Tensor(dtype="float32", shape=[1, 1, 2, 3], data=b"\0" * 24)  # not the batch's shape
    session.handle(pb.SiteMessage(gradient=pb.ImageGradient(step=0, round=1, gradient=wrong)))
    assert session.stats.bad_messages == 1  # refused on arrival, before the training loop asks
    answer = session.await_gradient(1, (1, 1, 2, 2), deadline=0)
    assert isinstance(answer, str) and "bad gradient" in answer and session.stats.steps_answered == 0
    session.send_batch(serde.SyntheticBatch(1, 2, torch.tensor([0]), torch.zeros(1, 1, 2, 2), Augmentation.none(1)))
    session.handle(pb.SiteMessage(gradient=pb.ImageGradient(step=1, round=2, gradient=VALID)))
    answer = session.await_gradient(2, (1, 1, 2, 2), deadline=0)
    assert isinstance(answer, serde.ImageGradient) and session.stats.steps_answered == 1
