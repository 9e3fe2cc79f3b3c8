"""Where a corpus's documents come from: the stdlib, a folder of files, or a saved dataset.

A ``Source`` yields documents (``str``) in a fixed order, so that a corpus built twice from
the same source is the same corpus:

- ``stdlib``: this Python's standard library ``.py`` files, by sorted relative path, test
  directories, ``encodings/`` (codec tables) and site-packages skipped;
- a folder: ``*.txt``, ``*.md``, ``*.py`` (a file is a document), ``*.jsonl`` (a line's
  ``text_column`` field is a document) and ``*.parquet`` (a row's ``text_column`` is a
  document; null rows skipped), by sorted relative path, hidden files and folders skipped;
- a ``datasets`` dataset written by ``save_to_disk`` (a folder holding ``state.json`` and
  ``dataset_info.json``, or ``dataset_dict.json``): its rows' ``text_column``, read with
  ``datasets.load_from_disk``; of a DatasetDict, the ``train`` split (or its only split).

Every bad input raises one ``ConfigError`` line naming the file (and line or column).
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError

__all__ = ["Source", "stdlib_source", "open_source", "is_saved_dataset", "FOLDER_SUFFIXES"]

# Directories of the stdlib that hold test suites (often odd, generated or binary-ish text).
# Tests are not ordinary code, and encodings/ is mostly generated codec tables: a shard of
# those is so unlike the rest that training on it measurably hurts validation loss.
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                         "__pycache__", "encodings"})
_TEXT_SUFFIXES = (".txt", ".md", ".py")
FOLDER_SUFFIXES = (*_TEXT_SUFFIXES, ".jsonl", ".parquet")
_PARQUET_BATCH = 1024


@dataclass(frozen=True)
class Source:
    """A document source. ``name`` is ``kind:absolute path``, as corpus.json records it."""

    kind: str  # "stdlib" | "folder" | "dataset"
    root: Path
    text_column: str = "text"

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.root}"

    def documents(self) -> Iterator[str]:
        """The documents in order (lazily: a folder is read file by file)."""
        if self.kind == "dataset":
            return _dataset_docs(self.root, self.text_column)
        skip = STDLIB_SKIP if self.kind == "stdlib" else frozenset()
        suffixes = (".py",) if self.kind == "stdlib" else FOLDER_SUFFIXES
        files = sorted((p for p in _walk(self.root, skip) if p.suffix in suffixes),
                       key=lambda p: p.relative_to(self.root).as_posix())
        if not files:
            raise ConfigError(f"corpus: no {', '.join(suffixes)} files under {self.root}")
        return _file_docs(files, self.text_column)


def stdlib_source() -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ConfigError(f"corpus: the standard library directory {root} does not exist")
    return Source("stdlib", root)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder ``datasets``' ``save_to_disk`` wrote."""
    return ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()) \
        or (path / "dataset_dict.json").is_file()


def open_source(path: str | os.PathLike[str], text_column: str = "text") -> Source:
    """A folder source, or a dataset source if ``path`` is a saved ``datasets`` dataset."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"corpus: [data].source {root} is not a directory")
    kind = "dataset" if is_saved_dataset(root) else "folder"
    return Source(kind, root.resolve(), text_column)


# -- readers ----------------------------------------------------------------------------


def _walk(root: Path, skip: frozenset[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _file_docs(files: list[Path], column: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_docs(path, column)
        elif path.suffix == ".parquet":
            yield from _parquet_docs(path, column)
        else:
            yield _utf8(path.read_bytes(), str(path))


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"corpus: {where} is not UTF-8 text (bad byte at offset {e.start})") \
            from None


def _jsonl_docs(path: Path, column: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(_utf8(line, where))
            except ValueError:
                raise ConfigError(f"corpus: {where} is not valid JSON") from None
            text = record.get(column) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"corpus: {where} is not a JSON object with a string "
                                  f"{column!r} field ([data].text_column)")
            yield text


def _parquet_docs(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"corpus: {path} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise ConfigError(f"corpus: {path} has no column {column!r} ([data].text_column); "
                          f"its columns: {', '.join(names) or 'none'}")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise ConfigError(f"corpus: {path} column {column!r} holds {kind}, not text")
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _dataset_docs(root: Path, column: str) -> Iterator[str]:
    import datasets

    try:
        ds: Any = datasets.load_from_disk(str(root))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; report one line
        raise ConfigError(f"corpus: {root} is not a loadable saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" not in ds and len(splits) != 1:
            raise ConfigError(f"corpus: {root} has splits {', '.join(splits)}; "
                              "need a 'train' split or exactly one split")
        ds = ds["train" if "train" in ds else splits[0]]
    if column not in ds.column_names:
        raise ConfigError(f"corpus: {root} has no column {column!r} ([data].text_column); "
                          f"its columns: {', '.join(ds.column_names) or 'none'}")
    for batch in ds.select_columns([column]).iter(batch_size=_PARQUET_BATCH):
        for text in batch[column]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise ConfigError(f"corpus: {root} column {column!r} holds "
                                  f"{type(text).__name__}, not text")
            yield text
