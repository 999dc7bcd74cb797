"""llmbatch.batchapi against the simulator's Batch APIs, through the official clients.

Time is injected, never slept: the simulator's batches run on a ``FakeClock`` passed as
``batch_clock=``, and the lifecycle waits with ``sleep=wall.sleep``, which advances that
same clock. A test that polls every 60 s for hours of batch time finishes in well under
a second. Schedules use binary-exact durations (1/8 s, 1/64 s per request) so that how
many requests run before a completion window closes is exact.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import openai
import pytest

import llmbatch
from llmbatch.batchapi import (
    BatchBackend,
    BatchLimits,
    BatchStatus,
    MemoryJournal,
    batch_backend,
    cancel_batches,
    custom_id_for,
    run_batch_api,
)
from llmbatch.client import LLMClient
from llmbatch.errors import (
    BadRequest,
    BatchExpired,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
)
from llmbatch.failure import BatchFailed, ItemError
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response
from llmbatch.providers.anthropic import AnthropicBatchBackend, AnthropicProvider
from llmbatch.providers.openai import OpenAIBatchBackend, OpenAIProvider
from llmbatch.store import Store
from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig
from tests.helpers.interrupt import Interrupt, interrupted

START = 1_700_000_000.0
MINI = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
#: every batch used here ends well within one poll
POLL = 60.0

Outcome = Response | Embedding | LLMBatchError
Provider = OpenAIProvider | AnthropicProvider


def timing(**options: Any) -> BatchSimConfig:
    """Validating 1 s, 1/8 s per request, finalizing 1 s (overridable)."""
    settings: dict[str, Any] = {
        "validating_seconds": 1.0,
        "seconds_per_request": 0.125,
        "finalizing_seconds": 1.0,
    }
    return BatchSimConfig(**(settings | options))


def prompt(i: int) -> str:
    """Item *i*'s prompt; fixed width, so every batch line has the same size."""
    return f"document {i:04d}"


def chat(n: int, model: str = MINI, *, start: int = 0) -> list[tuple[str, Request]]:
    """``(key, Request)`` pairs ``doc-0000``... for ``document 0000``..."""
    return [
        (f"doc-{i:04d}", Request.from_prompt(prompt(i), model=model, max_tokens=16))
        for i in range(start, start + n)
    ]


def tag_of(outcome: Outcome) -> str:
    """The content tag an answer starts with (whose prompt it answers)."""
    assert isinstance(outcome, Response), outcome
    found = re.match(r"\[([0-9a-f]{8})\]", outcome.text)
    assert found is not None, outcome.text
    return found.group(1)


def assert_own_answers(outcomes: Mapping[str, Outcome], keys: Sequence[str]) -> None:
    """Each of *keys* (``doc-NNNN``) holds the answer to its own prompt."""
    expected = {key: content_tag(prompt(int(key[4:]))) for key in keys}
    assert expected == {key: tag_of(outcomes[key]) for key in keys}


def kinds(outcomes: Mapping[str, Outcome]) -> dict[str, int]:
    """How many outcomes of each class."""
    counted: dict[str, int] = {}
    for outcome in outcomes.values():
        name = type(outcome).__name__
        counted[name] = counted.get(name, 0) + 1
    return counted


def line_size(backend: BatchBackend, key: str, request: Request) -> int:
    """The bytes one request takes in an input file (with its newline)."""
    return len(json.dumps(backend.line(custom_id_for(key), request)).encode()) + 1


async def input_files(sim: Simulator) -> list[tuple[int, list[dict[str, Any]]]]:
    """``(bytes, lines)`` of every uploaded batch input file, oldest first."""
    found: list[tuple[int, list[dict[str, Any]]]] = []
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as raw:
        async for uploaded in raw.files.list(purpose="batch", order="asc"):
            content = (await raw.files.content(uploaded.id)).text
            found.append((uploaded.bytes, [json.loads(t) for t in content.splitlines()]))
    return found


async def openai_statuses(sim: Simulator, batch_ids: Sequence[str]) -> list[str]:
    """The simulator's status of each OpenAI batch."""
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as raw:
        return [(await raw.batches.retrieve(b)).status for b in batch_ids]


@pytest.fixture
def wall() -> FakeClock:
    """The simulator's batch clock, which the lifecycle's sleep advances."""
    return FakeClock(start=START)


async def batch_sim(factory: SimulatorFactory, wall: FakeClock, **options: Any) -> Simulator:
    """A simulator whose batches follow ``timing(**options)`` on *wall*."""
    return await factory(batch=timing(**options), batch_clock=wall.time)


def openai_provider(sim: Simulator) -> OpenAIProvider:
    return OpenAIProvider(base_url=sim.base_url, api_key="sk-test")


def anthropic_provider(sim: Simulator) -> AnthropicProvider:
    return AnthropicProvider(base_url=sim.url, api_key="sk-ant-test-key")


PROVIDERS = [
    pytest.param(openai_provider, MINI, id="openai"),
    pytest.param(anthropic_provider, CLAUDE, id="anthropic"),
]


# -- custom ids --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["doc-0001", "a", "A_b-9", "x" * 64, "0", "-_-"])
def test_a_valid_key_is_its_own_custom_id(key: str) -> None:
    """1-64 characters of ``[A-Za-z0-9_-]`` are kept as they are."""
    assert key == custom_id_for(key)


@pytest.mark.parametrize(
    "key",
    ["has space", "x" * 65, "caf\u00e9", "", "a/b", "doc.1", "line\nbreak", "doc-1 ", "\u4e2d"],
)
def test_any_other_key_is_hashed_to_a_valid_stable_id(key: str) -> None:
    """Keys a provider would refuse become a hash: valid for both providers, at most 64
    characters, the same every time (a resubmission or a rerun finds its items)."""
    cid = custom_id_for(key)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid) is not None
    assert key != cid
    assert cid == custom_id_for(key)


def test_distinct_keys_get_distinct_custom_ids() -> None:
    """Neither kept nor hashed ids collide among a realistic set of keys."""
    keys = [f"row {i}" for i in range(1000)] + [f"row-{i}" for i in range(1000)]
    assert len(keys) == len({custom_id_for(k) for k in keys})


@pytest.mark.parametrize("keys", [["a", "b", "a"], ["same key", "same key"]])
async def test_duplicate_keys_are_refused_before_any_call(
    simulator_factory: SimulatorFactory, wall: FakeClock, keys: list[str]
) -> None:
    """Two items with one key could not be joined back: ValueError, nothing uploaded."""
    sim = await batch_sim(simulator_factory, wall)
    request = Request.from_prompt("x", model=MINI)
    async with openai_provider(sim) as provider:
        with pytest.raises(ValueError, match="duplicate item key"):
            await run_batch_api(provider.batch(), [(k, request) for k in keys], sleep=wall.sleep)
    assert (0, 0) == (sim.stats().batch["files_uploaded"], sim.stats().batches_created)


@pytest.mark.parametrize(("make", "model"), PROVIDERS)
async def test_awkward_keys_round_trip_through_hashed_custom_ids(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    make: Callable[[Simulator], Provider],
    model: str,
) -> None:
    """Keys with spaces, slashes, accents or 100 characters reach the provider as valid
    custom ids and come back joined to their own keys."""
    sim = await batch_sim(simulator_factory, wall)
    keys = ["row 1", "a/b", "caf\u00e9", "k" * 100, "plain-key"]
    texts = {key: f"text of {key}" for key in keys}
    requests = [(k, Request.from_prompt(texts[k], model=model, max_tokens=8)) for k in keys]
    async with make(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), requests, poll_interval=POLL, sleep=wall.sleep
        )
    assert {k: content_tag(texts[k]) for k in keys} == {k: tag_of(outcomes[k]) for k in keys}


async def test_batch_backend_is_none_without_a_batch_api() -> None:
    """``batch_backend`` builds the provider's backend, or says there is none."""

    class NoBatch:
        name = "local"

    async with (
        OpenAIProvider(api_key="sk-test", base_url="http://127.0.0.1:9/v1") as openai_side,
        AnthropicProvider(api_key="sk-ant-x", base_url="http://127.0.0.1:9") as anthropic_side,
    ):
        assert isinstance(batch_backend(openai_side), OpenAIBatchBackend)
        assert isinstance(batch_backend(anthropic_side), AnthropicBatchBackend)
    assert None is batch_backend(NoBatch())


# -- OpenAI: splitting, failures, expiry -------------------------------------------------


@pytest.mark.parametrize(
    ("resubmits", "batches", "answered", "expired", "executed_failures"),
    [
        # 6 files (450 x 5 + 250); the 450s expire after 400 requests: 5 x 50 expire
        (0, 6, 2249, 250, 1),
        # the 250 expired + doc-0007 go again (one file), then doc-0007 alone
        (2, 8, 2499, 0, 3),
    ],
)
async def test_a_2500_item_job_split_out_of_order_with_errors_and_expiry(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    resubmits: int,
    batches: int,
    answered: int,
    expired: int,
    executed_failures: int,
) -> None:
    """2,500 items split by count and bytes, answered out of order; a failing item ends
    as its error after its resubmits; expired items are resubmitted, or end as
    BatchExpired once resubmits are used up. Every item ends exactly once, with its own
    answer, and no request ran twice on the simulator."""
    sim = await batch_sim(
        simulator_factory,
        wall,
        seconds_per_request=1 / 64,
        completion_window_seconds=1 + 400 / 64,
        fail_custom_ids={"doc-0007"},
    )
    requests = chat(2500)
    ended: list[str] = []
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        size = line_size(backend, *requests[0])
        backend.limits = BatchLimits(max_requests=600, max_bytes=450 * size, one_model=True)
        outcomes = await run_batch_api(
            backend,
            requests,
            on_result=lambda key, _: ended.append(key),
            poll_interval=POLL,
            resubmits=resubmits,
            sleep=wall.sleep,
        )

    keys = [key for key, _ in requests]
    assert 2500 == len(ended) == len(set(ended)) == len(outcomes)
    assert sorted(keys) == sorted(ended)
    assert keys != ended  # results arrived in the providers' (shuffled) order
    failed = outcomes["doc-0007"]
    assert isinstance(failed, ProviderUnavailable)
    assert (500, MINI) == (failed.status_code, failed.model)
    expected = {"Response": answered, "ProviderUnavailable": 1, "BatchExpired": expired}
    assert {k: n for k, n in expected.items() if n} == kinds(outcomes)
    assert_own_answers(outcomes, [k for k, o in outcomes.items() if isinstance(o, Response)])
    # file j holds items 450j..450j+449 (input order); its window closed after 400 of them
    leftovers = {f"doc-{450 * j + 400 + t:04d}" for j in range(5) for t in range(50)}
    given_up = {k for k, o in outcomes.items() if isinstance(o, BatchExpired)}
    assert (leftovers if expired else set()) == given_up

    stats = sim.stats().batch
    assert (batches, answered, executed_failures, 250) == (
        stats["openai_batches_created"],
        stats["batch_requests_completed"],
        stats["batch_requests_failed"],
        stats["batch_requests_expired"],
    )
    files = await input_files(sim)
    assert all(nbytes <= 450 * size for nbytes, _ in files)
    custom_ids = [sorted(line["custom_id"] for line in lines) for _, lines in files]
    assert [450] * 5 + [250] == [len(ids) for ids in custom_ids[:6]]
    assert sorted(keys) == sorted(cid for ids in custom_ids[:6] for cid in ids)
    # only what did not run goes again: never a request that already ran
    again = [sorted({*leftovers, "doc-0007"}), ["doc-0007"]] if resubmits else []
    assert again == custom_ids[6:]


@pytest.mark.parametrize(
    ("max_requests", "max_lines_by_bytes", "sizes"),
    [
        pytest.param(600, 100_000, [600, 600, 600, 600, 100], id="by-count"),
        pytest.param(50_000, 500, [500] * 5, id="by-bytes"),
        pytest.param(600, 450, [450] * 5 + [250], id="bytes-tighter-than-count"),
        pytest.param(2500, 2500, [2500], id="one-file"),
    ],
)
async def test_a_job_is_split_under_the_count_and_byte_limits(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    max_requests: int,
    max_lines_by_bytes: int,
    sizes: list[int],
) -> None:
    """Each file holds at most ``max_requests`` lines and ``max_bytes`` bytes, every
    item in exactly one file, and every item answered once."""
    sim = await batch_sim(simulator_factory, wall, seconds_per_request=0.0)
    requests = chat(2500)
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        size = line_size(backend, *requests[0])
        backend.limits = BatchLimits(
            max_requests=max_requests, max_bytes=max_lines_by_bytes * size, one_model=True
        )
        outcomes = await run_batch_api(backend, requests, poll_interval=POLL, sleep=wall.sleep)
    files = await input_files(sim)
    assert sizes == [len(lines) for _, lines in files]
    assert [n * size for n in sizes] == [nbytes for nbytes, _ in files]
    assert (len(sizes), 2500) == (
        sim.stats().batch["openai_batches_created"],
        sim.stats().batch["batch_requests_completed"],
    )
    assert_own_answers(outcomes, [key for key, _ in requests])


@pytest.mark.parametrize(
    ("resubmits", "answered", "batches"),
    [(0, 10, 1), (1, 20, 2), (2, 30, 3), (3, 40, 4), (5, 40, 4)],
)
async def test_expired_items_are_resubmitted_until_resubmits_run_out(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    resubmits: int,
    answered: int,
    batches: int,
) -> None:
    """The window closes after 10 requests of each batch: each resubmission answers 10
    more; what is left when resubmits run out ends as BatchExpired, never dropped."""
    sim = await batch_sim(simulator_factory, wall, completion_window_seconds=1 + 10 * 0.125)
    async with openai_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), chat(40), poll_interval=POLL, resubmits=resubmits, sleep=wall.sleep
        )
    expired = [k for k, o in outcomes.items() if isinstance(o, BatchExpired)]
    answers = [k for k, o in outcomes.items() if isinstance(o, Response)]
    assert (answered, 40 - answered, 40) == (len(answers), len(expired), len(outcomes))
    assert_own_answers(outcomes, answers)
    stats = sim.stats().batch
    assert (batches, answered) == (
        stats["openai_batches_created"],
        stats["batch_requests_completed"],
    )


async def test_one_model_per_openai_file(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Requests for two models, interleaved, go into two files of one model each."""
    sim = await batch_sim(simulator_factory, wall)
    mixed = [
        (key, Request.from_prompt(prompt(i), model=MINI if i % 2 else "gpt-4o", max_tokens=8))
        for i, (key, _) in enumerate(chat(10))
    ]
    async with openai_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), mixed, poll_interval=POLL, sleep=wall.sleep
        )
    files = await input_files(sim)
    assert [{"gpt-4o"}, {MINI}] == [{line["body"]["model"] for line in lines} for _, lines in files]
    assert [5, 5] == [len(lines) for _, lines in files]
    assert {k: r.model for k, r in mixed} == {
        k: o.model for k, o in outcomes.items() if isinstance(o, Response)
    }
    assert_own_answers(outcomes, [k for k, _ in mixed])


async def test_chat_and_embeddings_go_into_separate_files(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A batch has one endpoint: chat requests and embedding requests are split apart,
    and each comes back as its own kind of answer."""
    sim = await batch_sim(simulator_factory, wall)
    embeddings: list[tuple[str, Request | EmbeddingRequest]] = [
        (f"emb-{i}", EmbeddingRequest(input=f"text {i}", model="text-embedding-3-small"))
        for i in range(3)
    ]
    requests: list[tuple[str, Request | EmbeddingRequest]] = [*chat(3), *embeddings]
    async with openai_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), requests, poll_interval=POLL, sleep=wall.sleep
        )
    files = await input_files(sim)
    assert [{"/v1/chat/completions"}, {"/v1/embeddings"}] == [
        {line["url"] for line in lines} for _, lines in files
    ]
    assert {"Response": 3, "Embedding": 3} == kinds(outcomes)
    assert all(
        isinstance(o, Embedding) and len(o.vector) > 0
        for k, o in outcomes.items()
        if k.startswith("emb-")
    )


async def test_polling_backs_off_while_nothing_ends_and_resets_when_something_does(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """The wait grows by half while no batch ends, capped at ``max_poll_interval``, and
    drops back to ``poll_interval`` as soon as one ends."""
    sim = await batch_sim(simulator_factory, wall, seconds_per_request=1.0)
    # a 1-request gpt-4o batch ends at 3 s; the 200-request gpt-4o-mini one at 202 s
    requests = [
        ("quick", Request.from_prompt("quick", model="gpt-4o", max_tokens=8)),
        *chat(200),
    ]
    async with openai_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(),
            requests,
            poll_interval=10,
            max_poll_interval=40,
            sleep=wall.sleep,
        )
    assert 201 == len(outcomes)
    # 10 (quick ends) | 10, 15, 22.5, 33.75, 40, 40, 40 (202 s reached at 211.25 s)
    assert [10, 10, 15, 22.5, 33.75, 40, 40, 40] == wall.sleeps


async def test_a_failed_status_check_is_asked_again(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A 5xx while polling leaves the batch running; the next poll collects it."""

    class FlakyStatus(OpenAIBatchBackend):
        checks = 0

        async def status(self, batch_id: str) -> BatchStatus:
            self.checks += 1
            if self.checks == 1:
                raise ProviderUnavailable("502 on /v1/batches/{id}", status_code=502)
            return await super().status(batch_id)

    sim = await batch_sim(simulator_factory, wall)
    async with openai_provider(sim) as provider:
        backend = FlakyStatus(provider, provider._client)
        outcomes = await run_batch_api(backend, chat(5), poll_interval=POLL, sleep=wall.sleep)
    assert_own_answers(outcomes, [f"doc-{i:04d}" for i in range(5)])
    assert (2, 1) == (backend.checks, sim.stats().batch["openai_batches_created"])


async def test_a_batch_the_provider_does_not_know_is_fatal(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A journal naming a batch the provider has never seen (another account's journal)
    stops the job with NotFound instead of polling forever; nothing is submitted."""
    sim = await batch_sim(simulator_factory, wall)
    journal = MemoryJournal()
    journal.save_batch("batch_unknown", provider="openai", items={"doc-0000": "doc-0000"})
    async with openai_provider(sim) as provider:
        with pytest.raises(NotFound, match="batch_unknown"):
            await run_batch_api(provider.batch(), chat(1), journal=journal, sleep=wall.sleep)
    assert (0, ["submitted"]) == (
        sim.stats().batches_created,
        [b.status for b in journal.batches()],
    )


def test_memory_journal_records_and_filters_batches() -> None:
    """The in-memory journal: saved as submitted, status changes, filters by status and
    provider."""
    journal = MemoryJournal()
    journal.save_batch("b1", provider="openai", items={"c1": "k1"})
    journal.save_batch("b2", provider="anthropic", items={"c2": "k2"}, attempt=2)
    journal.set_batch_status("b1", "collected")
    assert [("b1", "collected", {"c1": "k1"}, 1), ("b2", "submitted", {"c2": "k2"}, 2)] == [
        (b.id, b.status, b.items, b.attempt) for b in journal.batches()
    ]
    assert ["b2"] == [b.id for b in journal.batches("submitted")]
    assert ["b1"] == [b.id for b in journal.batches(provider="openai")]
    assert [] == journal.batches("collected", provider="anthropic")


# -- whole-batch failures ----------------------------------------------------------------


@pytest.mark.parametrize("resubmits", [0, 2])
async def test_enqueued_token_limit_rejections_wait_for_room_and_succeed(
    simulator_factory: SimulatorFactory, wall: FakeClock, resubmits: int
) -> None:
    """Only one 15-request batch fits the enqueued-token limit at a time: the others are
    rejected (token_limit_exceeded), wait for a running batch to end and go again; a
    rejection is not an execution, so even ``resubmits=0`` ends with every answer."""
    sim = await batch_sim(simulator_factory, wall, enqueued_token_limit=150)
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        backend.limits = BatchLimits(max_requests=15, max_bytes=10**8, one_model=True)
        outcomes = await run_batch_api(
            backend, chat(45), poll_interval=POLL, resubmits=resubmits, sleep=wall.sleep
        )
    assert_own_answers(outcomes, [f"doc-{i:04d}" for i in range(45)])
    stats = sim.stats().batch
    # 3 submitted (1 fits) -> 2 again (1 fits) -> the last one
    assert (6, 3, 3, 45) == (
        stats["openai_batches_created"],
        stats["batches_token_limited"],
        stats["batches_failed"],
        stats["batch_requests_completed"],
    )
    assert [POLL, POLL, POLL] == wall.sleeps


@pytest.mark.parametrize(
    ("queue_wait", "batches", "sleeps"),
    [
        # no waiting for room: the first rejection is final
        (0, 1, [POLL]),
        # poll: rejected | wait 90 | poll: rejected | wait 202.5 (292.5 s waited) |
        # poll: rejected, and one more wait (300 s) would pass queue_wait
        (300, 3, [POLL, 90, 135, 202.5, 300]),
    ],
)
async def test_a_batch_that_can_never_fit_the_token_limit_ends_as_bad_request(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    queue_wait: float,
    batches: int,
    sleeps: list[float],
) -> None:
    """Rejected for the enqueued-token limit with none of the job's batches running, a
    batch is submitted again after waits that back off (other jobs' batches may hold
    the queue); one that never fits ends as BadRequest saying why once it has waited
    ``queue_wait`` seconds, instead of waiting forever."""
    sim = await batch_sim(simulator_factory, wall, enqueued_token_limit=20)
    async with openai_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(),
            chat(10),
            poll_interval=POLL,
            queue_wait=queue_wait,
            sleep=wall.sleep,
        )
    assert {"BadRequest": 10} == kinds(outcomes)
    assert all("enqueued-token limit on its own" in str(o) for o in outcomes.values())
    assert f"rejected {batches} times" in str(outcomes["doc-0000"])
    stats = sim.stats().batch
    assert (batches, batches, 0) == (
        stats["openai_batches_created"],
        stats["batches_token_limited"],
        stats["batch_requests_completed"],
    )
    assert sleeps == wall.sleeps


async def test_a_batch_rejected_for_another_reason_fails_naming_it(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A batch that fails validation (more requests than the provider takes per file)
    is not retried: each item ends as BadRequest quoting the provider's reason."""
    sim = await batch_sim(simulator_factory, wall, max_requests_per_file=10)
    async with openai_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), chat(12), poll_interval=POLL, sleep=wall.sleep
        )
    assert {"BadRequest": 12} == kinds(outcomes)
    message = str(outcomes["doc-0000"])
    assert "the batch was rejected: too_many_tasks" in message
    assert "up to 10 requests" in message
    assert 1 == sim.stats().batch["openai_batches_created"]


# -- journal: resume and cancel ----------------------------------------------------------


@pytest.mark.parametrize(("make", "model"), PROVIDERS)
async def test_a_rerun_with_the_journal_resumes_polling_without_resubmitting(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    tmp_path: Any,
    make: Callable[[Simulator], Provider],
    model: str,
) -> None:
    """Interrupted right after submitting 3 batches, the same call with the same journal
    (a Store reopened from its file, as after a crash) polls the recorded batches: no
    new batch, every item answered once, every batch marked collected."""
    sim = await batch_sim(simulator_factory, wall)
    requests = chat(50, model)
    async with make(sim) as provider:
        created = f"{provider.name}_batches_created"
        backend = provider.batch()
        backend.limits = dataclasses.replace(backend.limits, max_requests=20)
        with Store(tmp_path / "job.sqlite") as store:
            await interrupted(
                lambda sleep: run_batch_api(
                    backend, requests, journal=store, poll_interval=POLL, sleep=sleep
                )
            )
        assert 3 == sim.stats().batch[created]

        ended: list[str] = []
        with Store(tmp_path / "job.sqlite") as store:
            recorded = store.batches("submitted", provider=provider.name)
            assert [20, 20, 10] == [len(b.items) for b in recorded]
            outcomes = await run_batch_api(
                provider.batch(),
                requests,
                journal=store,
                on_result=lambda key, _: ended.append(key),
                poll_interval=POLL,
                sleep=wall.sleep,
            )
            statuses = [b.status for b in store.batches()]
    assert ["collected"] * 3 == statuses
    stats = sim.stats().batch
    assert (3, 50) == (stats[created], stats["batch_requests_completed"])
    assert sorted(k for k, _ in requests) == sorted(ended)
    assert_own_answers(outcomes, [k for k, _ in requests])


async def test_a_rerun_resumes_only_the_batches_of_its_own_items(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A journal shared by two jobs: a rerun of one resumes its batch and leaves the
    other job's batch alone (not polled, not marked)."""
    sim = await batch_sim(simulator_factory, wall)
    journal = MemoryJournal()
    async with openai_provider(sim) as provider:
        first, second = chat(5), chat(5, start=100)

        def submit(job: list[tuple[str, Request]]) -> Callable[[Interrupt], Awaitable[Any]]:
            return lambda sleep: run_batch_api(
                provider.batch(), job, journal=journal, poll_interval=POLL, sleep=sleep
            )

        await interrupted(submit(first))
        await interrupted(submit(second))
        outcomes = await run_batch_api(
            provider.batch(), second, journal=journal, poll_interval=POLL, sleep=wall.sleep
        )
    assert ["submitted", "collected"] == [b.status for b in journal.batches()]
    assert 2 == sim.stats().batch["openai_batches_created"]
    assert_own_answers(outcomes, [k for k, _ in second])


async def test_a_rerun_after_a_partial_collection_pays_for_nothing_twice(
    simulator_factory: SimulatorFactory, wall: FakeClock, tmp_path: Any
) -> None:
    """Killed after the short batch was collected but while the long one still ran, the
    rerun with the same journal must not submit the collected items again."""
    sim = await batch_sim(simulator_factory, wall, seconds_per_request=1.0)

    class Crash(Exception):
        pass

    async with openai_provider(sim) as provider:
        backend = provider.batch()
        backend.limits = BatchLimits(max_requests=5, max_bytes=10**8, one_model=True)
        with Store(tmp_path / "job.sqlite") as store:

            async def crash_after_a_collection(seconds: float) -> None:
                if store.batches("collected"):
                    raise Crash
                await wall.sleep(seconds)

            with pytest.raises(Crash):
                await run_batch_api(
                    backend, chat(6), journal=store, poll_interval=4, sleep=crash_after_a_collection
                )
            assert [("submitted", 5), ("collected", 1)] == [
                (b.status, len(b.items)) for b in store.batches()
            ]
            outcomes = await run_batch_api(
                backend, chat(6), journal=store, poll_interval=4, sleep=wall.sleep
            )
            statuses = [b.status for b in store.batches()]
    assert_own_answers(outcomes, [f"doc-{i:04d}" for i in range(6)])
    assert ["collected", "collected"] == statuses
    stats = sim.stats().batch
    assert (2, 6) == (stats["openai_batches_created"], stats["batch_requests_completed"])


@pytest.mark.parametrize(
    ("make", "model", "validating"),
    [
        pytest.param(openai_provider, MINI, 1.0, id="openai"),
        pytest.param(anthropic_provider, CLAUDE, 0.0, id="anthropic"),
    ],
)
async def test_a_rerun_after_a_crash_before_a_resubmission_sends_only_what_did_not_run(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Simulator], Provider],
    model: str,
    validating: float,
) -> None:
    """resubmits=1; each batch's window closes after 10 requests. Killed after the
    first batch was collected (10 answered, 30 expired) but before the 30 were sent
    again: the rerun downloads the first batch's answers again and submits only the
    30, as their one resubmission. A third run with the journal submits nothing and
    gives the same outcomes: the 20 whose resubmission expired too stay BatchExpired."""
    sim = await batch_sim(
        simulator_factory, wall, completion_window_seconds=validating + 10 * 0.125
    )
    requests = chat(40, model)

    class Crash(Exception):
        pass

    def run(backend: BatchBackend, store: Store) -> Awaitable[dict[str, Outcome]]:
        return run_batch_api(
            backend, requests, journal=store, poll_interval=POLL, resubmits=1, sleep=wall.sleep
        )

    async with make(sim) as provider:
        created = f"{provider.name}_batches_created"
        crashing = provider.batch()
        submit = crashing.submit

        async def crash_on_resubmission(
            lines: Sequence[Mapping[str, Any]], *, model: str | None
        ) -> str:
            if sim.stats().batch[created] == 1:
                raise Crash
            return await submit(lines, model=model)

        monkeypatch.setattr(crashing, "submit", crash_on_resubmission)
        with Store(tmp_path / "job.sqlite") as store, pytest.raises(Crash):
            await run(crashing, store)
        with Store(tmp_path / "job.sqlite") as store:
            assert [("collected", 40)] == [(b.status, len(b.items)) for b in store.batches()]
            second = await run(provider.batch(), store)
            journaled = [(b.status, len(b.items), b.attempt) for b in store.batches()]
        with Store(tmp_path / "job.sqlite") as store:
            third = await run(provider.batch(), store)
    assert [("collected", 40, 1), ("collected", 30, 2)] == journaled
    assert {"Response": 20, "BatchExpired": 20} == kinds(second) == kinds(third)
    answered = [k for k, o in second.items() if isinstance(o, Response)]
    assert_own_answers(second, answered)
    assert_own_answers(third, answered)
    stats = sim.stats().batch
    assert (2, 20) == (stats[created], stats["batch_requests_completed"])


@pytest.mark.parametrize(("make", "model"), PROVIDERS)
async def test_cancel_batches_cancels_what_the_journal_holds(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    tmp_path: Any,
    make: Callable[[Simulator], Provider],
    model: str,
) -> None:
    """After a Ctrl-C the batches run on; ``cancel_batches`` stops them on the provider
    and marks them cancelled. Cancelled while validating, they ran nothing: the rerun
    waits for them to end, finds no result in them, and submits the 6 items again, in
    one batch."""
    sim = await batch_sim(simulator_factory, wall)
    requests = chat(6, model)
    async with make(sim) as provider:
        backend = provider.batch()
        backend.limits = dataclasses.replace(backend.limits, max_requests=2)
        with Store(tmp_path / "job.sqlite") as store:
            await interrupted(
                lambda sleep: run_batch_api(
                    backend, requests, journal=store, poll_interval=POLL, sleep=sleep
                )
            )
            submitted = [b.id for b in store.batches("submitted")]
            cancelled = await cancel_batches(provider.batch(), store)
            assert submitted == cancelled
            assert cancelled == [b.id for b in store.batches("cancelled")]
            assert [] == await cancel_batches(provider.batch(), store)
            outcomes = await run_batch_api(
                provider.batch(), requests, journal=store, poll_interval=POLL, sleep=wall.sleep
            )
    stats = sim.stats().batch
    # the 3 cancelled batches ran nothing; the rerun's one batch answered everything
    assert (3, 4, 6, 6) == (
        stats["batches_cancel_requested"],
        stats["batches_created"],
        stats["batch_requests_canceled"],
        stats["batch_requests_completed"],
    )
    assert_own_answers(outcomes, [k for k, _ in requests])
    if isinstance(provider, OpenAIProvider):
        assert ["cancelled"] * 3 == await openai_statuses(sim, cancelled)


@pytest.mark.parametrize(
    ("make", "model", "validating"),
    [
        pytest.param(openai_provider, MINI, 1.0, id="openai"),
        pytest.param(anthropic_provider, CLAUDE, 0.0, id="anthropic"),
    ],
)
@pytest.mark.parametrize(
    ("resubmits", "expected_kinds", "batches", "completed", "failed"),
    [
        # no budget left: the 6 never run end as BatchExpired, doc-0001 as its 500
        pytest.param(
            0, {"Response": 3, "ProviderUnavailable": 1, "BatchExpired": 6}, 1, 3, 1, id="none"
        ),
        # the 6 and doc-0001 go again together: the 6 are answered, doc-0001 fails again
        pytest.param(1, {"Response": 9, "ProviderUnavailable": 1}, 2, 9, 2, id="one"),
    ],
)
async def test_a_rerun_after_a_cancel_keeps_what_ran_and_resubmits_only_the_rest(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    tmp_path: Any,
    make: Callable[[Simulator], Provider],
    model: str,
    validating: float,
    resubmits: int,
    expected_kinds: dict[str, int],
    batches: int,
    completed: int,
    failed: int,
) -> None:
    """A batch of 10 cancelled once 4 had run (doc-0001 of them failing with a 500),
    still cancelling when the rerun with the journal starts: the rerun polls it until
    the provider ends it, keeps the 3 answers it delivered (billed: never paid again),
    treats doc-0001's error as in a completed batch, and submits again only what never
    ran, within each item's resubmit budget (the cancelled batch was one attempt). A
    third run with the journal submits nothing and gives the same outcomes."""
    sim = await batch_sim(
        simulator_factory, wall, seconds_per_request=1.0, fail_custom_ids={"doc-0001"}
    )
    requests = chat(10, model)
    keys = [key for key, _ in requests]

    def run(
        backend: BatchBackend,
        store: Store,
        on_result: Callable[[str, Outcome], None] | None = None,
    ) -> Awaitable[dict[str, Outcome]]:
        return run_batch_api(
            backend,
            requests,
            journal=store,
            on_result=on_result,
            poll_interval=1.0,
            resubmits=resubmits,
            sleep=wall.sleep,
        )

    ended: list[str] = []
    async with make(sim) as provider:
        created = f"{provider.name}_batches_created"
        with Store(tmp_path / "job.sqlite") as store:
            await interrupted(
                lambda sleep: run_batch_api(
                    provider.batch(), requests, journal=store, poll_interval=1.0, sleep=sleep
                )
            )
            wall.advance(validating + 4.5)  # doc-0000..doc-0003 have run
            [cancelled] = await cancel_batches(provider.batch(), store)
        with Store(tmp_path / "job.sqlite") as store:
            assert "running" == (await provider.batch().status(cancelled)).state
            second = await run(provider.batch(), store, lambda key, _: ended.append(key))
            journaled = [(b.status, sorted(b.items)) for b in store.batches()]
        with Store(tmp_path / "job.sqlite") as store:
            third = await run(provider.batch(), store)
        assert batches == sim.stats().batch[created]
    never_ran = keys[4:]
    again = [("collected", sorted(["doc-0001", *never_ran]))] if resubmits else []
    assert [("collected", keys), *again] == journaled
    assert sorted(keys) == sorted(ended)  # each item ended once
    assert expected_kinds == kinds(second) == kinds(third)
    answered = [k for k, o in second.items() if isinstance(o, Response)]
    assert_own_answers(second, answered)
    assert_own_answers(third, answered)
    assert {"doc-0000", "doc-0002", "doc-0003"} <= set(answered)
    assert isinstance(second["doc-0001"], ProviderUnavailable)
    unrun = {k: str(o) for k, o in second.items() if isinstance(o, BatchExpired)}
    assert ([] if resubmits else never_ran) == sorted(unrun)
    assert all("cancel" in message for message in unrun.values()), unrun
    stats = sim.stats().batch
    assert (completed, failed, 6, 1) == (
        stats["batch_requests_completed"],
        stats["batch_requests_failed"],
        stats["batch_requests_canceled"],
        stats["batches_cancel_requested"],
    )


async def test_cancel_batches_skips_batches_that_already_ended(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A batch that finished since the Ctrl-C cannot be cancelled (OpenAI answers 409);
    it is skipped, and the still-running one after it in the journal is cancelled all
    the same."""
    sim = await batch_sim(simulator_factory, wall, seconds_per_request=1.0)
    # a 1-request gpt-4o batch (ends at 3 s), then a 4-request gpt-4o-mini one (6 s)
    requests = [("quick", Request.from_prompt("quick", model="gpt-4o")), *chat(4)]
    journal = MemoryJournal()
    async with openai_provider(sim) as provider:
        await interrupted(
            lambda sleep: run_batch_api(
                provider.batch(), requests, journal=journal, poll_interval=POLL, sleep=sleep
            )
        )
        ended, running = (b.id for b in journal.batches())
        wall.advance(4)
        assert ["completed", "in_progress"] == await openai_statuses(sim, [ended, running])
        cancelled = await cancel_batches(provider.batch(), journal)
    assert [running] == cancelled
    assert [running] == [b.id for b in journal.batches("cancelled")]
    # the ended batch stays submitted: a rerun collects the results it paid for
    assert [ended] == [b.id for b in journal.batches("submitted")]
    assert 1 == sim.stats().batch["batches_cancel_requested"]


async def test_cancel_batches_skips_an_ended_anthropic_batch(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Anthropic refuses to cancel a message batch that has ended (400): it is skipped
    and left submitted, and the running one after it is cancelled."""
    sim = await batch_sim(simulator_factory, wall, seconds_per_request=1.0)
    journal = MemoryJournal()
    async with anthropic_provider(sim) as provider:
        backend = provider.batch()
        # 1 request (ends at 2 s), then 4 (end at 5 s)
        for job in (chat(1, CLAUDE), chat(4, CLAUDE, start=1)):
            batch_id = await backend.submit(
                [backend.line(custom_id_for(k), r) for k, r in job], model=None
            )
            journal.save_batch(batch_id, provider=backend.name, items={k: k for k, _ in job})
        ended, running = (b.id for b in journal.batches())
        wall.advance(3)
        cancelled = await cancel_batches(backend, journal)
    assert [running] == cancelled
    assert [(ended, "submitted"), (running, "cancelled")] == [
        (b.id, b.status) for b in journal.batches()
    ]
    assert 1 == sim.stats().batch["batches_cancel_requested"]


async def test_a_failed_cancel_of_a_running_batch_is_raised_after_the_others(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """A cancel that fails (a 503) while its batch still runs is not skipped silently:
    it is raised, once the batches after it were cancelled; the failed one stays
    submitted, so that cancelling again (or a rerun) can deal with it."""

    class FlakyCancel(OpenAIBatchBackend):
        refuse: str = ""

        async def cancel(self, batch_id: str) -> None:
            if batch_id == self.refuse:
                raise ProviderUnavailable("503 on cancel", provider=self.name, status_code=503)
            await super().cancel(batch_id)

    sim = await batch_sim(simulator_factory, wall)
    journal = MemoryJournal()
    async with openai_provider(sim) as provider:
        backend = FlakyCancel(provider, provider._client)
        backend.limits = dataclasses.replace(backend.limits, max_requests=2)
        await interrupted(
            lambda sleep: run_batch_api(
                backend, chat(4), journal=journal, poll_interval=POLL, sleep=sleep
            )
        )
        first, second = (b.id for b in journal.batches())
        backend.refuse = first
        with pytest.raises(ProviderUnavailable, match="503 on cancel"):
            await cancel_batches(backend, journal)
        statuses = await openai_statuses(sim, [first, second])
    assert [(first, "submitted"), (second, "cancelled")] == [
        (b.id, b.status) for b in journal.batches()
    ]
    assert ["validating", "cancelling"] == statuses


# -- Anthropic Message Batches -----------------------------------------------------------


@pytest.mark.parametrize(
    ("resubmits", "answered", "expired", "batches"),
    [
        # the window closes after 18 of 30; doc-0003 (ran) errors
        (0, 17, 12, 1),
        # the 12 expired + doc-0003 go again (13 fit the window), then doc-0003 alone
        (2, 29, 0, 3),
    ],
)
async def test_anthropic_message_batches_with_errored_and_expired_items(
    simulator_factory: SimulatorFactory,
    wall: FakeClock,
    resubmits: int,
    answered: int,
    expired: int,
    batches: int,
) -> None:
    """The same lifecycle through Anthropic's official client: answers joined on
    custom_id, an errored item as its classified error after its resubmits, expired
    items resubmitted or ending as BatchExpired."""
    sim = await batch_sim(
        simulator_factory,
        wall,
        completion_window_seconds=18 * 0.125,
        fail_custom_ids={"doc-0003"},
    )
    ended: list[str] = []
    async with anthropic_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(),
            chat(30, CLAUDE),
            on_result=lambda key, _: ended.append(key),
            poll_interval=POLL,
            resubmits=resubmits,
            sleep=wall.sleep,
        )
    assert 30 == len(ended) == len(set(ended)) == len(outcomes)
    errored = outcomes["doc-0003"]
    assert isinstance(errored, ProviderUnavailable)
    assert ("anthropic", CLAUDE) == (errored.provider, errored.model)
    expected = {"Response": answered, "ProviderUnavailable": 1, "BatchExpired": expired}
    assert {k: n for k, n in expected.items() if n} == kinds(outcomes)
    answers = [k for k, o in outcomes.items() if isinstance(o, Response)]
    assert_own_answers(outcomes, answers)
    assert {CLAUDE} == {o.model for o in outcomes.values() if isinstance(o, Response)}
    stats = sim.stats().batch
    assert (batches, 0, answered) == (
        stats["anthropic_batches_created"],
        stats["openai_batches_created"],
        stats["batch_requests_completed"],
    )


async def test_anthropic_batches_may_mix_models(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Message Batches take any model in one batch: one batch for two models."""
    sim = await batch_sim(simulator_factory, wall)
    mixed = [
        (key, Request.from_prompt(prompt(i), model=(CLAUDE, "claude-sonnet-4-6")[i % 2]))
        for i, (key, _) in enumerate(chat(6))
    ]
    async with anthropic_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), mixed, poll_interval=POLL, sleep=wall.sleep
        )
    assert 1 == sim.stats().batch["anthropic_batches_created"]
    assert_own_answers(outcomes, [k for k, _ in mixed])


# -- LLMClient.map and llmbatch.map in batch mode ----------------------------------------


def keyed_requests(n: int) -> list[Request]:
    return [Request.from_prompt(prompt(i), max_tokens=16, key=f"doc-{i:04d}") for i in range(n)]


async def test_client_map_in_batch_mode(
    simulator_factory: SimulatorFactory, wall: FakeClock, tmp_path: Any
) -> None:
    """``LLMClient.map(mode="batch")``: results in input order, priced at half the
    online price, an ItemError for the failed item, the journal recording the batch."""
    sim = await batch_sim(simulator_factory, wall, fail_custom_ids={"doc-0001"})
    requests = keyed_requests(4)
    async with openai_provider(sim) as provider:
        client = LLMClient(provider, model=MINI, sleep=wall.sleep)
        client.batch_poll_interval = POLL
        online = await client.map(requests[:1])
        with Store(tmp_path / "job.sqlite") as store:
            result = await client.map(requests, mode="batch", on_error="collect", journal=store)
            journaled = [(b.status, sorted(b.items)) for b in store.batches()]
    assert [Response, ItemError, Response, Response] == [type(r) for r in result.results]
    failed = result.errors[0]
    assert (1, "doc-0001", "ProviderUnavailable") == (failed.index, failed.key, failed.error_type)
    assert [content_tag(prompt(i)) for i in (0, 2, 3)] == [tag_of(r) for r in result.ok]
    first = result.ok[0]
    assert "doc-0000" == first.key
    expected = (first.usage.input_tokens * 0.15 + first.usage.output_tokens * 0.60) / 1e6 / 2
    assert first.cost == pytest.approx(expected)
    assert online.ok[0].usage == first.usage
    assert online.ok[0].cost == pytest.approx(2 * expected)
    # the failing item went again twice (resubmits=2) before its error was final
    assert [
        ("collected", ["doc-0000", "doc-0001", "doc-0002", "doc-0003"]),
        ("collected", ["doc-0001"]),
        ("collected", ["doc-0001"]),
    ] == journaled
    assert 1 == sim.stats().ok  # the online call; the batch went through /v1/batches


async def test_client_map_in_batch_mode_fail_fast_raises_batch_failed(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Fail-fast (the client's default) raises BatchFailed carrying every result."""
    sim = await batch_sim(simulator_factory, wall, fail_custom_ids={"doc-0002"})
    async with openai_provider(sim) as provider:
        client = LLMClient(provider, model=MINI, sleep=wall.sleep)
        client.batch_poll_interval = POLL
        with pytest.raises(BatchFailed) as info:
            await client.map(keyed_requests(4), mode="batch")
    assert ("fail_fast", 2, "doc-0002") == (
        info.value.reason,
        info.value.error.index,
        info.value.error.key,
    )
    assert info.value.result is not None
    assert [False, False, True, False] == [
        isinstance(r, ItemError) for r in info.value.result.results
    ]


async def test_client_map_in_batch_mode_names_unkeyed_items_by_position(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Requests without a key are named ``item-N`` in the batch; results stay in order."""
    sim = await batch_sim(simulator_factory, wall)
    requests = [Request.from_prompt(prompt(i), max_tokens=8) for i in range(3)]
    async with openai_provider(sim) as provider:
        client = LLMClient(provider, model=MINI, sleep=wall.sleep)
        client.batch_poll_interval = POLL
        result = await client.map(requests, mode="batch")
    assert [content_tag(prompt(i)) for i in range(3)] == [tag_of(r) for r in result.ok]
    files = await input_files(sim)
    assert [["item-0", "item-1", "item-2"]] == [
        [ln["custom_id"] for ln in lines] for _, lines in files
    ]


async def test_llmbatch_map_in_batch_mode_with_a_bad_item() -> None:
    """``llmbatch.map(template, items, mode="batch")``: an item missing a template field
    is its own ItemError; the others are answered through one batch, in input order.
    (``llmbatch.map`` builds its own client, so the event loop runs on virtual time.)"""
    clock = FakeClock(start=10.0)
    items: list[dict[str, str]] = [{"text": "alpha"}, {"title": "no text"}, {"text": "gamma"}]
    with clock.patch_loop():
        async with (
            Simulator(batch=timing(), batch_clock=clock.time) as sim,
            openai_provider(sim) as provider,
        ):
            result = await llmbatch.map(
                "Summarize: {text}", items, model=MINI, provider=provider, mode="batch"
            )
            created = sim.stats().batch["openai_batches_created"]
    bad = result.results[1]
    assert isinstance(bad, ItemError)
    assert (1, "KeyError") == (bad.index, bad.error_type)
    assert [content_tag("Summarize: alpha"), content_tag("Summarize: gamma")] == [
        tag_of(r) for r in result.ok
    ]
    assert all(r.cost is not None and r.cost > 0 for r in result.ok)
    assert 1 == created


# -- failed submissions, oversized items, budgets, a queue held by others ----------------


async def test_a_submission_that_keeps_failing_ends_after_the_resubmits(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Every upload answered 503: after ``resubmits`` more tries the items end as
    ProviderUnavailable instead of the job retrying forever."""

    class Down(OpenAIBatchBackend):
        submits = 0

        async def submit(self, lines: Sequence[Mapping[str, Any]], *, model: str | None) -> str:
            self.submits += 1
            raise ProviderUnavailable("503 on /v1/files", provider=self.name, status_code=503)

    async def bounded(seconds: float) -> None:
        if len(wall.sleeps) >= 50:
            raise RuntimeError("still resubmitting after 50 waits")
        await wall.sleep(seconds)

    sim = await batch_sim(simulator_factory, wall)
    async with openai_provider(sim) as provider:
        backend = Down(provider, provider._client)
        outcomes = await run_batch_api(
            backend, chat(3), resubmits=2, poll_interval=POLL, sleep=bounded
        )
    assert {"ProviderUnavailable": 3} == kinds(outcomes)
    # the first try and 2 resubmissions, with a growing wait between them
    assert (3, [POLL, 1.5 * POLL]) == (backend.submits, wall.sleeps)
    assert 0 == sim.stats().batches_created


async def test_an_item_too_large_for_any_batch_is_its_own_error(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """The oversized item ends as BadRequest; the other items are answered."""
    sim = await batch_sim(simulator_factory, wall)
    requests = [*chat(3), ("big", Request.from_prompt("x" * 5000, model=MINI, max_tokens=8))]
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        backend.limits = BatchLimits(max_requests=100, max_bytes=4096, one_model=True)
        outcomes = await run_batch_api(backend, requests, poll_interval=POLL, sleep=wall.sleep)
    big = outcomes["big"]
    assert isinstance(big, BadRequest)
    assert "'big' alone exceeds the batch size limit" in str(big)
    assert_own_answers(outcomes, ["doc-0000", "doc-0001", "doc-0002"])
    files = await input_files(sim)
    assert [["doc-0000", "doc-0001", "doc-0002"]] == [
        [line["custom_id"] for line in lines] for _, lines in files
    ]


async def test_a_request_the_batch_api_cannot_take_is_its_own_error(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """An embedding request sent to Anthropic's Message Batches (which have none) ends as
    BadRequest; the chat requests with it are answered."""
    sim = await batch_sim(simulator_factory, wall)
    requests: list[tuple[str, Request | EmbeddingRequest]] = [
        *chat(2, CLAUDE),
        ("emb", EmbeddingRequest(input="text", model="voyage-3")),
    ]
    async with anthropic_provider(sim) as provider:
        outcomes = await run_batch_api(
            provider.batch(), requests, poll_interval=POLL, sleep=wall.sleep
        )
    assert isinstance(outcomes["emb"], BadRequest)
    assert "no embeddings API" in str(outcomes["emb"])
    assert_own_answers(outcomes, ["doc-0000", "doc-0001"])


async def test_each_item_keeps_its_own_resubmit_budget(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """resubmits=1: batch A (8) runs 4 before its window closes; batch B (8) is rejected
    for the token limit. A's 4 leftovers and B's first 4 then share a file, in which
    only A's 4 run; B's 4 expired in their first real batch and deserve their one
    resubmission, which answers them."""
    sim = await batch_sim(
        simulator_factory,
        wall,
        completion_window_seconds=1 + 4 * 0.125,
        enqueued_token_limit=100,  # 8 requests of 8 tokens fit, 16 do not
    )
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        backend.limits = BatchLimits(max_requests=8, max_bytes=10**8, one_model=True)
        outcomes = await run_batch_api(
            backend, chat(16), poll_interval=POLL, resubmits=1, sleep=wall.sleep
        )
    assert {"Response": 16} == kinds(outcomes)


async def test_a_token_limit_rejection_caused_by_another_job_is_retried(
    simulator_factory: SimulatorFactory, wall: FakeClock
) -> None:
    """Another job's 8-request batch fills the queue; this job's 8-request batch fits
    the limit on its own: rejected while none of its own batches runs, it waits
    (without spending an attempt) and is answered once the other batch has ended."""
    sim = await batch_sim(
        simulator_factory, wall, seconds_per_request=1.0, enqueued_token_limit=100
    )
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        other = [backend.line(f"other-{i}", r) for i, (_, r) in enumerate(chat(8, start=500))]
        await backend.submit(other, model=MINI)
        outcomes = await run_batch_api(backend, chat(8), poll_interval=5, sleep=wall.sleep)
    assert_own_answers(outcomes, [f"doc-{i:04d}" for i in range(8)])
    stats = sim.stats().batch
    assert (3, 1, 16) == (
        stats["openai_batches_created"],
        stats["batches_token_limited"],
        stats["batch_requests_completed"],
    )
    # rejected (seen at 5 s) | wait 7.5: the other batch ended at 10 s | answered
    assert [5, 7.5, 11.25] == wall.sleeps
