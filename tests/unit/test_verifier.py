from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.verify.reply import Expected, Ruling, verify
from protocol.digest import digest_arrays
from protocol.errors import Reason
from protocol.messages import EVAL_WINDOWS, Lease, Update, UpdateMetrics
from protocol.signing import generate_key, public_key_pem, sign_update
from training.evaluate import eval_windows

NOW = 1_700_000_000.0
NODE = 3
KEY = generate_key()
SHAPES = {"w": ((2, 2), "float32"), "b": ((2,), "<f4")}


def lease(**over: Any) -> Lease:
    values: dict[str, Any] = dict(
        run_id="run-1", round=2, shard_id=1, kind="train", base_version=5, base_digest="a" * 64,
        data_start=1000, data_end=2000, data_digest="b" * 64, inner_steps=3, batch_size=2,
        tokenizer_digest="7" * 64, data_manifest="8" * 64,
        seq_len=8, lr=1e-3, weight_decay=0.1, seed=9, deadline=NOW + 60, nonce="c" * 32)
    values.update(over)
    return Lease(**values)


def good_arrays() -> dict[str, np.ndarray]:
    return {"w": np.array([[0.1, -0.2], [0.3, 0.0]], np.float32), "b": np.ones(2, np.float32)}


def expected(**over: Any) -> Expected:
    values: dict[str, Any] = dict(lease=lease(), node_id=NODE, public_key_pem=public_key_pem(KEY),
                                  current_version=5, shapes=SHAPES, max_norm=10.0, now=NOW)
    values.update(over)
    return Expected(**values)


def reply(arrays: dict[str, np.ndarray] | None = None, *, key: ec.EllipticCurvePrivateKey = KEY,
          the_lease: Lease | None = None, node_id: int = NODE, digest: str | None = None,
          **metrics: Any) -> tuple[Update, dict[str, np.ndarray]]:
    """A node's honest, signed reply, with whatever deviations the case needs."""
    arrays = good_arrays() if arrays is None else arrays
    m = dict(tokens=48, steps=3, loss_before=5.0, loss_after=4.5, wall_s=2.0)
    m.update(metrics)
    update = Update(lease=the_lease or lease(), node_id=node_id,
                    arrays_digest=digest or digest_arrays(arrays), metrics=UpdateMetrics(**m))
    return sign_update(update, key), arrays


def check(verdict: Ruling, reason: str) -> None:
    assert (verdict.accepted, verdict.reason) == (False, reason), verdict
    assert verdict.detail and "\n" not in verdict.detail


def test_accepts_an_honest_train_update() -> None:
    verdict = verify(*reply(), expected())
    assert verdict.accepted and verdict.reason is None
    want = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in good_arrays().values()))
    assert verdict.norm == pytest.approx(want)


def windows(ev: Lease, loss: float = 3.0) -> dict[str, np.ndarray]:
    """An honest eval reply's arrays: ``loss`` nats on every prediction, window by window."""
    n_pred = [e - s - 1 for s, e in eval_windows(ev.data_end - ev.data_start, ev.seq_len)]
    return {EVAL_WINDOWS: loss * np.array(n_pred, np.float64)}


EVAL_TOKENS = 999  # the eval lease's range predicts every token but its first


def test_accepts_an_honest_eval_update() -> None:
    ev = lease(kind="eval", inner_steps=0)
    update, arrays = reply(windows(ev), the_lease=ev, tokens=EVAL_TOKENS, steps=0,
                           loss_before=3.0, loss_after=3.0)
    assert arrays[EVAL_WINDOWS].shape == (125,)
    verdict = verify(update, arrays, expected(lease=ev, shapes={}))
    assert verdict.accepted and verdict.norm == 0.0


def test_unknown_node() -> None:
    check(verify(*reply(node_id=4), expected()), Reason.UNKNOWN_NODE)


def test_bad_signature() -> None:
    verdict = verify(*reply(key=generate_key()), expected())
    check(verdict, Reason.BAD_SIGNATURE)
    assert verdict.detail == "signature does not match node 3's registered key"


def test_bad_signature_on_tampered_metrics() -> None:
    update, arrays = reply()
    forged = dataclasses.replace(update, metrics=dataclasses.replace(update.metrics, tokens=10**9))
    check(verify(forged, arrays, expected()), Reason.BAD_SIGNATURE)


def test_bad_signature_on_garbage_registered_key() -> None:
    check(verify(*reply(), expected(public_key_pem=b"not a key")), Reason.BAD_SIGNATURE)


@pytest.mark.parametrize("field", ["nonce", "round", "shard_id", "lr", "data_start"])
def test_lease_mismatch(field: str) -> None:
    other = {"nonce": "d" * 32, "round": 1, "shard_id": 2, "lr": 2e-3, "data_start": 999}[field]
    verdict = verify(*reply(the_lease=lease(**{field: other})), expected())
    check(verdict, Reason.LEASE_MISMATCH)
    assert field in verdict.detail


def test_stale_base() -> None:
    check(verify(*reply(), expected(current_version=6)), Reason.STALE_BASE)


def test_max_staleness_admits_a_base_that_many_versions_behind_and_no_more() -> None:
    # the asynchronous loop: work on one of the last max_staleness versions is judged
    base = lease().base_version
    assert verify(*reply(), expected(current_version=base + 2, max_staleness=2)).accepted
    verdict = verify(*reply(), expected(current_version=base + 3, max_staleness=2))
    check(verdict, Reason.STALE_BASE)
    assert "at most 2 behind" in verdict.detail
    # a base ahead of the coordinator is never accepted
    check(verify(*reply(), expected(current_version=base - 1, max_staleness=2)),
          Reason.STALE_BASE)


def test_late() -> None:
    verdict = verify(*reply(), expected(now=NOW + 61))
    check(verdict, Reason.LATE)
    assert verify(*reply(), expected(now=NOW + 60)).accepted  # the deadline itself is in time


def test_digest_mismatch() -> None:
    update, arrays = reply()
    arrays["w"] = arrays["w"] + np.float32(1e-3)
    check(verify(update, arrays, expected()), Reason.DIGEST_MISMATCH)


@pytest.mark.parametrize("arrays", [
    {"w": np.zeros((2, 2), np.float32)},
    {**good_arrays(), "extra": np.zeros(1, np.float32)},
    {"w": np.zeros((4,), np.float32), "b": np.zeros(2, np.float32)},
    {"w": np.zeros((2, 2), np.float64), "b": np.zeros(2, np.float32)},
    {"w": np.zeros((2, 2), ">f4"), "b": np.zeros(2, np.float32)},
], ids=["missing", "extra", "shape", "dtype", "byte-order"])
def test_shape_mismatch(arrays: dict[str, np.ndarray]) -> None:
    check(verify(*reply(arrays), expected()), Reason.SHAPE_MISMATCH)


def test_shape_mismatch_eval_with_arrays() -> None:
    ev = lease(kind="eval", inner_steps=0)
    update, arrays = reply(the_lease=ev, tokens=10, steps=0, loss_before=3.0, loss_after=3.0)
    check(verify(update, arrays, expected(lease=ev)), Reason.SHAPE_MISMATCH)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    arrays = good_arrays()
    arrays["b"][1] = bad
    check(verify(*reply(arrays), expected()), Reason.NON_FINITE)


def test_norm_bound() -> None:
    arrays = {"w": np.full((2, 2), 1e30, np.float32), "b": np.zeros(2, np.float32)}
    verdict = verify(*reply(arrays), expected(max_norm=1e30))
    check(verdict, Reason.NORM_BOUND)
    # float32 squares would overflow to inf; the norm is computed in float64
    assert verify(*reply(arrays), expected(max_norm=float("inf"))).norm == pytest.approx(2e30)


@pytest.mark.parametrize("metrics", [
    {"steps": 2}, {"tokens": 47}, {"loss_after": -0.5}, {"wall_s": -1.0},
], ids=["steps", "tokens", "negative-loss", "negative-wall"])
def test_metrics_inconsistent_train(metrics: dict[str, Any]) -> None:
    check(verify(*reply(**metrics), expected()), Reason.METRICS_INCONSISTENT)


@pytest.mark.parametrize("metrics", [
    {"tokens": 0}, {"tokens": 1000}, {"tokens": 500}, {"steps": 1}, {"loss_after": 2.0},
    {"loss_before": 2.9, "loss_after": 2.9},
], ids=["no-tokens", "beyond-range", "part-of-range", "steps", "losses-differ",
        "total-not-the-windows-sum"])
def test_metrics_inconsistent_eval(metrics: dict[str, Any]) -> None:
    ev = lease(kind="eval", inner_steps=0)
    m = dict(steps=0, tokens=EVAL_TOKENS, loss_before=3.0, loss_after=3.0)
    m.update(metrics)
    update, arrays = reply(windows(ev), the_lease=ev, **m)
    check(verify(update, arrays, expected(lease=ev, shapes={})), Reason.METRICS_INCONSISTENT)


@pytest.mark.parametrize("case", ["not-update", "not-mapping", "object-array", "not-array",
                                  "bad-types"])
def test_malformed_never_raises(case: str) -> None:
    update, arrays = reply()
    hostile: tuple[Any, Any]
    if case == "not-update":
        hostile = ("update", arrays)
    elif case == "not-mapping":
        hostile = (update, [np.zeros(2)])
    elif case == "object-array":
        hostile = (update, {"w": np.array([None, 1], dtype=object)})
    elif case == "not-array":
        hostile = (update, {"w": [1.0, 2.0]})
    else:
        hostile = (dataclasses.replace(update, metrics=None), arrays)
        check(verify(*hostile, expected()), Reason.BAD_SIGNATURE)  # unsignable: never verifies
        hostile = (update, {1: np.zeros(2)})
    check(verify(*hostile, expected()), Reason.MALFORMED)
