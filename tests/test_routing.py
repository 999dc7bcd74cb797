"""llmbatch.routing.choose_route: online or through the Batch API, and why."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from llmbatch.config import ModelProfile
from llmbatch.models import Usage
from llmbatch.routing import BATCH_WINDOW, choose_route

PROFILE = ModelProfile(
    provider="openai", model="m", input_price=1.0, output_price=2.0, batch_min_items=100
)


class WithBatch:
    name = "openai"

    def batch(self) -> None:
        """Stands for a Batch API."""


class WithoutBatch:
    name = "local"


@pytest.mark.parametrize(
    ("mode", "provider", "items", "prefer", "deadline", "expected"),
    [
        ("online", WithBatch(), 10_000, "cost", None, "online"),
        ("batch", WithBatch(), 1, None, None, "batch"),
        ("auto", WithoutBatch(), 10_000, "cost", None, "online"),
        ("auto", WithBatch(), 99, "cost", None, "online"),
        ("auto", WithBatch(), 100, "cost", None, "batch"),
        ("auto", WithBatch(), 10_000, "speed", BATCH_WINDOW * 2, "online"),
        ("auto", WithBatch(), 10_000, None, BATCH_WINDOW, "batch"),
        ("auto", WithBatch(), 10_000, None, BATCH_WINDOW - 1, "online"),
        ("auto", WithBatch(), 10_000, None, None, "online"),
    ],
)
def test_the_route_table(
    mode: str, provider: Any, items: int, prefer: str | None, deadline: float | None, expected: str
) -> None:
    """Each combination of mode, provider, size, preference and deadline."""
    route = choose_route(
        mode, provider=provider, profile=PROFILE, items=items, prefer=prefer, deadline=deadline
    )
    assert expected == route.mode
    assert route.reason


@pytest.mark.parametrize(
    ("mode", "prefer", "provider", "message"),
    [
        ("fast", None, WithBatch(), "mode must be"),
        ("auto", "cheap", WithBatch(), "prefer must be"),
        ("batch", None, WithoutBatch(), "has no Batch API"),
    ],
)
def test_bad_choices_are_errors(mode: str, prefer: str | None, provider: Any, message: str) -> None:
    """Unknown modes and preferences, and batch without a Batch API, raise ValueError."""
    with pytest.raises(ValueError, match=message):
        choose_route(mode, provider=provider, profile=PROFILE, items=1, prefer=prefer)


def test_costs_saving_and_the_log_event() -> None:
    """The route carries both costs and the saving, and says so in ``routing.choice``."""
    usage = Usage(input_tokens=1_000_000, output_tokens=500_000)
    with capture_logs() as logs:
        route = choose_route(
            "auto", provider=WithBatch(), profile=PROFILE, items=500, usage=usage, prefer="cost"
        )
    assert (2.0, 1.0, 1.0) == (route.cost_online, route.cost_batch, route.saving)
    assert [("routing.choice", "batch", 1.0)] == [
        (e["event"], e["mode"], e["saving"]) for e in logs
    ]


def test_no_saving_without_prices() -> None:
    """An unpriced model routes the same way, with no saving to report."""
    route = choose_route(
        "batch",
        provider=WithBatch(),
        profile=ModelProfile(provider="openai", model="x"),
        items=5,
        usage=Usage(input_tokens=10),
    )
    assert route.saving is None
