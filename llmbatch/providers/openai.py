"""OpenAI (and any OpenAI-compatible server): :class:`OpenAIProvider`, and the error
translation at the adapter boundary.

:func:`classify_openai_error` maps everything the ``openai`` SDK (built on httpx2) can
raise into :mod:`llmbatch.errors`, in one place, following the providers' documented
rules (PROTOCOLS.md):

================================================  =============================================
status / body                                     llmbatch error
================================================  =============================================
429, ``type`` or ``code`` ``insufficient_quota``  :class:`QuotaExhausted` (never retried)
429, billing codes under ``insufficient_quota``   :class:`QuotaExhausted`
429, message "Request too large ..."              :class:`RequestTooLarge` (never retried,
                                                  with or without ``x-should-retry``)
429, ``x-should-retry: false`` otherwise          :class:`BadRequest`
429 otherwise (incl. Azure ``code: "429"``)       :class:`RateLimited` (``kind`` = type;
                                                  no retry-after: the reset header)
401, 403                                          :class:`AuthenticationFailed`
404                                               :class:`NotFound` (model or endpoint)
400/422 ``context_length_exceeded``               :class:`ContextLengthExceeded`
400 ``content_filter`` / ``content_policy_...``   :class:`ContentFiltered`
400, 413, 422 otherwise                           :class:`BadRequest`
408, 409, 5xx, 529                                :class:`ProviderUnavailable`
timeout                                           :class:`Timeout`
connection never established                      :class:`ConnectionFailed` (``connect=True``)
connection lost, unreadable body                  :class:`ConnectionFailed` (``connect=False``)
================================================  =============================================

"Request too large" is OpenAI's 429 for a request that needs more than a whole bucket
(more tokens than the key's TPM): waiting cannot help, yet the server does not reliably
send ``x-should-retry: false`` with it, so the message decides. Its bucket and numbers
become the error's ``dimension`` (``"tpm"``, ``"rpm"``, ``"tpd"``...), ``capacity`` and
``requested``.

A connection error is ``connect=True`` when the connection was never established
(refused, name resolution, TLS handshake, connect timeout; httpx2's ``ConnectError``
and ``ConnectTimeout`` in the exception's cause chain): nothing reached the server.

``retry_after`` comes from the response headers (:func:`~llmbatch.retry.parse_retry_after`).

Typed answers (a request's ``response_model``) go as ``response_format``: a ``json_schema``,
strict when strict mode can carry the schema's shape (:func:`strict_fits`), or, for
OpenAI-compatible servers without schemas (``structured_outputs="json_object"``), JSON mode
with the schema stated in the system prompt. Either way the client validates the answer.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import httpx2
import openai

from llmbatch.batchapi import AnyRequest, BatchLimits, BatchStatus, Outcome
from llmbatch.config import ProviderProfile, load_providers, provider_profile
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    BatchExpired,
    ConnectionFailed,
    ContentFiltered,
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
from llmbatch.limits import key_fingerprint, parse_go_duration
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response, Usage
from llmbatch.providers.base import MAX_CONNECTIONS, Admission, AsyncClosing, never_connected
from llmbatch.retry import parse_retry_after
from llmbatch.structured import ResponseSchema, StrictSchema
from llmbatch.tokens import openai_admission_estimate

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "OpenAIBatchBackend",
    "OpenAIProvider",
    "StructuredOutputs",
    "chat_response",
    "classify_openai_error",
    "classify_openai_status",
    "embedding_response",
    "never_connected",
    "strict_fits",
]

#: how a server is asked for a typed answer: a ``json_schema`` response format (OpenAI,
#: and servers that enforce schemas), or JSON mode with the schema in the system prompt
StructuredOutputs: TypeAlias = Literal["json_schema", "json_object"]

#: what OpenAI reserves against TPM when a request sets no max_tokens (conservative)
DEFAULT_MAX_TOKENS = 4096

#: the request-count headers of a provider whose count is per day (Groq's)
_DAILY = frozenset(f"x-ratelimit-{what}-requests" for what in ("limit", "remaining", "reset"))

_QUOTA = "insufficient_quota"
_BILLING_CODES = frozenset({_QUOTA, "billing_hard_limit_reached", "credit_balance_exhausted"})
_FILTERED = frozenset({"content_filter", "content_policy_violation"})

# "Request too large for gpt-4o-mini in organization org-… on tokens per min (TPM):
# Limit 30000, Requested 50000. The input or output tokens must be reduced …"
_TOO_LARGE = "request too large"
_UNIT = re.compile(r"\(([A-Z]{3,4})\)")
_UNIT_WORDS = {
    "requests per min": "rpm",
    "tokens per min": "tpm",
    "requests per day": "rpd",
    "tokens per day": "tpd",
}
_LIMIT = re.compile(r"\bLimit:? ([\d,]+)")
_REQUESTED = re.compile(r"\bRequested:? ([\d,]+)")


def _number(pattern: re.Pattern[str], text: str) -> float | None:
    found = pattern.search(text)
    return float(found.group(1).replace(",", "")) if found else None


def _too_large(message: str, context: dict[str, Any]) -> RequestTooLarge:
    """:class:`RequestTooLarge` from OpenAI's "Request too large" message: the bucket
    from "(TPM)" (or the words "tokens per min"), capacity and need from "Limit N,
    Requested M"."""
    unit = _UNIT.search(message)
    dimension = unit.group(1).lower() if unit else None
    if dimension is None:
        lower = message.lower()
        dimension = next((dim for words, dim in _UNIT_WORDS.items() if words in lower), None)
    return RequestTooLarge(
        dimension,
        _number(_REQUESTED, message),
        _number(_LIMIT, message),
        message=message,
        **{**context, "retry_after": None},
    )


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


def http_client(transport: str, timeout: float) -> httpx2.AsyncClient:
    """The HTTP client for an official SDK client: *transport* ``"aiohttp"`` or
    ``"httpx"``, with room for :data:`MAX_CONNECTIONS` connections (the SDKs' default
    pool holds 1,000, and aiohttp's 100, which would cap the requests in flight)."""
    limits = httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100)
    if transport == "aiohttp":
        return openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
    if transport == "httpx":
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
    raise ValueError(f"transport must be 'aiohttp' or 'httpx', not {transport!r}")


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
        if message.lstrip().lower().startswith(_TOO_LARGE):
            # It can never fit, though the server may not send x-should-retry: false.
            return _too_large(message, context)
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
    if isinstance(exc, openai.APIConnectionError) and never_connected(exc):
        # APITimeoutError included: a connect timeout sent nothing either.
        return ConnectionFailed(
            f"could not connect: {exc.__cause__ or exc}",
            connect=True,
            provider=provider,
            model=model,
        )
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


# The strict rewrite's notes (StrictSchema.changes) that mean strict mode cannot carry the
# schema's shape, rather than only a constraint that validation enforces afterwards: a value
# of any type (OpenAI refuses a strict schema with one: a 400 for every request), and a map
# (free-form additionalProperties: strict mode could only ever answer it empty).
def strict_fits(strict: StrictSchema) -> bool:
    """Whether to send a schema's strict rewrite with ``strict: true``.

    Yes when the rewrite is exact, and also when it only dropped constraints strict mode
    lacks (``minLength``, ``uniqueItems``, a non-standard ``format``, a tuple's order...):
    strict mode still guarantees every field and type, and the client's validation of the
    answer enforces the rest (re-asking when it fails). No when the rewrite lost the shape
    itself (a value of any type, a ``dict[str, X]`` map): the original schema then goes
    as a hint, with ``strict: false``.
    """
    return strict.shape_kept


def _with_instruction(
    messages: Sequence[Mapping[str, Any]], instruction: str
) -> list[dict[str, Any]]:
    """*messages* with *instruction* at the end of the leading system (or developer)
    message, or in a new system message before them."""
    sent = [dict(m) for m in messages]
    if sent and sent[0].get("role") in ("system", "developer"):
        content = sent[0].get("content")
        if isinstance(content, str):
            sent[0]["content"] = f"{content}\n\n{instruction}" if content else instruction
            return sent
        if isinstance(content, list):
            sent[0]["content"] = [*content, {"type": "text", "text": instruction}]
            return sent
    return [{"role": "system", "content": instruction}, *sent]


#: JSON mode's response_format
_JSON_OBJECT: Mapping[str, str] = {"type": "json_object"}
#: the per-message overhead openai_admission_estimate charges (a new system message)
_MESSAGE_OVERHEAD = 4


@functools.lru_cache(maxsize=256)
def _format_tokens(schema: ResponseSchema[Any], structured_outputs: str, strict: bool) -> int:
    """The prompt tokens a typed answer's ``response_format`` (and, in JSON mode, its
    instruction) add, by the character count OpenAI's own estimate uses; once per schema
    (a ResponseSchema hashes by its fingerprint)."""
    if structured_outputs == "json_object":
        chars = len(json.dumps(_JSON_OBJECT)) + len(schema.json_mode_instruction()) + 2
        return math.ceil(chars / 4) + _MESSAGE_OVERHEAD
    response_format = schema.openai_response_format(strict=strict)
    return math.ceil(len(json.dumps(response_format, separators=(",", ":"))) / 4)


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
        transport: ``"aiohttp"`` (the default: the SDK's aiohttp transport, which costs
            about a third of the CPU per request of its default one at thousands of
            requests a minute) or ``"httpx"`` (the SDK's default transport). Either
            allows 2,048 connections, the most requests llmbatch keeps in flight.
        structured_outputs: how a request's ``response_model`` is sent.
            ``"json_schema"`` (the default): ``response_format`` ``json_schema`` with the
            schema (OpenAI, and servers that enforce schemas, such as vLLM).
            ``"json_object"``: for OpenAI-compatible servers without schema support,
            ``{"type": "json_object"}`` with the schema stated at the end of the system
            prompt (:meth:`~llmbatch.structured.ResponseSchema.json_mode_instruction`);
            the client's validation and re-asks then do the enforcing.
        strict: with ``"json_schema"``, whether to send ``strict: true`` and the
            schema's strict rewrite. ``None`` (the default) decides per schema
            (:func:`strict_fits`); ``False`` always sends the schema as it is, as a
            hint (fine-tuned models, servers that refuse ``strict``); ``True`` always
            sends the rewrite, strict.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 600.0,
        client: openai.AsyncOpenAI | None = None,
        name: str | None = None,
        transport: Literal["aiohttp", "httpx"] = "aiohttp",
        structured_outputs: StructuredOutputs = "json_schema",
        strict: bool | None = None,
        profile: ProviderProfile | None = None,
    ) -> None:
        if structured_outputs not in ("json_schema", "json_object"):
            raise ValueError(
                "structured_outputs must be 'json_schema' or 'json_object', "
                f"not {structured_outputs!r}"
            )
        self.structured_outputs: StructuredOutputs = structured_outputs
        self.strict = strict
        self._client = client or openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
            http_client=http_client(transport, timeout),
        )
        self._owns_client = client is None
        providers = load_providers() if profile is None else {}
        self.name = name or (profile.name if profile else _named_by_url(self._client, providers))
        #: what the provider offers (its Batch API's limits, window and discount)
        self.profile = profile or provider_profile(self.name, providers=providers)
        self.quota_key = key_fingerprint(self._client.api_key) + "@" + str(self._client.base_url)
        key = self._client.api_key or ""
        #: the last four characters of the key, the only part ever shown
        self.key_hint = key_hint(key)
        #: the server answering (part of a response cache key: another server with the
        #: same model name is another model)
        self.endpoint = str(self._client.base_url)

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
        (:func:`~llmbatch.tokens.openai_admission_estimate`); for a typed answer it
        includes the ``response_format`` (or JSON mode's instruction).
        """
        if isinstance(request, EmbeddingRequest):
            return Admission(requests=1, tokens=math.ceil(len(request.input) / 4) + 1)
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        prompt = openai_admission_estimate(request.messages)
        schema = request.schema
        if schema is not None:
            # the schema goes with every request, and OpenAI counts it as prompt
            prompt += _format_tokens(schema, self.structured_outputs, self._strict(schema))
        return Admission(requests=1, tokens=prompt + max_tokens * request.n)

    def settlement(
        self, request: Request | EmbeddingRequest, response: Response | Embedding
    ) -> Admission:
        """OpenAI charges its rate limit at admission, from its own character-based
        estimate of the prompt plus max_tokens x n, and keeps that reservation whatever
        the answer's length or the prompt's exact count: the admission charge is final."""
        return Admission(tokens=self.admission(request, request.model or "")["tokens"])

    def _strict(self, schema: ResponseSchema[Any]) -> bool:
        """Whether *schema* goes strict (see *strict* in the class docstring)."""
        if self.strict is not None:
            return self.strict
        return strict_fits(schema.strict_schema())

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
        schema = request.schema
        if schema is not None:
            if self.structured_outputs == "json_object":
                params["response_format"] = dict(_JSON_OBJECT)
                params["messages"] = _with_instruction(
                    request.messages, schema.json_mode_instruction()
                )
            else:
                # shared, read-only: built once per schema
                params["response_format"] = schema.openai_response_format(
                    strict=self._strict(schema)
                )
        params.update(request.extra)
        return params

    async def _post(self, path: str, body: dict[str, Any], model: str | None) -> Any:
        """POST *body* through the SDK's public ``client.post`` (its auth, base URL,
        headers, timeout and status errors) and read the JSON answer ourselves.

        ``chat.completions.create`` would first walk the whole body against its typed
        parameters and then build a pydantic model of the answer: together ~40% of
        the CPU a request costs, which is what limits a process at thousands of
        requests a minute. The body was built by :meth:`chat_params` already.

        Returns:
            ``(answer as a dict, response headers)``.
        """
        try:
            raw = await self._client.post(path, body=body, cast_to=httpx2.Response)
            answer = json.loads(raw.content)
        except (openai.OpenAIError, json.JSONDecodeError) as exc:
            error = classify_openai_error(exc, provider=self.name, model=model)
            error.key_hint = self.key_hint
            raise error from exc
        if not isinstance(answer, dict):
            raise ConnectionFailed(
                "unreadable response from the server: not a JSON object",
                provider=self.name,
                model=model,
            )
        if self.profile.daily_request_headers:
            # a daily allowance is not a per-minute limit: not for the pacing
            return answer, {k: v for k, v in raw.headers.items() if k.lower() not in _DAILY}
        return answer, raw.headers

    async def complete(self, request: Request) -> Response:
        """One chat completion; errors come out as :mod:`llmbatch.errors` exceptions."""
        started = time.monotonic()
        answer, headers = await self._post(
            "/chat/completions", self.chat_params(request), request.model
        )
        return chat_response(
            answer,
            request,
            request_id=headers.get("x-request-id"),
            latency=time.monotonic() - started,
            headers=headers,
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
        started = time.monotonic()
        answer, headers = await self._post(
            "/embeddings", self.embedding_params(request), request.model
        )
        return embedding_response(
            answer,
            request,
            request_id=headers.get("x-request-id"),
            latency=time.monotonic() - started,
            headers=headers,
        )

    @property
    def has_batch_api(self) -> bool:
        """Whether the server offers ``/files`` + ``/batches``: its provider profile says
        so (OpenAI, Azure, Groq, Together, Fireworks; an unknown server does not until a
        ``[providers]`` table says ``batch = true``)."""
        return self.profile.batch

    def batch(self) -> OpenAIBatchBackend:
        """This provider's Batch API (its own quota; file limits and completion window
        from the provider's profile)."""
        return OpenAIBatchBackend(
            self,
            self._client,
            limits=BatchLimits(
                max_requests=self.profile.batch_max_requests,
                max_bytes=self.profile.batch_max_bytes,
                one_model=True,
            ),
            completion_window=self.profile.completion_window,
        )


def _named_by_url(client: openai.AsyncOpenAI, providers: Mapping[str, ProviderProfile]) -> str:
    """The provider whose profile names *client*'s base URL (Groq, Together...), else
    ``"openai"`` (OpenAI itself, or a compatible server, named so for its profiles)."""
    url = str(client.base_url).rstrip("/")
    for found in providers.values():
        if found.base_url is not None and found.base_url.rstrip("/") == url:
            return found.name
    return "openai"


def _get(value: Any, *names: str) -> Any:
    """``value[names[0]][names[1]]...``, or ``None`` where a level is missing."""
    for name in names:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def chat_response(
    completion: Mapping[str, Any],
    request: Request,
    *,
    request_id: str | None,
    latency: float = 0.0,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The :class:`Response` for a ``chat.completion`` body (online, or a batch output
    line), read as JSON: fields a server leaves out read as empty.

    ``message.refusal`` becomes ``refusal``. For a typed answer (``response_model``) the
    text is the JSON and ``parsed`` stays ``None``: the client validates it."""
    choices = completion.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    text = _get(choice, "message", "content") or ""
    refusal = _get(choice, "message", "refusal")
    usage = completion.get("usage") or {}
    cached = _get(usage, "prompt_tokens_details", "cached_tokens") or 0
    parsed = None
    if request.response_format is not None and text:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
    return Response(
        text=str(text),
        model=completion.get("model") or request.model,
        usage=Usage(
            input_tokens=int(_get(usage, "prompt_tokens") or 0),
            output_tokens=int(_get(usage, "completion_tokens") or 0),
            cached_tokens=int(cached),
        ),
        finish_reason=choice.get("finish_reason"),
        request_id=request_id,
        latency=latency,
        parsed=parsed,
        refusal=str(refusal) if refusal else None,
        key=request.key,
        headers=dict(headers or {}),
    )


def embedding_response(
    result: Mapping[str, Any],
    request: EmbeddingRequest,
    *,
    request_id: str | None,
    latency: float = 0.0,
    headers: Mapping[str, str] | None = None,
) -> Embedding:
    """The :class:`Embedding` for an embeddings ``list`` body (online, or a batch output
    line)."""
    data = result.get("data") or []
    vector = _get(data[0], "embedding") if data else None
    if not isinstance(vector, list) or not vector:
        raise BadRequest("the server returned no embedding", model=request.model)
    return Embedding(
        vector=tuple(float(x) for x in vector),
        model=result.get("model") or request.model,
        usage=Usage(input_tokens=int(_get(result, "usage", "prompt_tokens") or 0)),
        request_id=request_id,
        latency=latency,
        key=request.key,
        headers=dict(headers or {}),
    )


# -- the Batch API ----------------------------------------------------------------------------


class OpenAIBatchBackend:
    """OpenAI's Batch API: a JSONL file uploaded to ``/v1/files``, a ``/v1/batches`` job;
    the same on any server that speaks it (Azure OpenAI, Groq, Together, Fireworks).

    Args:
        provider: the provider whose requests the lines carry.
        client: its SDK client (an ``AsyncAzureOpenAI`` adds ``api-version`` and Azure's
            paths).
        limits: what one batch may hold (default: OpenAI's).
        completion_window: the window each batch asks for.
        url_prefix: what the lines' ``url`` (and the batch's ``endpoint``) start with:
            ``"/v1"`` (OpenAI), ``""`` (Azure: ``/chat/completions``).
    """

    limits = BatchLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024, one_model=True)

    def __init__(
        self,
        provider: OpenAIProvider,
        client: openai.AsyncOpenAI,
        *,
        limits: BatchLimits | None = None,
        completion_window: str = "24h",
        url_prefix: str = "/v1",
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self._client = client
        if limits is not None:
            self.limits = limits
        self.completion_window = completion_window
        self.url_prefix = url_prefix

    def line(self, custom_id: str, request: AnyRequest) -> dict[str, Any]:
        """``{"custom_id", "method", "url", "body"}`` (chat completions or embeddings)."""
        if isinstance(request, EmbeddingRequest):
            return {
                "custom_id": custom_id,
                "method": "POST",
                "url": f"{self.url_prefix}/embeddings",
                "body": self.provider.embedding_params(request),
            }
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": f"{self.url_prefix}/chat/completions",
            "body": self.provider.chat_params(request),
        }

    async def submit(self, lines: Sequence[Mapping[str, Any]], *, model: str | None) -> str:
        """Upload the lines and create the batch."""
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        # the SDK's types know OpenAI's values only; compatible servers take others
        endpoint: Any = lines[0]["url"] if lines else f"{self.url_prefix}/chat/completions"
        window: Any = self.completion_window
        try:
            uploaded = await self._client.files.create(
                file=("llmbatch.jsonl", content), purpose="batch"
            )
            batch = await self._client.batches.create(
                input_file_id=uploaded.id,
                endpoint=endpoint,
                completion_window=window,
                metadata={"created_by": "llmbatch"},
            )
        except openai.OpenAIError as exc:
            raise classify_openai_error(exc, provider=self.name, model=model) from exc
        return batch.id

    async def status(self, batch_id: str) -> BatchStatus:
        """The batch's status; ``failed`` with its validation errors."""
        batch = await self._call(self._client.batches.retrieve(batch_id))
        counts = batch.request_counts
        count_map = (
            {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
            if counts is not None
            else {}
        )
        if batch.status == "failed":
            errors = [
                f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "")
                for e in (batch.errors.data or [] if batch.errors else [])
            ]
            retryable = any(
                e.code == "token_limit_exceeded"
                for e in (batch.errors.data or [] if batch.errors else [])
            )
            return BatchStatus(
                batch_id, "failed", batch.status, count_map, tuple(errors), retryable
            )
        state = "ended" if batch.status in ("completed", "expired", "cancelled") else "running"
        return BatchStatus(batch_id, state, batch.status, count_map)

    async def results(self, batch_id: str) -> AsyncIterator[tuple[str, Any]]:
        """The output file's lines, then the error file's."""
        batch = await self._call(self._client.batches.retrieve(batch_id))
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self._call(self._client.files.content(file_id))
            for text in content.text.splitlines():
                if text.strip():
                    line = json.loads(text)
                    yield str(line.get("custom_id")), line

    def outcome(self, raw: Any, request: AnyRequest) -> Outcome:
        """A chat.completion (200), the classified error of another status, or
        :class:`BatchExpired` for ``batch_expired`` / ``batch_cancelled``."""
        response = raw.get("response")
        error = raw.get("error")
        if not response:
            code = (error or {}).get("code")
            message = (error or {}).get("message") or "no response"
            if code in ("batch_expired", "batch_cancelled"):
                return BatchExpired(message, provider=self.name, model=request.model)
            return BadRequest(f"{code}: {message}", provider=self.name, model=request.model)
        status = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if status != 200:
            return classify_openai_status(status, body, {}, provider=self.name, model=request.model)
        if isinstance(request, EmbeddingRequest):
            return embedding_response(body, request, request_id=response.get("request_id"))
        return chat_response(body, request, request_id=response.get("request_id"))

    async def cancel(self, batch_id: str) -> None:
        """Cancel the batch (already-finished requests stay billed and delivered)."""
        await self._call(self._client.batches.cancel(batch_id))

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except openai.OpenAIError as exc:
            raise classify_openai_error(exc, provider=self.name) from exc
