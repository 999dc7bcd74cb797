"""LLM calls in Ray Data, every worker under one provider quota::

    import ray
    from llmbatch.integrations.ray import LLMBatchUDF

    ds = ray.data.from_items([{"text": t} for t in texts])
    out = ds.map_batches(
        LLMBatchUDF,
        fn_constructor_kwargs={
            "template": "Summarize: {text}",
            "model": "gpt-4o-mini",
            "limits": {"rpm": 500, "tpm": 200_000},     # the quota of all workers together
            "redis_url": None,                          # None: a named Ray actor keeps it
        },
        concurrency=4,
        batch_format="pandas",
    )

Ray's own LLM processor limits ``qps`` per worker, so the real rate is qps x workers.
Here every worker (a Ray actor running :class:`LLMBatchUDF`) takes its permits from one
shared quota: the Redis limiter when ``redis_url`` is given
(:class:`~llmbatch.limits.RedisRateLimiter`), otherwise a named Ray actor
(:class:`QuotaActor`) that runs one :class:`~llmbatch.limits.RateLimiter` for the whole
cluster, which workers reach through :class:`RayQuotaLimiter` (the
:class:`~llmbatch.limits.Limiter` contract). Each worker builds its client inside its
own event loop (a thread it owns), once. Rows come back with ``llm_answer``,
``llm_error``, ``llm_input_tokens``, ``llm_output_tokens`` and ``llm_cost`` columns (with
``response_model=``, a column per field of the typed answer in place of ``llm_answer``);
the failure policy applies per row, and a fatal error (a refused key, an exhausted quota)
stops the dataset with its message.

A response model travels to the workers pickled: a JSON Schema dict as it is, a pydantic
model by reference (its module must be importable on the workers, as for any class Ray
ships).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("llmbatch.integrations.ray needs Ray: pip install 'llmbatch[ray]'") from exc

import pandas as pd

from llmbatch.cache import CachePolicy
from llmbatch.client import DEFAULT_MAX_REASKS, LLMClient, build_request
from llmbatch.errors import LLMBatchError
from llmbatch.failure import BatchFailed, OnError, failure_strategy
from llmbatch.integrations.pandas import result_columns, result_frame
from llmbatch.limits import (
    BucketPermit,
    Limiter,
    LimiterStatistics,
    Limits,
    Permit,
    RateLimiter,
    RateLimitHeaders,
    RedisRateLimiter,
)
from llmbatch.models import Request
from llmbatch.providers.base import Provider
from llmbatch.retry import RetryPolicy
from llmbatch.runner import run_batch
from llmbatch.structured import FinishPolicy, ResponseModel, ResponseSchema

__all__ = ["LLMBatchUDF", "QuotaActor", "RayQuotaLimiter", "close_quota", "quota_actor"]

#: permits a QuotaActor remembers before forgetting the oldest (a worker that died
#: between release and settle leaves one behind)
_MAX_OPEN_PERMITS = 100_000


class QuotaActor:
    """One :class:`~llmbatch.limits.RateLimiter` for a whole Ray cluster (run as an async
    actor, see :func:`quota_actor`). Workers call it through :class:`RayQuotaLimiter`."""

    def __init__(self, limits: Mapping[str, Any]) -> None:
        self.limits = Limits(**limits)
        self._limiter: RateLimiter | None = None
        self._permits: dict[int, BucketPermit] = {}
        self._next = 0

    def _get(self) -> RateLimiter:
        if self._limiter is None:  # built inside the actor's event loop
            self._limiter = RateLimiter(self.limits)
        return self._limiter

    async def acquire(
        self,
        requests: float = 1,
        tokens: float = 0,
        input_tokens: float = 0,
        output_tokens: float = 0,
    ) -> int:
        """Wait for the quota; a permit number."""
        permit = await self._get().acquire(
            requests, tokens, input_tokens=input_tokens, output_tokens=output_tokens
        )
        self._next += 1
        self._permits[self._next] = permit
        while len(self._permits) > _MAX_OPEN_PERMITS:
            self._permits.pop(next(iter(self._permits))).release()
        return self._next

    def release(self, number: int) -> None:
        """The request is over: free its concurrency slot."""
        permit = self._permits.get(number)
        if permit is not None:
            permit.release()

    def abandon(self, number: int) -> None:
        """Permit *number* was granted to a wait that was cancelled meanwhile: release
        it (what it took of the buckets stays spent, as for a request never answered)."""
        permit = self._permits.pop(number, None)
        if permit is not None:
            permit.release()

    def settle(self, number: int, actual: Mapping[str, float], refund: bool | None = None) -> None:
        """The actual usage of a finished request (*refund*: the provider's rule)."""
        permit = self._permits.pop(number, None)
        if permit is not None:
            permit.release()
            permit.settle(**actual, refund=refund)

    async def observe(
        self, headers: Mapping[str, str] | RateLimitHeaders, number: int | None = None
    ) -> None:
        """A response's rate-limit headers."""
        await self._get().observe(headers, self._permits.get(number) if number else None)

    async def on_rate_limited(self, retry_after: float | None, dimension: str | None) -> None:
        """A 429: pause the whole cluster's quota."""
        await self._get().on_rate_limited(retry_after, dimension=dimension)

    def statistics(self) -> LimiterStatistics:
        """The limiter's counters."""
        return self._get().statistics()


def quota_actor(name: str, limits: Limits | Mapping[str, Any]) -> Any:
    """The cluster's :class:`QuotaActor` called *name* (created on first use; every
    later caller gets the same one, whatever limits it passes).

    The actor is detached: it outlives the worker that happened to create it (Ray Data
    stops idle workers, and a normal actor dies with its creator). It lives until
    :func:`close_quota` or the end of the cluster.
    """
    settings = _limits_dict(limits)
    remote = ray.remote(QuotaActor)
    return remote.options(
        name=name,
        get_if_exists=True,
        lifetime="detached",
        max_concurrency=10_000,
        num_cpus=0,
    ).remote(settings)


def close_quota(name: str) -> bool:
    """Stop the :class:`QuotaActor` called *name*; whether there was one."""
    try:
        actor = ray.get_actor(name)
    except ValueError:
        return False
    ray.kill(actor)
    return True


class _RayPermit(Permit):
    """A permit of a :class:`QuotaActor`, known by its number there. Releasing and
    settling are calls to the actor that nobody waits for (the contract's plain calls)."""

    __slots__ = ("_actor", "number", "released")

    def __init__(self, actor: Any, number: int) -> None:
        self._actor = actor
        self.number = number
        self.released = False

    def __repr__(self) -> str:
        return f"<RayPermit {self.number} released={self.released}>"

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._actor.release.remote(self.number)

    def settle(
        self,
        *,
        tokens: float | None = None,
        input_tokens: float | None = None,
        output_tokens: float | None = None,
        refund: bool | None = None,
    ) -> None:
        actual = {"tokens": tokens, "input_tokens": input_tokens, "output_tokens": output_tokens}
        used = {k: v for k, v in actual.items() if v is not None}
        self._actor.settle.remote(self.number, used, refund)


class RayQuotaLimiter(Limiter):
    """The :class:`~llmbatch.limits.Limiter` contract over a :class:`QuotaActor`, for
    :class:`~llmbatch.client.LLMClient`: ``acquire``, ``observe`` and ``on_rate_limited``
    wait until the actor has done it; ``statistics`` blocks for its answer (not for the
    event loop's hot path)."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor
        self._tasks: set[asyncio.Future[None]] = set()

    def __repr__(self) -> str:
        return f"<RayQuotaLimiter {self._actor}>"

    async def acquire(
        self,
        requests: float = 1,
        tokens: float = 0,
        *,
        input_tokens: float = 0,
        output_tokens: float = 0,
    ) -> _RayPermit:
        """Wait for the cluster's quota."""
        call = self._actor.acquire.remote(requests, tokens, input_tokens, output_tokens)
        try:
            number = await call
        except asyncio.CancelledError:
            # The actor's wait goes on unless cancelled there too (then it takes
            # nothing); should it have granted the permit just before, its number is
            # on its way: release it.
            ray.cancel(call)
            self._background(self._give_back(call))
            raise
        return _RayPermit(self._actor, number)

    async def observe(
        self, headers: Mapping[str, str] | RateLimitHeaders, permit: Permit | None = None
    ) -> None:
        """Forward a response's headers to the quota (waits until the actor has them).

        Raises:
            TypeError: *permit* was not issued by a :class:`RayQuotaLimiter`.
        """
        if permit is not None and not isinstance(permit, _RayPermit):
            raise TypeError(f"{permit!r} is not a permit of {self!r}")
        sent = headers if isinstance(headers, RateLimitHeaders) else dict(headers)
        await self._actor.observe.remote(sent, permit.number if permit else None)

    async def on_rate_limited(
        self, retry_after: float | None = None, *, dimension: str | None = None
    ) -> None:
        """A 429: pause the cluster's quota (waits until the actor has it)."""
        await self._actor.on_rate_limited.remote(retry_after, dimension)

    def statistics(self) -> LimiterStatistics:
        """The quota's counters (a blocking call: not for the event loop's hot path)."""
        stats: LimiterStatistics = ray.get(self._actor.statistics.remote())
        return stats

    async def aclose(self) -> None:
        """Wait for the permits of cancelled acquires to be given back (the actor itself
        is the cluster's: :func:`close_quota` stops it)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _give_back(self, call: Any) -> None:
        """Release the permit of a cancelled acquire, if the actor granted it all the same."""
        try:
            number = await call
        except ray.exceptions.RayError:
            return  # cancelled at the actor (or the actor is gone): nothing was taken
        await self._actor.abandon.remote(number)

    def _background(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class LLMBatchUDF:
    """A Ray Data ``map_batches`` callable class: one LLM call per row.

    Args:
        template: a ``str.format`` template over each row's columns, or a callable from
            the row (a dict) to a Request or a prompt.
        model: the model.
        limits: the quota of all workers together (a :class:`~llmbatch.limits.Limits`
            or its keyword arguments).
        provider: a zero-argument callable building the provider inside the worker
            (default: ``OpenAIProvider(base_url=base_url)``, its key from the worker's
            ``OPENAI_API_KEY``, so no key travels through Ray's object store).
        base_url: an OpenAI-compatible server for the default provider.
        redis_url: share the quota through Redis (``redis://...``) instead of a Ray actor.
        quota: the quota's name (the Ray actor's name, or the Redis quota key);
            ``None`` (and no Redis): each worker paces alone at *limits*, as Ray's own
            per-worker ``qps`` does (then give each worker its share).
        system: a system prompt.
        max_tokens: the output cap of every request.
        retry: the retry policy.
        on_error: ``"collect"`` (failed rows keep an ``llm_error``), ``"skip"`` (dropped)
            or ``"fail_fast"`` (the first failed row stops the dataset).
        max_concurrency: requests in flight per worker.
        prefix: the result columns' prefix.
        response_model: a typed answer for every row (a pydantic model class, importable
            on the workers, or a JSON Schema dict): a column per top-level field of it in
            place of ``llm_answer``.
        max_reasks: follow-up requests an invalid typed answer may get; then the row's
            error is ``InvalidOutput``.
        finish_policy: what a truncated, filtered or refused answer does
            (:class:`~llmbatch.structured.FinishPolicy`).
        cache: a response cache every worker shares (a SQLite path on a shared disk,
            or a ``redis://`` URL; see :mod:`llmbatch.cache`): answers found there are
            not paid again. Default: off.
        cache_policy: how the cache is used (:class:`~llmbatch.cache.CachePolicy`).
        dedupe: identical rows of a worker are sent once (samples excepted).
    """

    def __init__(
        self,
        template: str | Callable[[dict[str, Any]], Request | str],
        *,
        model: str,
        limits: Limits | Mapping[str, Any],
        provider: Callable[[], Provider] | None = None,
        base_url: str | None = None,
        redis_url: str | None = None,
        quota: str | None = "llmbatch-quota",
        system: str | None = None,
        max_tokens: int | None = None,
        retry: RetryPolicy | None = None,
        on_error: OnError | str = OnError.COLLECT,
        max_concurrency: int = 16,
        prefix: str = "llm_",
        response_model: ResponseModel | None = None,
        max_reasks: int = DEFAULT_MAX_REASKS,
        finish_policy: FinishPolicy | None = None,
        cache: str | None = None,
        cache_policy: CachePolicy | None = None,
        dedupe: bool = True,
    ) -> None:
        self.schema = ResponseSchema.of(response_model) if response_model is not None else None
        result_columns(self.schema)  # a field clashing with a column fails here, at once
        self.template = template
        self.system = system
        self.on_error = on_error
        self.max_concurrency = max_concurrency
        self.prefix = prefix
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        settings = _limits_dict(limits)

        async def build() -> LLMClient:
            limiter: Limiter
            if redis_url is not None:
                from redis.asyncio import Redis

                redis = Redis.from_url(redis_url)
                limiter = RedisRateLimiter(
                    redis, Limits(**settings), quota=quota or "llmbatch-quota"
                )
            elif quota is not None:
                limiter = RayQuotaLimiter(quota_actor(quota, settings))
            else:
                limiter = RateLimiter(Limits(**settings))
            if provider is not None:
                made = provider()
            else:
                from llmbatch.providers.openai import OpenAIProvider

                made = OpenAIProvider(base_url=base_url)
            return LLMClient(
                made,
                model=model,
                max_tokens=max_tokens,
                limiter=limiter,
                retry=retry,
                max_concurrency=max_concurrency,
                max_reasks=max_reasks,
                finish_policy=finish_policy,
                # a path or a redis:// URL: every worker opens its own connection
                cache=cache,
                cache_policy=cache_policy,
                dedupe=dedupe,
            )

        self.client = self._run(build())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Answer every row of *batch*; the rows with the result columns added."""
        return self._run(self._answer(batch))

    def answer(self, batch: pd.DataFrame) -> pd.DataFrame:
        """The same as calling the instance (for use as a plain Ray actor)."""
        return self(batch)

    async def _answer(self, batch: pd.DataFrame) -> pd.DataFrame:
        labels = list(batch.index)
        rows = batch.to_dict("records")

        async def one(row: dict[str, Any]) -> Any:
            request = build_request(self.template, row, system=self.system)
            if self.schema is not None and request.response_model is None:
                request = replace(request, response_model=self.schema)
            return await self.client.complete(request)

        try:
            result = await run_batch(
                one, rows, max_concurrency=self.max_concurrency, on_error=self.on_error
            )
        except BatchFailed as exc:
            raise RuntimeError(f"llmbatch stopped the dataset: {exc}") from None
        except LLMBatchError as exc:  # pragma: no cover - run_batch wraps item errors
            raise RuntimeError(f"llmbatch stopped the dataset: {exc}") from None
        frame = result_frame(
            result, labels, prefix=self.prefix, on_error=self.on_error, schema=self.schema
        )
        skip = failure_strategy(self.on_error) == failure_strategy(OnError.SKIP)
        kept = (
            batch.iloc[[i for i, o in enumerate(result.results) if not _failed(o)]]
            if skip
            else batch
        )
        frame.index = kept.index
        return pd.concat([kept, frame], axis=1)


def _failed(outcome: Any) -> bool:
    from llmbatch.failure import ItemError

    return isinstance(outcome, ItemError)


def _limits_dict(limits: Limits | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(limits, Limits):
        from dataclasses import asdict

        return asdict(limits)
    return dict(limits)
