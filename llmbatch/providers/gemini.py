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

The Batch API (:class:`GeminiBatchBackend`, ``provider.batch()``): inline requests
(``batches.create(src=[...])``, up to 20 MB a job), each tagged with its custom id in
``metadata.key``; the job is polled through ``batches.get`` (``JOB_STATE_*``), and its
inline responses are joined on that key. JSONL file input is not used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any

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

from llmbatch.batchapi import AnyRequest, BatchLimits, BatchStatus, Outcome
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
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_TRANSIENT_STATUSES = frozenset({"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "ABORTED"})
_ENDED_STATES = frozenset(
    {"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_CANCELLED"}
    | {"JOB_STATE_EXPIRED"}
)
_JSON = "application/json"


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
        base_url: another Gemini-compatible server (a simulator).
        timeout: seconds per HTTP request.
        name: the provider's name in limits, profiles and logs.

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
    ) -> None:
        key = (
            api_key or next((os.environ[v] for v in GEMINI_KEY_VARIABLES if os.environ.get(v)), "")
        ).strip()
        if not key:
            raise AuthenticationFailed(
                "no Gemini API key: pass api_key, or set GEMINI_API_KEY or GOOGLE_API_KEY",
                provider=name,
            )
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
        """This provider's Batch API (half price, its own quota)."""
        return GeminiBatchBackend(self, self._client)


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
    """Gemini's Batch API with inline requests: ``batches.create`` / ``get`` / ``cancel``.

    Each request carries its custom id as ``metadata.key``; the job's inline responses
    carry it back and are joined on it. A job runs one model (it is in the URL).
    """

    #: 20 MB per inline job (Gemini's limit), measured on the SDK-shaped lines with a
    #: margin for the REST wrapping; the count is not limited below that
    limits = BatchLimits(max_requests=100_000, max_bytes=19 * 1024 * 1024, one_model=True)

    def __init__(
        self,
        provider: GeminiProvider,
        client: genai.Client,
        *,
        limits: BatchLimits | None = None,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self._client = client
        if limits is not None:
            self.limits = limits

    def line(self, custom_id: str, request: AnyRequest) -> dict[str, Any]:
        """An inline request: ``{"contents", "config", "metadata": {"key": custom_id}}``."""
        if isinstance(request, EmbeddingRequest):
            raise BadRequest("Gemini embedding batches are not supported", provider=self.name)
        params = self.provider.content_params(request)
        self.provider.generate_config(params, request.model or "")
        return {**params, "metadata": {"key": custom_id}}

    async def submit(self, lines: Sequence[Mapping[str, Any]], *, model: str | None) -> str:
        """Create the batch job; its name (``batches/...``) is the id."""
        inline = [genai_types.InlinedRequest.model_validate(line) for line in lines]
        job: genai_types.BatchJob = await self._call(
            self._client.aio.batches.create(
                model=model or "", src=inline, config={"display_name": "llmbatch"}
            ),
            model,
        )
        if not job.name:
            raise ProviderUnavailable("the batch was created without a name", provider=self.name)
        return job.name

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
        """The job's inline responses, by the key in their metadata."""
        job: genai_types.BatchJob = await self._call(self._client.aio.batches.get(name=batch_id))
        dest = job.dest
        for entry in (dest.inlined_responses if dest is not None else None) or ():
            key = (entry.metadata or {}).get("key")
            if key is not None:
                yield key, entry

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
