"""Anthropic's wire conventions: ``POST /v1/messages``.

Error bodies are ``{"type": "error", "error": {"type", "message"}, "request_id"}``.
Each (key, model) pair has up to three per-minute buckets: requests (``rpm``), input
tokens (``itpm``) and output tokens (``otpm``). Output tokens follow
``otpm_reservation``:

* ``"max_tokens"`` (Anthropic's early-2025 rule): reserve ``max_tokens`` at admission,
  refund the unused part once the answer is known;
* ``"actual"`` (the current documents: ``max_tokens`` does not count): admit while the
  bucket is not in debt, and charge the output actually produced afterwards.

Input tokens read from the prompt cache do not count toward ITPM ("for most models only
uncached input tokens count"); tokens written to it do. See :mod:`llmbatch.testing._cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from llmbatch.testing._buckets import MINUTE, rfc3339_after
from llmbatch.testing._cache import NO_CACHE, CacheUse, cache_control_problem
from llmbatch.testing._content import anthropic_message, estimate_tokens
from llmbatch.testing._endpoint import Answer, ApiError, Endpoint, dumps, retry_headers
from llmbatch.testing._faults import Fault
from llmbatch.testing._quota import Quota, Rejection
from llmbatch.testing._structured import (
    FormatError,
    Spoil,
    anthropic_request_spec,
    anthropic_spec,
    plan_output,
)

if TYPE_CHECKING:
    from aiohttp import web

    from llmbatch.testing._config import SimulatorConfig

__all__ = ["Messages"]

#: the ``created_at`` of every listed model
_CREATED = "2024-01-01T00:00:00Z"
_UNITS = {"requests": "requests", "input_tokens": "input tokens", "output_tokens": "output tokens"}
_SERVER_ERRORS = {
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class Messages(Endpoint):
    """``POST /v1/messages``, streaming included."""

    provider = "anthropic"
    path = "/v1/messages"
    request_id_header = "request-id"

    @staticmethod
    def bucket_specs(config: SimulatorConfig) -> list[tuple[str, float, int]]:
        specs = [
            ("requests", config.rpm),
            ("input_tokens", config.itpm),
            ("output_tokens", config.otpm),
        ]
        return [(name, MINUTE, limit) for name, limit in specs if limit is not None]

    def error_body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": error.type, "message": error.message},
            "request_id": request_id,
        }

    def unauthorized(self, *, missing: bool) -> ApiError:
        message = "x-api-key header is required" if missing else "invalid x-api-key"
        return ApiError(401, message, type="authentication_error")

    def check_headers(self, request: web.Request) -> None:
        if "anthropic-version" not in request.headers:
            raise ApiError(400, "anthropic-version: header is required")

    def out_of_quota(self) -> ApiError:
        return ApiError(
            400,
            "Your credit balance is too low to access the Anthropic API. "
            "Please go to Plans & Billing to upgrade or purchase credits.",
            headers={"x-should-retry": "false"},
        )

    def costs(self, prompt_tokens: int, reserved: int, cached: int = 0) -> dict[str, int]:
        reserve = reserved if self.config.otpm_reservation == "max_tokens" else 0
        uncached = prompt_tokens - cached
        return {"requests": 1, "input_tokens": uncached, "output_tokens": reserve}

    def rate_limited(self, rejection: Rejection, model: str) -> ApiError:
        unit = _UNITS[rejection.name]
        if rejection.too_large:
            return ApiError(
                429,
                f"This request would exceed your organization's rate limit of "
                f"{rejection.limit:,} {unit} per minute ({rejection.requested:,} requested) "
                "and can never succeed. Please reduce the prompt length or the maximum "
                "tokens requested.",
                type="rate_limit_error",
                headers={"x-should-retry": "false"},
                label="anthropic",
            )
        return ApiError(
            429,
            f"This request would exceed your organization's rate limit of {rejection.limit:,} "
            f"{unit} per minute. For details, refer to: "
            "https://docs.anthropic.com/en/api/rate-limits. You can see the response headers "
            "for current usage. Please reduce the prompt length or the maximum tokens "
            "requested, or try again later.",
            type="rate_limit_error",
            headers=retry_headers(rejection.retry_after, milliseconds=False),
            label="anthropic",
        )

    def ratelimit_headers(self, quota: Quota, headers: dict[str, str]) -> None:
        now = datetime.now(UTC)
        tightest = None
        for name in ("requests", "input_tokens", "output_tokens"):
            bucket = quota.bucket(name)
            if bucket is None:
                continue
            prefix = "anthropic-ratelimit-" + name.replace("_", "-")
            headers[prefix + "-limit"] = str(bucket.limit)
            headers[prefix + "-remaining"] = str(bucket.remaining)
            headers[prefix + "-reset"] = rfc3339_after(bucket.until_full(), now=now)
            if name != "requests" and (tightest is None or bucket.remaining < tightest.remaining):
                tightest = bucket
        if tightest is not None:
            # "the most restrictive limit currently in effect"
            headers["anthropic-ratelimit-tokens-limit"] = str(tightest.limit)
            headers["anthropic-ratelimit-tokens-remaining"] = str(tightest.remaining)
            headers["anthropic-ratelimit-tokens-reset"] = rfc3339_after(
                tightest.until_full(), now=now
            )

    def settle(self, quota: Quota, reserved: int, produced: int) -> None:
        if self.config.otpm_reservation == "max_tokens":
            quota.settle("output_tokens", reserved - produced)
        else:
            quota.settle("output_tokens", -produced)

    def fault_error(self, fault: Fault, model: str) -> ApiError:
        if fault.status == 429:
            seconds = 1.0 if fault.retry_after is None else fault.retry_after
            return ApiError(
                429,
                "This request would exceed your organization's rate limit. Please try again later.",
                type=fault.error_type or "rate_limit_error",
                headers=retry_headers(seconds, milliseconds=False),
                label="anthropic",
            )
        kind, message = _SERVER_ERRORS.get(fault.status, ("api_error", f"Error {fault.status}"))
        headers = None
        if fault.retry_after is not None:
            headers = retry_headers(fault.retry_after, milliseconds=False)
        return ApiError(fault.status, message, type=fault.error_type or kind, headers=headers)

    def model_not_found(self, model: str) -> ApiError:
        return ApiError(404, f"model: {model}", type="not_found_error")

    def model_info(self, model: str) -> dict[str, Any]:
        return {"type": "model", "id": model, "display_name": model, "created_at": _CREATED}

    def model_page(self, models: Sequence[str]) -> dict[str, Any]:
        first, last = (models[0], models[-1]) if models else (None, None)
        data = [self.model_info(model) for model in models]
        return {"data": data, "has_more": False, "first_id": first, "last_id": last}

    def validate(self, body: dict[str, Any]) -> tuple[str, int, int]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model: Field required")
        if self.config.reject_unknown_models and model not in self.config.models:
            raise self.model_not_found(model)
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise ApiError(400, "max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "max_tokens: Input should be greater than or equal to 1")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ApiError(400, "messages: Field required")
        if not messages:
            raise ApiError(
                400, "messages: List should have at least 1 item after validation, not 0"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise ApiError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        try:
            anthropic_request_spec(body)
        except FormatError as error:
            raise ApiError(400, error.message) from None
        problem = cache_control_problem(body)
        if problem is not None:
            raise ApiError(400, problem)
        prompt_tokens = estimate_tokens(body)
        window = self.config.context_window
        if prompt_tokens + max_tokens > window:
            raise ApiError(
                400,
                f"input length and `max_tokens` exceed context limit: {prompt_tokens} + "
                f"{max_tokens} > {window}, decrease input length or `max_tokens` and try again",
            )
        return model, prompt_tokens, max_tokens

    def answer(
        self,
        body: dict[str, Any],
        prompt_tokens: int,
        token: str,
        spoil: Spoil | None = None,
        cache: CacheUse = NO_CACHE,
    ) -> Answer:
        output = plan_output(body, anthropic_spec(body), faults=self.structured, spoil=spoil)
        counted = output if output.outcome is not None else None
        message = anthropic_message(
            body, message_id=f"msg_{token}", input_tokens=prompt_tokens, output=output, cache=cache
        )
        produced = message["usage"]["output_tokens"]
        if not body.get("stream"):
            return Answer([dumps(message)], produced, streaming=False, output=counted)
        start = {**message, "content": [], "stop_reason": None}
        # message_start carries the input side of the usage (cache figures included)
        start["usage"] = {**message["usage"], "output_tokens": 1}
        block = message["content"][0]
        if block["type"] == "tool_use":
            # the input arrives as partial JSON, a few words at a time
            opening = {**block, "input": {}}
            pieces = dumps(block["input"]).decode().split(" ")
            delta_type, field = "input_json_delta", "partial_json"
        else:
            opening = {"type": "text", "text": ""}
            pieces = block["text"].split(" ")
            delta_type, field = "text_delta", "text"
        events = [
            _event("message_start", {"type": "message_start", "message": start}),
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": opening},
            ),
            _event("ping", {"type": "ping"}),
        ]
        events.extend(
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": delta_type, field: piece if i == 0 else " " + piece},
                },
            )
            for i, piece in enumerate(pieces)
        )
        events += [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": produced},
                },
            ),
            _event("message_stop", {"type": "message_stop"}),
        ]
        return Answer(events, produced, streaming=True, output=counted)
