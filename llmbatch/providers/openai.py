"""OpenAI (and any OpenAI-compatible server): error translation at the adapter boundary.

:func:`classify_openai_error` maps everything the ``openai`` SDK (built on httpx2) can
raise into :mod:`llmbatch.errors`, in one place, following the providers' documented
rules (PROTOCOLS.md):

=================================================  ====================================
status / body                                      llmbatch error
=================================================  ====================================
429, ``type`` or ``code`` ``insufficient_quota``   :class:`QuotaExhausted` (never retried)
429, billing codes under ``insufficient_quota``    :class:`QuotaExhausted`
429, ``x-should-retry: false`` (request too big)   :class:`BadRequest`
429 otherwise (incl. Azure ``code: "429"``)        :class:`RateLimited` (``kind`` = type)
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
from collections.abc import Mapping
from typing import Any

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
)
from llmbatch.retry import parse_retry_after

__all__ = ["classify_openai_error", "classify_openai_status"]

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
    context: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "status_code": status,
        "request_id": lower.get("x-request-id"),
        "retry_after": parse_retry_after(lower),
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
