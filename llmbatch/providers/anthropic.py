"""Anthropic's Messages API: :class:`AnthropicProvider` and its error translation.

Needs the ``anthropic`` extra (``pip install 'llmbatch[anthropic]'``).

======================================================  ========================================
status / error type                                     llmbatch error
======================================================  ========================================
429 ``rate_limit_error`` that can never succeed         :class:`RequestTooLarge` (never retried)
429 ``rate_limit_error``                                :class:`RateLimited`
529 ``overloaded_error``, 5xx ``api_error``, 408/409    :class:`ProviderUnavailable`
401 ``authentication_error``, 403 ``permission_error``  :class:`AuthenticationFailed`
``billing_error``, "credit balance is too low"          :class:`QuotaExhausted`
404 ``not_found_error``                                 :class:`NotFound`
400 "prompt is too long"                                :class:`ContextLengthExceeded`
400 ``invalid_request_error``                           :class:`BadRequest`
413 ``request_too_large`` (the HTTP body's size)        :class:`BadRequest`
timeout                                                 :class:`Timeout`
connection never established                            :class:`ConnectionFailed`, connect=True
connection lost, unreadable body                        :class:`ConnectionFailed`, connect=False
======================================================  ========================================

A 429 whose message says the request "can never succeed" asks for more than the whole
per-minute bucket (the limit and the request's size, "rate limit of 50,000 input tokens
per minute (80,000 requested)", become ``capacity``, ``dimension`` and ``requested``):
waiting cannot help. Anthropic's 413 ``request_too_large`` is different: the HTTP body
exceeds the endpoint's size limit, a malformed request rather than a rate limit.

A typed answer (a request's ``response_model``) is asked for as a forced tool whose input
schema is the model's; the call's ``input`` comes back as the response's JSON text, which
the client validates (online and in message batches alike: both take
:meth:`AnthropicProvider.message_params` and :func:`message_response`).

Prompt caching (``prompt_caching="auto"``, the default) marks the shared prefix, the
system prompt (with a typed answer's tool before it), with ``cache_control``, once it is
long enough for the model to cache (:func:`min_cacheable_tokens`): Anthropic then
charges the first request 1.25x the input price for that prefix and every request within
five minutes 0.1x, and those reads leave ITPM alone. :func:`message_response` reads
``cache_read_input_tokens`` into ``Usage.cached_tokens``, and
:meth:`AnthropicProvider.settlement` leaves them out of ITPM.

A prefix is written by the first request that carries it, and becomes readable only once
that request is answered: a job that starts hundreds of requests at once would pay the
1.25x write hundreds of times. So the first request with a cold prefix goes alone, and
the others with the same prefix wait for its answer (online; a Batch API shares no
cache across its requests anyway). A prefix the server did not cache is not waited for
again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import httpx2

try:
    import anthropic
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Anthropic provider needs the 'anthropic' package: pip install 'llmbatch[anthropic]'"
    ) from exc

from llmbatch._log import get_logger
from llmbatch.batchapi import AnyRequest, BatchLimits, BatchStatus, Outcome
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    BatchExpired,
    ConnectionFailed,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    RequestTooLarge,
    Timeout,
    key_hint,
)
from llmbatch.limits import key_fingerprint
from llmbatch.models import EmbeddingRequest, Request, Response, Usage
from llmbatch.providers.base import MAX_CONNECTIONS, Admission, AsyncClosing, never_connected
from llmbatch.retry import parse_retry_after
from llmbatch.structured import ResponseSchema
from llmbatch.tokens import admission_estimate

__all__ = [
    "AnthropicProvider",
    "classify_anthropic_error",
    "classify_anthropic_status",
    "message_response",
    "min_cacheable_tokens",
]

logger = get_logger("llmbatch.providers")

#: Anthropic requires max_tokens; this is used when a request sets none
DEFAULT_MAX_TOKENS = 1024

#: input tokens charged at admission for the system prompt Anthropic adds when tools are
#: used: a few hundred by model and tool_choice (its tool-use pricing page listed 235-340
#: for a forced tool on the Claude 3 models); a bound, which settlement corrects from usage
TOOL_PROMPT_TOKENS = 350
#: what ``refusal`` says when a refusing message has no text of its own
_REFUSED = "the model declined to answer (stop_reason: refusal)"

#: the shortest prefix Anthropic caches, by model name prefix (its prompt-caching
#: documentation, 2026); a shorter prefix marked with cache_control is simply not cached
CACHE_MIN_TOKENS: tuple[tuple[str, int], ...] = (
    ("claude-opus-4-6", 4096),
    ("claude-opus-4-5", 4096),
    ("claude-haiku-4-5", 4096),
    ("claude-sonnet-4-6", 2048),
    ("claude-3-5-haiku", 2048),
    ("claude-3-haiku", 2048),
)
#: every other model's minimum: Sonnet 4.5, Opus 4 and 4.1, Sonnet 4, Sonnet 3.7...
DEFAULT_CACHE_MIN_TOKENS = 1024
_EPHEMERAL: Mapping[str, str] = {"type": "ephemeral"}
#: seconds a prefix the server reported reading from its cache is taken to stay there
#: (its TTL is five minutes from the last use; the margin covers requests in flight)
WARM_SECONDS = 270.0
#: the most warm prefixes remembered (a job has one; a long-lived provider may see many)
_MAX_WARM = 256

_NEVER = re.compile(r"\bcan never (?:succeed|be admitted|fit)\b", re.IGNORECASE)
_LIMIT_OF = re.compile(
    r"rate limit of ([\d,]+) (input tokens|output tokens|tokens|requests) per minute"
)
_REQUESTED = re.compile(r"\(([\d,]+) requested\)")
_DIMENSIONS = {
    "input tokens": "input_tpm",
    "output tokens": "output_tpm",
    "tokens": "tpm",
    "requests": "rpm",
}


def _too_large(message: str, context: dict[str, Any]) -> RequestTooLarge:
    """:class:`RequestTooLarge` from a 429 that says the request can never succeed."""
    limit = _LIMIT_OF.search(message)
    requested = _REQUESTED.search(message)
    return RequestTooLarge(
        _DIMENSIONS[limit.group(2)] if limit else None,
        float(requested.group(1).replace(",", "")) if requested else None,
        float(limit.group(1).replace(",", "")) if limit else None,
        message=message,
        **{**context, "retry_after": None},
    )


def classify_anthropic_status(
    status: int,
    body: Any,
    headers: Mapping[str, str],
    *,
    provider: str = "anthropic",
    model: str | None = None,
) -> LLMBatchError:
    """The llmbatch error for an HTTP error response from the Messages API."""
    error = body.get("error") if isinstance(body, Mapping) else None
    kind = error.get("type") if isinstance(error, Mapping) else None
    message = str(error.get("message") or "") if isinstance(error, Mapping) else ""
    lower = {k.lower(): v for k, v in headers.items()}
    context: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "status_code": status,
        "request_id": lower.get("request-id")
        or (body.get("request_id") if isinstance(body, Mapping) else None),
        "retry_after": parse_retry_after(lower),
    }
    message = message or f"HTTP {status}"
    if kind == "billing_error" or "credit balance" in message.lower():
        context["retry_after"] = None
        return QuotaExhausted(f"{message} (add credit or use another key)", **context)
    if status == 429 or kind == "rate_limit_error":
        if _NEVER.search(message):
            return _too_large(message, context)
        return RateLimited(message, **context)
    if status in (401, 403) or kind in ("authentication_error", "permission_error"):
        return AuthenticationFailed(message, **context)
    if status == 404 or kind == "not_found_error":
        return NotFound(message, **context)
    if status in (408, 409, 529) or status >= 500:
        return ProviderUnavailable(message, **context)
    if "prompt is too long" in message.lower():
        return ContextLengthExceeded(message, **context)
    return BadRequest(message, **context)


def classify_anthropic_error(
    exc: BaseException, *, provider: str = "anthropic", model: str | None = None
) -> LLMBatchError:
    """Translate an exception raised by the ``anthropic`` SDK into :mod:`llmbatch.errors`."""
    if isinstance(exc, LLMBatchError):
        return exc
    if isinstance(exc, anthropic.APIConnectionError) and never_connected(exc):
        # APITimeoutError included: a connect timeout sent nothing either.
        return ConnectionFailed(
            f"could not connect: {exc.__cause__ or exc}",
            connect=True,
            provider=provider,
            model=model,
        )
    if isinstance(exc, anthropic.APITimeoutError):
        return Timeout("the request timed out", provider=provider, model=model)
    if isinstance(exc, anthropic.APIConnectionError):
        return ConnectionFailed(
            f"connection failed: {exc.__cause__ or exc}", provider=provider, model=model
        )
    if isinstance(exc, anthropic.APIStatusError):
        return classify_anthropic_status(
            exc.status_code, exc.body, exc.response.headers, provider=provider, model=model
        )
    if isinstance(exc, json.JSONDecodeError | anthropic.APIResponseValidationError):
        return ConnectionFailed(
            f"unreadable response from the server: {exc}", provider=provider, model=model
        )
    raise exc


@functools.lru_cache(maxsize=256)
def _tool_tokens(schema: ResponseSchema[Any]) -> int:
    """The input tokens a typed answer's forced tool adds: its definition by characters,
    and the tool-use system prompt; once per schema (it hashes by its fingerprint)."""
    tool = [schema.anthropic_tool(), schema.anthropic_tool_choice()]
    return math.ceil(len(json.dumps(tool, separators=(",", ":"))) / 4) + TOOL_PROMPT_TOKENS


def min_cacheable_tokens(model: str) -> int:
    """The shortest prompt prefix Anthropic caches for *model* (see :data:`CACHE_MIN_TOKENS`)."""
    for prefix, tokens in CACHE_MIN_TOKENS:
        if model.startswith(prefix):
            return tokens
    return DEFAULT_CACHE_MIN_TOKENS


@functools.lru_cache(maxsize=256)
def _prefix_tokens(system: str, model: str) -> int:
    """The estimated tokens of a system prompt; once per prompt, as every item of a job
    sends the same one."""
    return admission_estimate([{"role": "system", "content": system}], model)


def _has_cache_control(value: Any) -> bool:
    """Whether *value* (a request's messages or ``extra``) places ``cache_control``
    anywhere: a block, a tool, the request itself."""
    if isinstance(value, Mapping):
        return "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_cache_control(v) for v in value)
    return False


class AnthropicProvider(AsyncClosing):
    """Messages through the official ``anthropic`` client (``max_retries=0``).

    A ``system`` message of the request becomes Anthropic's ``system`` parameter.

    Prompt caching: with ``prompt_caching="auto"`` the shared prefix, the system prompt
    (and a typed answer's tool, which comes before it), is sent as a block marked
    ``"cache_control": {"type": "ephemeral"}`` when it reaches the model's minimum
    cacheable length (:func:`min_cacheable_tokens`, estimated; shorter prompts go as
    before). It is the default because llmbatch sends many requests with one
    instruction: the first pays 1.25x the input price for that prefix, each one within
    five minutes 0.1x, so a single reuse pays for the write (1.25 + 0.1 < 2), and the
    reads do not count toward ITPM. The price of marking a prefix that is never reused
    is 25% more on that prefix: ``prompt_caching="off"`` for jobs whose every system
    prompt differs. A request that places ``cache_control`` itself (in its message
    blocks, or in ``extra``) is sent as it is. The per-item text (the user message) is
    never marked; put a long shared instruction in ``system`` to have it cached.

    Args:
        api_key: the key (default: ``ANTHROPIC_API_KEY``); never logged or shown.
        base_url: another Anthropic-compatible server (a simulator).
        timeout: seconds per HTTP request.
        reserve_output: reserve ``max_tokens`` against OTPM at admission (Anthropic's
            earlier documented rule); ``False`` charges the output only when settled.
        name: the provider's name in limits and logs.
        transport: ``"aiohttp"`` (the default: the SDK's aiohttp transport, far less CPU
            per request) or ``"httpx"`` (the SDK's default); room for 2,048 connections
            either way (see :func:`llmbatch.providers.openai.http_client`).
        prompt_caching: ``"auto"`` marks the shared prefix for Anthropic's prompt cache
            (see above); ``"off"`` never marks anything.
        clock: the monotonic clock that times how long a cached prefix stays warm
            (see :meth:`admission`; a ``FakeClock`` in tests).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 600.0,
        reserve_output: bool = True,
        name: str = "anthropic",
        transport: Literal["aiohttp", "httpx"] = "aiohttp",
        prompt_caching: Literal["auto", "off"] = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if prompt_caching not in ("auto", "off"):
            raise ValueError(f"prompt_caching must be 'auto' or 'off', not {prompt_caching!r}")
        limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100)
        if transport == "aiohttp":
            http: httpx2.AsyncClient = anthropic.DefaultAioHttpClient(
                limits=limits, timeout=timeout
            )
        elif transport == "httpx":
            http = anthropic.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
        else:
            raise ValueError(f"transport must be 'aiohttp' or 'httpx', not {transport!r}")
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0, http_client=http
        )
        self.name = name
        self.reserve_output = reserve_output
        self.prompt_caching = prompt_caching
        #: (model, system prompt) -> until when the server is taken to hold it cached
        self._warm: dict[tuple[str, str], float] = {}
        #: (model, system prompt) -> the answer of the request writing it, which the
        #: others with that prefix wait for (see the module docstring)
        self._priming: dict[tuple[str, str], asyncio.Future[None]] = {}
        #: prefixes the server did not cache when asked: not waited for again
        self._uncached: set[tuple[str, str]] = set()
        self._clock = clock
        #: Anthropic counts the tokens a request actually used: the unused part of a
        #: max_tokens reservation comes back when the request is settled
        self.refunds_unused = True
        key = self._client.api_key or ""
        self.quota_key = key_fingerprint(key) + "@" + str(self._client.base_url)
        self.key_hint = key_hint(key)

    def __repr__(self) -> str:
        return (
            f"<AnthropicProvider {self.name} {self._client.base_url} "
            f"prompt_caching={self.prompt_caching}>"
        )

    async def aclose(self) -> None:
        """Close the SDK client."""
        await self._client.close()

    def admission(self, request: Request, model: str) -> Admission:
        """One request, the input estimate (with a typed answer's tool, which Anthropic
        counts as input), and (if reserved) max_tokens of output.

        A prefix this provider marks for caching and the server has lately reported
        reading from its cache is left out of the input: cache reads do not count
        toward ITPM. Should the server not read it after all, the settlement charges
        the difference."""
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        output = float(max_tokens) if self.reserve_output else 0.0
        prompt = admission_estimate(request.messages, model)
        schema = request.schema
        if schema is not None:
            prompt += _tool_tokens(schema)
        prefix = self._auto_prefix(request, model)
        if prefix is not None and self._warm.get((model, prefix[0]), 0.0) > self._clock():
            prompt = max(1, prompt - prefix[1])
        return Admission(requests=1, input_tokens=prompt, output_tokens=output)

    def settlement(self, request: Request, response: Response) -> Admission:
        """Anthropic counts the actual tokens: uncached input (cache writes included,
        cache reads not) against ITPM, output against OTPM. An answer that read a
        prefix this provider marked keeps that prefix warm for :meth:`admission`."""
        usage = response.usage
        if usage.cached_tokens:
            model = request.model or ""
            prefix = self._auto_prefix(request, model)
            if prefix is not None:
                self._remember_warm((model, prefix[0]))
        return Admission(
            input_tokens=max(0, usage.input_tokens - usage.cached_tokens),
            output_tokens=usage.output_tokens,
        )

    def _auto_prefix(self, request: Request, model: str) -> tuple[str, int] | None:
        """``(system prompt, estimated tokens of the prefix it ends)`` when
        ``prompt_caching="auto"`` marks it for *request*: long enough for *model* to
        cache (a typed answer's tool, which comes first, included), and no
        ``cache_control`` placed by the request itself."""
        if self.prompt_caching != "auto":
            return None
        system = [str(m["content"]) for m in request.messages if m.get("role") == "system"]
        if not system:
            return None
        text = "\n\n".join(system)
        schema = request.schema
        tokens = _prefix_tokens(text, model) + (_tool_tokens(schema) if schema else 0)
        if tokens < min_cacheable_tokens(model):
            return None
        if _has_cache_control(request.messages) or _has_cache_control(request.extra):
            return None
        return text, tokens

    def message_params(self, request: Request) -> dict[str, Any]:
        """The Messages API body for *request* (online and in message batches).

        A typed answer (``response_model``) is a forced tool: ``tools`` holds
        :meth:`~llmbatch.structured.ResponseSchema.anthropic_tool` and ``tool_choice``
        forces it (Anthropic refuses that together with extended thinking). With
        prompt caching on, the system prompt is a text block marked with
        ``cache_control`` (see the class docstring)."""
        model = request.model
        if not model:
            raise BadRequest("no model given", provider=self.name)
        if request.n != 1:
            raise BadRequest(
                f"Anthropic's Messages API answers one completion per request, not n={request.n}",
                provider=self.name,
                model=model,
            )
        system = [str(m["content"]) for m in request.messages if m.get("role") == "system"]
        messages = [dict(m) for m in request.messages if m.get("role") != "system"]
        params: dict[str, Any] = {
            "model": model,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": messages,
        }
        if system:
            params["system"] = "\n\n".join(system)
        if request.temperature is not None:
            params["temperature"] = request.temperature
        schema = request.schema
        if schema is not None:
            params["tools"] = [schema.anthropic_tool()]
            params["tool_choice"] = schema.anthropic_tool_choice()
        prefix = self._auto_prefix(request, model)
        if prefix is not None:
            params["system"] = [
                {"type": "text", "text": prefix[0], "cache_control": dict(_EPHEMERAL)}
            ]
        params.update(request.extra)
        return params

    async def complete(self, request: Request) -> Response:
        """One message; errors come out as :mod:`llmbatch.errors` exceptions. A
        request whose cached prefix is cold waits while another request writes it."""
        model = request.model or ""
        prefix = self._auto_prefix(request, model)
        if prefix is None:
            return await self._complete(request)
        slot = (model, prefix[0])
        while self._cold(slot):
            primer = self._priming.get(slot)
            if primer is None:
                return await self._prime(slot, request)
            await asyncio.shield(primer)
        return await self._complete(request)

    def _cold(self, slot: tuple[str, str]) -> bool:
        """Whether the prefix *slot* is worth waiting for: not warm, and cacheable."""
        return slot not in self._uncached and self._warm.get(slot, 0.0) <= self._clock()

    async def _prime(self, slot: tuple[str, str], request: Request) -> Response:
        """Send *request* alone to write the prefix *slot*; the others wait for it."""
        primer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._priming[slot] = primer
        try:
            response = await self._complete(request)
            usage = response.usage
            if usage.cache_write_tokens or usage.cached_tokens:
                self._remember_warm(slot)
            else:
                if len(self._uncached) >= _MAX_WARM:
                    self._uncached.clear()  # (bounded, as the warm prefixes are)
                self._uncached.add(slot)  # too short for the server: never wait again
                logger.info("anthropic.prefix_not_cached", model=slot[0])
            return response
        finally:
            del self._priming[slot]
            primer.set_result(None)  # answered or failed: the others go (one primes anew)

    def _remember_warm(self, slot: tuple[str, str]) -> None:
        if len(self._warm) >= _MAX_WARM:
            self._warm.clear()
        self._warm[slot] = self._clock() + WARM_SECONDS

    async def _complete(self, request: Request) -> Response:
        """One Messages API call."""
        params = self.message_params(request)
        started = time.monotonic()
        try:
            raw = await self._client.messages.with_raw_response.create(**params)
            message = await raw.parse()
        except (anthropic.AnthropicError, json.JSONDecodeError) as exc:
            error = classify_anthropic_error(exc, provider=self.name, model=request.model)
            error.key_hint = self.key_hint
            raise error from exc
        return message_response(
            message,
            request,
            request_id=raw.headers.get("request-id"),
            latency=time.monotonic() - started,
            headers=dict(raw.headers),
        )

    def batch(self) -> AnthropicBatchBackend:
        """This provider's Message Batches API (half price, its own quota)."""
        return AnthropicBatchBackend(self, self._client)


def message_response(
    message: anthropic.types.Message,
    request: Request,
    *,
    request_id: str | None,
    latency: float = 0.0,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The :class:`Response` for a Messages API ``message`` (online or batch result).

    For a typed answer the forced tool call's ``input`` is the text, as JSON (a message
    without that call keeps its text, which then fails validation). ``stop_reason``
    ``"refusal"`` sets ``refusal`` (the message's text, if it has any); the stop reason
    is the finish reason as it comes (``"tool_use"`` is a forced tool's normal end).
    """
    text = "".join(getattr(block, "text", "") for block in message.content)
    refusal = (text.strip() or _REFUSED) if message.stop_reason == "refusal" else None
    schema = request.schema
    if schema is not None:
        for block in message.content:
            if isinstance(block, anthropic.types.ToolUseBlock) and block.name == schema.name:
                text = json.dumps(block.input, ensure_ascii=False)
                break
    return Response(
        text=text,
        model=message.model or request.model,
        usage=Usage(
            # Anthropic's input_tokens leave out what was read from or written to the
            # prompt cache; Usage counts every prompt token, cached ones included.
            input_tokens=message.usage.input_tokens
            + (message.usage.cache_read_input_tokens or 0)
            + (message.usage.cache_creation_input_tokens or 0),
            output_tokens=message.usage.output_tokens,
            cached_tokens=message.usage.cache_read_input_tokens or 0,
            cache_write_tokens=message.usage.cache_creation_input_tokens or 0,
        ),
        finish_reason=message.stop_reason,
        request_id=request_id,
        latency=latency,
        refusal=refusal,
        key=request.key,
        headers=dict(headers or {}),
    )


# -- the Batch API -------------------------------------------------------------------------


class AnthropicBatchBackend:
    """Anthropic's Message Batches: the requests in one call, results as JSON lines."""

    limits = BatchLimits(max_requests=100_000, max_bytes=256 * 1024 * 1024, one_model=False)

    def __init__(
        self,
        provider: AnthropicProvider,
        client: anthropic.AsyncAnthropic,
        *,
        limits: BatchLimits | None = None,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self._client = client
        if limits is not None:
            self.limits = limits

    def line(self, custom_id: str, request: AnyRequest) -> dict[str, Any]:
        """``{"custom_id", "params"}``."""
        if isinstance(request, EmbeddingRequest):
            raise BadRequest("Anthropic has no embeddings API", provider=self.name)
        return {"custom_id": custom_id, "params": self.provider.message_params(request)}

    async def submit(self, lines: Sequence[Mapping[str, Any]], *, model: str | None) -> str:
        """Create the message batch."""
        batch = await self._call(self._client.messages.batches.create(requests=list(lines)))  # type: ignore[arg-type]
        return str(batch.id)

    async def status(self, batch_id: str) -> BatchStatus:
        """``ended`` once Anthropic says so (counts stay 0 until then, as documented)."""
        batch = await self._call(self._client.messages.batches.retrieve(batch_id))
        counts = batch.request_counts
        count_map = {
            "processing": counts.processing,
            "succeeded": counts.succeeded,
            "errored": counts.errored,
            "canceled": counts.canceled,
            "expired": counts.expired,
        }
        state = "ended" if batch.processing_status == "ended" else "running"
        return BatchStatus(batch_id, state, batch.processing_status, count_map)

    async def results(self, batch_id: str) -> AsyncIterator[tuple[str, Any]]:
        """The results file's entries."""
        stream = await self._call(self._client.messages.batches.results(batch_id))
        async for entry in stream:
            yield entry.custom_id, entry.result

    def outcome(self, raw: Any, request: AnyRequest) -> Outcome:
        """The message, the classified error, or :class:`BatchExpired` for
        ``canceled`` / ``expired`` entries."""
        kind = getattr(raw, "type", None)
        if kind == "succeeded" and isinstance(request, Request):
            return message_response(raw.message, request, request_id=None)
        if kind in ("canceled", "expired"):
            return BatchExpired(
                f"the request was {kind} before it ran", provider=self.name, model=request.model
            )
        error: Any = getattr(raw, "error", None)
        body: dict[str, Any] = error.model_dump() if hasattr(error, "model_dump") else {}
        inner = body.get("error") or {}
        status = {"overloaded_error": 529, "api_error": 500, "rate_limit_error": 429}.get(
            str(inner.get("type")), 400
        )
        return classify_anthropic_status(status, body, {}, provider=self.name, model=request.model)

    async def cancel(self, batch_id: str) -> None:
        """Cancel the batch."""
        await self._call(self._client.messages.batches.cancel(batch_id))

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except anthropic.AnthropicError as exc:
            raise classify_anthropic_error(exc, provider=self.name) from exc
