"""Tokenizers at init: deterministic BPE, a user's tokenizer.json, byte tokens as a file,
the token dtype (uint16/uint32) and every reader of it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import ConfigError, ProtocolError
from protocol.messages import Lease, shard_tokens
from training import tokenizer as tk
from training.corpus import build_folder_corpus, load_corpus
from training.manifest import manifest_bytes
from training.shards import data_digest, shard_bytes

ROOT = Path(__file__).resolve().parents[2]
DOCS = [f"def f{i}(x):\n    return x * {i}  # the {i}th naïve function\n" for i in range(40)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"d{i:02d}.txt").write_text(d)
    return src


def test_bpe_training_is_deterministic_and_depends_on_the_vocabulary() -> None:
    a = tk.train_bpe(iter(DOCS), 300)
    assert tk.train_bpe(iter(DOCS), 300) == a
    assert tk.sha256_text(tk.train_bpe(iter(DOCS), 320)) != tk.sha256_text(a)
    # another process (other hash seeds, other thread timing) gives the same bytes
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from training import tokenizer as tk; "
            "from tests.unit.test_training_bpe import DOCS; "
            "print(tk.sha256_text(tk.train_bpe(iter(DOCS), 300)))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == tk.sha256_text(a)
    tok = tk.parse_tokenizer(a, "t")
    assert tok.token_to_id(tk.EOT) == 0 and tok.get_vocab_size() == 300


def test_bpe_corpus_round_trips_with_eot_separators(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    info = build_folder_corpus(folder, out, val_every=4, licence="MIT", tokenizer="bpe",
                               vocab_size=300)
    assert (info.tokenizer_kind, info.vocab_size, info.eot_id, info.dtype) == \
        ("bpe", 300, 0, "<u2")
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["tokenizer"]["sha256"] == info.tokenizer_sha256 == \
        hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tokens = np.asarray(info.tokens())
    assert tokens[info.train_range[1] - 1] == 0 and tokens[-1] == 0  # each doc ends with EOT
    pieces = np.split(tokens, np.flatnonzero(tokens == 0) + 1)[:-1]
    tok = info.tokenizer()
    texts = [tok.decode([int(t) for t in p[:-1]]) for p in pieces]
    train = [d for i, d in enumerate(DOCS) if (i + 1) % 4]
    assert texts == train + [d for i, d in enumerate(DOCS) if (i + 1) % 4 == 0]
    # the tokenizer was trained on the train documents only, and is stable: reuse, not rebuild
    assert info.tokenizer_sha256 == tk.sha256_text(tk.train_bpe(iter(train), 300))
    assert build_folder_corpus(folder, out, val_every=4, licence="MIT", tokenizer="bpe",
                               vocab_size=300) == info == load_corpus(out)
    hf = tk.hf_tokenizer(info.tokenizer_path, info.tokenizer_sha256)
    assert hf.eos_token == tk.EOT and hf.eos_token_id == 0
    assert hf.decode(hf(DOCS[0])["input_ids"]) == DOCS[0]


def test_byte_tokenizer_file_is_the_byte_tokenizer() -> None:
    tok = tk.parse_tokenizer(tk.byte_tokenizer_json(), "byte")
    text = "naïve – 日本語 🙂\n\tdef f(x):  return x\r\n"
    assert tok.encode(text).ids == tk.ByteTokenizer().encode(text).tolist()
    assert tok.decode(tok.encode(text).ids) == text and tok.get_vocab_size() == 256


def test_a_users_tokenizer_file(folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(tk.train_bpe(iter(DOCS), 280))
    info = build_folder_corpus(folder, tmp_path / "c", val_every=4, licence="MIT",
                               tokenizer=str(path))
    assert info.tokenizer_kind == "file" and info.vocab_size == 280
    assert info.tokenizer_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match="mine.json is not a tokenizers tokenizer.json") as e:
        build_folder_corpus(folder, tmp_path / "c", val_every=4, licence="MIT",
                            tokenizer=str(path))
    assert "\n" not in str(e.value)
    # one without an end-of-text token cannot separate documents
    doc = json.loads(tk.byte_tokenizer_json())
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="no end-of-text token"):
        build_folder_corpus(folder, tmp_path / "c", val_every=4, licence="MIT",
                            tokenizer=str(path))
    with pytest.raises(ConfigError, match="cannot be read"):
        build_folder_corpus(folder, tmp_path / "c", val_every=4, licence="MIT",
                            tokenizer=str(tmp_path / "nope.json"))


def test_a_corrupt_tokenizer_or_manifest_is_one_line(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    info = build_folder_corpus(folder, out, val_every=4, licence="MIT", tokenizer="bpe",
                               vocab_size=300)
    for name in ("tokenizer.json", "manifest.json"):
        good = (out / name).read_bytes()
        (out / name).write_bytes(good[:-1] + b" ")
        with pytest.raises(ConfigError, match=f"{name} does not match the sha256") as e:
            load_corpus(out)
        assert "\n" not in str(e.value)
        if name == "tokenizer.json":
            with pytest.raises(ConfigError, match="does not match its recorded sha256"):
                info.tokenizer()
        (out / name).write_bytes(good)
    assert load_corpus(out) == info


@pytest.mark.parametrize(("vocab", "dtype"), [(256, "<u2"), (65_536, "<u2"), (65_537, "<u4"),
                                              (1 << 32, "<u4")])
def test_token_dtype(vocab: int, dtype: str) -> None:
    assert tk.token_dtype(vocab) == np.dtype(dtype)
    assert tk.check_token_dtype(dtype, vocab) == np.dtype(dtype)


def test_token_dtype_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit in uint32"):
        tk.token_dtype((1 << 32) + 1)
    with pytest.raises(ValueError, match="does not fit in <u2"):
        tk.check_token_dtype("<u2", 65_537)
    with pytest.raises(ValueError, match="must be one of"):
        tk.check_token_dtype("<i8", 10)
    with pytest.raises(ValueError, match="do not fit in uint16"):
        data_digest(np.array([70_000]))


def _synthetic_u4_corpus(out: Path, vocab: int, dtype: str) -> np.ndarray:
    """A format-2 corpus whose tokens need uint32 (no tokenizer that big is trained)."""
    out.mkdir()
    tokens = np.array([1, 70_000, 65_536, 3, 99_999, 2, 80_000, 5], dtype="<u4")
    (out / "tokens.bin").write_bytes(tokens.tobytes())
    (out / "tokenizer.json").write_text("{}")
    (out / "manifest.json").write_text("{}")
    sha = {n: hashlib.sha256((out / n).read_bytes()).hexdigest()
           for n in ("tokens.bin", "tokenizer.json", "manifest.json")}
    (out / "corpus.json").write_text(json.dumps({
        "format": 2, "sha256": sha["tokens.bin"], "dtype": dtype, "n_tokens": 8,
        "train_range": [0, 6], "val_range": [6, 8], "n_files": 4, "n_val_files": 1,
        "source": "synthetic", "params": {},
        "tokenizer": {"kind": "file", "sha256": sha["tokenizer.json"], "vocab_size": vocab,
                      "eot_id": 2},
        "manifest_sha256": sha["manifest.json"]}))
    return tokens


def test_uint32_tokens_are_read_cut_and_shipped_as_uint32(tmp_path: Path) -> None:
    tokens = _synthetic_u4_corpus(tmp_path / "c", 100_000, "<u4")
    info = load_corpus(tmp_path / "c")
    assert info.dtype == "<u4" and info.tokens().dtype == np.dtype("<u4")
    assert np.array_equal(info.tokens(), tokens)
    blob = shard_bytes(info.tokens()[2:6], info.dtype)
    assert blob == tokens[2:6].tobytes()
    assert data_digest(info.tokens()[2:6], info.dtype) == hashlib.sha256(blob).hexdigest()
    lease = Lease(run_id="r", round=0, shard_id=0, kind="train", base_version=0,
                  base_digest="0" * 64, data_start=2, data_end=6,
                  data_digest=data_digest(tokens[2:6], "<u4"), inner_steps=1, batch_size=1,
                  tokenizer_digest="7" * 64, data_manifest="8" * 64,
                  seq_len=2, lr=1e-3, weight_decay=0.0, seed=0, deadline=0.0, nonce="0" * 32)
    assert shard_tokens(blob, lease).tolist() == tokens[2:6].tolist()  # read off the size
    assert shard_tokens(blob, lease, "<u4").dtype == np.dtype("<u4")
    with pytest.raises(ProtocolError):
        shard_tokens(blob, lease, "<u2")


def test_a_declared_dtype_too_narrow_for_the_vocabulary_is_refused(tmp_path: Path) -> None:
    _synthetic_u4_corpus(tmp_path / "c", 100_000, "<u2")
    with pytest.raises(ConfigError, match="100000 tokens does not fit in <u2"):
        load_corpus(tmp_path / "c")


def test_an_old_corpus_json_reads_as_uint16_bytes(tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    raw = np.frombuffer(b"hello\nworld\n", dtype=np.uint8).astype("<u2").tobytes()
    (out / "tokens.bin").write_bytes(raw)
    (out / "corpus.json").write_text(json.dumps({
        "format": 1, "sha256": hashlib.sha256(raw).hexdigest(), "n_tokens": 12,
        "train_range": [0, 6], "val_range": [6, 12], "n_files": 2, "n_val_files": 1}))
    info = load_corpus(out)
    assert (info.dtype, info.tokenizer_kind, info.vocab_size, info.tokenizer_sha256) == \
        ("<u2", "byte", 256, "")
    assert info.tokenizer().decode([int(t) for t in info.tokens()]) == "hello\nworld\n"
    # what its leases and receipts name: the byte tokenizer, and its corpus.json as manifest
    assert info.tokenizer_digest == tk.sha256_text(tk.byte_tokenizer_json())
    meta = json.loads((out / "corpus.json").read_text())
    assert info.data_manifest == hashlib.sha256(manifest_bytes(meta)).hexdigest()


def test_leases_name_the_tokenizer_and_manifest_files(folder: Path, tmp_path: Path) -> None:
    for tokenizer in ("byte", "bpe"):
        info = build_folder_corpus(folder, tmp_path / tokenizer, val_every=4, licence="MIT",
                                   tokenizer=tokenizer, vocab_size=300)
        assert info.tokenizer_digest == info.tokenizer_sha256 == hashlib.sha256(
            info.tokenizer_path.read_bytes()).hexdigest()
        assert info.data_manifest == info.manifest_sha256 == hashlib.sha256(
            info.manifest_path.read_bytes()).hexdigest()
        assert load_corpus(info.path) == info
    # a byte corpus names the same tokenizer whether built before tokenizer files or after
    assert info.tokenizer_digest != tk.sha256_text(tk.byte_tokenizer_json())
    assert load_corpus(tmp_path / "byte").tokenizer_digest == tk.sha256_text(
        tk.byte_tokenizer_json())
