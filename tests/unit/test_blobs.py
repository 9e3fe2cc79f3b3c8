"""The content-addressed data plane: the canonical array blob, the store, the coordinator's
FetchBlob stream (chunked, resumable) and the node's fetcher with untrusted mirrors.

Every failure is a ``BlobError`` (or ``ProtocolError`` for a malformed array blob), and no
corrupt or partial blob is ever left in a cache.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.run.reply_spool import ReplySpool, WorkSpool
from coordinator.services.peek_pace import PeekPace
from coordinator.services.grpc_service import BlobService, add_to_server, chunk_wire
from node.blobs import BlobFetcher, CoordinatorBlobs, HttpMirror
from protocol import coordinator_pb2 as pb
from protocol import coordinator_pb2_grpc as pb_grpc
from protocol.blobstore import BlobDir
from protocol.messages import MAX_REPLY_BYTES
from protocol.digest import arrays_from_bytes, arrays_to_bytes, digest_arrays, digest_bytes
from protocol.errors import BlobError, ProtocolError

BLOB = np.random.default_rng(0).integers(0, 256, 3_500_000, dtype=np.uint8).tobytes()
DIGEST = hashlib.sha256(BLOB).hexdigest()


# -- the canonical array blob --------------------------------------------------------------

def test_array_blob_is_the_digested_layout_and_round_trips() -> None:
    arrays = {"w": np.arange(12, dtype=">f4").reshape(3, 4), "b": np.ones(3, np.float16),
              "n": np.array(7, np.int64), "e": np.zeros((0, 5), np.float32)}
    data = arrays_to_bytes(arrays)
    assert digest_bytes(data) == digest_arrays(arrays)
    back = arrays_from_bytes(data)
    assert list(back) == sorted(arrays) and digest_arrays(back) == digest_arrays(arrays)
    assert back["w"].dtype == np.dtype("<f4") and np.array_equal(back["w"], arrays["w"])
    assert not back["w"].flags.writeable  # a view of the blob, not a copy


@pytest.mark.parametrize("cut", [1, 8, 20, -1])
def test_truncated_array_blob_is_refused(cut: int) -> None:
    data = arrays_to_bytes({"w": np.ones((4, 4), np.float32)})
    with pytest.raises(ProtocolError, match="array blob"):
        arrays_from_bytes(data[:cut])


def test_array_blob_with_a_lying_length_or_shape_is_refused() -> None:
    data = bytearray(arrays_to_bytes({"w": np.ones(4, np.float32)}))
    huge = bytearray(data)
    huge[-16 - 8:-16] = (2**60).to_bytes(8, "little")  # the data field claims 2^60 bytes
    with pytest.raises(ProtocolError, match="overruns"):
        arrays_from_bytes(bytes(huge))
    bad_shape = bytearray(data)
    # layout: [8 len]"w" [8 len]"<f4" [8 len][8: 4] [8 len][16 bytes]: the dim is at 28
    assert bytes(data[28:36]) == (4).to_bytes(8, "little")
    bad_shape[28:36] = (5).to_bytes(8, "little")
    with pytest.raises(ProtocolError, match="needs"):
        arrays_from_bytes(bytes(bad_shape))
    two = arrays_to_bytes({"a": np.ones(1, np.float32)})
    with pytest.raises(ProtocolError, match="out of order or repeated"):
        arrays_from_bytes(two + two)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_array_blob_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        arrays_from_bytes(data)
    except ProtocolError:
        pass


# -- the store -----------------------------------------------------------------------------

def test_store_keeps_only_what_matches_its_name(tmp_path: Path) -> None:
    store = BlobDir(tmp_path / "blobs")
    assert store.put(b"hello") == digest_bytes(b"hello") and store.get(digest_bytes(b"hello"))
    with pytest.raises(BlobError, match="does not match its digest"):
        store.put(b"forged", digest="0" * 64)
    assert list((tmp_path / "blobs" / ".partial").iterdir()) == []
    with pytest.raises(BlobError, match="no blob"):
        store.get("ab" * 32)
    with pytest.raises(BlobError, match="not a blob digest"):
        store.get("../../etc/passwd")


def test_a_view_maps_the_blob_copy_on_write_and_outlives_its_eviction(tmp_path: Path) -> None:
    import os
    import time
    store = BlobDir(tmp_path, max_bytes=2_500)
    arrays = {"w": np.arange(200, dtype=np.float32)}
    digest = store.put(arrays_to_bytes(arrays))
    past = time.time() - 100
    os.utime(store.path(digest), (past, past))
    view = store.view(digest)
    assert view == store.get(digest) and store.path(digest).stat().st_mtime > past + 50
    parsed = arrays_from_bytes(view)
    parsed["w"] += 1  # writeable views (torch takes them without a copy) ...
    assert digest_bytes(store.path(digest).read_bytes()) == digest  # ... that never reach the file
    assert store.view(digest) != view and np.array_equal(parsed["w"], np.arange(200) + 1)
    store.put(b"x" * 2_000)  # evicts it: the mapping keeps what it maps
    assert not store.has(digest) and parsed["w"][-1] == 200
    assert store.view(store.put(b"")) == b""  # an empty blob (a file that cannot be mapped)
    with pytest.raises(BlobError, match="no blob"):
        store.view(digest)


def test_cache_evicts_the_least_recently_used(tmp_path: Path) -> None:
    import os
    import time
    store = BlobDir(tmp_path, max_bytes=250)
    a, b = store.put(b"a" * 100), store.put(b"b" * 100)
    past = time.time() - 100
    os.utime(store.path(a), (past, past))
    os.utime(store.path(b), (past + 1, past + 1))
    store.get(a)  # a is used again: b is now the oldest
    c = store.put(b"c" * 100)
    assert store.has(a) and store.has(c) and not store.has(b)


def test_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobDir(tmp_path)

    def full(*_a, **_k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(BlobError, match="disk full"):
        store.put(b"x" * 10)
    monkeypatch.undo()
    assert not store.has(digest_bytes(b"x" * 10))
    assert list((tmp_path / ".partial").iterdir()) == []


# -- the coordinator's stream ----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1 << 62), st.integers(0, 1 << 62),
       st.sampled_from([0, 1, 127, 128, 300, 16383, 16384, (2 << 20) + 1]))
def test_a_chunk_built_as_wire_bytes_is_the_message_protobuf_reads(size: int, offset: int,
                                                                   n: int) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    msg = pb.BlobChunk.FromString(chunk_wire(size, offset, data))
    assert (msg.size, msg.offset, msg.data) == (size, offset, data)
    if n:  # and, with data, the very bytes protobuf would write
        assert chunk_wire(size, offset, data) == pb.BlobChunk(
            size=size, offset=offset, data=data).SerializeToString()


class _Served(BlobService, pb_grpc.CoordinatorServicer):
    CHUNK = 256 * 1024

    def __init__(self, blobs: BlobDir, drop_after: int = 0, corrupt: bool = False) -> None:
        self.blobs, self.drop_after, self.corrupt = blobs, drop_after, corrupt
        self.offsets: list[int] = []

    def FetchBlob(self, request, context):  # type: ignore[no-untyped-def]
        self.offsets.append(request.offset)
        for i, chunk in enumerate(super().FetchBlob(request, context)):
            if self.drop_after and i == self.drop_after and len(self.offsets) == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")
            if self.corrupt and i == 1:
                msg = pb.BlobChunk.FromString(chunk)
                chunk = chunk_wire(msg.size, msg.offset, bytes(len(msg.data)))
            yield chunk


@pytest.fixture
def served(tmp_path: Path) -> Iterator:
    """Start a FetchBlob server over a store holding BLOB; yields (make, store)."""
    store = BlobDir(tmp_path / "coordinator")
    store.put(BLOB)
    servers = []

    def make(**kw) -> tuple[_Served, grpc.Channel]:  # type: ignore[no-untyped-def]
        servicer = _Served(store, **kw)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        return servicer, channel

    yield make, store
    for server, channel in servers:
        channel.close()
        server.stop(None)


def _fetcher(tmp_path: Path, *sources, max_bytes: int = 10 << 20) -> BlobFetcher:
    return BlobFetcher(BlobDir(tmp_path / "node-cache", max_bytes=64 << 20), list(sources),
                       max_bytes)


def _clean(fetcher: BlobFetcher) -> bool:
    """No partial transfer left, and every stored blob matches its name."""
    root = fetcher.cache.root
    return (not list((root / ".partial").iterdir())
            and all(digest_bytes(p.read_bytes()) == p.name for p in root.glob("??/*")))


def test_chunked_transfer_then_a_cache_hit(tmp_path: Path, served) -> None:
    make, _ = served
    servicer, channel = make()
    seen: list[tuple[int, int]] = []
    f = _fetcher(tmp_path, CoordinatorBlobs(channel))
    assert f.get(DIGEST, progress=lambda done, total: seen.append((done, total))) == BLOB
    assert len(seen) == 14 and seen[-1] == (len(BLOB), len(BLOB))  # 3.5 MB in 256 KiB chunks
    assert f.get(DIGEST) == BLOB and servicer.offsets == [0] and f.fetched == [DIGEST]
    assert _clean(f)


def test_a_dropped_stream_resumes_where_it_stopped(tmp_path: Path, served) -> None:
    make, _ = served
    servicer, channel = make(drop_after=5)
    f = _fetcher(tmp_path, CoordinatorBlobs(channel))
    assert f.get(DIGEST) == BLOB
    assert servicer.offsets[0] == 0 and servicer.offsets[1] == 5 * _Served.CHUNK
    assert _clean(f)


def test_corrupt_bytes_unknown_digest_and_oversize_are_refused(tmp_path: Path, served) -> None:
    make, _ = served
    _, bad = make(corrupt=True)
    f = _fetcher(tmp_path, CoordinatorBlobs(bad))
    with pytest.raises(BlobError, match="does not match its digest"):
        f.get(DIGEST)
    assert not f.cache.has(DIGEST) and _clean(f)
    _, good = make()
    with pytest.raises(BlobError, match="no blob"):
        _fetcher(tmp_path, CoordinatorBlobs(good)).get("ab" * 32)
    small = _fetcher(tmp_path, CoordinatorBlobs(good), max_bytes=1 << 20)
    with pytest.raises(BlobError, match="over the limit"):
        small.get(DIGEST)
    assert small.cache.partial(DIGEST).size == 0 and _clean(small)
    with pytest.raises(BlobError, match="not a blob digest"):
        small.get("nope")


# -- untrusted mirrors -------------------------------------------------------------------------

@pytest.fixture
def mirror(tmp_path: Path) -> Iterator:
    """An http.server over a folder; yields (url, folder)."""
    folder = tmp_path / "mirror"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *_a) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/blobs", folder
    server.shutdown()
    server.server_close()


def test_a_mirror_serves_first(tmp_path: Path, served, mirror) -> None:
    url, folder = mirror
    (folder / "blobs" / DIGEST[:2]).mkdir(parents=True)
    (folder / "blobs" / DIGEST[:2] / DIGEST).write_bytes(BLOB)  # the layout of DIR/blobs
    make, _ = served
    servicer, channel = make()
    f = _fetcher(tmp_path, HttpMirror(url), CoordinatorBlobs(channel))
    assert f.get(DIGEST) == BLOB and servicer.offsets == []  # the coordinator was not asked


@pytest.mark.parametrize("served_bytes", [BLOB[:-1] + b"\x00", BLOB[:1000], None],
                         ids=["corrupt", "truncated", "missing"])
def test_a_lying_mirror_falls_back_and_nothing_corrupt_is_kept(
        tmp_path: Path, served, mirror, served_bytes: bytes | None) -> None:
    url, folder = mirror
    (folder / "blobs" / DIGEST[:2]).mkdir(parents=True)
    if served_bytes is not None:
        (folder / "blobs" / DIGEST[:2] / DIGEST).write_bytes(served_bytes)
    make, _ = served
    servicer, channel = make()
    f = _fetcher(tmp_path, HttpMirror(url), CoordinatorBlobs(channel))
    assert f.get(DIGEST) == BLOB and servicer.offsets == [0]
    assert _clean(f)


def test_no_source_is_one_error_naming_each(tmp_path: Path, mirror) -> None:
    url, _ = mirror
    f = _fetcher(tmp_path, HttpMirror(url), HttpMirror("http://127.0.0.1:1/x"))
    with pytest.raises(BlobError) as info:
        f.get(DIGEST)
    msg = str(info.value)
    assert "no source could serve it" in msg and url in msg and "127.0.0.1:1" in msg
    assert "\n" not in msg and _clean(f)


_A, _B = "a" * 32, "b" * 32


# -- update payloads up ----------------------------------------------------------------------

def test_an_update_payload_goes_up_for_an_open_lease_only(tmp_path: Path, served) -> None:
    make, store = served
    servicer, channel = make()
    servicer.lease_open = lambda nonce: nonce == "a" * 32
    servicer.max_upload_bytes = 8 << 20
    up = CoordinatorBlobs(channel)
    payload = bytes(range(256)) * 20_000  # 5 MB: three chunks
    digest = hashlib.sha256(payload).hexdigest()
    seen: list[int] = []
    up.put(digest, payload, "a" * 32, progress=lambda done, total: seen.append(done))
    assert store.get(digest) == payload and seen[-1] == len(payload)
    other = payload[::-1]
    with pytest.raises(BlobError, match="no open train lease"):
        up.put(hashlib.sha256(other).hexdigest(), other, "b" * 32)
    with pytest.raises(BlobError, match="does not match its digest"):
        up.put("0" * 64, other, "a" * 32)  # bytes that are not what the digest says
    huge = bytes(9 << 20)
    with pytest.raises(BlobError, match="over the limit"):
        up.put(hashlib.sha256(huge).hexdigest(), huge, "a" * 32)
    assert not store.has("0" * 64) and not store.has(hashlib.sha256(huge).hexdigest())
    assert list((store.root / ".partial").iterdir()) == []


def test_a_reply_is_handed_in_beside_flower_for_an_issued_lease_only(
        tmp_path: Path, served) -> None:
    make, _ = served
    servicer, channel = make()
    node = CoordinatorBlobs(channel)
    with pytest.raises(BlobError, match="through Flower only"):
        node.submit_reply(_A, b"reply")  # a coordinator without a spool
    servicer.replies = ReplySpool(tmp_path / "replies")
    servicer.reply_open = lambda nonce: nonce == _A
    node.submit_reply(_A, b"reply")
    assert servicer.replies.take([_A]) == {_A: b"reply"}
    with pytest.raises(BlobError, match="PERMISSION_DENIED: .*no open lease"):
        node.submit_reply(_B, b"reply")
    with pytest.raises(BlobError, match="INVALID_ARGUMENT: a reply of .* over the limit"):
        node.submit_reply(_A, bytes(MAX_REPLY_BYTES + 1))
    assert servicer.replies.take([_A, _B]) == {}


def test_a_node_takes_its_next_work_by_the_nonce_it_answered_at_the_paced_rate(
        tmp_path: Path, served) -> None:
    make, _ = served
    servicer, channel = make()
    node = CoordinatorBlobs(channel)
    with pytest.raises(grpc.RpcError) as refused:
        node.next_work(_A)  # a coordinator without the spool
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    servicer.next_work = WorkSpool(tmp_path / "next-work")
    servicer.peek_pace = PeekPace(per_s=1.0, min_s=0.05, max_s=5.0)
    assert node.next_work(_A) == (b"", 1.0)  # none yet; one asker at one a second
    servicer.next_work.put(_A, b"the lease after A")
    work, retry = node.next_work(_A)
    assert work == b"the lease after A" and retry == 1.0
    assert node.next_work(_A)[0] == b"the lease after A"  # read, not taken
    assert node.next_work(_B) == (b"", 2.0)  # two askers now
    servicer.next_work.drop(_A)
    assert node.next_work(_A)[0] == b""
    with pytest.raises(grpc.RpcError) as bad:
        node.next_work("../../etc/passwd")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "32 lowercase hex" in bad.value.details()


def test_two_nodes_may_upload_the_same_payload_at_once(tmp_path: Path, served) -> None:
    # a spot check's two honest results are the same bytes: their uploads must not collide
    make, store = served
    servicer, channel = make()
    servicer.lease_open = lambda nonce: True
    servicer.max_upload_bytes = 64 << 20
    payload = np.random.default_rng(2).integers(0, 256, 12 << 20, dtype=np.uint8).tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    errors: list[Exception] = []

    def one(nonce: str) -> None:
        try:
            CoordinatorBlobs(channel).put(digest, payload, nonce)
        except Exception as err:  # noqa: BLE001 - collected for the assert
            errors.append(err)

    threads = [threading.Thread(target=one, args=(c * 32,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.get(digest) == payload
