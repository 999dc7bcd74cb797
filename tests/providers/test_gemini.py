"""Gemini: error translation (a table, then the real SDK's errors over HTTP), the provider
through ``llmbatch.map`` against the simulator, and its Batch API through the shared
lifecycle (journal, resume after a kill) — all with the official ``google-genai`` SDK.

Time is injected, never slept: online tests run the loop on a ``FakeClock``
(``patch_loop``), batch tests move the simulator's batch clock with the lifecycle's
``sleep``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest

pytest.importorskip("google.genai", reason="needs the gemini extra (google-genai)")

import llmbatch
from llmbatch.batchapi import MemoryJournal, run_batch_api
from llmbatch.client import LLMClient
from llmbatch.config import BUILTIN_PROFILES
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
)
from llmbatch.failure import BatchFailed
from llmbatch.limits import Limits
from llmbatch.models import Request, Response
from llmbatch.providers import choose_provider
from llmbatch.providers.gemini import (
    GeminiProvider,
    classify_gemini_status,
)
from llmbatch.store import Store
from llmbatch.testing import FakeClock, Fault, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing._faults import FaultKind
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig

FLASH = "gemini-2.5-flash"
KEY = "AIzaSy-secret-test-key-7f3a"
START = 1_700_000_000.0
POLL = 60.0


def error_body(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": details or []}}


def quota(quota_id: str, value: str = "15") -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaId": quota_id, "quotaValue": value}],
    }


RETRY_37 = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}
KEY_INVALID = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}


@pytest.mark.parametrize(
    ("status", "body", "expected", "retry_after", "kind"),
    [
        (
            429,
            error_body(
                429,
                "RESOURCE_EXHAUSTED",
                "quota",
                [quota("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"), RETRY_37],
            ),
            RateLimited,
            37.0,
            "requests",
        ),
        (
            429,
            error_body(
                429,
                "RESOURCE_EXHAUSTED",
                "quota",
                [
                    quota("GenerateContentInputTokensPerModelPerMinute"),
                    {"@type": RETRY_37["@type"], "retryDelay": "1.5s"},
                ],
            ),
            RateLimited,
            1.5,
            "tokens",
        ),
        (429, error_body(429, "RESOURCE_EXHAUSTED", "busy"), RateLimited, None, None),
        (
            429,
            error_body(
                429,
                "RESOURCE_EXHAUSTED",
                "quota",
                [quota("GenerateRequestsPerDayPerProjectPerModel"), RETRY_37],
            ),
            QuotaExhausted,
            None,
            None,
        ),
        (
            429,
            error_body(
                429, "RESOURCE_EXHAUSTED", "no quota", [quota("GenerateRequestsPerMinute", "0")]
            ),
            QuotaExhausted,
            None,
            None,
        ),
        (503, error_body(503, "UNAVAILABLE", "overloaded"), ProviderUnavailable, None, None),
        (500, error_body(500, "INTERNAL", "internal"), ProviderUnavailable, None, None),
        (504, error_body(504, "DEADLINE_EXCEEDED", "deadline"), ProviderUnavailable, None, None),
        (400, error_body(400, "INVALID_ARGUMENT", "bad field"), BadRequest, None, None),
        (
            400,
            error_body(400, "INVALID_ARGUMENT", "API key not valid.", [KEY_INVALID]),
            AuthenticationFailed,
            None,
            None,
        ),
        (401, error_body(401, "UNAUTHENTICATED", "no"), AuthenticationFailed, None, None),
        (403, error_body(403, "PERMISSION_DENIED", "no"), AuthenticationFailed, None, None),
        (404, error_body(404, "NOT_FOUND", "models/x is not found"), NotFound, None, None),
        (
            400,
            error_body(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1200000) exceeds the maximum number of tokens allowed "
                "(1048576).",
            ),
            ContextLengthExceeded,
            None,
            None,
        ),
    ],
)
def test_classify_gemini_status(
    status: int,
    body: dict[str, Any],
    expected: type[LLMBatchError],
    retry_after: float | None,
    kind: str | None,
) -> None:
    """Each documented error maps to one class of the tree, with RetryInfo's delay as
    the retry hint (none for a per-day quota, which no wait of seconds helps)."""
    error = classify_gemini_status(status, body, {}, model=FLASH)
    assert (expected, retry_after) == (type(error), error.retry_after)
    assert kind == getattr(error, "kind", None)


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=10.0)
    with fake.patch_loop():
        yield fake


def provider_for(sim: Simulator, key: str = KEY) -> GeminiProvider:
    return GeminiProvider(key, base_url=sim.url)


@pytest.mark.parametrize(
    ("options", "model", "expected"),
    [
        ({"script": [Fault(nth=1, status=429, retry_after=9)]}, FLASH, RateLimited),
        ({"script": [Fault(nth=1, status=503)]}, FLASH, ProviderUnavailable),
        ({"script": [Fault(nth=1, status=500)]}, FLASH, ProviderUnavailable),
        ({"api_keys": ["AIzaSy-another-key-0000"]}, FLASH, AuthenticationFailed),
        ({"insufficient_quota": True, "rpd": 50}, FLASH, QuotaExhausted),
        ({"reject_unknown_models": True}, "gemini-9", NotFound),
        ({"context_window": 8}, FLASH, ContextLengthExceeded),
    ],
)
async def test_provider_errors_over_http(
    options: dict[str, Any], model: str, expected: type[LLMBatchError]
) -> None:
    """Real SDK failures come out as tree errors; the key never appears in them (fatal
    ones name its last four characters only)."""
    async with Simulator(**options) as sim, provider_for(sim) as provider:
        with pytest.raises(LLMBatchError) as info:
            await provider.complete(
                Request.from_prompt("hello there, a prompt of some length", model=model)
            )
    error = info.value
    assert expected is type(error)
    assert "secret" not in str(error)
    assert KEY not in repr(error.context())
    if isinstance(error, RateLimited):
        assert (9.0, "requests") == (error.retry_after, error.kind)
    if isinstance(error, QuotaExhausted | AuthenticationFailed):
        assert "[key …7f3a]" in str(error)


@pytest.mark.parametrize(
    ("fault", "connect"),
    [(None, True), ("reset", False), ("malformed", False)],
)
async def test_connect_failures_over_http(fault: FaultKind | None, connect: bool) -> None:
    """A port where nothing listens is ``connect=True``; a reset or a truncated body
    after the request reached the server is ``connect=False``."""
    async with Simulator(script=[Fault(nth=1, kind=fault)] if fault else []) as sim:
        url = sim.url
        if fault is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        async with GeminiProvider(KEY, base_url=url) as provider:
            with pytest.raises(ConnectionFailed) as info:
                await provider.complete(Request.from_prompt("hi", model=FLASH))
    assert connect is info.value.connect


def test_no_key_is_an_authentication_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a key given or in the environment, the provider says which variables it reads."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(AuthenticationFailed, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        GeminiProvider()


async def test_choose_provider_opens_gemini_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--provider gemini`` and, with no OpenAI/Anthropic key, GOOGLE_API_KEY alone pick
    Gemini with its default model."""
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    chosen = choose_provider(None, None)
    assert ("gemini", FLASH) == (chosen.kind, chosen.model)
    named = choose_provider("gemini", "gemini-2.5-pro")
    async with named.open() as provider:
        assert isinstance(provider, GeminiProvider)
        assert KEY not in repr(provider)
        assert KEY not in provider.quota_key


async def test_request_mapping_and_usage(clock: FakeClock) -> None:
    """System prompt, turns, max_tokens and temperature reach generateContent; the
    answer's text, finish reason and usage come back as a Response."""
    async with Simulator(clock=clock.time) as sim, provider_for(sim) as provider:
        request = Request(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"},
            ],
            model=FLASH,
            max_tokens=4,
            temperature=0.2,
            key="item-1",
        )
        response = await provider.complete(request)
    assert response.text.startswith(f"[{content_tag('second question')}]")
    assert ("MAX_TOKENS", FLASH, "item-1") == (
        response.finish_reason,
        response.model,
        response.key,
    )
    assert 4 == response.usage.output_tokens
    assert response.usage.input_tokens > 0
    assert {"requests": 1.0, "tokens": float(response.usage.input_tokens)} == {
        "requests": 1.0,
        **provider.settlement(request, response),
    }


async def test_a_typed_answer_is_json_for_the_schema(clock: FakeClock) -> None:
    """``response_model`` goes as response_mime_type + response_json_schema; the client
    validates the JSON into ``parsed``."""
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 60}, "pages": {"type": "integer"}},
        "required": ["title", "pages"],
    }
    async with (
        Simulator(clock=clock.time) as sim,
        LLMClient(provider_for(sim), model=FLASH) as client,
    ):
        response = await client.complete(
            Request.from_prompt("describe a book", response_model=schema)
        )
    assert {"title", "pages"} == set(response.parsed)
    assert response.parsed["title"].startswith(f"[{content_tag('describe a book')}]")


async def test_1000_items_through_llmbatch_map(clock: FakeClock) -> None:
    """1,000 items through ``llmbatch.map`` with GeminiProvider, paced from the model's
    profile (Gemini reports no limits): every item answered with its own answer, none
    lost, no 429, priced from the profile."""
    prompts = [f"document number {i:04d}" for i in range(1000)]
    async with (
        Simulator(rpm=2000, tpm=2_000_000, clock=clock.time) as sim,
        provider_for(sim) as provider,
    ):
        result = await llmbatch.map(
            "{item}", prompts, model=FLASH, provider=provider, max_tokens=32
        )
        stats = sim.stats()
    assert (1000, 0) == (len(result.ok), len(result.errors))
    assert [f"[{content_tag(p)}]" for p in prompts] == [r.text.split()[0] for r in result.ok]
    assert (1000, 0) == (stats.ok, stats.throttled)
    profile = BUILTIN_PROFILES[f"gemini/{FLASH}"]
    first = result.ok[0]
    assert first.cost == pytest.approx(profile.cost(first.usage))


async def test_429s_with_retry_delay_are_honoured(clock: FakeClock) -> None:
    """Limits that overestimate the key's (20 RPM paced, 10 enforced: a profile for
    another tier): the 429s' retryDelay pauses the quota, and all 30 items are answered
    within the retries, over the two minutes the real limit needs."""
    async with Simulator(rpm=10, clock=clock.time) as sim, provider_for(sim) as provider:
        started = clock.time()
        result = await llmbatch.map(
            "{item}",
            [f"item {i}" for i in range(30)],
            model=FLASH,
            provider=provider,
            limits=Limits(rpm=20, learn=True),
        )
        stats = sim.stats()
    assert (30, 0) == (len(result.ok), len(result.errors))
    assert stats.rate_limited["gemini"] >= 1
    assert 30 == stats.ok
    # 30 requests at 10 a minute, the first 10 at once: at least two more minutes
    assert clock.time() - started >= 120.0


async def test_a_key_of_unknown_limits_learns_them_from_the_429(clock: FakeClock) -> None:
    """A model with no profile, ``Limits.auto()``, a key enforcing 10 RPM: Gemini sends
    no limit headers, but its 429 names the limit (``quotaValue``); the limiter adopts it
    and paces there, so every item is answered after the first few 429s instead of
    running out of attempts."""
    async with Simulator(rpm=10, clock=clock.time) as sim, provider_for(sim) as provider:
        result = await llmbatch.map(
            "{item}",
            [f"unknown {i}" for i in range(40)],
            model="gemini-unprofiled",
            provider=provider,
            limits=Limits.auto(),
        )
        stats = sim.stats()
    assert (40, 0) == (len(result.ok), len(result.errors))
    assert 40 == stats.ok
    # the limit is learned from the first 429s: then paced, not probed
    assert stats.rate_limited["gemini"] <= 10, stats.rate_limited


async def test_one_429_waits_its_retry_delay(clock: FakeClock) -> None:
    """A scripted 429 with ``retryDelay: "7s"``: the item is answered on its second
    attempt, not before 7 virtual seconds."""
    async with (
        Simulator(script=[Fault(nth=1, status=429, retry_after=7)], clock=clock.time) as sim,
        LLMClient(provider_for(sim), model=FLASH) as client,
    ):
        started = clock.time()
        response = await client.complete(Request.from_prompt("hello"))
    assert 2 == response.attempts
    assert clock.time() - started >= 7.0


async def test_a_per_day_quota_stops_the_job(clock: FakeClock) -> None:
    """A key with 5 requests a day: the 6th request's per-day 429 is QuotaExhausted,
    which stops the job (keeping the 5 answers) with a message that says so."""
    async with Simulator(rpd=5, clock=clock.time) as sim, provider_for(sim) as provider:
        with pytest.raises(BatchFailed) as info:
            await llmbatch.map(
                "{item}",
                [f"item {i}" for i in range(40)],
                model=FLASH,
                provider=provider,
                max_concurrency=1,
            )
        stats = sim.stats()
    assert "fatal" == info.value.reason
    assert info.value.result is not None
    assert 5 == len(info.value.result.ok) == stats.ok
    quota_errors = [e for e in info.value.result.errors if e.error_type == "QuotaExhausted"]
    assert quota_errors
    assert "per-day quota" in quota_errors[0].message
    assert KEY not in quota_errors[0].message
    assert stats.requests <= 6 + 1


# -- the Batch API -------------------------------------------------------------------------


def timing(**options: Any) -> BatchSimConfig:
    """Pending 1 s, 1/64 s per request, finalizing 1 s (overridable)."""
    settings: dict[str, Any] = {
        "validating_seconds": 1.0,
        "seconds_per_request": 1 / 64,
        "finalizing_seconds": 1.0,
    }
    return BatchSimConfig(**(settings | options))


@pytest.fixture
def wall() -> FakeClock:
    """The simulator's batch clock, which the lifecycle's sleep advances."""
    return FakeClock(start=START)


def chat(n: int) -> list[tuple[str, Request]]:
    return [
        (f"doc-{i:04d}", Request.from_prompt(f"document {i:04d}", model=FLASH, max_tokens=16))
        for i in range(n)
    ]


def assert_own_answers(outcomes: Mapping[str, Any], n: int) -> None:
    """Item ``doc-NNNN`` holds the answer to ``document NNNN``."""
    expected = {f"doc-{i:04d}": content_tag(f"document {i:04d}") for i in range(n)}
    found = {}
    for key, outcome in outcomes.items():
        assert isinstance(outcome, Response), outcome
        tag = re.match(r"\[([0-9a-f]{8})\]", outcome.text)
        assert tag is not None
        found[key] = tag.group(1)
    assert expected == found


async def test_1000_items_through_the_batch_api(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """1,000 items through the Gemini Batch API (one inline job): every item answered
    with its own answer, joined on its key; usage reported."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    requests = chat(1000)
    async with provider_for(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), requests, poll_interval=POLL, sleep=wall.sleep
        )
    assert_own_answers(outcomes, 1000)
    stats = sim.stats().batch
    assert (1, 1000, 0) == (
        stats["gemini_batches_created"],
        stats["gemini_batch_requests_completed"],
        stats["gemini_batch_requests_failed"],
    )
    assert all(o.usage.input_tokens > 0 for o in outcomes.values() if isinstance(o, Response))


class Interrupt:
    """A ``sleep`` for the lifecycle that signals its first wait, then blocks until the
    task is cancelled: the process killed right after the job was submitted."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.waiting.set()
        await asyncio.Event().wait()


async def interrupted(job: Callable[[Interrupt], Awaitable[Any]]) -> None:
    interrupt = Interrupt()
    task = asyncio.ensure_future(job(interrupt))
    await interrupt.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_rerun_after_a_kill_resumes_polling_and_never_resubmits(
    simulator_factory: SimulatorFactory, wall: FakeClock, tmp_path: Any
) -> None:
    """Killed right after submitting 3 jobs, a new provider (a new SDK client) with the
    journal reopened from its file polls the recorded jobs: no new job, every item
    answered once, every job collected."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    requests = chat(50)
    async with provider_for(sim) as provider:
        backend = provider.batch()
        backend.limits = dataclasses.replace(backend.limits, max_requests=20)
        with Store(tmp_path / "job.sqlite") as store:
            await interrupted(
                lambda sleep: run_batch_api(
                    backend, requests, journal=store, poll_interval=POLL, sleep=sleep
                )
            )
    assert 3 == sim.stats().batch["gemini_batches_created"]

    ended: list[str] = []
    async with provider_for(sim) as fresh:
        with Store(tmp_path / "job.sqlite") as store:
            recorded = store.batches("submitted", provider="gemini")
            assert [20, 20, 10] == [len(b.items) for b in recorded]
            assert all(b.id.startswith("batches/") for b in recorded)
            outcomes = await run_batch_api(
                fresh.batch(),
                requests,
                journal=store,
                on_result=lambda key, _: ended.append(key),
                poll_interval=POLL,
                sleep=wall.sleep,
            )
            statuses = [b.status for b in store.batches()]
    assert ["collected"] * 3 == statuses
    stats = sim.stats().batch
    assert (3, 50) == (stats["gemini_batches_created"], stats["gemini_batch_requests_completed"])
    assert sorted(k for k, _ in requests) == sorted(ended)
    assert_own_answers(outcomes, 50)


async def test_a_failing_request_is_resubmitted_then_reported(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A request that always fails (500) is submitted again, alone, while its resubmits
    last, and ends as ProviderUnavailable; the others are answered once."""
    sim = await simulator_factory(batch=timing(fail_custom_ids={"doc-0003"}), batch_clock=wall.time)
    requests = chat(8)
    async with provider_for(sim) as provider:
        backend = provider.batch()
        backend.limits = dataclasses.replace(backend.limits, max_requests=4)
        outcomes = await run_batch_api(
            backend, requests, poll_interval=POLL, sleep=wall.sleep, resubmits=2
        )
    failed = outcomes.pop("doc-0003")
    assert isinstance(failed, ProviderUnavailable)
    assert KEY not in str(failed)
    assert 7 == sum(isinstance(o, Response) for o in outcomes.values())
    # doc-0003's job, then two resubmissions of it alone
    assert 4 == sim.stats().batch["gemini_batches_created"]


async def test_an_unknown_batch_is_fatal_and_names_no_key(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Polling a job the server does not know (another key's, or deleted) is NotFound."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    journal = MemoryJournal()
    journal.save_batch("batches/nope", provider="gemini", items={"doc-0000": "doc-0000"})
    async with provider_for(sim) as provider:
        with pytest.raises(NotFound) as info:
            await run_batch_api(
                provider.batch(), chat(1), journal=journal, poll_interval=POLL, sleep=wall.sleep
            )
    assert KEY not in str(info.value)
