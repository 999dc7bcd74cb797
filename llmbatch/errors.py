"""llmbatch's exceptions, in one tree.

::

    LLMBatchError                      root of everything llmbatch raises on purpose
    ├── TransientError                 retry it (through the limiter again)
    │   ├── RateLimited                429 rate_limit_exceeded / Anthropic rate_limit_error
    │   ├── ProviderUnavailable        5xx, 529 overloaded, 408/409
    │   ├── Timeout                    no answer within the per-attempt timeout
    │   ├── ConnectionFailed           refused, reset, malformed response (``connect``:
    │   │                              nothing reached the server)
    │   └── BatchExpired               a Batch API request expired or was cancelled unrun
    ├── PermanentError                 this item cannot succeed; the others can
    │   ├── BadRequest                 400/404/422: the request itself is wrong
    │   │   ├── ContextLengthExceeded  prompt + max_tokens beyond the model's window
    │   │   └── ContentFiltered        refused by the provider's content policy
    │   └── RequestTooLarge            more tokens than a rate-limit bucket can hold
    ├── FatalError                     no item can succeed: stop the job, keep what finished
    │   ├── AuthenticationFailed       401/403: missing, wrong or revoked key
    │   ├── NotFound                   404: no such model or endpoint
    │   ├── QuotaExhausted             insufficient_quota and other billing errors
    │   ├── BudgetExhausted            the job's own max_cost was reached
    │   ├── ProviderUnreachable        no connection (or only errors) from the provider
    │   └── LimiterUnavailable         the shared rate limiter (Redis) cannot be used
    ├── ConfigurationError             the job is set up wrong: fix the setup, then rerun
    │   ├── JobMismatch                the store holds another job's results
    │   └── TokenizerUnavailable       an encoding cannot be built offline
    └── BatchFailed                    a batch was aborted (see llmbatch.failure)

Every error carries what is known of its context: ``provider``, ``model``,
``status_code``, ``request_id``, ``retry_after`` (seconds), ``item_key``, ``attempt``
and ``key_hint`` (the key's last four characters, :func:`key_hint`). None of them ever
holds an API key: messages that came from a provider are scrubbed of anything that looks
like one (:func:`redact`).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BadRequest",
    "BatchExpired",
    "BudgetExhausted",
    "ConfigurationError",
    "ConnectionFailed",
    "ContentFiltered",
    "ContextLengthExceeded",
    "FatalError",
    "JobMismatch",
    "LLMBatchError",
    "LimiterUnavailable",
    "NotFound",
    "PermanentError",
    "ProviderUnavailable",
    "ProviderUnreachable",
    "QuotaExhausted",
    "RateLimited",
    "RequestTooLarge",
    "Timeout",
    "TokenizerUnavailable",
    "TransientError",
    "key_hint",
    "redact",
]

# sk-..., sk-proj-..., sk-ant-..., and bearer tokens: keep a 4-character hint only
_SECRET = re.compile(r"\b(sk-(?:ant-|proj-)?|Bearer\s+)[A-Za-z0-9_\-]{8,}([A-Za-z0-9]{4})\b")


# a password in a URL: redis://:secret@host, rediss://user:secret@host (up to the last
# "@" before the path, so an unencoded "@" in the password hides all of it), and
# ?password=secret in the query (as redis-py accepts for unix:// and redis:// URLs)
_URL_PASSWORD = re.compile(r"\b([a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^\s/?#]+@", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pass|pwd)=)[^&#\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """*text* with anything shaped like an API key reduced to ``sk-…abcd``, and any
    password in a URL replaced by ``***``."""
    text = _SECRET.sub(lambda m: f"{m.group(1)}…{m.group(2)}", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m.group(1)}***", text)


def key_hint(api_key: str | None) -> str:
    """The only part of a key ever shown: ``…`` and its last four characters."""
    key = api_key or ""
    return f"…{key[-4:]}" if len(key) >= 8 else "…"


class LLMBatchError(Exception):
    """The root of every exception llmbatch raises on purpose.

    Args:
        message: what happened (scrubbed of API keys).
        provider: ``"openai"``, ``"anthropic"``, ``"local"``...
        model: the model asked for.
        status_code: the HTTP status, when there was one.
        request_id: the provider's request id, for support tickets.
        retry_after: seconds the provider asked us to wait.
        item_key: the key of the item being processed.
        attempt: the attempt number (from 1) that failed.
        key_hint: which API key, as :func:`key_hint` shows it.
    """

    def __init__(
        self,
        message: str = "",
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        item_key: str | None = None,
        attempt: int | None = None,
        key_hint: str | None = None,
    ) -> None:
        self.message = redact(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.request_id = request_id
        self.retry_after = retry_after
        self.item_key = item_key
        self.attempt = attempt
        self.key_hint = key_hint
        super().__init__(self.message)

    def context(self) -> dict[str, Any]:
        """The known context as a dict (for logs and error records)."""
        fields = (
            "provider",
            "model",
            "status_code",
            "request_id",
            "retry_after",
            "item_key",
            "attempt",
            "key_hint",
        )
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}

    def __str__(self) -> str:
        where = "/".join(p for p in (self.provider, self.model) if p)
        status = f" (HTTP {self.status_code})" if self.status_code is not None else ""
        prefix = f"{where}{status}: " if where or status else ""
        key = f" [key {self.key_hint}]" if self.key_hint else ""
        return f"{prefix}{self.message}{key}"


class TransientError(LLMBatchError):
    """A failure that may pass: retry it."""


class RateLimited(TransientError):
    """The provider refused the request for a rate limit (not a quota).

    Attributes:
        kind: which limit, when the provider says (``"requests"``, ``"tokens"``).
        limit: the limit itself (per minute), when the 429 names it (Gemini's
            ``QuotaFailure`` does): the limiter adopts it as a header would.
    """

    def __init__(
        self,
        message: str = "",
        *,
        kind: str | None = None,
        limit: float | None = None,
        **context: Any,
    ) -> None:
        self.kind = kind
        self.limit = limit
        super().__init__(message, **context)


class ProviderUnavailable(TransientError):
    """The provider failed or is overloaded (5xx, 529, 408, 409)."""


class Timeout(TransientError):
    """No answer within the per-attempt timeout."""


class ConnectionFailed(TransientError):
    """The connection failed: refused, reset, or a response that could not be read.

    Attributes:
        connect: the connection could not even be established (refused, DNS, TLS,
            connect timeout): the request never reached the server, so it cost nothing.
            Many of these in a row, across items, mean the provider is unreachable
            (:class:`ProviderUnreachable`).
    """

    def __init__(self, message: str = "", *, connect: bool = False, **context: Any) -> None:
        self.connect = connect
        super().__init__(message, **context)


class BatchExpired(TransientError):
    """A Batch API request did not run: its batch expired (24 h window) or was cancelled.
    Nothing was charged for it; it can be submitted again, or sent online."""


class PermanentError(LLMBatchError):
    """This item cannot succeed as it is; other items are not affected."""


class BadRequest(PermanentError):
    """The provider rejected the request itself (400, 404, 422)."""


class ContextLengthExceeded(BadRequest):
    """The prompt plus ``max_tokens`` exceed the model's context window."""


class ContentFiltered(BadRequest):
    """The provider's content policy refused the request."""


class RequestTooLarge(PermanentError):
    """A request needs more of a resource than its rate-limit bucket can ever hold:
    found by the limiter before sending, or said by the provider (OpenAI's 429
    "Request too large ... on tokens per min"). Never retried: it can never fit.

    Attributes:
        dimension: the bucket (``"tpm"``, ``"input_tpm"``...), if known.
        requested: what the request needs, if known.
        capacity: the most the bucket can hold, if known.
    """

    def __init__(
        self,
        dimension: str | None = None,
        requested: float | None = None,
        capacity: float | None = None,
        *,
        message: str | None = None,
        **context: Any,
    ) -> None:
        self.dimension = dimension
        self.requested = requested
        self.capacity = capacity
        if message is None:
            message = (
                f"request needs {requested or 0:,.0f} {dimension} but the limit is "
                f"{capacity or 0:,.0f}: it can never be admitted "
                "(shorten the prompt or lower max_tokens)"
            )
        super().__init__(message, **context)


class FatalError(LLMBatchError):
    """An error after which no further item can succeed (bad credentials, no quota left).

    The runner aborts the batch on a fatal error under every failure policy, keeping
    what already finished.
    """


class AuthenticationFailed(FatalError):
    """The API key is missing, wrong, revoked or lacks permission (401/403)."""


class NotFound(FatalError):
    """The model or endpoint does not exist for this key (404): no item can succeed."""


class QuotaExhausted(FatalError):
    """The account has no quota or credit left (``insufficient_quota`` and billing errors)."""


class BudgetExhausted(FatalError):
    """The job's ``max_cost`` is spent: no new item starts (those in flight finish)."""


class ProviderUnreachable(FatalError):
    """The provider could not be reached (connection refused, DNS, TLS) on several
    attempts in a row, across items, with no answer in between; or it answered nothing
    but errors (timeouts, 5xx) to every attempt of an item while not one request was
    answered. The job stops instead of failing every item slowly. Items not answered
    stay pending, so a rerun once the server works again sends them."""


class LimiterUnavailable(FatalError):
    """The shared rate limiter cannot be used (its Redis server is unreachable, refuses
    the password, or fails): no request may be sent without its permit."""


class ConfigurationError(LLMBatchError):
    """The job is set up in a way that cannot work (a store of another job, a tokenizer
    that cannot be built): no retry helps, fix the setup and run again."""


class JobMismatch(ConfigurationError):
    """The store holds the results of a different job (another prompt, model or
    parameters): mixing them would silently corrupt the output.

    Also importable from :mod:`llmbatch.store`, where it is raised.
    """


class TokenizerUnavailable(ConfigurationError):
    """An encoding cannot be built offline (unknown name, or its data file is missing/corrupt).

    Also importable from :mod:`llmbatch.tokens`, where it is raised.
    """
