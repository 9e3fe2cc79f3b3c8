"""Corpora as one content-addressed token file, split into train and validation by document.

Layout of ``out_dir``::

    tokens.bin      little-endian tokens of corpus.json's "dtype" ("<u2", or "<u4" for a
                    vocabulary over 65,536): all train documents, then all validation ones
    tokenizer.json  the tokenizer (``training.tokenizer``), SHA-256 in corpus.json
    manifest.json   the data manifest (``training.manifest``): source, licence, digests
    corpus.json     {"format": 2, "sha256" (of tokens.bin), "dtype", "n_tokens",
                     "train_range", "val_range", "n_files" (documents), "n_val_files",
                     "source", "params", "tokenizer": {"kind", "sha256", "vocab_size",
                     "eot_id"}, "manifest_sha256"}

Documents come from a ``training.sources.Source``. With the byte tokenizer a document ends
with a newline byte (so the default stdlib corpus is what it always was); with ``bpe`` or a
user tokenizer it ends with the end-of-text token. Every ``val_every``-th document (by
position, 1-based) goes to validation, so the two splits never share a document. A BPE
tokenizer is trained on the train documents only. corpus.json is written last: a half-built
corpus is never valid, and ``load_corpus`` checks every file against its SHA-256. A format-1
corpus.json (before tokenizers) still loads: byte tokens, uint16, no manifest.

What every lease and credit receipt names (``CorpusInfo.tokenizer_digest`` and
``data_manifest``): the SHA-256 of tokenizer.json and of manifest.json. A format-1 corpus has
neither file, so its tokenizer digest is that of ``tokenizer.byte_tokenizer_json()`` (the
same byte mapping) and its manifest digest that of its corpus.json object in the manifest's
canonical JSON (``manifest.manifest_bytes``): the only description of its data it has.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.errors import ConfigError
from training import tokenizer as tk
from training.manifest import STDLIB_LICENCE, SourceDigest, check_licence, manifest_bytes, \
    manifest_doc
from training.sources import STDLIB_SKIP, Source, open_source, stdlib_source

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["CorpusInfo", "Progress", "build_corpus", "build_stdlib_corpus",
           "build_folder_corpus", "load_corpus"]

FORMAT = 2
_FORMATS = (1, 2)
TOKENS_FILE = "tokens.bin"
META_FILE = "corpus.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
# (stage, done, total): stages "training tokenizer" (0/1 then 1/1) and "tokenizing" (documents)
Progress = Callable[[str, int, int], None]
_ENCODE_BATCH = 256


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
    dtype: str = "<u2"  # of tokens.bin and of every shard blob cut from it
    tokenizer_kind: str = "byte"  # "byte" | "bpe" | "file"
    tokenizer_sha256: str = ""  # of tokenizer.json: what a lease names; "" for format 1
    vocab_size: int = 256  # ids 0..vocab_size-1: the model's vocabulary must cover them
    eot_id: int | None = None  # the document separator; None: a newline byte (byte tokens)
    manifest_sha256: str = ""  # of manifest.json; "" for format 1
    # what leases and receipts name: manifest_sha256, or for format 1 the module docstring's
    data_manifest: str = ""

    @property
    def tokenizer_digest(self) -> str:
        """What leases name: tokenizer.json's SHA-256 (format 1: the byte tokenizer's)."""
        return self.tokenizer_sha256 or tk.sha256_text(tk.byte_tokenizer_json())

    @property
    def tokens_path(self) -> Path:
        return self.path / TOKENS_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def tokens(self) -> np.memmap:
        """All tokens as a read-only memmap of ``dtype`` (slice with train_range / val_range)."""
        return np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def tokenizer(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` (checked against ``tokenizer_sha256``)."""
        if not self.tokenizer_sha256:  # format 1: byte tokens, no file
            return tk.parse_tokenizer(tk.byte_tokenizer_json(), "byte tokenizer")
        return tk.load_tokenizer(self.tokenizer_path, self.tokenizer_sha256)


def build_stdlib_corpus(
    out_dir: str | os.PathLike[str], max_bytes: int = 8_000_000, val_every: int = 20,
    **options: Any,
) -> CorpusInfo:
    """Build (or reuse) a corpus of this Python's standard library ``.py`` sources (licence
    PSF-2.0 unless ``licence`` says otherwise); ``options`` as for ``build_corpus``."""
    options.setdefault("licence", STDLIB_LICENCE)
    return build_corpus(stdlib_source(), out_dir, max_bytes=max_bytes, val_every=val_every,
                        **options)


def build_folder_corpus(
    folder: str | os.PathLike[str], out_dir: str | os.PathLike[str],
    max_bytes: int | None = None, val_every: int = 20, *, text_column: str = "text",
    **options: Any,
) -> CorpusInfo:
    """Build (or reuse) a corpus from a folder of files or a saved ``datasets`` dataset
    (``training.sources``); ``options`` as for ``build_corpus`` (``licence`` is required)."""
    if not Path(folder).is_dir():
        raise ConfigError(f"corpus.folder: {folder} is not a directory")
    return build_corpus(open_source(folder, text_column), out_dir, max_bytes=max_bytes,
                        val_every=val_every, **options)


def build_corpus(
    source: Source, out_dir: str | os.PathLike[str], *, licence: str = "",
    tokenizer: str = "byte", vocab_size: int = 4096, max_bytes: int | None = None,
    val_every: int = 20, on_progress: Progress | None = None,
) -> CorpusInfo:
    """Build (or reuse) the corpus of ``source`` in ``out_dir``.

    ``tokenizer`` is ``"byte"``, ``"bpe"`` (trained here with ``vocab_size`` tokens) or the
    path of a tokenizer.json. An existing corpus built from the same source and settings
    (and, for a tokenizer file, the same file bytes) is reused, not rebuilt.

    Raises
    ------
    ConfigError
        One line for any bad setting or input: no or malformed ``licence`` (``[data].licence``),
        an unknown tokenizer, a file that is not UTF-8, a bad JSONL line, a missing column...
    """
    if not isinstance(val_every, int) or val_every < 2:
        raise ConfigError(f"corpus.val_every: must be an integer >= 2, got {val_every!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"corpus.max_bytes: must be positive, got {max_bytes!r}")
    if not licence:
        raise ConfigError(f"corpus: [data].licence is required for the source {source.name} "
                          "(an SPDX licence id, e.g. \"CC-BY-4.0\" or \"LicenseRef-mine\")")
    try:
        licence = check_licence(licence)
    except ValueError as e:
        raise ConfigError(f"corpus: [data].licence {e}") from None
    params: dict[str, Any] = {"max_bytes": max_bytes, "val_every": val_every,
                              "licence": licence, "tokenizer": tokenizer}
    user_json = None
    if tokenizer == "bpe":
        if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 1 << 32:
            raise ConfigError(f"corpus: [data].vocab_size must be an integer in "
                              f"257..{1 << 32}, got {vocab_size!r}")
        params["vocab_size"] = vocab_size
    elif tokenizer != "byte":
        user_json = _read_user_tokenizer(Path(tokenizer))
        params["tokenizer"] = str(Path(tokenizer).resolve())
        params["tokenizer_sha256"] = tk.sha256_text(user_json)
    if source.kind == "stdlib":
        params["skip"] = sorted(STDLIB_SKIP)  # another selection is another corpus
    else:
        params["text_column"] = source.text_column
    out = Path(out_dir)
    existing = _reusable(out, source.name, params)
    if existing is not None:
        return existing

    digest = SourceDigest()
    train, val = _split(source.documents(), max_bytes, val_every, digest)
    progress = on_progress or (lambda stage, done, total: None)
    if tokenizer == "byte":
        kind, tok_json, tok = "byte", tk.byte_tokenizer_json(), None
    else:
        if user_json is None:
            progress("training tokenizer", 0, 1)
            kind, tok_json = "bpe", tk.train_bpe(iter(train), vocab_size)
            progress("training tokenizer", 1, 1)
        else:
            kind, tok_json = "file", user_json
        tok = tk.parse_tokenizer(tok_json, f"corpus: tokenizer {tokenizer}")
    vocab = 256 if tok is None else int(tok.get_vocab_size(with_added_tokens=True))
    eot = None if tok is None else tk.eot_id(tok, f"corpus: tokenizer {tokenizer}")
    dtype = tk.token_dtype(vocab)
    pieces = list(_encode(train + val, tok, eot, dtype, progress))
    n_train = sum(len(p) for p in pieces[:len(train)])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)

    out.mkdir(parents=True, exist_ok=True)
    raw = tokens.tobytes()
    tokens_sha = hashlib.sha256(raw).hexdigest()
    tok_sha = tk.sha256_text(tok_json)
    manifest = manifest_bytes(manifest_doc(
        source=source.name, licence=licence, digest=digest.hexdigest(),
        documents=digest.documents, tokens=int(tokens.size), tokenizer_kind=kind,
        tokenizer_sha256=tok_sha, vocab_size=vocab, token_dtype=dtype.str,
        tokens_sha256=tokens_sha))
    _atomic_write(out / TOKENS_FILE, raw)
    _atomic_write(out / TOKENIZER_FILE, tok_json.encode("utf-8"))
    _atomic_write(out / MANIFEST_FILE, manifest)
    meta = {
        "format": FORMAT,
        "sha256": tokens_sha,
        "dtype": dtype.str,
        "n_tokens": int(tokens.size),
        "train_range": [0, n_train],
        "val_range": [n_train, int(tokens.size)],
        "n_files": len(train) + len(val),
        "n_val_files": len(val),
        "source": source.name,
        "params": params,
        "tokenizer": {"kind": kind, "sha256": tok_sha, "vocab_size": vocab, "eot_id": eot},
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
    }
    _atomic_write(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return _info(out, meta, verify=False)


def load_corpus(out_dir: str | os.PathLike[str], *, verify: bool = True) -> CorpusInfo:
    """Read ``corpus.json`` and check tokens.bin, tokenizer.json and manifest.json against
    their SHA-256 (``verify=False``: only read corpus.json, e.g. for the vocabulary size).

    Raises
    ------
    ConfigError
        If corpus.json is missing or malformed, its dtype cannot hold its vocabulary, or a
        file is missing or does not match.
    """
    return _info(Path(out_dir), _read_meta(Path(out_dir)), verify=verify)


# -- internals --------------------------------------------------------------------------


def _split(docs: Iterator[str], max_bytes: int | None, val_every: int,
           digest: SourceDigest) -> tuple[list[str], list[str]]:
    """Take documents until ``max_bytes`` of UTF-8 (plus one separator each) are in; every
    ``val_every``-th goes to validation. ``digest`` sees each document taken, in order."""
    train: list[str] = []
    val: list[str] = []
    total = 0
    for i, doc in enumerate(docs):
        if max_bytes is not None and total >= max_bytes:
            break
        (val if (i + 1) % val_every == 0 else train).append(doc)
        digest.update(doc)
        total += len(doc.encode("utf-8")) + 1
    if not train or not val:
        raise ConfigError(
            f"corpus: {len(train) + len(val)} document(s) found; need at least {val_every} "
            "so that both train and validation splits are non-empty"
        )
    return train, val


def _encode(docs: list[str], tok: Tokenizer | None, eot: int | None, dtype: np.dtype,
            progress: Progress) -> Iterator[np.ndarray]:
    """Each document's tokens with its separator, as ``dtype``; byte tokens without
    ``tokenizers`` (the same ids, far faster)."""
    n = len(docs)
    for lo in range(0, n, _ENCODE_BATCH):
        progress("tokenizing", lo, n)
        batch = docs[lo:lo + _ENCODE_BATCH]
        if tok is None:
            for doc in batch:
                yield np.frombuffer(doc.encode("utf-8") + b"\n", dtype=np.uint8).astype(dtype)
        else:
            for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
                ids = np.empty(len(enc.ids) + 1, dtype=dtype)
                ids[:-1] = enc.ids
                ids[-1] = eot
                yield ids
    progress("tokenizing", n, n)


def _read_user_tokenizer(path: Path) -> str:
    where = f"corpus: [data].tokenizer {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} cannot be read ({type(e).__name__})") from None
    tok = tk.parse_tokenizer(text, where)
    tk.eot_id(tok, where)
    return text


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
    if meta.get("format") not in _FORMATS:
        raise ConfigError(f"corpus: {where} has unsupported format {meta.get('format')!r}")
    try:
        tok = meta.get("tokenizer") or {}
        eot = tok.get("eot_id")
        info = CorpusInfo(
            path=out_dir,
            sha256=str(meta["sha256"]),
            n_tokens=int(meta["n_tokens"]),
            train_range=(int(meta["train_range"][0]), int(meta["train_range"][1])),
            val_range=(int(meta["val_range"][0]), int(meta["val_range"][1])),
            n_files=int(meta["n_files"]),
            n_val_files=int(meta["n_val_files"]),
            source=str(meta.get("source", "")),
            dtype=str(meta.get("dtype", "<u2")),  # format 1 had only uint16
            tokenizer_kind=str(tok.get("kind", "byte")),
            tokenizer_sha256=str(tok.get("sha256", "")),
            vocab_size=int(tok.get("vocab_size", 256)),
            eot_id=None if eot is None else int(eot),
            manifest_sha256=str(meta.get("manifest_sha256", "")),
            data_manifest=str(meta.get("manifest_sha256", ""))
            or hashlib.sha256(manifest_bytes(meta)).hexdigest(),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ConfigError(f"corpus: {where} is missing or has a bad field ({e!r})") from None
    try:
        dtype = tk.check_token_dtype(info.dtype, info.vocab_size)
    except ValueError as e:
        raise ConfigError(f"corpus: {where}: {e}") from None
    if meta["format"] >= 2 and not (info.tokenizer_sha256 and info.manifest_sha256):
        raise ConfigError(f"corpus: {where} names no tokenizer or manifest sha256")
    if verify:
        tokens_path = info.tokens_path
        try:
            size = tokens_path.stat().st_size
            digest = (_sha256_file(tokens_path) if size == dtype.itemsize * info.n_tokens
                      else None)
        except OSError:
            raise ConfigError(f"corpus: {tokens_path} is missing or unreadable") from None
        if digest != info.sha256:
            raise ConfigError(f"corpus: {tokens_path} does not match the sha256 in {where}")
        for path, sha in ((info.tokenizer_path, info.tokenizer_sha256),
                          (info.manifest_path, info.manifest_sha256)):
            if not sha:
                continue
            try:
                ok = _sha256_file(path) == sha
            except OSError:
                raise ConfigError(f"corpus: {path} is missing or unreadable") from None
            if not ok:
                raise ConfigError(f"corpus: {path} does not match the sha256 in {where}")
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
