"""Fault injection: which request fails, and how.

Two sources decide, in this order:

1. a **script**, for deterministic tests: a sequence of :class:`Fault` objects that each
   name the ``nth`` request (1-based, counted per API key) they hit, optionally only for
   one ``key``; or a callable ``(RequestInfo) -> Fault | None`` that decides per request;
2. **fractions**, for soak tests: each request draws once from ``random.Random(seed)``
   and fails with probability ``errors[status]``, ``hang``, ``reset`` or ``malformed``.

Two kinds spoil the *content* of a JSON answer instead of the transport:
``"invalid_json"`` and ``"schema_violation"`` (see :mod:`llmbatch.testing._structured`).
They exist only in scripts (their fractions, ``invalid_json`` and ``schema_violations``,
are drawn per prompt, apart from this plan); a request that asks for no JSON ignores them.
A third, ``"refusal"``, exists only in scripts too: the model declines to answer any chat
request (JSON or not), as OpenAI's ``message.refusal`` or Anthropic's
``stop_reason: "refusal"``.

The simulator consults the plan after a request passed authentication and validation
(``nth`` counts only those), and applies the fault where the response would be sent,
after the rate limiter and the simulated latency; a scripted ``status=429`` instead
replaces the rate limiter's verdict and charges nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = ["Fault", "FaultKind", "FaultPlan", "FaultScript", "RequestInfo"]

FaultKind: TypeAlias = Literal[
    "error", "hang", "reset", "malformed", "invalid_json", "schema_violation", "refusal"
]
_KINDS = ("error", "hang", "reset", "malformed", "invalid_json", "schema_violation", "refusal")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One injected failure.

    Args:
        kind: ``"error"`` answers ``status`` with the provider's error body; ``"hang"``
            holds the request for ``hang_seconds`` (past any sane client timeout);
            ``"reset"`` sends the headers and half the body, then aborts the connection;
            ``"malformed"`` answers 200 with a truncated JSON body. For requests that ask
            for JSON (``response_format``, a forced Anthropic tool): ``"invalid_json"``
            answers 200 with unparseable JSON in the message, ``"schema_violation"`` with
            JSON that breaks the schema; both hit re-asks too, so scripting the re-ask's
            ``nth`` makes the re-ask fail as well. ``"refusal"`` answers any chat request
            (JSON or not) 200 with a refusal: OpenAI ``message.refusal`` set and
            ``content: null``; Anthropic a text block and ``stop_reason: "refusal"``.
        status: the HTTP status of an ``"error"`` fault (400..599). A 429 gets the
            provider's rate-limit body (or the quota body, see ``error_type``).
        error_type: overrides the ``type`` in the error body; for an OpenAI 429 one of
            ``"requests"`` (default), ``"tokens"`` or ``"insufficient_quota"``.
        retry_after: seconds to send in ``retry-after`` (and ``retry-after-ms``);
            ``None`` sends the default for the status (503 and 429 send one).
        nth: in a script, the 1-based number of the request this fault hits, counted
            per API key.
        key: in a script, only requests with this API key count; ``None`` matches the
            ``nth`` request of every key.
    """

    kind: FaultKind = "error"
    status: int = 500
    error_type: str | None = None
    retry_after: float | None = None
    nth: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Fault.kind must be one of {_KINDS}, not {self.kind!r}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"Fault.status must be an error status (400..599), not {self.status}")
        if self.nth is not None and self.nth < 1:
            raise ValueError(f"Fault.nth is 1-based, not {self.nth}")

    @property
    def label(self) -> str:
        """The statistics' name for it: the status, or the kind (``"hang"``, ``"reset"``, ...)."""
        return str(self.status) if self.kind == "error" else self.kind


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a scripted fault callable learns about a request.

    Args:
        provider: ``"openai"`` or ``"anthropic"``.
        path: the URL path, e.g. ``/v1/chat/completions``.
        api_key: the caller's key (only ever shown to in-process code).
        model: the requested model.
        nth: the 1-based number of this request among its key's requests.
        body: the parsed JSON request body.
    """

    provider: str
    path: str
    api_key: str = field(repr=False)
    model: str
    nth: int
    body: Mapping[str, Any]


FaultScript: TypeAlias = Sequence[Fault] | Callable[[RequestInfo], Fault | None]


class FaultPlan:
    """Decides the fault, if any, for each request (see the module docstring).

    Args:
        script: scripted faults (each with ``nth``) or a deciding callable.
        fractions: ``(fault, probability)`` pairs; the probabilities must sum to ≤ 1.
        seed: seeds the random draws, so a run is reproducible for a given arrival order.
    """

    __slots__ = ("_by_nth", "_counts", "_decide", "_random", "_table")

    def __init__(
        self,
        script: FaultScript = (),
        fractions: Sequence[tuple[Fault, float]] = (),
        *,
        seed: int = 0,
    ) -> None:
        self._decide: Callable[[RequestInfo], Fault | None] | None = None
        self._by_nth: dict[tuple[str | None, int], Fault] = {}
        if callable(script):
            self._decide = script
        else:
            for fault in script:
                if fault.nth is None:
                    raise ValueError(f"a scripted fault needs nth=: {fault!r}")
                self._by_nth[fault.key, fault.nth] = fault
        total = sum(p for _, p in fractions)
        if any(p < 0 for _, p in fractions) or total > 1 + 1e-9:
            raise ValueError(f"fault fractions must be ≥ 0 and sum to ≤ 1, not {total:g}")
        self._table: list[tuple[float, Fault]] = []
        cumulative = 0.0
        for fault, p in fractions:
            if p > 0:
                cumulative += p
                self._table.append((cumulative, fault))
        self._random = random.Random(seed)
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"<FaultPlan scripted={len(self._by_nth) or self._decide is not None}"
            f" random={len(self._table)} keys={len(self._counts)}>"
        )

    def __bool__(self) -> bool:
        return bool(self._by_nth or self._decide or self._table)

    def count(self, api_key: str) -> int:
        """Count one more request for *api_key* and return its 1-based number."""
        nth = self._counts.get(api_key, 0) + 1
        self._counts[api_key] = nth
        return nth

    def choose(self, info: RequestInfo) -> Fault | None:
        """The fault for this request (script first, then the random draw), or ``None``."""
        if self._decide is not None:
            fault = self._decide(info)
            if fault is not None:
                return fault
        elif self._by_nth:
            fault = self._by_nth.get((info.api_key, info.nth)) or self._by_nth.get((None, info.nth))
            if fault is not None:
                return fault
        if self._table:
            draw = self._random.random()
            for threshold, fault in self._table:
                if draw < threshold:
                    return fault
        return None
