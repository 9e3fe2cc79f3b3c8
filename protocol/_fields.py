"""Strict field checks shared by the message dataclasses (private helpers)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from protocol.errors import ProtocolError

__all__ = [
    "canonical_json",
    "HEX64",
    "NONCE",
    "check_keys",
    "finite",
    "normalise",
    "read_typed",
    "require",
]

HEX64 = re.compile(r"[0-9a-f]{64}")
NONCE = re.compile(r"[0-9a-f]{32}")
Plain = int | float | str | bytes


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    """The canonical JSON of signed and digested documents (receipts, tree heads, manifests,
    provenance): keys sorted at every level, no whitespace, ASCII only, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _type_name(value: Any) -> str:
    return type(value).__name__


def normalise(obj: Any, prefix: str = "") -> dict[str, Plain]:
    """Plain ``{field: value}`` of a flat dataclass with int/float/str/bytes fields.

    Numeric values are coerced (``lr=1`` becomes ``1.0``) so that signed bytes and
    records do not depend on how a caller spelled a number; anything that cannot be
    coerced without loss of meaning (bool for int, str for float) is a ProtocolError.
    """
    out: dict[str, Plain] = {}
    for f in dataclasses.fields(obj):
        if f.name == "signature" or f.type not in ("int", "float", "str", "bytes"):
            continue
        value = getattr(obj, f.name)
        where = prefix + f.name
        if f.type == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            out[f.name] = int(value)
        elif f.type == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[f.name] = float(value)
        elif f.type == "str" and isinstance(value, str):
            out[f.name] = str(value)
        elif f.type == "bytes" and isinstance(value, (bytes, bytearray)):
            out[f.name] = bytes(value)
        else:
            raise ProtocolError(f"{where}: expected {f.type}, got {_type_name(value)}")
    return out


def check_keys(record: Mapping[str, Any], expected: set[str], what: str) -> None:
    """Raise ProtocolError naming the first missing or unexpected key."""
    keys = set(record.keys())
    if missing := sorted(expected - keys):
        raise ProtocolError(f"{what}: missing field {missing[0]!r}")
    if extra := sorted(keys - expected, key=str):
        raise ProtocolError(f"{what}: unexpected field {extra[0]!r}")


def read_typed(record: Mapping[str, Any], cls: type, prefix: str = "") -> dict[str, Any]:
    """Read ``prefix + field`` for every int/float/str/bytes field of ``cls``, exact types.

    ``bool`` is not an ``int`` here and ``int`` is not a ``float``: ``to_record`` always
    writes the exact type, so anything else was not written by us.
    """
    exact = {"int": int, "float": float, "str": str, "bytes": bytes}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.type not in exact:
            continue
        value = record[prefix + f.name]
        if type(value) is not exact[str(f.type)]:
            raise ProtocolError(f"{prefix}{f.name}: expected {f.type}, got {_type_name(value)}")
        values[f.name] = value
    return values


def require(ok: bool, where: str, message: str) -> None:
    """Raise ``ProtocolError("<where>: <message>")`` unless ``ok``."""
    if not ok:
        raise ProtocolError(f"{where}: {message}")


def finite(value: float) -> bool:
    """True for a finite float (helper kept here so callers read as sentences)."""
    return math.isfinite(value)
