"""Label maps at scale: the compressed wire encoding and its bounds, lazy chunking on the site, the bank's
digest-named memory-mapped files (no site id can steer a path), checkpoint restore, no temporary file left by an
aborted upload, and the label-map/Ready/Shutdown serde pairs."""

from __future__ import annotations

import re
import threading
import zlib

import numpy as np
import pytest
import torch

from asyndgan.formats.label_map_bank import LabelMapUpload, LabelMapBank
from asyndgan.central_server.session import SiteSession
from asyndgan.common import serde
from asyndgan.common._generated import asyndgan_pb2 as pb
from asyndgan.common.errors import ProtocolError
from asyndgan.site_agent.agent import label_map_chunk_count, label_map_chunks

DIGEST_NAME = re.compile(r"^[0-9a-f]{64}\.npy$")


def brain_like_maps(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Mostly zeros, a one-pixel brain outline (1) and a nested tumour blob (2, 4, 3): like BraTS label maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = size / 2 + rng.normal(0, size / 50, 2)
        a, b = rng.uniform(0.3, 0.42, 2) * size
        r = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2
        out[i][(r <= 1) & (r > 0.96)] = 1
        ty, tx = cy + rng.uniform(-a / 2, a / 2), cx + rng.uniform(-b / 2, b / 2)
        d = np.hypot(yy - ty, xx - tx) / rng.uniform(size / 50, size / 9)
        out[i][d < 1], out[i][d < 0.6], out[i][d < 0.3] = 2, 4, 3
    return torch.from_numpy(out)


def _chunk(maps: torch.Tensor, encoding: str = "zlib", index: int = 0, first: int = 0) -> pb.ConditionChunk:
    return serde.label_map_chunk_to_proto(serde.LabelMapChunk(index, first, maps), encoding).conditions


def _decode(msg: pb.ConditionChunk, size: int = 64, max_bytes: int = 1 << 20) -> serde.LabelMapChunk:
    return serde.label_map_chunk_from_proto(msg, size=size, max_bytes=max_bytes)


# ---- wire encoding -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["zlib", "raw"])
def test_chunk_round_trip(encoding):
    maps = brain_like_maps(5, 64)
    back = _decode(_chunk(maps, encoding, index=3, first=17))
    assert (back.index, back.first_key) == (3, 17) and back.maps.dtype == torch.uint8
    assert torch.equal(back.maps, maps)
    back.maps[0, 0, 0] = 7  # a private, writable copy


def test_realistic_maps_compress_well_over_ten_times():
    maps = brain_like_maps(20, 256)
    msg = _chunk(maps)
    assert msg.encoding == "zlib" and maps.numel() / len(msg.maps.data) > 10
    assert torch.equal(_decode(msg, size=256, max_bytes=maps.numel()).maps, maps)


def test_zip_bomb_is_refused_at_the_declared_size():
    # 64 MiB of zeros that compress to ~64 KiB, declared as one 64x64 map (4 KiB).
    bomb = pb.ConditionChunk(index=0, first_key=0, encoding="zlib",
                             maps=pb.Tensor(dtype="uint8", shape=[1, 64, 64], data=zlib.compress(bytes(64 << 20), 9)))
    with pytest.raises(ProtocolError, match="more than the 4096 bytes"):
        _decode(bomb)


@pytest.mark.parametrize("data, message", [
    (zlib.compress(bytes(4096))[:-6], "cut short"),
    (zlib.compress(bytes(4096)) + b"junk", "after the stream"),
    (zlib.compress(bytes(4000)), "inflates to 4000 bytes"),
    (b"not zlib at all", "not a valid zlib stream"),
])
def test_malformed_compressed_chunks_are_refused(data, message):
    msg = pb.ConditionChunk(encoding="zlib", maps=pb.Tensor(dtype="uint8", shape=[1, 64, 64], data=data))
    with pytest.raises(ProtocolError, match=message):
        _decode(msg)


@pytest.mark.parametrize("tensor, encoding, message", [
    (pb.Tensor(dtype="uint8", shape=[300, 64, 64]), "zlib", "exceeds the limit"),  # 1.2 MB > 1 MiB, before inflating
    (pb.Tensor(dtype="uint8", shape=[1, 64, 32]), "zlib", "expected \\[n, 64, 64\\]"),
    (pb.Tensor(dtype="uint8", shape=[0, 64, 64]), "raw", "expected \\[n, 64, 64\\]"),
    (pb.Tensor(dtype="float32", shape=[1, 64, 64]), "raw", "dtype 'float32'"),
    (pb.Tensor(dtype="uint8", shape=[1, 64, 64]), "lz4", "unknown encoding 'lz4'"),
    (pb.Tensor(dtype="uint8", shape=[1, 64, 64], data=b"\0" * 10), "raw", "10 bytes"),
])
def test_bad_chunks_are_refused(tensor, encoding, message):
    with pytest.raises(ProtocolError, match=message):
        _decode(pb.ConditionChunk(encoding=encoding, maps=tensor))


def test_a_chunk_over_the_limit_is_refused_even_raw():
    maps = brain_like_maps(4, 64)  # 16 KiB
    with pytest.raises(ProtocolError, match="exceeds the limit of 10000"):
        _decode(_chunk(maps, "raw"), max_bytes=10_000)
    with pytest.raises(ProtocolError, match="exceeds the limit of 10000"):
        _decode(_chunk(maps, "zlib"), max_bytes=10_000)


def test_a_wrong_label_is_refused():
    up = LabelMapUpload(size=64, num_classes=3, max_chunk_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="holds label 4; allowed 0..2"):
        up.add(_decode(_chunk(brain_like_maps(2, 64))))


# ---- serde pairs ---------------------------------------------------------------------------------------------
def test_ready_and_shutdown_round_trip():
    ready = serde.Ready(num_chunks=12, num_samples=50_000)
    msg = serde.ready_to_proto(ready)
    assert msg.WhichOneof("kind") == "ready" and serde.ready_from_proto(msg.ready) == ready
    with pytest.raises(ProtocolError, match="-1 chunks"):
        serde.ready_from_proto(pb.Ready(num_chunks=-1, num_samples=3))
    for final in (True, False):
        down = serde.Shutdown(reason="training finished", final=final)
        msg = serde.shutdown_to_proto(down)
        assert msg.WhichOneof("kind") == "shutdown" and serde.shutdown_from_proto(msg.shutdown) == down
    forged = serde.shutdown_from_proto(pb.Shutdown(reason="stop\nERROR fake log line" + "x" * 2000))
    assert "\n" not in forged.reason and len(forged.reason) == 500


# ---- site side: lazy chunks, digest without copies ---------------------------------------------------------------
class _CountingMaps:
    """Looks like a uint8 [N, H, W] tensor to label_map_chunks and records every slice taken from it."""

    def __init__(self, maps: torch.Tensor):
        self.maps, self.shape, self.slices = maps, maps.shape, []

    def __getitem__(self, item):
        if isinstance(item, slice):
            self.slices.append(item)
        return self.maps[item]


def test_chunks_are_made_lazily_and_reassemble_exactly():
    maps = brain_like_maps(37, 16)
    counting = _CountingMaps(maps)
    chunks = label_map_chunks(counting, chunk_bytes=16 * 16 * 4)
    assert counting.slices == []  # nothing read before the stream asks
    first = next(chunks)
    assert len(counting.slices) == 1 and first.conditions.index == 0
    rest = list(chunks)
    assert len(rest) + 1 == label_map_chunk_count(maps, 16 * 16 * 4) == 10
    up = LabelMapUpload(size=16, num_classes=5, max_chunk_bytes=1 << 20)
    for msg in [first, *rest]:
        up.add(_decode(msg.conditions, size=16))
    done = up.finish(10, 37)
    assert torch.equal(done.maps, maps) and done.digest == serde.maps_digest(maps)


def test_digest_of_a_memory_mapped_array_matches_in_memory_and_incremental(tmp_path, monkeypatch):
    maps = brain_like_maps(30, 32)
    np.save(tmp_path / "labels.npy", maps.numpy())
    mapped = np.load(tmp_path / "labels.npy", mmap_mode="c")
    monkeypatch.setattr(serde, "_DIGEST_SLICE_BYTES", 7 * 32 * 32)  # several slices
    assert serde.maps_digest(torch.from_numpy(mapped)) == serde.maps_digest(maps) == serde.maps_digest(mapped)
    incremental = serde.MapsDigest((32, 32))
    for part in (maps[:3], maps[3:20], maps[20:]):
        incremental.update(part)
    assert incremental.hexdigest() == serde.maps_digest(maps)
    assert serde.maps_digest(maps[:29]) != serde.maps_digest(maps)
    assert serde.maps_digest(maps.reshape(30, 16, 64)) != serde.maps_digest(maps)


# ---- server side: the bank ------------------------------------------------------------------------------------
def _upload_to(bank: LabelMapBank, maps: torch.Tensor, chunk_bytes: int = 4096):
    up = bank.upload(size=maps.shape[-1], num_classes=5, max_chunk_bytes=1 << 20)
    n = 0
    for msg in label_map_chunks(maps, chunk_bytes):
        up.add(_decode(msg.conditions, size=maps.shape[-1]))
        n += 1
    return up.finish(n, maps.shape[0])


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("site", ["../../x", "a/b", "..", "/tmp/abs", "x\0y"])
def test_no_site_id_steers_a_bank_path(tmp_path, site):
    folder = tmp_path / "run" / "bank"
    bank = LabelMapBank(folder)
    a, b = brain_like_maps(6, 32, seed=1), brain_like_maps(4, 32, seed=2)
    bank.put(site, 6, a)
    bank.add_upload(site + "2", 4, _upload_to(bank, b))
    files = _files(tmp_path)
    assert files and all(p.parent == folder and DIGEST_NAME.fullmatch(p.name) for p in files), files
    assert {p.name for p in files} == {f"{serde.maps_digest(a)}.npy", f"{serde.maps_digest(b)}.npy"}
    assert torch.equal(bank.maps(site, torch.tensor([5, 0])), a[[5, 0]])


def test_upload_is_stored_as_a_memory_mapped_npy_named_by_digest(tmp_path):
    bank = LabelMapBank(tmp_path / "bank")
    maps = brain_like_maps(25, 32)
    done = _upload_to(bank, maps)
    assert done.path == tmp_path / "bank" / f"{serde.maps_digest(maps)}.npy" and done.maps is None
    on_disk = np.load(done.path, allow_pickle=False)
    assert on_disk.dtype == np.uint8 and np.array_equal(on_disk, maps.numpy())
    bank.add_upload("s", 25, done)
    assert isinstance(bank._maps["s"], np.memmap)  # served from disk, not RAM
    keys = torch.tensor([24, 3, 3, 0])
    got = bank.maps("s", keys)
    assert got.dtype == torch.uint8 and torch.equal(got, maps[keys])
    got[0] = 0  # a copy: the bank's file is untouched
    assert torch.equal(bank.maps("s", keys), maps[keys])
    assert _files(tmp_path) == [done.path]


def test_restore_from_checkpoint_state(tmp_path):
    bank = LabelMapBank(tmp_path / "bank")
    a, b = brain_like_maps(8, 32, seed=3), brain_like_maps(3, 32, seed=4)
    bank.add_upload("a", 8, _upload_to(bank, a))
    bank.put("b", 3, b)
    bank.add_upload("g", 100, None)
    state = bank.state()
    fresh = LabelMapBank(tmp_path / "bank")
    assert fresh.restore(state) == []
    assert fresh.sites() == ["a", "b", "g"] and fresh.size("g") == 100
    assert fresh.has("a", serde.maps_digest(a)) and torch.equal(fresh.maps("a", torch.arange(8)), a)
    assert torch.equal(fresh.maps("b", torch.tensor([2, 0])), b[[2, 0]])
    # A tampered checkpoint cannot point the bank at other files: the digest must be 64 hex digits.
    tampered = LabelMapBank(tmp_path / "bank")
    problems = tampered.restore('{"x": {"num_samples": 3, "digest": "../../etc/passwd"}}')
    assert len(problems) == 1 and "not a label-map digest" in problems[0] and tampered.sites() == []


def test_an_aborted_upload_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "bank"
    bank = LabelMapBank(folder)
    upload = bank.upload(32, 5, 1 << 20)
    session = SiteSession(serde.Hello("s", "image2d", ["t1"]), [0], upload, "float32",
                          on_ready=lambda s, maps, reuse: s.mark_ready(), max_gradient_bytes=1 << 20)
    maps = brain_like_maps(4, 32)
    first, second = label_map_chunks(maps, 2 * 32 * 32)
    session.handle(first)
    assert len(list(folder.glob(".upload-*.tmp"))) == 1
    session.close("connection lost")
    assert _files(tmp_path) == []
    # A chunk the reader thread was still decoding when the stream ended cannot recreate the file.
    with pytest.raises(ProtocolError, match="abandoned"):
        upload.add(_decode(second.conditions, size=32))
    assert _files(tmp_path) == []


def test_a_refused_upload_leaves_no_temporary_file_and_stale_ones_are_swept(tmp_path):
    folder = tmp_path / "bank"
    bank = LabelMapBank(folder)
    up = bank.upload(32, 5, 1 << 20)
    up.add(_decode(next(label_map_chunks(brain_like_maps(4, 32), 1 << 20)).conditions, size=32))
    with pytest.raises(ProtocolError, match="declared 5 samples"):
        up.finish(1, 5)
    assert _files(tmp_path) == []
    (folder / ".upload-0123.tmp").write_bytes(b"left by a killed server")
    LabelMapBank(folder)
    assert _files(tmp_path) == []


def test_maps_during_a_concurrent_re_upload_are_old_or_new_never_broken(tmp_path):
    bank = LabelMapBank(tmp_path / "bank")
    old, new = torch.zeros(50, 16, 16, dtype=torch.uint8), torch.ones(50, 16, 16, dtype=torch.uint8)
    bank.add_upload("s", 50, _upload_to(bank, old))
    uploads = [_upload_to(bank, m) for m in (new, old)]
    stop, seen, errors = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                rows = bank.maps("s", torch.randint(0, 50, (8,)))
                seen.add(tuple(rows.flatten().unique().tolist()))
            except Exception as exc:  # noqa: BLE001 - any failure is the bug
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        bank.add_upload("s", 50, uploads[i % 2])
    stop.set()
    reader.join()
    assert errors == [] and seen <= {(0,), (1,)} and seen
