from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from protocol.digest import digest_arrays
from protocol.errors import CheckpointError
from training.checkpoint import load_checkpoint, save_checkpoint
from training.model import GPTConfig

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "b.bias": rng.standard_normal(4).astype(np.float32)}


@pytest.fixture
def saved(tmp_path, arrays):
    return save_checkpoint(tmp_path, arrays, {"version": 3, "model": CFG, "round": 2})


def test_round_trip(saved, arrays):
    path, digest = saved
    assert digest == digest_arrays(arrays)
    assert path.name == f"{digest[:16]}.safetensors"
    assert path.with_suffix(".json").exists()
    loaded, meta = load_checkpoint(path)
    assert loaded.keys() == arrays.keys()
    assert all(np.array_equal(loaded[k], arrays[k]) and loaded[k].dtype == arrays[k].dtype for k in arrays)
    assert meta["format"] == 1 and meta["digest"] == digest
    assert meta["version"] == 3 and meta["round"] == 2
    assert GPTConfig(**meta["model"]) == CFG and meta["model"] == asdict(CFG)


def test_saving_the_same_weights_twice_gives_the_same_file(tmp_path, saved, arrays):
    again = save_checkpoint(tmp_path, arrays, {"version": 3, "model": asdict(CFG)})
    assert again == saved


def _one_line_corrupt(path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path} is corrupt:") and "\n" not in msg
    assert e.value.exit_code == 6


def test_flipping_a_byte_is_detected(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # a weight byte
    path.write_bytes(bytes(raw))
    _one_line_corrupt(path)


def test_flipping_a_header_byte_is_detected(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    raw[12] ^= 0x20
    path.write_bytes(bytes(raw))
    _one_line_corrupt(path)


@pytest.mark.parametrize("keep", [0, 5, 40, -3])
def test_truncated_file_is_detected(saved, keep):
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    _one_line_corrupt(path)


def test_missing_or_bad_meta_and_missing_weights(saved):
    path, _ = saved
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, digest="0" * 64)))
    _one_line_corrupt(path)
    meta_path.write_text("{broken")
    _one_line_corrupt(path)
    meta_path.unlink()
    _one_line_corrupt(path)
    _one_line_corrupt(path.with_name("0123456789abcdef.safetensors"))


def test_meta_needs_version_and_model(tmp_path, arrays):
    with pytest.raises(ValueError, match="version"):
        save_checkpoint(tmp_path, arrays, {"model": CFG})
