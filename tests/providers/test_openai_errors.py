"""OpenAI error translation: a table over status/body/headers, then real SDK exceptions
raised by real HTTP against the simulator."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from llmbatch import run_batch
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContentFiltered,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    Timeout,
)
from llmbatch.failure import BatchFailed
from llmbatch.providers.openai import classify_openai_error, classify_openai_status
from llmbatch.retry import RetryPolicy
from llmbatch.testing import FakeClock, Fault, Simulator


def body(message: str, type_: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "payload", "headers", "expected", "retry_after"),
    [
        (
            429,
            body("Rate limit reached", "requests", "rate_limit_exceeded"),
            {"retry-after": "20"},
            RateLimited,
            20.0,
        ),
        (
            429,
            body("Rate limit reached", "tokens", "rate_limit_exceeded"),
            {"retry-after-ms": "1800"},
            RateLimited,
            1.8,
        ),
        (
            429,
            body("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
            {},
            QuotaExhausted,
            None,
        ),
        (
            429,
            body("Credit balance exhausted", "insufficient_quota", "credit_balance_exhausted"),
            {},
            QuotaExhausted,
            None,
        ),
        (
            429,
            body("billing", None, "insufficient_quota"),
            {"retry-after": "5"},
            QuotaExhausted,
            None,
        ),
        (
            429,
            {"error": {"code": "429", "message": "Please retry after 8 seconds"}},
            {"retry-after": "8"},
            RateLimited,
            8.0,
        ),
        (
            429,
            body("Request too large for gpt-4o-mini", "tokens", "rate_limit_exceeded"),
            {"x-should-retry": "false"},
            BadRequest,
            None,
        ),
        (
            401,
            body(
                "Incorrect API key provided: sk-abc...", "invalid_request_error", "invalid_api_key"
            ),
            {},
            AuthenticationFailed,
            None,
        ),
        (403, body("forbidden", "invalid_request_error", None), {}, AuthenticationFailed, None),
        (
            404,
            body("The model `gpt-9` does not exist", "invalid_request_error", "model_not_found"),
            {},
            NotFound,
            None,
        ),
        (
            400,
            body(
                "maximum context length is 128000 tokens",
                "invalid_request_error",
                "context_length_exceeded",
            ),
            {},
            ContextLengthExceeded,
            None,
        ),
        (
            400,
            body("flagged", "invalid_request_error", "content_filter"),
            {},
            ContentFiltered,
            None,
        ),
        (
            400,
            body("'messages' is a required property", "invalid_request_error", None),
            {},
            BadRequest,
            None,
        ),
        (413, "request entity too large", {}, BadRequest, None),
        (500, body("The server had an error", "server_error", None), {}, ProviderUnavailable, None),
        (
            503,
            body("overloaded", "server_error", None),
            {"retry-after": "3"},
            ProviderUnavailable,
            3.0,
        ),
        (529, None, {}, ProviderUnavailable, None),
        (408, None, {}, ProviderUnavailable, None),
        (409, None, {}, ProviderUnavailable, None),
    ],
)
def test_classify_openai_status(
    status: int,
    payload: Any,
    headers: dict[str, str],
    expected: type[LLMBatchError],
    retry_after: float | None,
) -> None:
    """Each documented status/body maps to one class of the tree, with its retry hint."""
    error = classify_openai_status(
        status, payload, {"x-request-id": "req_1", **headers}, model="gpt-4o-mini"
    )
    assert (expected, retry_after, status, "req_1") == (
        type(error),
        error.retry_after,
        error.status_code,
        error.request_id,
    )
    assert "gpt-4o-mini" == error.model


def test_rate_limited_kind_comes_from_the_body_type() -> None:
    """The 429's ``type`` (requests/tokens) says which bucket overflowed."""
    error = classify_openai_status(429, body("x", "tokens", "rate_limit_exceeded"), {})
    assert isinstance(error, RateLimited)
    assert "tokens" == error.kind


async def call(
    sim: Simulator, *, client_timeout: float = 30, model: str = "gpt-4o-mini", **kw: Any
) -> Any:
    async with openai.AsyncOpenAI(
        base_url=sim.base_url,
        api_key=kw.pop("api_key", "sk-test"),
        max_retries=0,
        timeout=client_timeout,
    ) as client:
        return await client.chat.completions.create(
            model=model,
            messages=kw.pop("messages", [{"role": "user", "content": "hi"}]),
            max_tokens=kw.pop("max_tokens", 8),
        )


@pytest.mark.parametrize(
    ("options", "kwargs", "expected"),
    [
        ({"script": [Fault(nth=1, status=429)]}, {}, RateLimited),
        (
            {"script": [Fault(nth=1, status=429, error_type="insufficient_quota")]},
            {},
            QuotaExhausted,
        ),
        ({"insufficient_quota": True}, {}, QuotaExhausted),
        ({"script": [Fault(nth=1, status=500)]}, {}, ProviderUnavailable),
        ({"script": [Fault(nth=1, status=503)]}, {}, ProviderUnavailable),
        ({"script": [Fault(nth=1, status=529)]}, {}, ProviderUnavailable),
        ({"script": [Fault(nth=1, kind="reset")]}, {}, ConnectionFailed),
        ({"script": [Fault(nth=1, kind="malformed")]}, {}, ConnectionFailed),
        ({"api_keys": ["sk-other"]}, {}, AuthenticationFailed),
        ({"reject_unknown_models": True}, {"model": "gpt-9"}, NotFound),
        ({"context_window": 50}, {"max_tokens": 100}, ContextLengthExceeded),
        ({}, {"messages": []}, BadRequest),
    ],
)
async def test_sdk_exceptions_over_http_are_classified(
    options: dict[str, Any], kwargs: dict[str, Any], expected: type[LLMBatchError]
) -> None:
    """Real SDK exceptions from real responses map into the tree; the key never shows."""
    async with Simulator(**options) as sim:
        with pytest.raises((openai.OpenAIError, ValueError)) as info:
            await call(sim, **kwargs)
    error = classify_openai_error(info.value, model="gpt-4o-mini")
    assert expected is type(error)
    assert "sk-test" not in str(error)


async def test_hang_past_the_timeout_is_a_timeout() -> None:
    """A request that hangs past the client's timeout becomes Timeout."""
    async with Simulator(script=[Fault(nth=1, kind="hang")], hang_seconds=5) as sim:
        with pytest.raises(openai.APITimeoutError) as info:
            await call(sim, client_timeout=0.2)
    assert isinstance(classify_openai_error(info.value), Timeout)


def test_unexpected_exceptions_are_not_swallowed() -> None:
    """A bug (not an SDK error) is re-raised, never retried as an outage."""
    with pytest.raises(ZeroDivisionError):
        classify_openai_error(ZeroDivisionError("bug"))


async def attempt(client: openai.AsyncOpenAI, text: str) -> str:
    try:
        response = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=8
        )
    except (openai.OpenAIError, json.JSONDecodeError) as exc:
        raise classify_openai_error(exc, model="gpt-4o-mini") from exc
    return response.choices[0].message.content or ""


@pytest.mark.parametrize(
    ("script", "attempts"),
    [
        ([Fault(nth=1, status=429)], 2),
        ([Fault(nth=1, status=500), Fault(nth=2, status=500), Fault(nth=3, status=500)], 4),
        ([Fault(nth=1, kind="reset"), Fault(nth=2, status=503)], 3),
        ([Fault(nth=1, kind="malformed")], 2),
    ],
)
async def test_the_server_sees_exactly_our_attempts(script: list[Fault], attempts: int) -> None:
    """With max_retries=0 the SDK adds no hidden retries: the server counts exactly the
    attempts the policy made, and the last one succeeds."""
    clock = FakeClock()
    async with (
        Simulator(script=script) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0) as client,
    ):
        text = await RetryPolicy().call(lambda: attempt(client, "hello"), sleep=clock.sleep)
        assert text.startswith("[")
        assert attempts == sim.stats().requests


async def test_insufficient_quota_stops_a_big_job_without_retrying_it() -> None:
    """insufficient_quota is fatal: the job stops at once (0 retries of it), keeping
    what finished, though the failure policy is 'collect'."""
    clock = FakeClock()
    async with (
        Simulator(script=[Fault(nth=5, status=429, error_type="insufficient_quota")]) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0) as client,
    ):

        async def one(i: int) -> str:
            return await RetryPolicy().call(lambda: attempt(client, f"doc {i}"), sleep=clock.sleep)

        with pytest.raises(BatchFailed) as info:
            await run_batch(one, range(1000), max_concurrency=1, on_error="collect")
        requests = sim.stats().requests
    assert ("fatal", 4) == (info.value.reason, info.value.error.index)
    assert info.value.result is not None
    assert 4 == len(info.value.result.ok)
    assert isinstance(info.value.error.exception, QuotaExhausted)
    assert (5, []) == (requests, clock.sleeps)


async def test_a_bad_request_fails_only_its_item() -> None:
    """A 400 on one item is permanent for that item; the others complete."""
    clock = FakeClock()
    async with (
        Simulator(context_window=60) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0) as client,
    ):

        async def one(text: str) -> str:
            return await RetryPolicy().call(lambda: attempt(client, text), sleep=clock.sleep)

        result = await run_batch(one, ["short", "x" * 400, "also short"], on_error="collect")
    assert [1] == [e.index for e in result.errors]
    assert "ContextLengthExceeded" == result.errors[0].error_type
    assert 3 == sim.stats().requests


async def test_hang_past_the_attempt_timeout_then_success() -> None:
    """A hung request times out after attempt_timeout (virtual time) and the retry
    succeeds: the server saw exactly two attempts."""
    clock = FakeClock()
    with clock.patch_loop():
        async with (
            Simulator(script=[Fault(nth=1, kind="hang")], hang_seconds=3600) as sim,
            openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0) as client,
        ):
            policy = RetryPolicy(attempt_timeout=30)
            text = await policy.call(lambda: attempt(client, "hello"))
            assert text.startswith("[")
            assert 2 == sim.stats().requests
    assert clock.time() >= 30.0


@pytest.mark.parametrize(
    "options",
    [
        {"script": [Fault(nth=5, status=429, error_type="insufficient_quota")]},
        {"api_keys": ["sk-someone-else"]},
    ],
)
async def test_fatal_errors_stop_a_job_after_one_request(options: dict[str, Any]) -> None:
    """Quota exhaustion and a rejected key each stop the job at the first such answer,
    never retried, with the work before it kept."""
    clock = FakeClock()
    async with (
        Simulator(**options) as sim,
        openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0) as client,
    ):

        async def one(i: int) -> str:
            return await RetryPolicy().call(lambda: attempt(client, f"doc {i}"), sleep=clock.sleep)

        with pytest.raises(BatchFailed) as info:
            await run_batch(one, range(1000), max_concurrency=1, on_error="skip")
        requests = sim.stats().requests
    assert "fatal" == info.value.reason
    assert [] == clock.sleeps
    assert requests == info.value.error.index + 1
    assert 1000 - requests == info.value.not_started
