"""Tests for llmbatch.cache: the key, the policy, and the three backends (a real SQLite
file, a real redis-server started by conftest, memory) under one contract.

Time never passes for real: every backend takes ``clock=``, and a FakeClock moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from llmbatch.cache import (
    CachedResponse,
    CachePolicy,
    CacheStatistics,
    MemoryCache,
    RedisCache,
    ResponseCache,
    SQLiteCache,
    cache_key,
    default_cache_path,
    open_cache,
    sampled,
)
from llmbatch.models import Request, Response, Usage
from llmbatch.testing import FakeClock

#: a wall-clock reading (the cache stores epoch seconds)
EPOCH = 1_700_000_000.0

MESSAGES = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Summarize: the cat sat on the mat."},
]


def ask(**changes: Any) -> Request:
    """The base request of the key tests, with *changes*."""
    options: dict[str, Any] = {
        "messages": MESSAGES,
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "temperature": 0.0,
    }
    options.update(changes)
    return Request(**options)


def answer(text: str = "cat", **changes: Any) -> Response:
    """A provider's answer, every field the cache keeps set."""
    options: dict[str, Any] = {
        "text": text,
        "model": "gpt-4o-mini-2024-07-18",
        "usage": Usage(input_tokens=1200, output_tokens=3, cached_tokens=1024),
        "finish_reason": "stop",
        "request_id": "req_123",
        "latency": 0.8,
        "attempts": 2,
        "parsed": {"word": "cat"},
        "key": "row-7",
        "cost": 0.0025,
        "headers": {"x-ratelimit-remaining-requests": "99"},
    }
    options.update(changes)
    return Response(**options)


def warnings_of(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """The WARNING entries of captured *logs*."""
    return [entry for entry in logs if entry["log_level"] == "warning"]


# --- the key -----------------------------------------------------------------------------

#: the key of ask() for provider "openai": a change here invalidates every cache
GOLDEN = "30aeec7f859bba2fd855549e607d75811b62f689f350006c5980d7abd0df613f"


def test_the_key_of_a_fixed_request_is_pinned() -> None:
    """The key's recipe does not drift: a change of it must be deliberate (and bump
    KEY_VERSION), since it makes every stored answer unreachable."""
    assert GOLDEN == cache_key(ask(), provider="openai")


async def test_the_key_is_the_same_in_another_process() -> None:
    """No hash(), no dict order: a process with another hash seed computes the same key."""
    script = (
        "from llmbatch.cache import cache_key\n"
        "from llmbatch.models import Request\n"
        f"r = Request(messages={MESSAGES!r}, model='gpt-4o-mini', max_tokens=64, "
        "temperature=0.0)\n"
        "print(cache_key(r, provider='openai'))\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    out, _ = await child.communicate()
    assert (0, GOLDEN) == (child.returncode, out.decode().strip())


#: each changes the answer, so each must change the key
DIFFERENT: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "model": ({"model": "gpt-4o"}, {}),
    "a message": ({"messages": [*MESSAGES[:1], {"role": "user", "content": "Other."}]}, {}),
    "message order": ({"messages": MESSAGES[::-1]}, {}),
    "a role": ({"messages": [{**MESSAGES[0], "role": "developer"}, MESSAGES[1]]}, {}),
    "max_tokens": ({"max_tokens": 65}, {}),
    "no max_tokens": ({"max_tokens": None}, {}),
    "temperature": ({"temperature": 0.2}, {}),
    "no temperature": ({"temperature": None}, {}),
    "n": ({"n": 2}, {}),
    "json mode": ({"response_format": {"type": "json_object"}}, {}),
    "a response model": (
        {"response_model": {"type": "object", "properties": {"word": {"type": "string"}}}},
        {},
    ),
    "a seed": ({"extra": {"seed": 7}}, {}),
    "top_p": ({"extra": {"top_p": 0.5}}, {}),
    "a beta header": ({"extra": {"extra_headers": {"anthropic-beta": "x-2025"}}}, {}),
    "provider": ({}, {"provider": "anthropic"}),
    "endpoint": ({}, {"endpoint": "http://localhost:8000/v1"}),
    "another endpoint": ({}, {"endpoint": "http://localhost:8001/v1"}),
}


def test_every_parameter_that_changes_the_answer_changes_the_key() -> None:
    """Model, messages (and their order), max_tokens, temperature, n, response_format,
    the response model's schema, extra parameters, provider and endpoint: each gives a
    key of its own."""
    keys = {"base": cache_key(ask(), provider="openai")}
    for name, (changes, where) in DIFFERENT.items():
        keys[name] = cache_key(ask(**changes), **{"provider": "openai", **where})
    assert len(keys) == len(set(keys.values())), keys


#: each leaves the answer as it is, so each must keep the key
SAME: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "the item's key": ({"key": "row-42"}, {}),
    "temperature 0 as an int": ({"temperature": 0}, {}),
    "dict key order": ({"messages": [dict(reversed(m.items())) for m in MESSAGES]}, {}),
    "a timeout": ({"extra": {"timeout": 30}}, {}),
    "an end user": ({"extra": {"user": "alice", "metadata": {"job": "x"}}}, {}),
    "a service tier": ({"extra": {"service_tier": "flex", "store": False}}, {}),
    "an API key header": (
        {"extra": {"extra_headers": {"Authorization": "Bearer sk-proj-abcdefgh12345678"}}},
        {},
    ),
    "an api-key query": ({"extra": {"extra_query": {"api-key": "secret-123"}}}, {}),
}


@pytest.mark.parametrize(("changes", "where"), SAME.values(), ids=SAME.keys())
def test_what_does_not_change_the_answer_keeps_the_key(
    changes: dict[str, Any], where: dict[str, Any]
) -> None:
    """The item's key, credentials, and transport or billing parameters are not keyed."""
    assert GOLDEN == cache_key(ask(**changes), **{"provider": "openai", **where})


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://user:sk-SECRET-password@api.example.com/v1",
        "HTTPS://API.example.com/v1/",
        "https://api.example.com/v1#fragment",
    ],
)
def test_the_endpoint_is_keyed_without_credentials_and_spelling(endpoint: str) -> None:
    """A base URL is keyed without its user and password (rotating a credential keeps
    the cache), its scheme and host case, a trailing slash or a fragment."""
    expected = cache_key(ask(), provider="openai", endpoint="https://api.example.com/v1")
    assert expected == cache_key(ask(), provider="openai", endpoint=endpoint)


def test_the_same_schema_gives_the_same_key() -> None:
    """A response model is keyed by its schema: the same schema twice, one key."""
    schema = {"type": "object", "properties": {"word": {"type": "string"}}}
    first = cache_key(ask(response_model=dict(schema)), provider="openai")
    assert first == cache_key(ask(response_model=dict(schema)), provider="openai")


def test_a_request_without_a_model_cannot_be_keyed() -> None:
    """``model=None`` means "the client's default": keyed as such, it would be shared by
    clients with different defaults. The client resolves it first."""
    with pytest.raises(ValueError, match="model"):
        cache_key(ask(model=None), provider="openai")


@pytest.mark.parametrize(
    "extra",
    [{"seed": object()}, {"stop": b"bytes"}, {"logit_bias": {1: 5}}, {"top_p": float("nan")}],
    ids=["object", "bytes", "int dict key", "nan"],
)
def test_a_parameter_without_a_stable_json_form_is_not_cached(extra: dict[str, Any]) -> None:
    """A value that has no one JSON spelling is refused rather than guessed at
    (``default=str`` would key an object by its address): the request is not cached."""
    with pytest.raises(TypeError):
        cache_key(ask(extra=extra), provider="openai")
    assert CachePolicy().key_for(ask(extra=extra), provider="openai") is None


# --- the policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reads", "writes"),
    [
        ("read-write", True, True),
        ("read-only", True, False),
        ("refresh", False, True),
        ("off", False, False),
    ],
)
def test_each_mode_reads_and_writes_as_documented(mode: Any, reads: bool, writes: bool) -> None:
    """refresh never serves and always stores; read-only never stores."""
    policy = CachePolicy(mode=mode)
    assert (reads, writes) == (policy.reads, policy.writes)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"temperature": 0.0}, False),
        ({"temperature": None}, False),
        ({"temperature": 0.7}, True),
        ({"temperature": 0.0, "n": 3}, True),
        ({"temperature": None, "extra": {"temperature": 1.0}}, True),
    ],
    ids=["zero", "unset", "positive", "n>1", "in extra"],
)
def test_a_request_asks_for_samples(changes: dict[str, Any], expected: bool) -> None:
    """Samples: an explicit temperature above 0 (also through ``extra``) or n > 1; an
    unset temperature is an answer asked for, not a sample."""
    assert expected == sampled(ask(**changes))


def test_samples_are_cached_only_when_asked() -> None:
    """A sampled request gets no key unless ``cache_sampled``; mode off gives none."""
    hot = ask(temperature=0.9)
    assert CachePolicy().key_for(hot, provider="openai") is None
    expected = cache_key(hot, provider="openai")
    assert expected == CachePolicy(cache_sampled=True).key_for(hot, provider="openai")
    assert GOLDEN == CachePolicy().key_for(ask(), provider="openai")
    assert CachePolicy(mode="off").key_for(ask(), provider="openai") is None


@pytest.mark.parametrize(
    "options", [{"mode": "write-only"}, {"ttl": 0}, {"ttl": -5.0}], ids=["mode", "zero", "neg"]
)
def test_a_policy_refuses_nonsense(options: dict[str, Any]) -> None:
    """An unknown mode or a ttl that is not positive is a ValueError at once."""
    with pytest.raises(ValueError):
        CachePolicy(**options)


def test_a_policy_is_copied_not_mutated() -> None:
    """``copy`` returns a changed policy and leaves the original alone."""
    policy = CachePolicy(ttl=60.0)
    assert CachePolicy(mode="refresh", ttl=60.0) == policy.copy(mode="refresh")
    assert "read-write" == policy.mode


# --- the value ---------------------------------------------------------------------------


def test_the_stored_value_keeps_the_answer_and_nothing_else() -> None:
    """Text, model, usage (cached tokens too), finish reason, refusal, cost and request
    id survive the round trip; parsed objects, headers, the item key, latency and
    attempts are not stored."""
    cached = CachedResponse.of(answer(refusal="no"), created=EPOCH, ttl=10.0)
    decoded = CachedResponse.decode(cached.encode())
    assert cached == decoded
    assert EPOCH + 10.0 == decoded.expires
    for absent in ("parsed", "headers", "row-7", "latency", "attempts", "99"):
        assert absent not in cached.encode()
    served = decoded.response(key="row-9")
    expected = Response(
        text="cat",
        model="gpt-4o-mini-2024-07-18",
        usage=Usage(input_tokens=1200, output_tokens=3, cached_tokens=1024),
        finish_reason="stop",
        request_id="req_123",
        attempts=0,
        refusal="no",
        key="row-9",
        cost=0.0,
    )
    assert expected == served


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe not utf-8",
        "not json",
        "[1, 2]",
        '{"v": 99, "text": "x"}',
        '{"v": 1, "text": 5}',
        '{"v": 1, "text": "x", "usage": {"input_tokens": -1}}',
        '{"v": 1, "text": "x", "cost": "free"}',
        '{"v": 1, "text": "x", "model": true}',
    ],
    ids=["bytes", "garbage", "list", "version", "text", "usage", "cost", "model"],
)
def test_a_value_that_is_not_an_answer_does_not_decode(data: str | bytes) -> None:
    """Garbage, another version or a field of the wrong type is a ValueError (a miss)."""
    with pytest.raises(ValueError):
        CachedResponse.decode(data)


# --- the contract, over every backend ----------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    """The wall clock the caches read (virtual)."""
    return FakeClock(start=EPOCH)


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def cache(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[ResponseCache]:
    """Each backend, empty, on the fake clock (Redis: a namespace of the test's own)."""
    opened: ResponseCache
    if request.param == "memory":
        opened = MemoryCache(clock=clock)
    elif request.param == "sqlite":
        opened = SQLiteCache(tmp_path / "cache" / "responses.sqlite", clock=clock)
    else:
        url = request.getfixturevalue("redis_url")
        opened = RedisCache(url, namespace=f"test-{uuid.uuid4().hex}", clock=clock)
    yield opened
    await opened.aclose()


async def test_an_answer_is_served_back(cache: ResponseCache) -> None:
    """put, then get: the answer's fields come back; a hit saves its cost."""
    assert await cache.get("k") is None
    assert await cache.put("k", answer())
    found = await cache.get("k")
    assert found is not None
    assert CachedResponse.of(answer(), created=EPOCH) == found
    assert CacheStatistics(hits=1, misses=1, writes=1, saved_cost=0.0025) == cache.statistics()


async def test_an_answer_expires_after_its_ttl(cache: ResponseCache, clock: FakeClock) -> None:
    """Stored for 60 s: served at 59 s, a miss at 60 s."""
    await cache.put("k", answer(), ttl=60.0)
    clock.advance(59.0)
    assert await cache.get("k") is not None
    clock.advance(1.0)
    assert await cache.get("k") is None


async def test_max_age_refuses_old_answers(cache: ResponseCache, clock: FakeClock) -> None:
    """A policy's ttl applies to answers stored without one too (max_age on reads)."""
    await cache.put("k", answer())
    clock.advance(3600.0)
    assert await cache.get("k", max_age=7200.0) is not None
    assert await cache.get("k", max_age=3600.0) is None


async def test_a_put_replaces_the_answer(cache: ResponseCache) -> None:
    """Storing again (refresh mode) replaces what was there."""
    await cache.put("k", answer("first"))
    await cache.put("k", answer("second"))
    found = await cache.get("k")
    assert "second" == (found.text if found else None)


async def test_an_answer_without_a_price_saves_nothing(cache: ResponseCache) -> None:
    """saved_cost counts only known costs."""
    await cache.put("a", answer(cost=None))
    await cache.put("b", answer(cost=0.5))
    await cache.get("a")
    await cache.get("b")
    assert 0.5 == cache.statistics().saved_cost


async def test_many_tasks_share_one_cache(cache: ResponseCache) -> None:
    """200 concurrent puts, then 400 concurrent gets (half of them misses): every answer
    lands under its own key and the counters add up."""
    async with asyncio.timeout(30):
        stored = await asyncio.gather(*(cache.put(f"k{i}", answer(f"a{i}")) for i in range(200)))
        found = await asyncio.gather(*(cache.get(f"k{i}") for i in range(400)))
    assert [True] * 200 == stored
    assert [f"a{i}" for i in range(200)] == [f.text for f in found[:200] if f is not None]
    assert [None] * 200 == found[200:]
    assert CacheStatistics(hits=200, misses=200, writes=200, saved_cost=0.5) == replace_cost(
        cache.statistics()
    )


def replace_cost(stats: CacheStatistics) -> CacheStatistics:
    """*stats* with saved_cost rounded (a sum of floats)."""
    return CacheStatistics(
        hits=stats.hits,
        misses=stats.misses,
        writes=stats.writes,
        errors=stats.errors,
        saved_cost=round(stats.saved_cost, 9),
    )


async def test_a_closed_cache_misses(cache: ResponseCache) -> None:
    """After aclose every lookup is a miss and every write is skipped: no exception."""
    await cache.put("k", answer())
    await cache.aclose()
    assert await cache.get("k") is None
    assert not await cache.put("k", answer())


# --- SQLite ------------------------------------------------------------------------------


async def test_sqlite_keeps_answers_across_instances(tmp_path: Path, clock: FakeClock) -> None:
    """A second cache on the same file (a new job) serves what the first stored, and
    the file is in WAL mode."""
    path = tmp_path / "c.sqlite"
    async with SQLiteCache(path, clock=clock) as first:
        await first.put("k", answer())
    async with SQLiteCache(path, clock=clock) as second:
        assert await second.get("k") is not None
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        assert ("wal",) == db.execute("PRAGMA journal_mode").fetchone()


async def test_expired_rows_are_pruned_when_the_file_opens(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Rows past their expiry are deleted by the next opening; others stay."""
    path = tmp_path / "c.sqlite"
    async with SQLiteCache(path, clock=clock) as first:
        await first.put("short", answer(), ttl=10.0)
        await first.put("long", answer(), ttl=1000.0)
    clock.advance(100.0)
    async with SQLiteCache(path, clock=clock) as second:
        assert await second.get("long") is not None
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        assert [("long",)] == db.execute("SELECT key FROM responses").fetchall()


async def test_another_process_writes_and_we_read(tmp_path: Path) -> None:
    """Two processes share one file: a subprocess stores an answer while this process
    has the file open, and this process serves it."""
    path = tmp_path / "shared.sqlite"
    script = (
        "import asyncio, sys\n"
        "from llmbatch.cache import SQLiteCache\n"
        "from llmbatch.models import Response\n"
        "async def main():\n"
        "    async with SQLiteCache(sys.argv[1]) as cache:\n"
        "        for i in range(50):\n"
        "            assert await cache.put(f'k{i}', Response(text=f'from {i}', cost=0.1))\n"
        "asyncio.run(main())\n"
    )
    async with SQLiteCache(path) as ours:
        assert await ours.get("k0") is None  # opened before the other process writes
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(path))
        assert 0 == await child.wait()
        found = [await ours.get(f"k{i}") for i in range(50)]
    assert [f"from {i}" for i in range(50)] == [f.text for f in found if f is not None]


async def test_a_corrupt_file_is_a_miss_with_one_warning(tmp_path: Path) -> None:
    """A file that is not a database: every lookup misses and every write is skipped,
    with one warning for twenty failures that says how to fix it; the file is not
    touched (it may be someone's data)."""
    path = tmp_path / "responses.sqlite"
    garbage = b"this is not a database " * 400
    path.write_bytes(garbage)
    with capture_logs() as logs:
        async with SQLiteCache(path, retry_interval=0.0) as cache:
            results = [await cache.get(f"k{i}") for i in range(10)]
            writes = [await cache.put(f"k{i}", answer()) for i in range(10)]
            stats = cache.statistics()
    assert ([None] * 10, [False] * 10) == (results, writes)
    assert CacheStatistics(misses=10, errors=20) == stats
    [warning] = warnings_of(logs)
    assert "cache.unavailable" == warning["event"]
    assert f"delete {path} to start afresh" in warning["detail"]
    assert garbage == path.read_bytes()


async def test_warnings_can_be_every_failure(tmp_path: Path) -> None:
    """``warn_every=0`` reports each failure (the rate limit is what keeps it to one)."""
    path = tmp_path / "responses.sqlite"
    path.write_bytes(b"garbage" * 1000)
    with capture_logs() as logs:
        async with SQLiteCache(path, retry_interval=0.0, warn_every=0.0) as cache:
            for i in range(3):
                await cache.get(f"k{i}")
    assert 3 == len(warnings_of(logs))


async def test_a_value_that_does_not_decode_is_a_miss(tmp_path: Path, clock: FakeClock) -> None:
    """One damaged row: a miss and a warning; the other rows are still served."""
    path = tmp_path / "c.sqlite"
    async with SQLiteCache(path, clock=clock) as cache:
        await cache.put("good", answer())
        await cache.put("bad", answer())
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE responses SET value = 'garbage{' WHERE key = 'bad'")
        with capture_logs() as logs:
            assert await cache.get("bad") is None
            assert await cache.get("good") is not None
        stats = cache.statistics()
    assert (1, 1, 1) == (stats.hits, stats.errors, len(warnings_of(logs)))


async def test_a_file_of_another_schema_is_a_miss(tmp_path: Path) -> None:
    """A cache written by another llmbatch version is not read (nor written)."""
    path = tmp_path / "c.sqlite"
    async with SQLiteCache(path) as cache:
        await cache.put("k", answer())
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE cache_meta SET value = '99' WHERE name = 'schema'")
    with capture_logs() as logs:
        async with SQLiteCache(path) as cache:
            assert await cache.get("k") is None
    assert 1 == len(warnings_of(logs))


async def test_another_programs_database_is_left_alone(tmp_path: Path) -> None:
    """A job's checkpoint given as the cache by mistake (shaped like one: a ``meta``
    table saying schema 1, and items): misses, skipped writes, a warning that does not
    advise deleting it, and the file is not changed."""
    path = tmp_path / "job.llmbatch.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema', '1')")
        db.execute("CREATE TABLE items (key TEXT PRIMARY KEY, response TEXT)")
    before = path.read_bytes()
    with capture_logs() as logs:
        async with SQLiteCache(path) as cache:
            assert await cache.get("k") is None
            assert not await cache.put("k", answer())
    [warning] = warnings_of(logs)
    assert "is not a response cache" in warning["detail"]
    assert "delete" not in warning["detail"]
    assert before == path.read_bytes()


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A cache file holding one answer ("k"), then held by another connection in
    exclusive locking mode (no other connection may even read it); call to release."""
    path = tmp_path / "c.sqlite"

    async def fill() -> None:
        async with SQLiteCache(path) as cache:
            await cache.put("k", answer())

    asyncio.run(fill())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    yield holder.close
    holder.close()


async def test_a_locked_file_is_a_miss_then_recovers(
    tmp_path: Path, locked: Callable[[], None]
) -> None:
    """Another connection holds the file exclusively: a miss after the short busy
    timeout, with one warning; once it lets go the answer is served again."""
    with capture_logs() as logs:
        async with SQLiteCache(
            tmp_path / "c.sqlite", busy_timeout=0.05, retry_interval=0.0
        ) as cache:
            assert await cache.get("k") is None
            assert not await cache.put("other", answer())
            locked()
            assert await cache.get("k") is not None
            stats = cache.statistics()
    assert CacheStatistics(hits=1, misses=1, errors=2, saved_cost=0.0025) == stats
    [warning] = warnings_of(logs)
    assert "locked" in warning["detail"]
    assert ["cache.recovered"] == [e["event"] for e in logs if e["log_level"] == "info"]


async def test_after_a_failure_the_file_is_left_alone(
    tmp_path: Path, locked: Callable[[], None]
) -> None:
    """Within retry_interval of a failure, lookups miss at once without touching the
    file (a locked cache costs one busy timeout, not one per request)."""
    async with SQLiteCache(tmp_path / "c.sqlite", busy_timeout=0.05) as cache:
        assert await cache.get("k") is None
        locked()
        assert [None] * 5 == [await cache.get("k") for _ in range(5)]
        assert CacheStatistics(misses=6, errors=1) == cache.statistics()


async def test_lookups_queued_behind_a_failure_do_not_each_wait(
    tmp_path: Path, locked: Callable[[], None]
) -> None:
    """Twenty concurrent lookups on a locked file: the first waits out the busy timeout
    and fails; those queued behind it in the cache's thread miss at once instead of
    waiting in turn (only one statement reached the file)."""
    async with SQLiteCache(tmp_path / "c.sqlite", busy_timeout=0.05) as cache:
        with capture_logs() as logs:
            found = await asyncio.gather(*(cache.get(f"k{i}") for i in range(20)))
        assert [None] * 20 == found
        assert CacheStatistics(misses=20, errors=1) == cache.statistics()
    assert ["cache.unavailable"] == [e["event"] for e in logs if e["log_level"] != "debug"]


async def test_a_writer_holding_the_lock_lets_readers_read(tmp_path: Path) -> None:
    """WAL: another process in the middle of a write transaction does not stop lookups;
    our own write waits the busy timeout, then is skipped."""
    path = tmp_path / "c.sqlite"
    async with SQLiteCache(path, busy_timeout=0.05) as cache:
        await cache.put("k", answer())
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            holder.execute("DELETE FROM responses")
            assert await cache.get("k") is not None
            with capture_logs():
                assert not await cache.put("other", answer())
        finally:
            holder.close()
        assert 1 == cache.statistics().errors


async def test_a_cache_opens_and_reads_while_another_process_writes(tmp_path: Path) -> None:
    """Opening an existing file writes nothing, so a new job reads its answers while
    another process holds the write lock."""
    path = tmp_path / "c.sqlite"
    async with SQLiteCache(path) as first:
        await first.put("k", answer())
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM responses")
        async with SQLiteCache(path, busy_timeout=0.05) as second:
            assert await second.get("k") is not None
    finally:
        holder.close()


async def test_a_waiting_statement_does_not_block_the_event_loop(
    tmp_path: Path, locked: Callable[[], None]
) -> None:
    """While a lookup waits on the lock (in the cache's thread), other tasks run."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with SQLiteCache(tmp_path / "c.sqlite", busy_timeout=0.2) as cache:
        task = asyncio.create_task(ticker())
        with capture_logs():
            assert await cache.get("k") is None
        task.cancel()
    assert ticks > 10


def test_the_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$XDG_CACHE_HOME when it is absolute; a relative one is ignored (as the spec says)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tmp_path / "llmbatch" / "responses.sqlite" == default_cache_path()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert default_cache_path().is_absolute()
    assert ("llmbatch", "responses.sqlite") == default_cache_path().parts[-2:]


# --- Redis -------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the session's redis-server (tests/conftest.py)."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def dead_url(password: str) -> str:
    """A redis:// URL with *password* of a port on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"redis://:{password}@127.0.0.1:{port}/0"


#: a password that must never show in a log line or a message
SECRET = "cache-SECRET-pw-8e2f"


@pytest.mark.redis
async def test_redis_keys_are_namespaced_and_expire(redis: Redis, clock: FakeClock) -> None:
    """Keys live under ``llmbatch:{namespace}:response:``; a ttl is a Redis expiry too.
    Another namespace does not see them. A client passed in is left open."""
    namespace = f"test-{uuid.uuid4().hex}"
    async with RedisCache(redis, namespace=namespace, clock=clock) as cache:
        await cache.put("k", answer(), ttl=60.0)
        await cache.put("forever", answer())
    key = f"llmbatch:{namespace}:response:k"
    assert 0 < await redis.pttl(key) <= 60_000
    assert -1 == await redis.pttl(f"llmbatch:{namespace}:response:forever")
    async with RedisCache(redis, namespace=namespace + "-other", clock=clock) as other:
        assert await other.get("k") is None
    assert await redis.ping()


@pytest.mark.redis
async def test_a_redis_value_that_does_not_decode_is_a_miss(redis: Redis, redis_url: str) -> None:
    """Something else under our key: a miss with one warning, not an exception."""
    namespace = f"test-{uuid.uuid4().hex}"
    await redis.set(f"llmbatch:{namespace}:response:k", b"\x00\xff")
    with capture_logs() as logs:
        async with RedisCache(redis_url, namespace=namespace) as cache:
            assert await cache.get("k") is None
            assert 1 == cache.statistics().errors
    assert 1 == len(warnings_of(logs))


@pytest.mark.redis
async def test_a_redis_that_is_down_is_a_miss(tmp_path: Path) -> None:
    """Nothing listens: lookups miss and writes are skipped, at once and with one
    warning; the URL's password shows nowhere (log, repr)."""
    url = dead_url(SECRET)
    with capture_logs() as logs:
        async with asyncio.timeout(10), RedisCache(url, retry_interval=0.0) as cache:
            assert [None] * 5 == [await cache.get(f"k{i}") for i in range(5)]
            assert not await cache.put("k", answer())
            shown = repr(cache)
    assert CacheStatistics(misses=5, errors=6) == cache.statistics()
    [warning] = warnings_of(logs)
    assert "cannot be used" in warning["detail"]
    assert "***" in warning["detail"]
    assert [] == [text for text in (str(logs), shown) if SECRET in text]


@pytest.mark.redis
async def test_a_redis_that_refuses_the_password_is_a_miss(
    redis_password_url: str, redis_password: str
) -> None:
    """A wrong password: a miss and a warning that shows neither password."""
    host = redis_password_url.rpartition("@")[2]
    url = f"redis://:{SECRET}@{host}"
    with capture_logs() as logs:
        async with RedisCache(url) as cache:
            assert await cache.get("k") is None
    assert 1 == len(warnings_of(logs))
    assert [] == [s for s in (SECRET, redis_password) if s in str(logs)]


@pytest.mark.redis
@pytest.mark.redis
async def test_the_right_password_works(redis_password_url: str) -> None:
    """The password-protected server, with its password: answers are stored and served."""
    async with RedisCache(redis_password_url, namespace=f"t-{uuid.uuid4().hex}") as cache:
        await cache.put("k", answer())
        assert await cache.get("k") is not None


# --- open_cache --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "off", "OFF", " off "])
def test_off_is_no_cache(spec: str | None) -> None:
    """``None`` and ``"off"``: no cache at all."""
    assert open_cache(spec) is None


def test_a_path_is_a_sqlite_file(tmp_path: Path) -> None:
    """A file path is that file; an existing folder gets responses.sqlite inside; a
    Path works as a string does. Nothing is created until the first use."""
    file = open_cache(str(tmp_path / "my.sqlite"))
    folder = open_cache(tmp_path)
    assert isinstance(file, SQLiteCache)
    assert isinstance(folder, SQLiteCache)
    assert (tmp_path / "my.sqlite", tmp_path / "responses.sqlite") == (file.path, folder.path)
    assert not (tmp_path / "my.sqlite").exists()


def test_default_is_the_user_cache_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``"default"`` is the SQLite file under the user's cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    opened = open_cache("default")
    assert isinstance(opened, SQLiteCache)
    assert default_cache_path() == opened.path


@pytest.mark.redis
async def test_urls_and_instances(redis_url: str) -> None:
    """redis:// is a RedisCache in the namespace given; ``"memory"`` a MemoryCache; a
    cache object is itself."""
    shared = open_cache(redis_url, namespace="jobs")
    assert isinstance(shared, RedisCache)
    assert "jobs" == shared.namespace
    await shared.aclose()
    assert isinstance(open_cache("memory"), MemoryCache)
    mine = MemoryCache()
    assert mine is open_cache(mine)


@pytest.mark.parametrize(
    "spec",
    ["sqlite:///tmp/x", "", f"redis://:{SECRET}@localhost:notaport/0"],
    ids=["scheme", "empty", "bad port"],
)
def test_a_spec_that_is_nothing_is_refused(spec: str) -> None:
    """An unknown scheme, an empty string or a broken Redis URL is a ValueError, and
    its message hides the password."""
    with pytest.raises(ValueError) as caught:
        open_cache(spec)
    assert SECRET not in str(caught.value)


def test_a_spec_of_another_type_is_refused() -> None:
    """Anything else is a TypeError."""
    with pytest.raises(TypeError):
        open_cache(42)  # type: ignore[arg-type]


# --- the [cache] table -------------------------------------------------------------------


def test_cache_settings_read_the_cache_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``[cache]`` setting lands in :class:`CacheSettings` and its policy;
    ``$LLMBATCH_CACHE`` names the location over the file's."""
    from llmbatch.cache import CacheSettings, cache_settings

    monkeypatch.delenv("LLMBATCH_CACHE", raising=False)
    config = tmp_path / "llmbatch.toml"
    config.write_text(
        '[cache]\nlocation = "memory"\nmode = "refresh"\nttl_hours = 2\n'
        'namespace = "team"\ncache_sampled = true\n'
    )
    settings = cache_settings(config)
    assert (
        CacheSettings(
            location="memory", mode="refresh", ttl=7200.0, namespace="team", cache_sampled=True
        )
        == settings
    )
    assert CachePolicy(mode="refresh", ttl=7200.0, cache_sampled=True) == settings.policy()
    assert isinstance(settings.open(), MemoryCache)
    assert settings.open("off") is None
    monkeypatch.setenv("LLMBATCH_CACHE", str(tmp_path / "env.sqlite"))
    assert str(tmp_path / "env.sqlite") == cache_settings(config).location


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ('colour = "red"', "unknown [cache] settings: ['colour']"),
        ("ttl_hours = 0", "ttl_hours must be a number > 0"),
        ('ttl_hours = "1"', "ttl_hours must be a number > 0"),
        ('mode = "sometimes"', "mode must be one of"),
        ("location = 3", "location must be a string"),
        ('cache_sampled = "yes"', "cache_sampled a boolean"),
    ],
)
def test_a_bad_cache_table_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, complaint: str
) -> None:
    from llmbatch.cache import cache_settings

    monkeypatch.delenv("LLMBATCH_CACHE", raising=False)
    config = tmp_path / "llmbatch.toml"
    config.write_text(f"[cache]\n{table}\n")
    with pytest.raises(ValueError, match=re.escape(complaint)):
        cache_settings(config)


def test_without_a_cache_table_nothing_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file, no variable: no location (the CLI then uses its default, the library
    none)."""
    from llmbatch.cache import cache_settings

    monkeypatch.delenv("LLMBATCH_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMBATCH_CONFIG", raising=False)
    assert None is cache_settings().location


async def test_the_sqlite_cache_keeps_under_its_size_bound(tmp_path: Path) -> None:
    """2,000 answers of ~1 KB into a cache bound to 200 KB: the answers never take much
    more than the bound (checked every 256 writes), the oldest went first, and the
    newest are all still served."""
    clock = FakeClock(start=1_000_000.0)
    path = tmp_path / "bounded.sqlite"
    async with SQLiteCache(path, max_bytes=200_000, clock=clock.time) as cache:
        for i in range(2000):
            clock.advance(1.0)
            await cache.put(f"k{i}", Response(text=f"{i:04d}" + "x" * 1000))
        newest = [await cache.get(f"k{i}") for i in range(1990, 2000)]
        oldest = await cache.get("k0")
    assert all(hit is not None for hit in newest)
    assert oldest is None
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        kept = db.execute("SELECT SUM(LENGTH(value)) FROM responses").fetchone()[0]
    assert 100 < rows < 2000
    # bound + what 256 writes add between two checks
    assert kept <= 200_000 + 256 * 1_200


def test_a_size_bound_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        SQLiteCache(tmp_path / "c.sqlite", max_bytes=0)
