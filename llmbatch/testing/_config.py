"""The simulator's configuration: :class:`SimulatorConfig` (a frozen value), in a module
of its own so that the endpoints read it without importing the server."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

from llmbatch.testing._batchsim import BatchSimConfig
from llmbatch.testing._faults import Fault, FaultScript
from llmbatch.testing._quota import ChargeRejected
from llmbatch.testing._structured import StructuredFaults

__all__ = ["DEFAULT_MODELS", "SimulatorConfig"]

#: what ``GET /v1/models`` lists unless configured otherwise
DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-haiku-4-5",
    "claude-sonnet-4-6",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorConfig:
    """How the simulator behaves. Every field is optional; the defaults make a fast,
    unlimited, fault-free server.

    Args:
        host: the interface to listen on.
        port: the port; 0 picks a free one.
        api_keys: if set, only these keys are accepted (others get 401 ``invalid_api_key``).
        models: what ``GET /v1/models`` lists.
        reject_unknown_models: answer 404 ``model_not_found`` for models not in ``models``.
        context_window: prompt plus requested output tokens allowed per request.
        rpm: requests per minute, per (key, model), OpenAI and Anthropic.
        tpm: OpenAI tokens per minute (prompt estimate + ``max_tokens`` x ``n``).
        rpd: OpenAI requests per day.
        tpd: OpenAI tokens per day.
        itpm: Anthropic input tokens per minute.
        otpm: Anthropic output tokens per minute.
        bucket_seconds: enforce every per-minute limit (``rpm``, ``tpm``, ``itpm``,
            ``otpm``) over a bucket holding only this many seconds' worth of it
            (``limit x bucket_seconds / 60`` units, at least 1), still refilled at
            ``limit / 60`` per second: OpenAI's "quantized" limits (RPM 10,000 with
            ``bucket_seconds=6`` admits a burst of 1,000). Headers still report the
            per-minute limit, and ``remaining``/``reset`` describe the smaller bucket; a
            429's "Used" is the limit minus what that bucket holds. A request larger
            than the bucket but within the limit passes when the bucket is full and
            leaves it in debt. Per-day limits are unaffected. ``None``: each bucket
            holds a whole minute's worth.
        otpm_reservation: ``"max_tokens"`` reserves ``max_tokens`` against OTPM and refunds
            the unused part; ``"actual"`` charges the output produced, afterwards.
        charge_rejected: what a request rejected with 429 still costs: ``"request"``
            (one request, OpenAI's documented rule), ``"full"`` or ``"none"``.
        insufficient_quota: ``True`` (every key) or the keys that get the
            non-retryable ``insufficient_quota`` error.
        ttft: seconds before the first token.
        tokens_per_second: output speed; ``None`` is instantaneous.
        jitter: scales each request's latency by a factor in ``[1 - jitter, 1 + jitter]``.
        max_in_flight: requests served at once; beyond that they queue.
        errors: ``{status: fraction}`` of requests answered with that error (500, 502,
            503, 529, ...), in the provider's error shape.
        hang: fraction of requests held for ``hang_seconds`` before the answer.
        hang_seconds: how long a hang lasts (make it longer than the client's timeout).
        reset: fraction of requests whose connection is reset mid-response.
        malformed: fraction of requests answered 200 with a truncated JSON body.
        invalid_json: fraction of JSON answers (``response_format`` json_schema or
            json_object, forced Anthropic tools, ``output_config.format``) sent as
            unparseable JSON: cut short, or with a trailing comma.
        schema_violations: fraction of JSON answers sent as valid JSON that breaks the
            schema: a required property missing, or one of the wrong type.
            Both are drawn per prompt from ``seed`` (the same prompt is always spoiled the
            same way), never for a follow-up (a re-ask); a script can spoil any request
            with ``Fault(kind="invalid_json" | "schema_violation", nth=...)``. Batch
            API answers are never spoiled (:class:`BatchSimConfig` fails whole requests
            instead, with ``failure_rate``).
        prompt_cache: report prompt caching as the providers do (see
            :mod:`llmbatch.testing._cache`): OpenAI's ``cached_tokens`` for a repeated
            prefix of 1,024+ tokens, Anthropic's cache reads and writes for prefixes
            marked with ``cache_control`` (reads then leave ITPM alone), online and in
            batches. ``False``: a server without prompt caching.
        prompt_cache_ready: when a request's cache entries become readable online:
            ``"admitted"`` (the optimistic case: concurrent requests with a new prefix
            write it once) or ``"answered"`` (a real server's worst case: only once the
            answer is sent, so every request sent before that writes it again).
        script: scripted faults (``Fault(nth=..., key=...)``) or a callable
            ``(RequestInfo) -> Fault | None``; consulted before the fractions.
        seed: seeds the fault draws and the jitter.
        batch: the Batch API configuration; ``None`` leaves those routes out.
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_keys: Collection[str] | None = None
    models: Sequence[str] = DEFAULT_MODELS
    reject_unknown_models: bool = False
    context_window: int = 128_000
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    bucket_seconds: float | None = None
    otpm_reservation: Literal["max_tokens", "actual"] = "max_tokens"
    charge_rejected: ChargeRejected = "request"
    insufficient_quota: bool | Collection[str] = False
    ttft: float = 0.0
    tokens_per_second: float | None = None
    jitter: float = 0.0
    max_in_flight: int | None = None
    errors: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    hang: float = 0.0
    hang_seconds: float = 3600.0
    reset: float = 0.0
    malformed: float = 0.0
    invalid_json: float = 0.0
    schema_violations: float = 0.0
    prompt_cache: bool = True
    prompt_cache_ready: Literal["admitted", "answered"] = "admitted"
    script: FaultScript = ()
    seed: int = 0
    batch: BatchSimConfig | None = field(default_factory=BatchSimConfig)

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {expected}, not {getattr(self, name)!r}")

        check("port", 0 <= self.port <= 65535, "a port number (0 picks a free one)")
        for name in ("rpm", "tpm", "rpd", "tpd", "itpm", "otpm", "max_in_flight"):
            value = getattr(self, name)
            check(name, value is None or value >= 1, "None or a positive integer")
        check("context_window", self.context_window >= 1, "a positive integer")
        check(
            "bucket_seconds",
            self.bucket_seconds is None or 0 < self.bucket_seconds <= 60,
            "None or within (0, 60]",
        )
        check("otpm_reservation", self.otpm_reservation in ("max_tokens", "actual"), "known")
        check("charge_rejected", self.charge_rejected in ("request", "full", "none"), "known")
        check("ttft", self.ttft >= 0, ">= 0")
        check("hang_seconds", self.hang_seconds >= 0, ">= 0")
        check(
            "tokens_per_second",
            self.tokens_per_second is None or self.tokens_per_second > 0,
            "None or > 0",
        )
        check("jitter", 0 <= self.jitter <= 1, "within [0, 1]")
        errors = dict(self.errors)
        check("errors", all(400 <= s <= 599 for s in errors), "keyed by error statuses")
        fractions = [*errors.values(), self.hang, self.reset, self.malformed]
        check("errors", all(0 <= p <= 1 for p in fractions), "fractions within [0, 1]")
        check(
            "errors",
            sum(fractions) <= 1 + 1e-9,
            "fractions that, with hang/reset/malformed, sum to <= 1",
        )
        structured = (self.invalid_json, self.schema_violations)
        check(
            "invalid_json",
            all(0 <= p <= 1 for p in structured) and sum(structured) <= 1 + 1e-9,
            "a fraction that, with schema_violations, sums to <= 1",
        )
        # normalize to immutable values, so that the config stays a value
        object.__setattr__(self, "errors", MappingProxyType(errors))
        object.__setattr__(self, "models", tuple(self.models))
        if self.api_keys is not None:
            object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        if not isinstance(self.insufficient_quota, bool):
            object.__setattr__(self, "insufficient_quota", frozenset(self.insufficient_quota))
        if not callable(self.script):
            object.__setattr__(self, "script", tuple(self.script))

    def __repr__(self) -> str:
        """Only the fields that differ from the defaults; API keys are counted, not shown."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == _default(f):
                continue
            if isinstance(value, frozenset):
                parts.append(f"{f.name}=<{len(value)} keys>")
            else:
                shown = dict(value) if isinstance(value, MappingProxyType) else value
                parts.append(f"{f.name}={shown!r}")
        return f"SimulatorConfig({', '.join(parts)})"

    def fault_fractions(self) -> list[tuple[Fault, float]]:
        """The random faults as ``(fault, fraction)`` pairs."""
        pairs = [(Fault(status=status), p) for status, p in self.errors.items()]
        pairs += [(Fault(kind="hang"), self.hang), (Fault(kind="reset"), self.reset)]
        pairs.append((Fault(kind="malformed"), self.malformed))
        return pairs

    def structured_faults(self) -> StructuredFaults:
        """The fractions of JSON answers to spoil, with the seed that draws them."""
        return StructuredFaults(self.invalid_json, self.schema_violations, self.seed)


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    assert f.default_factory is not MISSING
    return f.default_factory()
