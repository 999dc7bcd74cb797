"""The one-call API: :func:`map`, :func:`imap` and :func:`map_sync`.

Each builds an :class:`~llmbatch.client.LLMClient` for the call (the provider from the
environment when none is given), turns every item into a request with a prompt template,
and runs the requests through :mod:`llmbatch.runner` (online) or
:mod:`llmbatch.routing`'s plan (``mode="batch"`` / ``"auto"``). Users who keep a client
across calls use :meth:`LLMClient.map <llmbatch.client.LLMClient.map>` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llmbatch.batchapi import Journal
from llmbatch.cache import CachePolicy, ResponseCache
from llmbatch.client import DEFAULT_MAX_REASKS, LLMClient, build_request
from llmbatch.concurrency import SAFETY_CAP
from llmbatch.failure import BatchResult, FailureStrategy, ItemError, OnError, finish
from llmbatch.limits import Limits
from llmbatch.models import Request, Response
from llmbatch.providers.base import Provider
from llmbatch.providers.pool import Fallback
from llmbatch.retry import RetryPolicy
from llmbatch.routing import Mode, Prefer
from llmbatch.runner import BatchStream, aiterate, run_batch, stream_batch
from llmbatch.structured import FinishPolicy, ResponseModel, ResponseSchema

__all__ = ["imap", "map", "map_sync"]


@dataclass(slots=True)
class _Answerer:
    """What :func:`map` and :func:`imap` share: the provider (``owned``: this call made it
    and must close it), the client, and how an item becomes a request and an answer."""

    provider: Provider
    owned: bool
    client: LLMClient
    template: str | Callable[[Any], Request | str]
    system: str | None
    key: Callable[[Any], str | None] | None
    schema: ResponseSchema[Any] | None = None

    def request(self, item: Any) -> Request:
        """The request for *item* (raises KeyError/ValueError for a bad item)."""
        request = build_request(self.template, item, system=self.system)
        item_key = self.key(item) if self.key is not None else None
        changes: dict[str, Any] = {}
        if item_key is not None and request.key is None:
            changes["key"] = item_key
        if self.schema is not None and request.response_model is None:
            changes["response_model"] = self.schema
        return replace(request, **changes) if changes else request

    async def __call__(self, item: Any) -> Response:
        return await self.client.complete(self.request(item))

    async def aclose(self) -> None:
        """Close what this call opened: shared-quota connections, and the provider if
        the call created it."""
        try:
            await self.client.release()
        finally:
            if self.owned:
                await self.provider.aclose()


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
    max_concurrency: int | None = None,
    response_model: ResponseModel | None = None,
    max_reasks: int = DEFAULT_MAX_REASKS,
    finish_policy: FinishPolicy | None = None,
    cache: ResponseCache | str | None = None,
    cache_policy: CachePolicy | None = None,
    dedupe: bool = True,
    fallbacks: Sequence[Fallback | str] = (),
) -> _Answerer:
    """The :class:`_Answerer` (OpenAI from the environment when no provider is given)."""
    # a bad response model (or pydantic missing) is the call's error, not every item's
    schema = ResponseSchema.of(response_model) if response_model is not None else None
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
        max_concurrency=max_concurrency,
        max_reasks=max_reasks,
        finish_policy=finish_policy,
        cache=cache,
        cache_policy=cache_policy,
        dedupe=dedupe,
        fallbacks=fallbacks,
    )
    client.start_job()  # a pool's keys retired by an earlier call are tried again
    return _Answerer(provider, owned, client, template, system, key, schema)


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
    max_concurrency: int | None = None,
    key: Callable[[Any], str | None] | None = None,
    max_cost: float | None = None,
    response_model: ResponseModel | None = None,
    max_reasks: int = DEFAULT_MAX_REASKS,
    finish_policy: FinishPolicy | None = None,
    cache: ResponseCache | str | None = None,
    cache_policy: CachePolicy | None = None,
    dedupe: bool = True,
    fallbacks: Sequence[Fallback | str] = (),
    on_result: Callable[[int, Response | ItemError], None] | None = None,
    mode: Mode = "online",
    deadline: float | None = None,
    prefer: Prefer | None = None,
    journal: Journal | None = None,
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
        max_concurrency: requests in flight at most (a hard cap). Default: as many as
            the limits allow: their rate times the measured latency, with a margin
            (see :mod:`llmbatch.concurrency`).
        key: a function naming each item (recorded on its errors).
        max_cost: a budget in USD: once spent, no new item starts and the batch ends
            with :class:`~llmbatch.failure.BatchFailed` (reason ``"fatal"``) carrying
            what finished.
        response_model: a typed answer for every item: a pydantic model class (the
            ``structured`` extra), a dataclass or ``TypedDict``, or a JSON Schema dict.
            Each provider enforces it its best way (OpenAI strict ``json_schema``,
            Anthropic a forced tool, the local model a grammar); ``Response.parsed``
            holds the validated instance (a dict for a schema dict).
        max_reasks: follow-up requests an answer that fails to parse or validate may
            get, quoting the errors; then the item's error is
            :class:`~llmbatch.structured.InvalidOutput` with the raw text.
        finish_policy: what a truncated, filtered or refused answer does
            (:class:`~llmbatch.structured.FinishPolicy`; default: an error for typed
            answers, kept for text).
        cache: a response cache across jobs (``"default"``: a SQLite file in the user
            cache folder; a path; a ``redis://`` URL; a
            :class:`~llmbatch.cache.ResponseCache`): answers found there cost nothing
            and make no request. Default: off.
        cache_policy: how the cache is used (:class:`~llmbatch.cache.CachePolicy`).
        dedupe: identical requests of this call are sent once (default on; requests
            with a temperature above 0 are samples and are each sent).
        fallbacks: other models (or :class:`~llmbatch.providers.pool.Fallback` routes
            on other providers) for the items the first cannot answer, and for the
            whole call if it is refused or unreachable (see ``LLMClient``; online).
        on_result: called with ``(index, Response or ItemError)`` as each item
            finishes; persist there to keep finished work across a Ctrl-C (online).
        mode: ``"online"``, ``"batch"`` (the provider's Batch API: half price, answers
            within 24 h, the same result objects) or ``"auto"`` (see
            :mod:`llmbatch.routing`; the choice and the saving are logged).
        deadline: seconds within which the answers are needed (for ``"auto"``).
        prefer: ``"cost"`` or ``"speed"`` (for ``"auto"``).
        journal: records batch ids so that a rerun after a crash resumes polling
            instead of paying again (a :class:`~llmbatch.store.Store`).

    Returns:
        A :class:`~llmbatch.failure.BatchResult` of :class:`Response`, in input order.
        A prompt that cannot be built (empty document, missing field) is that item's
        error, not the batch's.
    """
    answerer = _item_answerer(
        template,
        provider=provider,
        model=model,
        system=system,
        max_tokens=max_tokens,
        limits=limits,
        retry=retry,
        max_cost=max_cost,
        key=key,
        max_concurrency=max_concurrency,
        response_model=response_model,
        max_reasks=max_reasks,
        finish_policy=finish_policy,
        cache=cache,
        cache_policy=cache_policy,
        dedupe=dedupe,
        fallbacks=fallbacks,
    )
    try:
        if mode != "online":
            return await _map_routed(
                answerer.client,
                answerer.request,
                items,
                on_error=on_error,
                mode=mode,
                deadline=deadline,
                prefer=prefer,
                journal=journal,
                max_concurrency=max_concurrency,
            )
        return await run_batch(
            answerer,
            items,
            max_concurrency=max_concurrency or SAFETY_CAP,
            on_error=on_error,
            key=key,
            on_result=on_result,
        )
    finally:
        await answerer.aclose()


async def _map_routed(
    client: LLMClient,
    item_request: Callable[[Any], Request],
    items: Iterable[Any] | AsyncIterable[Any],
    *,
    on_error: OnError | str | FailureStrategy,
    mode: Mode,
    deadline: float | None,
    prefer: Prefer | None,
    journal: Journal | None,
    max_concurrency: int | None,
) -> BatchResult[Response]:
    """:func:`map` with ``mode="batch"`` or ``"auto"``: every prompt is built first (a
    bad item is its own error), the valid requests go where the route says, and the
    results come back in input order under the failure strategy."""
    results: list[Response | ItemError | None] = []
    requests: list[Request] = []
    positions: list[int] = []
    async for item in aiterate(items):
        index = len(results)
        try:
            request = item_request(item)
        except (KeyError, ValueError) as exc:
            results.append(ItemError.from_exception(index, exc))
            continue
        results.append(None)
        requests.append(request)
        positions.append(index)
    answered = await client.map(
        requests,
        on_error=OnError.COLLECT,
        mode=mode,
        deadline=deadline,
        prefer=prefer,
        journal=journal,
        max_concurrency=max_concurrency,
    )
    for position, outcome in zip(positions, answered.results, strict=True):
        if isinstance(outcome, ItemError):
            outcome = replace(outcome, index=position)
        results[position] = outcome
    return finish([r for r in results if r is not None], on_error)


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
    max_concurrency: int | None = None,
    key: Callable[[Any], str | None] | None = None,
    max_cost: float | None = None,
    response_model: ResponseModel | None = None,
    max_reasks: int = DEFAULT_MAX_REASKS,
    finish_policy: FinishPolicy | None = None,
    cache: ResponseCache | str | None = None,
    cache_policy: CachePolicy | None = None,
    dedupe: bool = True,
    fallbacks: Sequence[Fallback | str] = (),
) -> BatchStream[Response]:
    """Like :func:`map`, for inputs that do not fit in memory: outcomes as they finish.

    Use it as ``async with llmbatch.imap(...) as outcomes: async for o in outcomes`` —
    each :class:`~llmbatch.runner.Outcome` has the item's input ``index`` and its
    Response or ItemError; nothing is kept once handed out.
    """
    answerer = _item_answerer(
        template,
        provider=provider,
        model=model,
        system=system,
        max_tokens=max_tokens,
        limits=limits,
        retry=retry,
        max_cost=max_cost,
        key=key,
        max_concurrency=max_concurrency,
        response_model=response_model,
        max_reasks=max_reasks,
        finish_policy=finish_policy,
        cache=cache,
        cache_policy=cache_policy,
        dedupe=dedupe,
        fallbacks=fallbacks,
    )
    stream: BatchStream[Response] = stream_batch(
        answerer,
        items,
        max_concurrency=max_concurrency or SAFETY_CAP,
        on_error=on_error,
        key=key,
    )
    stream.call_on_close(answerer.aclose)
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
