"""Property tests: no reply a node can send crashes the decoder or the judge, or earns credit.

Every example starts from a valid, signed reply (``reply_content`` of a real update) and
breaks it: records dropped, added or of the wrong kind; update fields dropped, added, retyped
or set to hostile values; arrays with random bytes, lying headers, huge claimed shapes, wrong
lengths; and "insider" changes that the node's own key re-signs (NaN metrics, a node id or
lease field changed, NaN or huge arrays). Then:

- ``parse_reply`` raises ``ProtocolError`` or returns, never anything else;
- ``judge_reply`` on a real SQLite ledger never raises, always rejects, and the ledger
  changes by exactly one row: the rejected update.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from coordinator.config import RunConfig, parse_config
from coordinator.ledger import Ledger
from coordinator.verify.record import judge_reply
from protocol.digest import digest_arrays
from protocol.errors import ProtocolError
from protocol.messages import Lease, Update, UpdateMetrics, parse_reply, reply_content
from protocol.signing import fingerprint, generate_key, public_key_pem, sign_update

NOW = 1_700_000_000.0
KEY = generate_key()
SHAPES = {"w": ((4, 4), "<f4"), "b": ((4,), "<f4")}
VERSION = 3
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

Content = RecordDict
Mutation = Callable[[dict[str, Any], dict[str, Any]], Content]


# -- a valid reply and its parts -------------------------------------------------------------

def valid_parts(nonce: str, node_id: int) -> tuple[Lease, Update, dict[str, np.ndarray]]:
    lease = Lease(run_id="fuzz", round=1, shard_id=0, kind="train", base_version=VERSION,
                  base_digest="a" * 64, data_start=0, data_end=512, data_digest="b" * 64,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  inner_steps=2, batch_size=2, seq_len=8, lr=1e-3, weight_decay=0.0, seed=1,
                  deadline=NOW + 60, nonce=nonce)
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(4, 4)).astype("<f4"), "b": np.ones(4, "<f4")}
    update = Update(lease=lease, node_id=node_id, arrays_digest=digest_arrays(arrays),
                    metrics=UpdateMetrics(tokens=32, steps=2, loss_before=5.0, loss_after=4.0,
                                          wall_s=1.0))
    return lease, sign_update(update, KEY), arrays


def flat_update(update: Update) -> dict[str, Any]:
    """The update record's fields as a plain dict (what ``to_record`` writes)."""
    return dict(update.to_record())


def pack(fields: dict[str, Any], arrays: dict[str, Any]) -> Content:
    """A reply from raw parts, bypassing every validation of the writer side."""
    rec = ArrayRecord()
    for name, a in arrays.items():
        rec[name] = a if isinstance(a, Array) else Array(ndarray=np.asarray(a))
    return RecordDict({"update": ConfigRecord(fields), "arrays": rec})


# -- hostile values --------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 1e308])
SCALARS = (INT64 | FLOATS | st.booleans() | st.text(max_size=80) | st.binary(max_size=80)
           | st.sampled_from(["", "a" * 64, "0" * 32, "train", "eval"]))
CONFIG_VALUES = SCALARS | st.lists(INT64, max_size=4) | st.lists(st.text(max_size=8), max_size=4)
FIELD = st.sampled_from(sorted(flat_update(valid_parts("0" * 32, 1)[1])))
NAMES = st.text(min_size=1, max_size=12)
DTYPES = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i4", "|u1", "|b1", "<c8", "|O", "<U4",
                          "|V8", "float32", "", "garbage"])
SHAPE = st.lists(st.integers(-3, 2**40), max_size=4).map(tuple)
SMALL_SHAPE = st.lists(st.integers(0, 8), max_size=3).map(tuple)
BAD_METRIC = st.sampled_from([math.nan, math.inf, -math.inf]) | st.floats(max_value=-1e-12)


def npy(shape: tuple[int, ...], descr: str, payload: bytes) -> bytes:
    """A .npy file whose header claims ``shape``/``descr`` over ``payload``."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def raw_array(name_dtype: str, shape: tuple[int, ...], data: bytes,
              stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=name_dtype, shape=shape, stype=stype, data=data)


# -- mutations: each returns a broken content ------------------------------------------------

def _same(old: Any, new: Any) -> bool:
    return type(old) is type(new) and old == new


def _with(fields: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``fields`` with ``key`` set to ``value``; an example where that changes nothing is
    discarded (a no-op "mutation" is a valid reply, rightly accepted)."""
    assume(key not in fields or not _same(fields[key], value))
    return {**fields, key: value}


def _array(a: dict[str, Any], name: str, dtype: str, shape: tuple[int, ...], data: bytes,
           stype: str = "numpy.ndarray") -> dict[str, Any]:
    old = Array(ndarray=a[name])
    assume((dtype, tuple(shape), data, stype) != (old.dtype, tuple(old.shape), old.data,
                                                  old.stype))
    return {**a, name: raw_array(dtype, shape, data, stype)}

def _signed(fields: dict[str, Any], arrays: dict[str, Any], *, digest: bool = True) -> Content:
    """Re-sign ``fields`` with the node's own key (an insider), digest over ``arrays``."""
    if digest:
        fields["arrays_digest"] = digest_arrays(arrays)
    fields["signature"] = b""
    lease = {k[6:]: v for k, v in fields.items() if k.startswith("lease.")}
    metrics = {k[8:]: v for k, v in fields.items() if k.startswith("metrics.")}
    try:
        update = Update(lease=Lease(**lease), node_id=fields["node_id"],
                        arrays_digest=fields["arrays_digest"], metrics=UpdateMetrics(**metrics))
        fields["signature"] = sign_update(update, KEY).signature
    except Exception:  # noqa: BLE001 - unsignable values: send them unsigned
        pass
    return pack(fields, arrays)


mutations: list[st.SearchStrategy[Mutation]] = [
    # records
    st.sampled_from(["update", "arrays"]).map(
        lambda k: lambda f, a: RecordDict({kk: v for kk, v in pack(f, a).items() if kk != k})),
    st.tuples(NAMES.filter(lambda n: n not in ("update", "arrays")),
              st.sampled_from([ConfigRecord, ArrayRecord, MetricRecord])).map(
        lambda t: lambda f, a: RecordDict({**pack(f, a), t[0]: t[1]()})),
    st.tuples(st.sampled_from(["update", "arrays"]),
              st.sampled_from([ConfigRecord, ArrayRecord, MetricRecord])).map(
        lambda t: lambda f, a: RecordDict({**pack(f, a), t[0]: t[1]()})),
    st.just(lambda f, a: RecordDict({"update": ConfigRecord(f),
                                     "arrays": MetricRecord({"w": 1.0})})),
    # update fields
    FIELD.map(lambda k: lambda f, a: pack({kk: v for kk, v in f.items() if kk != k}, a)),
    st.tuples(NAMES, CONFIG_VALUES).filter(lambda t: t[0] not in flat_update(
        valid_parts("0" * 32, 1)[1])).map(lambda t: lambda f, a: pack({**f, t[0]: t[1]}, a)),
    st.tuples(FIELD, CONFIG_VALUES).map(lambda t: lambda f, a: pack(_with(f, *t), a)),
    # arrays
    st.tuples(st.sampled_from(["w", "b"]), st.binary(max_size=200)).map(
        lambda t: lambda f, a: pack(f, _array(a, t[0], "<f4", a[t[0]].shape, t[1]))),
    st.tuples(st.sampled_from(["w", "b"]), st.integers(0, 10**6)).map(
        lambda t: lambda f, a: pack(f, _array(a, t[0], "<f4", a[t[0]].shape, (
            d := Array(ndarray=a[t[0]]).data)[:t[1] % len(d)]))),
    st.tuples(st.sampled_from(["w", "b"]), SHAPE, DTYPES).map(
        lambda t: lambda f, a: pack(f, _array(a, t[0], t[2], t[1],
                                              Array(ndarray=a[t[0]]).data))),
    st.tuples(st.sampled_from(["w", "b"]), SHAPE.filter(len), DTYPES,
              st.binary(max_size=64)).map(
        lambda t: lambda f, a: pack(f, _array(a, t[0], "<f4", a[t[0]].shape,
                                              npy(t[1], t[2], t[3])))),
    st.tuples(st.sampled_from(["w", "b"]), st.text(max_size=20)).map(
        lambda t: lambda f, a: pack(f, _array(a, t[0], "<f4", a[t[0]].shape,
                                              Array(ndarray=a[t[0]]).data, t[1]))),
    st.sampled_from(["w", "b"]).map(
        lambda k: lambda f, a: pack(f, {kk: v for kk, v in a.items() if kk != k})),
    st.tuples(NAMES.filter(lambda n: n not in ("w", "b")), SMALL_SHAPE).map(
        lambda t: lambda f, a: pack(f, {**a, t[0]: np.zeros(t[1], "<f4")})),
    # insiders: changes the node's own key signs
    st.tuples(st.sampled_from(["metrics.loss_before", "metrics.loss_after", "metrics.wall_s"]),
              BAD_METRIC).map(
        lambda t: lambda f, a: _signed(_with(f, *t), a)),
    st.tuples(st.sampled_from(["metrics.tokens", "metrics.steps", "node_id", "lease.round",
                               "lease.shard_id", "lease.base_version", "lease.data_end",
                               "lease.inner_steps", "lease.seed"]),
              st.integers(0, 2**62)).map(lambda t: lambda f, a: _signed(_with(f, *t), a)),
    st.tuples(st.sampled_from(["lease.nonce", "lease.base_digest", "lease.run_id",
                               "lease.kind"]), st.text(max_size=70)).map(
        lambda t: lambda f, a: _signed(_with(f, *t), a)),
    st.tuples(st.sampled_from(["lease.deadline", "lease.lr"]), FLOATS).map(
        lambda t: lambda f, a: _signed(_with(f, *t), a)),
    st.tuples(st.sampled_from(["w", "b"]),
              st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 3e38])).map(
        lambda t: lambda f, a: _signed(dict(f), {**a, t[0]: np.full_like(a[t[0]], t[1])})),
    st.tuples(st.sampled_from(["w", "b"]), st.sampled_from(["<f8", "<f2", "<i4", ">f4"])).map(
        lambda t: lambda f, a: _signed(dict(f), {**a, t[0]: a[t[0]].astype(t[1])})),
    st.sampled_from(["w", "b"]).map(
        lambda k: lambda f, a: _signed(dict(f), {**a, k: a[k].reshape(-1)[:3].copy()})),
]

# wholly random records, keyed like a reply more often than not
_KEYS = st.sampled_from(["update", "arrays"]) | NAMES
_RECORDS = st.one_of(
    st.dictionaries(FIELD | NAMES, CONFIG_VALUES, max_size=8).map(ConfigRecord),
    st.dictionaries(NAMES, st.builds(raw_array, DTYPES.filter(bool), SHAPE,
                                     st.binary(max_size=64)), max_size=3).map(ArrayRecord),
    st.dictionaries(NAMES, FLOATS | INT64.filter(lambda i: abs(i) < 2**53),
                    max_size=4).map(MetricRecord),
)
mutations.append(st.dictionaries(_KEYS, _RECORDS, max_size=3).map(
    lambda d: lambda f, a: RecordDict(d)))
MUTATION = st.one_of(*mutations)


# -- the ledger ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bench:
    ledger: Ledger
    db: Path
    cfg: RunConfig
    node_id: int
    pem: bytes


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("fuzz")
    db = root / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}")
    inst = ledger.add_institution("Fuzz U")
    pem = public_key_pem(KEY)
    node = ledger.add_node(4242, "fuzzed", inst.id, pem, fingerprint(pem))
    # plain fp32 updates: this fuzzes the reply and array layers (encodings: test_compression)
    cfg = parse_config('[run]\nid = "fuzz"\n[compression]\nscheme = "none"\n', root)
    yield Bench(ledger, db, cfg, node.id, pem)
    ledger.close()


def row_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        return {t: con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}


_nonces = iter(range(1, 10**9))


def fresh_lease(b: Bench) -> tuple[Lease, int, dict[str, Any], dict[str, np.ndarray]]:
    nonce = f"{next(_nonces):032x}"
    lease, update, arrays = valid_parts(nonce, b.node_id)
    row = b.ledger.record_lease(run_id=lease.run_id, round=lease.round, shard_id=0,
                                kind="train", node_id=b.node_id, base_version=VERSION,
                                nonce=nonce, data_start=0, data_end=512,
                                deadline=lease.deadline, issued_at=NOW)
    return lease, row.id, flat_update(update), arrays


def judge(b: Bench, content: Content, lease: Lease, row_id: int):  # type: ignore[no-untyped-def]
    return judge_reply(content, lease=lease, lease_row_id=row_id, node_id=b.node_id,
                       public_key_pem=b.pem, version=VERSION, shapes=SHAPES, cfg=b.cfg,
                       ledger=b.ledger, now=NOW)


# -- properties ------------------------------------------------------------------------------

def test_the_unbroken_reply_is_accepted(bench: Bench) -> None:
    lease, row_id, fields, arrays = fresh_lease(bench)
    content = reply_content(Update.from_record(ConfigRecord(fields)), arrays)
    assert dict(content["update"]) == dict(pack(fields, arrays)["update"])  # same layout
    before = row_counts(bench.db)
    judged = judge(bench, content, lease, row_id)
    assert judged.verdict.accepted, judged.verdict
    after = row_counts(bench.db)
    assert after["updates"] == before["updates"] + 1
    assert after["credit_entries"] == before["credit_entries"] + 1


@FUZZ
@given(mutation=MUTATION)
def test_a_broken_reply_is_a_typed_error_or_a_rejection(bench: Bench,
                                                       mutation: Mutation) -> None:
    lease, row_id, fields, arrays = fresh_lease(bench)
    content = mutation(dict(fields), dict(arrays))
    try:
        parse_reply(content)
    except ProtocolError:
        pass
    before = row_counts(bench.db)
    judged = judge(bench, content, lease, row_id)
    assert not judged.verdict.accepted, judged.verdict
    assert judged.verdict.reason and judged.verdict.detail
    event(judged.verdict.reason)  # shown by --hypothesis-show-statistics
    after = row_counts(bench.db)
    # one update row and the "reject" event the recording path writes with it, nothing else
    assert {t: after[t] - before[t] for t in after if after[t] != before[t]} == {
        "updates": 1, "events": 1}
    [row] = [u for u in bench.ledger.updates() if u.lease_id == row_id]
    assert row.verdict == "rejected" and row.reason == judged.verdict.reason


@FUZZ
@given(data=st.binary(max_size=300), shape=SHAPE, dtype=DTYPES)
def test_random_array_bytes_never_escape_as_other_errors(data: bytes, shape: tuple[int, ...],
                                                        dtype: str) -> None:
    for payload in (data, npy(shape, dtype, data)):
        content = pack(flat_update(valid_parts("0" * 32, 1)[1]),
                       {"w": raw_array(dtype or "<f4", shape, payload)})
        try:
            parse_reply(content)
        except ProtocolError:
            pass


def test_huge_npy_header_is_refused_without_allocating() -> None:
    content = pack(flat_update(valid_parts("0" * 32, 1)[1]),
                   {"w": raw_array("<f4", (10**12,), npy((10**12,), "<f4", b"\0" * 16))})
    with pytest.raises(ProtocolError, match="arrays.w"):
        parse_reply(content)


def test_npy_helper_writes_what_numpy_reads() -> None:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    assert np.array_equal(np.load(io.BytesIO(npy((2, 3), "<f4", a.tobytes()))), a)


@FUZZ
@given(shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
       dtype=st.sampled_from(["<f4", "<f2", "|i1", "|u1", "<i8", ">f4", "<c8", "|b1"]))
def test_the_header_shortcut_decodes_exactly_what_numpy_does(shape: tuple[int, ...],
                                                              dtype: str) -> None:
    # decode_arrays skips parsing a header that is byte for byte numpy's own: the result
    # must be what parsing gives (values, dtype, shape, writable), and a header that lies
    # about the payload still goes the strict way
    from protocol._records import decode_arrays

    a = np.arange(math.prod(shape), dtype=np.int64).astype(dtype).reshape(shape)
    record = ArrayRecord()
    record["w"] = Array(ndarray=a)
    got = decode_arrays(record, "arrays")["w"]
    assert got.dtype == record["w"].numpy().dtype and got.shape == a.shape
    assert np.array_equal(got, record["w"].numpy()) and got.flags.writeable
    lying = ArrayRecord()
    lying["w"] = raw_array(dtype, shape, npy(shape, dtype, a.tobytes() + b"\0" * 8))
    with pytest.raises(ProtocolError, match="arrays.w"):
        decode_arrays(lying, "arrays")
