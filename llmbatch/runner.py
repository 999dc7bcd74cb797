"""The one place where items are scheduled.

Every parallel thing in llmbatch (parallel batch nodes and flows, ``llmbatch.map``, the
CLI, the pandas and Ray integrations) runs its items through :func:`run_batch` or
:func:`stream_batch`:

* a fixed pool of ``max_concurrency`` worker tasks pulls items from a sync or async
  iterable one at a time, so memory is bounded by the concurrency, never by the input
  size (no task per item is ever created up front);
* :func:`run_batch` returns a :class:`~llmbatch.failure.BatchResult` in input order;
  :func:`stream_batch` yields :class:`Outcome` records as items finish, each with its
  input index, and keeps nothing once it is handed out;
* the failure strategy (:mod:`llmbatch.failure`) decides what a failed item does; an
  abort starts no new item and cancels the items in flight, except those whose request
  is at the provider (:meth:`ItemContext.request_sent`): the provider has accepted it
  and may bill it, so its answer is awaited and kept, and only then does the item stop
  (no further attempt);
* cancelling the caller (Ctrl-C, ``task.cancel()``) cancels every worker before the
  cancellation propagates: no task outlives the call.

Code running inside an item can read :func:`current_item` (its index, key and attempt
number); the attempt number belongs to the item, not to a shared node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sized
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from llmbatch.context import ItemContext, current_item, enter_item
from llmbatch.errors import PermanentError
from llmbatch.failure import (
    AbortReason,
    BatchFailed,
    BatchResult,
    FailureCounts,
    FailureStrategy,
    ItemError,
    OnError,
    failure_strategy,
    is_fatal,
)

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "BatchStream",
    "ItemContext",
    "Outcome",
    "aiterate",
    "current_item",
    "run_batch",
    "stream_batch",
]

T = TypeVar("T")
ItemT = TypeVar("ItemT")

#: generous enough that small PocketFlow batches behave as an unbounded gather would
DEFAULT_MAX_CONCURRENCY = 64

Items = Iterable[ItemT] | AsyncIterable[ItemT] | None


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """One finished item of a streamed batch: its input index and its value or error."""

    index: int
    value: T | ItemError

    @property
    def ok(self) -> bool:
        """Whether the item produced a value."""
        return not isinstance(self.value, ItemError)


_END: Any = object()


class _Batch(Generic[ItemT, T]):
    """A worker pool over one input; results land in a list or a queue."""

    def __init__(
        self,
        fn: Callable[[ItemT], Awaitable[T]],
        items: Items[ItemT],
        *,
        max_concurrency: int,
        strategy: FailureStrategy,
        key: Callable[[ItemT], str | None] | None,
        queue: asyncio.Queue[Any] | None,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError(f"max_concurrency must be an int, not {max_concurrency!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency!r}")
        self._fn = fn
        self._key = key
        self._on_result = on_result
        self._strategy = strategy
        self._queue = queue
        self._results: list[Any] | None = [] if queue is None else None
        self._total: int | None = None
        self._sync: Iterable[ItemT] | None = None
        self._async: AsyncIterator[ItemT] | None = None
        self._lock = asyncio.Lock()
        if items is None:
            items = ()
        workers = max_concurrency
        if isinstance(items, AsyncIterable):
            self._async = aiter(items)
        else:
            if isinstance(items, Sized):
                self._total = len(items)
                workers = max(1, min(workers, self._total))
            self._sync = iter(items)
        self._workers = workers
        self._next_index = 0
        self._finished = 0
        self._failed = 0
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._contexts: dict[asyncio.Task[None], ItemContext] = {}
        self.abort: BatchFailed | None = None

    def result(self) -> BatchResult[T]:
        assert self._results is not None
        return BatchResult(self._results, self._strategy.on_error)

    async def _pull(self) -> tuple[int, ItemT] | None:
        if self._sync is not None:
            try:
                item = next(self._sync)  # type: ignore[call-overload]
            except StopIteration:
                self._stop = True
                return None
        else:
            async with self._lock:
                if self._stop:
                    return None
                try:
                    item = await anext(self._async)  # type: ignore[arg-type]
                except StopAsyncIteration:
                    self._stop = True
                    return None
        index = self._next_index
        self._next_index = index + 1
        if self._results is not None:
            self._results.append(_END)
        return index, item

    async def _worker(self) -> None:
        ctx = ItemContext()
        enter_item(ctx)  # this task's own copy of the context
        task = asyncio.current_task()
        assert task is not None
        self._contexts[task] = ctx
        fn, key, results, queue = self._fn, self._key, self._results, self._queue
        while not self._stop:
            pulled = await self._pull()
            if pulled is None:
                return
            index, item = pulled
            ctx.index = index
            ctx.attempts = 1
            ctx.key = None
            ctx.in_request = False
            try:
                if key is not None:
                    ctx.key = key(item)
                value: Any = await fn(item)
            except Exception as exc:
                if self.abort is not None and ctx.stopping and not isinstance(exc, PermanentError):
                    # Its request was let finish after the abort, and failed: it is not
                    # tried again, so it ends as cut short (not run), not as failed.
                    error = ItemError(
                        index=index,
                        key=ctx.key,
                        error_type="CancelledError",
                        message=(
                            "stopped when the batch was aborted; its last attempt failed: "
                            f"{type(exc).__name__}: {exc}"
                        ),
                        attempts=ctx.attempts,
                        cancelled=True,
                        exception=exc,
                    )
                    self._record_stopped(index, error)
                    return
                error = ItemError.from_exception(index, exc, key=ctx.key, attempts=ctx.attempts)
                self._finished += 1
                self._failed += 1
                if results is not None:
                    results[index] = error
                if self._on_result is not None:
                    self._on_result(index, error)
                elif queue is not None:
                    await queue.put(Outcome(index, error))
                reason: AbortReason | None = "fatal" if is_fatal(exc) else None
                reason = reason or self._strategy(
                    error, FailureCounts(self._finished, self._failed)
                )
                if reason is not None:
                    self._abort_batch(error, reason)
                    return
            except asyncio.CancelledError:
                if self.abort is not None and results is not None:
                    results[index] = ItemError(
                        index=index,
                        key=ctx.key,
                        error_type="CancelledError",
                        message="cancelled when the batch was aborted",
                        attempts=ctx.attempts,
                        cancelled=True,
                    )
                raise
            else:
                self._finished += 1
                if results is not None:
                    results[index] = value
                if self._on_result is not None:
                    self._on_result(index, value)
                elif queue is not None:
                    await queue.put(Outcome(index, value))

    def _record_stopped(self, index: int, error: ItemError) -> None:
        """Record an item the abort cut short: in place in the results; a streamed
        batch does not yield it (as with items cancelled by the abort)."""
        if self._results is not None:
            self._results[index] = error

    def _abort_batch(self, error: ItemError, reason: AbortReason) -> None:
        """Start no new item; cancel the items in flight, except those whose request is
        at the provider (it accepted the work and may bill it): they finish, their
        answers are kept, and they make no further attempt."""
        if self.abort is not None:
            return
        self._stop = True
        self.abort = BatchFailed(
            error,
            reason=reason,
            result=None if self._results is None else self.result(),
            not_started=None if self._total is None else self._total - self._next_index,
        )
        current = asyncio.current_task()
        for task in self._tasks:
            if task is current:
                continue
            ctx = self._contexts.get(task)
            if ctx is not None and ctx.in_request:
                ctx.stopping = True
            else:
                task.cancel()

    async def run(self) -> None:
        """Run every worker to the end; raise the abort or the first unexpected error."""
        self._tasks = []
        try:
            # One worker per turn of the event loop, not all at once: each worker's first
            # step (pulling an item, building its request) is CPU work, and with all of
            # them queued at once no request would reach the network until every worker
            # had built one (~0.3 s for 256 SDK calls). Started in turns, the first
            # requests are sent while the later workers start.
            for _ in range(self._workers):
                if self._stop:
                    break
                self._tasks.append(asyncio.create_task(self._worker()))
                await asyncio.sleep(0)
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # Also reached when the caller is cancelled: no worker may outlive us.
            self._stop = True
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.abort is not None:
            raise self.abort from self.abort.error.exception
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # e.g. the input iterator failed


async def aiterate(items: Iterable[ItemT] | AsyncIterable[ItemT]) -> AsyncIterator[ItemT]:
    """*items*, whichever kind of iterable they are, as an async iterator (consumed
    lazily, as :func:`run_batch` consumes them)."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def run_batch(
    fn: Callable[[ItemT], Awaitable[T]],
    items: Items[ItemT],
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
    max_failures: int | None = None,
    max_failure_rate: float | None = None,
    key: Callable[[ItemT], str | None] | None = None,
    on_result: Callable[[int, T | ItemError], None] | None = None,
) -> BatchResult[T]:
    """Run ``await fn(item)`` for every item, at most *max_concurrency* at once.

    Args:
        fn: the coroutine function applied to each item.
        items: a sync or async iterable (or ``None``, meaning no items); consumed lazily.
        max_concurrency: how many items may be in flight at once.
        on_error: ``"fail_fast"``, ``"collect"``, ``"skip"`` or a
            :class:`~llmbatch.failure.FailureStrategy`.
        max_failures: abort a collect/skip batch when more items than this failed.
        max_failure_rate: abort a collect/skip batch when the failed share exceeds this.
        key: a function giving each item's key, recorded on its :class:`ItemError`.
        on_result: called with ``(index, value or ItemError)`` as each item finishes:
            a place to persist results, so that work done before a Ctrl-C or a crash
            is kept (the returned result is lost when the call is cancelled).

    Returns:
        The results in input order, failures in place as :class:`ItemError`.

    Raises:
        BatchFailed: the strategy aborted the batch (carries the partial results).
    """
    strategy = failure_strategy(
        on_error, max_failures=max_failures, max_failure_rate=max_failure_rate
    )
    batch = _Batch(
        fn,
        items,
        max_concurrency=max_concurrency,
        strategy=strategy,
        key=key,
        queue=None,
        on_result=on_result,
    )
    await batch.run()
    return batch.result()


class BatchStream(Generic[T]):
    """Outcomes of a batch in completion order; returned by :func:`stream_batch`.

    Use it as ``async with stream_batch(...) as outcomes: async for o in outcomes``. The
    ``async with`` block guarantees that leaving early (``break``, an exception) cancels
    the items still in flight. Plain ``async for`` works too and cleans up once the
    stream is exhausted or raises.
    """

    def __init__(self, batch: _Batch[Any, T], queue: asyncio.Queue[Any]) -> None:
        self._batch = batch
        self._queue = queue
        self._task: asyncio.Task[None] | None = None
        self._done = False
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    def call_on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await *callback* once the stream is closed (e.g. to release a client)."""
        self._on_close.append(callback)

    async def _supervise(self) -> None:
        try:
            await self._batch.run()
        except asyncio.CancelledError:
            raise  # the consumer left (aclose); nobody is listening any more
        except Exception as exc:
            await self._queue.put(exc)  # re-raised by __anext__ in the consumer's task
        else:
            await self._queue.put(_END)

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise())

    async def __aenter__(self) -> BatchStream[T]:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> BatchStream[T]:
        return self

    async def __anext__(self) -> Outcome[T]:
        if self._done:
            raise StopAsyncIteration
        self._start()
        got = await self._queue.get()
        if isinstance(got, Outcome):
            return got
        self._done = True
        await self.aclose()
        if got is _END:
            raise StopAsyncIteration
        raise got

    async def aclose(self) -> None:
        """Cancel whatever is still running and wait for it to stop."""
        self._done = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            try:
                await task
            except BaseException:
                # The outcome was already delivered (or is no longer wanted).
                pass
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            await callback()


def stream_batch(
    fn: Callable[[ItemT], Awaitable[T]],
    items: Items[ItemT],
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
    max_failures: int | None = None,
    max_failure_rate: float | None = None,
    key: Callable[[ItemT], str | None] | None = None,
) -> BatchStream[T]:
    """Like :func:`run_batch`, but yield an :class:`Outcome` as each item finishes.

    Nothing is kept after it is yielded, so a stream of millions of items runs in memory
    bounded by *max_concurrency*. Every finished item is yielded, failed ones as outcomes
    holding an :class:`ItemError` (under every strategy: the item that triggers a
    fail-fast abort is yielded too); an abort then raises :class:`BatchFailed` (with
    ``result=None``) from the iteration. Items cancelled by the abort are not yielded.
    """
    strategy = failure_strategy(
        on_error, max_failures=max_failures, max_failure_rate=max_failure_rate
    )
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(1, max_concurrency))
    batch = _Batch(
        fn, items, max_concurrency=max_concurrency, strategy=strategy, key=key, queue=queue
    )
    return BatchStream(batch, queue)
