"""The Batch API half of the provider simulator: OpenAI Files + Batches, Anthropic Message Batches.

:class:`BatchBackend` registers the offline batch endpoints on an ``aiohttp`` application;
the simulator server mounts it next to the online endpoints. It follows
``shared/PROTOCOLS.md`` ("OpenAI Batch API", "Anthropic Message Batches").

Lifecycle model
---------------
Nothing runs in the background. When a batch is created its input is validated at once and
it gets a fixed *schedule*; every later request reads the injected ``clock`` and derives
the batch's state from that schedule, so a test with a ``FakeClock`` steps through each
state by advancing the clock::

    created ─ validating_seconds ─▶ start ─ n * seconds_per_request ─▶ processed
            ─ finalizing_seconds ─▶ completed

* Item ``i`` (input order) finishes at ``start + (i + 1) * seconds_per_request``; the
  request counts, ``usage`` and the files reflect the items finished by the time asked.
* OpenAI statuses: ``validating`` until ``start``; then ``failed`` if validation found
  errors (``errors.data``: bad lines, mixed models, too many requests, the enqueued-token
  limit), else ``in_progress`` → ``finalizing`` (at ``processed``) → ``completed``.
  Anthropic has no validating phase: ``start`` is the creation time and the batch is
  ``in_progress`` until it ``ended``.
* Expiry: when ``processed`` falls after ``created + completion_window_seconds``, the batch
  becomes ``expired`` (Anthropic: ``ended``) at that deadline; finished items are
  delivered, the rest are reported as ``batch_expired`` (Anthropic: ``expired``).
* Cancel at time ``c``: ``cancelling`` (``canceling``) at ``c``, ``cancelled`` (``ended``)
  at ``c + cancel_seconds``; items finished before ``c`` are delivered, the rest never run
  (Anthropic reports them as ``canceled``).
* The enqueued-token limit is checked when a batch is created, per model, against the
  input tokens (:func:`estimate_tokens`) of the accepted batches that are still
  validating, in progress or finalizing; a batch over the limit is marked to fail with
  ``token_limit_exceeded`` when its validation ends and never counts against the limit.
* Per-request failures (``fail_custom_ids``, a seeded ``failure_rate``, invalid request
  bodies) are decided at creation; they land in the OpenAI error file or as Anthropic
  ``errored`` results. Output lines are shuffled deterministically (``shuffle_output``).

Prompt caching (unless ``prompt_cache=False``) is reported as online (see
:mod:`llmbatch.testing._cache`), decided at creation: each batch has a cache of its own,
and item ``i`` looks it up at ``start + i * seconds_per_request``, so a prefix repeated
within the TTL is written by its first request and read by the later ones. The OpenAI
batch object's ``usage.input_tokens_details.cached_tokens`` sums the reads.

Response bodies come from :mod:`llmbatch.testing._content`, so every output can be traced
back to its input by the ``[content_tag]`` its text starts with. Requests that ask for JSON
(``response_format``, a forced Anthropic tool, ``output_config.format``) get the same JSON
as online (:mod:`llmbatch.testing._structured`), never spoiled: the online endpoints'
``invalid_json``/``schema_violations`` fractions and scripts do not reach the batches; a
malformed or refused output format fails that request with the online endpoint's 400.

Scale: request bodies are streamed past the application's ``client_max_size`` up to the
providers' limits (200 MB files, 256 MB Anthropic batches). Parsing, item building and
result rendering for batches of 5,000+ requests (or 4 MiB+ bodies) run in a worker thread
so the online endpoints sharing the event loop keep answering; smaller batches stay
inline, which keeps fake-clock tests free of threads. A middleware must not consume the
multipart body of ``POST /v1/files`` (JSON bodies already read by a middleware are fine).

Azure OpenAI's Global Batch is the same API under ``/openai/files`` and
``/openai/batches`` (as ``AsyncAzureOpenAI`` calls them, with the ``api-version`` query
parameter): its batches and lines name endpoints without ``/v1`` (``/chat/completions``)
and lines' ``model`` is a deployment. It shares the files and batches of the OpenAI routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web

from llmbatch.testing._cache import NO_CACHE, CacheUse, PromptCache, cache_control_problem
from llmbatch.testing._content import (
    Output,
    anthropic_message,
    embeddings_response,
    estimate_tokens,
    openai_chat_completion,
)
from llmbatch.testing._structured import (
    FormatError,
    anthropic_request_spec,
    batch_output,
    openai_request_spec,
)

__all__ = ["ORGANIZATION", "BatchBackend", "BatchSimConfig"]

#: the organization named in OpenAI error messages
ORGANIZATION = "org-llmbatch-sim"

_MiB = 1024 * 1024
#: every endpoint OpenAI accepts for a batch
_OPENAI_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
#: the endpoints this simulator can answer
_SIMULATED_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
_FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: the most ``errors.data`` entries one failed batch reports
_MAX_REPORTED_ERRORS = 100
#: a JSON body larger than this is refused before parsing (Anthropic has its own limit)
_MAX_JSON_BODY = 16 * _MiB
#: batches with this many requests (or input bodies this large) are built and rendered in a
#: worker thread, so that the online endpoints sharing the event loop keep answering
_OFFLOAD_ITEMS = 5_000
_OFFLOAD_BYTES = 4 * _MiB
#: slack when dividing elapsed time by the per-request time
_EPSILON = 1e-9
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
#: the endpoints Azure names without ``/v1``
_AZURE_ENDPOINTS = frozenset(e.removeprefix("/v1") for e in _OPENAI_ENDPOINTS)
#: where Azure's routes live
_AZURE_PREFIX = "/openai/"


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchSimConfig:
    """How fast simulated batches run, how they fail, and the providers' limits.

    Args:
        validating_seconds: how long an OpenAI batch stays ``validating``.
        seconds_per_request: processing time per request (requests run one after another).
        finalizing_seconds: time from the last request to the end of the batch
            (OpenAI ``finalizing``; Anthropic stays ``in_progress`` meanwhile).
        cancel_seconds: time from a cancel request to ``cancelled`` / ``ended``.
        completion_window_seconds: the deadline after creation; 24 h like the providers,
            shrink it in tests to force expiry.
        shuffle_output: deliver output lines in a deterministic order that differs from
            the input order, as the providers warn they may.
        seed: seeds the shuffle, the ``failure_rate`` draws and the ids.
        fail_custom_ids: requests with these ``custom_id`` s always fail.
        failure_rate: the fraction of other requests that fail (drawn per batch and item).
        failure_status_code: the HTTP status an injected OpenAI failure reports.
        max_file_bytes: OpenAI upload size limit (200 MB).
        max_requests_per_file: OpenAI requests per input file (50,000).
        max_embedding_inputs: OpenAI embedding inputs across one batch (50,000).
        enqueued_token_limit: OpenAI enqueued input tokens per model (2,000,000).
        anthropic_max_requests: requests per Anthropic batch (100,000).
        anthropic_max_bytes: Anthropic batch request body size limit (256 MB).
    """

    validating_seconds: float = 2.0
    seconds_per_request: float = 0.05
    finalizing_seconds: float = 2.0
    cancel_seconds: float = 2.0
    completion_window_seconds: float = 86_400.0
    shuffle_output: bool = True
    seed: int = 0
    fail_custom_ids: frozenset[str] = field(default_factory=frozenset)
    failure_rate: float = 0.0
    failure_status_code: int = 500
    max_file_bytes: int = 200 * _MiB
    max_requests_per_file: int = 50_000
    max_embedding_inputs: int = 50_000
    enqueued_token_limit: int = 2_000_000
    anthropic_max_requests: int = 100_000
    anthropic_max_bytes: int = 256 * _MiB

    def __post_init__(self) -> None:
        for name in (
            "validating_seconds",
            "seconds_per_request",
            "finalizing_seconds",
            "cancel_seconds",
            "completion_window_seconds",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within [0, 1], not {self.failure_rate!r}")
        if not 400 <= self.failure_status_code <= 599:
            raise ValueError(
                f"failure_status_code must be 4xx or 5xx, not {self.failure_status_code!r}"
            )
        for name in (
            "max_file_bytes",
            "max_requests_per_file",
            "max_embedding_inputs",
            "enqueued_token_limit",
            "anthropic_max_requests",
            "anthropic_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        # accept any iterable of ids (a set, a list) while keeping the value hashable
        object.__setattr__(self, "fail_custom_ids", frozenset(self.fail_custom_ids))


# --------------------------------------------------------------------------------------
# Time: the schedule every batch follows, and the status timeline derived from it


@dataclass(slots=True, kw_only=True)
class _Schedule:
    """When a batch's items run. Only ``cancel_at`` changes after creation."""

    created_at: float
    start_at: float
    per_request: float
    finalizing: float
    cancel_delay: float
    expires_at: float
    size: int
    cancel_at: float | None = None

    @property
    def processed_at(self) -> float:
        """When the last item would finish if nothing stopped the batch."""
        return self.start_at + self.size * self.per_request

    @property
    def expires_first(self) -> bool:
        """Whether the completion window closes before every item has run."""
        return self.processed_at > self.expires_at

    @property
    def cutoff(self) -> float:
        """The moment after which no further item runs."""
        if self.cancel_at is not None:
            return min(self.cancel_at, self.processed_at)
        if self.expires_first:
            return self.expires_at
        return self.processed_at

    def items_done(self, now: float) -> int:
        """How many items (in input order) have finished by *now*."""
        now = min(now, self.cutoff)
        if now < self.start_at:
            return 0
        if self.per_request <= 0 or now >= self.processed_at:
            # (compared, not divided: with wall-clock times near 1.7e9 a division loses
            # the last item to rounding)
            return self.size
        return min(self.size, int((now - self.start_at) / self.per_request + _EPSILON))

    def item_done_at(self, index: int) -> float:
        """When item *index* finishes."""
        return self.start_at + (index + 1) * self.per_request


#: ``[(when, status), ...]`` in time order; the status at ``t`` is the last one with ``when <= t``
_Timeline = list[tuple[float, str]]


def _status_at(timeline: _Timeline, now: float) -> str:
    status = timeline[0][1]
    for when, step in timeline:
        if when <= now:
            status = step
    return status


def _reached(timeline: _Timeline, now: float) -> dict[str, float]:
    """``{status: when}`` for every status the timeline has entered by *now*."""
    return {step: when for when, step in timeline if when <= now}


def _unix(when: float | None) -> int | None:
    return None if when is None else int(when)


def _rfc3339(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------
# Items: one request of a batch, its fate decided at creation


@dataclass(frozen=True, slots=True)
class _Item:
    """One request of a batch. ``error`` is the provider-shaped error when it fails;
    ``cache`` what it reads from and writes to the batch's prompt cache."""

    custom_id: str
    body: dict[str, Any]
    input_tokens: int
    output_tokens: int
    status_code: int = 200
    error: dict[str, Any] | None = None
    cache: CacheUse = NO_CACHE


class _Tally:
    """Prefix sums over a batch's items, so counts at any moment are O(1)."""

    __slots__ = ("cache_read", "cache_written", "input_tokens", "output_tokens", "succeeded")

    def __init__(self, items: Sequence[_Item]) -> None:
        self.succeeded = [0]
        self.input_tokens = [0]
        self.output_tokens = [0]
        self.cache_read = [0]
        self.cache_written = [0]
        for item in items:
            ok = item.error is None
            self.succeeded.append(self.succeeded[-1] + ok)
            self.input_tokens.append(self.input_tokens[-1] + (item.input_tokens if ok else 0))
            self.output_tokens.append(self.output_tokens[-1] + (item.output_tokens if ok else 0))
            self.cache_read.append(self.cache_read[-1] + (item.cache.read if ok else 0))
            self.cache_written.append(self.cache_written[-1] + (item.cache.written if ok else 0))


def _with_prompt_cache(
    items: list[_Item], provider: str, *, start_at: float, per_request: float
) -> list[_Item]:
    """*items* with what each reads from and writes to the batch's own prompt cache,
    item ``i`` running at ``start_at + i * per_request``; failed items run nothing."""
    cache = PromptCache()
    cached: list[_Item] = []
    for index, item in enumerate(items):
        if item.error is not None:
            cached.append(item)
            continue
        now = start_at + index * per_request
        scope = str(item.body.get("model"))
        use = cache.lookup(provider, scope, item.body, item.input_tokens, now)
        cache.commit(use, now)
        cached.append(replace(item, cache=use) if use.marked else item)
    return cached


def _fails(config: BatchSimConfig, batch_id: str, custom_id: str) -> bool:
    """Whether an injected failure hits *custom_id* in this batch (deterministic)."""
    if custom_id in config.fail_custom_ids:
        return True
    if config.failure_rate <= 0:
        return False
    digest = hashlib.sha256(f"{config.seed}:{batch_id}:{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < config.failure_rate


def _shuffled(lines: list[bytes], config: BatchSimConfig, salt: str) -> list[bytes]:
    """*lines* in a deterministic order that differs from the input order (when it can)."""
    if not config.shuffle_output or len(lines) < 2:
        return lines
    order = list(lines)
    random.Random(f"{config.seed}:{salt}").shuffle(order)
    if order == lines:
        order = order[1:] + order[:1]
    return order


_T = TypeVar("_T")


async def _offload(work: Callable[[], _T], *, heavy: bool) -> _T:
    """Run *work* in a worker thread when it is *heavy*, inline otherwise."""
    if not heavy:
        return work()
    return await asyncio.to_thread(work)


def _jsonl(objects: Iterable[Mapping[str, Any]]) -> list[bytes]:
    return [json.dumps(obj, separators=(",", ":")).encode() + b"\n" for obj in objects]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _openai_output(body: Mapping[str, Any]) -> tuple[Output | None, dict[str, Any] | None]:
    """``(what the model writes, None)`` for a chat *body*, or ``(None, the 400 body)``
    when the online endpoint refuses its ``response_format``."""
    try:
        openai_request_spec(body)
    except FormatError as error:
        return None, _openai_error_body(error.message, param=error.param, code=error.code)
    return batch_output(body, "openai"), None


def _anthropic_output(params: Mapping[str, Any]) -> tuple[Output | None, str | None]:
    """``(what the model writes, None)`` for Messages *params*, or ``(None, the 400
    message)`` when the online endpoint refuses their tools or output format."""
    try:
        anthropic_request_spec(params)
    except FormatError as error:
        return None, error.message
    return batch_output(params, "anthropic"), None


# --------------------------------------------------------------------------------------
# Errors


class _Reject(Exception):
    """A 4xx answer, rendered in the shape of whichever API the route belongs to."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind


def _openai_error_body(
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------------------
# OpenAI: files and batches


@dataclass(slots=True, kw_only=True)
class _File:
    id: str
    filename: str
    purpose: str
    created_at: float
    content: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def _openai_body_error(endpoint: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The 400 error body the online endpoint would return for *body*, or None when valid."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _openai_error_body("you must provide a model parameter")
    if endpoint == "/v1/embeddings":
        inputs = body.get("input")
        if inputs is None:
            return _openai_error_body(
                "Missing required parameter: 'input'.",
                param="input",
                code="missing_required_parameter",
            )
        if not isinstance(inputs, str | list) or len(inputs) == 0:
            return _openai_error_body("'$.input' is invalid.", param="input", code="invalid_value")
        return None
    messages = body.get("messages")
    if messages is None:
        return _openai_error_body(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list):
        return _openai_error_body(
            "Invalid type for 'messages': expected an array, "
            f"but got {type(messages).__name__} instead.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        return _openai_error_body(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return _openai_error_body(
                f"Missing required parameter: 'messages[{i}].role'.",
                param=f"messages[{i}].role",
                code="missing_required_parameter",
            )
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and not _is_positive_int(value):
            return _openai_error_body(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
                f"but got {value!r} instead.",
                param=name,
                code="integer_below_min_value",
            )
    return None


def _line_error(
    code: str, message: str, line: int | None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


@dataclass(slots=True, kw_only=True)
class _ParsedInput:
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None


def _parse_openai_input(
    content: bytes, endpoint: str, config: BatchSimConfig, *, azure: bool = False
) -> _ParsedInput:
    """Validate an input file line by line, as OpenAI does while a batch is ``validating``
    (*azure*: lines name the endpoint without ``/v1``, as Azure's do)."""
    parsed = _ParsedInput()
    seen: set[str] = set()
    model_line = 0
    embedding_inputs = 0
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            parsed.errors.append(
                _line_error(
                    "invalid_json_line", "This line is not parseable as valid JSON.", number
                )
            )
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            parsed.errors.append(
                _line_error(
                    "missing_required_parameter",
                    "The custom_id parameter is required and must be a non-empty string.",
                    number,
                    "custom_id",
                )
            )
            continue
        if custom_id in seen:
            parsed.errors.append(
                _line_error(
                    "duplicate_custom_id",
                    "The custom_id for this request is a duplicate of another request. "
                    "The custom_id parameter must be unique for each request in a batch.",
                    number,
                    "custom_id",
                )
            )
            continue
        seen.add(custom_id)
        if line.get("method") != "POST":
            parsed.errors.append(
                _line_error(
                    "invalid_method", "The method of each request must be 'POST'.", number, "method"
                )
            )
            continue
        url = line.get("url")
        if azure and isinstance(url, str) and not url.startswith("/v1/"):
            url = "/v1" + url
        if url != endpoint:
            parsed.errors.append(
                _line_error(
                    "url_mismatch",
                    f"The URL {line.get('url')!r} of this request does not match the batch "
                    f"endpoint {endpoint!r}.",
                    number,
                    "url",
                )
            )
            continue
        body = line.get("body")
        if not isinstance(body, dict):
            parsed.errors.append(
                _line_error(
                    "invalid_request",
                    "The body of each request must be a JSON object.",
                    number,
                    "body",
                )
            )
            continue
        model = body.get("model")
        if isinstance(model, str) and model:
            if parsed.model is None:
                parsed.model, model_line = model, number
            elif model != parsed.model:
                parsed.errors.append(
                    _line_error(
                        "model_mismatch",
                        f"This line uses model {model!r} but line {model_line} uses "
                        f"{parsed.model!r}: "
                        "each input file can only include requests to a single model.",
                        number,
                        "body.model",
                    )
                )
                continue
        if endpoint == "/v1/embeddings":
            inputs = body.get("input")
            embedding_inputs += len(inputs) if isinstance(inputs, list) else 1
        parsed.requests.append((custom_id, body))
    if not parsed.requests and not parsed.errors:
        parsed.errors.append(
            _line_error("empty_file", "The input file contains no requests.", None)
        )
    if len(parsed.requests) > config.max_requests_per_file:
        parsed.errors.append(
            _line_error(
                "too_many_tasks",
                f"The input file contains {len(parsed.requests):,} requests; a batch can "
                f"include up to {config.max_requests_per_file:,} requests.",
                None,
            )
        )
    if embedding_inputs > config.max_embedding_inputs:
        parsed.errors.append(
            _line_error(
                "too_many_tasks",
                f"The input file contains {embedding_inputs:,} embedding inputs; an embeddings "
                f"batch can include up to {config.max_embedding_inputs:,} inputs.",
                None,
            )
        )
    return parsed


def _openai_items(
    requests: Sequence[tuple[str, dict[str, Any]]],
    endpoint: str,
    config: BatchSimConfig,
    batch_id: str,
) -> list[_Item]:
    """Decide the fate of each validated request: answered, 400 (invalid body) or injected."""
    items: list[_Item] = []
    for custom_id, body in requests:
        input_tokens = estimate_tokens(body)
        error = _openai_body_error(endpoint, body)
        output: Output | None = None
        if error is None and endpoint != "/v1/embeddings":
            output, error = _openai_output(body)
        if error is not None:
            items.append(_Item(custom_id, body, input_tokens, 0, 400, error))
        elif _fails(config, batch_id, custom_id):
            error = _openai_error_body(
                "The server had an error while processing your request. Sorry about that!",
                kind="server_error",
            )
            items.append(_Item(custom_id, body, input_tokens, 0, config.failure_status_code, error))
        else:
            output_tokens = 0 if output is None else output.tokens * int(body.get("n") or 1)
            items.append(_Item(custom_id, body, input_tokens, output_tokens))
    return items


class _OpenAIBatch:
    """One OpenAI batch: what was asked, its schedule, and everything derived from them."""

    __slots__ = (
        "completion_window",
        "endpoint",
        "error_file_id",
        "errors",
        "files_made",
        "id",
        "input_file_id",
        "input_tokens",
        "items",
        "metadata",
        "model",
        "output_file_id",
        "schedule",
        "tally",
    )

    def __init__(
        self,
        *,
        batch_id: str,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        model: str | None,
        items: list[_Item],
        errors: list[dict[str, Any]],
        schedule: _Schedule,
        output_file_id: str,
        error_file_id: str,
    ) -> None:
        self.id = batch_id
        self.endpoint = endpoint
        self.input_file_id = input_file_id
        self.completion_window = completion_window
        self.metadata = metadata
        self.model = model
        self.items = items
        self.errors = errors
        self.schedule = schedule
        self.tally = _Tally(items)
        self.input_tokens = sum(item.input_tokens for item in items)
        #: ids reserved for the result files; exposed only once the batch ends with content
        self.output_file_id = output_file_id
        self.error_file_id = error_file_id
        self.files_made = False

    def timeline(self) -> _Timeline:
        s = self.schedule
        steps: _Timeline = [(s.created_at, "validating")]
        if s.cancel_at is not None:
            if s.cancel_at >= s.start_at:
                steps.append((s.start_at, "in_progress"))
            steps += [(s.cancel_at, "cancelling"), (s.cancel_at + s.cancel_delay, "cancelled")]
        elif self.errors:
            steps.append((s.start_at, "failed"))
        elif s.expires_first:
            if s.start_at < s.expires_at:
                steps.append((s.start_at, "in_progress"))
            steps.append((s.expires_at, "expired"))
        else:
            steps += [
                (s.start_at, "in_progress"),
                (s.processed_at, "finalizing"),
                (s.processed_at + s.finalizing, "completed"),
            ]
        return steps

    def status(self, now: float) -> str:
        return _status_at(self.timeline(), now)

    def holds_enqueued_tokens(self, now: float) -> bool:
        """Whether this batch counts against its model's enqueued-token limit at *now*."""
        return not self.errors and self.status(now) in {"validating", "in_progress", "finalizing"}

    def done(self, now: float) -> int:
        return 0 if self.errors else self.schedule.items_done(now)

    def outcome(self, now: float) -> tuple[int, int, int]:
        """``(succeeded, failed, not run)`` at *now*."""
        k = self.done(now)
        ok = self.tally.succeeded[k]
        return ok, k - ok, len(self.items) - k

    def result_files(self, config: BatchSimConfig) -> tuple[bytes, bytes]:
        """The output and error files of an ended batch, lines shuffled per *config*."""
        s = self.schedule
        k = self.done(s.cutoff)
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for index, item in enumerate(self.items[:k]):
            line_id, request_id, answer_id = (
                _derived_id(self.id, index, kind) for kind in ("batch_req_", "req_", "chatcmpl-")
            )
            if item.error is not None:
                response = {
                    "status_code": item.status_code,
                    "request_id": request_id,
                    "body": item.error,
                }
                errors.append(
                    {
                        "id": line_id,
                        "custom_id": item.custom_id,
                        "response": response,
                        "error": None,
                    }
                )
                continue
            if self.endpoint == "/v1/embeddings":
                body = embeddings_response(item.body)
            else:
                body = openai_chat_completion(
                    item.body,
                    completion_id=answer_id,
                    created=int(s.item_done_at(index)),
                    prompt_tokens=item.input_tokens,
                    output=batch_output(item.body, "openai"),
                    cached_tokens=item.cache.read,
                )
            response = {"status_code": 200, "request_id": request_id, "body": body}
            output.append(
                {"id": line_id, "custom_id": item.custom_id, "response": response, "error": None}
            )
        if s.cancel_at is None and s.expires_first:
            for index, item in enumerate(self.items[k:], start=k):
                errors.append(
                    {
                        "id": _derived_id(self.id, index, "batch_req_"),
                        "custom_id": item.custom_id,
                        "response": None,
                        "error": {"code": "batch_expired", "message": _EXPIRED_MESSAGE},
                    }
                )
        return (
            b"".join(_shuffled(_jsonl(output), config, f"{self.id}:output")),
            b"".join(_shuffled(_jsonl(errors), config, f"{self.id}:error")),
        )

    def has_files(self, now: float) -> tuple[bool, bool]:
        """Whether the output and error files exist at *now* (ended with that content)."""
        if self.status(now) not in {"completed", "expired", "cancelled"}:
            return False, False
        ok, failed, not_run = self.outcome(now)
        expired = self.schedule.cancel_at is None and self.schedule.expires_first
        return ok > 0, failed > 0 or (expired and not_run > 0)

    def to_json(self, now: float) -> dict[str, Any]:
        timeline = self.timeline()
        status = _status_at(timeline, now)
        at = _reached(timeline, now)
        ok, failed, _ = self.outcome(now)
        k = ok + failed
        has_output, has_errors = self.has_files(now)
        input_tokens = self.tally.input_tokens[k]
        output_tokens = self.tally.output_tokens[k]
        cached_tokens = self.tally.cache_read[k]
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id if has_output else None,
            "error_file_id": self.error_file_id if has_errors else None,
            "created_at": int(self.schedule.created_at),
            "in_progress_at": _unix(at.get("in_progress")),
            "expires_at": int(self.schedule.expires_at),
            "finalizing_at": _unix(at.get("finalizing")),
            "completed_at": _unix(at.get("completed")),
            "failed_at": _unix(at.get("failed")),
            "expired_at": _unix(at.get("expired")),
            "cancelling_at": _unix(at.get("cancelling")),
            "cancelled_at": _unix(at.get("cancelled")),
            "request_counts": {
                "total": len(self.items) if "in_progress" in at else 0,
                "completed": ok,
                "failed": failed,
            },
            "metadata": self.metadata,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached_tokens},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
        }


# --------------------------------------------------------------------------------------
# Anthropic: message batches


def _anthropic_param_error(params: Mapping[str, Any]) -> str | None:
    """Why Anthropic would reject *params* as a Messages request, or None when valid."""
    model = params.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    problem = cache_control_problem(params)
    if problem is not None:
        return problem
    max_tokens = params.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if not _is_positive_int(max_tokens):
        return "max_tokens: Input should be greater than or equal to 1"
    messages = params.get("messages")
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in {"user", "assistant"}:
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
    return None


def _anthropic_items(
    requests: Sequence[Mapping[str, Any]], config: BatchSimConfig, batch_id: str
) -> list[_Item]:
    """Decide the fate of each request; invalid params become ``errored`` results."""
    items: list[_Item] = []
    for index, entry in enumerate(requests):
        custom_id, params = entry["custom_id"], entry["params"]
        input_tokens = estimate_tokens(params)
        problem = _anthropic_param_error(params)
        output: Output | None = None
        if problem is None:
            output, problem = _anthropic_output(params)
        if output is not None and not _fails(config, batch_id, custom_id):
            items.append(_Item(custom_id, params, input_tokens, output.tokens))
            continue
        kind, message = (
            ("invalid_request_error", problem)
            if problem is not None
            else ("api_error", "Internal server error")
        )
        error = {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": _derived_id(batch_id, index, "req_"),
        }
        items.append(_Item(custom_id, params, input_tokens, 0, 400 if problem else 500, error))
    return items


class _AnthropicBatch:
    """One Anthropic message batch; its state is derived from the schedule like OpenAI's."""

    __slots__ = ("id", "items", "results_file", "schedule", "tally")

    def __init__(self, *, batch_id: str, items: list[_Item], schedule: _Schedule) -> None:
        self.id = batch_id
        self.items = items
        self.schedule = schedule
        self.tally = _Tally(items)
        #: the rendered results, cached once the batch has ended
        self.results_file: bytes | None = None

    def timeline(self) -> _Timeline:
        s = self.schedule
        steps: _Timeline = [(s.created_at, "in_progress")]
        if s.cancel_at is not None:
            steps += [(s.cancel_at, "canceling"), (s.cancel_at + s.cancel_delay, "ended")]
        elif s.expires_first:
            steps.append((s.expires_at, "ended"))
        else:
            steps.append((s.processed_at + s.finalizing, "ended"))
        return steps

    def status(self, now: float) -> str:
        return _status_at(self.timeline(), now)

    def counts(self, now: float) -> dict[str, int]:
        """``request_counts``: everything is ``processing`` until the whole batch has ended."""
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if self.status(now) != "ended":
            counts["processing"] = len(self.items)
            return counts
        k = self.schedule.items_done(now)
        counts["succeeded"] = self.tally.succeeded[k]
        counts["errored"] = k - self.tally.succeeded[k]
        counts["canceled" if self.schedule.cancel_at is not None else "expired"] = (
            len(self.items) - k
        )
        return counts

    def render_results(self, config: BatchSimConfig) -> bytes:
        """The results file of an ended batch, lines shuffled per *config*."""
        s = self.schedule
        k = s.items_done(s.cutoff)
        lines: list[dict[str, Any]] = []
        for index, item in enumerate(self.items):
            result: dict[str, Any]
            if index >= k:
                result = {"type": "canceled" if s.cancel_at is not None else "expired"}
            elif item.error is not None:
                result = {"type": "errored", "error": item.error}
            else:
                message_id = _derived_id(self.id, index, "msg_")
                result = {
                    "type": "succeeded",
                    "message": anthropic_message(
                        item.body,
                        message_id=message_id,
                        input_tokens=item.input_tokens,
                        output=batch_output(item.body, "anthropic"),
                        cache=item.cache,
                    ),
                }
            lines.append({"custom_id": item.custom_id, "result": result})
        return b"".join(_shuffled(_jsonl(lines), config, f"{self.id}:results"))

    def to_json(self, now: float, origin: str) -> dict[str, Any]:
        timeline = self.timeline()
        status = _status_at(timeline, now)
        at = _reached(timeline, now)
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": self.counts(now),
            "created_at": _rfc3339(self.schedule.created_at),
            "expires_at": _rfc3339(self.schedule.expires_at),
            "ended_at": _rfc3339(at.get("ended")),
            "cancel_initiated_at": _rfc3339(at.get("canceling")),
            "archived_at": None,
            "results_url": f"{origin}/v1/messages/batches/{self.id}/results"
            if status == "ended"
            else None,
        }


def _derived_id(batch_id: str, index: int, prefix: str) -> str:
    """A stable id for item *index* of *batch_id* (``batch_req_…``, ``req_…``, ``msg_…``)."""
    return prefix + hashlib.sha256(f"{prefix}{batch_id}:{index}".encode()).hexdigest()[:24]


def _page(
    ids: list[str], *, after: str | None, before: str | None, limit: int
) -> tuple[list[str], bool]:
    """One page of *ids* (newest first) after/before a cursor; ``(page, has_more)``."""
    if after is not None:
        rest = ids[ids.index(after) + 1 :]
        return rest[:limit], len(rest) > limit
    if before is not None:
        head = ids[: ids.index(before)]
        return head[-limit:], len(head) > limit
    return ids[:limit], len(ids) > limit


def _limit(value: str | None, *, default: int, maximum: int) -> int:
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise _Reject(
            400, f"limit must be an integer between 1 and {maximum}, not {value!r}", param="limit"
        )
    return limit


# --------------------------------------------------------------------------------------
# The backend


def _is_azure(request: web.Request) -> bool:
    """Whether *request* came through one of Azure's routes."""
    return request.path.startswith(_AZURE_PREFIX)


def _azure(handler: _Handler) -> _Handler:
    """*handler* as an Azure route: the ``api-version`` query parameter is required
    (the path, under ``/openai/``, says that endpoints come without ``/v1``)."""

    async def route(request: web.Request) -> web.StreamResponse:
        if not request.query.get("api-version"):
            raise _Reject(
                400,
                "The api-version query parameter (?api-version=) is required for all requests.",
                code="MissingApiVersionParameter",
            )
        return await handler(request)

    return route


class BatchBackend:
    """OpenAI Files/Batches and Anthropic Message Batches endpoints for the simulator.

    Args:
        config: speeds, failures and limits; the defaults mimic the real providers.
        clock: returns wall-clock UNIX seconds; pass a ``FakeClock`` to step time by hand.
        prompt_cache: report prompt caching in the results (see the module docstring).
    """

    __slots__ = (
        "_anthropic",
        "_clock",
        "_config",
        "_counter",
        "_counters",
        "_files",
        "_openai",
        "_prompt_cache",
    )

    def __init__(
        self,
        config: BatchSimConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        prompt_cache: bool = True,
    ) -> None:
        self._config = config or BatchSimConfig()
        self._clock = clock
        self._prompt_cache = prompt_cache
        self._counter = itertools.count(1)
        self._files: dict[str, _File] = {}
        self._openai: dict[str, _OpenAIBatch] = {}
        self._anthropic: dict[str, _AnthropicBatch] = {}
        self._counters = dict.fromkeys(
            (
                "files_uploaded",
                "file_bytes_uploaded",
                "openai_batches_created",
                "anthropic_batches_created",
                "batches_token_limited",
                "batches_cancel_requested",
                "batch_api_errors",
            ),
            0,
        )

    def __repr__(self) -> str:
        return (
            f"<BatchBackend files={len(self._files)} openai_batches={len(self._openai)} "
            f"anthropic_batches={len(self._anthropic)} {self._config!r}>"
        )

    @property
    def config(self) -> BatchSimConfig:
        """The configuration this backend runs with."""
        return self._config

    def add_routes(self, app: web.Application) -> None:
        """Register every Batch API route on *app*.

        Args:
            app: the simulator's application (not yet started).
        """
        openai_routes: list[tuple[str, str, _Handler]] = [
            ("POST", "/v1/files", self._create_file),
            ("GET", "/v1/files", self._list_files),
            ("GET", "/v1/files/{file_id}", self._retrieve_file),
            ("DELETE", "/v1/files/{file_id}", self._delete_file),
            ("GET", "/v1/files/{file_id}/content", self._file_content),
            ("POST", "/v1/batches", self._create_batch),
            ("GET", "/v1/batches", self._list_batches),
            ("GET", "/v1/batches/{batch_id}", self._retrieve_batch),
            ("POST", "/v1/batches/{batch_id}/cancel", self._cancel_batch),
        ]
        anthropic_routes: list[tuple[str, str, _Handler]] = [
            ("POST", "/v1/messages/batches", self._create_message_batch),
            ("GET", "/v1/messages/batches", self._list_message_batches),
            ("GET", "/v1/messages/batches/{batch_id}", self._retrieve_message_batch),
            ("DELETE", "/v1/messages/batches/{batch_id}", self._delete_message_batch),
            ("POST", "/v1/messages/batches/{batch_id}/cancel", self._cancel_message_batch),
            ("GET", "/v1/messages/batches/{batch_id}/results", self._message_batch_results),
        ]
        for method, path, handler in openai_routes:
            app.router.add_route(method, path, self._openai_route(handler))
            # Azure OpenAI: /openai/files, /openai/batches... (?api-version=)
            azure_path = _AZURE_PREFIX + path.removeprefix("/v1/")
            app.router.add_route(method, azure_path, self._openai_route(_azure(handler)))
        for method, path, handler in anthropic_routes:
            app.router.add_route(method, path, self._anthropic_route(handler))

    def stats(self) -> dict[str, int]:
        """Counters: uploads, batches created, and the fate of requests in ended batches.

        ``batch_requests_*`` and the token totals count the requests of batches that have
        ended by now (``completed`` / ``expired`` / ``cancelled`` / ``ended``).
        """
        now = self._clock()
        stats = dict(self._counters)
        stats["batches_created"] = (
            stats["openai_batches_created"] + stats["anthropic_batches_created"]
        )
        totals = dict.fromkeys(
            (
                "batches_failed",
                "batches_ended",
                "batch_requests_completed",
                "batch_requests_failed",
                "batch_requests_expired",
                "batch_requests_canceled",
                "batch_input_tokens",
                "batch_output_tokens",
                "batch_cache_read_tokens",
                "batch_cache_write_tokens",
            ),
            0,
        )
        ended: list[_OpenAIBatch | _AnthropicBatch] = []
        for batch in self._openai.values():
            status = batch.status(now)
            if status == "failed":
                totals["batches_failed"] += 1
            elif status in {"completed", "expired", "cancelled"}:
                ended.append(batch)
        ended += [batch for batch in self._anthropic.values() if batch.status(now) == "ended"]
        for done in ended:
            s = done.schedule
            k = s.items_done(now)
            ok = done.tally.succeeded[k]
            totals["batches_ended"] += 1
            totals["batch_requests_completed"] += ok
            totals["batch_requests_failed"] += k - ok
            unfinished = (
                "batch_requests_canceled" if s.cancel_at is not None else "batch_requests_expired"
            )
            totals[unfinished] += len(done.items) - k
            totals["batch_input_tokens"] += done.tally.input_tokens[k]
            totals["batch_output_tokens"] += done.tally.output_tokens[k]
            totals["batch_cache_read_tokens"] += done.tally.cache_read[k]
            totals["batch_cache_write_tokens"] += done.tally.cache_written[k]
        stats.update(totals)
        return dict(sorted(stats.items()))

    # ----------------------------------------------------------------------------------
    # plumbing

    def _new_id(self, prefix: str, length: int = 24) -> str:
        n = next(self._counter)
        return (
            prefix
            + hashlib.sha256(f"{self._config.seed}:{prefix}:{n}".encode()).hexdigest()[:length]
        )

    def _schedule(self, now: float, *, start_at: float, size: int) -> _Schedule:
        c = self._config
        return _Schedule(
            created_at=now,
            start_at=start_at,
            per_request=c.seconds_per_request,
            finalizing=c.finalizing_seconds,
            cancel_delay=c.cancel_seconds,
            expires_at=now + c.completion_window_seconds,
            size=size,
        )

    def _openai_route(self, handler: _Handler) -> _Handler:
        async def route(request: web.Request) -> web.StreamResponse:
            request_id = self._new_id("req_", 32)
            try:
                response = await handler(request)
            except _Reject as reject:
                self._counters["batch_api_errors"] += 1
                response = web.json_response(
                    _openai_error_body(
                        reject.message,
                        kind=reject.kind or "invalid_request_error",
                        param=reject.param,
                        code=reject.code,
                    ),
                    status=reject.status,
                )
            response.headers.setdefault("x-request-id", request_id)
            return response

        return route

    def _anthropic_route(self, handler: _Handler) -> _Handler:
        async def route(request: web.Request) -> web.StreamResponse:
            request_id = self._new_id("req_", 24)
            try:
                response = await handler(request)
            except _Reject as reject:
                self._counters["batch_api_errors"] += 1
                body = {
                    "type": "error",
                    "error": {
                        "type": reject.kind or "invalid_request_error",
                        "message": reject.message,
                    },
                    "request_id": request_id,
                }
                response = web.json_response(body, status=reject.status)
            response.headers.setdefault("request-id", request_id)
            return response

        return route

    @staticmethod
    async def _read_body(request: web.Request, limit: int, too_large: _Reject) -> bytes:
        """The request body, read up to *limit* bytes without the app's ``client_max_size``."""
        if request.content.at_eof():
            # a middleware already read it: aiohttp keeps the bytes
            return await request.read()
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            if len(body) + len(chunk) > limit:
                # drain the rest so the client sees the answer, not a reset connection
                async for _ in request.content.iter_chunked(64 * 1024):
                    pass
                raise too_large
            body.extend(chunk)
        return bytes(body)

    async def _json_body(self, request: web.Request, limit: int = _MAX_JSON_BODY) -> dict[str, Any]:
        raw = await self._read_body(
            request,
            limit,
            _Reject(413, f"Request body exceeds {limit:,} bytes.", kind="request_too_large"),
        )
        try:
            body = await _offload(lambda: json.loads(raw), heavy=len(raw) >= _OFFLOAD_BYTES)
        except ValueError:
            raise _Reject(
                400,
                "We could not parse the JSON body of your request. The body must be valid JSON.",
            ) from None
        if not isinstance(body, dict):
            raise _Reject(400, "The request body must be a JSON object.")
        return body

    # ----------------------------------------------------------------------------------
    # OpenAI files

    async def _file(self, file_id: str) -> _File:
        """Look up a file, first materializing the result files of batches that ended."""
        if file_id not in self._files:
            now = self._clock()
            for batch in self._openai.values():
                if file_id in (batch.output_file_id, batch.error_file_id):
                    await self._make_result_files(batch, now)
                    break
        found = self._files.get(file_id)
        if found is None:
            raise _Reject(404, f"No such File object: {file_id}", param="id")
        return found

    async def _make_result_files(self, batch: _OpenAIBatch, now: float) -> None:
        """Create the output/error files of an ended batch (once)."""
        has_output, has_errors = batch.has_files(now)
        if batch.files_made or not (has_output or has_errors):
            return
        rendered = await _offload(
            lambda: batch.result_files(self._config), heavy=len(batch.items) >= _OFFLOAD_ITEMS
        )
        self._store_result_files(batch, now, rendered)

    def _store_result_files(
        self, batch: _OpenAIBatch, now: float, rendered: tuple[bytes, bytes]
    ) -> None:
        if batch.files_made:  # a concurrent request stored them while this one rendered
            return
        batch.files_made = True
        has_output, has_errors = batch.has_files(now)
        ended_at = _reached(batch.timeline(), now)[batch.status(now)]
        for file_id, exists, content, kind in (
            (batch.output_file_id, has_output, rendered[0], "output"),
            (batch.error_file_id, has_errors, rendered[1], "error"),
        ):
            if exists:
                self._files[file_id] = _File(
                    id=file_id,
                    filename=f"{batch.id}_{kind}.jsonl",
                    purpose="batch_output",
                    created_at=ended_at,
                    content=content,
                )

    async def _create_file(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            raise _Reject(
                400, "Expected a multipart/form-data body with the fields 'purpose' and 'file'."
            )
        limit = self._config.max_file_bytes
        purpose: str | None = None
        filename = "file"
        content: bytearray | None = None
        too_large = False
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _Reject(400, "Nested multipart bodies are not supported.")
            if part.name == "purpose":
                purpose = await part.text()
            elif part.name == "file":
                filename = part.filename or filename
                content = bytearray()
                while chunk := await part.read_chunk():
                    too_large = too_large or len(content) + len(chunk) > limit
                    if not too_large:
                        content.extend(chunk)
            else:
                await part.release()
        if purpose is None:
            raise _Reject(
                400,
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in _FILE_PURPOSES:
            raise _Reject(
                400,
                f"Invalid value for 'purpose': {purpose!r}. Supported values are: "
                + ", ".join(repr(p) for p in sorted(_FILE_PURPOSES))
                + ".",
                param="purpose",
                code="invalid_value",
            )
        if content is None:
            raise _Reject(
                400,
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        if too_large:
            raise _Reject(
                400,
                f"File is too large: files with purpose '{purpose}' can be at most "
                f"{limit:,} bytes.",
                param="file",
                code="file_too_large",
            )
        created = _File(
            id=self._new_id("file-", 22),
            filename=filename,
            purpose=purpose,
            created_at=self._clock(),
            content=bytes(content),
        )
        self._files[created.id] = created
        self._counters["files_uploaded"] += 1
        self._counters["file_bytes_uploaded"] += len(created.content)
        return web.json_response(created.to_json())

    async def _list_files(self, request: web.Request) -> web.StreamResponse:
        purpose = request.query.get("purpose")
        ids = [f.id for f in reversed(self._files.values()) if purpose in (None, f.purpose)]
        if request.query.get("order") == "asc":
            ids.reverse()
        after = request.query.get("after")
        if after is not None and after not in ids:
            raise _Reject(400, f"Invalid 'after': no file {after!r}.", param="after")
        page, has_more = _page(
            ids,
            after=after,
            before=None,
            limit=_limit(request.query.get("limit"), default=10_000, maximum=10_000),
        )
        return web.json_response(
            {
                "object": "list",
                "data": [self._files[i].to_json() for i in page],
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": has_more,
            }
        )

    async def _retrieve_file(self, request: web.Request) -> web.StreamResponse:
        return web.json_response((await self._file(request.match_info["file_id"])).to_json())

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        found = await self._file(request.match_info["file_id"])
        del self._files[found.id]
        return web.json_response({"id": found.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        found = await self._file(request.match_info["file_id"])
        return web.Response(body=found.content, content_type="application/octet-stream")

    # ----------------------------------------------------------------------------------
    # OpenAI batches

    def _openai_batch(self, batch_id: str) -> _OpenAIBatch:
        batch = self._openai.get(batch_id)
        if batch is None:
            raise _Reject(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    async def _render_batch(self, batch: _OpenAIBatch, now: float) -> web.StreamResponse:
        await self._make_result_files(batch, now)
        return web.json_response(batch.to_json(now))

    @staticmethod
    def _validate_batch_request(body: Mapping[str, Any]) -> None:
        """Reject a ``POST /v1/batches`` body the way OpenAI does (400s)."""
        for name in ("input_file_id", "endpoint", "completion_window"):
            if name not in body:
                raise _Reject(
                    400,
                    f"Missing required parameter: '{name}'.",
                    param=name,
                    code="missing_required_parameter",
                )
        endpoint = body["endpoint"]
        if endpoint not in _OPENAI_ENDPOINTS:
            raise _Reject(
                400,
                f"Invalid value: {endpoint!r}. Supported values are: "
                + ", ".join(repr(e) for e in _OPENAI_ENDPOINTS)
                + ".",
                param="endpoint",
                code="invalid_value",
            )
        if endpoint not in _SIMULATED_ENDPOINTS:
            raise _Reject(
                400,
                f"The llmbatch simulator does not simulate batches for {endpoint!r}; "
                f"it supports {', '.join(_SIMULATED_ENDPOINTS)}.",
                param="endpoint",
                code="invalid_value",
            )
        if body["completion_window"] != "24h":
            raise _Reject(
                400,
                f"Invalid value: {body['completion_window']!r}. Supported values are: '24h'.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise _Reject(
                    400,
                    "Invalid type for 'metadata': expected an object.",
                    param="metadata",
                    code="invalid_type",
                )
            if len(metadata) > 16:
                raise _Reject(
                    400,
                    "Invalid 'metadata': too many properties. Expected an object with at most "
                    f"16 properties, but got an object with {len(metadata)} properties instead.",
                    param="metadata",
                    code="object_above_max_properties",
                )
            for key, value in metadata.items():
                if len(key) > 64:
                    raise _Reject(
                        400,
                        f"Invalid 'metadata': key {key[:16]!r}... is longer than 64 characters.",
                        param="metadata",
                        code="string_above_max_length",
                    )
                if not isinstance(value, str) or len(value) > 512:
                    raise _Reject(
                        400,
                        f"Invalid 'metadata.{key}': expected a string of at most 512 characters.",
                        param=f"metadata.{key}",
                        code="string_above_max_length",
                    )
        expires_after = body.get("output_expires_after")
        if expires_after is not None:
            seconds = expires_after.get("seconds") if isinstance(expires_after, dict) else None
            if (
                not isinstance(expires_after, dict)
                or expires_after.get("anchor") != "created_at"
                or not isinstance(seconds, int)
                or not 3600 <= seconds <= 2_592_000
            ):
                raise _Reject(
                    400,
                    "Invalid 'output_expires_after': expected "
                    "{'anchor': 'created_at', 'seconds': 3600..2592000}.",
                    param="output_expires_after",
                    code="invalid_value",
                )

    def _enqueued_tokens(self, model: str, now: float) -> int:
        return sum(
            b.input_tokens
            for b in self._openai.values()
            if b.model == model and b.holds_enqueued_tokens(now)
        )

    async def _create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        named = body.get("endpoint")
        if _is_azure(request) and isinstance(named, str) and named in _AZURE_ENDPOINTS:
            body = {**body, "endpoint": "/v1" + named}
        self._validate_batch_request(body)
        input_file_id = body["input_file_id"]
        source = self._files.get(input_file_id) if isinstance(input_file_id, str) else None
        if source is None:
            raise _Reject(
                400,
                f"Invalid 'input_file_id': no such file {input_file_id!r}.",
                param="input_file_id",
            )
        if source.purpose != "batch":
            raise _Reject(
                400,
                f"The input file must be uploaded with purpose 'batch', not {source.purpose!r}.",
                param="input_file_id",
                code="invalid_value",
            )
        now = self._clock()
        config = self._config
        endpoint: str = body["endpoint"]
        batch_id = self._new_id("batch_", 32)
        azure = _is_azure(request)

        start_at = now + config.validating_seconds

        def validate() -> tuple[_ParsedInput, list[_Item]]:
            parsed = _parse_openai_input(source.content, endpoint, config, azure=azure)
            items = _openai_items(parsed.requests, endpoint, config, batch_id)
            if self._prompt_cache and endpoint == "/v1/chat/completions":
                items = _with_prompt_cache(
                    items, "openai", start_at=start_at, per_request=config.seconds_per_request
                )
            return parsed, items

        parsed, items = await _offload(validate, heavy=len(source.content) >= _OFFLOAD_BYTES)
        errors = parsed.errors[:_MAX_REPORTED_ERRORS]
        if not errors and parsed.model is not None:
            queued = self._enqueued_tokens(parsed.model, now)
            if queued + sum(item.input_tokens for item in items) > config.enqueued_token_limit:
                self._counters["batches_token_limited"] += 1
                errors = [
                    _line_error(
                        "token_limit_exceeded",
                        f"Enqueued token limit reached for {parsed.model} in organization "
                        f"{ORGANIZATION}. "
                        f"Limit: {config.enqueued_token_limit:,} enqueued tokens. "
                        "Please try again once some in_progress batches have been completed.",
                        None,
                    )
                ]
        metadata = body.get("metadata")
        batch = _OpenAIBatch(
            batch_id=batch_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=body["completion_window"],
            metadata=dict(metadata) if metadata else None,
            model=parsed.model,
            items=items,
            errors=errors,
            schedule=self._schedule(now, start_at=start_at, size=len(items)),
            output_file_id=self._new_id("file-", 22),
            error_file_id=self._new_id("file-", 22),
        )
        self._openai[batch.id] = batch
        self._counters["openai_batches_created"] += 1
        return await self._render_batch(batch, now)

    async def _retrieve_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._render_batch(
            self._openai_batch(request.match_info["batch_id"]), self._clock()
        )

    async def _cancel_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self._openai_batch(request.match_info["batch_id"])
        now = self._clock()
        status = batch.status(now)
        if status in {"validating", "in_progress"}:
            batch.schedule.cancel_at = now
            self._counters["batches_cancel_requested"] += 1
        elif status != "cancelling":
            raise _Reject(409, f"Cannot cancel a batch with status '{status}'.")
        return await self._render_batch(batch, now)

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        now = self._clock()
        ids = list(reversed(self._openai))
        after = request.query.get("after")
        if after is not None and after not in self._openai:
            raise _Reject(400, f"Invalid 'after': no batch {after!r}.", param="after")
        limit = _limit(request.query.get("limit"), default=20, maximum=100)
        page, has_more = _page(ids, after=after, before=None, limit=limit)
        data = []
        for batch_id in page:
            batch = self._openai[batch_id]
            await self._make_result_files(batch, now)
            data.append(batch.to_json(now))
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": has_more,
            }
        )

    # ----------------------------------------------------------------------------------
    # Anthropic message batches

    def _message_batch(self, batch_id: str) -> _AnthropicBatch:
        batch = self._anthropic.get(batch_id)
        if batch is None:
            raise _Reject(
                404, f"No message batch found with id '{batch_id}'.", kind="not_found_error"
            )
        return batch

    @staticmethod
    def _origin(request: web.Request) -> str:
        return str(request.url.origin())

    async def _create_message_batch(self, request: web.Request) -> web.StreamResponse:
        config = self._config
        body = await self._json_body(request, config.anthropic_max_bytes)
        requests = body.get("requests")
        if requests is None:
            raise _Reject(400, "requests: Field required")
        if not isinstance(requests, list) or not requests:
            raise _Reject(400, "requests: List should have at least 1 item")
        if len(requests) > config.anthropic_max_requests:
            raise _Reject(
                400,
                "requests: a message batch can contain at most "
                f"{config.anthropic_max_requests:,} requests, got {len(requests):,}",
            )
        seen: set[str] = set()
        for i, entry in enumerate(requests):
            if not isinstance(entry, dict):
                raise _Reject(400, f"requests.{i}: Input should be an object")
            custom_id = entry.get("custom_id")
            if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
                raise _Reject(
                    400,
                    f"requests.{i}.custom_id: String should match pattern "
                    "'^[a-zA-Z0-9_-]{1,64}$'",
                )
            if custom_id in seen:
                raise _Reject(
                    400,
                    f"requests.{i}.custom_id: Duplicate custom_id {custom_id!r}; "
                    "custom_id must be unique",
                )
            seen.add(custom_id)
            if not isinstance(entry.get("params"), dict):
                raise _Reject(400, f"requests.{i}.params: Field required")
        now = self._clock()
        batch_id = self._new_id("msgbatch_", 24)

        def build() -> list[_Item]:
            items = _anthropic_items(requests, config, batch_id)
            if self._prompt_cache:
                items = _with_prompt_cache(
                    items, "anthropic", start_at=now, per_request=config.seconds_per_request
                )
            return items

        items = await _offload(build, heavy=len(requests) >= _OFFLOAD_ITEMS)
        batch = _AnthropicBatch(
            batch_id=batch_id,
            items=items,
            schedule=self._schedule(now, start_at=now, size=len(items)),
        )
        self._anthropic[batch.id] = batch
        self._counters["anthropic_batches_created"] += 1
        return web.json_response(batch.to_json(now, self._origin(request)))

    async def _retrieve_message_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self._message_batch(request.match_info["batch_id"])
        return web.json_response(batch.to_json(self._clock(), self._origin(request)))

    async def _list_message_batches(self, request: web.Request) -> web.StreamResponse:
        now = self._clock()
        ids = list(reversed(self._anthropic))
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if after is not None and before is not None:
            raise _Reject(400, "before_id and after_id cannot both be set")
        for cursor in (after, before):
            if cursor is not None and cursor not in self._anthropic:
                raise _Reject(400, f"No message batch found with id '{cursor}' to page from.")
        limit = _limit(request.query.get("limit"), default=20, maximum=1000)
        page, has_more = _page(ids, after=after, before=before, limit=limit)
        origin = self._origin(request)
        return web.json_response(
            {
                "data": [self._anthropic[i].to_json(now, origin) for i in page],
                "has_more": has_more,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    async def _cancel_message_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self._message_batch(request.match_info["batch_id"])
        now = self._clock()
        status = batch.status(now)
        if status == "ended":
            raise _Reject(
                400, f"Message batch {batch.id} has already ended and cannot be canceled."
            )
        if status == "in_progress":
            batch.schedule.cancel_at = now
            self._counters["batches_cancel_requested"] += 1
        return web.json_response(batch.to_json(now, self._origin(request)))

    async def _delete_message_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self._message_batch(request.match_info["batch_id"])
        status = batch.status(self._clock())
        if status != "ended":
            raise _Reject(
                400,
                f"Message batch {batch.id} is {status}: only batches that have ended can be "
                "deleted; cancel it first.",
            )
        del self._anthropic[batch.id]
        return web.json_response({"id": batch.id, "type": "message_batch_deleted"})

    async def _message_batch_results(self, request: web.Request) -> web.StreamResponse:
        batch = self._message_batch(request.match_info["batch_id"])
        status = batch.status(self._clock())
        if status != "ended":
            raise _Reject(
                400,
                f"Message batch {batch.id} is {status}: results are available once it has ended.",
            )
        if batch.results_file is None:
            rendered = await _offload(
                lambda: batch.render_results(self._config),
                heavy=len(batch.items) >= _OFFLOAD_ITEMS,
            )
            batch.results_file = batch.results_file or rendered
        return web.Response(body=batch.results_file, content_type="application/x-jsonl")
