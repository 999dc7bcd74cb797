"""Fault injection, observed from the official clients: errors, resets, garbage, hangs, scripts."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from llmbatch.testing import Fault, RequestInfo, Simulator
from llmbatch.testing.pytest_plugin import SimulatorFactory

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Ping?"}]


def _openai(sim: Simulator, key: str = "sk-test", **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0, **options)


async def _outcome(client: openai.AsyncOpenAI) -> str:
    """``"ok"`` or the class name of what the call raised."""
    try:
        await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    except Exception as exc:
        return type(exc).__name__
    return "ok"


@pytest.mark.parametrize(
    ("status", "error_class", "retry_after"),
    [
        (500, openai.InternalServerError, None),
        (502, openai.InternalServerError, None),
        (503, openai.InternalServerError, "1"),
        (529, openai.InternalServerError, None),
        (409, openai.ConflictError, None),
    ],
)
async def test_openai_error_faults(
    simulator_factory: SimulatorFactory,
    status: int,
    error_class: type[openai.APIStatusError],
    retry_after: str | None,
) -> None:
    """An error fault answers its status in OpenAI's shape (503 with ``retry-after``)."""
    sim = await simulator_factory(errors={status: 1.0})
    async with _openai(sim) as client:
        with pytest.raises(error_class) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    error = info.value
    assert status == error.status_code
    assert ("server_error" if status >= 500 else "invalid_request_error") == error.type
    assert retry_after == error.response.headers.get("retry-after")
    assert {str(status): 1} == dict(sim.stats().faults)
    assert {status: 1} == dict(sim.stats().responses)


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (529, anthropic.OverloadedError, "overloaded_error"),
        (500, anthropic.InternalServerError, "api_error"),
    ],
)
async def test_anthropic_error_faults(
    simulator_factory: SimulatorFactory,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    """Anthropic faults use Anthropic's shape: 529 is ``overloaded_error``."""
    sim = await simulator_factory(errors={status: 1.0})
    async with anthropic.AsyncAnthropic(base_url=sim.url, api_key="k", max_retries=0) as client:
        with pytest.raises(error_class) as info:
            await client.messages.create(
                model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
    assert isinstance(info.value.body, dict)
    assert (status, error_type) == (info.value.status_code, info.value.body["error"]["type"])


async def test_reset_is_a_connection_error(simulator_factory: SimulatorFactory) -> None:
    """A reset sends headers and half the body, then drops the connection."""
    sim = await simulator_factory(reset=1.0)
    async with _openai(sim) as client:
        assert "APIConnectionError" == await _outcome(client)
    stats = sim.stats()
    assert ({"reset": 1}, {}) == (dict(stats.faults), dict(stats.responses))


async def test_reset_mid_stream(simulator_factory: SimulatorFactory) -> None:
    """A reset stream delivers some chunks, then fails while the client reads it."""
    sim = await simulator_factory(reset=1.0)
    chunks: list[ChatCompletionChunk] = []

    async def read(stream: openai.AsyncStream[ChatCompletionChunk]) -> None:
        async for chunk in stream:
            chunks.append(chunk)

    async with _openai(sim) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True
        )
        with pytest.raises(openai.APIConnectionError):
            await read(stream)
    assert 0 < len(chunks)


async def test_malformed_body_fails_to_decode(simulator_factory: SimulatorFactory) -> None:
    """A malformed answer is a 200 whose JSON body is cut short."""
    sim = await simulator_factory(malformed=1.0)
    async with _openai(sim) as client:
        with pytest.raises(json.JSONDecodeError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert ({"malformed": 1}, {200: 1}) == (dict(sim.stats().faults), dict(sim.stats().responses))


async def test_hang_outlasts_the_client_timeout(simulator_factory: SimulatorFactory) -> None:
    """A hang holds the request past the client's timeout (a short real wait, < 0.5 s)."""
    sim = await simulator_factory(hang=1.0, hang_seconds=0.4)
    async with _openai(sim, timeout=0.15) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert {"hang": 1} == dict(sim.stats().faults)


async def test_hang_goes_through_the_injected_sleep(simulator_factory: SimulatorFactory) -> None:
    """A hang sleeps ``hang_seconds`` via ``sleep=``, then answers normally."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    sim = await simulator_factory(hang=1.0, hang_seconds=1234.0, sleep=sleep)
    async with _openai(sim) as client:
        assert "ok" == await _outcome(client)
    assert [1234.0] == slept


async def test_scripted_faults_count_per_key(simulator_factory: SimulatorFactory) -> None:
    """``Fault(nth=2, key="sk-a")`` hits only sk-a's second request; nth without a key hits
    that request of every key."""
    script = [
        Fault(nth=2, status=429, key="sk-a"),
        Fault(nth=3, kind="reset"),
        Fault(nth=4, status=429, error_type="tokens", key="sk-b"),
    ]
    sim = await simulator_factory(script=script)
    async with _openai(sim, "sk-a") as a, _openai(sim, "sk-b") as b:
        outcomes_a = [await _outcome(a) for _ in range(4)]
        outcomes_b = [await _outcome(b) for _ in range(4)]
    assert ["ok", "RateLimitError", "APIConnectionError", "ok"] == outcomes_a
    assert ["ok", "ok", "APIConnectionError", "RateLimitError"] == outcomes_b
    assert {"requests": 1, "tokens": 1} == dict(sim.stats().rate_limited)


async def test_scripted_429_has_the_rate_limit_shape(simulator_factory: SimulatorFactory) -> None:
    """A scripted 429 reads like a real one, with its ``retry_after``; quota faults too."""
    script = [
        Fault(nth=1, status=429, retry_after=2.5),
        Fault(nth=2, status=429, error_type="insufficient_quota"),
    ]
    sim = await simulator_factory(script=script)
    async with _openai(sim) as client:
        errors = []
        for _ in range(2):
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
            errors.append(info.value)
    assert ("requests", "rate_limit_exceeded") == (errors[0].type, errors[0].code)
    assert ("3", "2500") == (
        errors[0].response.headers["retry-after"],
        errors[0].response.headers["retry-after-ms"],
    )
    assert ("insufficient_quota", "false") == (
        errors[1].code,
        errors[1].response.headers["x-should-retry"],
    )


async def test_callable_script(simulator_factory: SimulatorFactory) -> None:
    """A callable script sees each request and decides its fault."""
    seen: list[tuple[str, str, int]] = []

    def decide(info: RequestInfo) -> Fault | None:
        seen.append((info.provider, info.model, info.nth))
        return Fault(status=503) if info.model == "flaky" else None

    sim = await simulator_factory(script=decide)
    async with _openai(sim) as client:
        await client.chat.completions.create(model="steady", messages=USER)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="flaky", messages=USER)
    assert [("openai", "steady", 1), ("openai", "flaky", 2)] == seen
    assert "sk-test" not in repr(RequestInfo("openai", "/", "sk-test", "m", 1, {}))


async def _pattern(simulator_factory: SimulatorFactory, seed: int) -> list[str]:
    sim = await simulator_factory(errors={500: 0.25, 503: 0.1}, malformed=0.1, seed=seed)
    async with _openai(sim) as client:
        return [await _outcome(client) for _ in range(60)]


async def test_seeded_fractions_are_reproducible(simulator_factory: SimulatorFactory) -> None:
    """The same seed gives the same sequence of faults; another seed another one."""
    first = await _pattern(simulator_factory, seed=7)
    again = await _pattern(simulator_factory, seed=7)
    other = await _pattern(simulator_factory, seed=8)
    assert first == again
    assert first != other
    # 45% of 60 requests are faults on average; a seeded draw stays well inside 15..45
    assert 15 <= sum(outcome != "ok" for outcome in first) <= 45
    assert {"ok", "InternalServerError", "JSONDecodeError"} == set(first)


@pytest.mark.parametrize(
    "options",
    [
        {"errors": {500: 0.6}, "reset": 0.5},
        {"errors": {200: 0.1}},
        {"hang": -0.1},
        {"script": [Fault(status=500)]},  # a list script needs nth=
    ],
)
async def test_invalid_fault_configuration(options: dict[str, Any]) -> None:
    """Fractions beyond 1, non-error statuses and un-numbered scripts are refused up front."""
    with pytest.raises(ValueError):
        Simulator(**options)


@pytest.mark.parametrize(
    "options",
    [{"kind": "explode"}, {"status": 200}, {"nth": 0}],
)
def test_invalid_fault(options: dict[str, Any]) -> None:
    """A Fault checks its own fields."""
    with pytest.raises(ValueError):
        Fault(**options)
