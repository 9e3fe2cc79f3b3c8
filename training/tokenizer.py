"""Tokenizers: the byte-level default, byte-level BPE trained at init, or a user's file.

``byte`` (the default): a token is one UTF-8 byte, so the vocabulary is fixed at 256; nothing
to download or train, and any text round-trips exactly. ``ByteTokenizer`` is the fast numpy
path; ``byte_tokenizer_json`` is the same mapping as a ``tokenizers`` file (a BPE with the 256
byte symbols and no merges), so a byte run exports like any other.

``bpe``: byte-level BPE trained with the ``tokenizers`` library (``train_bpe``). Training is
deterministic: the same documents and vocabulary size give a byte-identical tokenizer.json,
hence the same SHA-256 (checked across processes by the tests). Its first token, id 0, is
``EOT`` (``<|endoftext|>``), which separates documents in the token file.

A tokenizer.json the user gives must load with ``tokenizers`` and hold one of
``EOT_CANDIDATES``, which becomes the document separator.

Token dtype: ``token_dtype(vocab_size)`` is little-endian uint16 up to 65,536 ids, uint32 up
to 2**32; every reader of a token file uses the dtype its corpus.json records.

``tokenizers`` and ``transformers`` are imported only by the functions that need them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

__all__ = ["ByteTokenizer", "EOT", "EOT_CANDIDATES", "TOKEN_DTYPES", "token_dtype",
           "check_token_dtype", "byte_tokenizer_json", "train_bpe", "parse_tokenizer",
           "eot_id", "load_tokenizer", "hf_tokenizer", "sha256_text", "wrap_tokenizer"]

EOT = "<|endoftext|>"
# end-of-text tokens of common tokenizer families, in the order they are looked for
EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|im_end|>")
TOKEN_DTYPES = ("<u2", "<u4")
_BPE_MIN_FREQUENCY = 2


class ByteTokenizer:
    """Encode text as its UTF-8 bytes (uint16 tokens, the corpus dtype) and back."""

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as a 1-D uint16 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, tokens: np.ndarray) -> str:
        """Return the text of ``tokens``; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD.

        Raises
        ------
        ValueError
            If a token is outside ``0..255``.
        """
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token out of range 0..{self.vocab_size - 1}")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def token_dtype(vocab_size: int) -> np.dtype:
    """The token file dtype for ``vocab_size`` ids: ``<u2`` up to 65,536, ``<u4`` up to 2**32.

    Raises
    ------
    ValueError
        If ``vocab_size`` is not in ``1..2**32``.
    """
    if not 0 < vocab_size <= 1 << 32:
        raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit in uint32 ids")
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def check_token_dtype(dtype: str, vocab_size: int) -> np.dtype:
    """``dtype`` (``"<u2"`` or ``"<u4"``) as a numpy dtype, if every id of ``vocab_size`` fits.

    Raises
    ------
    ValueError
        If the dtype is not a token dtype or is too narrow for the vocabulary.
    """
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    dt = np.dtype(dtype)
    if vocab_size > 1 << (8 * dt.itemsize):
        raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit in {dtype} ids")
    return dt


def sha256_text(text: str) -> str:
    """Hex SHA-256 of ``text`` as UTF-8: a tokenizer's digest is that of its tokenizer.json."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_tokenizer_json() -> str:
    """``ByteTokenizer`` as a tokenizer.json: byte ``b`` is id ``b``, no merges, no specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split: every byte stays its own token, whitespace included
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return str(tok.to_str())


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """Train a byte-level BPE on ``texts`` and return its tokenizer.json text.

    All 256 byte symbols are in the alphabet whatever the texts hold, so any text encodes;
    ``EOT`` is id 0. Deterministic: same texts and ``vocab_size``, same bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=_BPE_MIN_FREQUENCY, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return str(tok.to_str())


def parse_tokenizer(text: str, where: str) -> Tokenizer:
    """Load tokenizer.json ``text``; ``where`` names it in the error.

    Raises
    ------
    ConfigError
        If ``tokenizers`` cannot load it, or its vocabulary does not fit in uint32 ids.
    """
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception with a serde message
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where} is not a tokenizers tokenizer.json ({first})") from None
    try:
        token_dtype(tok.get_vocab_size(with_added_tokens=True))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return tok


def eot_id(tok: Tokenizer, where: str) -> int:
    """The id of the tokenizer's end-of-text token (the first of ``EOT_CANDIDATES`` it has).

    Raises
    ------
    ConfigError
        If it has none of them.
    """
    for name in EOT_CANDIDATES:
        if (i := tok.token_to_id(name)) is not None:
            return int(i)
    raise ConfigError(f"{where} has no end-of-text token to separate documents "
                      f"(one of {', '.join(EOT_CANDIDATES)})")


def load_tokenizer(path: str | os.PathLike[str], sha256: str | None = None) -> Tokenizer:
    """Load a tokenizer.json, first checking its SHA-256 when ``sha256`` is given.

    Raises
    ------
    ConfigError
        If the file is missing, does not match ``sha256``, or does not load.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError:
        raise ConfigError(f"tokenizer: {path} is missing or unreadable") from None
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ConfigError(f"tokenizer: {path} does not match its recorded sha256 {sha256[:12]}…")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"tokenizer: {path} is not UTF-8 JSON") from None
    return parse_tokenizer(text, f"tokenizer: {path}")


def hf_tokenizer(path: str | os.PathLike[str], sha256: str | None = None,
                 **kwargs: Any) -> PreTrainedTokenizerFast:
    """The tokenizer.json at ``path`` as a ``transformers.PreTrainedTokenizerFast`` (for
    export), with its end-of-text token (if any) as ``eos_token``; ``kwargs`` go to the
    constructor (e.g. ``model_max_length``)."""
    return wrap_tokenizer(load_tokenizer(path, sha256), **kwargs)


def wrap_tokenizer(tok: Tokenizer, **kwargs: Any) -> PreTrainedTokenizerFast:
    """``tok`` as ``hf_tokenizer`` wraps it (a node's task lease has the run's tokenizer.json
    as a blob, not a file)."""
    from transformers import PreTrainedTokenizerFast

    specials = {}
    for name in EOT_CANDIDATES:
        if tok.token_to_id(name) is not None:
            specials = {"eos_token": name, "bos_token": name}
            break
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{**specials, **kwargs})
