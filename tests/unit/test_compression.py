"""Compressed updates (``protocol.compression``): hand-computed cases, the error bounds, error
feedback, hostile encodings (fuzzed), and a run on each scheme through the real run loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_run_loop import (  # noqa: F401  (fixtures)
    assert_credit_only_for_accepted, corpus, network, nets, one_torch_thread,
)

from protocol.compression import (
    Compression, ErrorFeedback, apply_delta, decode, encode, encode_delta, encoded_bytes,
)
from protocol.errors import ProtocolError, Reason

INT8 = Compression("int8", block=4)
TOPK = Compression("topk", fraction=0.4)
TOPK_EF = Compression("topk", fraction=0.4, feedback=True)
SHAPES = {"w": ((2, 3), "<f4"), "b": ((2,), "<f4")}


def arrays() -> dict[str, np.ndarray]:
    return {"w": np.array([[0.5, -1.27, 0.01], [2.54, 0.0, -0.3]], np.float32),
            "b": np.array([0.0, 0.0], np.float32)}


def test_int8_by_hand() -> None:
    enc = encode(arrays(), INT8)
    # blocks of 4 over the flattened w: [0.5, -1.27, 0.01, 2.54] and [0.0, -0.3]
    assert np.allclose(enc["w/scale"], [2.54 / 127, 0.3 / 127])
    assert enc["w/q"].tolist() == [25, -64, 0, 127, 0, -127]  # round(x / scale)
    assert enc["b/scale"].tolist() == [0.0] and enc["b/q"].tolist() == [0, 0]
    out = decode(enc, INT8, SHAPES, 1000.0)
    scale = np.repeat(enc["w/scale"], 4)[:6].reshape(2, 3)
    assert (np.abs(out["w"] - arrays()["w"]) <= scale / 2 + 1e-7).all()  # the bound
    assert encoded_bytes(enc) == 6 + 2 * 4 + 2 + 4


def test_int8_error_bound_on_a_real_sized_array() -> None:
    x = {"w": np.random.default_rng(1).normal(0, 0.02, (512, 300)).astype(np.float32)}
    c = Compression("int8")
    enc = encode(x, c)
    out = decode(enc, c, {"w": ((512, 300), "<f4")}, 1000.0)
    scale = np.repeat(enc["w/scale"], c.block)[:x["w"].size].reshape(512, 300)
    assert (np.abs(out["w"] - x["w"]) <= scale / 2 + 1e-9).all()
    rel = np.linalg.norm(out["w"] - x["w"]) / np.linalg.norm(x["w"])
    assert rel < 0.01 and encoded_bytes(enc) / x["w"].nbytes < 0.26  # 3.9x fewer bytes


def test_topk_by_hand_and_error_feedback_loses_nothing() -> None:
    x = arrays()
    enc = encode(x, TOPK)
    # k = ceil(0.4 * 6) = 3 of w: |2.54|, |-1.27|, |0.5| at flat indices 3, 1, 0
    assert enc["w/idx"].tolist() == [0, 1, 3] and enc["w/val"].tolist() == pytest.approx(
        [0.5, -1.27, 2.54])
    assert enc["b/idx"].size == 1 and enc["b/val"].tolist() == [0.0]  # k >= 1 (a tie here)
    fb = ErrorFeedback()
    sent1 = decode(fb.encode(x, TOPK_EF), TOPK, SHAPES, math.inf)
    assert np.allclose(fb.residual["w"].reshape(-1), [0, 0, 0.01, 0, 0, -0.3])
    y = {"w": np.full((2, 3), 0.1, np.float32), "b": np.zeros(2, np.float32)}
    sent2 = decode(fb.encode(y, TOPK_EF), TOPK, SHAPES, math.inf)
    # what was dropped the first time is sent (or still carried) now: nothing is lost
    for k in x:
        assert np.allclose(sent1[k] + sent2[k] + fb.residual[k], x[k] + y[k], atol=1e-7)
    assert sent2["w"].reshape(-1)[5] == pytest.approx(-0.2)  # -0.3 carried + 0.1 new


def test_feedback_off_carries_nothing_and_the_config_keeps_it_from_spot_checks() -> None:
    fb = ErrorFeedback()
    fb.encode(arrays(), TOPK)
    assert fb.residual == {}
    from coordinator.config import parse_config
    from protocol.errors import ConfigError
    ef = '[compression]\nscheme = "topk"\nerror_feedback = true\n'
    with pytest.raises(ConfigError, match="spot_check_rate = 0"):
        parse_config(ef)
    assert parse_config(ef + "[verify]\nspot_check_rate = 0\n").codec().feedback


def test_no_compression_passes_arrays_through() -> None:
    none = Compression("none")
    assert decode(encode(arrays(), none), none, SHAPES, 1.0e3)["w"].tolist() == arrays()["w"].tolist()


@pytest.mark.parametrize("mutate, match", [
    (lambda e: e.pop("w/scale"), "missing"),
    (lambda e: e.update({"x/q": np.zeros(1, np.int8)}), "unexpected"),
    (lambda e: e.update({"w/q": e["w/q"].astype(np.int16)}), "w/q"),
    (lambda e: e.update({"w/q": e["w/q"][:-1]}), "w/q"),
    (lambda e: e.update({"w/scale": np.array([np.nan, 0.1], np.float32)}), "scale"),
    (lambda e: e.update({"w/scale": np.array([-0.1, 0.1], np.float32)}), "scale"),
    (lambda e: e.update({"w/scale": np.array([1e6, 0.1], np.float32)}), "scale"),
    (lambda e: e.update({"w/q": np.array([-128, 0, 0, 0, 0, 0], np.int8)}), "-128"),
], ids=["missing", "extra", "dtype", "count", "nan-scale", "negative-scale", "huge-scale",
        "minus-128"])
def test_hostile_int8_encodings_are_refused(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    enc = encode(arrays(), INT8)
    mutate(enc)
    with pytest.raises(ProtocolError, match=match):
        decode(enc, INT8, SHAPES, 1000.0)


@pytest.mark.parametrize("idx, val, match", [
    ([0, 1, 6], [1.0, 1.0, 1.0], "in 0..5"),
    ([-1, 1, 3], [1.0, 1.0, 1.0], "in 0..5"),
    ([1, 1, 3], [1.0, 1.0, 1.0], "unique"),
    ([3, 1, 0], [1.0, 1.0, 1.0], "ascending"),
    ([0, 1, 3], [1.0, np.inf, 1.0], "not finite"),
    ([0, 1, 3], [1.0, 2000.0, 1.0], "above"),
    ([0, 1], [1.0, 1.0], "3 values"),
], ids=["past-end", "negative", "repeated", "descending", "inf", "huge", "count"])
def test_hostile_topk_encodings_are_refused(idx: list[int], val: list[float],
                                            match: str) -> None:
    enc = encode(arrays(), TOPK)
    enc["w/idx"], enc["w/val"] = np.array(idx, np.int32), np.array(val, np.float32)
    with pytest.raises(ProtocolError, match=match):
        decode(enc, TOPK, SHAPES, 1000.0)


_any_array = st.one_of(
    st.lists(st.integers(-200, 200), max_size=8).map(lambda v: np.array(v, np.int8 if all(
        -128 <= x <= 127 for x in v) else np.int32)),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=8).map(
        lambda v: np.array(v, np.float32)),
    st.lists(st.integers(-10, 10), max_size=8).map(lambda v: np.array(v, np.int32)),
)


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(["int8", "topk"]), data=st.data())
def test_fuzzed_encodings_decode_or_raise_protocol_errors_only(scheme: str, data) -> None:  # type: ignore[no-untyped-def]
    c = INT8 if scheme == "int8" else TOPK
    enc = encode(arrays(), c)
    for key in data.draw(st.lists(st.sampled_from(sorted(enc)), max_size=3)):
        enc[key] = data.draw(_any_array)
    try:
        out = decode(enc, c, SHAPES, 1000.0)
    except ProtocolError:
        return
    assert all(np.isfinite(a).all() and (np.abs(a) <= 1000.0).all() for a in out.values())


# -- through the run loop ------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["none", "int8", "topk"])
def test_a_run_learns_on_each_scheme_and_spot_checks_pass(network, scheme: str) -> None:
    # every shard spot-checked, a bf16 node among them: honest work stands on every scheme
    net = network(["honest", "honest", "bf16"], rounds=2,
                  verify="spot_check_rate = 1.0\neval_quorum_rate = 0",
                  extra=f'[compression]\nscheme = "{scheme}"\nfraction = 0.1')
    net.run()
    led = net.ledger
    train = [u for u, lease in led.updates_with_leases() if lease.kind == "train"]
    assert train and all(u.verdict == "accepted" for u in train), [
        (u.reason, u.detail) for u in train if u.verdict != "accepted"]
    losses = [v.val_loss for v in led.versions()]
    assert losses[2] < losses[1] < losses[0]
    assert_credit_only_for_accepted(led)


def test_error_feedback_is_carried_by_each_node_across_leases(network) -> None:
    net = network(["honest", "honest"], rounds=2, verify="spot_check_rate = 0",
                  extra='[compression]\nscheme = "topk"\nfraction = 0.1\nerror_feedback = true')
    net.run()
    for node in net.nodes:
        assert node.feedback.residual and any(np.abs(r).sum() > 0
                                              for r in node.feedback.residual.values())
    losses = [v.val_loss for v in net.ledger.versions()]
    assert losses[2] < losses[0]


def test_a_forged_encoding_is_a_typed_rejection_in_the_run(network) -> None:
    net = network(["honest", "nan"], rounds=1)  # int8: the NaN's scale is NaN
    net.run()
    bad = [u for u in net.ledger.updates(node_id=net.nodes[1].id) if u.verdict != "accepted"]
    assert bad and bad[0].reason == Reason.BAD_ENCODING and "scale" in bad[0].detail


def test_the_warm_node_keeps_its_residual_between_leases(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The session a warm worker keeps carries one ErrorFeedback across every lease."""
    from node.client_app import session_for
    from node.identity import Enrollment, NodeHome

    home = NodeHome(tmp_path / "home")
    home.key()
    home.save_enrollment(Enrollment(node_id=1, flower_node_id="1", name="n", institution="U",
                                    run_id="r", coordinator_address="127.0.0.1:1",
                                    fleet_address="127.0.0.1:2"), b"", b"")
    config = {"home": str(home.path), "threads": 1, "device": "cpu"}
    session = session_for(config)
    session.settings.feedback.encode(arrays(), TOPK_EF)
    assert session.settings.feedback.residual  # what top-k dropped this time
    again = session_for(dict(config))
    assert again is session and again.settings.feedback.residual  # carried to the next lease
    assert session_for({**config, "threads": 2}) is not session  # another config: a new one


def test_a_version_travels_as_its_int8_change() -> None:
    """old + decode(encode(new - old)): within half a block's scale of ``new``, the same
    bits every time (the coordinator and every node compute it alike), a bad encoding a
    typed error."""
    rng = np.random.default_rng(5)
    old = {"w": rng.standard_normal((3, 300)).astype(np.float32)}
    new = {"w": old["w"] + (rng.standard_normal((3, 300)) * 1e-2).astype(np.float32)}
    change = encode_delta(old, new, 256)
    assert change["w/q"].dtype == np.int8  # a quarter of the bytes of the version
    made = apply_delta(old, change, 256)
    again = apply_delta({"w": old["w"].copy()}, {k: v.copy() for k, v in change.items()}, 256)
    assert made["w"].dtype == np.float32 and np.array_equal(made["w"], again["w"])
    step = (new["w"] - old["w"]).reshape(-1)
    scales = np.abs(np.pad(step, (0, -step.size % 256)).reshape(-1, 256)).max(1) / 127
    per_value = np.repeat(scales, 256)[:step.size].reshape(3, 300)
    assert (np.abs(made["w"] - new["w"]) <= per_value / 2 + 1e-7).all()
    bad = dict(change, **{"w/scale": np.full_like(change["w/scale"], np.nan)})
    with pytest.raises(ProtocolError):
        apply_delta(old, bad, 256)
