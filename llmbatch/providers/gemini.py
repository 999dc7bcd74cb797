"""Google Gemini (the Gemini Developer API): :class:`GeminiProvider`, its error translation
and its Batch API backend.

Needs the ``gemini`` extra (``pip install 'llmbatch[gemini]'``: the official
``google-genai`` SDK). The SDK client is built with one attempt per call
(``HttpRetryOptions(attempts=1)``, which also turns off its own pause-and-retry on a
refused connection): llmbatch's retry layer is the only one, so the limiter sees every
attempt. It sends through an httpx2 client with room for 2,048 connections.

==================================================  ============================================
status / body                                       llmbatch error
==================================================  ============================================
429 ``RESOURCE_EXHAUSTED``, a ``...PerDay...``      :class:`QuotaExhausted` (never retried: a
quota in its ``QuotaFailure`` (or a quota of 0)     daily quota stays spent until it resets)
429 ``RESOURCE_EXHAUSTED`` otherwise                :class:`RateLimited` (``retry_after`` from
                                                    ``RetryInfo.retryDelay``; ``kind`` from
                                                    the quota: requests or tokens)
400 ``API_KEY_INVALID``, 401, 403                   :class:`AuthenticationFailed`
404 ``NOT_FOUND``                                   :class:`NotFound` (model or batch)
400 "input token count ... exceeds the maximum"     :class:`ContextLengthExceeded`
400 ``INVALID_ARGUMENT`` and other 4xx              :class:`BadRequest`
408, 409, 500 ``INTERNAL``, 503 ``UNAVAILABLE``,    :class:`ProviderUnavailable`
504 ``DEADLINE_EXCEEDED``, other 5xx
timeout                                             :class:`Timeout`
connection never established                        :class:`ConnectionFailed`, connect=True
connection lost, unreadable body                    :class:`ConnectionFailed`, connect=False
==================================================  ============================================

Rate limits: Gemini sends no remaining-quota headers. Its limits (RPM, TPM of input
tokens, RPD, per project and model, by usage tier) are known only from the console, so
the client paces from the model's profile (:data:`llmbatch.config.BUILTIN_PROFILES`),
and each 429 pauses the quota for its ``retryDelay`` (and halves the concurrency while
no limit is known: ``Limits.auto()``). :meth:`GeminiProvider.admission` charges one
request and the estimated prompt tokens; :meth:`GeminiProvider.settlement` the prompt
tokens Gemini counted.

Typed answers (a request's ``response_model``) go as ``response_mime_type:
"application/json"`` with the schema as ``response_json_schema``; the client validates
the answer (re-asking when it is invalid), online and in batches alike.

The Batch API (:class:`GeminiBatchBackend`, ``provider.batch()``) sends a job one of two
ways. A small job (at most :data:`INLINE_MAX_REQUESTS` requests and 19 MB) goes inline
(``batches.create(src=[...])``), each request tagged with its custom id in
``metadata.key``, and its responses come back inside the job. A larger one (up to the
provider profile's ``batch_max_requests`` and ``batch_max_bytes``: 2 GB, Gemini's file
limit) goes as a JSONL file, one ``{"key", "request"}`` line per request (the REST
``GenerateContentRequest``), uploaded with ``files.upload`` (``application/jsonl``) and
named in ``batches.create(src="files/...")``; its results are the JSONL file the ended job
names (``dest.file_name``), downloaded with ``files.download`` to a temporary file and
read line by line: ``{"key", "response"}`` or ``{"key", "error"}``. Either way the job is
polled through ``batches.get`` (``JOB_STATE_*``) and the results are joined on the key;
the journal holds the job's name only, so a resumed run polls it and downloads its
results without uploading anything again. Gemini deletes uploaded files after 48 hours;
llmbatch does not delete them itself (a rerun may download a result file again).

``GOOGLE_GEMINI_BASE_URL`` (the SDK's own variable) points the provider at another
server, a simulator for instance, when no ``base_url`` is given.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from typing import IO, Any

import httpx2
import pydantic

try:
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types as genai_types
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Gemini provider needs the 'google-genai' package: pip install 'llmbatch[gemini]'"
    ) from exc

from llmbatch._log import get_logger
from llmbatch.batchapi import AnyRequest, BatchLimits, BatchStatus, Outcome
from llmbatch.config import ProviderProfile, load_providers, provider_profile
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    LLMBatchError,
    NotFound,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    Timeout,
    key_hint,
)
from llmbatch.limits import key_fingerprint
from llmbatch.models import EmbeddingRequest, Request, Response, Usage
from llmbatch.providers.base import MAX_CONNECTIONS, Admission, AsyncClosing, never_connected
from llmbatch.retry import parse_retry_after
from llmbatch.tokens import admission_estimate

__all__ = [
    "GEMINI_KEY_VARIABLES",
    "INLINE_MAX_BYTES",
    "INLINE_MAX_REQUESTS",
    "GeminiBatchBackend",
    "GeminiProvider",
    "classify_gemini_error",
    "classify_gemini_status",
    "gemini_response",
]

#: where the key is looked for when none is given, in this order (the SDK's own names)
GEMINI_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
#: the Gemini Developer API's address
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
#: the API version: the Batch API and ``responseJsonSchema`` are v1beta's
API_VERSION = "v1beta"
#: the google-genai SDK's variable for another server than Gemini's
BASE_URL_VARIABLE = "GOOGLE_GEMINI_BASE_URL"
#: the most requests a batch job sends inline; a larger one goes as a JSONL file (an
#: inline job's responses all come back in one answer to ``batches.get``)
INLINE_MAX_REQUESTS = 1_000
#: the largest inline job: Gemini's 20 MB, measured on the SDK-shaped requests, with a
#: margin for the REST wrapping
INLINE_MAX_BYTES = 19 * 1024 * 1024
#: the share of the profile's file limit a file job fills: the lines are measured in the
#: SDK's shape, a little shorter than the REST lines written to the file
_FILE_MARGIN = 0.98
_JSONL = "application/jsonl"
#: ``GenerateContentConfig`` fields that are parts of the REST request itself, not of its
#: ``generationConfig``; the SDK-only ones are dropped
_REQUEST_FIELDS = frozenset(
    {"systemInstruction", "safetySettings", "tools", "toolConfig", "labels", "cachedContent"}
)
_SDK_ONLY_FIELDS = frozenset(
    {"httpOptions", "automaticFunctionCalling", "shouldReturnHttpResponse"}
)
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_TRANSIENT_STATUSES = frozenset({"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "ABORTED"})
_ENDED_STATES = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_CANCELLED"}
    | {"JOB_STATE_EXPIRED"}
)
_JSON = "application/json"

logger = get_logger("llmbatch.providers")


def _retry_delay(details: Sequence[Any]) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail (``"retryDelay": "37s"``)."""
    for detail in details:
        if isinstance(detail, Mapping) and detail.get("@type") == _RETRY_INFO:
            delay = str(detail.get("retryDelay") or "")
            try:
                return float(delay.removesuffix("s"))
            except ValueError:
                return None
    return None


def _violations(details: Sequence[Any]) -> list[Mapping[str, Any]]:
    """The ``google.rpc.QuotaFailure`` violations among *details*."""
    found: list[Mapping[str, Any]] = []
    for detail in details:
        if isinstance(detail, Mapping) and detail.get("@type") == _QUOTA_FAILURE:
            found += [v for v in detail.get("violations") or () if isinstance(v, Mapping)]
    return found


def _per_minute_limit(violations: Sequence[Mapping[str, Any]]) -> float | None:
    """The per-minute limit a 429's ``QuotaFailure`` names (``quotaValue`` of a
    ``...PerMinute...`` quota), the smallest when several do; ``None`` if none does."""
    values: list[float] = []
    for violation in violations:
        if "PerMinute" not in str(violation.get("quotaId") or ""):
            continue
        try:
            value = float(str(violation.get("quotaValue")))
        except ValueError:
            continue
        if value > 0:
            values.append(value)
    return min(values) if values else None


def _key_invalid(details: Sequence[Any], message: str) -> bool:
    """Whether a 400 is Gemini's "API key not valid" (``ErrorInfo`` ``API_KEY_INVALID``)."""
    for detail in details:
        if (
            isinstance(detail, Mapping)
            and detail.get("@type") == _ERROR_INFO
            and str(detail.get("reason", "")).startswith("API_KEY")
        ):
            return True
    return "api key not valid" in message.lower()


def classify_gemini_status(
    status: int,
    body: Any,
    headers: Mapping[str, str] | None = None,
    *,
    provider: str = "gemini",
    model: str | None = None,
) -> LLMBatchError:
    """The llmbatch error for an HTTP error answer of the Gemini API.

    Args:
        status: the HTTP status.
        body: the JSON body (``{"error": {"code", "message", "status", "details"}}``).
        headers: the response headers (a ``retry-after`` is used when the body has no
            ``RetryInfo``).
    """
    error = body.get("error", body) if isinstance(body, Mapping) else {}
    error = error if isinstance(error, Mapping) else {}
    message = str(error.get("message") or "") or f"HTTP {status}"
    grpc = str(error.get("status") or "")
    details = error.get("details")
    details = details if isinstance(details, list) else []
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    retry_after = _retry_delay(details)
    if retry_after is None:
        retry_after = parse_retry_after(lower)
    context: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "status_code": status,
        "retry_after": retry_after,
    }
    if status == 429 or grpc == "RESOURCE_EXHAUSTED":
        violations = _violations(details)
        ids = [str(v.get("quotaId") or "") for v in violations]
        daily = [q for q in ids if "PerDay" in q]
        if daily or any(str(v.get("quotaValue")) == "0" for v in violations):
            context["retry_after"] = None
            why = (
                f"the per-day quota {daily[0]} is used up (it resets daily)"
                if daily
                else "this key has no quota for the model"
            )
            return QuotaExhausted(f"{message} ({why}: retrying will not help today)", **context)
        kind = None
        if any("Token" in q for q in ids):
            kind = "tokens"
        elif any("Request" in q for q in ids):
            kind = "requests"
        return RateLimited(message, kind=kind, limit=_per_minute_limit(violations), **context)
    if status in (401, 403) or grpc in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return AuthenticationFailed(message, **context)
    if status == 400 and _key_invalid(details, message):
        return AuthenticationFailed(message, **context)
    if status == 404:
        return NotFound(message, **context)
    if status in (408, 409) or status >= 500 or grpc in _TRANSIENT_STATUSES:
        return ProviderUnavailable(message, **context)
    lowered = message.lower()
    if "token count" in lowered and "exceeds the maximum" in lowered:
        return ContextLengthExceeded(message, **context)
    return BadRequest(message, **context)


def classify_gemini_error(
    exc: BaseException, *, provider: str = "gemini", model: str | None = None
) -> LLMBatchError:
    """Translate an exception raised by the ``google-genai`` SDK (or its httpx2
    transport) into :mod:`llmbatch.errors`; anything else is raised again."""
    if isinstance(exc, LLMBatchError):
        return exc
    if isinstance(exc, genai_errors.APIError):
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        body = exc.details if isinstance(exc.details, Mapping) else {}
        if not body:
            body = {"error": {"message": exc.message, "status": exc.status}}
        return classify_gemini_status(
            int(exc.code or 0), body, dict(headers), provider=provider, model=model
        )
    if isinstance(exc, httpx2.TransportError | TimeoutError | OSError):
        if never_connected(exc):
            return ConnectionFailed(
                f"could not connect: {exc}", connect=True, provider=provider, model=model
            )
        if isinstance(exc, TimeoutError | httpx2.TimeoutException):
            return Timeout("the request timed out", provider=provider, model=model)
        return ConnectionFailed(f"connection failed: {exc!r}", provider=provider, model=model)
    if isinstance(
        exc, json.JSONDecodeError | genai_errors.UnknownApiResponseError | pydantic.ValidationError
    ):
        # a body that is not JSON, or not a GenerateContentResponse
        return ConnectionFailed(
            f"unreadable response from the server: {exc}", provider=provider, model=model
        )
    raise exc


def _parts(content: Any) -> list[dict[str, Any]]:
    """Gemini ``parts`` for a chat message's content (a string or a list of text parts)."""
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append({"text": part["text"]})
            else:
                raise BadRequest(f"only text content is supported for Gemini, not {part!r}")
        return parts
    return [{"text": "" if content is None else str(content)}]


def _system_text(content: Any) -> str:
    return "".join(p["text"] for p in _parts(content))


class GeminiProvider(AsyncClosing):
    """Gemini's ``generateContent`` through the official ``google-genai`` client.

    ``system`` (and ``developer``) messages become the ``system_instruction``; ``user``
    and ``assistant`` turns become ``contents`` with roles ``user`` and ``model``.
    ``max_tokens`` is ``max_output_tokens``, ``n`` ``candidate_count`` (the first
    candidate is the answer); a request's ``extra`` holds further
    ``GenerateContentConfig`` fields in the SDK's names (``thinking_config``,
    ``safety_settings``, ``top_p``...).

    Args:
        api_key: the key (default: ``GEMINI_API_KEY``, else ``GOOGLE_API_KEY``); never
            logged or shown.
        base_url: another Gemini-compatible server (a simulator); default
            ``GOOGLE_GEMINI_BASE_URL`` if set, else Gemini's.
        timeout: seconds per HTTP request.
        name: the provider's name in limits, profiles and logs.
        profile: what the provider offers (its Batch API's file limits); default the
            profile of *name* (:data:`llmbatch.config.BUILTIN_PROVIDERS`, as the
            configuration file overrides it).

    Raises:
        AuthenticationFailed: no key given and none in the environment.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = 600.0,
        name: str = "gemini",
        profile: ProviderProfile | None = None,
    ) -> None:
        key = (
            api_key or next((os.environ[v] for v in GEMINI_KEY_VARIABLES if os.environ.get(v)), "")
        ).strip()
        if not key:
            raise AuthenticationFailed(
                "no Gemini API key: pass api_key, or set GEMINI_API_KEY or GOOGLE_API_KEY",
                provider=name,
            )
        base_url = base_url or os.environ.get(BASE_URL_VARIABLE) or None
        # httpx2 rather than the SDK's aiohttp session: that one subclasses
        # aiohttp.ClientSession, which aiohttp deprecates with a warning on every use
        self._http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100),
            timeout=timeout,
        )
        options = genai_types.HttpOptions(
            base_url=base_url,
            api_version=API_VERSION,
            timeout=int(timeout * 1000),  # milliseconds
            retry_options=genai_types.HttpRetryOptions(attempts=1),
            httpx_async_client=self._http,
        )
        self._client = genai.Client(api_key=key, http_options=options)
        self.name = name
        #: what the provider offers (its Batch API's file limits)
        self.profile = profile or provider_profile(name, providers=load_providers())
        self.base_url = base_url or DEFAULT_BASE_URL
        #: a fingerprint of the key, never the key
        self.quota_key = key_fingerprint(key) + "@" + self.base_url
        #: the last four characters of the key, the only part ever shown
        self.key_hint = key_hint(key)
        #: the server answering (part of a response cache key)
        self.endpoint = self.base_url
        #: settlement charges the prompt tokens Gemini counted, up or down from the estimate
        self.refunds_unused = True

    def __repr__(self) -> str:
        return f"<GeminiProvider {self.name} {self.base_url}>"

    async def aclose(self) -> None:
        """Close the SDK client's connections."""
        await self._client.aio.aclose()
        await self._http.aclose()
        self._client.close()

    def admission(self, request: Request, model: str) -> Admission:
        """One request and the estimated prompt tokens (Gemini's TPM counts input
        tokens), the schema of a typed answer included."""
        prompt = admission_estimate(request.messages, model)
        schema = request.schema
        if schema is not None:
            prompt += len(json.dumps(schema.schema, separators=(",", ":"))) // 4 + 1
        return Admission(requests=1, tokens=prompt)

    def settlement(self, request: Request, response: Response) -> Admission:
        """The prompt tokens Gemini counted (``promptTokenCount``)."""
        return Admission(tokens=response.usage.input_tokens)

    def content_params(self, request: Request) -> dict[str, Any]:
        """``{"contents", "config"}`` for *request*, in the SDK's names (online, and as
        an inline batch request), JSON-ready.

        Raises:
            BadRequest: no model, non-text content, or an embedding request.
        """
        if not request.model:
            raise BadRequest("no model given", provider=self.name)
        system: list[str] = []
        contents: list[dict[str, Any]] = []
        try:
            for message in request.messages:
                role = message.get("role")
                if role in ("system", "developer"):
                    system.append(_system_text(message.get("content")))
                    continue
                turn = "model" if role == "assistant" else "user"
                contents.append({"role": turn, "parts": _parts(message.get("content"))})
        except BadRequest as exc:
            exc.provider, exc.model = self.name, request.model
            raise
        config: dict[str, Any] = {}
        if system:
            config["system_instruction"] = "\n\n".join(system)
        if request.max_tokens is not None:
            config["max_output_tokens"] = request.max_tokens
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.n != 1:
            config["candidate_count"] = request.n
        response_format = request.response_format
        if response_format is not None:
            config["response_mime_type"] = _JSON
            wrapped = response_format.get("json_schema")
            if isinstance(wrapped, Mapping) and isinstance(wrapped.get("schema"), Mapping):
                config["response_json_schema"] = dict(wrapped["schema"])
        schema = request.schema
        if schema is not None:
            config["response_mime_type"] = _JSON
            config["response_json_schema"] = schema.schema
        config.update(request.extra)
        return {"contents": contents, "config": config}

    def generate_config(
        self, params: Mapping[str, Any], model: str
    ) -> genai_types.GenerateContentConfig:
        """The SDK's config object for :meth:`content_params`' ``config``, checked before
        anything is sent: a bad ``extra`` is the request's fault, never retried.

        Raises:
            BadRequest: a field the SDK does not know, or a value of the wrong type.
        """
        try:
            return genai_types.GenerateContentConfig.model_validate(params["config"])
        except pydantic.ValidationError as exc:
            raise BadRequest(
                f"invalid GenerateContentConfig: {exc}", provider=self.name, model=model
            ) from None

    async def complete(self, request: Request) -> Response:
        """One ``generateContent`` call; errors come out as :mod:`llmbatch.errors`."""
        params = self.content_params(request)
        model = request.model or ""
        config = self.generate_config(params, model)
        started = time.monotonic()
        try:
            answer = await self._client.aio.models.generate_content(
                model=model, contents=params["contents"], config=config
            )
        except Exception as exc:
            error = classify_gemini_error(exc, provider=self.name, model=model)
            error.key_hint = self.key_hint
            raise error from exc
        http = answer.sdk_http_response
        return gemini_response(
            answer,
            request,
            latency=time.monotonic() - started,
            headers=dict(http.headers or {}) if http is not None else {},
        )

    def batch(self) -> GeminiBatchBackend:
        """This provider's Batch API (half price, its own quota; the file limits from
        the provider's profile)."""
        return GeminiBatchBackend(
            self,
            self._client,
            limits=BatchLimits(
                max_requests=self.profile.batch_max_requests,
                max_bytes=int(self.profile.batch_max_bytes * _FILE_MARGIN),
                one_model=True,
            ),
        )


def gemini_response(
    answer: genai_types.GenerateContentResponse,
    request: Request,
    *,
    latency: float = 0.0,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The :class:`Response` for a ``GenerateContentResponse`` (online or a batch result).

    The text is the first candidate's text parts (thoughts left out); the finish reason
    is Gemini's (``"STOP"``, ``"MAX_TOKENS"``, ``"SAFETY"``...), or the prompt's block
    reason when no candidate came back. Usage: ``promptTokenCount`` (cached tokens
    included, as Gemini counts them) is the input, ``candidatesTokenCount`` plus
    ``thoughtsTokenCount`` (billed as output) the output.
    """
    text = ""
    finish: str | None = None
    candidates = answer.candidates or []
    if candidates:
        first = candidates[0]
        parts = first.content.parts if first.content is not None else None
        text = "".join(p.text for p in parts or () if p.text and not p.thought)
        finish = first.finish_reason.value if first.finish_reason is not None else None
    elif answer.prompt_feedback is not None and answer.prompt_feedback.block_reason is not None:
        finish = answer.prompt_feedback.block_reason.value
    usage = answer.usage_metadata
    parsed = None
    if request.response_format is not None and text:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
    return Response(
        text=text,
        model=answer.model_version or request.model,
        usage=Usage(
            input_tokens=(usage.prompt_token_count or 0) if usage else 0,
            output_tokens=((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0))
            if usage
            else 0,
            cached_tokens=(usage.cached_content_token_count or 0) if usage else 0,
        ),
        finish_reason=finish,
        request_id=answer.response_id,
        latency=latency,
        parsed=parsed,
        key=request.key,
        headers=dict(headers or {}),
    )


# -- the Batch API -------------------------------------------------------------------------


class GeminiBatchBackend:
    """Gemini's Batch API: ``batches.create`` / ``get`` / ``cancel``, with the requests
    inline or in a JSONL file (``files.upload`` / ``files.download``).

    A job goes inline when it holds at most *inline_max_requests* requests and
    *inline_max_bytes*; else as a file. Either way each request carries its custom id
    (``metadata.key`` inline, ``key`` in a file) and the results are joined on it. A job
    runs one model (it is in the URL).

    Args:
        provider: the provider (its request mapping, name and key hint).
        client: the SDK client.
        limits: what one job may hold (default: one inline job's limits; the provider
            passes its profile's file limits).
        inline_max_requests: the most requests sent inline.
        inline_max_bytes: the largest inline job, measured on :meth:`line`'s output.
    """

    #: one inline job (20 MB, measured on the SDK-shaped lines with a margin for the REST
    #: wrapping); ``provider.batch()`` passes the file limits of its profile instead
    limits = BatchLimits(max_requests=100_000, max_bytes=INLINE_MAX_BYTES, one_model=True)

    def __init__(
        self,
        provider: GeminiProvider,
        client: genai.Client,
        *,
        limits: BatchLimits | None = None,
        inline_max_requests: int = INLINE_MAX_REQUESTS,
        inline_max_bytes: int = INLINE_MAX_BYTES,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self._client = client
        if limits is not None:
            self.limits = limits
        self.inline_max_requests = inline_max_requests
        self.inline_max_bytes = inline_max_bytes

    def __repr__(self) -> str:
        return (
            f"<GeminiBatchBackend {self.name} inline<={self.inline_max_requests} requests, "
            f"files<={self.limits.max_bytes:,} bytes>"
        )

    def line(self, custom_id: str, request: AnyRequest) -> dict[str, Any]:
        """An inline request: ``{"contents", "config", "metadata": {"key": custom_id}}``
        (in the SDK's names; a file line is made from it)."""
        if isinstance(request, EmbeddingRequest):
            raise BadRequest("Gemini embedding batches are not supported", provider=self.name)
        params = self.provider.content_params(request)
        self.provider.generate_config(params, request.model or "")
        return {**params, "metadata": {"key": custom_id}}

    def inline(self, lines: Sequence[Mapping[str, Any]]) -> bool:
        """Whether a job of *lines* goes inline (else as a JSONL file)."""
        if len(lines) > self.inline_max_requests:
            return False
        size = 0
        for line in lines:
            size += len(json.dumps(line).encode()) + 1
            if size > self.inline_max_bytes:
                return False
        return True

    async def submit(self, lines: Sequence[Mapping[str, Any]], *, model: str | None) -> str:
        """Create the batch job, inline or from an uploaded JSONL file; its name
        (``batches/...``) is the id."""
        if self.inline(lines):
            inline = [genai_types.InlinedRequest.model_validate(line) for line in lines]
            src: Any = inline
        else:
            src = await self._upload(lines, model)
        try:
            job: genai_types.BatchJob = await self._call(
                self._client.aio.batches.create(
                    model=model or "", src=src, config={"display_name": "llmbatch"}
                ),
                model,
            )
        except LLMBatchError:
            if isinstance(src, str):  # the job will not read it: free the storage
                await self._forget(src)
            raise
        if not job.name:
            raise ProviderUnavailable("the batch was created without a name", provider=self.name)
        return job.name

    async def _upload(self, lines: Sequence[Mapping[str, Any]], model: str | None) -> str:
        """Write *lines* as a JSONL input file (in a worker thread: it may be large) and
        upload it; the file's name (``files/...``)."""
        with tempfile.TemporaryFile() as spool:
            size = await asyncio.to_thread(_write_jsonl, spool, lines)
            spool.seek(0)
            try:
                uploaded: genai_types.File = await self._call(
                    self._client.aio.files.upload(
                        file=spool,
                        config={"mime_type": _JSONL, "display_name": "llmbatch-batch-input"},
                    ),
                    model,
                )
            except (KeyError, ValueError) as exc:  # no upload URL, or never finalized
                raise ProviderUnavailable(
                    f"the batch input file could not be uploaded: {exc}",
                    provider=self.name,
                    model=model,
                ) from None
        if not uploaded.name:
            raise ProviderUnavailable("the file was uploaded without a name", provider=self.name)
        logger.debug("batch.file_uploaded", file=uploaded.name, requests=len(lines), bytes=size)
        return uploaded.name

    async def _forget(self, name: str) -> None:
        """Delete the uploaded file *name*, if it can be (it expires in 48 hours anyway)."""
        try:
            await self._call(self._client.aio.files.delete(name=name))
        except LLMBatchError as exc:
            logger.debug("batch.file_not_deleted", file=name, error=str(exc))

    async def status(self, batch_id: str) -> BatchStatus:
        """``ended`` once the job succeeded, was cancelled or expired; ``failed`` with
        its error when it failed as a whole."""
        job: genai_types.BatchJob = await self._call(self._client.aio.batches.get(name=batch_id))
        state = job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED"
        if state == "JOB_STATE_FAILED":
            reason = job.error.message if job.error is not None else None
            return BatchStatus(batch_id, "failed", state, {}, (reason or "the batch failed",))
        return BatchStatus(batch_id, "ended" if state in _ENDED_STATES else "running", state)

    async def results(self, batch_id: str) -> AsyncIterator[tuple[str, Any]]:
        """The job's results by key: its inline responses, or the lines of its result
        file (downloaded to a temporary file, then read line by line)."""
        job: genai_types.BatchJob = await self._call(self._client.aio.batches.get(name=batch_id))
        dest = job.dest
        if dest is not None and dest.file_name:
            with tempfile.TemporaryFile() as spool:
                await self._call(
                    self._client.aio.files.download(file=dest.file_name, destination=spool)
                )
                spool.seek(0)
                for key, raw in _result_lines(spool, batch_id):
                    yield key, raw
            return
        for entry in (dest.inlined_responses if dest is not None else None) or ():
            found = (entry.metadata or {}).get("key")
            if found is not None:
                yield found, entry

    def outcome(self, raw: Any, request: AnyRequest) -> Outcome:
        """The response, or the classified error of the request."""
        if isinstance(request, EmbeddingRequest):  # never submitted: line() refuses it
            raise TypeError("Gemini embedding batches are not supported")
        error = getattr(raw, "error", None)
        response = getattr(raw, "response", None)
        if error is None and response is not None:
            return gemini_response(response, request)
        code = int(getattr(error, "code", None) or 500)
        message = getattr(error, "message", None) or "the request failed"
        return classify_gemini_status(
            code,
            {"error": {"code": code, "message": message}},
            provider=self.name,
            model=request.model,
        )

    async def cancel(self, batch_id: str) -> None:
        """Cancel the job."""
        await self._call(self._client.aio.batches.cancel(name=batch_id))

    async def _call(self, awaitable: Awaitable[Any], model: str | None = None) -> Any:
        try:
            return await awaitable
        except Exception as exc:
            error = classify_gemini_error(exc, provider=self.name, model=model)
            error.key_hint = self.provider.key_hint
            raise error from exc


def _rest_request(params: Mapping[str, Any]) -> dict[str, Any]:
    """The REST ``GenerateContentRequest`` (a JSONL batch line's ``request``) for
    :meth:`GeminiProvider.content_params`' ``{"contents", "config"}``.

    The config's fields go by their REST (camelCase) names: the system instruction,
    safety settings, tools, tool config, labels and cached content into the request
    itself, the others into its ``generationConfig``.
    """
    config = genai_types.GenerateContentConfig.model_validate(params.get("config") or {})
    fields = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    request: dict[str, Any] = {
        "contents": [
            genai_types.Content.model_validate(content).model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
            for content in params.get("contents") or ()
        ]
    }
    generation: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _SDK_ONLY_FIELDS:
            continue
        if name == "systemInstruction" and isinstance(value, str):
            value = {"parts": [{"text": value}], "role": "user"}
        (request if name in _REQUEST_FIELDS else generation)[name] = value
    if generation:
        request["generationConfig"] = generation
    return request


def _write_jsonl(spool: IO[bytes], lines: Sequence[Mapping[str, Any]]) -> int:
    """Write the file lines (``{"key", "request"}``) of the inline *lines*; the bytes."""
    size = 0
    for line in lines:
        record = {"key": line["metadata"]["key"], "request": _rest_request(line)}
        data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        spool.write(data)
        size += len(data)
    return size


def _result_lines(spool: IO[bytes], batch_id: str) -> Iterator[tuple[str, Any]]:
    """``(key, InlinedResponse)`` per line of a result file; a line that cannot be read
    is skipped (its request counts as missing from the results)."""
    for number, line in enumerate(spool, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["key"]
            raw = _inlined(record)
        except (ValueError, KeyError, TypeError, pydantic.ValidationError) as exc:
            logger.warning(
                "batch.unreadable_result", batch_id=batch_id, line=number, error=repr(exc)[:200]
            )
            continue
        yield str(key), raw


def _inlined(record: Mapping[str, Any]) -> genai_types.InlinedResponse:
    """A result line as the SDK's ``InlinedResponse`` (what inline jobs give)."""
    error = record.get("error")
    if isinstance(error, Mapping):
        return genai_types.InlinedResponse(
            error=genai_types.JobError(
                code=error.get("code") if isinstance(error.get("code"), int) else None,
                message=str(error.get("message") or "") or None,
            )
        )
    return genai_types.InlinedResponse(response=_known(record["response"]))


def _known(data: Any) -> genai_types.GenerateContentResponse:
    """A ``GenerateContentResponse`` from its JSON, leaving out the fields this SDK
    version does not know (a newer server's; the SDK's models forbid extra fields)."""
    data = copy.deepcopy(data)
    for _ in range(8):  # each pass removes every unknown field pydantic reports
        try:
            return genai_types.GenerateContentResponse.model_validate(data)
        except pydantic.ValidationError as exc:
            problems = exc.errors()
            if any(p["type"] != "extra_forbidden" for p in problems):
                raise
            for problem in problems:
                _drop(data, problem["loc"])
    return genai_types.GenerateContentResponse.model_validate(data)


def _drop(data: Any, loc: Sequence[int | str]) -> None:
    """Remove the value at *loc* (a pydantic error location) from *data*."""
    for step in loc[:-1]:
        try:
            data = data[step]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(data, dict):
        data.pop(loc[-1], None)
