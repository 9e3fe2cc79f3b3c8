from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from protocol.errors import ConfigError
from training.corpus import build_folder_corpus, build_stdlib_corpus, load_corpus


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / f"f{i:02d}.txt").write_text(f"file {i}\n" * (i + 1))
    (src / "sub" / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": f"record {j}"}) for j in range(5)) + "\n"
    )
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    (src / ".hidden.txt").write_text("secret")
    return src


def _text(info, lo, hi):
    return np.asarray(info.tokens()[lo:hi]).astype(np.uint8).tobytes().decode()


def test_split_by_document_train_first_then_validation(folder, tmp_path):
    info = build_folder_corpus(folder, tmp_path / "c", val_every=5, licence="MIT")
    # documents, sorted: f00..f19 (20 files), then sub/docs.jsonl's 5 records
    docs = [f"file {i}\n" * (i + 1) for i in range(20)] + [f"record {j}" for j in range(5)]
    val = [d for i, d in enumerate(docs) if (i + 1) % 5 == 0]
    train = [d for i, d in enumerate(docs) if (i + 1) % 5 != 0]
    assert (info.n_files, info.n_val_files) == (25, 5)
    assert info.train_range == (0, info.val_range[0]) and info.val_range[1] == info.n_tokens
    assert _text(info, *info.train_range) == "".join(d + "\n" for d in train)
    assert _text(info, *info.val_range) == "".join(d + "\n" for d in val)
    assert "secret" not in _text(info, 0, info.n_tokens)
    raw = (tmp_path / "c" / "tokens.bin").read_bytes()
    meta = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert meta["sha256"] == info.sha256 == hashlib.sha256(raw).hexdigest()
    assert meta["n_tokens"] == info.n_tokens == len(raw) // 2
    assert meta["source"].startswith("folder:")


def test_build_is_idempotent_and_load_matches(folder, tmp_path):
    out = tmp_path / "c"
    first = build_folder_corpus(folder, out, val_every=5, licence="MIT")
    mtime = (out / "tokens.bin").stat().st_mtime_ns
    assert build_folder_corpus(folder, out, val_every=5, licence="MIT") == first
    assert (out / "tokens.bin").stat().st_mtime_ns == mtime  # reused, not rewritten
    assert load_corpus(out) == first
    again = build_folder_corpus(folder, out, val_every=4, licence="MIT")
    assert again.n_val_files != first.n_val_files


def test_load_detects_tampering_and_damage(folder, tmp_path):
    out = tmp_path / "c"
    build_folder_corpus(folder, out, val_every=5, licence="MIT")
    tokens = out / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    raw[10] ^= 1
    tokens.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="sha256"):
        load_corpus(out)
    # a damaged corpus is rebuilt
    rebuilt = build_folder_corpus(folder, out, val_every=5, licence="MIT")
    assert load_corpus(out) == rebuilt
    (out / "corpus.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corpus.json"):
        load_corpus(out)
    (out / "corpus.json").unlink()
    with pytest.raises(ConfigError, match="not found"):
        load_corpus(out)


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        build_folder_corpus(tmp_path / "nope", tmp_path / "c")
    (tmp_path / "a.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ConfigError, match="a.jsonl:1"):
        build_folder_corpus(tmp_path, tmp_path / "c", licence="MIT")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="validation"):
        # one document cannot be split
        build_folder_corpus(tmp_path, tmp_path / "c", licence="MIT")


def test_small_stdlib_corpus(tmp_path):
    info = build_stdlib_corpus(tmp_path / "std", max_bytes=200_000, val_every=10)
    assert 200_000 <= info.n_tokens < 200_000 + 2_000_000
    assert info.n_val_files == info.n_files // 10 and info.n_val_files >= 1
    text = _text(info, 0, 2000)
    assert "import" in text or "def " in text
    assert load_corpus(tmp_path / "std") == info
    assert info.tokens().dtype == np.dtype("<u2") and not info.tokens().flags.writeable
