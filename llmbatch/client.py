"""``LLMClient``: the call path of one item, and the batch entry points.

One call goes through a stack of small steps, outermost first::

    LLMClient.complete(request)
      _call_with_retry     the RetryPolicy (tenacity); every attempt goes back through
                           the limiter, so retries pay RPM/TPM like first attempts
      _call_with_limits    admission cost → limiter.acquire → provider.complete
                           → limiter.observe(headers) → permit.settle(usage);
                           a 429 puts the whole quota in cooldown (not a private sleep)
      provider.complete    the adapter: SDK call with max_retries=0, errors classified

:meth:`LLMClient.map` runs many requests through :func:`llmbatch.runner.run_batch`
(bounded, ordered, with the failure policy), and :func:`llmbatch.map` does it in one call
from a prompt template and items.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

import structlog

from llmbatch.errors import LLMBatchError, RateLimited
from llmbatch.failure import BatchResult, FailureStrategy, OnError
from llmbatch.limits import Limits, get_limiter
from llmbatch.models import Request, Response
from llmbatch.providers.base import Provider
from llmbatch.retry import RetryLog, RetryPolicy, wait_retry_after
from llmbatch.runner import DEFAULT_MAX_CONCURRENCY, current_item, run_batch

__all__ = ["LLMClient", "build_request", "map"]

logger = structlog.get_logger("llmbatch.client")


def build_request(
    template: str | Callable[[Any], Request | str],
    item: Any,
    *,
    system: str | None = None,
    **options: Any,
) -> Request:
    """The :class:`Request` for *item*: a ``str.format`` template over a dict item (or
    ``{item}`` for any other item), or a callable returning a Request or a prompt.

    Raises:
        ValueError: the prompt, or a field the template uses, is empty.
        KeyError: the template names a field the item does not have.
    """
    if callable(template):
        built = template(item)
        if isinstance(built, Request):
            return built
        return Request.from_prompt(built, system=system, **options)
    values = dict(item) if isinstance(item, Mapping) else {"item": item}
    for _, name, _, _ in string.Formatter().parse(template):
        field = (name or "").split(".")[0].split("[")[0]
        value = values.get(field) if field else None
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"the item's {field!r} is empty: nothing to send")
    prompt = template.format(**values)
    return Request.from_prompt(prompt, system=system, **options)


class LLMClient:
    """Calls a provider within its limits, with retries and a failure policy.

    Args:
        provider: the :class:`~llmbatch.providers.base.Provider` to call.
        model: the default model for requests that name none.
        max_tokens: the default output cap for requests that set none.
        limits: the quota's :class:`~llmbatch.limits.Limits`; the limiter is shared by
            every client of the same provider, key and model in the event loop.
        limiter: a limiter to use instead (e.g. a ``RedisRateLimiter``).
        retry: the :class:`~llmbatch.retry.RetryPolicy` (default: 6 attempts).
        on_error: the failure strategy of :meth:`map`.
        max_concurrency: requests in flight at most in :meth:`map`.
        sleep: how retries wait (injectable for tests).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        limits: Limits | None = None,
        limiter: Any = None,
        retry: RetryPolicy | None = None,
        on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.provider = provider
        self.model = model
        self.max_tokens = max_tokens
        self.limits = limits
        self._limiter = limiter
        policy = retry or RetryPolicy()
        if isinstance(policy.wait, wait_retry_after):
            # A 429 is waited out by the shared limiter's cooldown, not per item.
            wait = policy.wait
            policy = policy.copy(
                wait=wait_retry_after(
                    wait.fallback, max_wait=wait.max_wait, ignore_rate_limits=True
                )
            )
        self.retry = policy
        self.on_error = on_error
        self.max_concurrency = max_concurrency
        self._sleep = sleep
        self.retry_log = RetryLog()

    def __repr__(self) -> str:
        return f"<LLMClient {self.provider!r} model={self.model!r}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.provider.aclose()

    def limiter_for(self, model: str) -> Any:
        """The limiter this client uses for *model*."""
        if self._limiter is not None:
            return self._limiter
        return get_limiter(
            self.provider.name,
            model,
            api_key=self.provider.quota_key,
            limits=self.limits,
        )

    async def complete(self, request: Request | str) -> Response:
        """Answer one request (a :class:`Request` or a prompt) with limits and retries.

        Raises:
            LLMBatchError: the last error once the retry policy gives up, or at once for
                permanent and fatal errors.
        """
        if isinstance(request, str):
            request = Request.from_prompt(request)
        request = self._with_defaults(request)
        return await self._call_with_retry(request)

    def _with_defaults(self, request: Request) -> Request:
        changes: dict[str, Any] = {}
        if request.model is None:
            if self.model is None:
                raise ValueError("no model: pass model= to the client or the request")
            changes["model"] = self.model
        if request.max_tokens is None and self.max_tokens is not None:
            changes["max_tokens"] = self.max_tokens
        if request.key is None:
            item = current_item()
            if item is not None and item.key is not None:
                changes["key"] = item.key
        return replace(request, **changes) if changes else request

    async def _call_with_retry(self, request: Request) -> Response:
        attempts = 0

        def on_attempt(number: int) -> None:
            nonlocal attempts
            attempts = number
            item = current_item()
            if item is not None:
                item.attempts = number

        try:
            response = await self.retry.call(
                lambda: self._call_with_limits(request),
                sleep=self._sleep,
                log=self.retry_log,
                on_attempt=on_attempt,
            )
        except LLMBatchError as exc:
            exc.item_key = exc.item_key or request.key
            exc.attempt = attempts
            raise
        return replace(response, attempts=attempts)

    async def _call_with_limits(self, request: Request) -> Response:
        model = request.model or ""
        limiter = self.limiter_for(model)
        cost = self.provider.admission(request, model)
        permit = await limiter.acquire(**cost)
        try:
            response = await self.provider.complete(request)
        except RateLimited as exc:
            dimension = {"requests": "rpm", "tokens": "tpm"}.get(exc.kind or "")
            cooled = limiter.on_rate_limited(exc.retry_after, dimension=dimension)
            if asyncio.iscoroutine(cooled):
                await cooled
            raise
        finally:
            permit.release()
        if response.headers:
            observed = limiter.observe(response.headers, permit)
            if asyncio.iscoroutine(observed):
                await observed
        usage = response.usage
        permit.settle(
            tokens=usage.input_tokens + (request.max_tokens or 0) * request.n
            if request.max_tokens
            else None,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        return response

    async def map(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        *,
        on_error: OnError | str | FailureStrategy | None = None,
        max_concurrency: int | None = None,
    ) -> BatchResult[Response]:
        """Answer many requests, in input order, under the failure policy."""
        return await run_batch(
            self.complete,
            requests,
            max_concurrency=max_concurrency or self.max_concurrency,
            on_error=on_error or self.on_error,
            key=_request_key,
        )


def _request_key(request: Request) -> str | None:
    return request.key


async def map(  # shadows builtins.map inside this module only: llmbatch.map is the API
    template: str | Callable[[Any], Request | str],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    model: str,
    provider: Provider | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    on_error: OnError | str | FailureStrategy = OnError.COLLECT,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    key: Callable[[Any], str | None] | None = None,
) -> BatchResult[Response]:
    """Answer one prompt per item, in one call.

    Args:
        template: a ``str.format`` template over dict items (``"Summarize: {text}"``;
            other items are ``{item}``), or a callable building a Request or a prompt.
        items: the items (any iterable or async iterable; consumed lazily).
        model: the model.
        provider: the provider (default: OpenAI with ``OPENAI_API_KEY``); closed at the end
            only if this call created it.
        system: a system prompt for every request.
        max_tokens: the output cap of every request.
        limits: the quota's limits.
        retry: the retry policy.
        on_error: the failure strategy (default ``"collect"``: every item ends as a
            result or an ItemError, in input order).
        max_concurrency: requests in flight at most.
        key: a function naming each item (recorded on its errors).

    Returns:
        A :class:`~llmbatch.failure.BatchResult` of :class:`Response`, in input order.
        A prompt that cannot be built (empty document, missing field) is that item's
        error, not the batch's.
    """
    owned = provider is None
    if provider is None:
        from llmbatch.providers.openai import OpenAIProvider

        provider = OpenAIProvider()
    client = LLMClient(provider, model=model, max_tokens=max_tokens, limits=limits, retry=retry)

    async def one(item: Any) -> Response:
        request = build_request(template, item, system=system)
        item_key = key(item) if key is not None else None
        if item_key is not None and request.key is None:
            request = replace(request, key=item_key)
        return await client.complete(request)

    try:
        return await run_batch(
            one, items, max_concurrency=max_concurrency, on_error=on_error, key=key
        )
    finally:
        if owned:
            await provider.aclose()
