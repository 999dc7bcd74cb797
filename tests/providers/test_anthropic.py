"""Anthropic: error translation (table, then real SDK errors over HTTP) and the provider
through LLMClient against the simulator."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import pytest

from llmbatch.client import LLMClient
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    RequestTooLarge,
    Timeout,
)
from llmbatch.limits import Limits, RateLimiter
from llmbatch.models import Request
from llmbatch.providers.anthropic import (
    AnthropicProvider,
    classify_anthropic_error,
    classify_anthropic_status,
)
from llmbatch.testing import FakeClock, Fault, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing._faults import FaultKind


def body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_9"}


@pytest.mark.parametrize(
    ("status", "payload", "headers", "expected", "retry_after"),
    [
        (
            429,
            body("rate_limit_error", "would exceed 80,000 output tokens per minute"),
            {"retry-after": "12"},
            RateLimited,
            12.0,
        ),
        (529, body("overloaded_error", "Overloaded"), {}, ProviderUnavailable, None),
        (500, body("api_error", "Internal"), {}, ProviderUnavailable, None),
        (401, body("authentication_error", "invalid x-api-key"), {}, AuthenticationFailed, None),
        (403, body("permission_error", "not allowed"), {}, AuthenticationFailed, None),
        (
            400,
            body("invalid_request_error", "Your credit balance is too low to access the API"),
            {},
            QuotaExhausted,
            None,
        ),
        (400, body("billing_error", "billing"), {}, QuotaExhausted, None),
        (404, body("not_found_error", "model: claude-9"), {}, NotFound, None),
        (
            400,
            body("invalid_request_error", "prompt is too long: 210000 tokens > 200000"),
            {},
            ContextLengthExceeded,
            None,
        ),
        (400, body("invalid_request_error", "max_tokens: field required"), {}, BadRequest, None),
        (413, body("request_too_large", "Request exceeds the maximum size"), {}, BadRequest, None),
        (
            429,
            body(
                "rate_limit_error",
                "This request would exceed your organization's rate limit of 5 input tokens "
                "per minute (9 requested) and can never succeed.",
            ),
            {"x-should-retry": "false"},
            RequestTooLarge,
            None,
        ),
    ],
)
def test_classify_anthropic_status(
    status: int,
    payload: Any,
    headers: dict[str, str],
    expected: type[LLMBatchError],
    retry_after: float | None,
) -> None:
    """Each documented error maps to one class of the tree, with its retry hint."""
    error = classify_anthropic_status(status, payload, headers, model="claude-haiku-4-5")
    assert (expected, retry_after, "req_9") == (type(error), error.retry_after, error.request_id)


@pytest.mark.parametrize(
    ("options", "model", "expected"),
    [
        ({"script": [Fault(nth=1, status=429)]}, "claude-haiku-4-5", RateLimited),
        ({"script": [Fault(nth=1, status=529)]}, "claude-haiku-4-5", ProviderUnavailable),
        ({"api_keys": ["sk-ant-other"]}, "claude-haiku-4-5", AuthenticationFailed),
        ({"insufficient_quota": True}, "claude-haiku-4-5", QuotaExhausted),
        ({"reject_unknown_models": True}, "claude-9", NotFound),
    ],
)
async def test_provider_errors_over_http(
    options: dict[str, Any], model: str, expected: type[LLMBatchError]
) -> None:
    """The provider raises tree errors for real SDK failures; fatal ones name the key's
    last four characters only."""
    async with (
        Simulator(**options) as sim,
        AnthropicProvider(base_url=sim.url, api_key="sk-ant-secret-0123") as provider,
    ):
        with pytest.raises(LLMBatchError) as info:
            await provider.complete(Request.from_prompt("hi", model=model, max_tokens=8))
    assert expected is type(info.value)
    assert "secret" not in str(info.value)
    if isinstance(info.value, QuotaExhausted | AuthenticationFailed):
        assert "[key …0123]" in str(info.value)


def test_unexpected_exceptions_are_not_swallowed() -> None:
    """A bug is re-raised, never classified as an outage."""
    with pytest.raises(KeyError):
        classify_anthropic_error(KeyError("bug"))


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=10.0)
    with fake.patch_loop():
        yield fake


async def test_client_with_anthropic_paces_itpm_and_otpm(clock: FakeClock) -> None:
    """LLMClient over AnthropicProvider with default limits: system prompt mapped, answers
    tagged to their input, ITPM/OTPM reservations and settlements (unused output
    reservations refunded, as Anthropic counts actual usage) keep the server from
    refusing any."""
    async with Simulator(rpm=500, itpm=4000, otpm=2500, clock=clock.time) as sim:
        provider = AnthropicProvider(base_url=sim.url, api_key="sk-ant-test-key")
        limiter = RateLimiter(Limits(rpm=500, input_tpm=4000, output_tpm=2500))
        async with LLMClient(
            provider, model="claude-haiku-4-5", max_tokens=48, limiter=limiter
        ) as client:
            prompts = [f"paragraph number {i} " * 8 for i in range(80)]
            requests = [Request.from_prompt(p, system="Be brief.") for p in prompts]
            result = await client.map(requests)
        stats = sim.stats()
    assert [
        r.text.startswith(f"[{content_tag(p)}]") for p, r in zip(prompts, result.ok, strict=True)
    ] == [True] * 80
    assert {} == dict(stats.rate_limited)
    assert all(r.usage.input_tokens > 0 and r.usage.output_tokens > 0 for r in result.ok)


NEVER = "and can never succeed. Please reduce the prompt length or the maximum tokens requested."


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "This request would exceed your organization's rate limit of 50,000 input tokens "
            f"per minute (80,000 requested) {NEVER}",
            ("input_tpm", 80_000.0, 50_000.0),
        ),
        (
            "This request would exceed your organization's rate limit of 8,000 output tokens "
            f"per minute (20,000 requested) {NEVER}",
            ("output_tpm", 20_000.0, 8_000.0),
        ),
        ("This request is larger than any rate limit and can never succeed.", (None, None, None)),
    ],
)
def test_a_429_that_can_never_succeed_is_request_too_large(
    message: str, expected: tuple[str | None, float | None, float | None]
) -> None:
    """A 429 saying the request can never succeed is RequestTooLarge (never retried, no
    retry hint, even with a retry-after), its bucket and numbers from the message."""
    error = classify_anthropic_status(
        429, body("rate_limit_error", message), {"retry-after": "60"}, model="claude-haiku-4-5"
    )
    assert isinstance(error, RequestTooLarge)
    assert expected == (error.dimension, error.requested, error.capacity)
    assert (None, message) == (error.retry_after, error.message)


REQUEST = httpx2.Request("POST", "http://127.0.0.1:9/v1/messages")


def raised(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "expected", "connect"),
    [
        (
            raised(anthropic.APIConnectionError(request=REQUEST), httpx2.ConnectError("refused")),
            ConnectionFailed,
            True,
        ),
        (
            raised(anthropic.APITimeoutError(request=REQUEST), httpx2.ConnectTimeout("timed out")),
            ConnectionFailed,
            True,
        ),
        (
            raised(anthropic.APITimeoutError(request=REQUEST), httpx2.ReadTimeout("timed out")),
            Timeout,
            None,
        ),
        (
            raised(anthropic.APIConnectionError(request=REQUEST), httpx2.ReadError("reset")),
            ConnectionFailed,
            False,
        ),
    ],
)
def test_connect_failures_are_told_apart(
    exc: BaseException, expected: type[LLMBatchError], connect: bool | None
) -> None:
    """Only a connection never established is ``connect=True``."""
    error = classify_anthropic_error(exc, model="claude-haiku-4-5")
    assert (expected, connect) == (type(error), getattr(error, "connect", None))


@pytest.mark.parametrize(
    ("fault", "connect"),
    [(None, True), ("reset", False), ("malformed", False)],
)
async def test_connect_failures_over_http(fault: FaultKind | None, connect: bool) -> None:
    """Through the provider and the real SDK: a port where nothing listens (no fault) is
    ``connect=True``; a simulator that accepts, then resets or sends a truncated body,
    is ``connect=False``."""
    async with Simulator(script=[Fault(nth=1, kind=fault)] if fault else []) as sim:
        url = sim.url
        if fault is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        async with AnthropicProvider(base_url=url, api_key="sk-ant-test-key") as provider:
            with pytest.raises(ConnectionFailed) as info:
                await provider.complete(Request.from_prompt("hi", model="m", max_tokens=8))
    assert connect is info.value.connect


async def test_a_request_larger_than_itpm_is_sent_once_and_never_retried(
    clock: FakeClock,
) -> None:
    """A prompt larger than the whole ITPM, through LLMClient with its default retry
    policy and no limits known in advance: one request, then RequestTooLarge, no wait."""
    async with Simulator(itpm=1000, clock=clock.time) as sim:
        provider = AnthropicProvider(base_url=sim.url, api_key="sk-ant-test-key")
        async with LLMClient(provider, model="claude-haiku-4-5", max_tokens=16, profiles={}) as c:
            with pytest.raises(RequestTooLarge) as info:
                await c.complete(Request.from_prompt("lorem ipsum " * 800))
        requests = sim.stats().requests
    assert (1, "input_tpm", 1000.0) == (requests, info.value.dimension, info.value.capacity)
    assert 10.0 == clock.time()
