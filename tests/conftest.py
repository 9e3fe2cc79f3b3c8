"""Fixtures shared across test directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixture_ledger import fixture_ledger, fixture_ledger_copy

__all__ = ["fixture_ledger", "fixture_ledger_copy"]


_E2E = Path(__file__).parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/e2e`` ``e2e`` (``-m e2e`` selects them; a ``pytestmark``
    in a conftest marks nothing) and put them in one xdist group: with ``-n 2 --dist
    loadgroup`` they run one after another in one worker — each starts a whole network of
    processes — while the other worker runs the rest."""
    for item in items:
        if _E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.xdist_group("e2e"))
