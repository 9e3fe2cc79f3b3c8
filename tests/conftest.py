"""Fixtures shared across test directories."""

from __future__ import annotations

from tests.fixture_ledger import fixture_ledger, fixture_ledger_copy

__all__ = ["fixture_ledger", "fixture_ledger_copy"]
