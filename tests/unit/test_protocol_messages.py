from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import given
from hypothesis import strategies as st

from protocol.compression import Compression
from protocol.digest import digest_arrays, digest_bytes
from protocol.errors import ProtocolError
from protocol.messages import (
    HandBack,
    Lease,
    Update,
    UpdateMetrics,
    Work,
    handback_content,
    parse_handback,
    parse_reply,
    parse_work,
    reply_content,
    shard_tokens,
    work_content,
)

TOKENS = np.array([0, 1, 255, 256, 65535, 42, 7, 9], dtype=np.uint16)


def make_lease(**over: Any) -> Lease:
    values: dict[str, Any] = dict(
        run_id="run-1", round=2, shard_id=5, kind="train", base_version=3,
        base_digest="ab" * 32, data_start=100, data_end=108, data_digest=digest_bytes(
            TOKENS.tobytes()), inner_steps=2, batch_size=2, seq_len=4, lr=3e-4,
        tokenizer_digest="7" * 64, data_manifest="8" * 64,
        weight_decay=0.1, seed=11, deadline=1_700_000_000.5, nonce="0123456789abcdef" * 2)
    values.update(over)
    return Lease(**values)


def make_update(**over: Any) -> Update:
    values: dict[str, Any] = dict(
        lease=make_lease(), node_id=7, arrays_digest="cd" * 32,
        metrics=UpdateMetrics(tokens=16, steps=2, loss_before=5.5, loss_after=5.25, wall_s=1.5),
        signature=b"\x30\x01sig")
    values.update(over)
    return Update(**values)


def wire(content: RecordDict) -> RecordDict:
    """Pass a RecordDict through Flower's own object serialization (what the wire carries)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    out = inflate_object_from_contents(content.object_id, contents)
    assert isinstance(out, RecordDict)
    return out


def test_lease_round_trip() -> None:
    lease = make_lease()
    record = lease.to_record()
    assert set(record) == {f.name for f in dataclasses.fields(Lease)}
    assert Lease.from_record(record) == lease


def test_lease_names_the_runs_tokenizer_and_data_manifest() -> None:
    record = make_lease().to_record()
    assert (record["tokenizer_digest"], record["data_manifest"]) == ("7" * 64, "8" * 64)
    with pytest.raises(ProtocolError, match="tokenizer_digest"):
        make_lease(tokenizer_digest="7" * 63).to_record()  # nor is a bad one sent


def test_update_round_trip_and_layout() -> None:
    update = make_update()
    record = update.to_record()
    assert record["lease.nonce"] == update.lease.nonce
    assert record["metrics.tokens"] == 16 and record["signature"] == b"\x30\x01sig"
    assert Update.from_record(record) == update
    assert Update.from_record(make_update(signature=b"").to_record()).signature == b""


def test_to_record_writes_declared_types() -> None:
    record = make_lease(lr=1, deadline=np.float64(2e9), round=np.int64(3)).to_record()
    assert type(record["lr"]) is float and type(record["round"]) is int
    assert type(record["deadline"]) is float


def _lease_record(**over: Any) -> ConfigRecord:
    record = make_lease().to_record()
    for key, value in over.items():
        if value is _DROP:
            del record[key]
        else:
            record[key] = value
    return record


_DROP = object()
LEASE_CASES = [
    ("nonce", {"nonce": _DROP}), ("extra", {"extra": 1}), ("round", {"round": True}),
    ("lr", {"lr": "0.1"}), ("lr", {"lr": 1}), ("round", {"round": 2.0}),
    ("nonce", {"nonce": "xyz" + "0" * 29}), ("nonce", {"nonce": "AB" * 16}),
    ("nonce", {"nonce": "ab" * 15}), ("round", {"round": -1}), ("kind", {"kind": "infer"}),
    ("deadline", {"deadline": float("inf")}), ("lr", {"lr": float("nan")}),
    ("base_digest", {"base_digest": "zz"}), ("data_end", {"data_end": 100}),
    ("batch_size", {"batch_size": 0}), ("run_id", {"run_id": ""}),
    ("run_id", {"run_id": b"run-1"}), ("inner_steps", {"inner_steps": 0}),
    ("tokenizer_digest", {"tokenizer_digest": "AB" * 32}),
    ("tokenizer_digest", {"tokenizer_digest": _DROP}),
    ("data_manifest", {"data_manifest": "ab" * 31}), ("data_manifest", {"data_manifest": ""}),
    ("data_manifest", {"data_manifest": _DROP}),
]


@pytest.mark.parametrize(("field", "over"), LEASE_CASES)
def test_lease_from_record_is_strict(field: str, over: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        Lease.from_record(_lease_record(**over))
    assert field in str(info.value) and "\n" not in str(info.value)


def test_eval_lease_may_have_zero_inner_steps() -> None:
    lease = make_lease(kind="eval", inner_steps=0)
    assert Lease.from_record(lease.to_record()) == lease


UPDATE_CASES = [
    ("metrics.loss_after", {"metrics.loss_after": float("nan")}),
    ("metrics.loss_before", {"metrics.loss_before": float("-inf")}),
    ("metrics.tokens", {"metrics.tokens": True}), ("metrics.tokens", {"metrics.tokens": -1}),
    ("metrics.wall_s", {"metrics.wall_s": _DROP}), ("signature", {"signature": "sig"}),
    ("node_id", {"node_id": "7"}), ("arrays_digest", {"arrays_digest": "cd" * 31}),
    ("lease.nonce", {"lease.nonce": "nothex" * 5 + "00"}), ("lease.round", {"lease.round": -3}),
    ("metrics", {"metrics": 1}), ("lease.kind", {"lease.kind": "TRAIN"}),
]


@pytest.mark.parametrize(("field", "over"), UPDATE_CASES)
def test_update_from_record_is_strict(field: str, over: dict[str, Any]) -> None:
    record = make_update().to_record()
    for key, value in over.items():
        if value is _DROP:
            del record[key]
        else:
            record[key] = value
    with pytest.raises(ProtocolError, match=field):
        Update.from_record(record)


def test_to_record_refuses_what_from_record_would_refuse() -> None:
    bad = make_update(metrics=UpdateMetrics(1, 1, float("nan"), 1.0, 1.0))
    with pytest.raises(ProtocolError, match="metrics.loss_before"):
        bad.to_record()
    with pytest.raises(ProtocolError, match="lease.round"):
        make_update(lease=make_lease(round="2")).to_record()


def _model() -> dict[str, np.ndarray]:
    special = np.array([0.0, -0.0, 1e-45, 3.4e38, np.nan, -np.inf], dtype=np.float32)
    rng = np.random.default_rng(0)
    return {"wte": rng.standard_normal((4, 3)).astype(np.float32), "special": special,
            "scalar": np.array(2.5, dtype=np.float32)}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_work_round_trip_through_flower_carries_no_bytes() -> None:
    lease = make_lease()
    mirrors = ["https://mirror.example.edu/atom", "http://10.0.0.2:8000"]
    codec = Compression("topk", 256, 0.05)
    content = wire(work_content(lease, {"n_layer": 2, "bias": False}, mirrors, codec))
    assert parse_work(content) == Work(lease, {"n_layer": 2, "bias": False}, mirrors, codec)
    assert not any(isinstance(r, ArrayRecord) for r in content.values())  # by digest only


def test_shard_tokens_must_fill_the_lease_range() -> None:
    lease = make_lease()
    n = lease.data_end - lease.data_start
    data = (np.arange(n) % 256).astype("<u2").tobytes()
    tokens = shard_tokens(data, lease)
    assert tokens.dtype == np.dtype("<u2") and tokens.size == n
    with pytest.raises(ProtocolError, match="lease range needs"):
        shard_tokens(data[:-2], lease)


def _edit(work: RecordDict, **changes: Any) -> RecordDict:
    """``work`` with keys of its one record set (``blobs__mirrors`` is "blobs.mirrors"), or
    removed where the value is None."""
    record = dict(work["work"])
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return RecordDict({"work": ConfigRecord(record)})


def test_work_is_one_record_and_its_keys_are_checked() -> None:
    # one Flower object for the lease and its context, not four: each is pushed, stored and
    # pulled on its own, and that was most of a lock-step round's barrier
    work = work_content(make_lease(), {"n_layer": 2}, ["https://m/x"])
    assert list(work) == ["work"] and len(work.config_records) == 1
    assert parse_work(work).arch == {"n_layer": 2}
    for bad in ({"other__x": 1}, {"nodot": 1}, {"lease__": 1}):
        with pytest.raises(ProtocolError, match="unexpected key"):
            parse_work(_edit(work, **bad))
    with pytest.raises(ProtocolError, match="nonce"):
        parse_work(_edit(work, lease__nonce=None))


@pytest.mark.parametrize("mirrors", [["ftp://x/y"], ["file:///etc"], [""]])
def test_work_mirrors_must_be_http_urls(mirrors: list[str]) -> None:
    with pytest.raises(ProtocolError, match="mirrors"):
        work_content(make_lease(), {}, mirrors)
    good = work_content(make_lease(), {})
    with pytest.raises(ProtocolError, match="mirrors"):
        parse_work(_edit(good, blobs__mirrors=mirrors))


@pytest.mark.parametrize("prefetch", [["z" * 64], ["ab"], ["a" * 64] * 9, [1]])
def test_work_prefetch_must_be_a_few_digests(prefetch: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(ProtocolError, match="prefetch"):
        work_content(make_lease(), {}, prefetch=prefetch)
    good = work_content(make_lease(), {}, prefetch=["a" * 64, "b" * 64])
    assert parse_work(good).prefetch == ("a" * 64, "b" * 64)
    with pytest.raises(ProtocolError, match="prefetch"):
        parse_work(_edit(good, blobs__prefetch=prefetch))


@pytest.mark.parametrize("seed", [-2, 1.5, True, "0"])
def test_work_init_seed_is_a_seed_or_none(seed: Any) -> None:
    good = wire(work_content(make_lease(), {}, init_seed=7))
    assert parse_work(good).init_seed == 7
    assert parse_work(work_content(make_lease(), {})).init_seed is None
    with pytest.raises(ProtocolError, match="init_seed"):
        parse_work(_edit(good, blobs__init_seed=seed))
    with pytest.raises(ProtocolError, match="init_seed"):
        parse_work(_edit(good, blobs__init_seed=None))  # (missing)


def test_reply_round_trip_is_bit_exact_through_flower() -> None:
    update, arrays = make_update(), _model()
    got_update, got_arrays = parse_reply(wire(reply_content(update, arrays)))
    assert got_update == update
    assert all(_same_bits(arrays[k], got_arrays[k]) for k in arrays)
    eval_update, no_arrays = parse_reply(wire(reply_content(update, {})))
    assert eval_update == update and no_arrays == {}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype == object)
    return buf.getvalue()


def _huge_header() -> bytes:
    """A valid .npy header claiming 40 GB, followed by 8 bytes."""
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**10,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\0" * 8


def _zip() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(2))
    return buf.getvalue()


HOSTILE_ARRAYS = [
    ("stype", Array(dtype="float32", shape=(2,), stype="torch.Tensor", data=b"\0" * 8)),
    ("cannot decode", Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"junk")),
    ("header", Array(dtype="float64", shape=(2,), stype="numpy.ndarray",
                     data=_npy(np.zeros(2, np.float32)))),
    ("header", Array(dtype="float32", shape=(1, 2), stype="numpy.ndarray",
                     data=_npy(np.zeros(2, np.float32)))),
    ("cannot decode", Array(dtype="float64", shape=(2,), stype="numpy.ndarray", data=_zip())),
    ("cannot decode", Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                            data=_npy(np.zeros(2, np.float32))[:-3])),
    ("cannot decode", Array(dtype="object", shape=(2,), stype="numpy.ndarray",
                            data=_npy(np.array([1, "a"], dtype=object)))),
    ("cannot decode", Array(dtype="float32", shape=(10**10,), stype="numpy.ndarray",
                            data=_huge_header())),
    ("cannot decode", Array(dtype="<U1", shape=(2,), stype="numpy.ndarray",
                                data=_npy(np.array(["a", "b"])))),
]


@pytest.mark.parametrize(("message", "array"), HOSTILE_ARRAYS)
def test_parse_reply_rejects_hostile_arrays(message: str, array: Array) -> None:
    content = RecordDict({"update": make_update().to_record(),
                          "arrays": ArrayRecord(array_dict={"w": array})})
    with pytest.raises(ProtocolError, match=message):
        parse_reply(content)


def test_parse_rejects_missing_extra_and_mistyped_records() -> None:
    good = reply_content(make_update(), {})
    missing = RecordDict({"update": good["update"]})
    extra = RecordDict({"update": good["update"], "arrays": ArrayRecord(),
                        "more": MetricRecord({"x": 1.0})})
    mistyped = RecordDict({"update": good["update"], "arrays": ConfigRecord({"a": 1})})
    for content, field in [(missing, "arrays"), (extra, "more"), (mistyped, "arrays")]:
        with pytest.raises(ProtocolError, match=field):
            parse_reply(content)
    work = work_content(make_lease(), {})
    with pytest.raises(ProtocolError, match="work"):
        parse_work(RecordDict({}))
    with pytest.raises(ProtocolError, match="compression.scheme"):
        parse_work(_edit(work, compression__scheme="zip"))
    with pytest.raises(ProtocolError, match="model"):  # the old layout, bytes inline
        parse_work(RecordDict({"work": work["work"], "model": ArrayRecord()}))
    with pytest.raises(ProtocolError, match="missing field 'work'"):  # four records, before
        parse_work(RecordDict({"lease": make_lease().to_record()}))
    with pytest.raises(ProtocolError, match="RecordDict"):
        parse_reply({"update": good["update"]})  # type: ignore[arg-type]


hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
nonneg = st.integers(0, 2**62)
fin = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)


@given(run_id=st.text(min_size=1), kind=st.sampled_from(["train", "eval"]), start=nonneg,
       span=st.integers(1, 2**20), steps=st.integers(1, 10**6), lr=fin, deadline=fin,
       nonce=hex32, digest=hex64, seed=nonneg)
def test_lease_round_trip_property(run_id: str, kind: str, start: int, span: int, steps: int,
                                   lr: float, deadline: float, nonce: str, digest: str,
                                   seed: int) -> None:
    lease = make_lease(run_id=run_id, kind=kind, data_start=start, data_end=start + span,
                       inner_steps=steps, lr=lr, deadline=deadline, nonce=nonce,
                       base_digest=digest, seed=seed)
    assert Lease.from_record(lease.to_record()) == lease


# -- hand-backs: the reply of a node whose policy says pause ------------------------------------

def test_handback_round_trip_through_the_wire() -> None:
    back = HandBack(nonce="0123456789abcdef" * 2, reason="outside this node's time windows "
                    "(next opens Mon 19:00)", retry_after_s=25_200.0)
    assert parse_handback(wire(handback_content(back))) == back
    assert HandBack.from_record(back.to_record()) == back
    assert HandBack(back.nonce, "busy", 60).to_record()["retry_after_s"] == 60.0  # an int


def test_a_work_reply_is_not_a_handback() -> None:
    assert parse_handback(reply_content(make_update(), {})) is None


@pytest.mark.parametrize("change, match", [
    ({"nonce": "XYZ"}, "handback.nonce"),
    ({"reason": ""}, "handback.reason"),
    ({"reason": "two\nlines"}, "handback.reason"),
    ({"reason": "x" * 301}, "handback.reason"),
    ({"retry_after_s": -1.0}, "handback.retry_after_s"),
    ({"retry_after_s": float("nan")}, "handback.retry_after_s"),
])
def test_a_malformed_handback_is_refused(change: dict, match: str) -> None:
    good = HandBack(nonce="ab" * 16, reason="busy", retry_after_s=60.0)
    with pytest.raises(ProtocolError, match=match):
        dataclasses.replace(good, **change).to_record()
    record = ConfigRecord({**good.to_record(), **change})
    with pytest.raises(ProtocolError, match=match):
        parse_handback(RecordDict({"handback": record}))


def test_a_handback_record_must_be_exact() -> None:
    good = HandBack(nonce="ab" * 16, reason="busy", retry_after_s=60.0).to_record()
    with pytest.raises(ProtocolError, match="unexpected field 'extra'"):
        parse_handback(RecordDict({"handback": ConfigRecord({**good, "extra": 1})}))
    with pytest.raises(ProtocolError, match="retry_after_s: expected float, got int"):
        parse_handback(RecordDict({"handback": ConfigRecord({**good, "retry_after_s": 60})}))
    with pytest.raises(ProtocolError, match="unexpected field 'arrays'"):
        parse_handback(RecordDict({"handback": good, "arrays": ArrayRecord()}))
