"""What an API endpoint must tell the simulator's request pipeline.

The pipeline in :mod:`llmbatch.testing.simulator` is the same for every endpoint:
authenticate → parse → validate → fault plan → quota → rate limits → capacity slot →
latency → answer (or fault). An :class:`Endpoint` supplies the parts that differ:

* per provider (OpenAI, Anthropic): the error body shape, the auth and rate-limit
  errors, which buckets exist and what a request costs in each, the rate-limit headers;
* per endpoint (chat, embeddings, messages): validation, the answer, streaming.

Handlers signal every error answer by raising :class:`ApiError`; the endpoint turns it
into its provider's JSON shape.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from llmbatch.testing._buckets import DAY, MINUTE
from llmbatch.testing._cache import NO_CACHE, CacheUse, PromptCache
from llmbatch.testing._faults import Fault
from llmbatch.testing._quota import Quota, Rejection

if TYPE_CHECKING:
    from aiohttp import web

    from llmbatch.testing._config import SimulatorConfig
    from llmbatch.testing._content import Output
    from llmbatch.testing._structured import Spoil

__all__ = ["Answer", "ApiError", "Endpoint", "dumps", "minute_and_day_buckets", "retry_headers"]


def minute_and_day_buckets(config: SimulatorConfig) -> list[tuple[str, float, int]]:
    """Requests and tokens per minute and per day, as *config* sets them (OpenAI's and
    Gemini's limits; ``Endpoint.bucket_specs``)."""
    specs = [
        ("requests", MINUTE, config.rpm),
        ("tokens", MINUTE, config.tpm),
        ("requests", DAY, config.rpd),
        ("tokens", DAY, config.tpd),
    ]
    return [(name, period, limit) for name, period, limit in specs if limit is not None]


#: one encoder for every body (``json.dumps`` with ``separators`` builds one per call)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(payload: Any) -> bytes:
    """Compact JSON bytes, as the providers send them."""
    return _ENCODER.encode(payload).encode()


def retry_headers(seconds: float, *, milliseconds: bool = True) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up, at least 1) and ``retry-after-ms``."""
    headers = {"retry-after": str(max(1, math.ceil(seconds - 1e-9)))}
    if milliseconds:
        headers["retry-after-ms"] = str(max(1, math.ceil(seconds * 1000 - 1e-6)))
    return headers


class ApiError(Exception):
    """An error answer, in provider-neutral form.

    Args:
        status: the HTTP status.
        message: the human-readable message.
        type: the error ``type`` in the body.
        param: OpenAI's ``param`` (the offending field), if any.
        code: OpenAI's ``code``, if any.
        headers: extra response headers (``retry-after``, ``x-should-retry``).
        label: how the statistics count a 429 (defaults to ``type``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # the providers' own field name
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.label = label or type


class Answer:
    """A successful answer: the body (one JSON document, or the events of a stream).

    Args:
        chunks: the JSON body as one chunk, or the encoded server-sent events.
        completion_tokens: output tokens produced (for OTPM and the statistics).
        streaming: whether ``chunks`` are server-sent events.
        output: what the model wrote, when the statistics count it (JSON answers).
    """

    __slots__ = ("chunks", "completion_tokens", "output", "streaming")

    def __init__(
        self,
        chunks: list[bytes],
        completion_tokens: int,
        *,
        streaming: bool,
        output: Output | None = None,
    ) -> None:
        self.chunks = chunks
        self.completion_tokens = completion_tokens
        self.streaming = streaming
        self.output = output


class Endpoint(ABC):
    """One API endpoint, with its provider's conventions.

    Args:
        config: the simulator's configuration.
    """

    #: ``"openai"`` or ``"anthropic"``
    provider: ClassVar[str]
    #: the URL path it serves
    path: ClassVar[str]
    #: the response header that carries the request id
    request_id_header: ClassVar[str]

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        #: the ``(name, period, limit)`` buckets of each (key, model) quota; empty = unlimited
        self.limits = self.bucket_specs(config)
        #: the fractions of JSON answers to spoil
        self.structured = config.structured_faults()
        #: the prefixes cached for this endpoint's requests (None: prompt caching is off)
        self.prompt_cache = PromptCache() if config.prompt_cache else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"

    # -- per provider ------------------------------------------------------------------

    @staticmethod
    @abstractmethod
    def bucket_specs(config: SimulatorConfig) -> list[tuple[str, float, int]]:
        """The buckets this provider limits, from *config*."""

    @abstractmethod
    def error_body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        """*error* in this provider's JSON shape."""

    @abstractmethod
    def unauthorized(self, *, missing: bool) -> ApiError:
        """The 401 for a missing (or an unknown) API key."""

    @abstractmethod
    def check_headers(self, request: web.Request) -> None:
        """Reject a request whose headers this provider requires but lacks."""

    @abstractmethod
    def out_of_quota(self) -> ApiError:
        """The (non-retryable) error for a key without credit."""

    @abstractmethod
    def costs(self, prompt_tokens: int, reserved: int, cached: int = 0) -> dict[str, int]:
        """What a request costs in each bucket, by bucket name (*cached*: the prompt
        tokens it reads from the prompt cache)."""

    @abstractmethod
    def rate_limited(self, rejection: Rejection, model: str) -> ApiError:
        """The 429 for *rejection*."""

    @abstractmethod
    def ratelimit_headers(self, quota: Quota, headers: dict[str, str]) -> None:
        """Add the rate-limit headers that describe *quota* now."""

    @abstractmethod
    def settle(self, quota: Quota, reserved: int, produced: int) -> None:
        """Correct the charge once the output size is known."""

    @abstractmethod
    def fault_error(self, fault: Fault, model: str) -> ApiError:
        """The error answer an injected ``"error"`` fault sends."""

    @abstractmethod
    def model_not_found(self, model: str) -> ApiError:
        """The 404 for an unknown model."""

    @abstractmethod
    def model_info(self, model: str) -> dict[str, Any]:
        """One entry of the models list."""

    @abstractmethod
    def model_page(self, models: Sequence[str]) -> dict[str, Any]:
        """The body of ``GET /v1/models``."""

    def cache_use(
        self, api_key: str, model: str, body: dict[str, Any], prompt_tokens: int, now: float
    ) -> CacheUse:
        """What *body* reads from and writes to the prompt cache at *now* (nothing is
        kept until :meth:`keep_cached`); :data:`NO_CACHE` when caching is off."""
        if self.prompt_cache is None:
            return NO_CACHE
        scope = f"{api_key}\x00{model}"
        return self.prompt_cache.lookup(self.provider, scope, body, prompt_tokens, now)

    def keep_cached(self, use: CacheUse, now: float) -> None:
        """Keep what an admitted request wrote to (and refresh what it read from) the cache."""
        if self.prompt_cache is not None and use.entries:
            self.prompt_cache.commit(use, now)

    # -- per endpoint ------------------------------------------------------------------

    @abstractmethod
    def validate(self, body: dict[str, Any]) -> tuple[str, int, int]:
        """Check *body*; return ``(model, prompt_tokens, reserved_output_tokens)``.

        Raises:
            ApiError: the 400 (or 404) the provider would send.
        """

    @abstractmethod
    def answer(
        self,
        body: dict[str, Any],
        prompt_tokens: int,
        token: str,
        spoil: Spoil | None = None,
        cache: CacheUse = NO_CACHE,
    ) -> Answer:
        """The successful answer to *body*; *token* makes the response id unique.

        Args:
            spoil: a scripted ``"invalid_json"``/``"schema_violation"`` for a JSON answer
                (ignored by requests that ask for no JSON), or ``"refusal"`` for any
                chat answer. :meth:`validate` has already refused the output formats
                the simulator cannot answer.
            cache: what the request read from and wrote to the prompt cache, reported
                in its usage the provider's way.
        """
