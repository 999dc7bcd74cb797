"""Gemini: error translation (a table, then the real SDK's errors over HTTP), the provider
through ``llmbatch.map`` against the simulator, and its Batch API through the shared
lifecycle (journal, resume after a kill), inline and with JSONL files, up to
``llmbatch run`` killed with SIGKILL — all with the official ``google-genai`` SDK.

Time is injected, never slept: online tests run the loop on a ``FakeClock``
(``patch_loop``), batch tests move the simulator's batch clock with the lifecycle's
``sleep``. The CLI test's child process polls on its own clock; the batch clock it
reads stands still until the test moves it, so no job ends before the test says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx2
import pytest

pytest.importorskip("google.genai", reason="needs the gemini extra (google-genai)")

from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

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
from tests.helpers.interrupt import interrupted

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
    """1,000 items through the Gemini Batch API (one inline job, no file: the inline
    limit): every item answered with its own answer, joined on its key; usage reported."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    requests = chat(1000)
    async with provider_for(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), requests, poll_interval=POLL, sleep=wall.sleep
        )
    assert_own_answers(outcomes, 1000)
    stats = sim.stats().batch
    assert (1, 1000, 0, 0) == (
        stats["gemini_batches_created"],
        stats["gemini_batch_requests_completed"],
        stats["gemini_batch_requests_failed"],
        stats["gemini_files_uploaded"],
    )
    assert all(o.usage.input_tokens > 0 for o in outcomes.values() if isinstance(o, Response))


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


# -- the Batch API with JSONL files --------------------------------------------------------


async def test_1500_items_through_a_jsonl_file(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """1,500 items (above the inline limit) go as one uploaded JSONL file; the result
    file, downloaded, answers every item with its own answer, joined on its key (the
    simulator shuffles the lines)."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    requests = chat(1500)
    async with provider_for(sim) as provider:
        backend = provider.batch()
        assert 2048 * 1024 * 1024 * 0.98 == pytest.approx(backend.limits.max_bytes)
        outcomes = await run_batch_api(backend, requests, poll_interval=POLL, sleep=wall.sleep)
    assert_own_answers(outcomes, 1500)
    stats = sim.stats().batch
    assert {
        "gemini_files_uploaded": 1,
        "gemini_batches_created": 1,
        "gemini_file_batches_created": 1,
        "gemini_files_downloaded": 1,
        "gemini_batch_requests_completed": 1500,
        "gemini_batch_requests_failed": 0,
    } == {name: stats[name] for name in FILE_COUNTERS}
    assert stats["gemini_file_bytes_uploaded"] > 1500 * 50
    assert all(o.usage.input_tokens > 0 for o in outcomes.values() if isinstance(o, Response))


FILE_COUNTERS = (
    "gemini_files_uploaded",
    "gemini_batches_created",
    "gemini_file_batches_created",
    "gemini_files_downloaded",
    "gemini_batch_requests_completed",
    "gemini_batch_requests_failed",
)


async def test_a_file_line_carries_the_generation_config(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A file line is the REST request: the system instruction, ``maxOutputTokens`` and
    a JSON schema reach the server as it reads them (the answer stops at 4 tokens; a
    typed answer is JSON for its schema)."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "pages": {"type": "integer"}},
        "required": ["title", "pages"],
    }
    requests = [
        (
            "short",
            Request(
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "a short answer please"},
                ],
                model=FLASH,
                max_tokens=4,
                temperature=0.3,
            ),
        ),
        ("typed", Request.from_prompt("describe a book", model=FLASH, response_model=schema)),
    ]
    async with provider_for(sim) as provider:
        backend = provider.batch()
        backend.inline_max_requests = 0  # every job as a file
        outcomes = await run_batch_api(backend, requests, poll_interval=POLL, sleep=wall.sleep)
    short, typed = outcomes["short"], outcomes["typed"]
    assert isinstance(short, Response)
    assert isinstance(typed, Response)
    assert ("MAX_TOKENS", 4) == (short.finish_reason, short.usage.output_tokens)
    assert short.text.startswith(f"[{content_tag('a short answer please')}]")
    answer = json.loads(typed.text)
    assert {"title", "pages"} == set(answer)
    assert 1 == sim.stats().batch["gemini_files_uploaded"]


async def test_failed_lines_of_the_result_file_become_their_items_errors(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A request the server rejects (its prompt exceeds the context window: a 400 line)
    and one that fails (a 500 line, no resubmit left) end as their own errors; the
    others of the file are answered."""
    sim = await simulator_factory(
        batch=timing(fail_custom_ids={"doc-0002"}), batch_clock=wall.time, context_window=200
    )
    requests = chat(6)
    requests[4] = ("doc-0004", Request.from_prompt("word " * 400, model=FLASH, max_tokens=16))
    async with provider_for(sim) as provider:
        backend = provider.batch()
        backend.inline_max_requests = 0
        outcomes = await run_batch_api(
            backend, requests, poll_interval=POLL, sleep=wall.sleep, resubmits=0
        )
    too_long, failed = outcomes.pop("doc-0004"), outcomes.pop("doc-0002")
    assert isinstance(too_long, ContextLengthExceeded), too_long
    assert isinstance(failed, ProviderUnavailable), failed
    assert KEY not in str(failed)
    assert [f"doc-{i:04d}" for i in (0, 1, 3, 5)] == sorted(outcomes)
    assert all(isinstance(o, Response) for o in outcomes.values())
    stats = sim.stats().batch
    assert (1, 1, 2) == (
        stats["gemini_file_batches_created"],
        stats["gemini_files_downloaded"],
        stats["gemini_batch_requests_failed"],
    )


async def test_a_file_job_resumes_after_a_kill_without_uploading_again(
    simulator_factory: SimulatorFactory, wall: FakeClock, tmp_path: Any
) -> None:
    """Killed right after its file job was created, a rerun with a new provider and the
    journal reopened from its file polls that job and downloads its result file: one
    upload, one job, every item answered once."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    requests = chat(1200)
    async with provider_for(sim) as provider:
        with Store(tmp_path / "job.sqlite") as store:
            await interrupted(
                lambda sleep: run_batch_api(
                    provider.batch(), requests, journal=store, poll_interval=POLL, sleep=sleep
                )
            )
    assert (1, 1) == (
        sim.stats().batch["gemini_files_uploaded"],
        sim.stats().batch["gemini_file_batches_created"],
    )

    ended: list[str] = []
    async with provider_for(sim) as fresh:
        with Store(tmp_path / "job.sqlite") as store:
            (recorded,) = store.batches("submitted", provider="gemini")
            assert 1200 == len(recorded.items)
            outcomes = await run_batch_api(
                fresh.batch(),
                requests,
                journal=store,
                on_result=lambda key, _: ended.append(key),
                poll_interval=POLL,
                sleep=wall.sleep,
            )
            statuses = [b.status for b in store.batches()]
    assert ["collected"] == statuses
    stats = sim.stats().batch
    assert (1, 1, 1, 1200) == (
        stats["gemini_files_uploaded"],
        stats["gemini_batches_created"],
        stats["gemini_files_downloaded"],
        stats["gemini_batch_requests_completed"],
    )
    assert sorted(k for k, _ in requests) == sorted(ended)
    assert_own_answers(outcomes, 1200)


async def test_the_simulator_speaks_the_sdks_resumable_upload(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """The SDK's own ``files.upload`` of a 9 MB file (two chunks: upload, then upload
    and finalize) arrives whole; its metadata says so; an uploaded file cannot be
    downloaded, and a deleted one is gone (404)."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    content = b"".join(b'{"key":"k%07d","pad":"%s"}\n' % (i, b"x" * 80) for i in range(90_000))
    assert len(content) > 8 * 1024 * 1024
    http = httpx2.AsyncClient()  # as GeminiProvider does: not the SDK's aiohttp session
    client = genai.Client(
        api_key=KEY,
        http_options=genai_types.HttpOptions(
            base_url=sim.url,
            api_version="v1beta",
            retry_options=genai_types.HttpRetryOptions(attempts=1),
            httpx_async_client=http,
        ),
    )
    try:
        uploaded = await client.aio.files.upload(
            file=io.BytesIO(content), config={"mime_type": "application/jsonl"}
        )
        assert uploaded.name is not None
        found = await client.aio.files.get(name=uploaded.name)
        assert (len(content), "ACTIVE", "UPLOADED") == (
            found.size_bytes,
            found.state.value if found.state else None,
            found.source.value if found.source else None,
        )
        with pytest.raises(genai_errors.ClientError) as refused:
            await client.aio.files.download(file=uploaded.name)
        assert 400 == refused.value.code
        await client.aio.files.delete(name=uploaded.name)
        with pytest.raises(genai_errors.ClientError) as gone:
            await client.aio.files.get(name=uploaded.name)
        assert 404 == gone.value.code
    finally:
        await client.aio.aclose()
        await http.aclose()
    stats = sim.stats().batch
    assert (1, len(content)) == (
        stats["gemini_files_uploaded"],
        stats["gemini_file_bytes_uploaded"],
    )


async def test_a_refused_upload_is_fatal_and_creates_no_job(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A key the server refuses fails at the upload's start: AuthenticationFailed (which
    stops the job), naming only the key's last four characters; no file, no job."""
    sim = await simulator_factory(
        batch=timing(), batch_clock=wall.time, api_keys=["AIzaSy-another-key-0000"]
    )
    async with provider_for(sim) as provider:
        backend = provider.batch()
        backend.inline_max_requests = 0
        with pytest.raises(AuthenticationFailed) as info:
            await run_batch_api(backend, chat(3), poll_interval=POLL, sleep=wall.sleep)
    assert "[key …7f3a]" in str(info.value)
    assert KEY not in str(info.value)
    stats = sim.stats().batch
    assert (0, 0) == (stats["gemini_files_uploaded"], stats["gemini_batches_created"])


# -- the CLI killed with SIGKILL -------------------------------------------------------------


def gemini_env(sim: Simulator) -> dict[str, str]:
    """The environment of a ``llmbatch run --provider gemini`` child pointed at *sim*
    through the SDK's own ``GOOGLE_GEMINI_BASE_URL``, with no other provider's key."""
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_KEYS"))}
    env.pop("LLMBATCH_TEST_KILL_AT", None)
    env.update(GEMINI_API_KEY=KEY, GOOGLE_GEMINI_BASE_URL=sim.url, COLUMNS="200")
    return env


def journaled(store: Path) -> int:
    """Batches the child's checkpoint store holds (0 before it exists)."""
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


async def test_cli_killed_after_its_file_job_was_created_resumes_polling(
    simulator_factory: SimulatorFactory, wall: FakeClock, tmp_path: Path
) -> None:
    """``llmbatch run --provider gemini --mode batch`` with 1,100 records (one JSONL file
    job) is SIGKILLed once its job is journaled (the job cannot end before: the batch
    clock stands still); the same command then polls that job and downloads its result
    file: one upload, one job, every record answered in order."""
    sim = await simulator_factory(batch=timing(), batch_clock=wall.time)
    records = [{"id": f"doc-{i:04d}", "text": f"document {i:04d}"} for i in range(1100)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    args = [
        *("-m", "llmbatch", "run", source, "-o", out, "--provider", "gemini"),
        *("--model", FLASH, "--prompt", "{text}", "--id-field", "id"),
        *("--mode", "batch", "--poll-interval", "0.05", "--max-tokens", "16"),
    ]
    env = gemini_env(sim)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *map(str, args),
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    store = Path(f"{out}.llmbatch.sqlite")
    while journaled(store) < 1 and child.returncode is None:  # noqa: ASYNC110 - another process's state
        await asyncio.sleep(0.02)
    assert child.returncode is None, await child.communicate()
    child.send_signal(signal.SIGKILL)
    assert -signal.SIGKILL == await child.wait()
    assert not out.exists() or not out.read_text().strip()
    batch = sim.stats().batch
    assert (1, 1, 0) == (
        batch["gemini_files_uploaded"],
        batch["gemini_file_batches_created"],
        batch["gemini_files_downloaded"],
    )

    wall.advance(3600.0)  # the job runs to its end while nobody watches
    rerun = await asyncio.create_subprocess_exec(
        sys.executable,
        *map(str, args),
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(rerun.communicate(), 120)
    assert 0 == rerun.returncode, err.decode()[-2000:]
    assert "batch.resumed" in err.decode()
    batch = sim.stats().batch
    assert (1, 1, 1, 1100) == (
        batch["gemini_files_uploaded"],
        batch["gemini_batches_created"],
        batch["gemini_files_downloaded"],
        batch["gemini_batch_requests_completed"],
    )
    assert 0 == sim.stats().requests  # nothing went online
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [line["key"] for line in lines]
    for line, record in zip(lines, records, strict=True):
        assert "ok" == line["status"], line
        assert line["answer"].startswith(f"[{content_tag(record['text'])}]"), line
    assert KEY not in err.decode()
