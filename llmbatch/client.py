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
import concurrent.futures
import string
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from llmbatch.config import ModelProfile, load_profiles, profile_for
from llmbatch.errors import BudgetExhausted, LLMBatchError, RateLimited
from llmbatch.failure import BatchResult, FailureStrategy, ItemError, OnError
from llmbatch.limits import Limits, get_limiter
from llmbatch.models import Request, Response, Usage
from llmbatch.providers.base import AsyncClosing, Provider
from llmbatch.retry import RetryLog, RetryPolicy, wait_retry_after
from llmbatch.runner import (
    DEFAULT_MAX_CONCURRENCY,
    BatchStream,
    current_item,
    run_batch,
    stream_batch,
)

__all__ = ["ClientStatistics", "LLMClient", "build_request", "imap", "map", "map_sync"]


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """What a client has done so far."""

    succeeded: int
    failed: int
    attempts: int
    usage: Usage
    cost: float | None


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


class LLMClient(AsyncClosing):
    """Calls a provider within its limits, with retries and a failure policy.

    Args:
        provider: the :class:`~llmbatch.providers.base.Provider` to call.
        model: the default model for requests that name none.
        max_tokens: the default output cap for requests that set none.
        limits: the quota's :class:`~llmbatch.limits.Limits` (default: the model's
            profile, see :mod:`llmbatch.config`); the limiter is shared by every client of
            the same provider, key and model in the event loop.
        limiter: a limiter to use instead (e.g. a ``RedisRateLimiter``).
        retry: the :class:`~llmbatch.retry.RetryPolicy` (default: 6 attempts).
        on_error: the failure strategy of :meth:`map`.
        max_concurrency: requests in flight at most in :meth:`map`.
        sleep: how retries wait (injectable for tests).
        profiles: model profiles (default: built-ins overridden by ``llmbatch.toml``).
        max_cost: a budget in USD; once spent, new calls raise
            :class:`~llmbatch.errors.BudgetExhausted` (fatal: the batch stops, keeping
            what finished). Calls in flight when it is reached still complete.
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
        profiles: Mapping[str, ModelProfile] | None = None,
        max_cost: float | None = None,
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
        self._profiles = dict(profiles) if profiles is not None else load_profiles()
        self._limiters: dict[str, tuple[asyncio.AbstractEventLoop, Any]] = {}
        self.max_cost = max_cost
        self._succeeded = 0
        self._failed = 0
        self._usage = Usage()
        self._cost: float | None = None

    def __repr__(self) -> str:
        return f"<LLMClient {self.provider!r} model={self.model!r}>"

    async def aclose(self) -> None:
        """Close the provider."""
        await self.provider.aclose()

    def profile(self, model: str) -> ModelProfile:
        """The profile (limits, prices) of *model* on this client's provider."""
        return profile_for(self.provider.name, model, profiles=self._profiles)

    def limiter_for(self, model: str) -> Any:
        """The limiter this client uses for *model*."""
        if self._limiter is not None:
            return self._limiter
        # Looked up once per model and event loop, not on every attempt.
        loop = asyncio.get_running_loop()
        found = self._limiters.get(model)
        if found is None or found[0] is not loop:
            limiter = get_limiter(
                self.provider.name,
                model,
                api_key=self.provider.quota_key,
                limits=self.limits,
                default_limits=self.profile(model).limits,
            )
            found = self._limiters[model] = (loop, limiter)
        return found[1]

    def statistics(self) -> ClientStatistics:
        """Calls, attempts, tokens and money so far (cost ``None`` if prices are unknown)."""
        return ClientStatistics(
            succeeded=self._succeeded,
            failed=self._failed,
            attempts=self.retry_log.attempts,
            usage=self._usage,
            cost=self._cost,
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
        if self.max_cost is not None and (self._cost or 0.0) >= self.max_cost:
            raise BudgetExhausted(
                f"the budget of ${self.max_cost:.4f} is spent (${self._cost or 0.0:.4f}): "
                "raise max_cost to continue",
                provider=self.provider.name,
                model=request.model,
                item_key=request.key,
            )
        try:
            response = await self._call_with_retry(request)
        except LLMBatchError:
            self._failed += 1
            raise
        cost = self.profile(request.model or "").cost(response.usage)
        self._succeeded += 1
        self._usage = self._usage + response.usage
        if cost is not None:
            self._cost = (self._cost or 0.0) + cost
        return replace(response, cost=cost)

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
        actual = self.provider.settlement(request, response)
        permit.settle(
            tokens=actual.get("tokens"),
            input_tokens=actual.get("input_tokens"),
            output_tokens=actual.get("output_tokens"),
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


def _item_answerer(
    template: str | Callable[[Any], Request | str],
    *,
    provider: Provider | None,
    model: str,
    system: str | None,
    max_tokens: int | None,
    limits: Limits | None,
    retry: RetryPolicy | None,
    max_cost: float | None,
    key: Callable[[Any], str | None] | None,
) -> tuple[Provider, bool, Callable[[Any], Awaitable[Response]]]:
    """What :func:`map` and :func:`imap` share: the provider (OpenAI from the environment
    when none is given; ``owned`` says the caller must close it) and the per-item call."""
    owned = provider is None
    if provider is None:
        from llmbatch.providers.openai import OpenAIProvider

        provider = OpenAIProvider()
    client = LLMClient(
        provider,
        model=model,
        max_tokens=max_tokens,
        limits=limits,
        retry=retry,
        max_cost=max_cost,
    )

    async def one(item: Any) -> Response:
        request = build_request(template, item, system=system)
        item_key = key(item) if key is not None else None
        if item_key is not None and request.key is None:
            request = replace(request, key=item_key)
        return await client.complete(request)

    return provider, owned, one


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
    max_cost: float | None = None,
    on_result: Callable[[int, Response | ItemError], None] | None = None,
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
        max_cost: a budget in USD: once spent, no new item starts and the batch ends
            with :class:`~llmbatch.failure.BatchFailed` (reason ``"fatal"``) carrying
            what finished.
        on_result: called with ``(index, Response or ItemError)`` as each item
            finishes; persist there to keep finished work across a Ctrl-C.

    Returns:
        A :class:`~llmbatch.failure.BatchResult` of :class:`Response`, in input order.
        A prompt that cannot be built (empty document, missing field) is that item's
        error, not the batch's.
    """
    provider, owned, one = _item_answerer(
        template,
        provider=provider,
        model=model,
        system=system,
        max_tokens=max_tokens,
        limits=limits,
        retry=retry,
        max_cost=max_cost,
        key=key,
    )
    try:
        return await run_batch(
            one,
            items,
            max_concurrency=max_concurrency,
            on_error=on_error,
            key=key,
            on_result=on_result,
        )
    finally:
        if owned:
            await provider.aclose()


def imap(
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
    max_cost: float | None = None,
) -> BatchStream[Response]:
    """Like :func:`map`, for inputs that do not fit in memory: outcomes as they finish.

    Use it as ``async with llmbatch.imap(...) as outcomes: async for o in outcomes`` —
    each :class:`~llmbatch.runner.Outcome` has the item's input ``index`` and its
    Response or ItemError; nothing is kept once handed out.
    """
    provider, owned, one = _item_answerer(
        template,
        provider=provider,
        model=model,
        system=system,
        max_tokens=max_tokens,
        limits=limits,
        retry=retry,
        max_cost=max_cost,
        key=key,
    )
    stream: BatchStream[Response] = stream_batch(
        one, items, max_concurrency=max_concurrency, on_error=on_error, key=key
    )
    if owned:
        stream.call_on_close(provider.aclose)
    return stream


def map_sync(
    template: str | Callable[[Any], Request | str],
    items: Iterable[Any],
    **options: Any,
) -> BatchResult[Response]:
    """:func:`map` for synchronous code, Jupyter included.

    Without a running event loop it uses ``asyncio.run``; inside one (a notebook cell) it
    runs the batch on a fresh loop in a worker thread and waits for it, so it never
    nests loops. Takes the same keyword arguments as :func:`map`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(map(template, items, **options))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, map(template, items, **options)).result()
