"""llmbatch.routing.choose_route: online or through the Batch API, and why.

The table tests check every combination of mode, provider, job size, preference and
deadline against the rules the module documents; the last tests run ``mode="auto"``
through ``LLMClient.map`` against the simulator and see it really go both ways.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from llmbatch.client import LLMClient
from llmbatch.config import ModelProfile
from llmbatch.failure import ItemError
from llmbatch.models import Request, Response, Usage
from llmbatch.providers.local import LocalProvider
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.routing import BATCH_WINDOW, Prefer, Route, choose_route, estimated_usage
from llmbatch.testing import FakeClock
from llmbatch.testing._content import content_tag
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig

MIN_ITEMS = 100
PROFILE = ModelProfile(
    provider="openai", model="m", input_price=1.0, output_price=2.0, batch_min_items=MIN_ITEMS
)


class WithBatch:
    """A provider with a Batch API (all ``choose_route`` looks at: ``batch`` and ``name``)."""

    name = "openai"

    def batch(self) -> None:
        """Stands for the provider's Batch API."""


class WithoutBatch:
    """A provider without one."""

    name = "local"


class BatchNotCallable:
    """An attribute named ``batch`` that is not a method is no Batch API."""

    name = "odd"
    batch = None


def documented_route(
    mode: str, has_batch: bool, items: int, prefer: str | None, deadline: float | None
) -> str:
    """The route the module docstring promises (``"error"`` for batch without a Batch API)."""
    if mode == "online":
        return "online"
    if mode == "batch":
        return "batch" if has_batch else "error"
    worth_it = items >= MIN_ITEMS
    accepts_latency = prefer == "cost" or (deadline is not None and deadline >= BATCH_WINDOW)
    if has_batch and prefer != "speed" and worth_it and accepts_latency:
        return "batch"
    return "online"


@pytest.mark.parametrize("deadline", [None, BATCH_WINDOW - 1, BATCH_WINDOW * 2])
@pytest.mark.parametrize("prefer", [None, "cost", "speed"])
@pytest.mark.parametrize("items", [MIN_ITEMS - 1, MIN_ITEMS * 50])
@pytest.mark.parametrize("has_batch", [True, False])
@pytest.mark.parametrize("mode", ["online", "batch", "auto"])
def test_every_combination_routes_as_documented(
    mode: str, has_batch: bool, items: int, prefer: str | None, deadline: float | None
) -> None:
    """Mode x provider x size x preference x deadline: the route the docs describe, and
    ``mode="batch"`` without a Batch API is a ValueError."""
    provider = WithBatch() if has_batch else WithoutBatch()
    expected = documented_route(mode, has_batch, items, prefer, deadline)
    if expected == "error":
        with pytest.raises(ValueError, match="the local provider has no Batch API"):
            choose_route(
                mode,
                provider=provider,
                profile=PROFILE,
                items=items,
                prefer=prefer,
                deadline=deadline,
            )
        return
    route = choose_route(
        mode, provider=provider, profile=PROFILE, items=items, prefer=prefer, deadline=deadline
    )
    assert expected == route.mode


@pytest.mark.parametrize(
    ("items", "prefer", "deadline", "expected"),
    [
        (MIN_ITEMS, "cost", None, "batch"),
        (MIN_ITEMS - 1, "cost", None, "online"),
        (MIN_ITEMS, None, BATCH_WINDOW, "batch"),
        (MIN_ITEMS, None, BATCH_WINDOW - 0.001, "online"),
        (MIN_ITEMS - 1, None, BATCH_WINDOW, "online"),
        (MIN_ITEMS, "speed", BATCH_WINDOW, "online"),
        (MIN_ITEMS, "cost", 60.0, "batch"),  # cost preferred outweighs a short deadline
        (0, "cost", None, "online"),
    ],
)
def test_boundaries_of_auto(
    items: int, prefer: str | None, deadline: float | None, expected: str
) -> None:
    """Exactly ``batch_min_items`` and exactly the 24 h window are enough."""
    route = choose_route(
        "auto", provider=WithBatch(), profile=PROFILE, items=items, prefer=prefer, deadline=deadline
    )
    assert expected == route.mode


def test_batch_min_items_comes_from_the_profile() -> None:
    """A profile with ``batch_min_items=1`` sends even a single request through the Batch
    API when cost is preferred."""
    eager = dataclasses.replace(PROFILE, batch_min_items=1)
    assert ("batch", "online") == (
        choose_route("auto", provider=WithBatch(), profile=eager, items=1, prefer="cost").mode,
        choose_route("auto", provider=WithBatch(), profile=PROFILE, items=1, prefer="cost").mode,
    )


@pytest.mark.parametrize(
    ("mode", "provider", "items", "prefer", "deadline", "reason"),
    [
        ("online", WithBatch(), 10_000, "cost", None, "online was asked for"),
        ("batch", WithBatch(), 1, None, None, "the Batch API was asked for"),
        ("auto", WithoutBatch(), 10_000, "cost", None, "the local provider has no Batch API"),
        ("auto", BatchNotCallable(), 10_000, "cost", None, "the odd provider has no Batch API"),
        ("auto", WithBatch(), 10_000, "speed", None, "speed is preferred over cost"),
        ("auto", WithBatch(), 99, "cost", None, "99 requests are fewer than the 100"),
        ("auto", WithBatch(), 100, "cost", None, "cost is preferred over speed"),
        ("auto", WithBatch(), 100, None, BATCH_WINDOW, "the deadline leaves room"),
        ("auto", WithBatch(), 100, None, None, "pass prefer='cost' or a deadline"),
    ],
)
def test_the_route_says_why(
    mode: str, provider: Any, items: int, prefer: str | None, deadline: float | None, reason: str
) -> None:
    """Each rule gives its own reason."""
    route = choose_route(
        mode, provider=provider, profile=PROFILE, items=items, prefer=prefer, deadline=deadline
    )
    assert reason in route.reason


async def test_real_providers_are_told_apart_by_their_batch_method(tmp_path: Path) -> None:
    """OpenAI has a Batch API; the local model has none (auto goes online, batch fails)."""
    local = LocalProvider(tmp_path / "model.gguf")  # never loaded
    async with OpenAIProvider(api_key="sk-test", base_url="http://127.0.0.1:9/v1") as remote:
        assert (
            "batch"
            == choose_route("auto", provider=remote, profile=PROFILE, items=500, prefer="cost").mode
        )
    assert (
        "online"
        == choose_route("auto", provider=local, profile=PROFILE, items=500, prefer="cost").mode
    )
    with pytest.raises(ValueError, match="local provider has no Batch API: use mode='online'"):
        choose_route("batch", provider=local, profile=PROFILE, items=500)


@pytest.mark.parametrize(
    ("mode", "prefer", "message"),
    [
        ("fast", None, "mode must be one of online, batch, auto, not 'fast'"),
        ("BATCH", None, "mode must be one of"),
        ("", None, "mode must be one of"),
        ("auto", "cheap", "prefer must be 'cost' or 'speed', not 'cheap'"),
        ("online", "Cost", "prefer must be"),
    ],
)
def test_unknown_modes_and_preferences_are_errors(
    mode: str, prefer: str | None, message: str
) -> None:
    """Anything but the documented words is a ValueError, and nothing is logged."""
    with capture_logs() as logs, pytest.raises(ValueError, match=re.escape(message)):
        choose_route(mode, provider=WithBatch(), profile=PROFILE, items=1, prefer=prefer)
    assert [] == logs


@pytest.mark.parametrize(
    ("profile", "usage", "online", "batch"),
    [
        # $1 / $2 per million: 1M in + 0.5M out = $2 online, half through the Batch API
        (PROFILE, Usage(input_tokens=1_000_000, output_tokens=500_000), 2.0, 1.0),
        # a 25 % discount instead of 50 %
        (
            dataclasses.replace(PROFILE, batch_discount=0.25),
            Usage(input_tokens=1_000_000, output_tokens=500_000),
            2.0,
            1.5,
        ),
        # cached input at its own price: 0.6M x $1 + 0.4M x $0.5 + 0.5M x $2 = $1.8
        (
            dataclasses.replace(PROFILE, cached_input_price=0.5),
            Usage(input_tokens=1_000_000, output_tokens=500_000, cached_tokens=400_000),
            1.8,
            0.9,
        ),
        (PROFILE, Usage(), 0.0, 0.0),
    ],
)
def test_costs_and_saving_with_a_priced_profile(
    profile: ModelProfile, usage: Usage, online: float, batch: float
) -> None:
    """The route carries the job's cost online and through the Batch API, and the
    saving, whichever way it goes."""
    for mode in ("online", "batch", "auto"):
        route = choose_route(mode, provider=WithBatch(), profile=profile, items=5, usage=usage)
        assert pytest.approx((online, batch, online - batch)) == (
            route.cost_online,
            route.cost_batch,
            route.saving,
        )


@pytest.mark.parametrize(
    ("profile", "usage"),
    [
        (PROFILE, None),
        (ModelProfile(provider="openai", model="unpriced"), Usage(input_tokens=10)),
        (dataclasses.replace(PROFILE, output_price=None), Usage(input_tokens=10)),
    ],
)
def test_no_costs_without_prices_or_usage(profile: ModelProfile, usage: Usage | None) -> None:
    """Without an estimate or without prices there is nothing to compare: no costs, no
    saving, and the route is chosen all the same."""
    route = choose_route(
        "auto", provider=WithBatch(), profile=profile, items=500, usage=usage, prefer="cost"
    )
    assert ("batch", None, None, None) == (
        route.mode,
        route.cost_online,
        route.cost_batch,
        route.saving,
    )


def test_saving_needs_both_costs() -> None:
    """``Route.saving`` is the difference, or None when either side is unknown."""
    assert 1.5 == Route("batch", "r", 2.0, 0.5).saving
    assert None is Route("batch", "r", 2.0, None).saving
    assert None is Route("online", "r", None, 1.0).saving


def test_the_choice_is_logged_with_the_saving() -> None:
    """One ``routing.choice`` info event: the route, why, the size and the money."""
    usage = Usage(input_tokens=1_000_000, output_tokens=500_000)
    with capture_logs() as logs:
        route = choose_route(
            "auto", provider=WithBatch(), profile=PROFILE, items=500, usage=usage, prefer="cost"
        )
    assert [
        {
            "event": "routing.choice",
            "log_level": "info",
            "mode": "batch",
            "reason": route.reason,
            "items": 500,
            "cost_online": 2.0,
            "cost_batch": 1.0,
            "saving": 1.0,
        }
    ] == logs


def test_an_online_choice_is_logged_too() -> None:
    """Going online is logged the same way, saving included (what batch would save)."""
    usage = Usage(input_tokens=1_000_000)
    with capture_logs() as logs:
        choose_route("auto", provider=WithBatch(), profile=PROFILE, items=5, usage=usage)
    assert [("routing.choice", "online", 5, 0.5)] == [
        (e["event"], e["mode"], e["items"], e["saving"]) for e in logs
    ]


# -- through LLMClient.map, against the simulator ----------------------------------------

EAGER = ModelProfile(
    provider="openai", model="gpt-4o-mini", input_price=0.15, output_price=0.60, batch_min_items=5
)


@pytest.mark.parametrize(
    ("items", "prefer", "deadline", "expected"),
    [
        (8, "cost", None, "batch"),
        (8, None, BATCH_WINDOW, "batch"),
        (8, None, None, "online"),
        (8, "speed", BATCH_WINDOW, "online"),
        (4, "cost", None, "online"),
    ],
)
async def test_auto_mode_really_goes_both_ways(
    simulator_factory: SimulatorFactory,
    items: int,
    prefer: Prefer | None,
    deadline: float | None,
    expected: str,
) -> None:
    """``LLMClient.map(mode="auto")`` sends the job through the Batch API (one batch, no
    online call, half price) or online (no batch), as the route says; the answers are
    the same in input order either way."""
    wall = FakeClock(start=1_700_000_000.0)
    sim = await simulator_factory(
        batch=BatchSimConfig(validating_seconds=1, seconds_per_request=0.125, finalizing_seconds=1),
        batch_clock=wall.time,
    )
    prompts = [f"paragraph {i}" for i in range(items)]
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        client = LLMClient(
            provider, model="gpt-4o-mini", sleep=wall.sleep, profiles={"openai/gpt-4o-mini": EAGER}
        )
        client.batch_poll_interval = 60.0
        requests = [
            Request.from_prompt(p, max_tokens=16, key=f"p{i}") for i, p in enumerate(prompts)
        ]
        with capture_logs() as logs:
            result = await client.map(requests, mode="auto", prefer=prefer, deadline=deadline)
    stats = sim.stats()
    batched = expected == "batch"
    assert (int(batched), 0 if batched else items) == (
        stats.batch["openai_batches_created"],
        stats.ok,
    )
    assert [expected] == [e["mode"] for e in logs if e["event"] == "routing.choice"]
    answers = [r for r in result.results if isinstance(r, Response)]
    assert [content_tag(p) for p in prompts] == [r.text[1:9] for r in answers]
    assert not any(isinstance(r, ItemError) for r in result.results)
    first = answers[0]
    full = (first.usage.input_tokens * 0.15 + first.usage.output_tokens * 0.60) / 1e6
    assert first.cost == pytest.approx(full / 2 if batched else full)


async def test_batch_mode_through_the_client_needs_a_batch_api(tmp_path: Path) -> None:
    """``LLMClient.map(mode="batch")`` over the local model is a ValueError before any
    call; so is an unknown mode."""
    async with LLMClient(LocalProvider(tmp_path / "model.gguf"), model="smollm2") as client:
        requests = [Request.from_prompt("hello")]
        with pytest.raises(ValueError, match="local provider has no Batch API"):
            await client.map(requests, mode="batch")
        with pytest.raises(ValueError, match="mode must be one of"):
            await client.map(requests, mode="later")  # type: ignore[arg-type]


def test_the_estimate_counts_the_schema_of_typed_requests() -> None:
    """A response model's schema is sent with every request: the one estimate behind
    cost figures counts it once per request, and not for plain requests."""
    schema = {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "topics": {"type": "array"}},
        "required": ["summary", "topics"],
    }
    plain = [Request.from_prompt(f"doc {i}") for i in range(3)]
    typed = [Request.from_prompt(f"doc {i}", response_model=schema) for i in range(3)]
    base = estimated_usage(plain, 10, model="gpt-4o-mini")
    with_schema = estimated_usage(typed, 10, model="gpt-4o-mini")
    extra = with_schema.input_tokens - base.input_tokens
    assert extra > 0
    assert extra % 3 == 0
    assert base.output_tokens == with_schema.output_tokens
