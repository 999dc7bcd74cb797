"""Anthropic: error translation (table, then real SDK errors over HTTP) and the provider
through LLMClient against the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmbatch.client import LLMClient
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
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
