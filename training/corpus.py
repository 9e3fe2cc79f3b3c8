"""Corpora as one content-addressed token file, split into train and validation by document.

Layout of ``out_dir``::

    tokens.bin    uint16 little-endian byte tokens: all train documents, then all validation ones
    corpus.json   {"format", "sha256" (of tokens.bin), "n_tokens", "train_range", "val_range",
                   "n_files", "n_val_files", "source", "params"}

A document is a file (a record for ``*.jsonl``); documents are separated by a newline.
Every ``val_every``-th document (by sorted position, 1-based) goes to validation, so the two
splits never share a document. corpus.json is written last: a half-built corpus is never valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import ConfigError

__all__ = ["CorpusInfo", "build_stdlib_corpus", "build_folder_corpus", "load_corpus"]

FORMAT = 1
TOKENS_FILE = "tokens.bin"
META_FILE = "corpus.json"
# Directories of the stdlib that hold test suites (often odd, generated or binary-ish text).
# Tests are not ordinary code, and encodings/ is mostly generated codec tables: a shard of
# those is so unlike the rest that training on it measurably hurts validation loss.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                "encodings"}
_TEXT_SUFFIXES = {".txt", ".md", ".py"}


@dataclass(frozen=True)
class CorpusInfo:
    """A built corpus. ``path`` is the corpus directory (what ``load_corpus`` takes)."""

    path: Path
    sha256: str
    n_tokens: int
    train_range: tuple[int, int]
    val_range: tuple[int, int]
    n_files: int
    n_val_files: int
    source: str = ""

    @property
    def tokens_path(self) -> Path:
        return self.path / TOKENS_FILE

    def tokens(self) -> np.memmap:
        """All tokens as a read-only uint16 memmap (slice with train_range / val_range)."""
        return np.memmap(self.tokens_path, dtype="<u2", mode="r", shape=(self.n_tokens,))


def build_stdlib_corpus(
    out_dir: str | os.PathLike[str], max_bytes: int = 8_000_000, val_every: int = 20
) -> CorpusInfo:
    """Build (or reuse) a corpus of this Python's standard library ``.py`` sources.

    Files are taken in sorted relative-path order, test directories, ``encodings/`` (codec
    tables) and site-packages skipped, until ``max_bytes`` of text has been collected.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"corpus: the standard library directory {root} does not exist")
    files = sorted(
        (p for p in _walk(root, skip=_STDLIB_SKIP) if p.suffix == ".py"),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    docs = (p.read_bytes() for p in files)
    source = f"stdlib:{root}"
    # "skip" is part of the params so a corpus built with another selection is not reused
    params = {"max_bytes": max_bytes, "val_every": val_every, "skip": sorted(_STDLIB_SKIP)}
    return _build(Path(out_dir), docs, source, params)


def build_folder_corpus(
    folder: str | os.PathLike[str], out_dir: str | os.PathLike[str],
    max_bytes: int | None = None, val_every: int = 20,
) -> CorpusInfo:
    """Build (or reuse) a corpus from a folder of ``*.txt``, ``*.md``, ``*.py`` and ``*.jsonl``.

    Text files are documents as they are; every line of a ``.jsonl`` file is a JSON object
    whose ``"text"`` field is one document. Hidden files and directories are skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"corpus.folder: {root} is not a directory")
    files = sorted(
        (p for p in _walk(root, skip=set()) if p.suffix in _TEXT_SUFFIXES | {".jsonl"}),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ConfigError(f"corpus.folder: no .txt, .md, .py or .jsonl files under {root}")
    params = {"max_bytes": max_bytes, "val_every": val_every}
    return _build(Path(out_dir), _folder_docs(files), f"folder:{root.resolve()}", params)


def load_corpus(out_dir: str | os.PathLike[str]) -> CorpusInfo:
    """Read ``corpus.json`` and check tokens.bin against its SHA-256.

    Raises
    ------
    ConfigError
        If corpus.json is missing or malformed, or tokens.bin is missing or does not match.
    """
    return _info(Path(out_dir), _read_meta(Path(out_dir)))


# -- internals --------------------------------------------------------------------------


def _walk(root: Path, skip: set[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _folder_docs(files: list[Path]) -> Iterator[bytes]:
    for path in files:
        if path.suffix != ".jsonl":
            yield path.read_bytes()
            continue
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(
                        f"corpus.folder: {path}:{lineno} is not a JSON object with a string 'text'"
                    ) from None
                yield text.encode("utf-8")


def _build(
    out_dir: Path, docs: Iterator[bytes], source: str, params: dict[str, Any]
) -> CorpusInfo:
    val_every = params["val_every"]
    if not isinstance(val_every, int) or val_every < 2:
        raise ConfigError(f"corpus.val_every: must be an integer >= 2, got {val_every!r}")
    max_bytes = params["max_bytes"]
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"corpus.max_bytes: must be positive, got {max_bytes!r}")
    existing = _reusable(out_dir, source, params)
    if existing is not None:
        return existing

    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    for i, doc in enumerate(docs):
        if max_bytes is not None and total >= max_bytes:
            break
        (val if (i + 1) % val_every == 0 else train).append(doc + b"\n")
        total += len(doc) + 1
    if not train or not val:
        raise ConfigError(
            f"corpus: {len(train) + len(val)} document(s) found; need at least {val_every} "
            "so that both train and validation splits are non-empty"
        )
    data = b"".join(train + val)
    n_train = sum(len(d) for d in train)
    tokens = np.frombuffer(data, dtype=np.uint8).astype("<u2")

    out_dir.mkdir(parents=True, exist_ok=True)
    raw = tokens.tobytes()
    _atomic_write(out_dir / TOKENS_FILE, raw)
    meta = {
        "format": FORMAT,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "n_tokens": int(tokens.size),
        "train_range": [0, n_train],
        "val_range": [n_train, int(tokens.size)],
        "n_files": len(train) + len(val),
        "n_val_files": len(val),
        "source": source,
        "params": params,
    }
    _atomic_write(out_dir / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return _info(out_dir, meta, verify=False)


def _reusable(out_dir: Path, source: str, params: dict[str, Any]) -> CorpusInfo | None:
    """The existing corpus in ``out_dir`` if it was built from the same source and params."""
    if not (out_dir / META_FILE).exists():
        return None
    try:
        meta = _read_meta(out_dir)
        if meta.get("source") != source or meta.get("params") != params:
            return None
        return _info(out_dir, meta)
    except ConfigError:
        return None  # damaged or tampered: rebuild it


def _read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"corpus: {path} not found (build the corpus first)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"corpus: {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"corpus: {path} is not a JSON object")
    return meta


def _info(out_dir: Path, meta: dict[str, Any], verify: bool = True) -> CorpusInfo:
    where = out_dir / META_FILE
    try:
        info = CorpusInfo(
            path=out_dir,
            sha256=str(meta["sha256"]),
            n_tokens=int(meta["n_tokens"]),
            train_range=(int(meta["train_range"][0]), int(meta["train_range"][1])),
            val_range=(int(meta["val_range"][0]), int(meta["val_range"][1])),
            n_files=int(meta["n_files"]),
            n_val_files=int(meta["n_val_files"]),
            source=str(meta.get("source", "")),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"corpus: {where} is missing or has a bad field ({e!r})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"corpus: {where} has unsupported format {meta.get('format')!r}")
    if verify:
        tokens_path = info.tokens_path
        try:
            size = tokens_path.stat().st_size
            digest = _sha256_file(tokens_path) if size == 2 * info.n_tokens else None
        except OSError:
            raise ConfigError(f"corpus: {tokens_path} is missing or unreadable") from None
        if digest != info.sha256:
            raise ConfigError(f"corpus: {tokens_path} does not match the sha256 in {where}")
    return info


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
