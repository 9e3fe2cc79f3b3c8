"""The FAB guard: a node runs only the ATOM code installed on it.

Flower ships each run's app to a node as a FAB (a zip). Flower's own ``flwr-clientapp``
unpacks it into ``$FLWR_HOME/apps/...`` and puts that folder *first* on ``sys.path`` before it
imports the ClientApp, so any module in a FAB would shadow the installed ``node`` package or one
of its dependencies (``torch/__init__.py`` would do). An ATOM node never does that: its warm
worker (``node.warm_worker``) takes the tasks itself, checks each run's FAB with
:func:`check_fab` before anything else, never unpacks it, and runs the installed ClientApp.
ATOM's coordinator sends a FAB holding only ``pyproject.toml`` that names
``node.client_app:app`` (see ``coordinator.services.superlink.app_pyproject``); anything else is
refused, and the coordinator gets an error reply (``FAB rejected by node policy: ...``).
"""

from __future__ import annotations

import io
import stat
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from protocol.errors import ProtocolError

__all__ = ["CLIENTAPP", "FabRejected", "check_fab"]

CLIENTAPP = "node.client_app:app"  # the only ClientApp a node runs
ALLOWED_SUFFIXES = (".toml", ".md")  # data, never imported
_INFO = ".info/CONTENT"  # Flower's per-file hash list, written by every FAB build
_MAX_FAB_BYTES = 1 << 20  # ours is under 1 KiB; Flower allows 10 MB
_MAX_MEMBERS = 16
_MAX_UNPACKED_BYTES = 1 << 20  # zip bombs: cap what the members claim to unpack to
_COMPONENTS = {"serverapp", "clientapp"}  # serverapp runs on the coordinator, not here


class FabRejected(ProtocolError):
    """A FAB that breaks the node policy (code, foreign components, not a FAB at all)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"FAB rejected by node policy: {why}")


def _member_ok(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` may not be in a FAB, or None."""
    name = info.filename
    if name == _INFO:
        return None
    if info.is_dir():
        return f"it holds a folder ({name!r})"
    if (info.external_attr >> 16) & 0o170000 == stat.S_IFLNK:
        return f"it holds a link ({name!r})"
    path = PurePosixPath(name)
    if "\\" in name or len(path.parts) != 1 or name in (".", ".."):
        return f"it holds {name!r}: only top-level .toml/.md files are allowed"
    if not name.lower().endswith(ALLOWED_SUFFIXES):
        return f"it carries code or other files ({name!r}): only .toml/.md files are allowed"
    return None


def _pyproject(zf: zipfile.ZipFile) -> dict[str, Any]:
    try:
        with zf.open("pyproject.toml") as f:
            text = f.read(_MAX_UNPACKED_BYTES + 1)
    except KeyError:
        raise FabRejected("it has no pyproject.toml") from None
    if len(text) > _MAX_UNPACKED_BYTES:
        raise FabRejected("its pyproject.toml is too large")
    try:
        return tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise FabRejected(f"its pyproject.toml does not parse ({err})") from None


def _check_components(config: Mapping[str, Any]) -> None:
    try:
        components = config["tool"]["flwr"]["app"]["components"]
    except (KeyError, TypeError):
        raise FabRejected("its pyproject.toml has no [tool.flwr.app.components]") from None
    if not isinstance(components, dict):
        raise FabRejected("[tool.flwr.app.components] is not a table")
    if extra := sorted(set(components) - _COMPONENTS):
        raise FabRejected(f"it names a component this node does not run ({extra[0]!r})")
    clientapp = components.get("clientapp")
    if clientapp != CLIENTAPP:
        raise FabRejected(f"its clientapp is {clientapp!r}; this node runs only {CLIENTAPP!r}")


def check_fab(fab: bytes) -> None:
    """Raise :class:`FabRejected` unless ``fab`` is configuration only, for ATOM's ClientApp.

    Allowed: top-level ``*.toml`` / ``*.md`` files and Flower's ``.info/CONTENT``; a
    ``pyproject.toml`` whose ``[tool.flwr.app.components]`` holds at most ``serverapp`` and
    ``clientapp``, with ``clientapp = "node.client_app:app"`` exactly.
    """
    if not isinstance(fab, (bytes, bytearray)):
        raise FabRejected(f"expected bytes, got {type(fab).__name__}")
    if len(fab) > _MAX_FAB_BYTES:
        raise FabRejected(f"it is {len(fab)} bytes, more than {_MAX_FAB_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(fab))) as zf:
            members = zf.infolist()
            if len(members) > _MAX_MEMBERS:
                raise FabRejected(f"it holds {len(members)} files")
            names = [m.filename for m in members]
            if len(set(names)) != len(names):
                raise FabRejected("it holds the same name twice")
            if sum(m.file_size for m in members) > _MAX_UNPACKED_BYTES:
                raise FabRejected("it unpacks to more than 1 MiB")
            for m in members:
                if (why := _member_ok(m)) is not None:
                    raise FabRejected(why)
            config = _pyproject(zf)
    except FabRejected:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            NotImplementedError) as err:  # whatever a broken archive raises
        raise FabRejected(f"it is not a readable zip archive ({type(err).__name__})") from None
    _check_components(config)
