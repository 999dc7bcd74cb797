"""What the simulator counts, and the frozen snapshot it hands out.

:class:`Recorder` is the mutable tally the request handlers bump (plain attributes,
no locks: everything runs on one event loop). :class:`SimulatorStats` is an immutable
snapshot of it, returned by ``Simulator.stats()`` and served as JSON by ``GET /stats``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmbatch.testing._content import Output

__all__ = ["STRUCTURED_COUNTERS", "Recorder", "SimulatorStats"]

#: the keys of ``SimulatorStats.structured``, always present
STRUCTURED_COUNTERS = ("answered", "invalid_json", "schema_violations", "truncated", "follow_ups")
#: which counter an :attr:`Output.outcome` bumps
_OUTCOME_COUNTERS = {
    "invalid_json": "invalid_json",
    "schema_violation": "schema_violations",
    "truncated": "truncated",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorStats:
    """A snapshot of the simulator's counters.

    Args:
        requests: requests received on the online API endpoints (auth and validation
            failures included; ``/stats`` and the batch endpoints excluded).
        responses: complete responses sent, by HTTP status. A reset or an abandoned hang
            sends none; a malformed body counts as the 200 it claims to be.
        rate_limited: 429 responses by kind: ``"requests"``, ``"tokens"``,
            ``"insufficient_quota"`` (OpenAI) and ``"anthropic"`` (any Anthropic limit).
        faults: injected faults by label: the status of an error fault, or
            ``"hang"``, ``"reset"``, ``"malformed"`` (spoiled JSON answers are counted
            in ``structured``, scripted or not).
        prompt_tokens: estimated prompt (input) tokens of admitted requests, cached
            ones included.
        completion_tokens_reserved: output tokens reserved at admission
            (``max_tokens`` or its default, times ``n``).
        completion_tokens: output tokens actually produced in successful answers.
        cache_read_tokens: prompt tokens that successful answers report as read from
            the prompt cache (OpenAI ``cached_tokens``, Anthropic
            ``cache_read_input_tokens``).
        cache_write_tokens: prompt tokens that successful answers report as written to
            it (Anthropic ``cache_creation_input_tokens``).
        in_flight: requests holding a capacity slot right now.
        queued: requests waiting for a slot (``max_in_flight``) right now.
        max_concurrent: the most requests that ever held a slot at once.
        admissions_per_second: admitted requests per whole second of the simulator's
            clock, counted from the start.
        duplicates: successful answers to a request byte-identical to one answered
            successfully before (spend a client wasted).
        structured: JSON answers sent (``response_format``, forced Anthropic tools,
            ``output_config.format``): ``answered`` (all of them, spoiled ones included),
            ``invalid_json`` and ``schema_violations`` (spoiled on purpose), ``truncated``
            (cut at ``max_tokens``) and ``follow_ups`` (answers to a conversation that
            continues after an answer: re-asks).
        batch: the batch backend's counters (empty when batches are off).
    """

    requests: int
    responses: Mapping[int, int]
    rate_limited: Mapping[str, int]
    faults: Mapping[str, int]
    prompt_tokens: int
    completion_tokens_reserved: int
    completion_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    in_flight: int
    queued: int
    max_concurrent: int
    admissions_per_second: Mapping[int, int]
    duplicates: int
    structured: Mapping[str, int]
    batch: Mapping[str, int]

    @property
    def ok(self) -> int:
        """Responses with a 2xx status."""
        return sum(n for status, n in self.responses.items() if 200 <= status < 300)

    @property
    def client_errors(self) -> int:
        """Responses with a 4xx status other than 429."""
        return sum(n for s, n in self.responses.items() if 400 <= s < 500 and s != 429)

    @property
    def throttled(self) -> int:
        """Responses with status 429, of every kind."""
        return self.responses.get(429, 0)

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status (including 529)."""
        return sum(n for status, n in self.responses.items() if status >= 500)

    @property
    def batches_created(self) -> int:
        """Batches created through the batch endpoints (0 when they are off)."""
        return self.batch.get("batches_created", 0)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (mapping keys become strings), as ``GET /stats`` serves it."""
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Mapping):
                value = {str(k): v for k, v in value.items()}
            data[field.name] = value
        data.update(
            ok=self.ok,
            client_errors=self.client_errors,
            throttled=self.throttled,
            server_errors=self.server_errors,
        )
        return data


class Recorder:
    """The live counters behind :class:`SimulatorStats` (see its fields)."""

    __slots__ = (
        "admissions",
        "cache_read_tokens",
        "cache_write_tokens",
        "completion_tokens",
        "completion_tokens_reserved",
        "duplicates",
        "faults",
        "in_flight",
        "max_concurrent",
        "prompt_tokens",
        "queued",
        "rate_limited",
        "requests",
        "responses",
        "seen",
        "structured",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.queued = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter; the gauges of requests in progress carry over."""
        self.requests = 0
        self.responses: Counter[int] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens_reserved = 0
        self.completion_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.max_concurrent = self.in_flight
        self.admissions: Counter[int] = Counter()
        self.duplicates = 0
        #: hashes of the request bodies answered successfully so far
        self.seen: set[int] = set()
        self.structured: Counter[str] = Counter(dict.fromkeys(STRUCTURED_COUNTERS, 0))

    def answered(self, content_hash: int) -> None:
        """Note a successful answer to the request whose body hashes to *content_hash*."""
        if content_hash in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(content_hash)

    def structured_answer(self, output: Output) -> None:
        """Count a JSON answer sent, by its outcome."""
        counts = self.structured
        counts["answered"] += 1
        if output.outcome in _OUTCOME_COUNTERS:
            counts[_OUTCOME_COUNTERS[output.outcome]] += 1
        if output.follow_up:
            counts["follow_ups"] += 1

    def snapshot(self, batch: Mapping[str, int]) -> SimulatorStats:
        """A frozen copy of the counters, with the batch backend's added."""
        return SimulatorStats(
            requests=self.requests,
            responses=MappingProxyType(dict(self.responses)),
            rate_limited=MappingProxyType(dict(self.rate_limited)),
            faults=MappingProxyType(dict(self.faults)),
            prompt_tokens=self.prompt_tokens,
            completion_tokens_reserved=self.completion_tokens_reserved,
            completion_tokens=self.completion_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            in_flight=self.in_flight,
            queued=self.queued,
            max_concurrent=self.max_concurrent,
            admissions_per_second=MappingProxyType(dict(self.admissions)),
            duplicates=self.duplicates,
            structured=MappingProxyType(dict(self.structured)),
            batch=MappingProxyType(dict(batch)),
        )
