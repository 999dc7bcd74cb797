"""Google Gemini's wire conventions: ``generateContent`` and the Batch API.

Online, :class:`GenerateContent` serves ``POST /v1beta/models/{model}:generateContent``
through the simulator's common request pipeline (authentication, faults, quotas per key,
latency). The key comes in ``x-goog-api-key`` or ``?key=`` (:func:`google_api_key`) and
is never echoed. Error bodies are Google's ``{"error": {"code", "message", "status",
"details"}}``; a 429 is ``RESOURCE_EXHAUSTED`` with a ``google.rpc.QuotaFailure`` naming
the quota (``quotaId`` ``...PerMinute...`` or ``...PerDay...``) and, for a per-minute
limit, a ``google.rpc.RetryInfo`` whose ``retryDelay`` (``"7s"``) is when the request
would pass. Gemini sends no rate-limit headers. Each (key, model) pair has up to four
buckets: requests per minute and per day (``rpm``, ``rpd``), input tokens per minute and
per day (``tpm``, ``tpd``; Gemini counts the prompt, not the output). A key in
``insufficient_quota`` gets the per-day 429 (a daily quota used up). Structured outputs
(``responseMimeType: application/json`` with ``responseJsonSchema`` or ``responseSchema``)
are answered as the other endpoints answer them (:mod:`llmbatch.testing._structured`); a
scripted refusal is Gemini's ``finishReason: "SAFETY"`` with no text.

The Batch API, :class:`GeminiBatches`, serves what the ``google-genai`` SDK calls for
inline batches: ``POST /v1beta/models/{model}:batchGenerateContent`` (``{"batch":
{"displayName", "inputConfig": {"requests": {"requests": [{"request", "metadata"}]}}}}``),
``GET /v1beta/batches/{id}`` (the long-running operation: ``metadata.state``
``BATCH_STATE_*``, and once ended ``metadata.output.inlinedResponses``, in input order,
each with its request's ``metadata``), ``POST /v1beta/batches/{id}:cancel`` and ``DELETE
/v1beta/batches/{id}``. Jobs follow :class:`~llmbatch.testing._batchsim.BatchSimConfig`'s
schedule on the batch clock: ``PENDING`` for ``validating_seconds``, ``RUNNING`` while the
requests run (``seconds_per_request`` each) and for ``finalizing_seconds``, then
``SUCCEEDED``; a cancel ends it ``CANCELLED`` after ``cancel_seconds`` with the answers of
the requests that ran before it; a job still running at ``completion_window_seconds`` is
``EXPIRED``, with no results (as Gemini documents). Requests whose ``metadata.key`` is in
``fail_custom_ids`` (or drawn by ``failure_rate``) fail with ``failure_status_code``.

JSONL files, :class:`GeminiFiles` (the File API as ``client.files`` calls it): ``POST
/upload/v1beta/files`` starts a resumable upload (``X-Goog-Upload-Protocol: resumable``,
``X-Goog-Upload-Command: start``, the size and type in ``X-Goog-Upload-Header-Content-
Length`` / ``-Type``, the key in ``x-goog-api-key``) and answers its session URL in
``X-Goog-Upload-URL``; ``POST`` to that URL (``?upload_id=``: the session is the
credential, no key is sent) with ``X-Goog-Upload-Command: upload`` at
``X-Goog-Upload-Offset``, the last chunk ``upload, finalize``, answers ``{"file": ...}``.
Every upload answer, errors included, carries ``X-Goog-Upload-Status`` (``active`` or
``final``): the SDK pauses and retries an answer without it. ``GET /v1beta/files/{name}``
is the file's metadata, ``DELETE`` removes it, and ``GET
/v1beta/files/{name}:download?alt=media`` (also under ``/download/``) its bytes; uploaded
files cannot be downloaded, only generated ones. A job created with ``inputConfig:
{"fileName": "files/..."}`` reads that file's lines, ``{"key", "request"}`` each, and once
ended names its result file in ``metadata.output.responsesFile``: one line per request it
ran, ``{"key", "response"}`` or ``{"key", "error"}``, in a shuffled order when
``shuffle_output`` is set (Gemini documents input order; the shuffle proves the join on
keys). Counters: ``gemini_files_uploaded``, ``gemini_file_bytes_uploaded``,
``gemini_file_batches_created``, ``gemini_files_downloaded``.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmbatch.testing._batchsim import _OFFLOAD_BYTES, _OFFLOAD_ITEMS, _offload, _shuffled
from llmbatch.testing._buckets import DAY, MINUTE
from llmbatch.testing._cache import NO_CACHE, CacheUse
from llmbatch.testing._content import Output, estimate_tokens
from llmbatch.testing._endpoint import Answer, ApiError, Endpoint, dumps, minute_and_day_buckets
from llmbatch.testing._faults import Fault
from llmbatch.testing._quota import Quota, Rejection
from llmbatch.testing._schema import SchemaError
from llmbatch.testing._structured import (
    NO_FAULTS,
    OutputSpec,
    Spoil,
    check_output,
    plan_output,
)

if TYPE_CHECKING:
    from llmbatch.testing._config import SimulatorConfig

__all__ = ["GeminiBatches", "GeminiFiles", "GenerateContent", "GoogleError", "google_api_key"]

_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_HELP = "https://ai.google.dev/gemini-api/docs/rate-limits"
#: Google's canonical status for each HTTP status
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_SERVER_ERRORS = {
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}
#: (bucket, period) -> (quotaId, quota metric)
_QUOTAS = {
    ("requests", MINUTE): (
        "GenerateRequestsPerMinutePerProjectPerModel",
        "generativelanguage.googleapis.com/generate_requests_per_model",
    ),
    ("tokens", MINUTE): (
        "GenerateContentInputTokensPerModelPerMinute",
        "generativelanguage.googleapis.com/generate_content_input_tokens_per_model",
    ),
    ("requests", DAY): (
        "GenerateRequestsPerDayPerProjectPerModel",
        "generativelanguage.googleapis.com/generate_requests_per_model_per_day",
    ),
    ("tokens", DAY): (
        "GenerateContentInputTokensPerModelPerDay",
        "generativelanguage.googleapis.com/generate_content_input_tokens_per_model_per_day",
    ),
}
#: the model of the request being served, from its URL (each request runs in its own
#: task, so check_headers can hand it to validate and answer)
_MODEL: contextvars.ContextVar[str] = contextvars.ContextVar("gemini_model", default="")
_JSON = "application/json"
#: the largest inline batch request Gemini takes (20 MB)
_MAX_INLINE_BYTES = 20 * 1024 * 1024
#: the largest file the File API takes (2 GB)
_MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
#: how long an uploaded or generated file lives (48 hours)
_FILE_TTL = 48 * 3600.0


#: the request validate checked, for answer (the same task)
_CHECKED: contextvars.ContextVar[_Checked | None] = contextvars.ContextVar(
    "gemini_checked", default=None
)


def google_api_key(request: web.Request) -> str:
    """The API key a Gemini request carries: ``x-goog-api-key``, or ``?key=``."""
    return request.headers.get("x-goog-api-key", "") or request.query.get("key", "")


class GoogleError(ApiError):
    """An error answer with Google's ``details`` (QuotaFailure, RetryInfo, ErrorInfo)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        details: Sequence[Mapping[str, Any]] = (),
        label: str | None = None,
    ) -> None:
        super().__init__(status, message, type=_STATUS.get(status, "UNKNOWN"), label=label)
        self.details = list(details)


def _details(error: ApiError) -> list[Any]:
    return error.details if isinstance(error, GoogleError) else []


def _error_json(status: int, message: str, details: Sequence[Any] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUS.get(status, "UNKNOWN"),
    }
    if details:
        body["details"] = list(details)
    return {"error": body}


def _delay(seconds: float) -> str:
    """A ``google.protobuf.Duration`` in JSON: whole seconds, rounded up, at least 1."""
    return f"{max(1, math.ceil(seconds - 1e-9))}s"


def quota_exceeded(
    name: str, period: float, limit: int | None, model: str, retry_after: float | None
) -> ApiError:
    """Gemini's 429 for the bucket *name* over *period* (*limit*: its size, if one is
    configured): QuotaFailure, and RetryInfo when the request will pass after
    *retry_after* seconds."""
    quota_id, metric = _QUOTAS[name, period]
    violation: dict[str, Any] = {
        "quotaMetric": metric,
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model},
    }
    if limit is not None:
        violation["quotaValue"] = str(limit)
    details: list[dict[str, Any]] = [
        {"@type": _QUOTA_FAILURE, "violations": [violation]},
        {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"url": _HELP}]},
    ]
    message = (
        "You exceeded your current quota, please check your plan and billing details. "
        f"For more information on this error, head to: {_HELP}.\n"
        f"* Quota exceeded for metric: {metric}, limit: {limit or 'unset'}, model: {model}"
    )
    if retry_after is not None and math.isfinite(retry_after):
        details.append({"@type": _RETRY_INFO, "retryDelay": _delay(retry_after)})
        message += f"\nPlease retry in {retry_after:.6g}s."
    label = "gemini_daily" if period == DAY else "gemini"
    return GoogleError(429, message, details=details, label=label)


def _text(content: Any) -> str:
    """The text of a Gemini ``Content`` (its parts' ``text``)."""
    if not isinstance(content, Mapping):
        return ""
    parts = content.get("parts")
    if not isinstance(parts, list):
        return ""
    return "".join(p["text"] for p in parts if isinstance(p, Mapping) and "text" in p)


@dataclass(frozen=True, slots=True)
class _Checked:
    """A validated ``GenerateContentRequest``: the same request in chat shape (what the
    content and structured-output helpers read), what it asks for, and its size."""

    chat: dict[str, Any]
    spec: OutputSpec | None
    prompt_tokens: int
    max_tokens: int | None


def check_request(body: Mapping[str, Any], model: str, config: SimulatorConfig) -> _Checked:
    """Validate a ``GenerateContentRequest`` the way Gemini does.

    Raises:
        ApiError: the 400 (or the 404 for an unknown model).
    """
    if config.reject_unknown_models and model not in config.models:
        raise GoogleError(
            404,
            f"models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods.",
        )
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise GoogleError(400, "* GenerateContentRequest.contents: contents is not specified")
    messages: list[dict[str, Any]] = []
    system = body.get("systemInstruction")
    if system is not None:
        messages.append({"role": "system", "content": _text(system)})
    for i, content in enumerate(contents):
        role = content.get("role", "user") if isinstance(content, Mapping) else None
        if role not in ("user", "model") or not isinstance(content.get("parts"), list):
            raise GoogleError(400, f"* GenerateContentRequest.contents[{i}]: invalid content")
        messages.append(
            {"role": "user" if role == "user" else "assistant", "content": _text(content)}
        )
    generation = body.get("generationConfig") or {}
    if not isinstance(generation, Mapping):
        raise GoogleError(400, "Invalid JSON payload received. Unknown name 'generationConfig'")
    max_tokens = generation.get("maxOutputTokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise GoogleError(
            400, "* GenerateContentRequest.generation_config.max_output_tokens: must be positive"
        )
    chat: dict[str, Any] = {"messages": messages}
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    spec = _output_spec(generation)
    try:
        check_output(chat, spec)
    except SchemaError as exc:
        raise GoogleError(
            400, f"* GenerateContentRequest.generation_config.response_schema: {exc}"
        ) from None
    prompt_tokens = estimate_tokens(chat)
    if prompt_tokens > config.context_window:
        raise GoogleError(
            400,
            f"The input token count ({prompt_tokens}) exceeds the maximum number of tokens "
            f"allowed ({config.context_window}).",
        )
    return _Checked(chat, spec, prompt_tokens, max_tokens)


def _output_spec(generation: Mapping[str, Any]) -> OutputSpec | None:
    """What ``responseMimeType`` / ``responseJsonSchema`` / ``responseSchema`` ask for."""
    mime = generation.get("responseMimeType")
    schema = generation.get("responseJsonSchema", generation.get("responseSchema"))
    if mime not in (None, "text/plain", _JSON, "text/x.enum"):
        raise GoogleError(
            400, f"* GenerateContentRequest.generation_config.response_mime_type: {mime}"
        )
    if schema is not None and mime != _JSON:
        raise GoogleError(
            400,
            "* GenerateContentRequest.generation_config.response_mime_type: response_mime_type "
            "must be application/json when a response schema is set",
        )
    if mime != _JSON:
        return None
    if schema is None:
        return OutputSpec("json_object")
    if not isinstance(schema, Mapping):
        raise GoogleError(
            400, "* GenerateContentRequest.generation_config.response_schema: invalid"
        )
    return OutputSpec("json_schema", _lower_types(schema))


def _lower_types(schema: Any) -> Any:
    """A ``responseSchema`` (OpenAPI subset, ``"type": "OBJECT"``) as JSON Schema."""
    if isinstance(schema, Mapping):
        return {
            k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v))
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_lower_types(v) for v in schema]
    return schema


def response_body(
    checked: _Checked, output: Output, model: str, response_id: str, cached: int = 0
) -> dict[str, Any]:
    """A ``GenerateContentResponse`` saying *output*."""
    if output.refusal:
        candidate: dict[str, Any] = {"finishReason": "SAFETY", "index": 0}
        tokens = 0
    else:
        candidate = {
            "content": {"parts": [{"text": output.text}], "role": "model"},
            "finishReason": "MAX_TOKENS" if output.truncated else "STOP",
            "index": 0,
        }
        tokens = output.tokens
    usage: dict[str, Any] = {
        "promptTokenCount": checked.prompt_tokens,
        "candidatesTokenCount": tokens,
        "totalTokenCount": checked.prompt_tokens + tokens,
    }
    if cached:
        usage["cachedContentTokenCount"] = cached
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": response_id,
    }


class GenerateContent(Endpoint):
    """``POST /v1beta/models/{model}:generateContent``."""

    provider = "gemini"
    path = "/v1beta/models/{model}:generateContent"
    #: the simulator's own (Gemini puts a ``responseId`` in the body, and no id header)
    request_id_header = "x-request-id"

    @staticmethod
    def bucket_specs(config: SimulatorConfig) -> list[tuple[str, float, int]]:
        return minute_and_day_buckets(config)

    def error_body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        return _error_json(error.status, error.message, _details(error))

    def unauthorized(self, *, missing: bool) -> ApiError:
        if missing:
            return GoogleError(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        return GoogleError(
            400,
            "API key not valid. Please pass a valid API key.",
            details=[
                {
                    "@type": _ERROR_INFO,
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        )

    def check_headers(self, request: web.Request) -> None:
        _MODEL.set(request.match_info.get("model", ""))

    def out_of_quota(self) -> ApiError:
        return quota_exceeded("requests", DAY, self.config.rpd, _MODEL.get(), None)

    def costs(self, prompt_tokens: int, reserved: int, cached: int = 0) -> dict[str, int]:
        return {"requests": 1, "tokens": prompt_tokens}

    def rate_limited(self, rejection: Rejection, model: str) -> ApiError:
        return quota_exceeded(
            rejection.name, rejection.period, rejection.limit, model, rejection.retry_after
        )

    def ratelimit_headers(self, quota: Quota, headers: dict[str, str]) -> None:
        """None: Gemini reports no remaining quota."""

    def settle(self, quota: Quota, reserved: int, produced: int) -> None:
        """Nothing: only the input counts, and it was charged in full."""

    def fault_error(self, fault: Fault, model: str) -> ApiError:
        if fault.status == 429:
            seconds = 1.0 if fault.retry_after is None else fault.retry_after
            return quota_exceeded("requests", MINUTE, self.config.rpm, model, seconds)
        message = _SERVER_ERRORS.get(fault.status, f"Error {fault.status}")
        return GoogleError(fault.status, message)

    def model_not_found(self, model: str) -> ApiError:
        return GoogleError(404, f"models/{model} is not found for API version v1beta")

    def model_info(self, model: str) -> dict[str, Any]:
        return {"name": f"models/{model}", "displayName": model}

    def model_page(self, models: Sequence[str]) -> dict[str, Any]:
        return {"models": [self.model_info(model) for model in models]}

    def cache_use(
        self, api_key: str, model: str, body: dict[str, Any], prompt_tokens: int, now: float
    ) -> CacheUse:
        """Gemini's implicit caching is not simulated."""
        return NO_CACHE

    def validate(self, body: dict[str, Any]) -> tuple[str, int, int]:
        model = _MODEL.get()
        checked = check_request(body, model, self.config)
        _CHECKED.set(checked)
        return model, checked.prompt_tokens, checked.max_tokens or 0

    def answer(
        self,
        body: dict[str, Any],
        prompt_tokens: int,
        token: str,
        spoil: Spoil | None = None,
        cache: CacheUse = NO_CACHE,
    ) -> Answer:
        model = _MODEL.get()
        checked = _CHECKED.get() or check_request(body, model, self.config)
        output = plan_output(checked.chat, checked.spec, faults=self.structured, spoil=spoil)
        payload = response_body(checked, output, model, f"resp_{token}")
        counted = output if output.outcome is not None else None
        return Answer([dumps(payload)], output.tokens, streaming=False, output=counted)


# -- the Batch API -------------------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    """One batch job: its inline items and its schedule (batch-clock seconds)."""

    id: str
    model: str
    display_name: str
    api_key: str
    created: float
    start: float
    per_request: float
    finalizing: float
    deadline: float
    cancel_delay: float
    #: per item: (its metadata, the response or the error body)
    items: list[tuple[dict[str, Any], dict[str, Any]]]
    cancel_at: float | None = None
    #: created from a JSONL file: its results go to a file too
    from_file: bool = False
    #: the result file, once the ended job has written it
    responses_file: str | None = None

    def done_count(self, now: float) -> int:
        """Items (in input order) finished by *now*."""
        if self.cancel_at is not None:
            now = min(now, self.cancel_at)
        now = min(now, self.deadline)
        if now < self.start:
            return 0
        if self.per_request <= 0:
            return len(self.items)
        return min(len(self.items), int((now - self.start) / self.per_request + 1e-9))

    def state(self, now: float) -> str:
        """``BATCH_STATE_*`` at *now*."""
        processed = self.start + len(self.items) * self.per_request
        if self.cancel_at is not None and now >= self.cancel_at + self.cancel_delay:
            return "BATCH_STATE_CANCELLED"
        if processed > self.deadline and now >= self.deadline:
            return "BATCH_STATE_EXPIRED"
        if now < self.start:
            return "BATCH_STATE_PENDING"
        if now < processed + self.finalizing:
            return "BATCH_STATE_RUNNING"
        return "BATCH_STATE_SUCCEEDED"


def _timestamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True)
class _File:
    """A file of the File API: uploaded, or generated (a batch's results)."""

    id: str
    display_name: str
    mime_type: str
    api_key: str
    created: float
    content: bytes
    generated: bool = False


@dataclass(slots=True)
class _Upload:
    """A resumable upload session: what was declared at its start, what came so far."""

    api_key: str
    display_name: str
    mime_type: str
    size: int
    received: bytearray = field(default_factory=bytearray)


class GeminiFiles:
    """The File API routes the ``google-genai`` SDK calls: the resumable upload, the
    metadata, the download of generated files, and deletion.

    Args:
        config: the simulator's configuration (``api_keys``).
        clock: the wall clock (UNIX seconds) of the timestamps.
    """

    def __init__(self, config: SimulatorConfig, *, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._files: dict[str, _File] = {}
        self._uploads: dict[str, _Upload] = {}
        self._counters = dict.fromkeys(
            ("gemini_files_uploaded", "gemini_file_bytes_uploaded", "gemini_files_downloaded"), 0
        )

    def __repr__(self) -> str:
        return f"<GeminiFiles files={len(self._files)} uploads={len(self._uploads)}>"

    def add_routes(self, app: web.Application) -> None:
        """Register the File API routes on *app* (the download before the metadata: the
        metadata route's name would match ``{name}:download`` too)."""
        app.router.add_post("/upload/v1beta/files", self._upload)
        app.router.add_get("/v1beta/files/{name}:download", self._download)
        app.router.add_get("/download/v1beta/files/{name}:download", self._download)
        app.router.add_get("/v1beta/files/{name}", self._get)
        app.router.add_delete("/v1beta/files/{name}", self._delete)

    def stats(self) -> dict[str, int]:
        """Files uploaded (and their bytes), result files downloaded."""
        return dict(self._counters)

    def lookup(self, name: str, api_key: str) -> _File:
        """The file *name* (``files/...``) of *api_key*.

        Raises:
            ApiError: 404 if there is no such file for this key.
        """
        found = self._files.get(name.removeprefix("files/"))
        if found is None or found.api_key != api_key:
            raise GoogleError(404, f"File {name} not found.")
        return found

    def generate(self, file_id: str, api_key: str, content: bytes) -> str:
        """Store a generated file (a batch's results); its name."""
        self._files[file_id] = _File(
            id=file_id,
            display_name=file_id,
            mime_type="application/jsonl",
            api_key=api_key,
            created=self._clock(),
            content=content,
            generated=True,
        )
        return f"files/{file_id}"

    def resource(self, found: _File, base: str) -> dict[str, Any]:
        """The ``File`` resource of *found* (*base*: the server's root URL)."""
        resource: dict[str, Any] = {
            "name": f"files/{found.id}",
            "displayName": found.display_name,
            "mimeType": found.mime_type,
            "sizeBytes": str(len(found.content)),
            "createTime": _timestamp(found.created),
            "updateTime": _timestamp(found.created),
            "expirationTime": _timestamp(found.created + _FILE_TTL),
            "uri": f"{base}/v1beta/files/{found.id}",
            "state": "ACTIVE",
            "source": "GENERATED" if found.generated else "UPLOADED",
        }
        if found.generated:
            resource["downloadUri"] = f"{base}/download/v1beta/files/{found.id}:download?alt=media"
        return resource

    # -- handlers ------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        raw = await request.read()
        upload_id = request.query.get("upload_id")
        try:
            if upload_id is None:
                return self._start(request, raw)
            return self._chunk(request, upload_id, raw)
        except ApiError as error:
            body = _error_json(error.status, error.message, _details(error))
            # "final": the SDK retries (after real pauses) an answer with no upload status
            headers = {"X-Goog-Upload-Status": "final"}
            return web.json_response(body, status=error.status, headers=headers, dumps=_compact)

    def _start(self, request: web.Request, raw: bytes) -> web.Response:
        """``X-Goog-Upload-Command: start``: open a session, answer its URL."""
        api_key = _authenticated(request, self._config)
        headers = request.headers
        if headers.get("X-Goog-Upload-Protocol", "").lower() != "resumable":
            raise GoogleError(400, "Only the resumable upload protocol is supported.")
        if headers.get("X-Goog-Upload-Command", "").lower() != "start":
            raise GoogleError(400, "The first request of an upload must be 'start'.")
        try:
            size = int(headers.get("X-Goog-Upload-Header-Content-Length", ""))
            declared = json.loads(raw) if raw else {}
        except ValueError:
            raise GoogleError(400, "Invalid upload start request.") from None
        if size < 0 or size > _MAX_FILE_BYTES:
            raise GoogleError(400, f"File size {size} exceeds the limit of {_MAX_FILE_BYTES}.")
        file = declared.get("file") if isinstance(declared, dict) else None
        file = file if isinstance(file, dict) else {}
        upload_id = secrets.token_urlsafe(24)
        self._uploads[upload_id] = _Upload(
            api_key=api_key,
            display_name=str(file.get("displayName") or ""),
            mime_type=headers.get("X-Goog-Upload-Header-Content-Type")
            or str(file.get("mimeType") or "application/octet-stream"),
            size=size,
        )
        query = f"upload_id={upload_id}&upload_protocol=resumable"
        url = f"{_root(request)}/upload/v1beta/files?{query}"
        return web.Response(
            headers={
                "X-Goog-Upload-URL": url,
                "X-Goog-Upload-Status": "active",
                "X-Goog-Upload-Chunk-Granularity": "262144",
            }
        )

    def _chunk(self, request: web.Request, upload_id: str, raw: bytes) -> web.Response:
        """``upload`` (and ``finalize``) at ``X-Goog-Upload-Offset``."""
        session = self._uploads.get(upload_id)
        if session is None:
            raise GoogleError(404, "No active upload session with this id.")
        commands = {
            c.strip().lower() for c in request.headers.get("X-Goog-Upload-Command", "").split(",")
        }
        if "query" in commands:
            return web.Response(
                headers={
                    "X-Goog-Upload-Status": "active",
                    "X-Goog-Upload-Size-Received": str(len(session.received)),
                }
            )
        if not commands <= {"upload", "finalize"} or not commands:
            del self._uploads[upload_id]
            raise GoogleError(400, "Unknown X-Goog-Upload-Command.")
        if "upload" in commands:
            offset = request.headers.get("X-Goog-Upload-Offset", "")
            if offset != str(len(session.received)):
                del self._uploads[upload_id]
                raise GoogleError(
                    400, f"Invalid upload offset {offset!r}: {len(session.received)} received."
                )
            session.received += raw
        if "finalize" not in commands:
            if len(session.received) > session.size:
                del self._uploads[upload_id]
                raise GoogleError(400, "More bytes uploaded than declared.")
            return web.Response(headers={"X-Goog-Upload-Status": "active"})
        del self._uploads[upload_id]
        if len(session.received) != session.size:
            raise GoogleError(
                400,
                f"The upload declared {session.size} bytes and sent {len(session.received)}.",
            )
        file_id = secrets.token_hex(6)
        found = self._files[file_id] = _File(
            id=file_id,
            display_name=session.display_name,
            mime_type=session.mime_type,
            api_key=session.api_key,
            created=self._clock(),
            content=bytes(session.received),
        )
        self._counters["gemini_files_uploaded"] += 1
        self._counters["gemini_file_bytes_uploaded"] += len(found.content)
        return web.json_response(
            {"file": self.resource(found, _root(request))},
            headers={"X-Goog-Upload-Status": "final"},
            dumps=_compact,
        )

    async def _get(self, request: web.Request) -> web.Response:
        def get() -> dict[str, Any]:
            api_key = _authenticated(request, self._config)
            found = self.lookup(request.match_info["name"], api_key)
            return self.resource(found, _root(request))

        return _answered(get)

    async def _delete(self, request: web.Request) -> web.Response:
        def delete() -> dict[str, Any]:
            api_key = _authenticated(request, self._config)
            found = self.lookup(request.match_info["name"], api_key)
            del self._files[found.id]
            return {}

        return _answered(delete)

    async def _download(self, request: web.Request) -> web.Response:
        try:
            api_key = _authenticated(request, self._config)
            found = self.lookup(request.match_info["name"], api_key)
            if request.query.get("alt") != "media":
                raise GoogleError(400, "Downloads need alt=media.")
            if not found.generated:
                raise GoogleError(
                    400, f"File files/{found.id} was uploaded: only generated files download."
                )
        except ApiError as error:
            body = _error_json(error.status, error.message, _details(error))
            return web.json_response(body, status=error.status, dumps=_compact)
        self._counters["gemini_files_downloaded"] += 1
        return web.Response(body=found.content, content_type="application/octet-stream")


def _root(request: web.Request) -> str:
    """The server's root URL as the client reached it."""
    return f"{request.scheme}://{request.host}"


def _authenticated(request: web.Request, config: SimulatorConfig) -> str:
    """The request's key, checked against ``api_keys``.

    Raises:
        ApiError: Gemini's 403 without a key, 400 for a key not valid.
    """
    key = google_api_key(request)
    if not key:
        raise GoogleError(403, "Method doesn't allow unregistered callers.")
    allowed = config.api_keys
    if allowed is not None and key not in allowed:
        raise GoogleError(400, "API key not valid. Please pass a valid API key.")
    return key


def _answered(handle: Callable[[], dict[str, Any]]) -> web.Response:
    """*handle*'s JSON, or its error in Google's shape."""
    try:
        payload = handle()
    except ApiError as error:
        body = _error_json(error.status, error.message, _details(error))
        return web.json_response(body, status=error.status, dumps=_compact)
    return web.json_response(payload, dumps=_compact)


_ENDED = ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")


class GeminiBatches:
    """The Gemini Batch API routes (inline requests, or a JSONL file of :attr:`files`), on
    the batch clock.

    Args:
        config: the simulator's configuration (``config.batch`` sets the schedule).
        clock: the wall clock (UNIX seconds) that moves jobs through their states.
    """

    def __init__(self, config: SimulatorConfig, *, clock: Callable[[], float]) -> None:
        assert config.batch is not None
        self._config = config
        self._batch = config.batch
        self._clock = clock
        self._jobs: dict[str, _Job] = {}
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._counters = dict.fromkeys(
            (
                "gemini_batches_created",
                "gemini_file_batches_created",
                "gemini_batches_cancel_requested",
                "gemini_api_errors",
            ),
            0,
        )
        #: the File API: JSONL inputs and result files
        self.files = GeminiFiles(config, clock=clock)

    def __repr__(self) -> str:
        return f"<GeminiBatches jobs={len(self._jobs)}>"

    def add_routes(self, app: web.Application) -> None:
        """Register the Batch API routes on *app*."""
        app.router.add_post("/v1beta/models/{model}:batchGenerateContent", self._create)
        app.router.add_get("/v1beta/batches/{id}", self._get)
        app.router.add_post("/v1beta/batches/{id}:cancel", self._cancel)
        app.router.add_delete("/v1beta/batches/{id}", self._delete)
        self.files.add_routes(app)

    def stats(self) -> dict[str, int]:
        """Jobs created (from a file among them), cancels asked, the requests of ended
        jobs by fate, and the File API's counters."""
        now = self._clock()
        stats = {**self._counters, **self.files.stats()}
        completed = failed = unrun = 0
        for job in self._jobs.values():
            if job.state(now) not in _ENDED:
                continue
            delivered = self._delivered(job, now)
            ok = sum("response" in entry for _, entry in delivered)
            completed += ok
            failed += len(delivered) - ok
            unrun += len(job.items) - len(delivered)
        stats["gemini_batch_requests_completed"] = completed
        stats["gemini_batch_requests_failed"] = failed
        stats["gemini_batch_requests_unrun"] = unrun
        return stats

    # -- handlers --------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> str:
        return _authenticated(request, self._config)

    def _job(self, request: web.Request) -> _Job:
        key = self._authenticate(request)
        job = self._jobs.get(request.match_info["id"])
        if job is None or job.api_key != key:
            raise GoogleError(404, f"Batch batches/{request.match_info['id']} not found.")
        return job

    def _answer(self, handle: Callable[[], dict[str, Any]]) -> web.Response:
        try:
            payload = handle()
        except ApiError as error:
            self._counters["gemini_api_errors"] += 1
            body = _error_json(error.status, error.message, _details(error))
            return web.json_response(body, status=error.status, dumps=_compact)
        return web.json_response(payload, dumps=_compact)

    async def _create(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            key, model, batch = self._parse_create(request, raw)
            config = batch.get("inputConfig") or {}
            if not isinstance(config, dict):
                raise GoogleError(400, "* BatchGenerateContentRequest.batch.input_config: invalid")
            name = config.get("fileName")
            entries: Any
            if name is not None:
                content = self.files.lookup(str(name), key).content
                entries = await _offload(
                    lambda: _file_entries(content), heavy=len(content) >= _OFFLOAD_BYTES
                )
            else:
                if len(raw) > _MAX_INLINE_BYTES:
                    raise GoogleError(400, "Request payload size exceeds the limit.")
                entries = (config.get("requests") or {}).get("requests")
            if not isinstance(entries, list) or not entries:
                raise GoogleError(
                    400, "* BatchGenerateContentRequest.batch.input_config: no requests"
                )
            job_id = f"{self._prefix}{next(self._ids):08x}"
            items = await _offload(
                lambda: [self._item(job_id, model, n, entry) for n, entry in enumerate(entries)],
                heavy=len(entries) >= _OFFLOAD_ITEMS,
            )
        except ApiError as error:
            self._counters["gemini_api_errors"] += 1
            body = _error_json(error.status, error.message, _details(error))
            return web.json_response(body, status=error.status, dumps=_compact)
        now = self._clock()
        timing = self._batch
        job = _Job(
            id=job_id,
            model=model,
            display_name=str(batch.get("displayName") or ""),
            api_key=key,
            created=now,
            start=now + timing.validating_seconds,
            per_request=timing.seconds_per_request,
            finalizing=timing.finalizing_seconds,
            deadline=now + timing.completion_window_seconds,
            cancel_delay=timing.cancel_seconds,
            items=items,
            from_file=name is not None,
        )
        self._jobs[job_id] = job
        self._counters["gemini_batches_created"] += 1
        if job.from_file:
            self._counters["gemini_file_batches_created"] += 1
        return web.json_response(self._operation(job, now), dumps=_compact)

    def _parse_create(self, request: web.Request, raw: bytes) -> tuple[str, str, dict[str, Any]]:
        """The key, the model and the ``batch`` of a ``batchGenerateContent`` call."""
        key = self._authenticate(request)
        model = request.match_info["model"]
        if self._config.reject_unknown_models and model not in self._config.models:
            raise GoogleError(404, f"models/{model} is not found for API version v1beta")
        try:
            body = json.loads(raw)
        except ValueError:
            raise GoogleError(400, "Invalid JSON payload received.") from None
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, dict):
            raise GoogleError(400, "* BatchGenerateContentRequest.batch: batch is required")
        return key, model, batch

    def _item(
        self, job_id: str, model: str, index: int, entry: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The metadata of one inline request and its fate: the response, or the error."""
        metadata = dict(entry.get("metadata") or {}) if isinstance(entry, dict) else {}
        body = entry.get("request") if isinstance(entry, dict) else None
        try:
            if not isinstance(body, dict):
                raise GoogleError(400, f"* inlined request {index}: request is required")
            checked = check_request(body, model, self._config)
        except ApiError as error:
            return metadata, {"error": _error_json(error.status, error.message)["error"]}
        key = str(metadata.get("key", index))
        if self._fails(job_id, key):
            status = self._batch.failure_status_code
            message = _SERVER_ERRORS.get(status, f"Error {status}")
            return metadata, {"error": _error_json(status, message)["error"]}
        output = plan_output(checked.chat, checked.spec, faults=NO_FAULTS)
        return metadata, {
            "response": response_body(checked, output, model, f"resp_{job_id}_{index}")
        }

    def _fails(self, job_id: str, key: str) -> bool:
        config = self._batch
        if key in config.fail_custom_ids:
            return True
        if config.failure_rate <= 0:
            return False
        digest = hashlib.sha256(f"{config.seed}:{job_id}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < config.failure_rate

    async def _get(self, request: web.Request) -> web.Response:
        return self._answer(lambda: self._operation(self._job(request), self._clock()))

    async def _cancel(self, request: web.Request) -> web.Response:
        def cancel() -> dict[str, Any]:
            job = self._job(request)
            now = self._clock()
            if job.state(now) in _ENDED:
                raise GoogleError(400, f"Batch batches/{job.id} has already ended.")
            if job.cancel_at is None:
                job.cancel_at = now
                self._counters["gemini_batches_cancel_requested"] += 1
            return {}

        return self._answer(cancel)

    async def _delete(self, request: web.Request) -> web.Response:
        def delete() -> dict[str, Any]:
            job = self._job(request)
            del self._jobs[job.id]
            return {}

        return self._answer(delete)

    # -- the operation -----------------------------------------------------------------------

    def _delivered(self, job: _Job, now: float) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The entries an ended job returns: none for an expired one."""
        if job.state(now) == "BATCH_STATE_EXPIRED":
            return []
        return job.items[: job.done_count(now)]

    def _operation(self, job: _Job, now: float) -> dict[str, Any]:
        """The job as the long-running operation ``GET batches/{id}`` returns."""
        state = job.state(now)
        done = state in _ENDED
        finished = job.done_count(now)
        succeeded = sum("response" in entry for _, entry in job.items[:finished])
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "name": f"batches/{job.id}",
            "model": f"models/{job.model}",
            "displayName": job.display_name,
            "createTime": _timestamp(job.created),
            "updateTime": _timestamp(now),
            "state": state,
            "batchStats": {
                "requestCount": str(len(job.items)),
                "successfulRequestCount": str(succeeded),
                "failedRequestCount": str(finished - succeeded),
                "pendingRequestCount": str(len(job.items) - finished),
            },
        }
        if done:
            metadata["endTime"] = _timestamp(now)
            delivered = self._delivered(job, now)
            if delivered and job.from_file:
                metadata["output"] = {"responsesFile": self._responses_file(job, delivered)}
            elif delivered:
                metadata["output"] = {
                    "inlinedResponses": {
                        "inlinedResponses": [
                            {**entry, "metadata": meta} for meta, entry in delivered
                        ]
                    }
                }
        return {"name": f"batches/{job.id}", "metadata": metadata, "done": done}

    def _responses_file(
        self, job: _Job, delivered: Sequence[tuple[dict[str, Any], dict[str, Any]]]
    ) -> str:
        """The ended file job's result file (written the first time it is asked for):
        ``{"key", "response" | "error"}`` per request it ran."""
        if job.responses_file is None:
            lines = [dumps({"key": meta.get("key"), **entry}) + b"\n" for meta, entry in delivered]
            content = b"".join(_shuffled(lines, self._batch, f"{job.id}:gemini"))
            job.responses_file = self.files.generate(f"batch-{job.id}", job.api_key, content)
        return job.responses_file


def _file_entries(content: bytes) -> list[dict[str, Any]]:
    """The requests of a batch input file, as inline entries (``{"request", "metadata":
    {"key"}}``); blank lines are skipped.

    Raises:
        ApiError: a line that is not a JSON object with a ``request`` object.
    """
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("request"), dict):
            raise GoogleError(
                400, f"Line {number} of the input file is not a {{key, request}} JSON object."
            )
        metadata = {"key": str(record["key"])} if "key" in record else {}
        entries.append({"request": record["request"], "metadata": metadata})
    return entries


def _compact(payload: Any) -> str:
    return dumps(payload).decode()
