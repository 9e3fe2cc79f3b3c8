"""Byte-level tokenizer: a token is one UTF-8 byte, so the vocabulary is fixed at 256.

Nothing to download or train, and any text (or any file) round-trips exactly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ByteTokenizer"]


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
