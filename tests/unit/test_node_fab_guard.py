"""The FAB guard refuses every bundle that carries code or names a foreign ClientApp."""

from __future__ import annotations

import io
import zipfile

import pytest
from flwr.cli.build import build_fab_from_files

from coordinator.services.superlink import app_pyproject
from node.fab_guard import CLIENTAPP, FabRejected, check_fab
from protocol.errors import ProtocolError


def fab(files: dict[str, bytes]) -> bytes:
    return build_fab_from_files(files)[0]


def pyproject(clientapp: str = CLIENTAPP, extra: str = "") -> bytes:
    text = app_pyproject().decode().replace(f'clientapp = "{CLIENTAPP}"',
                                            f'clientapp = "{clientapp}"')
    return (text + extra).encode()


def test_the_coordinators_fab_passes() -> None:
    check_fab(fab({"pyproject.toml": app_pyproject()}))
    check_fab(fab({"pyproject.toml": app_pyproject(), "README.md": b"# run\n"}))


@pytest.mark.parametrize("path", [
    "node/client_app.py", "client.py", "torch/__init__.py", "node/__init__.py",
    "sitecustomize.py", "data.json", "docs/README.md",
])
def test_code_or_any_other_file_is_refused(path: str) -> None:
    with pytest.raises(FabRejected, match="FAB rejected by node policy"):
        check_fab(fab({"pyproject.toml": app_pyproject(), path: b"import os\n"}))


@pytest.mark.parametrize("path", ["evil.pyc", "lib.so", "node.pth", "run.sh", "pyproject.py"])
def test_files_the_fab_builder_would_drop_are_refused_too(path: str) -> None:
    with pytest.raises(FabRejected, match="only .toml/.md"):
        check_fab(_zip({"pyproject.toml": app_pyproject(), path: b"\0"}))


@pytest.mark.parametrize("clientapp", [
    "evil.client:app", "node.client_app:other", "node.worker:app", "client_app:app",
])
def test_a_foreign_clientapp_is_refused(clientapp: str) -> None:
    with pytest.raises(FabRejected, match="clientapp"):
        check_fab(fab({"pyproject.toml": pyproject(clientapp)}))
    with pytest.raises(FabRejected, match="clientapp"):
        check_fab(_zip({"pyproject.toml": pyproject("")}))


def test_extra_components_are_refused() -> None:
    bundle = fab({"pyproject.toml": pyproject(extra="")})
    check_fab(bundle)
    text = app_pyproject().decode().replace(
        "[tool.flwr.app.components]\n", '[tool.flwr.app.components]\nagentapp = "evil:app"\n')
    with pytest.raises(FabRejected, match="agentapp"):
        check_fab(_zip({"pyproject.toml": text.encode()}))


def _zip(files: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    """A zip written by hand: what a hostile SuperLink could send, FAB builder or not."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            # a ZipInfo's fixed date, not the clock's: the bytes are parameter ids, and two
            # xdist workers collecting in different seconds saw different tests
            zf.writestr(zipfile.ZipInfo(name), data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("bundle", [
    b"", b"garbage bytes, not a zip", b"PK\x03\x04" + b"\0" * 40,
    _zip({}),  # no pyproject
    _zip({"pyproject.toml": b"not = [toml"}),
    _zip({"pyproject.toml": b"\xff\xfe"}),
    _zip({"pyproject.toml": b"[tool.flwr.app]\npublisher = 'x'\n"}),
    _zip({"pyproject.toml": app_pyproject()}, links=("config.toml",)),
    _zip({"pyproject.toml": app_pyproject(), "../escape.toml": b""}),
    _zip({"pyproject.toml": app_pyproject(), "/abs.toml": b""}),
    _zip({"pyproject.toml": app_pyproject(), "big.md": b"\0" * (2 << 20)}),
    _zip({"pyproject.toml": app_pyproject(), **{f"f{i}.md": b"" for i in range(20)}}),
])
def test_garbage_and_tricks_are_refused(bundle: bytes) -> None:
    with pytest.raises(FabRejected):
        check_fab(bundle)


def test_rejection_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        check_fab(b"junk")
