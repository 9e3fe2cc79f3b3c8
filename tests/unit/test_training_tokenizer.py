from __future__ import annotations

import numpy as np
import pytest

from training.tokenizer import ByteTokenizer


@pytest.mark.parametrize("text", ["", "def f(x):\n    return x\n", "naïve – 日本語 🙂"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_decode_rejects_out_of_range_tokens():
    with pytest.raises(ValueError):
        ByteTokenizer().decode(np.array([65, 256]))


def test_decode_of_a_cut_multibyte_char_does_not_raise():
    ids = ByteTokenizer().encode("é")[:1]
    assert ByteTokenizer().decode(ids) == "\ufffd"
