"""Tests for llmbatch.metrics: OpenTelemetry instruments and spans, the Prometheus
endpoint, and ``llmbatch run --metrics-port``, each against the simulator over real
HTTP, the figures checked against what the server counted."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llmbatch.client import LLMClient
from llmbatch.errors import ProviderUnavailable, RateLimited
from llmbatch.failure import ItemError
from llmbatch.limits import Limits, key_fingerprint
from llmbatch.metrics import (
    FIGURES,
    PrometheusCollector,
    instrument,
    serve_prometheus,
)
from llmbatch.models import Request, Response
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.testing import FakeClock, Fault, Simulator
from llmbatch.testing.pytest_plugin import SimulatorFactory

otel_metrics_sdk = pytest.importorskip("opentelemetry.sdk.metrics")
otel_trace_sdk = pytest.importorskip("opentelemetry.sdk.trace")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode  # noqa: E402

from tests.test_cli import cli_env, docs, read_jsonl, run_args, start_llmbatch, write_jsonl  # noqa: E402

API_KEY = "sk-proj-METRICSsecret0123456789abcdefghijklmnop"
MODEL = "gpt-4o-mini"

#: (figure, sorted labels) → value
Points = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    fake = FakeClock(start=100.0)
    with fake.patch_loop():
        yield fake


def otel_points(reader: InMemoryMetricReader) -> tuple[Points, dict[str, list[Any]]]:
    """The counters and gauges collected now, by llmbatch figure name and labels; and
    the histograms' data points by figure name."""
    points: Points = {}
    histograms: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                name = metric.name.removeprefix("llmbatch.")
                point: Any
                for point in metric.data.data_points:
                    if hasattr(point, "bucket_counts"):
                        histograms.setdefault(name, []).append(point)
                    else:
                        labels = tuple(sorted((k, str(v)) for k, v in point.attributes.items()))
                        points[name, labels] = point.value
    return points, histograms


def total(points: Points, figure: str, **labels: str) -> float:
    """The sum of *figure*'s samples whose labels include *labels*."""
    return sum(
        value
        for (name, have), value in points.items()
        if name == figure and set(labels.items()) <= set(have)
    )


def scrape(url: str) -> str:
    """GET the exposition (blocking: the endpoint runs in its own thread)."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        body: bytes = answer.read()
    return body.decode()


def prometheus_points(text: str) -> Points:
    """The samples of a Prometheus exposition, keyed as :func:`otel_points` keys them:
    by llmbatch figure name (``_total`` and the unit dropped) and labels; histograms by
    their sample names (``..._count``)."""
    names = {f.prometheus_name: f.name for f in FIGURES.values()}
    points: Points = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            if family.type in ("counter", "gauge") and sample.name.endswith("_created"):
                continue
            name = (
                names.get(family.name, sample.name) if family.type != "histogram" else sample.name
            )
            points[name, tuple(sorted(sample.labels.items()))] = sample.value
    return points


def gated_sleep(hung: asyncio.Event, release: asyncio.Event) -> Callable[[float], Awaitable[None]]:
    """The simulator's ``sleep``: a scripted hang holds its request until *release* is
    set (and sets *hung* when it starts); the simulator sleeps for nothing else here
    (no latency configured)."""

    async def sleep(seconds: float) -> None:
        hung.set()
        await release.wait()

    return sleep


def hook_of(client: LLMClient) -> object:
    """The client's attempt hook (``None``: not instrumented)."""
    return client.attempt_hook


def requests(n: int) -> list[Request]:
    return [
        Request.from_prompt(f"document number {i} about topic {i % 3}", key=f"doc-{i}")
        for i in range(n)
    ]


# -- importable without the extras ------------------------------------------------------


def test_the_library_imports_without_the_extras() -> None:
    """With neither OpenTelemetry nor prometheus_client importable, llmbatch, its CLI
    and llmbatch.metrics import, and using the metrics says what to install."""
    code = """
import sys
for name in ("opentelemetry", "opentelemetry.metrics", "opentelemetry.trace",
             "prometheus_client", "prometheus_client.core"):
    sys.modules[name] = None
import llmbatch, llmbatch.cli.run, llmbatch.metrics
from llmbatch.client import LLMClient
from llmbatch.testing import FakeProvider
client = LLMClient(FakeProvider(lambda r: "x"), model="m")
assert client.attempt_hook is None
for call, extra in ((lambda: llmbatch.metrics.instrument(client), "otel"),
                    (lambda: llmbatch.metrics.serve_prometheus(0, client), "metrics")):
    try:
        call()
    except ImportError as exc:
        assert f"pip install 'llmbatch[{extra}]'" in str(exc), exc
    else:
        raise AssertionError("no ImportError")
assert client.attempt_hook is None
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert 0 == done.returncode, done.stderr
    assert "" == done.stdout


# -- OpenTelemetry ------------------------------------------------------------------------


async def test_otel_metrics_and_spans_count_a_run_against_the_simulator(
    clock: FakeClock,
) -> None:
    """Ten requests, two answered 429 and one 500 by the server's script: the OTel
    figures equal what the simulator counted (requests, 429s, output tokens) and what
    the answers carry (tokens, cost); every attempt is one span, with its attempt
    number and outcome; the API key appears nowhere; closing removes the hook."""
    script = [Fault(status=429, nth=3), Fault(status=429, nth=6), Fault(status=500, nth=8)]
    reader = InMemoryMetricReader()
    meter_provider = otel_metrics_sdk.MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracer_provider = otel_trace_sdk.TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with (
        Simulator(script=script, clock=clock.time) as sim,
        OpenAIProvider(base_url=sim.base_url, api_key=API_KEY) as provider,
    ):
        client = LLMClient(
            provider,
            model=MODEL,
            max_tokens=32,
            limits=Limits(rpm=6000, tpm=10_000_000),
            sleep=clock.sleep,
            max_concurrency=4,
            # no attempt timeout: under CPU load virtual time can jump past one while a
            # request is still on its way to the server (then the client counts a
            # Timeout and a request more than the server saw)
            timeout=None,
        )
        assert hook_of(client) is None
        with instrument(
            client, meter_provider=meter_provider, tracer_provider=tracer_provider
        ) as instrumentation:
            result = await client.map(requests(10))
            stats = sim.stats()
            retried = dict(client.retry_log.retries)
            points, histograms = otel_points(reader)
            assert hook_of(client) is not None
        assert hook_of(client) is None
        assert "closed" in repr(instrumentation)
        await client.release()

    answers = [r for r in result.results if isinstance(r, Response)]
    assert 10 == len(answers)
    assert 13 == stats.requests
    assert {200: 10, 429: 2, 500: 1} == dict(stats.responses)
    base = {"provider": provider.name, "model": MODEL}
    assert stats.requests == total(points, "requests", **base), retried
    assert 13 == total(points, "attempts", **base)
    assert 10 == total(points, "calls", outcome="succeeded")
    assert 0 == total(points, "calls", outcome="failed")
    assert sum(a.usage.input_tokens for a in answers) == total(points, "tokens", type="input")
    assert stats.completion_tokens == total(points, "tokens", type="output")
    assert sum(a.cost or 0.0 for a in answers) == pytest.approx(total(points, "cost"))
    assert 2 == total(points, "retries", error=RateLimited.__name__)
    assert 1 == total(points, "retries", error=ProviderUnavailable.__name__)
    # the 429s, per quota: labelled by the key's fingerprint, never the key
    quota = key_fingerprint(provider.quota_key)
    assert stats.faults["429"] == total(points, "rate_limited", quota=quota, **base)
    assert 13 == total(points, "limiter.permits", quota=quota)
    assert 0 == total(points, "in_flight")
    assert 6000 == total(points, "limiter.limit", dimension="rpm")
    assert API_KEY not in repr(points)

    # one span per attempt
    spans = exporter.get_finished_spans()
    assert 13 == len(spans)
    assert {f"chat {MODEL}"} == {s.name for s in spans}
    outcomes = sorted(str((s.attributes or {})["llmbatch.outcome"]) for s in spans)
    assert ["ProviderUnavailable"] + ["RateLimited"] * 2 + ["ok"] * 10 == outcomes
    by_item: dict[str, list[int]] = {}
    for span in spans:
        attributes = span.attributes or {}
        assert provider.name == attributes["gen_ai.provider.name"]
        assert MODEL == attributes["gen_ai.request.model"]
        by_item.setdefault(str(attributes["llmbatch.item.key"]), []).append(
            int(str(attributes["llmbatch.attempt"]))
        )
        failed = attributes["llmbatch.outcome"] != "ok"
        assert (StatusCode.ERROR if failed else StatusCode.UNSET) == span.status.status_code
        assert failed == bool(span.events)
        assert API_KEY not in str(attributes) + str([e.attributes for e in span.events])
    assert {f"doc-{i}" for i in range(10)} == set(by_item)
    # which item a scripted fault hits depends on arrival order (a retry may be hit
    # again): each item's attempts are numbered 1..n, and they add up to the requests
    assert 13 == sum(len(a) for a in by_item.values())
    assert all(sorted(a) == list(range(1, len(a) + 1)) for a in by_item.values())

    # the histograms saw every attempt; the queue waits are the spans' (a retry after
    # a 429 waited out the quota's cooldown: 1 s)
    assert 13 == sum(p.count for p in histograms["attempt.duration"])
    waits = [float(str((s.attributes or {})["llmbatch.queue_wait"])) for s in spans]
    assert sum(waits) == pytest.approx(sum(p.sum for p in histograms["queue.wait"]))
    assert max(waits) >= 1.0
    assert sum(waits) == pytest.approx(total(points, "limiter.wait"))


async def test_closed_instrumentation_observes_nothing(clock: FakeClock) -> None:
    """After close, a collection has no llmbatch samples and the client calls no hook."""
    reader = InMemoryMetricReader()
    meter_provider = otel_metrics_sdk.MeterProvider(metric_readers=[reader])
    async with (
        Simulator(clock=clock.time) as sim,
        OpenAIProvider(base_url=sim.base_url, api_key=API_KEY) as provider,
    ):
        client = LLMClient(provider, model=MODEL, sleep=clock.sleep, timeout=None)
        instrumentation = instrument(client, meter_provider=meter_provider, spans=False)
        await client.complete("hello")
        assert 1 == total(otel_points(reader)[0], "requests")
        instrumentation.close()
        await client.complete("hello again")
        await client.release()
    points, _ = otel_points(reader)
    assert [] == [key for key in points if key[0] != "attempt.duration"]


async def test_every_client_counts_the_clients_llmbatch_map_makes(clock: FakeClock) -> None:
    """``instrument(every_client=True)``: two ``llmbatch.map`` calls (each makes its own
    client inside) are both counted, their requests equal to the simulator's; after
    close a third call is not."""
    import llmbatch

    reader = InMemoryMetricReader()
    meter_provider = otel_metrics_sdk.MeterProvider(metric_readers=[reader])
    async with (
        Simulator(clock=clock.time) as sim,
        OpenAIProvider(base_url=sim.base_url, api_key=API_KEY) as provider,
    ):
        instrumentation = instrument(meter_provider=meter_provider, spans=False, every_client=True)
        for batch in range(2):
            await llmbatch.map(
                "{item}",
                [f"every client {batch}-{i}" for i in range(4)],
                model=MODEL,
                provider=provider,
            )
        counted = total(otel_points(reader)[0], "requests")
        sent = sim.stats().requests
        instrumentation.close()
        await llmbatch.map("{item}", ["after close"], model=MODEL, provider=provider)
    assert (8, 8) == (counted, sent)
    points, _ = otel_points(reader)
    assert 0 == total(points, "requests")


# -- Prometheus -------------------------------------------------------------------------


async def test_prometheus_endpoint_shows_a_job_while_it_runs(clock: FakeClock) -> None:
    """``serve_prometheus`` on a free port of 127.0.0.1: scraped while the last request
    is held by the server, the figures show the job so far (one request in flight,
    the 429 counted, five answers); once it is let go, the final figures; and every
    counter and gauge equals the OpenTelemetry reading of the same client."""
    hung, release = asyncio.Event(), asyncio.Event()
    script = [Fault(status=429, nth=2), Fault(kind="hang", nth=7)]
    reader = InMemoryMetricReader()
    meter_provider = otel_metrics_sdk.MeterProvider(metric_readers=[reader])
    async with (
        Simulator(script=script, clock=clock.time, sleep=gated_sleep(hung, release)) as sim,
        OpenAIProvider(base_url=sim.base_url, api_key=API_KEY) as provider,
    ):
        client = LLMClient(
            provider,
            model=MODEL,
            limits=Limits(rpm=6000, tpm=10_000_000),
            sleep=clock.sleep,
            timeout=None,  # the held request is not abandoned
        )
        with (
            serve_prometheus(0, client) as server,
            instrument(client, meter_provider=meter_provider, spans=False),
        ):
            assert "127.0.0.1" == server.host
            job = asyncio.ensure_future(client.map(requests(6)))
            await hung.wait()
            while client.statistics().succeeded < 5:  # noqa: ASYNC110 - answers arriving
                await asyncio.sleep(0.01)
            during = prometheus_points(scrape(server.url))
            release.set()
            result = await job
            after_text = scrape(server.url)
            after = prometheus_points(after_text)
            otel, _ = otel_points(reader)
        stats = sim.stats()
        with pytest.raises(urllib.error.URLError):
            scrape(server.url)  # closed
        await client.release()

    quota = key_fingerprint(provider.quota_key)
    assert 7 == total(during, "requests") == stats.requests
    assert 5 == total(during, "calls", outcome="succeeded")
    assert 1 == total(during, "in_flight")
    assert 1 == total(during, "limiter.in_flight", quota=quota)
    assert 1 == total(during, "rate_limited", quota=quota) == stats.faults["429"]
    assert 1 == total(during, "retries", error="RateLimited")
    assert 6 == total(during, "llmbatch_attempt_duration_seconds_count")

    assert [] == [r for r in result.results if isinstance(r, ItemError)]
    assert 7 == total(after, "requests")
    assert 6 == total(after, "calls", outcome="succeeded")
    assert 0 == total(after, "in_flight")
    assert stats.completion_tokens == total(after, "tokens", type="output")
    assert 7 == total(after, "llmbatch_attempt_duration_seconds_count")
    assert 7 == total(after, "llmbatch_queue_wait_seconds_count")
    assert "llmbatch_requests_total{" in after_text
    assert API_KEY not in after_text
    # the same figures as OpenTelemetry's
    assert otel == {key: value for key, value in after.items() if key[0] in FIGURES}


def test_prometheus_collector_names_are_unique_in_a_registry() -> None:
    """The collector describes its families, so a registry refuses a second one."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PrometheusCollector())


def test_a_taken_port_is_a_clear_error() -> None:
    """Listening on a port in use raises OSError naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_prometheus(port)


# -- the CLI ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_cli_metrics_port_is_scraped_during_a_run(
    simulator_factory: SimulatorFactory, tmp_path: Path
) -> None:
    """``llmbatch run --metrics-port PORT``: while the server holds the run's last
    request, http://127.0.0.1:PORT/metrics shows the run (requests as the simulator
    counted them, the 429, one in flight); released, the run finishes every record."""
    hung, release = asyncio.Event(), asyncio.Event()
    sim = await simulator_factory(
        script=[Fault(status=429, nth=2, retry_after=0.1), Fault(kind="hang", nth=8)],
        sleep=gated_sleep(hung, release),
    )
    inputs = docs(7)
    source = write_jsonl(tmp_path / "in.jsonl", inputs)
    out = tmp_path / "out.jsonl"
    port = free_port()
    args = run_args(sim, source, out, "--metrics-port", str(port), "--cache", "off")
    proc = await start_llmbatch(*args, cwd=tmp_path, env=cli_env())
    try:
        await hung.wait()
        url = f"http://127.0.0.1:{port}/metrics"
        while True:  # the child's answers arriving: poll its endpoint
            try:
                during = prometheus_points(await asyncio.to_thread(scrape, url))
            except urllib.error.URLError:
                during = {}
            if total(during, "calls", outcome="succeeded") == 6:
                break
            await asyncio.sleep(0.02)
        stats = sim.stats()
        release.set()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert 0 == proc.returncode, err.decode()
    assert 8 == stats.requests == total(during, "requests")
    assert 1 == total(during, "rate_limited") == stats.faults["429"]
    assert 1 == total(during, "in_flight")
    assert 7 == total(during, "llmbatch_attempt_duration_seconds_count")
    assert ["ok"] * 7 == [r["status"] for r in read_jsonl(out)]
    assert "sk-proj" not in repr(during)


async def test_cli_metrics_port_taken_exits_2(simulator: Simulator, tmp_path: Path) -> None:
    """A taken --metrics-port stops the run before anything is sent (usage error)."""
    source = write_jsonl(tmp_path / "in.jsonl", docs(2))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = run_args(simulator, source, tmp_path / "out.jsonl", "--metrics-port", str(port))
        proc = await start_llmbatch(*args, cwd=tmp_path)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert 2 == proc.returncode
    assert f"cannot serve metrics on 127.0.0.1:{port}" in err.decode()
    assert 0 == simulator.stats().requests
