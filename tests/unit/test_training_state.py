from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.errors import ConfigError
from training.device import autocast, pick_device, set_threads
from training.model import GPT, GPTConfig
from training.state import arrays_to_model, init_arrays, model_to_arrays

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)


def test_init_arrays_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = init_arrays(CFG, 1), init_arrays(CFG, 1), init_arrays(CFG, 2)
    assert torch.equal(state, torch.get_rng_state())
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())


def test_arrays_model_round_trip_copies():
    arrays = init_arrays(CFG, 0)
    model = arrays_to_model(arrays, CFG, "cpu")
    back = model_to_arrays(model)
    assert all(np.array_equal(arrays[k], back[k]) for k in arrays)
    back["transformer.wte.weight"][0, 0] += 1.0  # arrays never alias the model
    assert model.transformer.wte.weight[0, 0].item() == pytest.approx(arrays["transformer.wte.weight"][0, 0])
    assert len(arrays) == len(list(GPT(CFG).parameters()))


def test_arrays_to_model_rejects_mismatches():
    arrays = init_arrays(CFG, 0)
    with pytest.raises(ValueError, match="missing"):
        arrays_to_model({k: v for k, v in arrays.items() if "wpe" not in k}, CFG)
    bad = dict(arrays, **{"transformer.wpe.weight": np.zeros((3, 16), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        arrays_to_model(bad, CFG)


def test_device_helpers_on_cpu():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            pick_device("cuda")
    with autocast(torch.device("cpu")):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    n = torch.get_num_threads()
    set_threads(None)
    assert torch.get_num_threads() == n
    set_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(n)
