from __future__ import annotations

import numpy as np
import pytest

from coordinator.run.outer import NesterovOuter


def arr(*x: float) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def test_two_nesterov_steps_hand_computed() -> None:
    opt = NesterovOuter(lr=0.5, momentum=0.9)
    p0 = {"w": arr(1.0, 2.0)}
    # step 1: buf = d = [1, -2]; update = d + 0.9*buf = [1.9, -3.8]; p = p0 - 0.5*update
    p1 = opt.step(p0, {"w": arr(1.0, -2.0)})
    np.testing.assert_allclose(p1["w"], [0.05, 3.9], rtol=1e-6)
    # step 2: d = [2, 0]; buf = 0.9*[1,-2] + [2,0] = [2.9, -1.8]
    #         update = [2, 0] + 0.9*[2.9, -1.8] = [4.61, -1.62]; p = p1 - 0.5*update
    p2 = opt.step(p1, {"w": arr(2.0, 0.0)})
    np.testing.assert_allclose(p2["w"], [0.05 - 2.305, 3.9 + 0.81], rtol=1e-6)
    np.testing.assert_allclose(opt.state_dict()["momentum.w"], [2.9, -1.8], rtol=1e-6)
    np.testing.assert_array_equal(p0["w"], [1.0, 2.0])  # inputs untouched
    assert p2["w"].dtype == np.float32


def test_plain_momentum_hand_computed() -> None:
    opt = NesterovOuter(lr=1.0, momentum=0.5, nesterov=False)
    p1 = opt.step({"w": arr(0.0)}, {"w": arr(1.0)})  # buf = 1 -> p = -1
    p2 = opt.step(p1, {"w": arr(1.0)})  # buf = 0.5 + 1 = 1.5 -> p = -2.5
    np.testing.assert_allclose(p2["w"], [-2.5])


def test_state_dict_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": arr(1.0)}
    deltas = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
              for _ in range(3)]
    ref = NesterovOuter(0.7, 0.9)
    p = ref.step(params, deltas[0])
    assert NesterovOuter(0.7, 0.9).state_dict() == {}
    restored = NesterovOuter(0.7, 0.9)
    restored.load_state_dict(ref.state_dict())
    assert sorted(ref.state_dict()) == ["momentum.a", "momentum.b"]
    for d in deltas[1:]:
        a, b = ref.step(p, d), restored.step(p, d)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        p = a
    with pytest.raises(ValueError, match="not outer-optimizer state"):
        restored.load_state_dict({"a": params["a"]})


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        NesterovOuter(0.0, 0.9)
    with pytest.raises(ValueError):
        NesterovOuter(0.7, 1.0)
    opt = NesterovOuter(0.7, 0.9)
    with pytest.raises(ValueError, match="different arrays"):
        opt.step({"w": arr(1.0)}, {"v": arr(1.0)})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": arr(1.0)}, {"w": arr(1.0, 2.0)})
    assert opt.state_dict() == {}  # a failed step leaves no state behind


@pytest.mark.parametrize("nesterov, momentum", [(True, 0.9), (False, 0.9), (True, 0.0)])
def test_matches_torch_sgd(nesterov: bool, momentum: float) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shapes = {"emb": (5, 3), "bias": (3,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = NesterovOuter(0.7, momentum, nesterov=nesterov)
    topt = torch.optim.SGD(list(tparams.values()), lr=0.7, momentum=momentum,
                           nesterov=nesterov and momentum > 0)
    for _ in range(4):
        delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        params = opt.step(params, delta)
        for k, t in tparams.items():
            t.grad = torch.from_numpy(delta[k].copy())
        topt.step()
        for k in shapes:
            np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-6, atol=1e-6)
