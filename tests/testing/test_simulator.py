"""The simulator as a whole: lifecycle, configuration, latency, capacity, statistics, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import subprocess
import sys
from typing import Any

import aiohttp
import openai
import pytest
from click.testing import CliRunner
from openai.types.chat import ChatCompletionMessageParam

import llmbatch.testing
from llmbatch.testing import BatchSimConfig, Simulator, SimulatorConfig, _cli
from llmbatch.testing._cli import serve_sim
from llmbatch.testing.pytest_plugin import SimulatorFactory

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def _client(sim: Simulator, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


# -- lifecycle and configuration -----------------------------------------------------------


async def test_lifecycle() -> None:
    """URLs exist only while running; start twice is an error; aclose is idempotent."""
    sim = Simulator(rpm=5)
    with pytest.raises(RuntimeError):
        _ = sim.url
    assert "not started" in repr(sim)
    await sim.start()
    try:
        assert sim.base_url == sim.url + "/v1"
        assert sim.url.startswith("http://127.0.0.1:")
        assert repr(sim).startswith(f"<Simulator {sim.url} SimulatorConfig(rpm=5")
        with pytest.raises(RuntimeError):
            await sim.start()
    finally:
        await sim.aclose()
    await sim.aclose()


async def test_a_busy_port_fails_cleanly(simulator: Simulator) -> None:
    """Starting on a port in use raises, and leaves the simulator stopped."""
    port = int(simulator.url.rsplit(":", 1)[1])
    other = Simulator(port=port)
    with pytest.raises(OSError):
        await other.start()
    with pytest.raises(RuntimeError):
        _ = other.url


def test_config_repr_shows_what_differs_and_hides_keys() -> None:
    """The repr lists only non-default fields, and counts API keys instead of showing them."""
    config = SimulatorConfig(rpm=60, api_keys=["sk-a", "sk-b"], errors={500: 0.1})
    assert "SimulatorConfig(api_keys=<2 keys>, rpm=60, errors={500: 0.1})" == repr(config)
    assert "SimulatorConfig()" == repr(SimulatorConfig())


def test_config_is_an_immutable_value() -> None:
    """Frozen, keyword-only, compared by value, with collections normalized."""
    config = SimulatorConfig(api_keys=["k"], insufficient_quota=["k"], models=["m"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rpm = 5  # type: ignore[misc]
    assert (frozenset({"k"}), frozenset({"k"}), ("m",)) == (
        config.api_keys,
        config.insufficient_quota,
        config.models,
    )
    assert SimulatorConfig(errors={500: 0.5}) == SimulatorConfig(errors={500: 0.5})


def test_options_override_a_config() -> None:
    """``Simulator(config, **options)`` replaces fields of *config*."""
    sim = Simulator(SimulatorConfig(rpm=5, tpm=100), tpm=200)
    assert (5, 200) == (sim.config.rpm, sim.config.tpm)


@pytest.mark.parametrize(
    "options",
    [
        {"rpm": 0},
        {"tpm": -1},
        {"port": 70_000},
        {"jitter": 1.5},
        {"tokens_per_second": 0},
        {"otpm_reservation": "sometimes"},
        {"charge_rejected": "double"},
        {"context_window": 0},
        {"max_in_flight": 0},
        {"bucket_seconds": 0},
        {"bucket_seconds": -6},
        {"bucket_seconds": 61},
    ],
)
def test_invalid_config(options: dict[str, Any]) -> None:
    """Nonsense settings fail at construction with the field's name."""
    with pytest.raises(ValueError, match=next(iter(options))):
        SimulatorConfig(**options)


@pytest.mark.parametrize("bucket_seconds", [None, 0.001, 6, 60])
def test_bucket_seconds_within_a_minute(bucket_seconds: float | None) -> None:
    """Any bucket from a sliver of a second up to the whole minute is allowed."""
    assert bucket_seconds == SimulatorConfig(bucket_seconds=bucket_seconds).bucket_seconds


def test_public_names() -> None:
    """``llmbatch.testing.__all__`` is sorted and every name resolves."""
    names = llmbatch.testing.__all__
    assert sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n)) == names
    for name in names:
        assert getattr(llmbatch.testing, name) is not None
    assert set(names) <= set(dir(llmbatch.testing))
    with pytest.raises(AttributeError):
        _ = llmbatch.testing.NoSuchThing


def test_importing_the_package_and_plugin_does_not_load_aiohttp() -> None:
    """The pytest plugin loads in every run, so it stays light until a fixture is used."""
    code = (
        "import sys, llmbatch.testing, llmbatch.testing.pytest_plugin; "
        "print('aiohttp' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "False" == output.strip()


# -- latency and capacity -------------------------------------------------------------------


class Gate:
    """An injectable ``sleep`` that records durations and blocks until opened."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.opened = asyncio.Event()
        self.arrived = asyncio.Condition()

    async def sleep(self, seconds: float) -> None:
        async with self.arrived:
            self.durations.append(seconds)
            self.arrived.notify_all()
        await self.opened.wait()

    async def wait_for_sleepers(self, count: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.durations) >= count)


async def test_max_in_flight_queues_the_rest(simulator_factory: SimulatorFactory) -> None:
    """With max_in_flight=2, five concurrent requests run two at a time."""
    gate = Gate()
    sim = await simulator_factory(max_in_flight=2, ttft=1.0, sleep=gate.sleep)
    async with _client(sim) as client:
        calls = [
            asyncio.create_task(
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": str(i)}]
                )
            )
            for i in range(5)
        ]
        await gate.wait_for_sleepers(2)
        # the other three reach the server and queue; the server has no event to wait on
        while sim.stats().queued < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        during = sim.stats()
        gate.opened.set()
        await asyncio.gather(*calls)
    after = sim.stats()
    assert (2, 3) == (during.in_flight, during.queued)
    assert (0, 0, 2, 5) == (after.in_flight, after.queued, after.max_concurrent, after.ok)


async def test_latency_is_ttft_plus_tokens_over_speed(simulator_factory: SimulatorFactory) -> None:
    """A non-streamed answer waits ttft + completion_tokens / tokens_per_second."""
    gate = Gate()
    gate.opened.set()
    sim = await simulator_factory(ttft=0.5, tokens_per_second=100, sleep=gate.sleep)
    async with _client(sim) as client:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.usage is not None
    assert [pytest.approx(0.5 + completion.usage.completion_tokens / 100)] == gate.durations


async def test_streaming_latency_is_paced(simulator_factory: SimulatorFactory) -> None:
    """A stream waits ttft before the first event, then 1/tokens_per_second per event."""
    gate = Gate()
    gate.opened.set()
    sim = await simulator_factory(ttft=0.25, tokens_per_second=50, sleep=gate.sleep)
    async with _client(sim) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True
        )
        chunks = [chunk async for chunk in stream]
    # events: role + words + finish + [DONE]; no pause before the first one
    assert [0.25] + [pytest.approx(0.02)] * (len(chunks)) == gate.durations


async def test_jitter_is_seeded(simulator_factory: SimulatorFactory) -> None:
    """Jitter scales latency within ±jitter, reproducibly for a seed."""
    runs = []
    for _ in range(2):
        gate = Gate()
        gate.opened.set()
        sim = await simulator_factory(ttft=1.0, jitter=0.5, seed=3, sleep=gate.sleep)
        async with _client(sim) as client:
            for _ in range(5):
                await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        runs.append(gate.durations)
    assert runs[0] == runs[1]
    assert all(0.5 <= d <= 1.5 for d in runs[0])
    assert len(set(runs[0])) == 5


# -- statistics -----------------------------------------------------------------------------


async def test_stats_count_statuses_tokens_and_duplicates(
    simulator_factory: SimulatorFactory,
) -> None:
    """Counts by status, 429 kind, tokens, and answers given twice to the same content."""
    sim = await simulator_factory(rpm=3, charge_rejected="none")
    async with _client(sim) as client:
        for _ in range(2):  # the same content twice: one duplicate
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=8)
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "other"}], max_tokens=8
        )
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=8)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=8)
    stats = sim.stats()
    assert 5 == stats.requests
    assert {200: 3, 429: 1, 400: 1} == dict(stats.responses)
    assert (3, 1, 1, 0) == (stats.ok, stats.throttled, stats.client_errors, stats.server_errors)
    assert {"requests": 1} == dict(stats.rate_limited)
    assert (1, 24, 24) == (
        stats.duplicates,
        stats.completion_tokens_reserved,
        stats.completion_tokens,
    )
    assert stats.prompt_tokens > 0
    sim.reset_stats()
    assert (0, {}, 0) == (sim.stats().requests, dict(sim.stats().responses), sim.stats().duplicates)


async def test_stats_endpoint_serves_json(simulator_factory: SimulatorFactory) -> None:
    """``GET /stats`` is the same snapshot as JSON, batch counters included;
    ``POST /stats/reset`` zeroes it."""
    sim = await simulator_factory(batch=BatchSimConfig())
    async with _client(sim) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.url}/stats") as response:
            data = await response.json()
        async with session.post(f"{sim.url}/stats/reset") as response:
            assert 204 == response.status
    assert (1, {"200": 1}, 1) == (data["requests"], data["responses"], data["ok"])
    assert {"0": 1} == data["admissions_per_second"]
    assert 0 == data["batch"]["batches_created"] == sim.stats().batches_created
    assert 0 == sim.stats().requests


async def test_batch_routes_are_mounted_and_counted(simulator_factory: SimulatorFactory) -> None:
    """The Batch API backend answers on the same server, and its counters reach stats()."""
    sim = await simulator_factory()
    async with _client(sim) as client:
        upload = await client.files.create(
            file=(
                "in.jsonl",
                b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": '
                b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}}\n',
            ),
            purpose="batch",
        )
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert "validating" == batch.status
    assert 1 == sim.stats().batches_created


async def test_batch_none_leaves_the_routes_out(simulator_factory: SimulatorFactory) -> None:
    """``batch=None`` serves only the online API."""
    sim = await simulator_factory(batch=None)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sim.url}/v1/batches") as response,
    ):
        assert 404 == response.status
    assert {} == dict(sim.stats().batch)


# -- command line ---------------------------------------------------------------------------


def test_cli_rejects_bad_options() -> None:
    """Configuration errors are usage errors, not tracebacks."""
    runner = CliRunner()
    assert 2 == runner.invoke(serve_sim, ["--rpm", "0"]).exit_code
    assert 2 == runner.invoke(serve_sim, ["--error", "500"]).exit_code
    assert 2 == runner.invoke(serve_sim, ["--bucket-seconds", "0"]).exit_code
    assert 2 == runner.invoke(serve_sim, ["--bucket-seconds", "six"]).exit_code


@pytest.mark.parametrize(
    ("args", "expected"),
    [([], None), (["--bucket-seconds", "6"], 6.0), (["--bucket-seconds", "0.5"], 0.5)],
)
def test_cli_bucket_seconds(
    monkeypatch: pytest.MonkeyPatch, args: list[str], expected: float | None
) -> None:
    """``--bucket-seconds`` reaches the configuration the server runs with."""
    served: list[SimulatorConfig] = []

    async def serve(config: SimulatorConfig) -> None:
        served.append(config)

    monkeypatch.setattr(_cli, "_serve", serve)
    result = CliRunner().invoke(serve_sim, ["--rpm", "10000", *args])
    assert 0 == result.exit_code, result.output
    assert [(10_000, expected)] == [(c.rpm, c.bucket_seconds) for c in served]


def test_the_cli_process_collects_garbage_less_often() -> None:
    """The served process freezes what start-up allocated and raises the thresholds."""
    thresholds = gc.get_threshold()
    try:
        _cli._collect_less_often()
        assert (50_000, gc.get_freeze_count() > 0) == (gc.get_threshold()[0], True)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def test_python_m_serves_until_terminated() -> None:
    """``python -m llmbatch.testing --port 0`` prints its base URL first, then serves it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmbatch.testing",
        "--port",
        "0",
        "--rpm",
        "600",
        "--api-key",
        "sk-cli",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        base_url = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-cli", max_retries=0) as client:
            models = await client.models.list()
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=USER
            )
        assert "gpt-4o-mini" in [model.id for model in models.data]
        assert "600" == raw.headers["x-ratelimit-limit-requests"]
    finally:
        process.terminate()
        await process.communicate()
    assert 0 == process.returncode
