"""OpenAI (and any OpenAI-compatible server): :class:`OpenAIProvider`, and the error
translation at the adapter boundary.

:func:`classify_openai_error` maps everything the ``openai`` SDK (built on httpx2) can
raise into :mod:`llmbatch.errors`, in one place, following the providers' documented
rules (PROTOCOLS.md):

=================================================  ====================================
status / body                                      llmbatch error
=================================================  ====================================
429, ``type`` or ``code`` ``insufficient_quota``   :class:`QuotaExhausted` (never retried)
429, billing codes under ``insufficient_quota``    :class:`QuotaExhausted`
429, ``x-should-retry: false`` (request too big)   :class:`BadRequest`
429 otherwise (incl. Azure ``code: "429"``)        :class:`RateLimited` (``kind`` = type;
                                                   no retry-after: the reset header)
401, 403                                           :class:`AuthenticationFailed`
404                                                :class:`NotFound` (model or endpoint)
400/422 ``context_length_exceeded``                :class:`ContextLengthExceeded`
400 ``content_filter`` / ``content_policy_...``    :class:`ContentFiltered`
400, 413, 422 otherwise                            :class:`BadRequest`
408, 409, 5xx, 529                                 :class:`ProviderUnavailable`
timeout                                            :class:`Timeout`
connection error, unreadable body                  :class:`ConnectionFailed`
=================================================  ====================================

``retry_after`` comes from the response headers (:func:`~llmbatch.retry.parse_retry_after`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import openai

from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContentFiltered,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    Timeout,
    key_hint,
)
from llmbatch.limits import key_fingerprint, parse_go_duration
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response, Usage
from llmbatch.providers.base import Admission, AsyncClosing
from llmbatch.retry import parse_retry_after
from llmbatch.tokens import openai_admission_estimate

if TYPE_CHECKING:
    from llmbatch.batchapi import OpenAIBatchBackend

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "OpenAIProvider",
    "chat_response",
    "classify_openai_error",
    "classify_openai_status",
    "embedding_response",
]

#: what OpenAI reserves against TPM when a request sets no max_tokens (conservative)
DEFAULT_MAX_TOKENS = 4096

_QUOTA = "insufficient_quota"
_BILLING_CODES = frozenset({_QUOTA, "billing_hard_limit_reached", "credit_balance_exhausted"})
_FILTERED = frozenset({"content_filter", "content_policy_violation"})


def _error_fields(body: Any) -> tuple[str, str | None, str | None]:
    """``(message, type, code)`` from an OpenAI (or Azure) error body."""
    error = body.get("error", body) if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return (str(body) if body else "", None, None)
    code = error.get("code")
    kind = error.get("type")
    return (
        str(error.get("message") or ""),
        str(kind) if kind is not None else None,
        str(code) if code is not None else None,
    )


def classify_openai_status(
    status: int,
    body: Any,
    headers: Mapping[str, str],
    *,
    provider: str = "openai",
    model: str | None = None,
) -> LLMBatchError:
    """The llmbatch error for an HTTP error response from an OpenAI-compatible server."""
    message, kind, code = _error_fields(body)
    lower = {k.lower(): v for k, v in headers.items()}
    retry_after = parse_retry_after(lower)
    if retry_after is None and status == 429:
        # No explicit hint: the reset header of the bucket that overflowed.
        reset = lower.get(
            "x-ratelimit-reset-tokens" if kind == "tokens" else "x-ratelimit-reset-requests"
        )
        retry_after = parse_go_duration(reset) if reset else None
    context: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "status_code": status,
        "request_id": lower.get("x-request-id"),
        "retry_after": retry_after,
    }
    message = message or f"HTTP {status}"
    if status == 429:
        if kind == _QUOTA or code in _BILLING_CODES:
            context["retry_after"] = None
            return QuotaExhausted(
                f"{message} (quota exhausted: add credit or use another key)", **context
            )
        if lower.get("x-should-retry", "").lower() == "false":
            return BadRequest(message, **context)
        return RateLimited(
            message, kind=kind if kind in ("requests", "tokens") else None, **context
        )
    if status in (401, 403):
        return AuthenticationFailed(message, **context)
    if status == 404:
        return NotFound(message, **context)
    if status in (400, 413, 422):
        if code == "context_length_exceeded":
            return ContextLengthExceeded(message, **context)
        if code in _FILTERED:
            return ContentFiltered(message, **context)
        return BadRequest(message, **context)
    if status in (408, 409) or status >= 500:
        return ProviderUnavailable(message, **context)
    return BadRequest(message, **context)


def classify_openai_error(
    exc: BaseException, *, provider: str = "openai", model: str | None = None
) -> LLMBatchError:
    """Translate an exception raised by the ``openai`` SDK into :mod:`llmbatch.errors`.

    An exception that is already an :class:`LLMBatchError` is returned as is; anything
    unexpected becomes :class:`ConnectionFailed` only if it is a transport or decoding
    problem, and is re-raised otherwise (a bug should not be retried as an outage).
    """
    if isinstance(exc, LLMBatchError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return Timeout("the request timed out", provider=provider, model=model)
    if isinstance(exc, openai.APIConnectionError):
        return ConnectionFailed(
            f"connection failed: {exc.__cause__ or exc}", provider=provider, model=model
        )
    if isinstance(exc, openai.APIStatusError):
        return classify_openai_status(
            exc.status_code, exc.body, exc.response.headers, provider=provider, model=model
        )
    if isinstance(exc, json.JSONDecodeError | openai.APIResponseValidationError):
        return ConnectionFailed(
            f"unreadable response from the server: {exc}", provider=provider, model=model
        )
    raise exc


class OpenAIProvider(AsyncClosing):
    """Chat completions through the official ``openai`` client (any compatible server).

    The SDK client is built with ``max_retries=0``: llmbatch's retry layer is the only
    one, so the rate limiter sees every attempt.

    Args:
        api_key: the key (default: ``OPENAI_API_KEY``); never logged or shown.
        base_url: another OpenAI-compatible server (vLLM, llama.cpp, Ollama, a simulator).
        timeout: seconds per HTTP request (the SDK's timeout).
        client: a ready ``openai.AsyncOpenAI`` to use instead (its retries are yours).
        name: the provider's name in limits and logs.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 600.0,
        client: openai.AsyncOpenAI | None = None,
        name: str = "openai",
    ) -> None:
        self._client = client or openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0
        )
        self._owns_client = client is None
        self.name = name
        self.quota_key = key_fingerprint(self._client.api_key) + "@" + str(self._client.base_url)
        key = self._client.api_key or ""
        #: the last four characters of the key, the only part ever shown
        self.key_hint = key_hint(key)

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.name} {self._client.base_url}>"

    async def aclose(self) -> None:
        """Close the SDK client if this provider created it."""
        if self._owns_client:
            await self._client.close()

    def admission(self, request: Request | EmbeddingRequest, model: str) -> Admission:
        """OpenAI's rule: prompt estimate + max_tokens x n tokens, and one request
        (an embedding: its input's estimate).

        The prompt estimate is character-based, as OpenAI documents its own
        (:func:`~llmbatch.tokens.openai_admission_estimate`).
        """
        if isinstance(request, EmbeddingRequest):
            return Admission(requests=1, tokens=math.ceil(len(request.input) / 4) + 1)
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        prompt = openai_admission_estimate(request.messages)
        return Admission(requests=1, tokens=prompt + max_tokens * request.n)

    def settlement(
        self, request: Request | EmbeddingRequest, response: Response | Embedding
    ) -> Admission:
        """OpenAI charges its rate limit at admission, from its own character-based
        estimate of the prompt plus max_tokens x n, and keeps that reservation whatever
        the answer's length or the prompt's exact count: the admission charge is final."""
        return Admission(tokens=self.admission(request, request.model or "")["tokens"])

    def chat_params(self, request: Request) -> dict[str, Any]:
        """The ``/v1/chat/completions`` body for *request* (online and in batch files)."""
        model = request.model
        if not model:
            raise BadRequest("no model given", provider=self.name)
        params: dict[str, Any] = {"model": model, "messages": list(request.messages)}
        if request.max_tokens is not None:
            params["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.n != 1:
            params["n"] = request.n
        if request.response_format is not None:
            params["response_format"] = dict(request.response_format)
        params.update(request.extra)
        return params

    async def complete(self, request: Request) -> Response:
        """One chat completion; errors come out as :mod:`llmbatch.errors` exceptions."""
        params = self.chat_params(request)
        started = time.monotonic()
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**params)
            completion = raw.parse()
        except (openai.OpenAIError, json.JSONDecodeError) as exc:
            error = classify_openai_error(exc, provider=self.name, model=request.model)
            error.key_hint = self.key_hint
            raise error from exc
        return chat_response(
            completion,
            request,
            request_id=raw.headers.get("x-request-id"),
            latency=time.monotonic() - started,
            headers=dict(raw.headers),
        )

    def embedding_params(self, request: EmbeddingRequest) -> dict[str, Any]:
        """The ``/v1/embeddings`` body for *request* (online and in batch files)."""
        if not request.model:
            raise BadRequest("no model given", provider=self.name)
        params: dict[str, Any] = {"model": request.model, "input": request.input}
        if request.dimensions is not None:
            params["dimensions"] = request.dimensions
        return params

    async def embed(self, request: EmbeddingRequest) -> Embedding:
        """One embedding; errors come out as :mod:`llmbatch.errors` exceptions."""
        params = self.embedding_params(request)
        started = time.monotonic()
        try:
            raw = await self._client.embeddings.with_raw_response.create(**params)
            result = raw.parse()
        except (openai.OpenAIError, json.JSONDecodeError) as exc:
            error = classify_openai_error(exc, provider=self.name, model=request.model)
            error.key_hint = self.key_hint
            raise error from exc
        return embedding_response(
            result,
            request,
            request_id=raw.headers.get("x-request-id"),
            latency=time.monotonic() - started,
            headers=dict(raw.headers),
        )

    def batch(self) -> OpenAIBatchBackend:
        """This provider's Batch API (half price, its own quota)."""
        from llmbatch.batchapi import OpenAIBatchBackend

        return OpenAIBatchBackend(self, self._client)


def chat_response(
    completion: openai.types.chat.ChatCompletion,
    request: Request,
    *,
    request_id: str | None,
    latency: float = 0.0,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The :class:`Response` for a ``chat.completion`` (online, or a batch output line)."""
    choice = completion.choices[0] if completion.choices else None
    text = (choice.message.content if choice else None) or ""
    usage = completion.usage
    cached = 0
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens or 0
    parsed = None
    if request.response_format is not None and text:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
    return Response(
        text=text,
        model=completion.model or request.model,
        usage=Usage(
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=cached,
        ),
        finish_reason=choice.finish_reason if choice else None,
        request_id=request_id,
        latency=latency,
        parsed=parsed,
        key=request.key,
        headers=dict(headers or {}),
    )


def embedding_response(
    result: openai.types.CreateEmbeddingResponse,
    request: EmbeddingRequest,
    *,
    request_id: str | None,
    latency: float = 0.0,
    headers: Mapping[str, str] | None = None,
) -> Embedding:
    """The :class:`Embedding` for an embeddings ``list`` (online, or a batch output line)."""
    if not result.data:
        raise BadRequest("the server returned no embedding", model=request.model)
    return Embedding(
        vector=tuple(result.data[0].embedding),
        model=result.model or request.model,
        usage=Usage(input_tokens=result.usage.prompt_tokens if result.usage else 0),
        request_id=request_id,
        latency=latency,
        key=request.key,
        headers=dict(headers or {}),
    )
