"""Metrics and traces for long runs: OpenTelemetry, and a Prometheus endpoint.

Off by default, and nothing listens or sends unless asked. Two ways to watch a job,
showing the same figures::

    from llmbatch import metrics

    # OpenTelemetry (the ``otel`` extra): observable instruments and a span per attempt,
    # on the global meter and tracer providers or the ones given
    instrumentation = metrics.instrument(client, meter_provider=mp, tracer_provider=tp)

    # Prometheus (the ``metrics`` extra): http://127.0.0.1:9464/metrics
    server = metrics.serve_prometheus(9464, client)

    # or a collector in your own prometheus_client registry
    REGISTRY.register(metrics.PrometheusCollector(client))

``llmbatch run --metrics-port PORT`` serves the run's figures the same way.

The figures: the OpenTelemetry name after ``llmbatch.``, the Prometheus name, and the
labels besides ``provider`` and ``model``:

=======================  =======================================  ===================
OpenTelemetry llmbatch.  Prometheus                               labels
=======================  =======================================  ===================
``requests``             ``llmbatch_requests_total``
``attempts``             ``llmbatch_attempts_total``
``calls``                ``llmbatch_calls_total``                 outcome
``tokens``               ``llmbatch_tokens_total``                type
``cost``                 ``llmbatch_cost_usd_total``
``retries``              ``llmbatch_retries_total``               error
``retry.wait``           ``llmbatch_retry_wait_seconds_total``
``reasks``               ``llmbatch_reasks_total``
``cache.hits``           ``llmbatch_cache_hits_total``
``dedupe.hits``          ``llmbatch_dedupe_hits_total``
``saved.cost``           ``llmbatch_saved_cost_usd_total``
``cache.misses``         ``llmbatch_cache_misses_total``
``in_flight``            ``llmbatch_in_flight``
``in_flight.target``     ``llmbatch_in_flight_target``
``rate_limited``         ``llmbatch_rate_limited_total``          quota
``limiter.permits``      ``llmbatch_limiter_permits_total``       quota
``limiter.wait``         ``llmbatch_limiter_wait_seconds_total``  quota
``limiter.max_wait``     ``llmbatch_limiter_max_wait_seconds``    quota
``limiter.waiting``      ``llmbatch_limiter_waiting``             quota
``limiter.in_flight``    ``llmbatch_limiter_in_flight``           quota
``limiter.cooldown``     ``llmbatch_limiter_cooldown_seconds``    quota
``limiter.available``    ``llmbatch_limiter_available``           quota, dimension
``limiter.limit``        ``llmbatch_limiter_limit``               quota, dimension
``attempt.duration``     ``llmbatch_attempt_duration_seconds``    outcome (histogram)
``queue.wait``           ``llmbatch_queue_wait_seconds``          (histogram)
=======================  =======================================  ===================

``requests`` are the requests sent to the provider, ``attempts`` every try (a retry is
one more), ``calls`` the calls answered (``outcome="succeeded"``, cache and dedupe hits
included) or failed; ``tokens`` has ``type="input"`` and ``"output"``; ``cost`` is in
USD at the model profile's prices (absent while they are unknown). ``model`` is the
client's model for the client-wide figures, and the request's for the rest. ``quota``
names the key a quota belongs to by its fingerprint (``key-1a2b3c4d5e6f``), never the
key; ``rate_limited`` counts the 429s the quota took (each pauses every sharer). The
last two are histograms: ``attempt.duration`` is one attempt from its start (waiting for
a permit included) to its outcome (``"ok"``, or the error's class: ``"RateLimited"``,
``"Timeout"``...), ``queue.wait`` the part spent waiting for the in-flight cap and the
rate limits.

How they are read: the counters and gauges are *observed* when a reader collects them
(an OpenTelemetry metric reader, a Prometheus scrape), from the frozen snapshots the
client already keeps (:class:`~llmbatch.client.ClientStatistics`,
:class:`~llmbatch.limits.LimiterStatistics`, :class:`~llmbatch.retry.RetryStatistics`,
:class:`~llmbatch.cache.CacheStatistics`): nothing is counted on the call path for
them. The histograms and the spans need each attempt: instrumenting a client sets its
:attr:`~llmbatch.client.LLMClient.attempt_hook`, which an uninstrumented client leaves
``None`` (then nothing is called). Each attempt is one span, ``chat {model}`` (or
``embeddings {model}``), kind ``CLIENT``, current while the request is sent (so an
instrumented HTTP client's spans nest under it), with the attributes
``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``llmbatch.attempt``, ``llmbatch.item.key``, ``llmbatch.queue_wait`` (seconds) and
``llmbatch.outcome``; a failed attempt has ``error.type``, an ``exception`` event with
the (redacted) message and the status ``ERROR``.

Several clients can be watched at once: figures with the same labels add up, and a
quota shared by several clients is counted once. Readers run in their own threads; they
read the snapshots as last updated, never waiting for the event loop.

The library imports neither OpenTelemetry nor prometheus_client until asked; without
them :func:`instrument` and the Prometheus names raise an ``ImportError`` that says
what to install.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

from llmbatch._log import get_logger
from llmbatch.client import LLMClient, watch_new_clients
from llmbatch.errors import redact
from llmbatch.limits import Limiter, key_fingerprint
from llmbatch.models import EmbeddingRequest, Request

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Tracer, TracerProvider
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry
else:
    Collector = object  # the base is prometheus_client's only for the type checker

__all__ = [
    "DURATION_BUCKETS",
    "FIGURES",
    "Figure",
    "Instrumentation",
    "MetricsServer",
    "PrometheusCollector",
    "instrument",
    "serve_prometheus",
]

logger = get_logger("llmbatch.metrics")

#: the histograms' bucket bounds (seconds): LLM calls and waits for a quota run from
#: milliseconds to minutes
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Figure:
    """One figure llmbatch reports, under both naming schemes.

    Attributes:
        name: the name after ``llmbatch.`` (``"limiter.wait"``).
        kind: ``"counter"`` (only grows), ``"gauge"`` (a level now) or ``"histogram"``.
        unit: the UCUM unit OpenTelemetry gets (``"s"``, ``"{request}"``, ``"USD"``).
        description: what it counts.
    """

    name: str
    kind: Kind
    unit: str
    description: str

    @property
    def otel_name(self) -> str:
        """The OpenTelemetry instrument name: ``llmbatch.limiter.wait``."""
        return f"llmbatch.{self.name}"

    @property
    def prometheus_name(self) -> str:
        """The Prometheus family name, without the ``_total`` counters get in the
        exposition: ``llmbatch_limiter_wait_seconds``."""
        base = "llmbatch_" + self.name.replace(".", "_")
        suffix = {"s": "_seconds", "USD": "_usd"}.get(self.unit, "")
        return base + suffix


_FIGURES = [
    Figure("requests", "counter", "{request}", "Requests sent to the provider."),
    Figure("attempts", "counter", "{attempt}", "Attempts made (a retry is one more)."),
    Figure("calls", "counter", "{call}", "Calls answered (succeeded) or failed."),
    Figure("tokens", "counter", "{token}", "Tokens used, by type (input, output)."),
    Figure("cost", "counter", "USD", "Money spent at the model profile's prices."),
    Figure("retries", "counter", "{retry}", "Retries scheduled, by the error retried."),
    Figure("retry.wait", "counter", "s", "Time retries waited before trying again."),
    Figure("reasks", "counter", "{request}", "Follow-up requests for invalid typed answers."),
    Figure("cache.hits", "counter", "{call}", "Answers served from the response cache."),
    Figure("dedupe.hits", "counter", "{call}", "Answers shared with an identical request."),
    Figure("saved.cost", "counter", "USD", "What cache and dedupe hits first cost."),
    Figure("cache.misses", "counter", "{lookup}", "Cache lookups that found nothing usable."),
    Figure("in_flight", "gauge", "{request}", "Requests in flight now."),
    Figure("in_flight.target", "gauge", "{request}", "Requests the client holds in flight."),
    Figure("rate_limited", "counter", "{response}", "429 rate-limit answers the quota took."),
    Figure("limiter.permits", "counter", "{request}", "Permits the quota granted."),
    Figure("limiter.wait", "counter", "s", "Time requests waited for the quota's permits."),
    Figure("limiter.max_wait", "gauge", "s", "The longest wait for a permit so far."),
    Figure("limiter.waiting", "gauge", "{request}", "Requests waiting for a permit now."),
    Figure("limiter.in_flight", "gauge", "{request}", "Requests holding a permit now."),
    Figure("limiter.cooldown", "gauge", "s", "What is left of the quota's 429 pause."),
    Figure("limiter.available", "gauge", "1", "Units the quota may grant now, by dimension."),
    Figure("limiter.limit", "gauge", "1", "The quota's limit per period, by dimension."),
    Figure("attempt.duration", "histogram", "s", "One attempt, permit wait included."),
    Figure("queue.wait", "histogram", "s", "Time an attempt waited for in-flight and rate limits."),
]
#: every figure, by name (see the module docstring)
FIGURES: Mapping[str, Figure] = {f.name: f for f in _FIGURES}

_EXTRAS = {"opentelemetry": "otel", "prometheus_client": "metrics"}


def _require(module: str) -> ModuleType:
    """Import an optional dependency, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ImportError(
            f"llmbatch.metrics needs {package.replace('_', '-')} for this: "
            f"pip install 'llmbatch[{_EXTRAS[package]}]'"
        ) from exc


# -- the attempts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What the hook learned about one finished attempt."""

    provider: str
    model: str
    outcome: str
    queue_wait: float
    duration: float


class _Sink:
    """Something fed by the attempt hook: histograms, a tracer, or both."""

    tracer: Tracer | None = None

    def record(self, attempt: _Attempt) -> None:
        """Take the figures of one finished attempt."""


def _operation(request: Request | EmbeddingRequest) -> str:
    return "embeddings" if isinstance(request, EmbeddingRequest) else "chat"


class _Tap:
    """The :attr:`~llmbatch.client.LLMClient.attempt_hook` of a watched client: times
    each attempt, opens the spans, feeds the sinks, and notes the limiter of each model
    the client calls (the quotas to report)."""

    __slots__ = ("client", "fingerprint", "quotas", "sinks")

    def __init__(self, client: LLMClient) -> None:
        self.client = client
        self.fingerprint = key_fingerprint(client.provider.quota_key)
        self.sinks: list[_Sink] = []
        #: the limiter of each model the client called (reported per quota)
        self.quotas: dict[str, Limiter] = {}

    @contextmanager
    def __call__(
        self, request: Request | EmbeddingRequest, number: int
    ) -> Iterator[Callable[[], None]]:
        """Around attempt *number* of *request*: gives the callable the client calls
        once the attempt holds its permit."""
        client = self.client
        model = request.model or client.model or ""
        provider = client.provider.name
        if model not in self.quotas:
            try:
                self.quotas = {**self.quotas, model: client.limiter_for(model)}
            except Exception:
                pass  # the client raises it itself, in a moment
        loop = asyncio.get_running_loop()
        started = loop.time()
        admitted_at: float | None = None

        def admitted() -> None:
            nonlocal admitted_at
            admitted_at = loop.time()

        sinks = self.sinks
        with ExitStack() as spans:
            opened = [
                spans.enter_context(_span(sink.tracer, request, number, provider, model))
                for sink in sinks
                if sink.tracer is not None
            ]
            outcome = "ok"
            error: BaseException | None = None
            try:
                yield admitted
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except BaseException as exc:
                outcome, error = type(exc).__name__, exc
                raise
            finally:
                ended = loop.time()
                waited = (admitted_at if admitted_at is not None else ended) - started
                for span in opened:
                    _finish_span(span, outcome, waited, error)
                figures = _Attempt(provider, model, outcome, waited, ended - started)
                for sink in sinks:
                    try:
                        sink.record(figures)
                    except Exception as exc:  # a figure lost, never the call
                        logger.warning("metrics.record_failed", error=redact(repr(exc)))


@contextmanager
def _span(
    tracer: Tracer,
    request: Request | EmbeddingRequest,
    number: int,
    provider: str,
    model: str,
) -> Iterator[Any]:
    trace = _require("opentelemetry.trace")
    operation = _operation(request)
    attributes: dict[str, str | int] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "llmbatch.attempt": number,
    }
    if request.key is not None:
        attributes["llmbatch.item.key"] = request.key
    with tracer.start_as_current_span(
        f"{operation} {model}",
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,  # recorded by _finish_span, redacted, without a traceback
        set_status_on_exception=False,
    ) as span:
        yield span


def _finish_span(span: Any, outcome: str, waited: float, error: BaseException | None) -> None:
    span.set_attribute("llmbatch.outcome", outcome)
    span.set_attribute("llmbatch.queue_wait", waited)
    if error is not None:
        trace = _require("opentelemetry.trace")
        message = redact(str(error))[:500]
        span.set_attribute("error.type", outcome)
        span.add_event("exception", {"exception.type": outcome, "exception.message": message})
        span.set_status(trace.Status(trace.StatusCode.ERROR, message))


def _attach(client: LLMClient, sink: _Sink) -> _Tap:
    """Add *sink* to the client's tap, setting its attempt hook if it has none."""
    hook = client.attempt_hook
    if hook is None:
        hook = _Tap(client)
        client.attempt_hook = hook
    elif not isinstance(hook, _Tap):
        raise ValueError(f"{client!r} already has another attempt_hook: {hook!r}")
    if sink not in hook.sinks:
        hook.sinks = [*hook.sinks, sink]  # replaced, not mutated: attempts in progress keep theirs
    return hook


def _detach(client: LLMClient, sink: _Sink) -> None:
    hook = client.attempt_hook
    if isinstance(hook, _Tap):
        hook.sinks = [s for s in hook.sinks if s is not sink]
        if not hook.sinks:
            client.attempt_hook = None


# -- the snapshots ------------------------------------------------------------------------

#: a figure's samples: labels → value
Samples = dict[Labels, float]


def _read(taps: Iterable[_Tap]) -> dict[str, Samples]:
    """Every counter and gauge of the watched clients, summed over equal labels (a
    limiter shared by several clients counted once)."""
    for tries in range(3):
        try:
            return _read_once(list(taps))
        except RuntimeError:  # a dict changed size under a reader in another thread
            if tries == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _read_once(taps: list[_Tap]) -> dict[str, Samples]:
    figures: dict[str, Samples] = {f.name: {} for f in _FIGURES if f.kind != "histogram"}

    def add(name: str, labels: Labels, value: float | None) -> None:
        if value is not None:
            samples = figures[name]
            samples[labels] = samples.get(labels, 0.0) + value

    seen: set[int] = set()
    for tap in taps:
        client = tap.client
        stats = client.statistics()
        base: Labels = (("provider", client.provider.name), ("model", client.model or ""))
        add("requests", base, stats.requests)
        add("attempts", base, stats.attempts)
        add("calls", (*base, ("outcome", "succeeded")), stats.succeeded)
        add("calls", (*base, ("outcome", "failed")), stats.failed)
        add("tokens", (*base, ("type", "input")), stats.usage.input_tokens)
        add("tokens", (*base, ("type", "output")), stats.usage.output_tokens)
        add("cost", base, stats.cost)
        add("reasks", base, stats.reasks)
        add("cache.hits", base, stats.cache_hits)
        add("dedupe.hits", base, stats.duplicates)
        add("saved.cost", base, stats.saved_cost)
        add("in_flight", base, stats.in_flight)
        target = stats.in_flight_target
        add("in_flight.target", base, target.limit if target is not None else None)
        retries = client.retry_log.statistics()
        add("retry.wait", base, retries.waited_seconds)
        for error, count in sorted(retries.retries.items()):
            add("retries", (*base, ("error", error)), count)
        if client.cache is not None and id(client.cache) not in seen:
            seen.add(id(client.cache))
            add("cache.misses", base, client.cache.statistics().misses)
        for model, limiter in tap.quotas.items():
            if id(limiter) in seen:
                continue
            seen.add(id(limiter))
            quota: Labels = (
                ("provider", client.provider.name),
                ("model", model),
                ("quota", tap.fingerprint),
            )
            s = limiter.statistics()
            add("rate_limited", quota, s.rate_limited)
            add("limiter.permits", quota, s.acquired)
            add("limiter.wait", quota, s.waited_seconds)
            add("limiter.max_wait", quota, s.max_wait_seconds)
            add("limiter.waiting", quota, s.waiting)
            add("limiter.in_flight", quota, s.in_flight)
            add("limiter.cooldown", quota, s.cooldown_remaining)
            for dimension, value in sorted(s.available.items()):
                add("limiter.available", (*quota, ("dimension", dimension)), value)
            for dimension, value in sorted(s.limits.items()):
                add("limiter.limit", (*quota, ("dimension", dimension)), value)
    return figures


class _Watch:
    """The clients one exporter watches, each with its tap."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.taps: dict[int, _Tap] = {}
        self.closed = False
        self._stop_following: Callable[[], None] | None = None

    def follow_new_clients(self) -> None:
        """Watch every client made from now on too (``every_client=True``). The
        clients stay watched, and their counters counted, until :meth:`close`."""
        self._stop_following = watch_new_clients(self.add)

    def add(self, client: LLMClient) -> None:
        if self.closed:
            raise RuntimeError("closed: instrument the client anew")
        self.taps[id(client)] = _attach(client, self.sink)

    def remove(self, client: LLMClient) -> None:
        if self.taps.pop(id(client), None) is not None:
            _detach(client, self.sink)

    def close(self) -> None:
        if self._stop_following is not None:
            self._stop_following()
        for tap in list(self.taps.values()):
            self.remove(tap.client)
        self.closed = True

    def read(self) -> dict[str, Samples]:
        return _read(list(self.taps.values()))


# -- OpenTelemetry ------------------------------------------------------------------------


class _OtelSink(_Sink):
    def __init__(self, histograms: Mapping[str, Any], tracer: Tracer | None) -> None:
        self.histograms = histograms
        self.tracer = tracer

    def record(self, attempt: _Attempt) -> None:
        where = {"provider": attempt.provider, "model": attempt.model}
        self.histograms["attempt.duration"].record(
            attempt.duration, {**where, "outcome": attempt.outcome}
        )
        self.histograms["queue.wait"].record(attempt.queue_wait, where)


class Instrumentation:
    """The OpenTelemetry instruments of watched clients (what :func:`instrument` returns).

    Use it as a context manager, or :meth:`close` it: the clients' attempt hooks are
    removed and the observable instruments report nothing more (OpenTelemetry has no
    way to unregister them).
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        tracer_provider: TracerProvider | None = None,
        spans: bool = True,
        every_client: bool = False,
    ) -> None:
        otel_metrics = _require("opentelemetry.metrics")
        trace = _require("opentelemetry.trace")
        version = _version()
        meter = otel_metrics.get_meter("llmbatch", version, meter_provider=meter_provider)
        tracer = (
            trace.get_tracer("llmbatch", version, tracer_provider=tracer_provider)
            if spans
            else None
        )
        histograms = {
            f.name: meter.create_histogram(
                f.otel_name,
                unit=f.unit,
                description=f.description,
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
            for f in _FIGURES
            if f.kind == "histogram"
        }
        self._watch = _Watch(_OtelSink(histograms, tracer))
        if every_client:
            self._watch.follow_new_clients()
        for f in _FIGURES:
            if f.kind == "histogram":
                continue
            create = (
                meter.create_observable_counter
                if f.kind == "counter"
                else meter.create_observable_gauge
            )
            create(
                f.otel_name,
                callbacks=[self._observer(f.name)],
                unit=f.unit,
                description=f.description,
            )

    def __repr__(self) -> str:
        state = "closed" if self._watch.closed else f"{len(self._watch.taps)} clients"
        return f"<Instrumentation {state}>"

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        otel_metrics = _require("opentelemetry.metrics")

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            samples = self._watch.read()[name]
            return [otel_metrics.Observation(v, dict(labels)) for labels, v in samples.items()]

        return observe

    def add(self, client: LLMClient) -> None:
        """Watch *client* too."""
        self._watch.add(client)

    def remove(self, client: LLMClient) -> None:
        """Stop watching *client* (its figures disappear from the next collection)."""
        self._watch.remove(client)

    def close(self) -> None:
        """Stop watching every client."""
        self._watch.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def instrument(
    *clients: LLMClient,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    spans: bool = True,
    every_client: bool = False,
) -> Instrumentation:
    """Report the figures of *clients* (see the module docstring) as OpenTelemetry
    metrics, and each attempt as a span.

    Call it once per meter provider and :meth:`Instrumentation.add` further clients:
    a second call would create the same instruments again. Needs the ``otel`` extra
    (the API is enough for the library; the SDK is the usual way to export).

    Args:
        clients: the clients to watch.
        meter_provider: where the instruments go (default: the global one, which is
            a no-op until an SDK is configured).
        tracer_provider: where the spans go (default: the global one).
        spans: one span per attempt; ``False``: metrics only.
        every_client: watch every client made from now on as well (the ones
            ``llmbatch.map`` makes inside included), until the instrumentation closes.

    Raises:
        ImportError: opentelemetry-api is not installed.
        ValueError: a client has an attempt hook of someone else's.
    """
    instrumentation = Instrumentation(
        meter_provider=meter_provider,
        tracer_provider=tracer_provider,
        spans=spans,
        every_client=every_client,
    )
    for client in clients:
        instrumentation.add(client)
    return instrumentation


def _version() -> str | None:
    """llmbatch's version, for the instrumentation scope (``None``: not installed)."""
    try:
        return importlib.metadata.version("llmbatch")
    except importlib.metadata.PackageNotFoundError:
        return None


# -- Prometheus ---------------------------------------------------------------------------


class _PrometheusSink(_Sink):
    def __init__(self, histograms: Mapping[str, Any]) -> None:
        self.histograms = histograms

    def record(self, attempt: _Attempt) -> None:
        self.histograms["attempt.duration"].labels(
            attempt.provider, attempt.model, attempt.outcome
        ).observe(attempt.duration)
        self.histograms["queue.wait"].labels(attempt.provider, attempt.model).observe(
            attempt.queue_wait
        )


class PrometheusCollector(Collector):
    """A prometheus_client collector of the figures of watched clients: register it
    in a ``CollectorRegistry`` (or let :func:`serve_prometheus` do it). Needs the
    ``metrics`` extra.

    Args:
        clients: the clients to watch (more with :meth:`add`).
        every_client: watch every client made from now on as well (the ones
            ``llmbatch.map`` makes inside included), until :meth:`close`.

    Raises:
        ImportError: prometheus-client is not installed.
    """

    def __init__(self, *clients: LLMClient, every_client: bool = False) -> None:
        prometheus = _require("prometheus_client")
        self._prometheus = _require("prometheus_client.core")
        histograms = {
            "attempt.duration": prometheus.Histogram(
                FIGURES["attempt.duration"].prometheus_name,
                FIGURES["attempt.duration"].description,
                ["provider", "model", "outcome"],
                registry=None,
                buckets=DURATION_BUCKETS,
            ),
            "queue.wait": prometheus.Histogram(
                FIGURES["queue.wait"].prometheus_name,
                FIGURES["queue.wait"].description,
                ["provider", "model"],
                registry=None,
                buckets=DURATION_BUCKETS,
            ),
        }
        self._histograms = histograms
        self._watch = _Watch(_PrometheusSink(histograms))
        for client in clients:
            self.add(client)
        if every_client:
            self._watch.follow_new_clients()

    def __repr__(self) -> str:
        state = "closed" if self._watch.closed else f"{len(self._watch.taps)} clients"
        return f"<PrometheusCollector {state}>"

    def add(self, client: LLMClient) -> None:
        """Watch *client* too."""
        self._watch.add(client)

    def remove(self, client: LLMClient) -> None:
        """Stop watching *client*."""
        self._watch.remove(client)

    def close(self) -> None:
        """Stop watching every client (the collector then reports nothing)."""
        self._watch.close()

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (lets a registry refuse duplicate names)."""
        return list(self._families({}))

    def collect(self) -> Iterable[Metric]:
        """The families with the figures as of now."""
        yield from self._families(self._watch.read())
        for histogram in self._histograms.values():
            yield from histogram.collect()

    def _families(self, figures: Mapping[str, Samples]) -> Iterator[Metric]:
        core = self._prometheus
        for f in _FIGURES:
            if f.kind == "histogram":
                continue
            samples = figures.get(f.name, {})
            family_class = (
                core.CounterMetricFamily if f.kind == "counter" else core.GaugeMetricFamily
            )
            label_names = _label_names(f.name)
            family = family_class(f.prometheus_name, f.description, labels=label_names)
            for labels, value in samples.items():
                family.add_metric([v for _, v in labels], value)
            yield family


def _label_names(name: str) -> list[str]:
    """The labels of figure *name*, in the order :func:`_read_once` gives them."""
    base = ["provider", "model"]
    quota = [*base, "quota"]
    return {
        "calls": [*base, "outcome"],
        "tokens": [*base, "type"],
        "retries": [*base, "error"],
        "rate_limited": quota,
        "limiter.available": [*quota, "dimension"],
        "limiter.limit": [*quota, "dimension"],
    }.get(name, quota if name.startswith("limiter.") else base)


class MetricsServer:
    """A running Prometheus endpoint (what :func:`serve_prometheus` returns): the
    figures at :attr:`url`, served by a daemon thread until :meth:`close`."""

    def __init__(
        self,
        collector: PrometheusCollector,
        registry: CollectorRegistry,
        server: Any,
        thread: threading.Thread,
    ) -> None:
        self.collector = collector
        self.registry = registry
        self._server = server
        self._thread = thread
        self.host: str = server.server_address[0]
        #: the port listened on (the one picked, when asked for port 0)
        self.port: int = server.server_port

    @property
    def url(self) -> str:
        """Where the figures are: ``http://127.0.0.1:PORT/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"

    def add(self, client: LLMClient) -> None:
        """Serve the figures of *client* too."""
        self.collector.add(client)

    def close(self) -> None:
        """Stop serving (idempotent); the clients' attempt hooks are removed."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self.registry.unregister(self.collector)
        self.collector.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve_prometheus(
    port: int,
    *clients: LLMClient,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    every_client: bool = False,
) -> MetricsServer:
    """Serve the figures of *clients* in Prometheus' text format at
    ``http://HOST:PORT/metrics``, from a daemon thread (prometheus_client's
    ``start_http_server``). Needs the ``metrics`` extra.

    Args:
        port: the port (0: a free one, see :attr:`MetricsServer.port`).
        clients: the clients to report (more with :meth:`MetricsServer.add`).
        host: the interface: the loopback one unless you say otherwise (``"0.0.0.0"``
            lets any host scrape, and read your job's figures).
        registry: a ``CollectorRegistry`` to add the figures to and serve (your own
            metrics beside them); default: a registry of llmbatch's figures alone.
        every_client: report every client made from now on as well (the ones
            ``llmbatch.map`` makes inside included).

    Raises:
        ImportError: prometheus-client is not installed.
        OSError: the port cannot be listened on (taken, or not allowed).
    """
    prometheus = _require("prometheus_client")
    collector = PrometheusCollector(*clients, every_client=every_client)
    if registry is None:
        registry = prometheus.CollectorRegistry(auto_describe=True)
    registry.register(collector)
    try:
        server, thread = prometheus.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        registry.unregister(collector)
        collector.close()
        raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    return MetricsServer(collector, registry, server, thread)
