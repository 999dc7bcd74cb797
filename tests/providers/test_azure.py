"""Azure OpenAI through ``openai.AsyncAzureOpenAI`` against the simulator's Azure routes.

Online runs share one FakeClock between the simulator's buckets and the event loop
(``patch_loop``): minutes of paced traffic take a fraction of a second. Batch runs step
the simulator's batch clock with the lifecycle's ``sleep``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmbatch.batchapi import run_batch_api
from llmbatch.client import LLMClient
from llmbatch.config import BUILTIN_PROFILES, load_profiles
from llmbatch.errors import QuotaExhausted, RateLimited
from llmbatch.models import Request, Response, Usage
from llmbatch.providers.azure import AzureOpenAIProvider, DeploymentQuota
from llmbatch.store import Store
from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._faults import Fault
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig
from tests.helpers.interrupt import interrupted

API_VERSION = "2024-10-21"
KEY = "0123456789abcdef0123456789abcdef"
#: a deployment named after its model: the built-in profile azure/gpt-4o-mini applies
DEPLOYMENT = "gpt-4o-mini"
START = 1_700_000_000.0


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=5000.0)
    with fake.patch_loop():
        yield fake


def azure(sim: Simulator, **options: Any) -> AzureOpenAIProvider:
    return AzureOpenAIProvider(
        azure_endpoint=sim.url, api_key=KEY, api_version=API_VERSION, **options
    )


def prompts(n: int, *, model: str = DEPLOYMENT) -> list[Request]:
    return [Request.from_prompt(f"document {i:04d}", model=model) for i in range(n)]


async def test_an_online_job_adopts_the_deployments_limits_from_its_headers(
    clock: FakeClock,
) -> None:
    """300 requests to a 20,000 TPM deployment (120 RPM, 20 per 10 s): the profile's
    50,000 TPM / 300 RPM give way to the limits Azure's remaining headers imply, every
    item is answered, none refused, in the least time the deployment allows."""
    profile = BUILTIN_PROFILES[f"azure/{DEPLOYMENT}"]
    assert (300, 50_000) == (profile.limits.rpm, profile.limits.tpm)
    async with (
        Simulator(tpm=20_000, clock=clock.time) as sim,
        azure(sim) as provider,
    ):
        client = LLMClient(provider, model=DEPLOYMENT, max_tokens=16)
        started = clock.time()
        result = await client.map(prompts(300))
        elapsed = clock.time() - started
        limiter = client.limiter_for(DEPLOYMENT).statistics()
        await client.release()
        stats = sim.stats()
    assert (300, 0) == (len(result.ok), len(result.errors))
    assert {"rpm": 120.0, "tpm": 20_000.0} == limiter.limits
    assert 20_000 == provider.quota.tpm(DEPLOYMENT)
    assert ({}, 300) == (dict(stats.rate_limited), stats.responses[200])
    # the first 20 go at once (the 10-second window is full), then 2 per second
    assert 140 <= elapsed <= 140 * 1.05


async def test_a_429_waits_what_retry_after_ms_says(clock: FakeClock) -> None:
    """Azure's 429 (``code: "429"``, ``retry-after-ms: 7500``, ``retry-after: 8``) is
    RateLimited with 7.5 s to wait, and the client's retry goes 7.5 s later, not 8."""
    script = [Fault(status=429, retry_after=7.5, nth=n) for n in (1, 2, 3)]
    async with Simulator(script=script, clock=clock.time) as sim, azure(sim) as provider:
        raw = openai.AsyncAzureOpenAI(
            azure_endpoint=sim.url, api_key=KEY, api_version=API_VERSION, max_retries=0
        )
        try:
            with pytest.raises(openai.RateLimitError) as refused:
                await raw.chat.completions.create(
                    model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}]
                )
        finally:
            await raw.close()
        with pytest.raises(RateLimited) as classified:
            await provider.complete(Request.from_prompt("second", model=DEPLOYMENT))
        client = LLMClient(provider, model=DEPLOYMENT, max_tokens=8)
        started = clock.time()
        answer = await client.complete(Request.from_prompt("third"))  # 429, then answered
        waited = clock.time() - started
        await client.release()
        stats = sim.stats()
    body = refused.value.body
    assert isinstance(body, dict)
    headers = refused.value.response.headers
    assert ("429", "7500", "8") == (
        body.get("code"),
        headers["retry-after-ms"],
        headers["retry-after"],
    )
    assert "Please retry after 8 seconds" in str(body.get("message"))
    assert (429, 7.5) == (classified.value.status_code, classified.value.retry_after)
    assert isinstance(answer, Response)
    assert 7.5 <= waited < 8.0
    assert (3, 1) == (sum(stats.rate_limited.values()), stats.responses[200])


async def test_a_spent_daily_quota_stops_the_job(clock: FakeClock) -> None:
    """A 429 asking to retry after 86,400 seconds is a spent quota, not a pause."""
    async with Simulator(insufficient_quota=True, clock=clock.time) as sim, azure(sim) as p:
        with pytest.raises(QuotaExhausted) as stopped:
            await p.complete(Request.from_prompt("hi", model=DEPLOYMENT))
    assert "86,400 s" in str(stopped.value)
    assert KEY not in str(stopped.value)


async def test_a_deployment_named_otherwise_is_priced_as_its_base_model(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``base_model`` makes a deployment ``summarizer`` cost what gpt-4o-mini costs."""
    monkeypatch.setenv(
        "LLMBATCH_PROFILES", json.dumps({"azure/summarizer": {"base_model": "gpt-4o-mini"}})
    )
    profile = load_profiles()["azure/summarizer"]
    assert ("gpt-4o-mini", 0.15, 0.60, 128_000) == (
        profile.base_model,
        profile.input_price,
        profile.output_price,
        profile.context_window,
    )
    async with Simulator(clock=clock.time) as sim, azure(sim) as provider:
        client = LLMClient(provider, model="summarizer", max_tokens=16)
        answer = await client.complete(Request.from_prompt("a short document"))
        await client.release()
    usage = answer.usage
    assert "summarizer" == answer.model
    assert usage.input_tokens > 0
    expected = (usage.input_tokens * 0.15 + usage.output_tokens * 0.60) / 1_000_000
    assert answer.cost == pytest.approx(expected)


def test_the_quota_bound_never_exceeds_a_whole_thousand() -> None:
    """Bounds round up to Azure's 1,000-TPM units and only grow; a server that sends its
    limits is believed."""
    quota = DeploymentQuota()
    first = quota.observe("d", {"x-ratelimit-remaining-tokens": "18970"}, 30)
    later = quota.observe("d", {"x-ratelimit-remaining-tokens": "5000"}, 30)
    told = quota.observe("d", {"x-ratelimit-limit-tokens": "90000"}, 30)
    assert ("19000", "114") == (
        first["x-ratelimit-limit-tokens"],
        first["x-ratelimit-limit-requests"],
    )
    assert "19000" == later["x-ratelimit-limit-tokens"]
    assert {"x-ratelimit-limit-tokens": "90000"} == told
    assert {} == quota.observe("e", {}, 30)


# -- Global Batch --------------------------------------------------------------------------


async def test_a_batch_job_resumes_polling_after_a_crash_and_creates_one_batch(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """Azure Global Batch: lines name the deployment and ``/chat/completions``; killed
    after submitting, a rerun with the journal polls the same batch: one batch created,
    every item answered, priced at the Azure profile's batch discount."""
    wall = FakeClock(start=START)
    sim = await simulator_factory(
        batch=BatchSimConfig(validating_seconds=1.0, seconds_per_request=0.125),
        batch_clock=wall.time,
    )
    requests = [
        (f"doc-{i:03d}", Request.from_prompt(f"document {i}", model=DEPLOYMENT, max_tokens=16))
        for i in range(40)
    ]
    async with azure(sim) as provider:
        backend = provider.batch()
        assert ("azure", "/chat/completions") == (
            backend.name,
            backend.line("x", requests[0][1])["url"],
        )
        with Store(tmp_path / "job.sqlite") as store:
            await interrupted(
                lambda sleep: run_batch_api(
                    backend, requests, journal=store, poll_interval=60.0, sleep=sleep
                )
            )
        assert 1 == sim.stats().batch["openai_batches_created"]
        with Store(tmp_path / "job.sqlite") as store:
            outcomes = await run_batch_api(
                provider.batch(), requests, journal=store, poll_interval=60.0, sleep=wall.sleep
            )
            statuses = [b.status for b in store.batches(provider="azure")]
        raw = openai.AsyncAzureOpenAI(
            azure_endpoint=sim.url, api_key=KEY, api_version=API_VERSION, max_retries=0
        )
        try:
            batches = [b async for b in raw.batches.list()]
            content = (await raw.files.content(batches[0].input_file_id)).text
        finally:
            await raw.close()
    stats = sim.stats().batch
    assert (1, 40) == (stats["openai_batches_created"], stats["batch_requests_completed"])
    assert ["collected"] == statuses
    assert 40 == sum(isinstance(o, Response) for o in outcomes.values())
    lines = [json.loads(t) for t in content.splitlines()]
    assert {("/chat/completions", DEPLOYMENT)} == {(x["url"], x["body"]["model"]) for x in lines}
    profile = BUILTIN_PROFILES[f"azure/{DEPLOYMENT}"]
    usage = Usage(input_tokens=1000, output_tokens=1000)
    assert profile.cost(usage, batch=True) == pytest.approx(0.5 * (profile.cost(usage) or 0))


async def test_the_cli_choice_reads_azure_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--provider azure`` takes the endpoint, key and API version the official client
    reads; a missing one is named (the key's value never is)."""
    from llmbatch.providers import choose_provider

    for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"):
        monkeypatch.delenv(name, raising=False)
    choice = choose_provider("azure", "summarizer")
    assert ("azure", "azure", "summarizer") == (choice.kind, choice.name, choice.model)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    with pytest.raises(ValueError, match="AZURE_OPENAI_ENDPOINT, OPENAI_API_VERSION") as missing:
        choice.open()
    assert KEY not in str(missing.value)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OPENAI_API_VERSION", API_VERSION)
    async with choice.open() as provider:
        assert isinstance(provider, AzureOpenAIProvider)
        assert ("azure", "http://127.0.0.1:9/openai/") == (provider.name, provider.endpoint)
