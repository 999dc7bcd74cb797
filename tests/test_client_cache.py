"""The response cache and the in-job dedupe through the client and ``llmbatch.map``:
what is sent, what is served, what it costs, and the policies."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

import llmbatch
from llmbatch.cache import CachePolicy, SQLiteCache
from llmbatch.client import LLMClient
from llmbatch.config import ModelProfile
from llmbatch.models import Request, Response
from llmbatch.providers.fake import FakeProvider

#: a tenth of a cent per token: every answer has a visible price
PRICED = {
    "fake/m": ModelProfile(provider="fake", model="m", input_price=1_000.0, output_price=1_000.0)
}


def upper(request: Request) -> str:
    return str(request.messages[-1]["content"]).upper()


def client(provider: FakeProvider, **options: object) -> LLMClient:
    return LLMClient(provider, model="m", profiles=PRICED, **options)  # type: ignore[arg-type]


async def test_a_second_client_is_served_from_the_cache(tmp_path: Path) -> None:
    """Two jobs over one SQLite file: the second sends nothing, its answers cost 0 and
    say so, and the statistics count the hits and what they saved."""
    path = tmp_path / "responses.sqlite"
    first = FakeProvider(upper)
    async with client(first, cache=str(path)) as llm:
        paid = [await llm.complete(f"doc {i}") for i in range(5)]
    second = FakeProvider(upper)
    async with client(second, cache=str(path)) as llm:
        served = [await llm.complete(f"doc {i}") for i in range(5)]
        stats = llm.statistics()
    assert (5, 0) == (len(first.calls), len(second.calls))
    assert [r.text for r in paid] == [r.text for r in served]
    assert all(r.cached and r.cost == 0.0 for r in served)
    assert (5, 5) == (stats.succeeded, stats.cache_hits)
    assert stats.saved_cost == pytest.approx(sum(r.cost or 0.0 for r in paid))
    assert stats.cost is None or stats.cost == 0.0


async def test_what_changes_the_answer_misses(tmp_path: Path) -> None:
    """Another max_tokens is another request; the item's key is not part of it."""
    cache = SQLiteCache(tmp_path / "c.sqlite")
    provider = FakeProvider(upper)
    async with client(provider, cache=cache) as llm:
        await llm.complete(Request.from_prompt("doc", key="a"))
        await llm.flush()  # the answer is written in the background
        hit = await llm.complete(Request.from_prompt("doc", key="b"))
        await llm.complete(Request.from_prompt("doc", key="c", max_tokens=5))
    assert 2 == len(provider.calls)
    assert hit.cached
    assert "b" == hit.key


async def test_samples_are_not_cached_unless_asked(tmp_path: Path) -> None:
    provider = FakeProvider(upper)
    async with client(provider, cache=str(tmp_path / "c.sqlite"), dedupe=True) as llm:
        for _ in range(2):
            await llm.complete(Request.from_prompt("poem", temperature=0.9))
    assert 2 == len(provider.calls)
    provider = FakeProvider(upper)
    policy = CachePolicy(cache_sampled=True)
    async with client(provider, cache=str(tmp_path / "d.sqlite"), cache_policy=policy) as llm:
        for _ in range(2):
            await llm.complete(Request.from_prompt("poem", temperature=0.9))
            await llm.flush()
    assert 1 == len(provider.calls)


@pytest.mark.parametrize(
    ("mode", "second_run_calls", "stored_after"),
    [("read-write", 0, True), ("read-only", 3, False), ("refresh", 3, True)],
)
async def test_cache_modes(
    tmp_path: Path, mode: str, second_run_calls: int, stored_after: bool
) -> None:
    """read-only serves but never stores; refresh never serves but stores."""
    path = tmp_path / "c.sqlite"
    policy = CachePolicy(mode=mode)  # type: ignore[arg-type]
    if mode != "read-only":
        async with client(FakeProvider(upper), cache=str(path)) as llm:
            for i in range(3):
                await llm.complete(f"doc {i}")
    provider = FakeProvider(upper)
    async with client(provider, cache=str(path), cache_policy=policy) as llm:
        for i in range(3):
            await llm.complete(f"doc {i}")
    assert second_run_calls == len(provider.calls)
    async with SQLiteCache(path) as check:
        stats = check.statistics()
        assert stats.hits == 0
        found = await check.get(
            CachePolicy().key_for(Request.from_prompt("doc 0", model="m"), provider="fake") or ""
        )
    assert stored_after == (found is not None)


async def test_identical_requests_in_flight_are_sent_once() -> None:
    """Dedupe: ten identical requests at once make one call; every caller gets the
    answer (cost 0 for the copies), and the copies are counted."""
    release = asyncio.Event()

    async def slow(request: Request) -> str:
        await release.wait()
        return "ANSWER"

    provider = FakeProvider(slow)
    llm = client(provider, dedupe=True)
    tasks = [asyncio.create_task(llm.complete("same")) for _ in range(10)]
    await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(*tasks)
    assert 1 == len(provider.calls)
    assert ["ANSWER"] * 10 == [a.text for a in answers]
    assert 9 == sum(a.cached for a in answers)
    assert (10, 9) == (llm.statistics().succeeded, llm.statistics().duplicates)


async def test_a_failed_first_request_lets_the_duplicates_try() -> None:
    calls = 0

    def flaky(request: Request) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise llmbatch.BadRequest("the first one fails")
        return "ok"

    llm = client(FakeProvider(flaky), dedupe=True)
    results = await asyncio.gather(
        llm.complete("same"), llm.complete("same"), return_exceptions=True
    )
    assert isinstance(results[0], llmbatch.BadRequest)
    assert isinstance(results[1], Response)
    assert "ok" == results[1].text


async def test_map_sends_each_distinct_document_once() -> None:
    """``llmbatch.map`` dedupes by default: 30% duplicate documents are 70% of the
    requests, and every item still gets its answer in input order."""
    provider = FakeProvider(upper)
    docs = [{"text": f"doc {i % 70}"} for i in range(100)]
    result = await llmbatch.map("{text}", docs, model="m", provider=provider)
    assert 70 == len(provider.calls)
    assert [f"DOC {i % 70}" for i in range(100)] == [r.text for r in result.ok]


class Reading(BaseModel):
    summary: str


async def test_typed_answers_from_the_cache_are_parsed_again(tmp_path: Path) -> None:
    answer = json.dumps({"summary": "s"})
    path = str(tmp_path / "c.sqlite")
    async with client(FakeProvider(lambda r: answer), cache=path) as llm:
        await llm.complete(Request.from_prompt("x", response_model=Reading))
    provider = FakeProvider(lambda r: answer)
    async with client(provider, cache=path) as llm:
        served = await llm.complete(Request.from_prompt("x", response_model=Reading))
    assert 0 == len(provider.calls)
    assert Reading(summary="s") == served.parsed


async def test_a_corrupt_cache_file_is_a_miss_not_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    provider = FakeProvider(upper)
    async with client(provider, cache=str(path)) as llm:
        answer = await llm.complete("doc")
    assert ("DOC", 1) == (answer.text, len(provider.calls))


def test_pandas_goes_through_the_cache(tmp_path: Path) -> None:
    """``df.llm.map(..., cache=PATH)``: a second data job over the same rows is served
    from the first's answers."""
    pd = pytest.importorskip("pandas")
    import llmbatch.integrations.pandas  # noqa: F401  (registers df.llm)

    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    path = str(tmp_path / "c.sqlite")
    first, second = FakeProvider(upper), FakeProvider(upper)
    out1 = frame.llm.map("{text}", model="m", provider=first, cache=path)
    out2 = frame.llm.map("{text}", model="m", provider=second, cache=path)
    assert (3, 0) == (len(first.calls), len(second.calls))
    assert list(out1["llm_answer"]) == list(out2["llm_answer"])


async def test_clients_sharing_a_redis_cache_never_send_the_same_request_twice(
    redis_url: str,
) -> None:
    """Four clients (each its own Redis connection, as four processes have) ask the same
    20 questions at once: each question is sent once in all; the others wait for its
    answer and are served from the cache."""
    import uuid

    from llmbatch.cache import RedisCache

    namespace = f"claims-{uuid.uuid4().hex}"
    release = asyncio.Event()

    async def slow(request: Request) -> str:
        await release.wait()
        return upper(request)

    providers = [FakeProvider(slow) for _ in range(4)]
    clients = [client(p, cache=RedisCache(redis_url, namespace=namespace)) for p in providers]
    jobs = [
        asyncio.create_task(llm.complete(f"question {i}")) for i in range(20) for llm in clients
    ]
    await asyncio.sleep(0.2)
    release.set()
    answers = await asyncio.gather(*jobs)
    for llm in clients:
        await llm.aclose()
        assert llm.cache is not None
        await llm.cache.aclose()  # passed in: the caller closes it
    assert 20 == sum(len(p.calls) for p in providers)
    sent = [str(r.messages[-1]["content"]) for p in providers for r in p.calls]
    assert sorted(sent) == sorted(f"question {i}" for i in range(20))
    assert all(a.text == f"QUESTION {i // 4}" for i, a in enumerate(answers))
    assert 60 == sum(a.cached for a in answers)


async def test_an_answer_stored_between_lookup_and_claim_is_not_sent_again(
    redis_url: str,
) -> None:
    """Another process stores its answer and gives up its claim after this client's
    lookup missed but before its claim: the claim wins, yet the client looks once more
    and serves the stored answer instead of sending the request a second time."""
    import uuid

    from llmbatch.cache import RedisCache

    namespace = f"race-{uuid.uuid4().hex}"
    other = RedisCache(redis_url, namespace=namespace)

    class LateClaim(RedisCache):
        async def claim(self, key: str, *, seconds: float) -> bool:
            await other.put(key, Response(text="from the other process", cost=0.5))
            return await super().claim(key, seconds=seconds)

    provider = FakeProvider(upper)
    late = LateClaim(redis_url, namespace=namespace)
    async with client(provider, cache=late) as llm:
        answer = await llm.complete("question")
        stats = llm.statistics()
    await late.aclose()
    await other.aclose()
    assert [] == provider.calls
    assert ("from the other process", True) == (answer.text, answer.cached)
    assert 1 == stats.cache_hits
    checker = RedisCache(redis_url, namespace=namespace)
    assert await checker.claim("k-unrelated", seconds=1.0)  # the server is usable
    # the claim this client won was given up: another process may claim the key
    key = llm._cache_key(llm._with_defaults(Request.from_prompt("question")))
    assert key is not None
    assert await checker.claim(key, seconds=1.0)
    await checker.aclose()


async def test_another_server_with_the_same_model_name_is_another_answer() -> None:
    """The provider's server is part of the key: an answer from a local
    OpenAI-compatible server is never served for OpenAI's model of the same name."""
    from llmbatch.cache import MemoryCache
    from llmbatch.providers.openai import OpenAIProvider

    shared = MemoryCache()
    request = Request.from_prompt("doc", model="gpt-4o-mini")

    def at(url: str) -> LLMClient:
        return LLMClient(OpenAIProvider(base_url=url, api_key="sk-test"), cache=shared)

    first = at("http://127.0.0.1:9/v1")
    first.store(request, Response(text="from the local server"))
    await first.flush()
    assert await at("http://127.0.0.1:10/v1").lookup(request) is None
    again = await at("http://127.0.0.1:9/v1").lookup(request)
    assert again is not None
    assert "from the local server" == again.text


def test_one_memory_cache_serves_every_map_call_of_a_notebook() -> None:
    """A cache object passed in is the caller's: the clients ``llmbatch.map`` opens and
    closes leave it open, so a second call over the same prompts sends nothing."""
    from llmbatch.cache import MemoryCache

    cache = MemoryCache()
    first, second = FakeProvider(upper), FakeProvider(upper)
    notes = [{"text": f"note {i}"} for i in range(4)]
    paid = llmbatch.map_sync("{text}", notes, model="m", provider=first, cache=cache)
    served = llmbatch.map_sync("{text}", notes, model="m", provider=second, cache=cache)
    assert (4, 0) == (len(first.calls), len(second.calls))
    assert [r.text for r in paid.ok] == [r.text for r in served.ok]
    assert 4 == len(served.ok)
    assert 4 == cache.statistics().hits


async def test_identical_requests_at_once_with_a_cache_are_sent_once(tmp_path: Path) -> None:
    """Five identical requests at once through a client with a cache (whose lookup
    awaits) and dedupe: one request is sent, and all five get its answer (before, the
    ones that looked the cache up together each took the in-flight slot and the job
    failed them with a KeyError)."""
    provider = FakeProvider(upper)
    async with client(provider, cache=str(tmp_path / "c.sqlite"), dedupe=True) as llm:
        answers = await asyncio.gather(*(llm.complete("same question") for _ in range(5)))
        stats = llm.statistics()
    assert 1 == len(provider.calls)
    assert ["SAME QUESTION"] * 5 == [a.text for a in answers]
    assert (5, 4) == (stats.succeeded, stats.duplicates)


def test_one_redis_cache_object_serves_map_calls_in_separate_event_loops(
    redis_url: str,
) -> None:
    """``map_sync`` runs each call in its own event loop: a ``RedisCache`` made from a
    URL opens its connections anew in each, so the second call is served from the
    first's answers (before, it reused the first loop's dead connections and fell back
    to no cache)."""
    import uuid

    from llmbatch.cache import RedisCache

    cache = RedisCache(redis_url, namespace=f"loops-{uuid.uuid4().hex}")
    first, second = FakeProvider(upper), FakeProvider(upper)
    notes = [{"text": f"loop note {i}"} for i in range(3)]
    llmbatch.map_sync("{text}", notes, model="m", provider=first, cache=cache)
    served = llmbatch.map_sync("{text}", notes, model="m", provider=second, cache=cache)
    assert (3, 0) == (len(first.calls), len(second.calls))
    assert 3 == sum(r.cached for r in served.ok)
    assert 0 == cache.statistics().errors
