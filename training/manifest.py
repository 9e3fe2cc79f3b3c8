"""The data manifest: what a corpus was built from, under which licence, with which tokenizer.

``manifest.json`` in the corpus directory holds exactly the bytes ``manifest_bytes`` returns,
canonical JSON (keys sorted, no spaces, ASCII only, no NaN, no trailing newline)::

    {"format": 1,
     "sources": [{"name": "folder:/data/papers",      # kind:absolute path (stdlib: its root)
                  "licence": "CC-BY-4.0",             # an SPDX licence expression
                  "digest": "<hex SHA-256>",          # source_digest of the documents taken
                  "documents": 1200, "tokens": 734001}],
     "tokenizer": {"kind": "bpe", "sha256": "<hex SHA-256 of tokenizer.json>",
                   "vocab_size": 4096},
     "token_dtype": "<u2",
     "tokens_sha256": "<hex SHA-256 of tokens.bin>"}

The *manifest digest* is the SHA-256 of those bytes (``CorpusInfo.manifest_sha256``).

A source's ``digest`` is the SHA-256 over the documents actually taken, in corpus order, each
as ``uint64_le(len(utf8)) + utf8``: it names the text, not the files it came in, so the same
records as JSONL or as Parquet share a digest, and a change of ``max_bytes`` changes it.

Licences are SPDX expressions: ids joined by ``AND`` / ``OR``, ``WITH`` an exception,
parentheses, a trailing ``+``. Ids are checked against a built-in list of common ones
(matched case-insensitively, stored in SPDX spelling) plus any ``LicenseRef-<name>``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any

from protocol._fields import canonical_json

__all__ = ["STDLIB_LICENCE", "check_licence", "source_digest", "SourceDigest",
           "manifest_doc", "manifest_bytes"]

FORMAT = 1
STDLIB_LICENCE = "PSF-2.0"

_IDS = (
    "0BSD", "AFL-3.0", "AGPL-3.0-only", "AGPL-3.0-or-later", "Apache-1.1", "Apache-2.0",
    "Artistic-2.0", "BSD-1-Clause", "BSD-2-Clause", "BSD-3-Clause", "BSD-3-Clause-Clear",
    "BSL-1.0", "CC-BY-1.0", "CC-BY-2.0", "CC-BY-2.5", "CC-BY-3.0", "CC-BY-4.0",
    "CC-BY-NC-4.0", "CC-BY-NC-ND-4.0", "CC-BY-NC-SA-4.0", "CC-BY-ND-4.0", "CC-BY-SA-3.0",
    "CC-BY-SA-4.0", "CC-PDDC", "CC0-1.0", "CDDL-1.0", "CDLA-Permissive-1.0",
    "CDLA-Permissive-2.0", "CDLA-Sharing-1.0", "ECL-2.0", "EPL-1.0", "EPL-2.0", "EUPL-1.2",
    "GFDL-1.3-only", "GFDL-1.3-or-later", "GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0-only",
    "GPL-3.0-or-later", "ISC", "LGPL-2.1-only", "LGPL-2.1-or-later", "LGPL-3.0-only",
    "LGPL-3.0-or-later", "LPPL-1.3c", "MIT", "MIT-0", "MPL-2.0", "MS-PL", "NCSA",
    "ODbL-1.0", "ODC-By-1.0", "OFL-1.1", "OpenSSL", "PDDL-1.0", "PostgreSQL", "PSF-2.0",
    "Python-2.0", "Unicode-3.0", "Unicode-DFS-2016", "Unlicense", "UPL-1.0", "W3C", "WTFPL",
    "X11", "Zlib",
)
_EXCEPTIONS = ("Classpath-exception-2.0", "GCC-exception-3.1", "LLVM-exception",
               "Autoconf-exception-3.0", "Font-exception-2.0")
_BY_LOWER = {i.lower(): i for i in _IDS}
_EXC_LOWER = {i.lower(): i for i in _EXCEPTIONS}
_LICENSE_REF = re.compile(r"(DocumentRef-[A-Za-z0-9.-]+:)?LicenseRef-[A-Za-z0-9.-]+")
_TOKEN = re.compile(r"\s*(\(|\)|[A-Za-z0-9.:+-]+)")


class _Bad(ValueError):
    pass


def check_licence(expr: str) -> str:
    """``expr`` as a valid SPDX expression in canonical spelling (ids as SPDX spells them,
    operators upper case, single spaces).

    Raises
    ------
    ValueError
        With the reason, if ``expr`` is empty or not an expression of known ids.
    """
    tokens, pos = [], 0
    text = expr.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected {text[pos:].strip()[:1]!r} in SPDX expression {expr!r}")
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens:
        raise ValueError("is empty; give an SPDX licence id such as CC-BY-4.0 or MIT")
    try:
        out, rest = _expression(tokens)
        if rest:
            raise _Bad(f"unexpected {rest[0]!r}")
    except _Bad as e:
        raise ValueError(f"{e} in SPDX expression {expr!r} (known ids such as CC-BY-4.0, "
                         "MIT, Apache-2.0, or LicenseRef-<name>)") from None
    return out


def _expression(tokens: list[str]) -> tuple[str, list[str]]:
    # expression := term (("AND" | "OR") term)*
    out, rest = _term(tokens)
    while rest and rest[0].upper() in ("AND", "OR"):
        op = rest[0].upper()
        right, rest = _term(rest[1:])
        out = f"{out} {op} {right}"
    return out, rest


def _term(tokens: list[str]) -> tuple[str, list[str]]:
    # term := "(" expression ")" | id ["+"] ["WITH" exception]
    if not tokens:
        raise _Bad("expression ends early")
    head, rest = tokens[0], tokens[1:]
    if head == "(":
        inner, rest = _expression(rest)
        if not rest or rest[0] != ")":
            raise _Bad("unclosed '('")
        return f"({inner})", rest[1:]
    plus = head.endswith("+")
    name = head[:-1] if plus else head
    if _LICENSE_REF.fullmatch(name):
        out = name
    elif name.lower() in _BY_LOWER:
        out = _BY_LOWER[name.lower()]
    else:
        raise _Bad(f"unknown licence id {head!r}")
    out += "+" if plus else ""
    if rest and rest[0].upper() == "WITH":
        if len(rest) < 2 or rest[1].lower() not in _EXC_LOWER:
            raise _Bad(f"unknown licence exception {rest[1] if len(rest) > 1 else ''!r}")
        out, rest = f"{out} WITH {_EXC_LOWER[rest[1].lower()]}", rest[2:]
    return out, rest


class SourceDigest:
    """Running ``source_digest``: feed documents in corpus order, read ``hexdigest()``."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.documents = 0

    def update(self, text: str) -> None:
        data = text.encode("utf-8")
        self._h.update(struct.pack("<Q", len(data)))
        self._h.update(data)
        self.documents += 1

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def source_digest(texts: list[str]) -> str:
    """The digest of the module docstring over ``texts``."""
    d = SourceDigest()
    for t in texts:
        d.update(t)
    return d.hexdigest()


def manifest_doc(*, source: str, licence: str, digest: str, documents: int, tokens: int,
                 tokenizer_kind: str, tokenizer_sha256: str, vocab_size: int,
                 token_dtype: str, tokens_sha256: str) -> dict[str, Any]:
    """The manifest of a one-source corpus, as the module docstring lays it out."""
    return {
        "format": FORMAT,
        "sources": [{"name": source, "licence": check_licence(licence), "digest": digest,
                     "documents": documents, "tokens": tokens}],
        "tokenizer": {"kind": tokenizer_kind, "sha256": tokenizer_sha256,
                      "vocab_size": vocab_size},
        "token_dtype": token_dtype,
        "tokens_sha256": tokens_sha256,
    }


def manifest_bytes(doc: dict[str, Any]) -> bytes:
    """The canonical bytes of a manifest (what manifest.json holds and its digest covers)."""
    return canonical_json(doc)
