"""The FAB guard: a node runs only the ATOM code installed on it.

Flower ships each run's app to a node as a FAB (a zip). The node's ``flwr-clientapp`` process
unpacks it into ``$FLWR_HOME/apps/...`` and puts that folder *first* on ``sys.path`` before it
imports the ClientApp, so any module in a FAB shadows the installed ``node`` package or one of
its dependencies (``torch/__init__.py`` would do) — a check inside the ClientApp is too late.
ATOM's coordinator sends a FAB holding only ``pyproject.toml`` that names
``node.client_app:app`` (see ``coordinator.superlink.app_pyproject``); anything else is refused
here, before a byte of it is unpacked:

- :func:`check_fab` is the policy, a pure function over the FAB bytes.
- :func:`main` is a ``flwr-clientapp`` stand-in: the join supervisor writes it (with
  :func:`install_guard`) into a private bin folder and puts that folder first on the SuperNode's
  ``PATH`` (:func:`guarded_env`), because the SuperNode's SuperExec starts ``flwr-clientapp`` by
  name. It runs Flower's own ``flwr-clientapp`` with the FAB installer wrapped, so a refused FAB
  ends as an error reply to the ServerApp (``FabRejected: FAB rejected by node policy: ...``).
  The other task programs a SuperExec may start (``flwr-agentapp``, ...) are refused outright.
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import stat
import sys
import tomllib
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from protocol.errors import ConfigError, ProtocolError

__all__ = [
    "CLIENTAPP",
    "FabRejected",
    "check_fab",
    "guarded_env",
    "install_guard",
    "main",
]

CLIENTAPP = "node.client_app:app"  # the only ClientApp a node runs
ALLOWED_SUFFIXES = (".toml", ".md")  # data, never imported
_INFO = ".info/CONTENT"  # Flower's per-file hash list, written by every FAB build
_MAX_FAB_BYTES = 1 << 20  # ours is under 1 KiB; Flower allows 10 MB
_MAX_MEMBERS = 16
_MAX_UNPACKED_BYTES = 1 << 20  # zip bombs: cap what the members claim to unpack to
_COMPONENTS = {"serverapp", "clientapp"}  # serverapp runs on the coordinator, not here
_GUARDED = "flwr-clientapp"
# Task programs a SuperNode's SuperExec may start by name; none of them is ATOM's.
_REFUSED = ("flwr-agentapp", "flwr-connector", "flwr-model", "flwr-serverapp",
            "flwr-simulation")
_RUNTIME_INSTALL_FLAG = "--allow-runtime-dependency-installation"


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


def _check_installed(app_dir: Path) -> None:
    """What Flower left in ``app_dir`` must pass the same policy: Flower reuses an existing
    app folder unchecked, so one written before the guard existed must not be run."""
    bad = [p for p in app_dir.rglob("*")
           if p.parent != app_dir or not p.is_file() or p.is_symlink()
           or not p.name.lower().endswith(ALLOWED_SUFFIXES)]
    if bad:
        shutil.rmtree(app_dir, ignore_errors=True)
        raise FabRejected(f"its app folder held {bad[0].relative_to(app_dir)}; removed it")


def guarded_installer(install: Callable[..., Path]) -> Callable[..., Path]:
    """Wrap Flower's ``install_from_fab`` so that only FABs passing :func:`check_fab` land."""

    def install_checked(fab_file: Any, *args: Any, **kwargs: Any) -> Path:
        content = fab_file.read_bytes() if isinstance(fab_file, Path) else fab_file
        check_fab(content)
        # Import the installed ClientApp (and, through it, torch and the rest) before the app
        # folder goes first on sys.path: Flower's loader then takes it from sys.modules.
        import node.client_app  # noqa: F401

        app_dir = Path(install(content, *args, **kwargs))
        _check_installed(app_dir)
        return app_dir

    return install_checked


def main() -> int:
    """``flwr-clientapp`` with the FAB guard; refuse every other task program."""
    program = Path(sys.argv[0]).name
    if program != _GUARDED:
        print(f"{program}: refused by the ATOM node policy (only ClientApps run here)",
              file=sys.stderr)
        return 2
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    # Fail closed: a Flower without this hook must not run unguarded.
    if not callable(getattr(runtime, "install_from_fab", None)):
        print(f"{program}: this Flower has no install_from_fab to guard; refusing",
              file=sys.stderr)
        return 2
    runtime.install_from_fab = guarded_installer(runtime.install_from_fab)
    # A FAB's [project].dependencies must never be installed on the node.
    sys.argv = [a for a in sys.argv if a != _RUNTIME_INSTALL_FLAG]
    flwr_clientapp()
    return 0


_SCRIPT = """#!/bin/sh
'''exec' {python} "$0" "$@"
' '''
# ATOM Network FAB guard, written by node.fab_guard.install_guard: do not edit.
import sys
from node.fab_guard import main
sys.exit(main())
"""


def install_guard(bin_dir: Path, python: str | None = None) -> Path:
    """Write the guard as ``flwr-clientapp`` (and the refusing stand-ins) into ``bin_dir``.

    Rewritten on every call, so the scripts always name the interpreter running now.
    """
    python = python or sys.executable
    if "'" in python or "\n" in python:
        raise ConfigError(f"cannot write the FAB guard for interpreter path {python!r}")
    try:
        bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = _SCRIPT.format(python=shlex.quote(python))
        for name in (_GUARDED, *_REFUSED):
            tmp = bin_dir / f".{name}.tmp"
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.replace(bin_dir / name)
    except OSError as err:
        raise ConfigError(f"cannot write the FAB guard into {bin_dir}: "
                          f"{err.strerror or err}") from None
    return bin_dir


def guarded_env(env: Mapping[str, str], bin_dir: Path) -> dict[str, str]:
    """``env`` with ``bin_dir`` first on PATH, so the SuperExec starts the guard."""
    out = dict(env)
    out["PATH"] = os.pathsep.join([str(bin_dir), out.get("PATH", "")])
    return out
