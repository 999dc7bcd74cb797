"""Tests for llmbatch.client: the call path (limits, retries, cooldown) and llmbatch.map."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs
from tenacity import stop_after_attempt, wait_fixed

from llmbatch.api import map as llm_map
from llmbatch.client import LLMClient, build_request
from llmbatch.config import LimiterSettings
from llmbatch.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    ProviderUnavailable,
    ProviderUnreachable,
    QuotaExhausted,
    RateLimited,
)
from llmbatch.failure import BatchFailed, ItemError
from llmbatch.limits import Limits, RateLimiter, RedisRateLimiter, quota_name
from llmbatch.models import Request, Response
from llmbatch.providers.base import Admission
from llmbatch.providers.fake import FakeProvider
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.retry import RetryPolicy
from llmbatch.testing import FakeClock, Simulator
from llmbatch.testing._content import content_tag
from llmbatch.testing._faults import Fault, RequestInfo
from llmbatch.testing.pytest_plugin import SimulatorFactory


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=100.0)
    with fake.patch_loop():
        yield fake


def echo(request: Request) -> str:
    return f"echo: {request.messages[-1]['content']}"


class Script:
    """A handler that raises the given errors in turn, then echoes."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)

    def __call__(self, request: Request) -> str:
        if self.errors:
            raise self.errors.pop(0)
        return echo(request)


@pytest.mark.parametrize(
    ("template", "item", "expected"),
    [
        ("Summarize: {text}", {"text": "tides"}, "Summarize: tides"),
        ("Translate {item}", "hola", "Translate hola"),
        (lambda item: f"custom {item}", 7, "custom 7"),
    ],
)
def test_build_request(template: Any, item: Any, expected: str) -> None:
    """Templates format dict items by field and other items as {item}."""
    assert expected == build_request(template, item).messages[-1]["content"]


@pytest.mark.parametrize(
    ("template", "item", "error"),
    [("{text}", {"text": "   "}, ValueError), ("{text}", {"body": "x"}, KeyError)],
)
def test_build_request_errors(template: str, item: Any, error: type[Exception]) -> None:
    """An empty prompt or a missing field is a clear error."""
    with pytest.raises(error):
        build_request(template, item)


async def test_complete_applies_defaults_and_counts_attempts(clock: FakeClock) -> None:
    """The client fills in model and max_tokens; transient errors are retried through
    the limiter (every attempt acquires), and the response says how many it took."""
    provider = FakeProvider(Script(ProviderUnavailable("502"), ProviderUnavailable("503")))
    limiter = RateLimiter(Limits(rpm=600))
    client = LLMClient(provider, model="m-1", max_tokens=32, limiter=limiter, sleep=clock.sleep)
    response = await client.complete("hello")
    assert ("echo: hello", 3) == (response.text, response.attempts)
    assert [("m-1", 32)] * 3 == [(r.model, r.max_tokens) for r in provider.calls]
    assert 3 == limiter.statistics().acquired
    assert {"ProviderUnavailable": 2} == client.retry_log.statistics().retries


async def test_429_goes_to_the_shared_cooldown_not_a_private_sleep(clock: FakeClock) -> None:
    """A rate-limit error pauses the quota's limiter; the retry itself does not sleep."""
    provider = FakeProvider(Script(RateLimited("slow down", kind="requests", retry_after=5.0)))
    limiter = RateLimiter(Limits(rpm=600))
    client = LLMClient(provider, model="m", limiter=limiter, sleep=clock.sleep)
    start = clock.time()
    await client.complete("x")
    assert [0.0] == clock.sleeps  # no private wait
    assert 1 == limiter.statistics().rate_limited
    assert clock.time() - start >= 5.0  # the second attempt waited for the cooldown


async def test_fatal_error_carries_item_key_and_attempt(clock: FakeClock) -> None:
    """A fatal error is not retried and says which item and attempt it hit."""
    provider = FakeProvider(Script(AuthenticationFailed("bad key")))
    client = LLMClient(provider, model="m", sleep=clock.sleep)
    with pytest.raises(AuthenticationFailed) as info:
        await client.complete(Request.from_prompt("x", key="doc-9"))
    assert ("doc-9", 1, 1) == (info.value.item_key, info.value.attempt, len(provider.calls))


async def test_client_uses_the_shared_registry_limiter(clock: FakeClock) -> None:
    """Two clients of one provider key and model share one limiter."""
    provider = FakeProvider(echo)
    a = LLMClient(provider, model="m", limits=Limits(rpm=60))
    b = LLMClient(provider, model="m")
    assert a.limiter_for("m") is b.limiter_for("m")


async def test_map_keeps_order_and_turns_bad_items_into_error_records(clock: FakeClock) -> None:
    """llmbatch.map: one Response or one ItemError per item, in input order."""
    items = [{"text": "a"}, {"text": ""}, {"body": "no text"}, {"text": "d"}]
    result = await llm_map(
        "Say {text}", items, model="m", provider=FakeProvider(echo), key=lambda i: str(i)
    )
    assert isinstance(result.results[0], Response)
    assert ["echo: Say a", "echo: Say d"] == [r.text for r in result.ok]
    assert [(1, "ValueError"), (2, "KeyError")] == [(e.index, e.error_type) for e in result.errors]


async def test_map_stops_on_quota_exhaustion_keeping_what_finished(clock: FakeClock) -> None:
    """A fatal error ends the job even under 'collect', with the finished results."""
    calls = 0

    def handler(request: Request) -> str:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise QuotaExhausted("out of credit")
        return echo(request)

    with pytest.raises(BatchFailed) as info:
        await llm_map(
            "{item}", range(100), model="m", provider=FakeProvider(handler), max_concurrency=1
        )
    assert info.value.result is not None
    assert (2, 97) == (len(info.value.result.ok), info.value.not_started)
    assert 3 == calls


@pytest.mark.slow
async def test_map_against_the_simulator_with_faults(clock: FakeClock) -> None:
    """1,000 items, RPM/TPM limits, 10% 500s and 2% hangs, on virtual time: every item
    ends as one result (or error record) in input order, each answer belongs to its item,
    no answer is paid twice, and the server saw exactly the attempts we made."""
    async with Simulator(
        rpm=600,
        tpm=150_000,
        errors={500: 0.1},
        hang=0.02,
        hang_seconds=3600,
        seed=3,
        clock=clock.time,
    ) as sim:
        retry = RetryPolicy(stop=stop_after_attempt(8), attempt_timeout=30)
        items = [f"document number {i}" for i in range(1000)]
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-sim") as provider:
            result = await llm_map(
                "{item}",
                items,
                model="gpt-4o-mini",
                provider=provider,
                max_tokens=64,
                limits=Limits(rpm=600, tpm=150_000),
                retry=retry,
                max_concurrency=128,
            )
        stats = sim.stats()
    assert 1000 == len(result)
    assert [] == [e for e in result.results if isinstance(e, ItemError)]
    for text, response in zip(items, result.ok, strict=True):
        assert response.text.startswith(f"[{content_tag(text)}]")
    assert 0 == stats.duplicates
    assert {} == dict(stats.rate_limited)
    assert stats.requests == sum(r.attempts for r in result.ok)
    # priced by the built-in gpt-4o-mini profile: $0.15 / $0.60 per million tokens
    expected = sum(r.usage.input_tokens * 0.15 + r.usage.output_tokens * 0.60 for r in result.ok)
    assert expected / 1e6 == pytest.approx(sum(r.cost or 0.0 for r in result.ok))


async def test_usage_cost_and_budget_stop(clock: FakeClock) -> None:
    """Costs come from the model's prices; once max_cost is spent the batch stops as a
    fatal error, keeping what finished."""
    from llmbatch.config import ModelProfile

    profile = ModelProfile(provider="fake", model="m", input_price=1000.0, output_price=1000.0)
    provider = FakeProvider(lambda request: "x" * 400)  # 100 output tokens
    client = LLMClient(
        provider,
        model="m",
        max_tokens=100,
        profiles={"fake/m": profile},
        max_cost=0.5,
        sleep=clock.sleep,
    )
    first = await client.complete("hello there")  # 2 + 100 tokens at $1000/M
    assert 0.102 == pytest.approx(first.cost)
    with pytest.raises(BatchFailed) as info:
        await client.map([Request.from_prompt(f"item {i}") for i in range(50)], max_concurrency=8)
    assert "BudgetExhausted" == info.value.error.error_type
    assert info.value.result is not None
    stats = client.statistics()
    # Each call reserves its bound, (17 prompt bytes + 100) tokens = $0.117, while in
    # flight: 0.102 + 3 x 0.1015 + 0.117 = 0.52 > 0.5, so a fourth never starts, even
    # with 8 allowed at once. The budget is never exceeded.
    assert 4 == stats.succeeded
    assert stats.cost is not None
    assert 0.4 < stats.cost <= 0.5


async def test_imap_streams_outcomes_with_their_index(clock: FakeClock) -> None:
    """llmbatch.imap yields one outcome per item as it finishes, errors included."""
    from llmbatch.api import imap

    outcomes = []
    async with imap("{item}", ["a", " ", "c"], model="m", provider=FakeProvider(echo)) as stream:
        async for outcome in stream:
            outcomes.append(outcome)
    assert [0, 1, 2] == sorted(o.index for o in outcomes)
    assert [1] == [o.index for o in outcomes if not o.ok]


def test_map_sync_outside_and_inside_a_running_loop() -> None:
    """map_sync works from plain code and from inside a running loop (a notebook)."""
    import asyncio

    from llmbatch.api import map_sync

    plain = map_sync("{item}", ["x", "y"], model="m", provider=FakeProvider(echo))
    assert ["echo: x", "echo: y"] == [r.text for r in plain.ok]

    async def notebook_cell() -> list[str]:
        result = map_sync("{item}", ["z"], model="m", provider=FakeProvider(echo))
        return [r.text for r in result.ok]

    assert ["echo: z"] == asyncio.run(notebook_cell())


async def test_llm_parallel_batch_node_uses_the_client(clock: FakeClock) -> None:
    """A ready LLM node: exec_async calls self.llm; order and failure policy apply."""
    from llmbatch.flow import LLMParallelBatchNode

    class Shout(LLMParallelBatchNode):
        async def prep_async(self, shared: dict[str, Any]) -> list[str]:
            return list(shared["words"])

        async def exec_async(self, word: str) -> str:
            return str((await self.llm.complete(word)).text).upper()

        async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> None:
            shared["out"] = exec_res

    node = Shout(LLMClient(FakeProvider(echo), model="m"), on_error="collect")
    shared: dict[str, Any] = {"words": ["a", "b", "c"]}
    await node.run_async(shared)
    assert ["ECHO: A", "ECHO: B", "ECHO: C"] == shared["out"]


async def test_cancelling_map_keeps_what_on_result_saw_and_leaves_no_task() -> None:
    """Ctrl-C (a cancelled task): items that finished were handed to on_result; nothing
    keeps running afterwards."""
    import asyncio

    saved: dict[int, Any] = {}
    gate = asyncio.Event()
    stuck = asyncio.Event()

    async def handler(request: Request) -> str:
        if request.messages[-1]["content"] == "item 3":
            stuck.set()
            await gate.wait()  # stuck until cancelled
        return echo(request)

    task = asyncio.create_task(
        llm_map(
            "item {item}",
            range(10),
            model="m",
            provider=FakeProvider(handler),
            max_concurrency=1,
            on_result=saved.__setitem__,
        )
    )
    await stuck.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [0, 1, 2] == sorted(saved)
    assert all(isinstance(saved[i], Response) for i in saved)
    assert {asyncio.current_task()} == asyncio.all_tasks()


async def test_map_honours_max_cost(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """llmbatch.map passes max_cost on: the batch stops once the budget is spent."""
    monkeypatch.setenv(
        "LLMBATCH_PROFILES", '{"fake/m": {"input_price": 1000, "output_price": 1000}}'
    )
    provider = FakeProvider(lambda request: "x" * 400)  # ~0.101 USD per call at these prices
    with pytest.raises(BatchFailed) as info:
        await llm_map(
            "item {item}",
            range(50),
            model="m",
            provider=provider,
            max_cost=0.3,
            max_tokens=100,
            max_concurrency=8,
        )
    assert "BudgetExhausted" == info.value.error.error_type
    # each call may cost up to ~$0.117 (prompt bytes + max_tokens): the third would not
    # fit what is left, even with 8 allowed at once; the budget is never exceeded
    assert 2 == len(provider.calls)
    assert info.value.result is not None
    assert sum(r.cost or 0.0 for r in info.value.result.ok) <= 0.3


async def test_embeddings_online_and_through_the_batch_api_agree() -> None:
    """``embed_many`` gives the same vectors online and through the Batch API (one
    ``/v1/embeddings`` batch), priced at half through the batch; a blank text is its
    own error; ``embed`` takes a plain string."""
    from llmbatch.models import EmbeddingRequest
    from llmbatch.testing.simulator import BatchSimConfig

    fast = BatchSimConfig(
        validating_seconds=0.01, seconds_per_request=0.001, finalizing_seconds=0.01
    )
    async with (
        Simulator(batch=fast) as sim,
        OpenAIProvider(base_url=sim.base_url, api_key="sk-test") as provider,
    ):
        client = LLMClient(
            provider, model="text-embedding-3-small", limits=Limits(rpm=100_000, tpm=10**8)
        )
        client.batch_poll_interval = 0.02
        texts = [f"text number {i}" for i in range(12)]
        online = await client.embed_many(texts)
        batched = await client.embed_many(
            [EmbeddingRequest(input=t, key=f"t{i}") for i, t in enumerate(texts)], mode="batch"
        )
        assert [e.vector for e in online.ok] == [e.vector for e in batched.ok]
        assert 12 == len(online.ok)
        assert [f"t{i}" for i in range(12)] == [e.key for e in batched.ok]
        for a, b in zip(online.ok, batched.ok, strict=True):
            assert a.cost is not None
            assert b.cost == pytest.approx(a.cost / 2)
        assert 1 == sim.stats().batch["openai_batches_created"]
        single = await client.embed("text number 0")
        assert online.ok[0].vector == single.vector
        with pytest.raises(ValueError, match="empty"):
            await client.embed("   ")


async def test_embed_needs_a_provider_that_embeds() -> None:
    """A provider without ``embed`` is refused with a clear error."""
    client = LLMClient(FakeProvider(echo), model="m")
    with pytest.raises(ValueError, match="cannot embed"):
        await client.embed("text")


# -- quotas shared through Redis (a real redis-server, real HTTP) --------------------------


def shared_client(base_url: str, quotas: LimiterSettings, limits: Limits) -> LLMClient:
    """A client of the simulator whose quotas are kept as *quotas* says."""
    provider = OpenAIProvider(base_url=base_url, api_key="sk-shared-quota-key-0001")
    return LLMClient(provider, model="gpt-4o-mini", max_tokens=8, limits=limits, limiter_url=quotas)


@pytest.mark.redis
async def test_clients_share_one_quota_through_redis(
    simulator_factory: SimulatorFactory, redis_url: str
) -> None:
    """Two clients naming the same redis:// URL (as two processes would) pace against
    one bucket: 60 requests between them use the server's whole RPM of 60 without a
    429, and each sees the other's spending."""
    sim = await simulator_factory(rpm=60)
    quotas = LimiterSettings(url=redis_url, namespace=f"test-{uuid.uuid4().hex}")
    limits = Limits(rpm=60, initial_fill=1.0, transit=0.0)
    first = shared_client(sim.base_url, quotas, limits)
    second = shared_client(sim.base_url, quotas, limits)
    try:
        ones = await first.map([Request.from_prompt(f"first {i}") for i in range(30)])
        twos = await second.map([Request.from_prompt(f"second {i}") for i in range(30)])
        assert (30, 30) == (len(ones.ok), len(twos.ok))
        limiter = first.limiter_for("gpt-4o-mini")
        assert isinstance(limiter, RedisRateLimiter)
        wait, permit = await limiter.try_acquire()  # the bucket is spent: both clients'
        assert permit is None
        assert 0 < wait <= 1.0
    finally:
        await first.aclose()
        await second.aclose()
    assert {} == dict(sim.stats().rate_limited)


@pytest.mark.redis
async def test_map_takes_the_shared_quota_from_the_environment(
    simulator_factory: SimulatorFactory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llmbatch.map with LLMBATCH_LIMITER_URL set keeps the quota in Redis, under the
    quota's name (the key only as its fingerprint), and closes its connections."""
    sim = await simulator_factory(rpm=600)
    namespace = f"test-{uuid.uuid4().hex}"
    monkeypatch.setenv("LLMBATCH_LIMITER_URL", redis_url)
    monkeypatch.setenv("LLMBATCH_LIMITER_NAMESPACE", namespace)
    key = "sk-environment-quota-key-0002"
    provider = OpenAIProvider(base_url=sim.base_url, api_key=key)
    result = await llm_map(
        "Summarize: {item}",
        ["tides", "moons"],
        model="gpt-4o-mini",
        provider=provider,
        limits=Limits(rpm=600),
    )
    await provider.aclose()
    assert 2 == len(result.ok)
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        name = quota_name("openai", "gpt-4o-mini", api_key=provider.quota_key)
        keys = [str(k) for k in await redis.keys(f"llmbatch:{namespace}:*")]
        assert [f"llmbatch:{namespace}:{name}"] == keys
        assert key not in name
        assert 2.0 == float(await redis.hget(keys[0], "rpm:taken") or 0)
    finally:
        await redis.aclose()


async def test_attempt_timeout_does_not_count_the_wait_for_the_limiter(clock: FakeClock) -> None:
    """RPM 60 from empty: the 10th request waits ~10 s for its turn, twice the 5 s
    attempt timeout, and still succeeds at its first attempt: only the provider's answer
    is timed, not the queue."""
    provider = FakeProvider(echo)
    limiter = RateLimiter(Limits(rpm=60, initial_fill=0.0, transit=0.0))
    client = LLMClient(
        provider,
        model="m",
        limiter=limiter,
        retry=RetryPolicy(attempt_timeout=5.0),
        sleep=clock.sleep,
    )
    result = await client.map([Request.from_prompt(f"q{i}") for i in range(10)])
    assert ([1] * 10, []) == ([r.attempts for r in result.ok], result.errors)
    assert clock.time() >= 100.0 + 10


class Reserving(FakeProvider):
    """A provider that reserves 500 output tokens per request; its answers use 50, and
    like OpenAI it keeps the reservation."""

    refunds_unused = False

    def admission(self, request: Request, model: str) -> Admission:
        return Admission(requests=1, output_tokens=500)

    def settlement(self, request: Request, response: Response) -> Admission:
        return Admission(output_tokens=50)


class Refunding(Reserving):
    """The same, but like Anthropic it counts only what the answer used."""

    refunds_unused = True


@pytest.mark.parametrize(("provider_class", "kept"), [(Refunding, 50), (Reserving, 500)])
async def test_the_client_settles_by_the_providers_refund_rule(
    clock: FakeClock, provider_class: type[Reserving], kept: int
) -> None:
    """With default limits, the unused part of a reservation comes back only for a
    provider whose rule says so."""
    limiter = RateLimiter(Limits(output_tpm=10_000, initial_fill=0.5, transit=0.0))
    client = LLMClient(provider_class(echo), model="m", limiter=limiter, sleep=clock.sleep)
    await client.complete("hello")
    assert 5_000.0 - kept == pytest.approx(limiter.statistics().available["output_tpm"])


class BrokenFeedback(RateLimiter):
    """A limiter whose server went away after admitting the request."""

    async def observe(self, headers: Any, permit: Any = None) -> None:
        raise ConnectionError("redis://:hunter2-secret@cache:6379 is unreachable")


async def test_a_failing_limiter_update_keeps_the_paid_answer(clock: FakeClock) -> None:
    """When telling the limiter about a response fails (the shared limiter's Redis went
    away), the answer already paid for is returned, with a warning that shows no
    password; nothing is retried."""

    def answer(request: Request) -> Response:
        return Response(text="paid for", headers={"x-ratelimit-remaining-requests": "5"})

    provider = FakeProvider(answer)
    client = LLMClient(provider, model="m", limiter=BrokenFeedback(Limits(rpm=60)))
    with capture_logs() as logs:
        response = await client.complete("hello")
    assert ("paid for", 1, 1) == (response.text, response.attempts, len(provider.calls))
    warnings = [e for e in logs if e["event"] == "limits.feedback_failed"]
    assert [("observe", "ConnectionError")] == [(e["step"], e["error_type"]) for e in warnings]
    assert "hunter2" not in str(warnings)


# -- a fatal stop keeps what the provider accepted; a provider that is gone -------------


async def test_quota_exhausted_mid_run_keeps_every_answer_the_provider_accepted(
    clock: FakeClock,
) -> None:
    """The key's quota runs out after 30 accepted requests while 20 are in flight
    (latencies 0.5-1.5 s, virtual time, real HTTP through the openai SDK). The batch
    stops at the first quota error, but every request the provider had accepted is
    awaited: all 30 answers are kept (before, those still in flight were cancelled
    and paid for again by a rerun), nothing new is sent after the stop, and the
    items not answered are not marked failed by the client."""

    def quota_after_30(info: RequestInfo) -> Fault | None:
        if info.nth > 30:
            return Fault(status=429, error_type="insufficient_quota")
        return None

    async with Simulator(
        ttft=1.0, jitter=0.5, seed=7, script=quota_after_30, clock=clock.time
    ) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-sim") as provider:
            with pytest.raises(BatchFailed) as info:
                await llm_map(
                    "{item}",
                    [f"document {i}" for i in range(100)],
                    model="gpt-4o-mini",
                    provider=provider,
                    max_tokens=16,
                    limits=Limits(rpm=100_000),
                    max_concurrency=20,
                )
        stats = sim.stats()
    assert info.value.reason == "fatal"
    assert info.value.result is not None
    answered = info.value.result.ok
    assert 30 == stats.ok == len(answered)
    for response in answered:
        assert response.text.startswith("[")
    sent_after_stop = stats.requests - 30  # the quota errors: requests already out
    assert sent_after_stop <= 20
    assert all(
        e.error_type in ("QuotaExhausted", "CancelledError") for e in info.value.result.errors
    )


def refused(request: Request) -> str:
    raise ConnectionFailed("connection failed: [Errno 111] Connection refused", connect=True)


async def test_an_unreachable_provider_stops_the_batch_within_seconds(clock: FakeClock) -> None:
    """Every connection is refused: instead of 500 items x 6 attempts over minutes, the
    client raises ProviderUnreachable (fatal) after a short streak of failed
    connections spanning a couple of seconds; the items are not failed one by one."""
    provider = FakeProvider(refused)
    client = LLMClient(provider, model="m", sleep=clock.sleep)
    started = clock.time()
    with pytest.raises(BatchFailed) as info:
        await client.map([Request.from_prompt(f"item {i}") for i in range(500)], max_concurrency=8)
    assert "ProviderUnreachable" == info.value.error.error_type
    assert "Connection refused" in info.value.error.message
    assert clock.time() - started < 30
    assert len(provider.calls) < 100
    assert info.value.result is not None
    failed = [e for e in info.value.result.errors if e.error_type == "ConnectionFailed"]
    assert [] == failed


async def test_one_item_whose_every_attempt_fails_to_connect_is_the_provider_gone(
    clock: FakeClock,
) -> None:
    """One item alone (concurrency 1): when all its attempts fail to connect, with
    nothing answered in between, the error is ProviderUnreachable, not that item's
    ConnectionFailed (a record marked failed that a rerun would not send again)."""
    client = LLMClient(
        FakeProvider(refused),
        model="m",
        sleep=clock.sleep,
        retry=RetryPolicy(stop=stop_after_attempt(3)),
    )
    with pytest.raises(ProviderUnreachable):
        await client.complete("hello")


async def test_a_short_blip_of_refused_connections_is_ridden_out(clock: FakeClock) -> None:
    """Six refused connections within a second, then the server is back: the items
    are retried and answered; nothing stops."""
    refusals = 6

    def flaky(request: Request) -> str:
        nonlocal refusals
        if refusals > 0:
            refusals -= 1
            return refused(request)
        return echo(request)

    client = LLMClient(
        FakeProvider(flaky),
        model="m",
        sleep=clock.sleep,
        retry=RetryPolicy(wait=wait_fixed(0.1), stop=stop_after_attempt(6)),
    )
    result = await client.map([Request.from_prompt(f"item {i}") for i in range(6)])
    assert 6 == result.succeeded


async def test_the_client_times_out_a_hung_request_by_default(clock: FakeClock) -> None:
    """With no timeout given, an attempt waits DEFAULT_TIMEOUT (120 s), not the SDK's
    600 s, then counts as a retried Timeout; ``timeout=`` and the retry policy's
    attempt_timeout change it."""
    from llmbatch.client import DEFAULT_TIMEOUT

    hung = 1

    async def hang_once(request: Request) -> str:
        nonlocal hung
        if hung:
            hung -= 1
            await asyncio.sleep(3600)
        return echo(request)

    client = LLMClient(FakeProvider(hang_once), model="m", sleep=clock.sleep)
    started = clock.time()
    response = await client.complete("hi")
    assert (2, DEFAULT_TIMEOUT) == (response.attempts, 120.0)
    assert DEFAULT_TIMEOUT <= clock.time() - started < DEFAULT_TIMEOUT + 5
    assert 30.0 == LLMClient(FakeProvider(echo), timeout=30.0).timeout
    assert 5.0 == LLMClient(FakeProvider(echo), retry=RetryPolicy(attempt_timeout=5.0)).timeout
    assert LLMClient(FakeProvider(echo), timeout=None).timeout is None


async def test_a_models_configured_timeout_applies_unless_the_client_sets_one() -> None:
    """The profile's ``timeout`` bounds that model's attempts; an explicit client
    ``timeout`` wins over it."""
    from llmbatch.config import ModelProfile

    profiles = {"fake/slow": ModelProfile(provider="fake", model="slow", timeout=900.0)}
    configured = LLMClient(FakeProvider(echo), model="slow", profiles=profiles)
    assert (900.0, 120.0) == (configured.timeout, configured.timeout_for("other"))
    explicit = LLMClient(FakeProvider(echo), model="slow", profiles=profiles, timeout=10.0)
    assert 10.0 == explicit.timeout


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Summarize: {text}", ["text"]),
        ("{title}: {text} ({title})", ["title", "text"]),
        ("{doc[title]} and {doc[body]!r:>{width}}", ["doc", "width"]),
        ("literal {{braces}} only", []),
    ],
)
def test_template_fields(template: str, expected: list[str]) -> None:
    """The record fields a template names, once each, in order."""
    from llmbatch.client import template_fields

    assert expected == template_fields(template)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Summarize: {text", "malformed"),
        ("a } b", "malformed"),
        ("{} and {0}", "positional field"),
        ("{text!x}", "unknown conversion"),
        ("{text.upper}", "reads an attribute"),
    ],
)
def test_template_fields_refuses_what_no_record_can_fill(template: str, message: str) -> None:
    """A malformed template, or a positional field, is one clear ValueError."""
    from llmbatch.client import template_fields

    with pytest.raises(ValueError, match=message):
        template_fields(template)


async def test_with_no_cap_the_requests_in_flight_follow_the_limits(clock: FakeClock) -> None:
    """RPM 10,000 and ~1 s answers, no max_concurrency: far more than the old fixed 64
    requests are in flight (Little's law sizes it), so 2,000 requests take seconds of
    virtual time, not 2,000 / 64 = 31 s; no 429, every answer its own."""
    async with Simulator(rpm=10_000, ttft=1.0, jitter=0.1, seed=2, clock=clock.time) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-sim") as provider:
            client = LLMClient(provider, model="gpt-4o-mini", max_tokens=16)
            started = clock.time()
            result = await client.map(
                [Request.from_prompt(f"document {i}") for i in range(2000)], on_error="collect"
            )
            took = clock.time() - started
            target = client.statistics().in_flight_target
        stats = sim.stats()
    assert 2000 == result.succeeded
    assert {} == dict(stats.rate_limited)
    assert stats.max_concurrent > 64
    assert took < 8.0
    assert target is not None
    assert target.rate == pytest.approx(10_000 / 60)
    assert "req/s" in target.reason


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param(Limits(rpm=10_000, tpm=10_000_000), id="explicit"),
        pytest.param(None, id="profile"),  # gpt-4o-mini's built-in 500 RPM estimate
    ],
)
async def test_a_high_tier_key_with_a_six_second_bucket_runs_at_its_limit(
    clock: FakeClock, limits: Limits | None
) -> None:
    """RPM 10,000 enforced over 6 s (the server holds 1,000 at once), ~1 s answers,
    default arguments. Whether the limits are given, learned, or start from the
    model's 500 RPM profile: no 429, and 2,000 requests take close to the least
    possible time, 1 s + (2,000 - 1,000) / 166.7 per s = 7 s (virtual): at most the
    round trip that tells the limits (~1 s, its refill lost) more."""
    async with Simulator(
        rpm=10_000,
        tpm=10_000_000,
        bucket_seconds=6,
        ttft=1.0,
        jitter=0.1,
        seed=2,
        clock=clock.time,
    ) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-sim") as provider:
            client = LLMClient(provider, model="gpt-4o-mini", max_tokens=128, limits=limits)
            started = clock.time()
            result = await client.map(
                [Request.from_prompt(f"document {i}") for i in range(2000)], on_error="collect"
            )
            took = clock.time() - started
        stats = sim.stats()
    assert 2000 == result.succeeded
    assert {} == dict(stats.rate_limited)
    assert took < 7.0 + 1.2
