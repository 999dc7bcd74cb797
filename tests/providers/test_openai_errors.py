"""OpenAI error translation: a table over status/body/headers, then real SDK exceptions
raised by real HTTP against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from llmbatch import run_batch
from llmbatch.client import LLMClient
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
    RequestTooLarge,
    Timeout,
)
from llmbatch.failure import BatchFailed
from llmbatch.models import Request
from llmbatch.providers.openai import (
    OpenAIProvider,
    classify_openai_error,
    classify_openai_status,
)
from llmbatch.retry import RetryPolicy
from llmbatch.testing import FakeClock, Fault, Simulator
from llmbatch.testing._faults import FaultKind


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
            RequestTooLarge,
            None,
        ),
        (
            429,
            body("Request too large for gpt-4o-mini", "tokens", "rate_limit_exceeded"),
            {"x-ratelimit-reset-tokens": "6m0s"},
            RequestTooLarge,
            None,
        ),
        (
            429,
            body("This request cannot be retried", "requests", "rate_limit_exceeded"),
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


ORG = "in organization org-abc on"
TAIL = "The input or output tokens must be reduced in order to run successfully."


@pytest.mark.parametrize(
    ("message", "headers", "expected"),
    [
        (
            f"Request too large for gpt-4o-mini {ORG} tokens per min (TPM): "
            f"Limit 30000, Requested 50000. {TAIL}",
            {},
            ("tpm", 50_000.0, 30_000.0),
        ),
        (
            f"Request too large for gpt-4o-mini {ORG} tokens per min (TPM): "
            f"Limit 30000, Requested 50000. {TAIL}",
            {"x-should-retry": "false", "retry-after": "20"},
            ("tpm", 50_000.0, 30_000.0),
        ),
        (
            f"Request too large for gpt-4o {ORG} requests per min (RPM): Limit 3, Requested 5.",
            {},
            ("rpm", 5.0, 3.0),
        ),
        (
            f"Request too large for gpt-4o {ORG} tokens per day (TPD): "
            f"Limit 90000, Requested 100000. {TAIL}",
            {},
            ("tpd", 100_000.0, 90_000.0),
        ),
        (
            "Request too large for gpt-4.1 on tokens per min. Limit: 30,000, Requested: 45,500.",
            {},
            ("tpm", 45_500.0, 30_000.0),
        ),
        ("Request too large.", {}, (None, None, None)),
    ],
)
def test_request_too_large_is_permanent_and_says_which_bucket(
    message: str, headers: dict[str, str], expected: tuple[str | None, float | None, float | None]
) -> None:
    """OpenAI's "Request too large" 429 can never pass, whatever x-should-retry says: it is
    RequestTooLarge with no retry hint, its bucket and numbers taken from the message."""
    error = classify_openai_status(
        429, body(message, "tokens", "rate_limit_exceeded"), headers, model="gpt-4o-mini"
    )
    assert isinstance(error, RequestTooLarge)
    assert expected == (error.dimension, error.requested, error.capacity)
    assert (None, 429, message) == (error.retry_after, error.status_code, error.message)


def raised(outer: BaseException, *causes: BaseException) -> BaseException:
    """*outer* as the SDK raises it: from the first cause, itself from the next..."""
    for exc, cause in itertools.pairwise([outer, *causes]):
        exc.__cause__ = cause
    return outer


REQUEST = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


@pytest.mark.parametrize(
    ("exc", "expected", "connect"),
    [
        (
            raised(
                openai.APIConnectionError(request=REQUEST),
                httpx2.ConnectError("All connection attempts failed"),
                ConnectionRefusedError(111, "Connection refused"),
            ),
            ConnectionFailed,
            True,
        ),
        (
            raised(
                openai.APIConnectionError(request=REQUEST),
                httpx2.ConnectError("[Errno -2] Name or service not known"),
                socket.gaierror(-2, "Name or service not known"),
            ),
            ConnectionFailed,
            True,
        ),
        (
            raised(
                openai.APIConnectionError(request=REQUEST),
                httpx2.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]"),
                ssl.SSLCertVerificationError("certificate verify failed"),
            ),
            ConnectionFailed,
            True,
        ),
        (
            raised(openai.APITimeoutError(request=REQUEST), httpx2.ConnectTimeout("timed out")),
            ConnectionFailed,
            True,
        ),
        (
            raised(openai.APIConnectionError(request=REQUEST), ConnectionRefusedError()),
            ConnectionFailed,
            True,
        ),
        (
            raised(openai.APITimeoutError(request=REQUEST), httpx2.ReadTimeout("timed out")),
            Timeout,
            None,
        ),
        (
            raised(
                openai.APIConnectionError(request=REQUEST),
                httpx2.ReadError("connection reset"),
                ConnectionResetError(104, "Connection reset by peer"),
            ),
            ConnectionFailed,
            False,
        ),
        (
            raised(
                openai.APIConnectionError(request=REQUEST),
                httpx2.RemoteProtocolError("peer closed connection"),
            ),
            ConnectionFailed,
            False,
        ),
        (openai.APIConnectionError(request=REQUEST), ConnectionFailed, False),
    ],
)
def test_connect_failures_are_told_apart(
    exc: BaseException, expected: type[LLMBatchError], connect: bool | None
) -> None:
    """Only a connection never established (refused, DNS, TLS, connect timeout, found
    anywhere in the cause chain) is ``connect=True``; a read timeout stays Timeout, and
    a reset or protocol error mid-response is ``connect=False``."""
    error = classify_openai_error(exc, model="gpt-4o-mini")
    assert (expected, connect) == (type(error), getattr(error, "connect", None))


def free_port() -> int:
    """A 127.0.0.1 port where nothing listens (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_nothing_listening_is_a_connect_failure() -> None:
    """The real SDK against a port where nothing listens: ConnectionFailed, connect=True."""
    with pytest.raises(openai.APIConnectionError) as info:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="sk-test", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    error = classify_openai_error(info.value, model="gpt-4o-mini")
    assert (ConnectionFailed, True) == (type(error), getattr(error, "connect", None))


@pytest.fixture
async def plain_tcp_server() -> AsyncIterator[int]:
    """A server that answers any connection with plain HTTP bytes: an https client's TLS
    handshake with it fails."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_a_failed_tls_handshake_is_a_connect_failure(plain_tcp_server: int) -> None:
    """https to a server that does not speak TLS fails in the handshake: nothing was
    sent, so ConnectionFailed with connect=True."""
    with pytest.raises(openai.APIConnectionError) as info:
        async with openai.AsyncOpenAI(
            base_url=f"https://127.0.0.1:{plain_tcp_server}/v1", api_key="sk-test", max_retries=0
        ) as client:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    error = classify_openai_error(info.value, model="gpt-4o-mini")
    assert (ConnectionFailed, True) == (type(error), getattr(error, "connect", None))


@pytest.mark.parametrize("kind", ["reset", "malformed"])
async def test_a_connection_lost_after_connecting_is_not_a_connect_failure(
    kind: FaultKind,
) -> None:
    """The simulator accepts, then resets mid-body or sends a truncated body: the request
    reached the server, so ConnectionFailed with connect=False."""
    async with Simulator(script=[Fault(nth=1, kind=kind)]) as sim:
        with pytest.raises((openai.OpenAIError, ValueError)) as info:
            await call(sim)
    error = classify_openai_error(info.value, model="gpt-4o-mini")
    assert (ConnectionFailed, False) == (type(error), getattr(error, "connect", None))


async def test_a_request_larger_than_tpm_is_sent_once_and_never_retried() -> None:
    """A prompt larger than the whole TPM, through LLMClient with its default retry policy
    and no limits known in advance: the server answers "Request too large" (without
    x-should-retry, as OpenAI does), the client raises RequestTooLarge and the server
    saw exactly one request, with no wait."""
    clock = FakeClock()
    with clock.patch_loop():
        async with Simulator(tpm=1000, clock=clock.time) as sim:
            provider = OpenAIProvider(base_url=sim.base_url, api_key="sk-test-0123")
            async with LLMClient(provider, model="gpt-4o-mini", max_tokens=16, profiles={}) as c:
                with pytest.raises(RequestTooLarge) as info:
                    await c.complete(Request.from_prompt("lorem ipsum " * 800))
            requests = sim.stats().requests
    assert (1, "tpm", 1000.0) == (requests, info.value.dimension, info.value.capacity)
    assert info.value.requested is not None
    assert info.value.requested > 1000
    assert 0.0 == clock.time()
