"""Key pools and fallbacks (``llmbatch.providers.pool``) through ``llmbatch.map`` and
``LLMClient``, against the simulator over real HTTP with the official OpenAI SDK, on
virtual time (the simulator and the event loop share one FakeClock)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import llmbatch
from llmbatch.client import LLMClient
from llmbatch.config import BUILTIN_PROFILES
from llmbatch.failure import BatchFailed
from llmbatch.limits import Limits
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.providers.pool import Fallback, KeyPool
from llmbatch.testing import FakeClock, Fault, RequestInfo, Simulator
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig

MODEL = "gpt-4o-mini"
KEYS = ["sk-pool-aaaa", "sk-pool-bbbb", "sk-pool-cccc"]


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=1000.0)
    with fake.patch_loop():
        yield fake


def pool_at(sim: Simulator, keys: list[str] = KEYS) -> KeyPool:
    return KeyPool([OpenAIProvider(base_url=sim.base_url, api_key=k) for k in keys])


class Recorder:
    """A fault script that counts each key's requests and applies *fault* to some."""

    def __init__(self, fault: object = None) -> None:
        self.by_key: Counter[str] = Counter()
        self.fault = fault

    def __call__(self, info: RequestInfo) -> Fault | None:
        self.by_key[info.api_key] += 1
        return self.fault(info) if callable(self.fault) else None


async def paced_run(clock: FakeClock, keys: list[str], n: int) -> tuple[float, Recorder]:
    """*n* requests through a pool of *keys* (300 RPM each, enforced by the simulator
    per key): the virtual seconds they took, and each key's requests."""
    recorder = Recorder()
    async with (
        Simulator(rpm=300, clock=clock.time, script=recorder) as sim,
        pool_at(sim, keys) as pool,
    ):
        started = clock.time()
        result = await llmbatch.map(
            "{item}",
            [f"pooled {i}" for i in range(n)],
            model=MODEL,
            provider=pool,
            limits=Limits(rpm=300),
            max_tokens=8,
        )
        elapsed = clock.time() - started
        stats = sim.stats()
    assert (n, 0) == (len(result.ok), len(result.errors))
    assert {} == dict(stats.rate_limited)
    return elapsed, recorder


async def test_three_keys_carry_three_times_the_load_in_the_same_time(
    clock: FakeClock,
) -> None:
    """One key of 300 RPM takes its time over 600 requests; three such keys take no
    more than that over 1,800 (>= 0.95 of the pooled rate), spread evenly, no 429."""
    single, _ = await paced_run(clock, KEYS[:1], 600)
    pooled, recorder = await paced_run(clock, KEYS, 1800)
    assert single > 50  # paced: 300 beyond the first minute's burst
    assert pooled <= single / 0.95, (pooled, single)
    assert set(KEYS) == set(recorder.by_key)
    assert all(570 <= n <= 630 for n in recorder.by_key.values()), recorder.by_key


async def test_a_revoked_key_is_retired_and_the_others_finish(clock: FakeClock) -> None:
    """The second key is revoked after its 40th request (401 from then on): it is
    retired once, with one WARNING naming it only by fingerprint and last four
    characters, and every item is answered by the other two."""

    def revoke(info: RequestInfo) -> Fault | None:
        if info.api_key == KEYS[1] and recorder.by_key[KEYS[1]] > 40:
            return Fault(status=401)
        return None

    recorder = Recorder(revoke)
    async with (
        Simulator(rpm=600, clock=clock.time, script=recorder) as sim,
        pool_at(sim) as pool,
    ):
        with capture_logs() as logs:
            result = await llmbatch.map(
                "{item}",
                [f"revoked {i}" for i in range(300)],
                model=MODEL,
                provider=pool,
                limits=Limits(rpm=600),
                max_tokens=8,
            )
    assert (300, 0) == (len(result.ok), len(result.errors))
    retired = [e for e in logs if e["event"] == "pool.key_retired"]
    assert 1 == len(retired)
    assert ("bbbb", 2) == (retired[0]["key_hint"][-4:], retired[0]["keys_left"])
    assert all(KEYS[1] not in str(value) for e in logs for value in e.values())
    # after the retirement the revoked key saw at most the requests already on their way
    assert recorder.by_key[KEYS[1]] < 41 + 20


def unavailable_for_a_fifth(info: RequestInfo) -> Fault | None:
    """The primary model answers 503 to a fifth of the documents, every time."""
    text = str(info.body["messages"][-1]["content"])
    if info.model == MODEL and hashlib.sha256(text.encode()).digest()[0] % 5 == 0:
        return Fault(status=503, retry_after=0.5)
    return None


async def test_items_the_primary_cannot_answer_go_to_the_fallback(clock: FakeClock) -> None:
    """A primary model that answers 503 for 20% of the items (after its retries):
    every item answered; the fallback's answers name gpt-4o and cost gpt-4o's prices,
    the others gpt-4o-mini's."""
    texts = [f"document {i}" for i in range(200)]
    broken = {t for t in texts if hashlib.sha256(f"Summarize: {t}".encode()).digest()[0] % 5 == 0}
    assert 20 < len(broken) < 60
    async with (
        Simulator(clock=clock.time, script=unavailable_for_a_fifth) as sim,
        LLMClient(
            OpenAIProvider(base_url=sim.base_url, api_key="sk-fallback"),
            model=MODEL,
            limits=Limits(rpm=100_000),
            fallbacks=["gpt-4o"],
        ) as client,
    ):
        result = await client.map(
            [llmbatch.Request.from_prompt(f"Summarize: {t}", key=t) for t in texts]
        )
    assert (200, 0) == (len(result.ok), len(result.errors))
    for response in result.ok:
        expected = "gpt-4o" if response.key in broken else MODEL
        assert (expected, "openai") == (response.model, response.provider), response.key
        profile = BUILTIN_PROFILES[f"openai/{expected}"]
        assert response.cost == pytest.approx(profile.cost(response.usage))


async def test_a_primary_refused_for_the_job_is_left_for_the_fallback_provider(
    clock: FakeClock,
) -> None:
    """The primary's key is refused (401): with a fallback on another provider (here
    another key of another server), the job moves there once, with one WARNING, and
    every item is answered by it."""
    async with (
        Simulator(clock=clock.time, api_keys=["sk-valid"]) as primary_sim,
        Simulator(clock=clock.time) as backup_sim,
    ):
        backup = OpenAIProvider(base_url=backup_sim.base_url, api_key="sk-backup", name="backup")
        with capture_logs() as logs:
            async with LLMClient(
                OpenAIProvider(base_url=primary_sim.base_url, api_key="sk-revoked"),
                model=MODEL,
                limits=Limits(rpm=100_000),
                fallbacks=[Fallback(MODEL, backup)],
            ) as client:
                result = await client.map(
                    [llmbatch.Request.from_prompt(f"job {i}") for i in range(30)]
                )
        backup_answered = backup_sim.stats().ok
    assert (30, 0) == (len(result.ok), len(result.errors))
    assert {"backup"} == {r.provider for r in result.ok}
    assert 30 == backup_answered
    left = [e for e in logs if e["event"] == "fallback.route_left"]
    assert 1 == len(left)
    assert "AuthenticationFailed" == left[0]["reason"]


async def test_without_fallbacks_errors_are_unchanged(clock: FakeClock) -> None:
    """No fallbacks: an item the model cannot answer fails as before (collected)."""
    async with (
        Simulator(clock=clock.time, script=unavailable_for_a_fifth) as sim,
        OpenAIProvider(base_url=sim.base_url, api_key="sk-plain") as provider,
    ):
        result = await llmbatch.map(
            "Summarize: {item}",
            [f"document {i}" for i in range(40)],
            model=MODEL,
            provider=provider,
            limits=Limits(rpm=100_000),
            on_error="collect",
        )
    assert len(result.errors) > 0
    assert all(r.provider == "openai" and r.model == MODEL for r in result.ok)


async def cli(
    sim: Simulator, tmp_path: Path, *extra: str, **env: str
) -> tuple[int, str, list[dict[str, Any]]]:
    """``llmbatch run`` over 12 documents against *sim*: exit code, stderr, output."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(12))
    )
    out = tmp_path / "out.jsonl"
    environment = {k: v for k, v in os.environ.items() if "_API_KEY" not in k}
    environment.update(COLUMNS="200", **env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbatch",
        "run",
        str(source),
        "-o",
        str(out),
        "--provider",
        sim.base_url,
        "--id-field",
        "id",
        "--prompt",
        "Summarize: {text}",
        "--rpm",
        "100000",
        "--cache",
        "off",
        *extra,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc.returncode, err.decode(), records


async def test_the_cli_pools_the_keys_of_openai_api_keys(tmp_path: Path) -> None:
    """``OPENAI_API_KEYS=bad,good``: the refused key is retired with one warning that
    never shows it, and every record is answered with the other."""
    async with Simulator(api_keys=["sk-good-one"]) as sim:
        code, err, records = await cli(sim, tmp_path, OPENAI_API_KEYS="sk-refused-zzzz,sk-good-one")
    assert 0 == code, err
    assert ["ok"] * 12 == [r["status"] for r in records]
    assert "pool.key_retired" in err
    assert "sk-refused-zzzz" not in err
    assert "sk-good-one" not in err


async def test_the_cli_falls_back_to_another_model(tmp_path: Path) -> None:
    """``--fallback gpt-4o``: the records the primary model cannot answer (503 every
    time) are answered by gpt-4o, and the output says which model answered."""

    def primary_down_for_odd_docs(info: RequestInfo) -> Fault | None:
        text = str(info.body["messages"][-1]["content"])
        if info.model == MODEL and int(text.rsplit(" ", 1)[1]) % 2:
            return Fault(status=503, retry_after=0.01)
        return None

    async with Simulator(script=primary_down_for_odd_docs) as sim:
        code, err, records = await cli(
            sim, tmp_path, "--fallback", "gpt-4o", OPENAI_API_KEY="sk-cli"
        )
    assert 0 == code, err
    models = {r["key"]: r["model"] for r in records}
    assert {f"d{i}": "gpt-4o" if i % 2 else MODEL for i in range(12)} == {
        k: m.split("-2024")[0] for k, m in models.items()
    }


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OPENAI_API_KEY": "sk-one"}, ["sk-one"]),
        (
            {"OPENAI_API_KEYS": "sk-a, sk-b,,sk-c ", "OPENAI_API_KEY": "sk-one"},
            ["sk-a", "sk-b", "sk-c"],
        ),
        ({"OPENAI_API_KEYS": " , "}, []),
        ({}, []),
    ],
)
def test_api_keys_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: list[str]
) -> None:
    """``OPENAI_API_KEYS`` (comma-separated) wins over ``OPENAI_API_KEY``; blanks are
    dropped."""
    from llmbatch.providers import api_keys

    for name in ("OPENAI_API_KEY", "OPENAI_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert expected == api_keys("openai")


async def test_several_keys_open_as_a_pool_and_fallbacks_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several keys make a KeyPool (one member per key); ``--fallback`` values name a
    model of the run's provider, or another provider's model."""
    from llmbatch.providers import choose_provider, open_fallback

    monkeypatch.setenv("OPENAI_API_KEYS", "sk-a,sk-b")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    async with choose_provider("openai", None).open() as provider:
        assert isinstance(provider, KeyPool)
        assert 2 == len(provider.members)
        assert "sk-a" not in repr(provider)
    assert Fallback("gpt-4o") == open_fallback("gpt-4o", "openai")
    assert Fallback("gpt-4o") == open_fallback("openai/gpt-4o", "openai")
    other = open_fallback("anthropic/claude-haiku-4-5", "openai")
    assert ("claude-haiku-4-5", "anthropic") == (
        other.model,
        other.provider and other.provider.name,
    )
    assert other.provider is not None
    await other.provider.aclose()
    with pytest.raises(TypeError, match="a fallback is a model name"):
        Fallback.of("  ")


# -- what the review found: each case as a user would hit it ----------------------------


def quota_spent_for(model: str) -> Callable[[RequestInfo], Fault | None]:
    """Every key's quota for *model* is spent (per model, as Gemini counts it)."""

    def script(info: RequestInfo) -> Fault | None:
        if info.model == model:
            return Fault(status=429, error_type="insufficient_quota")
        return None

    return script


async def test_a_model_out_of_quota_on_every_key_falls_back_on_the_same_keys(
    clock: FakeClock,
) -> None:
    """The primary model's quota is spent on all three keys: the keys are retired for
    that model only, so the fallback model is answered through the same pool."""
    async with (
        Simulator(clock=clock.time, script=quota_spent_for(MODEL)) as sim,
        pool_at(sim) as pool,
        LLMClient(pool, model=MODEL, limits=Limits(rpm=100_000), fallbacks=["gpt-4o"]) as client,
    ):
        result = await client.map([llmbatch.Request.from_prompt(f"spent {i}") for i in range(10)])
    assert (10, 0) == (len(result.ok), len(result.errors))
    assert {"gpt-4o"} == {r.model for r in result.ok}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # every key refused outright
        ({"api_keys": ["sk-the-only-good-one"]}, "AuthenticationFailed"),
        # every key out of quota for the model
        ({"script": quota_spent_for(MODEL)}, "QuotaExhausted"),
    ],
)
async def test_when_the_last_key_goes_the_job_stops_with_its_error(
    clock: FakeClock, options: dict[str, Any], expected: str
) -> None:
    """No fallback and no key left: the job stops (fatal) with the error that retired
    the last key, instead of spinning or raising a bare ValueError."""
    async with (
        Simulator(clock=clock.time, **options) as sim,
        pool_at(sim) as pool,
    ):
        with pytest.raises(BatchFailed) as caught:
            await llmbatch.map(
                "{item}",
                [f"doomed {i}" for i in range(10)],
                model=MODEL,
                provider=pool,
                limits=Limits(rpm=100_000),
            )
    assert "fatal" == caught.value.reason
    assert expected == caught.value.error.error_type


async def test_items_in_flight_on_an_unreachable_primary_all_move_to_the_fallback(
    clock: FakeClock,
) -> None:
    """A primary nobody answers (connections refused) and a working fallback: every one
    of 60 items is answered by the fallback, the ones already retrying on the primary
    when it was left included."""
    async with Simulator(clock=clock.time) as backup_sim:
        backup = OpenAIProvider(base_url=backup_sim.base_url, api_key="sk-b", name="backup")
        async with LLMClient(
            OpenAIProvider(base_url="http://127.0.0.1:9/v1", api_key="sk-gone"),
            model=MODEL,
            limits=Limits(rpm=100_000),
            fallbacks=[Fallback(MODEL, backup)],
        ) as client:
            result = await client.map(
                [llmbatch.Request.from_prompt(f"moved {i}") for i in range(60)]
            )
    assert (60, 0) == (len(result.ok), len(result.errors))
    assert {"backup"} == {r.provider for r in result.ok}


async def test_a_fallbacks_answer_is_not_cached_as_the_primarys(clock: FakeClock) -> None:
    """An item the primary could not answer once is answered by the fallback; the next
    job, with the primary working, asks the primary rather than being served the other
    model's answer from the cache. What is cached keeps who answered."""
    from llmbatch.cache import MemoryCache

    cache = MemoryCache()

    def down_once(info: RequestInfo) -> Fault | None:
        return Fault(status=503, retry_after=0.1) if info.model == MODEL else None

    prompts = [llmbatch.Request.from_prompt(f"cached {i}") for i in range(3)]
    async with (
        Simulator(clock=clock.time, script=down_once) as sim,
        LLMClient(
            OpenAIProvider(base_url=sim.base_url, api_key="sk-c"),
            model=MODEL,
            limits=Limits(rpm=100_000),
            fallbacks=["gpt-4o"],
            cache=cache,
        ) as client,
    ):
        first = await client.map(prompts)
    async with Simulator(clock=clock.time) as healthy:
        async with LLMClient(
            OpenAIProvider(base_url=healthy.base_url, api_key="sk-c"),
            model=MODEL,
            limits=Limits(rpm=100_000),
            cache=cache,
        ) as client:
            second = await client.map(prompts)
        asked = healthy.stats().ok
    assert {"gpt-4o"} == {r.model for r in first.ok}
    assert 3 == asked
    assert not any(r.cached for r in second.ok)
    assert {MODEL} == {(r.model or "").split("-2024")[0] for r in second.ok}


async def test_a_pool_goes_through_the_batch_api(simulator_factory: SimulatorFactory) -> None:
    """``mode="batch"`` with a key pool: the batch goes through one of its keys."""
    wall = FakeClock(start=10_000.0)
    fast = BatchSimConfig(
        validating_seconds=0.01, seconds_per_request=0.001, finalizing_seconds=0.01
    )
    sim = await simulator_factory(batch=fast, batch_clock=wall.time)
    async with pool_at(sim) as pool:
        client = LLMClient(pool, model=MODEL, sleep=wall.sleep)
        client.batch_poll_interval = 0.05
        result = await client.map(
            [llmbatch.Request.from_prompt(f"batched {i}", key=f"b{i}") for i in range(6)],
            mode="batch",
        )
    assert 6 == len(result.ok)
    assert 1 == sim.stats().batch["openai_batches_created"]


async def test_the_live_view_adds_up_the_keys(clock: FakeClock) -> None:
    """``quota_statistics``: three keys of 300 RPM show as 900 RPM in all."""
    async with (
        Simulator(clock=clock.time) as sim,
        LLMClient(pool_at(sim), model=MODEL, limits=Limits(rpm=300)) as client,
    ):
        await client.map([llmbatch.Request.from_prompt(f"seen {i}") for i in range(9)])
        stats = client.quota_statistics(MODEL)
    assert 900 == round(stats.limits["rpm"])
    assert 9 == stats.acquired
