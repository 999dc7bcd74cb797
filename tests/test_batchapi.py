"""llmbatch.batchapi against the simulator's Batch APIs, through the official clients.

Batches run on the wall clock with fast processing (milliseconds), and the lifecycle
polls every few milliseconds, so each test takes well under a second or two.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from llmbatch.batchapi import (
    BatchLimits,
    MemoryJournal,
    cancel_batches,
    custom_id_for,
    run_batch_api,
)
from llmbatch.client import LLMClient
from llmbatch.errors import BatchExpired, ProviderUnavailable
from llmbatch.failure import BatchFailed, ItemError
from llmbatch.models import Request, Response
from llmbatch.providers.anthropic import AnthropicProvider
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.store import Store
from llmbatch.testing._content import content_tag
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig

POLL = 0.01


def fast(**options: Any) -> BatchSimConfig:
    settings: dict[str, Any] = {
        "validating_seconds": 0.01,
        "seconds_per_request": 0.0001,
        "finalizing_seconds": 0.01,
    }
    return BatchSimConfig(**{**settings, **options})


def requests(n: int, model: str = "gpt-4o-mini") -> list[tuple[str, Request]]:
    return [
        (f"doc-{i:04d}", Request.from_prompt(f"document {i}", model=model, max_tokens=16))
        for i in range(n)
    ]


def assert_own_answer(outcome: Any, i: int) -> None:
    assert isinstance(outcome, Response), outcome
    assert outcome.text.startswith(f"[{content_tag(f'document {i}')}]")


@pytest.mark.parametrize(
    ("key", "kept"),
    [("doc-001", True), ("a_B-9", True), ("has space", False), ("x" * 65, False), ("é", False)],
)
def test_custom_ids_are_valid_and_stable(key: str, kept: bool) -> None:
    """A key both providers accept is its own custom_id; any other is hashed to one."""
    cid = custom_id_for(key)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid)
    assert (cid == key) is kept
    assert cid == custom_id_for(key)


async def test_duplicate_keys_are_refused() -> None:
    """Two items with one key cannot be joined back: a ValueError before any call."""
    with pytest.raises(ValueError, match="duplicate"):
        await run_batch_api(object(), [("a", requests(1)[0][1])] * 2)  # type: ignore[arg-type]


async def test_a_big_job_split_out_of_order_with_failures_and_expiry(
    simulator_factory: SimulatorFactory,
) -> None:
    """2,500 items, split by count and bytes into several files, answered out of order;
    a failing item ends as its error after resubmits; every item ends exactly once and
    no successful request ran twice."""
    sim = await simulator_factory(batch=fast(fail_custom_ids=frozenset({"doc-0007"})))
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        backend = provider.batch()
        backend.limits = BatchLimits(max_requests=600, max_bytes=150_000, one_model=True)
        got: list[str] = []
        outcomes = await run_batch_api(
            backend,
            requests(2500),
            poll_interval=POLL,
            resubmits=1,
            on_result=lambda key, _: got.append(key),
        )
    assert 2500 == len(outcomes) == len(got) == len(set(got))
    for i in range(2500):
        if i == 7:
            assert isinstance(outcomes["doc-0007"], ProviderUnavailable)
        else:
            assert_own_answer(outcomes[f"doc-{i:04d}"], i)
    stats = sim.stats().batch
    assert 2499 == stats["batch_requests_completed"]
    first_round = stats["openai_batches_created"] - 1  # the resubmission of doc-0007
    assert first_round > 2500 // 600  # the byte limit split them further than the count


async def test_expired_items_are_resubmitted_or_end_as_batch_expired(
    simulator_factory: SimulatorFactory,
) -> None:
    """A batch whose window closes part-way: its unrun items go into a new batch; with
    no resubmits left they end as BatchExpired, never dropped."""
    sim = await simulator_factory(
        batch=fast(seconds_per_request=0.002, completion_window_seconds=0.1)
    )
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        rescued = await run_batch_api(provider.batch(), requests(80), poll_interval=POLL)
        given_up = await run_batch_api(
            provider.batch(), requests(80), poll_interval=POLL, resubmits=0
        )
    assert all(isinstance(o, Response) for o in rescued.values())
    expired = [k for k, o in given_up.items() if isinstance(o, BatchExpired)]
    assert expired
    assert 80 == len(given_up)
    assert all(isinstance(o, Response) for k, o in given_up.items() if k not in expired)


async def test_one_model_per_openai_file(simulator_factory: SimulatorFactory) -> None:
    """Requests for two models go into separate batches."""
    sim = await simulator_factory(batch=fast())
    mixed = requests(5) + [
        (f"o-{i}", Request.from_prompt(f"other {i}", model="gpt-4o", max_tokens=8))
        for i in range(5)
    ]
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        outcomes = await run_batch_api(provider.batch(), mixed, poll_interval=POLL)
    assert 10 == sum(isinstance(o, Response) for o in outcomes.values())
    assert {"gpt-4o", "gpt-4o-mini"} == {o.model for o in outcomes.values()}
    assert 2 == sim.stats().batch["openai_batches_created"]


async def test_a_rerun_with_the_journal_resumes_polling(
    simulator_factory: SimulatorFactory, tmp_path: Any
) -> None:
    """Interrupted after submitting, the same call with the same journal polls the
    recorded batches: no new batch, every item answered."""
    sim = await simulator_factory(batch=fast(validating_seconds=0.3))
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        with Store(tmp_path / "job.sqlite") as store:
            job = asyncio.create_task(
                run_batch_api(provider.batch(), requests(50), journal=store, poll_interval=POLL)
            )
            while not store.batches("submitted"):  # noqa: ASYNC110 - the journal is a file
                await asyncio.sleep(0.005)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job
            outcomes = await run_batch_api(
                provider.batch(), requests(50), journal=store, poll_interval=POLL
            )
            assert ["collected"] == [b.status for b in store.batches()]
    assert 1 == sim.stats().batch["openai_batches_created"]
    for i in range(50):
        assert_own_answer(outcomes[f"doc-{i:04d}"], i)


async def test_cancel_batches(simulator_factory: SimulatorFactory) -> None:
    """``cancel_batches`` cancels what the journal holds and marks it cancelled."""
    sim = await simulator_factory(batch=fast(validating_seconds=30))
    journal = MemoryJournal()
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        job = asyncio.create_task(
            run_batch_api(provider.batch(), requests(3), journal=journal, poll_interval=POLL)
        )
        while not journal.batches("submitted"):  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.005)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        cancelled = await cancel_batches(provider.batch(), journal)
    assert [b.id for b in journal.batches("cancelled")] == cancelled
    assert 1 == sim.stats().batch["batches_cancel_requested"]


async def test_enqueued_token_limit_rejections_are_retried_later(
    simulator_factory: SimulatorFactory,
) -> None:
    """Batches rejected for the enqueued-token limit wait for the earlier ones to finish
    and are submitted again; every item ends answered."""
    sim = await simulator_factory(batch=fast(enqueued_token_limit=150))
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        backend = provider.batch()
        backend.limits = BatchLimits(max_requests=15, max_bytes=10**8, one_model=True)
        outcomes = await run_batch_api(backend, requests(45), poll_interval=POLL, resubmits=0)
    assert all(isinstance(o, Response) for o in outcomes.values())
    assert sim.stats().batch["batches_token_limited"] >= 1


async def test_anthropic_message_batches(simulator_factory: SimulatorFactory) -> None:
    """The same lifecycle through Anthropic's official client: answers, and an errored
    item as its classified error."""
    sim = await simulator_factory(batch=fast(fail_custom_ids=frozenset({"doc-0002"})))
    async with AnthropicProvider(base_url=sim.url, api_key="sk-ant-test-key") as provider:
        outcomes = await run_batch_api(
            provider.batch(), requests(6, "claude-haiku-4-5"), poll_interval=POLL, resubmits=0
        )
    assert isinstance(outcomes["doc-0002"], Exception)
    for i in (0, 1, 3, 4, 5):
        assert_own_answer(outcomes[f"doc-{i:04d}"], i)
    assert 1 == sim.stats().batch["anthropic_batches_created"]


async def test_client_map_in_batch_mode(simulator_factory: SimulatorFactory) -> None:
    """``LLMClient.map(mode="batch")``: input order, half the online price, ItemErrors
    for failed items; fail-fast raises BatchFailed carrying everything."""
    sim = await simulator_factory(batch=fast(fail_custom_ids=frozenset({"doc-0001"})))
    keyed = [
        Request.from_prompt(f"document {i}", model="gpt-4o-mini", max_tokens=16, key=f"doc-{i:04d}")
        for i in range(4)
    ]
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        client = LLMClient(provider, model="gpt-4o-mini")
        client.batch_poll_interval = POLL
        online = await client.map(keyed[:1])
        result = await client.map(keyed, mode="batch", on_error="collect")
        with pytest.raises(BatchFailed):
            await client.map(keyed, mode="batch", on_error="fail_fast")
    assert isinstance(result.results[1], ItemError)
    assert_own_answer(result.results[0], 0)
    assert_own_answer(result.results[3], 3)
    first = result.results[0]
    assert isinstance(first, Response)
    assert online.ok[0].cost is not None
    assert first.cost == pytest.approx(online.ok[0].cost / 2)


async def test_a_batch_too_big_for_the_enqueued_token_limit_fails_clearly(
    simulator_factory: SimulatorFactory,
) -> None:
    """A batch rejected for the enqueued-token limit with nothing else queued can never
    fit: its items end as BadRequest saying so, instead of waiting forever."""
    sim = await simulator_factory(batch=fast(enqueued_token_limit=20))
    async with OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider:
        outcomes = await run_batch_api(provider.batch(), requests(10), poll_interval=POLL)
    assert all("enqueued-token limit" in str(o) for o in outcomes.values())
