"""Domain verification of a node's reply before anything reaches aggregation.

Checks run cheapest first and stop at the first failure, each with its own
``protocol.errors.Reason`` code::

    unknown_node          update.node_id is not the node the lease was issued to, or that
                          node has been revoked (``atom-coordinator revoke-node``)
    bad_signature         signature does not verify with that node's registered key
    lease_mismatch        any lease field (nonce included) differs from the issued lease;
                          a replay of an update made for another lease lands here
    stale_base            built on another model version / base digest (the asynchronous
                          loop accepts bases up to ``max_staleness`` versions behind)
    late                  received after lease.deadline
    digest_mismatch       arrays do not hash to the signed arrays_digest
    bad_encoding          train: the compressed update's structure is not what the run's
                          ``[compression]`` and the model's shapes declare (names, dtypes,
                          counts, scales or values out of range, indices out of order)
    shape_mismatch        train: names/shapes/dtypes differ from the model; eval: anything
                          but one float64 ``window_loss`` array of one value per window;
                          tasks: anything but 1 to the lease's task count ``task:<name>``
                          float64 (requests, 2) arrays
    non_finite            NaN or infinity in an array
    norm_bound            train: L2 norm over all arrays above max_norm
    metrics_inconsistent  reported steps/tokens/losses disagree with the lease; eval: a
                          negative window, or windows that do not sum to the claimed total;
                          tasks: a positive log-likelihood, a greedy flag not 0 or 1, or
                          log-likelihoods that do not sum to the claimed total
    malformed             anything unexpected (hostile input never raises)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from protocol.compression import Compression, decode
from protocol.digest import digest_arrays
from protocol.errors import ProtocolError, Reason
from protocol.messages import EVAL_WINDOWS, Kind, Lease, Update, eval_window_count
from protocol.signing import verify_update
from training.evals.answers import PREFIX as ANSWERS_PREFIX

__all__ = ["Expected", "Ruling", "verify"]


@dataclass(frozen=True)
class Expected:
    """What the coordinator knows, from its own records, when a reply arrives."""

    lease: Lease  # the lease the coordinator issued to this node
    node_id: int  # ledger node id the lease was issued to
    public_key_pem: bytes  # that node's registered key (PEM SPKI)
    current_version: int  # the model version being aggregated onto now
    shapes: Mapping[str, tuple[tuple[int, ...], str]]  # train: name -> (shape, dtype str)
    max_norm: float  # L2 bound over all arrays together (inf = off)
    now: float  # receive time (unix seconds)
    revoked: bool = False  # the ledger says the node was revoked: nothing of it is accepted
    compression: Compression | None = None  # train: how updates are encoded (None: plain)
    # the arrays were read from the blob store under ``update.arrays_digest``: the store
    # hashed them on arrival and they parse only canonically, so that digest holds already
    from_store: bool = False
    max_staleness: int = 0  # versions the lease's base may lag current_version by


@dataclass(frozen=True)
class Ruling:
    """Outcome of ``verify``; ``norm`` is set once the norm has been computed."""

    accepted: bool
    reason: str | None
    detail: str
    norm: float | None = None
    # an accepted train reply's decoded pseudo-gradient (what the round judge and the
    # aggregator see); None for eval replies and rejections
    arrays: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _check(ok: bool, reason: str, detail: str) -> None:
    if not ok:
        raise _Reject(reason, detail)


def verify(update: Update, arrays: Mapping[str, np.ndarray], exp: Expected) -> Ruling:
    """Accept or reject ``update`` with ``arrays`` against what ``exp`` says; never raises."""
    try:
        norm, decoded = _verify(update, arrays, exp)
    except _Reject as r:
        return Ruling(False, r.reason, r.detail, None)
    except Exception as exc:  # hostile input must never crash the coordinator
        return Ruling(False, Reason.MALFORMED, f"malformed reply: {type(exc).__name__}: {exc}"
                       .splitlines()[0], None)
    return Ruling(True, None, f"accepted (norm {norm:.4g})", norm,
                   decoded if exp.lease.kind == Kind.TRAIN else None)


def _verify(update: Update, arrays: Mapping[str, np.ndarray], exp: Expected
            ) -> tuple[float, dict[str, np.ndarray]]:
    node = exp.node_id
    _check(isinstance(update, Update), Reason.MALFORMED, "reply is not an Update")
    _check(not exp.revoked, Reason.UNKNOWN_NODE, f"node {node} is revoked")
    _check(update.node_id == node, Reason.UNKNOWN_NODE,
           f"update claims node {update.node_id!r}, lease was issued to node {node}")
    _check(verify_update(update, exp.public_key_pem), Reason.BAD_SIGNATURE,
           f"signature does not match node {node}'s registered key")

    got, issued = update.lease.to_dict(), exp.lease.to_dict()
    differ = [k for k in issued if got.get(k) != issued[k]]
    _check(not differ, Reason.LEASE_MISMATCH,
           f"update is bound to another lease ({', '.join(differ)} differ)")

    lease = exp.lease
    behind = exp.current_version - lease.base_version
    _check(0 <= behind <= exp.max_staleness, Reason.STALE_BASE,
           f"built on version {lease.base_version}, coordinator is at {exp.current_version}"
           + (f" (at most {exp.max_staleness} behind)" if exp.max_staleness else ""))
    _check(update.lease.base_digest == lease.base_digest, Reason.STALE_BASE,
           "built on a base model with another digest")
    _check(exp.now <= lease.deadline, Reason.LATE,
           f"received {exp.now - lease.deadline:.1f} s after the deadline")

    _check(isinstance(arrays, Mapping), Reason.MALFORMED, "arrays are not a mapping")
    _check(exp.from_store or digest_arrays(arrays) == update.arrays_digest,
           Reason.DIGEST_MISMATCH, "arrays do not match the signed arrays_digest")
    if lease.kind == Kind.EVAL:
        _check_windows(arrays, lease)
    elif lease.kind == Kind.TASKS:
        _check_answers(arrays, lease)
    else:
        arrays = _decode(arrays, exp)
        _check_shapes(arrays, exp.shapes)

    sq = 0.0
    for name, a in arrays.items():
        s = _squares(a)
        # NaN and inf make the sum NaN or inf: one pass checks both; only then is the
        # array scanned for them (finite values whose float32 squares overflow are summed
        # again in float64)
        if not math.isfinite(s):
            _check(bool(np.isfinite(a).all()), Reason.NON_FINITE,
                   f"array {name!r} has NaN or inf")
            s = _squares(a.astype(np.float64))
        sq += s
    norm = math.sqrt(sq) if lease.kind == Kind.TRAIN else 0.0  # eval windows are no update
    _check(norm <= exp.max_norm, Reason.NORM_BOUND,
           f"update norm {norm:.4g} exceeds the bound {exp.max_norm:.4g}")
    _check_metrics(update, lease)
    if lease.kind == Kind.EVAL:
        _check_window_total(arrays[EVAL_WINDOWS], update)
    elif lease.kind == Kind.TASKS:
        _check_answer_total(arrays, update)
    return norm, dict(arrays)


_SQUARES_CHUNK = 1 << 16


def _squares(a: np.ndarray) -> float:
    """Sum of squares: BLAS dot in the array's own precision over chunks, summed exactly
    (one read of the array, no float64 copy; float32 chunks are within ~1e-7 relative)."""
    flat = a.reshape(-1)
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # the caller looks at inf and NaN
        return math.fsum(float(np.dot(c, c)) for c in
                         (flat[i:i + _SQUARES_CHUNK] for i in range(0, flat.size,
                                                                     _SQUARES_CHUNK)))


def _decode(arrays: Mapping[str, np.ndarray], exp: Expected) -> Mapping[str, np.ndarray]:
    """A train reply's pseudo-gradient from its encoding (checked before anything is built)."""
    if exp.compression is None:
        return arrays
    try:
        return decode(arrays, exp.compression, exp.shapes, exp.max_norm)
    except ProtocolError as err:
        raise _Reject(Reason.BAD_ENCODING, str(err)) from None


def _check_windows(arrays: Mapping[str, np.ndarray], lease: Lease) -> None:
    """An eval reply carries one float64 loss sum per window of its range, nothing else."""
    names = sorted(arrays)
    _check(names == [EVAL_WINDOWS], Reason.SHAPE_MISMATCH,
           f"eval reply carries arrays {names[:3]}, expected only {EVAL_WINDOWS!r}")
    w, want = arrays[EVAL_WINDOWS], eval_window_count(lease)
    _check(w.dtype == np.dtype("<f8") and w.ndim == 1, Reason.SHAPE_MISMATCH,
           f"{EVAL_WINDOWS} must be 1-D float64, got {w.dtype.str} {tuple(w.shape)}")
    _check(w.size == want, Reason.SHAPE_MISMATCH,
           f"eval reply has {w.size} windows, the lease's range holds {want}")


# Relative slack between the claimed mean loss x tokens and the windows' sum: float64
# rounding is ~1e-16; a lie that moved the total but not the windows is far above this.
_TOTAL_RTOL = 1e-9


def _check_window_total(windows: np.ndarray, update: Update) -> None:
    _check(bool((windows >= 0).all()), Reason.METRICS_INCONSISTENT,
           "an eval window has a negative loss")
    _check_total(float(windows.sum()), update, "windows")


def _check_total(total: float, update: Update, what: str) -> None:
    """``total`` nats (of the reply's ``what``) are its claimed mean loss x tokens."""
    m = update.metrics
    claimed = float(m.loss_before) * m.tokens
    _check(abs(total - claimed) <= _TOTAL_RTOL * max(1.0, abs(total)),
           Reason.METRICS_INCONSISTENT,
           f"{what} sum to {total:.6g} nats, the reply claims {claimed:.6g} "
           f"({m.loss_before:.6g} x {m.tokens} tokens)")


def _check_answers(arrays: Mapping[str, np.ndarray], lease: Lease) -> None:
    """A tasks reply carries one float64 (requests, 2) answers array per task, at most as many
    as the lease's bundle holds (``training.evals.answers``; which tasks and how many
    requests each is the task judge's to check, with lm-eval)."""
    names = sorted(arrays)
    _check(0 < len(names) <= lease.data_end, Reason.SHAPE_MISMATCH,
           f"tasks reply carries {len(names)} arrays, the bundle holds {lease.data_end} tasks")
    for name in names:
        a = arrays[name]
        _check(name.startswith(ANSWERS_PREFIX), Reason.SHAPE_MISMATCH,
               f"tasks reply carries array {name[:80]!r}, expected {ANSWERS_PREFIX}<task>")
        _check(a.dtype == np.dtype("<f8") and a.ndim == 2 and a.shape[1] == 2 and a.shape[0] > 0,
               Reason.SHAPE_MISMATCH, f"{name[:80]} must be float64 (requests, 2), got "
               f"{a.dtype.str} {tuple(a.shape)}")


def _check_answer_total(arrays: Mapping[str, np.ndarray], update: Update) -> None:
    bad = Reason.METRICS_INCONSISTENT
    lls = np.concatenate([a[:, 0] for a in arrays.values()])
    greedy = np.concatenate([a[:, 1] for a in arrays.values()])
    _check(bool((lls <= 0).all()), bad, "an answer has a positive log-likelihood")
    _check(bool(np.isin(greedy, (0.0, 1.0)).all()), bad, "a greedy flag is not 0 or 1")
    _check_total(-float(lls.sum()), update, "answers")


def _check_shapes(arrays: Mapping[str, np.ndarray],
                  shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    _check(not missing, Reason.SHAPE_MISMATCH, f"missing array {missing[:1]}")
    _check(not extra, Reason.SHAPE_MISMATCH, f"unexpected array {extra[:1]}")
    for name, (shape, dtype) in shapes.items():
        a = arrays[name]
        _check(tuple(a.shape) == tuple(shape), Reason.SHAPE_MISMATCH,
               f"array {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        _check(a.dtype == np.dtype(dtype), Reason.SHAPE_MISMATCH,
               f"array {name!r} has dtype {a.dtype.str}, expected {np.dtype(dtype).str}")


def _check_metrics(update: Update, lease: Lease) -> None:
    m = update.metrics
    bad = Reason.METRICS_INCONSISTENT
    for name in ("loss_before", "loss_after", "wall_s"):
        value = float(getattr(m, name))
        _check(math.isfinite(value) and value >= 0, bad, f"{name} is {value}, must be finite, >= 0")
    if lease.kind == Kind.TRAIN:
        want = lease.inner_steps * lease.batch_size * lease.seq_len
        _check(m.steps == lease.inner_steps, bad,
               f"reported {m.steps} steps, lease asked for {lease.inner_steps}")
        _check(m.tokens == want, bad, f"reported {m.tokens} tokens, lease implies {want}")
        return
    _check(m.steps == 0, bad, f"{lease.kind} reported {m.steps} steps, must be 0")
    _check(m.loss_before == m.loss_after, bad, f"{lease.kind} loss_before and loss_after differ")
    if lease.kind == Kind.TASKS:  # the judge counts the requests' tokens itself
        _check(m.tokens > 0, bad, "tasks reported no tokens")
        return
    span = lease.data_end - lease.data_start - 1  # predictions: every token but the first
    _check(m.tokens == span, bad, f"eval reported {m.tokens} tokens, range predicts {span}")
