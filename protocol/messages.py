"""Protocol messages: frozen dataclasses and their Flower record layouts.

Record layouts (all values of exact type; ``from_record`` rejects anything else)::

    Lease   -> ConfigRecord {run_id, round, shard_id, kind, base_version, base_digest,
                             data_start, data_end, data_digest, tokenizer_digest,
                             data_manifest, inner_steps, batch_size, seq_len, lr,
                             weight_decay, seed, deadline, nonce}
    Update  -> ConfigRecord {"lease.<field>" for every Lease field,
                             "metrics.<field>" for every UpdateMetrics field,
                             node_id, arrays_digest, signature (bytes, b"" if unsigned)}

    work  RecordDict {"work": ConfigRecord {"lease.<field>" for every Lease field,
                      "arch.<key>" (model config scalars), "blobs.mirrors": list[str],
                      "blobs.prefetch": list[str], "blobs.delta_base", "blobs.delta",
                      "compression.<key>" (scheme, block, fraction, feedback)}}
    reply RecordDict {"update": ConfigRecord, "arrays": ArrayRecord}
      or  RecordDict {"handback": ConfigRecord {nonce, reason, retry_after_s}}

Flower carries decisions, not bytes: the base model and the shard's tokens are
content-addressed blobs named by the lease (``base_digest`` is the SHA-256 of the model's
canonical bytes, ``protocol.digest.arrays_to_bytes``; ``data_digest`` that of the
little-endian tokens in the corpus's token dtype, uint16 or uint32), which the node fetches
from the mirrors the work lists, else from the coordinator's ``FetchBlob``, checking each
digest before use (``node.blobs``). Every lease also names the run's data: ``tokenizer_digest``
(the SHA-256 of the corpus's tokenizer.json) and ``data_manifest`` (that of its data manifest,
``training.manifest``); both are lease fields, so the update a node signs binds them too.

A train reply's arrays are the pseudo-gradient encoded as the work's ``compression`` says
(``protocol.compression``: by default int8, two arrays per model array) — or, as nodes send
them, empty: the payload was uploaded first (``PutBlob``) as the blob ``arrays_digest`` names. An eval reply's arrays
are exactly ``{"window_loss": float64 (n,)}``: the loss summed over each of the
``eval_window_count(lease)`` windows ``training.evaluate`` cuts the range into, so the
signed ``arrays_digest`` commits the node to every window, and the coordinator recomputes
a sample of them (``coordinator.verify.eval_judge``).

A **tasks** lease asks for lm-evaluation-harness tasks on its base version: ``data_digest``
names the task bundle (``training.evals.bundle``), ``data_end`` its number of tasks
(``data_start`` 0), and the node fetches the run's tokenizer.json as the blob
``tokenizer_digest`` names. Its reply's arrays are the answers, one float64 ``(requests, 2)``
array ``"task:<name>"`` per task (``training.evals.answers``); the coordinator scores them with
lm-eval and recomputes a sample (``coordinator.verify.task_judge``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from protocol._fields import HEX64, NONCE, check_keys, finite, normalise, read_typed, require
from protocol._records import array_record, decode_arrays, take_records
from protocol.compression import Compression
from protocol.errors import ProtocolError
from protocol.kinds import KINDS, Kind, Verdict

__all__ = [
    "EVAL_WINDOWS",
    "HANDBACK",
    "KINDS",
    "MAX_REASON",
    "HandBack",
    "Kind",
    "Lease",
    "Update",
    "UpdateMetrics",
    "Verdict",
    "WORK",
    "Work",
    "eval_window_count",
    "handback_content",
    "parse_handback",
    "parse_reply",
    "parse_work",
    "MAX_REPLY_BYTES",
    "content_from_bytes",
    "content_to_bytes",
    "reply_content",
    "shard_tokens",
    "work_content",
    "work_nonce",
]


EVAL_WINDOWS = "window_loss"  # the one array of an eval reply


@dataclass(frozen=True)
class Lease:
    """One unit of work the coordinator hands to one node (a shard of one round)."""

    run_id: str
    round: int
    shard_id: int
    kind: str  # "train" | "eval" | "tasks"
    base_version: int
    base_digest: str  # digest_arrays of the base model
    data_start: int
    data_end: int  # exclusive token index
    data_digest: str  # digest_bytes of the little-endian tokens (uint16 or uint32)
    tokenizer_digest: str  # SHA-256 of the run's tokenizer.json (CorpusInfo.tokenizer_digest)
    data_manifest: str  # SHA-256 of the run's data manifest (CorpusInfo.data_manifest)
    inner_steps: int
    batch_size: int
    seq_len: int
    lr: float
    weight_decay: float
    seed: int
    deadline: float  # unix seconds
    nonce: str  # 32 lowercase hex chars, unique per lease

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with numbers coerced to their declared types."""
        return normalise(self)

    def to_record(self) -> ConfigRecord:
        """Validated ConfigRecord with one key per field."""
        values = self.to_dict()
        _validate_lease(values, "")
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Lease:
        """Parse a lease record strictly; raises ``ProtocolError`` naming the field."""
        check_keys(record, {f.name for f in dataclasses.fields(cls)}, "lease record")
        values = read_typed(record, cls)
        _validate_lease(values, "")
        return cls(**values)


@dataclass(frozen=True)
class UpdateMetrics:
    """What a node reports about its work (eval: steps=0, loss_before=loss_after).

    For train work ``loss_before`` is the base's fp32 loss on the first batch the lease's
    seed draws; the coordinator recomputes it (``coordinator.verify.rules.base_mismatch``).
    """

    tokens: int
    steps: int
    loss_before: float
    loss_after: float
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with numbers coerced to their declared types."""
        return normalise(self, "metrics.")


@dataclass(frozen=True)
class Update:
    """A node's signed answer to a lease; the arrays travel beside it."""

    lease: Lease
    node_id: int
    arrays_digest: str
    metrics: UpdateMetrics
    signature: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict of everything but the signature (what gets signed)."""
        top = normalise(self)
        return {
            "lease": normalise(self.lease, "lease."),
            "node_id": top["node_id"],
            "arrays_digest": top["arrays_digest"],
            "metrics": self.metrics.to_dict(),
        }

    def to_record(self) -> ConfigRecord:
        """Validated flat ConfigRecord (``lease.*``, ``metrics.*``, top-level keys)."""
        values = _flatten(self.to_dict())
        _validate_update(values)
        sig = self.signature
        require(isinstance(sig, (bytes, bytearray)), "signature", "expected bytes")
        values["signature"] = bytes(sig)
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Update:
        """Parse an update record strictly; raises ``ProtocolError`` naming the field."""
        expected = {"node_id", "arrays_digest", "signature"}
        expected |= {"lease." + f.name for f in dataclasses.fields(Lease)}
        expected |= {"metrics." + f.name for f in dataclasses.fields(UpdateMetrics)}
        check_keys(record, expected, "update record")
        lease = read_typed(record, Lease, "lease.")
        metrics = read_typed(record, UpdateMetrics, "metrics.")
        top = read_typed(record, Update)
        _validate_update(_flatten({"lease": lease, "metrics": metrics, **top}))
        return cls(lease=Lease(**lease), metrics=UpdateMetrics(**metrics), **top)


def eval_window_count(lease: Lease) -> int:
    """Windows an eval reply for ``lease`` commits to: its ``data_end - data_start - 1``
    predictions in ``seq_len`` runs, the last one possibly shorter."""
    return -(-(lease.data_end - lease.data_start - 1) // lease.seq_len)


def _flatten(nested: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _validate_lease(v: Mapping[str, Any], p: str) -> None:
    require(v[p + "run_id"] != "", p + "run_id", "must not be empty")
    for name in ("round", "shard_id", "base_version", "data_start", "inner_steps", "seed"):
        require(v[p + name] >= 0, p + name, f"must be >= 0, got {v[p + name]}")
    require(v[p + "kind"] in KINDS, p + "kind",
            f"must be one of {', '.join(KINDS)}, got {v[p + 'kind']!r}")
    for name in ("base_digest", "data_digest", "tokenizer_digest", "data_manifest"):
        require(HEX64.fullmatch(v[p + name]) is not None, p + name, "must be 64 lowercase hex")
    require(v[p + "data_end"] > v[p + "data_start"], p + "data_end", "must be > data_start")
    for name in ("batch_size", "seq_len"):
        require(v[p + name] >= 1, p + name, f"must be >= 1, got {v[p + name]}")
    if v[p + "kind"] == "train":
        require(v[p + "inner_steps"] >= 1, p + "inner_steps", "must be >= 1 for train")
    for name in ("lr", "weight_decay", "deadline"):
        require(finite(v[p + name]) and v[p + name] >= 0, p + name, "must be finite and >= 0")
    require(NONCE.fullmatch(v[p + "nonce"]) is not None, p + "nonce", "must be 32 lowercase hex")


def _validate_update(v: Mapping[str, Any]) -> None:
    _validate_lease(v, "lease.")
    require(v["node_id"] >= 0, "node_id", f"must be >= 0, got {v['node_id']}")
    require(HEX64.fullmatch(v["arrays_digest"]) is not None, "arrays_digest",
            "must be 64 lowercase hex")
    for name in ("metrics.tokens", "metrics.steps"):
        require(v[name] >= 0, name, f"must be >= 0, got {v[name]}")
    for name in ("metrics.loss_before", "metrics.loss_after", "metrics.wall_s"):
        require(finite(v[name]), name, f"must be finite, got {v[name]}")


@dataclass(frozen=True)
class Work:
    """What a work message asks: the lease, the model's architecture, the blob mirrors to
    try first and how to encode the update."""

    lease: Lease
    arch: dict[str, Any]
    mirrors: list[str]
    compression: Compression = Compression()
    # blobs the lease queued behind this one names: the node fetches them while it works
    prefetch: tuple[str, ...] = ()
    # (digest of the previous version, digest of the change blob): a node holding that
    # version rebuilds the base from it (``protocol.compression.apply_delta``, int8 with
    # ``compression.block``) and checks the result against ``lease.base_digest``
    delta: tuple[str, str] | None = None
    # the seed the base was initialised from (version 0 of a run trained from scratch): a
    # node builds it (``training.state.init_arrays`` on CPU) instead of fetching it, and
    # uses it only if it hashes to ``lease.base_digest`` (another torch may init otherwise)
    init_seed: int | None = None


def work_content(lease: Lease, arch: Mapping[str, int | float | bool | str] | None = None,
                 mirrors: Sequence[str] = (),
                 compression: Compression = Compression(),
                 prefetch: Sequence[str] = (),
                 delta: tuple[str, str] | None = None,
                 init_seed: int | None = None) -> RecordDict:
    """Pack a lease, the model's architecture, the blob mirrors a node may try first, the
    update encoding, the digests of the node's next lease (to fetch while it works), the
    base as a change to the previous version (``Work.delta``) or as the seed it was
    initialised from (``Work.init_seed``)."""
    for url in mirrors:
        require(isinstance(url, str) and url.startswith(("http://", "https://")),
                "blobs.mirrors", f"not an http(s) URL: {str(url)[:80]!r}")
    _check_prefetch(prefetch)
    base, change = delta or ("", "")
    _check_delta(base, change)
    # one record, its parts' keys prefixed: each record is an object Flower pushes, stores
    # and pulls on its own (SuperLink, SuperNode, worker), and a lease's way to its node was
    # most of a lock-step round's barrier
    parts = {"lease": lease.to_record(), "arch": dict(arch or {}),
             "blobs": {"mirrors": list(mirrors), "prefetch": list(prefetch),
                       "delta_base": base, "delta": change,
                       "init_seed": -1 if init_seed is None else int(init_seed)},
             "compression": compression.to_dict()}
    return RecordDict({WORK: ConfigRecord({f"{part}.{key}": value for part, values
                                           in parts.items() for key, value in values.items()})})


def work_nonce(content: RecordDict) -> str:
    """The lease nonce of ``work_content`` (unchecked: for the sender's own bookkeeping)."""
    return str(content[WORK]["lease.nonce"])  # type: ignore[index]


def parse_work(content: RecordDict) -> Work:
    """Unpack ``work_content``; raises ``ProtocolError`` naming what is wrong."""
    (record,) = take_records(content, {WORK: ConfigRecord}, "work")
    split: dict[str, dict[str, Any]] = {"lease": {}, "arch": {}, "blobs": {}, "compression": {}}
    for key, value in record.items():
        part, dot, name = key.partition(".")
        require(dot == "." and part in split and name != "", f"work.{key}",
                "unexpected key (lease.*, arch.*, blobs.* and compression.* only)")
        split[part][name] = value
    lease_rec, arch_rec, blobs_rec, comp_rec = (
        ConfigRecord(split[k]) for k in ("lease", "arch", "blobs", "compression"))
    lease = Lease.from_record(lease_rec)
    arch = dict(arch_rec)
    for key, value in arch.items():
        require(isinstance(value, (int, float, bool, str)), f"arch.{key}", "must be a scalar")
    check_keys(blobs_rec, {"mirrors", "prefetch", "delta_base", "delta", "init_seed"},
               "blobs record")
    mirrors = blobs_rec["mirrors"]
    require(isinstance(mirrors, list) and all(isinstance(u, str) and u.startswith(
        ("http://", "https://")) for u in mirrors), "blobs.mirrors",
        "must be a list of http(s) URLs")
    prefetch = blobs_rec["prefetch"]
    _check_prefetch(prefetch)
    base, change = blobs_rec["delta_base"], blobs_rec["delta"]
    _check_delta(base, change)
    seed = blobs_rec["init_seed"]
    require(type(seed) is int and seed >= -1, "blobs.init_seed",
            "must be an integer >= 0, or -1 for none")
    return Work(lease, arch, list(mirrors), Compression.from_dict(dict(comp_rec)),
                tuple(prefetch), (str(base), str(change)) if base else None,
                None if seed == -1 else seed)


MAX_PREFETCH = 8  # a hint, not work: a node fetches at most this many blobs ahead


def _is_digest(d: object) -> bool:
    return isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)


def _check_delta(base: object, change: object) -> None:
    require((base == "" and change == "") or (_is_digest(base) and _is_digest(change)),
            "blobs.delta", "must be two SHA-256 hex digests, or both empty")


def _check_prefetch(prefetch: object) -> None:
    require(isinstance(prefetch, (list, tuple)) and len(prefetch) <= MAX_PREFETCH
            and all(_is_digest(d) for d in prefetch),
            "blobs.prefetch", f"must be a list of at most {MAX_PREFETCH} SHA-256 hex digests")


def shard_tokens(data: bytes, lease: Lease, dtype: str | None = None) -> np.ndarray:
    """The lease's tokens from its data blob (already checked against ``data_digest``):
    little-endian ``dtype`` (``"<u2"`` or ``"<u4"``, the corpus's token dtype), exactly the
    lease's range; a read-only view, no copy. Without ``dtype`` it is read off the blob's
    size (2 or 4 bytes a token): the digest already binds the bytes to the lease."""
    n = lease.data_end - lease.data_start
    if dtype is None:
        dtype = "<u4" if n and len(data) == 4 * n else "<u2"
    require(dtype in ("<u2", "<u4"), "data", f"token dtype must be <u2 or <u4, got {dtype!r}")
    size = np.dtype(dtype).itemsize * n
    require(len(data) == size, "data", f"blob holds {len(data)} bytes, the lease range "
            f"needs {size}")
    return np.frombuffer(data, dtype=dtype)


def reply_content(update: Update, arrays: Mapping[str, np.ndarray]) -> RecordDict:
    """Pack a (signed) update and its arrays into a reply content."""
    return RecordDict({"update": update.to_record(), "arrays": array_record(arrays, "arrays")})


# A reply handed in beside Flower (``SubmitReply``): a signed record and, for an evaluation,
# its per-window losses; a train payload went up by digest before it
MAX_REPLY_BYTES = 64 << 10


def content_to_bytes(content: RecordDict) -> bytes:
    """A reply content as bytes (Flower's own protobuf encoding): what ``SubmitReply``
    carries beside the Flower reply."""
    return recorddict_to_proto(content).SerializeToString(deterministic=True)


def content_from_bytes(data: bytes) -> RecordDict:
    """``content_to_bytes`` undone; ``ProtocolError`` for bytes that are not one."""
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(bytes(data))
        return recorddict_from_proto(proto)
    except Exception as err:  # noqa: BLE001 - protobuf and Flower raise several kinds
        raise ProtocolError(f"reply bytes: not a record dict ({type(err).__name__})") from None


def parse_reply(content: RecordDict) -> tuple[Update, dict[str, np.ndarray]]:
    """Unpack ``reply_content``; raises ``ProtocolError`` on any deviation."""
    update_rec, arrays_rec = take_records(
        content, {"update": ConfigRecord, "arrays": ArrayRecord}, "reply")
    return Update.from_record(update_rec), decode_arrays(arrays_rec, "arrays")


HANDBACK = "handback"  # the one record of a hand-back reply
WORK = "work"  # the one record of a work message
MAX_REASON = 300  # a hand-back's reason is one line for an event and a log


@dataclass(frozen=True)
class HandBack:
    """A node's "not now" to a lease, the other reply a lease may get: the node's contribution
    policy says pause (outside its time window, its GPU busy with someone else's work) or it
    is leaving (a batch job ending). The coordinator closes the lease without credit or
    penalty, puts the shard back in the pool and sends the node nothing for
    ``retry_after_s``. It carries no work, so nothing in it is signed: Flower's node
    authentication names the sender, and ``nonce`` binds it to the lease it answers."""

    nonce: str  # the lease's
    reason: str  # one line, at most MAX_REASON characters
    retry_after_s: float  # when the node expects to take work again (>= 0)

    def to_record(self) -> ConfigRecord:
        """Validated ConfigRecord with one key per field."""
        values = normalise(self)
        _validate_handback(values)
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> HandBack:
        """Parse a hand-back record strictly; raises ``ProtocolError`` naming the field."""
        check_keys(record, {f.name for f in dataclasses.fields(cls)}, "handback record")
        values = read_typed(record, cls)
        _validate_handback(values)
        return cls(**values)


def _validate_handback(v: Mapping[str, Any]) -> None:
    require(NONCE.fullmatch(v["nonce"]) is not None, "handback.nonce", "must be 32 lowercase hex")
    reason = v["reason"]
    require(reason != "" and len(reason) <= MAX_REASON and reason.isprintable(),
            "handback.reason", f"must be one printable line of 1 to {MAX_REASON} characters")
    require(finite(v["retry_after_s"]) and v["retry_after_s"] >= 0, "handback.retry_after_s",
            "must be finite and >= 0")


def handback_content(back: HandBack) -> RecordDict:
    """Pack a hand-back as a reply's content."""
    return RecordDict({HANDBACK: back.to_record()})


def parse_handback(content: RecordDict) -> HandBack | None:
    """The hand-back a reply carries, or None if it is another reply; raises
    ``ProtocolError`` on a malformed one."""
    if not isinstance(content, RecordDict) or HANDBACK not in content:
        return None
    (record,) = take_records(content, {HANDBACK: ConfigRecord}, "handback reply")
    return HandBack.from_record(record)
