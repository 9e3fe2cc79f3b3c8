"""Corpus sources (txt, jsonl, parquet, a saved datasets dataset), the data manifest with its
required licence, and one ConfigError line for every bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.config import parse_config
from coordinator.rundir import init_run, prepare_corpus
from protocol.errors import ConfigError
from training.corpus import build_folder_corpus, build_stdlib_corpus, load_corpus
from training.manifest import check_licence, manifest_bytes, source_digest

DOCS = [f"record {i}: ünïcode text about licences and tokens\nline two {i}" for i in range(24)]


def _txt(root: Path) -> None:
    for i, d in enumerate(DOCS):
        (root / f"{i:02d}.txt").write_text(d)


def _jsonl(root: Path) -> None:
    (root / "a.jsonl").write_text("".join(json.dumps({"body": d, "n": 1}) + "\n\n"
                                          for d in DOCS))


def _parquet(root: Path) -> None:
    table = pa.table({"body": DOCS, "n": list(range(len(DOCS)))})
    pq.write_table(table.slice(0, 10), root / "a.parquet")
    pq.write_table(table.slice(10), root / "b.parquet")


def _dataset(root: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(
        str(root))


def _dataset_dict(root: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"body": DOCS})
    other = datasets.Dataset.from_dict({"body": ["held out"]})
    datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(str(root))


@pytest.mark.parametrize("make", [_txt, _jsonl, _parquet, _dataset, _dataset_dict])
def test_every_format_gives_the_same_documents(make, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make(src)
    column = "text" if make is _txt else "body"
    info = build_folder_corpus(src, tmp_path / "c", val_every=4, licence="CC-BY-4.0",
                               text_column=column)
    kind = "dataset" if make in (_dataset, _dataset_dict) else "folder"
    assert info.source == f"{kind}:{src.resolve()}"
    assert (info.n_files, info.n_val_files) == (24, 6)
    train = [d for i, d in enumerate(DOCS) if (i + 1) % 4]
    val = [d for i, d in enumerate(DOCS) if (i + 1) % 4 == 0]
    text = bytes(info.tokens().astype("u1")).decode()
    assert text == "".join(d + "\n" for d in train + val)
    manifest = json.loads(info.manifest_path.read_text())
    # the source digest names the text, not the files: the same in every format
    assert manifest["sources"][0]["digest"] == source_digest(DOCS)


def test_manifest_fields_and_digest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _txt(src)
    info = build_folder_corpus(src, tmp_path / "c", val_every=4, licence="mit OR apache-2.0")
    raw = info.manifest_path.read_bytes()
    doc = json.loads(raw)
    assert raw == manifest_bytes(doc)  # canonical JSON, byte for byte
    assert info.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert doc == {
        "format": 1,
        "sources": [{"name": f"folder:{src.resolve()}", "licence": "MIT OR Apache-2.0",
                     "digest": source_digest(DOCS), "documents": 24,
                     "tokens": info.n_tokens}],
        "tokenizer": {"kind": "byte", "sha256": info.tokenizer_sha256, "vocab_size": 256},
        "token_dtype": "<u2",
        "tokens_sha256": info.sha256,
    }
    # another licence is another manifest (and corpus.json), the same tokens
    other = build_folder_corpus(src, tmp_path / "c", val_every=4, licence="CC0-1.0")
    assert other.sha256 == info.sha256 and other.manifest_sha256 != info.manifest_sha256


def test_stdlib_defaults_to_psf(tmp_path: Path) -> None:
    info = build_stdlib_corpus(tmp_path / "c", max_bytes=50_000, val_every=5)
    doc = json.loads(info.manifest_path.read_text())
    assert doc["sources"][0]["licence"] == "PSF-2.0"
    assert doc["sources"][0]["name"].startswith("stdlib:")


def test_a_folder_needs_a_valid_licence(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _txt(src)
    with pytest.raises(ConfigError, match=r"\[data\]\.licence is required"):
        build_folder_corpus(src, tmp_path / "c", val_every=4)
    with pytest.raises(ConfigError, match="unknown licence id 'Proprietary'"):
        build_folder_corpus(src, tmp_path / "c", val_every=4, licence="Proprietary")
    assert build_folder_corpus(src, tmp_path / "c", val_every=4,
                               licence="LicenseRef-uni-archive").n_files == 24
    (tmp_path / "run.toml").write_text(f"[data]\nsource = {json.dumps(str(src))}\n")
    with pytest.raises(ConfigError, match=r"run.toml: \[data\]\.licence is required"):
        parse_config((tmp_path / "run.toml").read_text(), tmp_path)
    with pytest.raises(ConfigError, match=r"\[data\]\.licence unknown licence id"):
        parse_config('[data]\nlicence = "GPL"\n', tmp_path)


@pytest.mark.parametrize(("expr", "canonical"), [
    ("MIT", "MIT"), ("cc-by-sa-4.0", "CC-BY-SA-4.0"), ("Apache-2.0+", "Apache-2.0+"),
    ("(mit or bsd-3-clause) and LicenseRef-x", "(MIT OR BSD-3-Clause) AND LicenseRef-x"),
    ("GPL-2.0-only with classpath-exception-2.0", "GPL-2.0-only WITH Classpath-exception-2.0"),
])
def test_spdx_expressions(expr: str, canonical: str) -> None:
    assert check_licence(expr) == canonical


@pytest.mark.parametrize("expr", ["", "Foo-1.0", "MIT AND", "(MIT", "MIT OR OR MIT", "MIT;",
                                  "MIT WITH Nope"])
def test_bad_spdx_expressions(expr: str) -> None:
    with pytest.raises(ValueError):
        check_licence(expr)


def _bad(tmp_path: Path, files: dict[str, bytes], column: str = "text") -> str:
    src = tmp_path / "bad"
    src.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    with pytest.raises(ConfigError) as e:
        build_folder_corpus(src, tmp_path / "c", val_every=2, licence="MIT", text_column=column)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_are_one_line_each(tmp_path: Path) -> None:
    ok = json.dumps({"text": "fine"}).encode() + b"\n"
    assert "bad/x.txt is not UTF-8" in _bad(tmp_path / "1", {"x.txt": b"ok\xff\xfe"})
    assert "a.jsonl:2 is not valid JSON" in _bad(tmp_path / "2", {"a.jsonl": ok + b"{oops\n"})
    assert "a.jsonl:3 is not a JSON object with a string 'text'" in _bad(
        tmp_path / "3", {"a.jsonl": ok + ok + b'{"body": "x"}\n'})
    assert "a.jsonl:1 is not UTF-8" in _bad(tmp_path / "4", {"a.jsonl": b'{"text": "\xff"}\n'})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"body": ["a", "b"]}), sink)
    assert "a.parquet has no column 'text'" in _bad(
        tmp_path / "5", {"a.parquet": sink.getvalue().to_pybytes()})
    assert "a.parquet is not a readable Parquet file" in _bad(
        tmp_path / "6", {"a.parquet": b"not parquet at all"})
    assert "no .txt, .md, .py, .jsonl, .parquet files" in _bad(
        tmp_path / "7", {"x.csv": b"a,b\n", ".hidden.txt": b"x"})
    src = tmp_path / "8" / "bad"
    src.parent.mkdir()
    _dataset(src)
    assert "has no column 'text'" in _bad(tmp_path / "8", {})


def test_init_builds_the_corpus_from_run_toml(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src)
    with pytest.raises(ConfigError, match=r"\[data\]\.licence is required"):
        init_run(tmp_path / "run", data_source=str(src))
    assert not (tmp_path / "run").exists()  # refused before anything is written
    rd = init_run(tmp_path / "run", data_source=str(src), data_licence="CC-BY-4.0",
                  data_text_column="body", data_tokenizer="bpe", data_vocab_size=300,
                  data_val_every=4)
    seen: list[tuple[str, int, int]] = []
    info = prepare_corpus(rd, on_progress=lambda *a: seen.append(a))
    assert (info.tokenizer_kind, info.vocab_size, info.n_files) == ("bpe", 300, 24)
    assert ("training tokenizer", 1, 1) in seen and seen[-1] == ("tokenizing", 24, 24)
    assert load_corpus(rd.corpus) == info == prepare_corpus(rd)  # reused
