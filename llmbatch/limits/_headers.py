"""Rate-limit headers: what a response says (:class:`RateLimitHeaders`), and the rule
that turns it into a correction of a bucket (:func:`correction`).

The rule exists twice, here and in the Redis limiter's ``lua/adjust.lua``; one case
table (``tests/limits/test_headers.py``) runs against both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (``"6m0s"``, ``"120ms"``, ``"1h2m3.5s"``), else ``None``.

    A bare number is read as seconds. Garbage gives ``None``: headers are hints.
    """
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    pos, total = 0, 0.0
    for match in _GO_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def parse_reset(text: str, *, now: datetime | None = None) -> float | None:
    """Seconds until a reset given as a Go duration (OpenAI) or RFC 3339 time (Anthropic)."""
    seconds = parse_go_duration(text)
    if seconds is not None:
        return seconds
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """What one response's rate-limit headers say, per dimension.

    ``limits``, ``remaining`` and ``resets`` map a dimension (``"rpm"``, ``"tpm"``,
    ``"input_tpm"``, ``"output_tpm"``) to the limit, the units left and the seconds
    until the bucket is full again; ``processing`` is the server's own handling time in
    seconds (``openai-processing-ms``), when it says.
    """

    limits: dict[str, int] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)
    resets: dict[str, float] = field(default_factory=dict)
    processing: float | None = None

    _NAMES: ClassVar[dict[str, str]] = {
        # OpenAI
        "x-ratelimit-{}-requests": "rpm",
        "x-ratelimit-{}-tokens": "tpm",
        # only when a project-scoped limit applies: the stricter of the two binds
        "x-ratelimit-{}-project-tokens": "tpm",
        # Anthropic
        "anthropic-ratelimit-requests-{}": "rpm",
        "anthropic-ratelimit-input-tokens-{}": "input_tpm",
        "anthropic-ratelimit-output-tokens-{}": "output_tpm",
    }

    @classmethod
    def parse(cls, headers: Mapping[str, str], *, now: datetime | None = None) -> RateLimitHeaders:
        """Read the headers (case-insensitively); missing or garbled values are skipped.

        Where two limits report on one dimension (OpenAI's organization and project
        token limits), the one with less remaining is the one that binds: its limit,
        remaining and reset are kept together.
        """
        lower = {k.lower(): v for k, v in headers.items()}
        limits: dict[str, int] = {}
        remaining: dict[str, int] = {}
        resets: dict[str, float] = {}
        for pattern, dimension in cls._NAMES.items():
            limit = _int(lower.get(pattern.format("limit")))
            left = _int(lower.get(pattern.format("remaining")))
            reset_text = lower.get(pattern.format("reset"))
            reset = None if reset_text is None else parse_reset(reset_text, now=now)
            if limit is None and left is None:
                continue
            if dimension in remaining and (left is None or left >= remaining[dimension]):
                continue  # the limit already read binds sooner
            for found in (limits, remaining, resets):
                found.pop(dimension, None)
            if limit is not None and limit > 0:
                limits[dimension] = limit
            if left is not None:
                remaining[dimension] = left
            if reset is not None:
                resets[dimension] = reset
        ms = _int(lower.get("openai-processing-ms"))
        return cls(limits, remaining, resets, None if ms is None else ms / 1000)

    def __bool__(self) -> bool:
        return bool(self.limits or self.remaining)


def correction(
    server_left: float,
    believed: float,
    *,
    corrected_since: float = 0.0,
    uncertain: float = 0.0,
    taken_since: float = 0.0,
    capacity: float,
    reserve: float,
    first: bool,
    settling: bool = False,
    measured: bool = True,
) -> float | None:
    """The header-correction rule for one dimension: how much more (or, negative, less)
    a bucket should have available, given what the server reports.

    The server's ``remaining`` right after admitting a request is compared with what
    the limiter *believed* it had left right after taking that request's permit, net of
    the corrections applied since (so one deficit is never corrected twice). Less on
    the server (someone else spends the quota, or it counts differently) drains the
    bucket, but not by what later permits took (they may have reached the server before
    this request). More lifts it, but only by what is certain: what may have reached
    the server only after this request (*uncertain*) is not counted as free. A
    difference within the tolerance is left alone (rounding, and what ``reserve``
    keeps as a cushion absorbs it), except at the first headers of a dimension, which
    set the level whatever it is.

    Args:
        server_left: what the server reports left right after admitting the request.
        believed: what the limiter had left right after taking the request's permit
            (not *measured*: what it has left now).
        corrected_since: the corrections applied since the permit was taken, as the
            amount they made unavailable (a drain is positive); the server's count
            already reflects what they corrected.
        uncertain: what may reach (or have reached) the server after this request, or
            is in the bucket already: earlier permits still in flight then, the
            server's refill during the request's send lag, refunds credited since (not
            *measured*: every request in flight but this one).
        taken_since: what permits taken after this one took.
        capacity: what the bucket holds (the tolerance of a drain is one unit, the
            server's rounding, plus ``reserve`` of it).
        reserve: ``Limits.reserve``.
        first: these are the dimension's first headers: applied whatever their size.
        settling: within the settling time after a 429: no lift (the cooldown is
            trusted over headers sent before it).
        measured: *believed* is what was left right after the request's permit. Without
            a permit to compare with, the level now is, and only the first headers may
            lift it; later ones only drain.

    Returns:
        The change to apply to what is available (positive: a lift), or ``None`` when
        nothing is applied.
    """
    difference = server_left - believed + corrected_since
    # A lift never counts what is uncertain; a drain leaves what later permits may have
    # spent there first.
    if difference > 0:
        delta = max(0.0, difference - uncertain)
    else:
        delta = min(0.0, difference + taken_since)
    if delta > 0 and (settling or not (measured or first)):
        delta = 0.0
    tolerance = 0.5 if delta > 0 else 1.0 + capacity * reserve
    if first or abs(delta) > tolerance:
        return delta
    return None
