"""Shared test configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Every test starts from structlog's defaults (only applications configure logging)."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
