"""Flow primitives with PocketFlow's programming model: prep → exec → post.

A *node* does one step: ``prep(shared)`` reads what it needs from the shared store,
``exec(prep_res)`` does the work (and is retried), ``post(shared, prep_res, exec_res)``
writes results back and returns an *action*. A *flow* wires nodes into a graph with
``a >> b`` (the ``"default"`` action) and ``a - "action" >> b``, runs from its start
node following the actions, and returns the last one. Flows are nodes, so they nest.

The semantics are PocketFlow's, so a PocketFlow program runs unchanged on
``llmbatch.compat.pocketflow``. The parallel variants fix PocketFlow's defects instead of
copying them:

* :class:`AsyncParallelBatchNode` and :class:`AsyncParallelBatchFlow` run through
  :mod:`llmbatch.runner`: at most ``max_concurrency`` items in flight (default 64), input
  order kept, and a failure strategy ``on_error`` (``"fail_fast"`` default, ``"collect"``,
  ``"skip"``; see :mod:`llmbatch.failure`). Fail-fast cancels the siblings still running
  and raises :class:`~llmbatch.failure.BatchFailed` with the partial results
  (:mod:`llmbatch.compat.pocketflow` raises the failing item's own exception instead).
* The retry counter ``cur_retry`` belongs to the item being run (a context variable),
  not to the node that parallel items share.
* After a parallel batch, ``self.batch_result`` (a
  :class:`~llmbatch.failure.BatchResult`) is available in ``post``: under ``"skip"``
  ``exec_res`` holds the successes only and ``self.batch_result.skipped`` the rest.
* ``limiter=`` takes any async context manager (an ``aiolimiter.AsyncLimiter``, a
  semaphore, llmbatch's rate limiter) entered around every attempt of ``exec_async``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from typing import Any

from llmbatch.failure import BatchResult, FailureStrategy, OnError, failure_strategy
from llmbatch.models import Request, Response
from llmbatch.runner import DEFAULT_MAX_CONCURRENCY, current_item, run_batch
from llmbatch.structured import ResponseModel, ResponseSchema

__all__ = [
    "AsyncBatchFlow",
    "AsyncBatchNode",
    "AsyncFlow",
    "AsyncNode",
    "AsyncParallelBatchFlow",
    "AsyncParallelBatchNode",
    "BaseNode",
    "BatchFlow",
    "BatchNode",
    "Flow",
    "LLMParallelBatchNode",
    "Node",
]

#: the retry counter of the attempt running in this task (see ``Node.cur_retry``)
_CUR_RETRY: ContextVar[int] = ContextVar("llmbatch_cur_retry", default=0)


class BaseNode:
    """A step with ``prep``/``exec``/``post``, ``params`` and successors by action."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.successors: dict[str, BaseNode] = {}

    def set_params(self, params: dict[str, Any]) -> None:
        """Replace the node's params (flows call this before each run)."""
        self.params = params

    def next(self, node: BaseNode, action: str = "default") -> BaseNode:
        """Make *node* the successor for *action*; returns *node* so that wiring chains."""
        if action in self.successors:
            warnings.warn(f"Overwriting successor for action '{action}'", stacklevel=2)
        self.successors[action] = node
        return node

    def prep(self, shared: Any) -> Any:
        """Read inputs from the shared store."""

    def exec(self, prep_res: Any) -> Any:
        """Do the work (no access to the shared store)."""

    def post(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        """Write results back; the return value is the action that picks the successor."""

    def _exec(self, prep_res: Any) -> Any:
        return self.exec(prep_res)

    def _run(self, shared: Any) -> Any:
        prep_res = self.prep(shared)
        exec_res = self._exec(prep_res)
        return self.post(shared, prep_res, exec_res)

    def run(self, shared: Any) -> Any:
        """Run this node alone (its successors are not run: use a Flow for that)."""
        if self.successors:
            warnings.warn("Node won't run successors. Use Flow.", stacklevel=2)
        return self._run(shared)

    def __rshift__(self, other: BaseNode) -> BaseNode:
        return self.next(other)

    def __sub__(self, action: str) -> _ConditionalTransition:
        if isinstance(action, str):
            return _ConditionalTransition(self, action)
        raise TypeError("Action must be a string")


class _ConditionalTransition:
    """The ``node - "action"`` half of ``node - "action" >> successor``."""

    def __init__(self, src: BaseNode, action: str) -> None:
        self.src = src
        self.action = action

    def __rshift__(self, tgt: BaseNode) -> BaseNode:
        return self.src.next(tgt, self.action)


class Node(BaseNode):
    """A node whose ``exec`` is retried ``max_retries`` times, ``wait`` seconds apart.

    When the last attempt fails, ``exec_fallback(prep_res, exc)`` decides the result
    (by default it re-raises).
    """

    #: how sync nodes wait between attempts (tests replace it)
    _sleep = staticmethod(time.sleep)

    def __init__(self, max_retries: int = 1, wait: float = 0) -> None:
        super().__init__()
        self.max_retries = max_retries
        self.wait = wait

    @property
    def cur_retry(self) -> int:
        """The 0-based attempt number of the ``exec`` running in this task."""
        return _CUR_RETRY.get()

    @cur_retry.setter
    def cur_retry(self, value: int) -> None:
        _CUR_RETRY.set(value)

    def exec_fallback(self, prep_res: Any, exc: Exception) -> Any:
        """The result when every attempt failed; re-raises by default."""
        raise exc

    def _exec(self, prep_res: Any) -> Any:
        token = _CUR_RETRY.set(0)
        try:
            for attempt in range(self.max_retries):
                _CUR_RETRY.set(attempt)
                _note_attempt(attempt)
                try:
                    return self.exec(prep_res)
                except Exception as exc:
                    if attempt == self.max_retries - 1:
                        return self.exec_fallback(prep_res, exc)
                    if self.wait > 0:
                        self._sleep(self.wait)
            return None  # max_retries < 1: exec never runs, as in PocketFlow
        finally:
            _CUR_RETRY.reset(token)


def _note_attempt(attempt: int) -> None:
    """Tell the runner which attempt the current item is on (for its ItemError)."""
    item = current_item()
    if item is not None:
        item.attempts = attempt + 1


class BatchNode(Node):
    """A node whose ``exec`` runs once per item of ``prep``'s result, in order."""

    def _exec(self, items: Any) -> Any:
        return [super(BatchNode, self)._exec(item) for item in (items or [])]


class Flow(BaseNode):
    """Runs a graph of nodes from ``start`` following the actions; returns the last action."""

    def __init__(self, start: BaseNode | None = None) -> None:
        super().__init__()
        self.start_node = start

    def start(self, start: BaseNode) -> BaseNode:
        """Set the start node; returns it so that wiring can continue from it."""
        self.start_node = start
        return start

    def get_next_node(self, curr: BaseNode, action: Any) -> BaseNode | None:
        """The successor of *curr* for *action* (``None``/empty means ``"default"``)."""
        nxt = curr.successors.get(action or "default")
        if not nxt and curr.successors:
            warnings.warn(
                f"Flow ends: '{action}' not found in {list(curr.successors)}", stacklevel=2
            )
        return nxt

    def _orch(self, shared: Any, params: dict[str, Any] | None = None) -> Any:
        curr = copy.copy(self.start_node)
        p = params or {**self.params}
        last_action = None
        while curr:
            curr.set_params(p)
            last_action = curr._run(shared)
            curr = copy.copy(self.get_next_node(curr, last_action))
        return last_action

    def _run(self, shared: Any) -> Any:
        prep_res = self.prep(shared)
        orch_res = self._orch(shared)
        return self.post(shared, prep_res, orch_res)

    def post(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        return exec_res


class BatchFlow(Flow):
    """Runs the whole flow once per params dict returned by ``prep``, in order."""

    def _run(self, shared: Any) -> Any:
        prep_res = self.prep(shared) or []
        for batch_params in prep_res:
            self._orch(shared, {**self.params, **batch_params})
        return self.post(shared, prep_res, None)


class AsyncNode(Node):
    """A node with ``prep_async``/``exec_async``/``post_async``; run it with ``run_async``."""

    def __init__(
        self,
        max_retries: int = 1,
        wait: float = 0,
        *,
        limiter: AbstractAsyncContextManager[Any] | None = None,
    ) -> None:
        super().__init__(max_retries, wait)
        self.limiter = limiter

    async def prep_async(self, shared: Any) -> Any:
        """Read inputs from the shared store."""

    async def exec_async(self, prep_res: Any) -> Any:
        """Do the work (no access to the shared store)."""

    async def exec_fallback_async(self, prep_res: Any, exc: Exception) -> Any:
        """The result when every attempt failed; re-raises by default."""
        raise exc

    async def post_async(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        """Write results back; the return value is the action."""

    async def _attempt(self, prep_res: Any) -> Any:
        if self.limiter is None:
            return await self.exec_async(prep_res)
        async with self.limiter:
            return await self.exec_async(prep_res)

    async def _exec(self, prep_res: Any) -> Any:
        token = _CUR_RETRY.set(0)
        try:
            for attempt in range(self.max_retries):
                _CUR_RETRY.set(attempt)
                _note_attempt(attempt)
                try:
                    return await self._attempt(prep_res)
                except Exception as exc:
                    if attempt == self.max_retries - 1:
                        return await self.exec_fallback_async(prep_res, exc)
                    if self.wait > 0:
                        await asyncio.sleep(self.wait)
            return None
        finally:
            _CUR_RETRY.reset(token)

    async def run_async(self, shared: Any) -> Any:
        """Run this node alone (its successors are not run: use an AsyncFlow for that)."""
        if self.successors:
            warnings.warn("Node won't run successors. Use AsyncFlow.", stacklevel=2)
        return await self._run_async(shared)

    async def _run_async(self, shared: Any) -> Any:
        prep_res = await self.prep_async(shared)
        exec_res = await self._exec(prep_res)
        return await self.post_async(shared, prep_res, exec_res)

    def _run(self, shared: Any) -> Any:
        raise RuntimeError("Use run_async.")


class AsyncBatchNode(AsyncNode, BatchNode):
    """An async node whose ``exec_async`` runs once per item, one after another."""

    async def _exec(self, items: Any) -> Any:
        return [await super(AsyncBatchNode, self)._exec(item) for item in (items or [])]


class _ParallelOptions:
    """``max_concurrency`` / ``on_error`` / thresholds shared by the parallel variants."""

    max_concurrency: int
    failure: FailureStrategy
    batch_result: BatchResult[Any] | None

    def _set_parallel_options(
        self,
        max_concurrency: int,
        on_error: OnError | str | FailureStrategy,
        max_failures: int | None,
        max_failure_rate: float | None,
    ) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError(f"max_concurrency must be an int, not {max_concurrency!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency!r}")
        self.max_concurrency = max_concurrency
        self.failure = failure_strategy(
            on_error, max_failures=max_failures, max_failure_rate=max_failure_rate
        )
        self.batch_result = None

    @property
    def on_error(self) -> OnError:
        """The failure strategy's name."""
        return self.failure.on_error

    async def _run_items(self, fn: Callable[[Any], Awaitable[Any]], items: Any) -> BatchResult[Any]:
        """Run ``fn`` over *items* under this node's cap and failure strategy, and keep
        the result in ``self.batch_result``. The one place the parallel variants reach
        the runner: :mod:`llmbatch.compat.pocketflow` overrides it to change what an
        abort raises."""
        result = await run_batch(
            fn, items, max_concurrency=self.max_concurrency, on_error=self.failure
        )
        self.batch_result = result
        return result


class AsyncParallelBatchNode(_ParallelOptions, AsyncNode, BatchNode):
    """An async node whose ``exec_async`` runs for many items at once, in input order.

    Args:
        max_retries: attempts per item (each item counts its own).
        wait: seconds between an item's attempts.
        max_concurrency: items in flight at most.
        on_error: ``"fail_fast"`` (default), ``"collect"``, ``"skip"`` or a strategy.
        max_failures: abort threshold for collect/skip (failed items).
        max_failure_rate: abort threshold for collect/skip (failed share).
        limiter: an async context manager entered around every attempt.
    """

    def __init__(
        self,
        max_retries: int = 1,
        wait: float = 0,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
        max_failures: int | None = None,
        max_failure_rate: float | None = None,
        limiter: AbstractAsyncContextManager[Any] | None = None,
    ) -> None:
        AsyncNode.__init__(self, max_retries, wait, limiter=limiter)
        self._set_parallel_options(max_concurrency, on_error, max_failures, max_failure_rate)

    async def _exec_item(self, item: Any) -> Any:
        return await AsyncNode._exec(self, item)

    async def _exec(self, items: Any) -> Any:
        result = await self._run_items(self._exec_item, items)
        return result.for_post()


class AsyncFlow(Flow, AsyncNode):
    """A flow that may hold async nodes (run with ``run_async``); sync nodes run inline."""

    async def _orch_async(self, shared: Any, params: dict[str, Any] | None = None) -> Any:
        curr = copy.copy(self.start_node)
        p = params or {**self.params}
        last_action = None
        while curr:
            curr.set_params(p)
            if isinstance(curr, AsyncNode):
                last_action = await curr._run_async(shared)
            else:
                last_action = curr._run(shared)
            curr = copy.copy(self.get_next_node(curr, last_action))
        return last_action

    async def _run_async(self, shared: Any) -> Any:
        prep_res = await self.prep_async(shared)
        orch_res = await self._orch_async(shared)
        return await self.post_async(shared, prep_res, orch_res)

    async def post_async(self, shared: Any, prep_res: Any, exec_res: Any) -> Any:
        return exec_res


class AsyncBatchFlow(AsyncFlow, BatchFlow):
    """Runs the async flow once per params dict from ``prep_async``, one after another."""

    async def _run_async(self, shared: Any) -> Any:
        prep_res = await self.prep_async(shared) or []
        for batch_params in prep_res:
            await self._orch_async(shared, {**self.params, **batch_params})
        return await self.post_async(shared, prep_res, None)


class AsyncParallelBatchFlow(_ParallelOptions, AsyncFlow, BatchFlow):
    """Runs the async flow for many params dicts at once (bounded; see the node variant)."""

    def __init__(
        self,
        start: BaseNode | None = None,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
        max_failures: int | None = None,
        max_failure_rate: float | None = None,
    ) -> None:
        AsyncFlow.__init__(self, start)
        self._set_parallel_options(max_concurrency, on_error, max_failures, max_failure_rate)

    async def _run_async(self, shared: Any) -> Any:
        prep_res = await self.prep_async(shared) or []

        async def run_one(batch_params: dict[str, Any]) -> Any:
            return await self._orch_async(shared, {**self.params, **batch_params})

        await self._run_items(run_one, prep_res)
        return await self.post_async(shared, prep_res, None)


class LLMParallelBatchNode(AsyncParallelBatchNode):
    """A parallel batch node with an LLM client: ``await self.llm.complete(...)`` in
    ``exec_async`` inherits the client's rate limits and retries, and the node's
    ``max_concurrency`` and failure strategy.

    ``await self.ask(prompt)`` does the same with the node's ``response_model``: the
    answer's ``parsed`` is the validated instance, re-asked when invalid.

    Args:
        llm: an :class:`~llmbatch.client.LLMClient`.
        max_retries: node-level attempts per item (default 1: the client retries).
        response_model: the typed answer :meth:`ask` asks for (a pydantic model class,
            a JSON Schema dict...; see :class:`~llmbatch.structured.ResponseSchema`).
        options: the other :class:`AsyncParallelBatchNode` arguments.
    """

    def __init__(
        self,
        llm: Any,
        max_retries: int = 1,
        *,
        response_model: ResponseModel | None = None,
        **options: Any,
    ) -> None:
        super().__init__(max_retries, **options)
        self.llm = llm
        self.response_model = (
            ResponseSchema.of(response_model) if response_model is not None else None
        )

    async def ask(self, prompt: str | Request, **options: Any) -> Response:
        """``self.llm.complete`` of *prompt* (a string, with *options* as
        :meth:`Request.from_prompt <llmbatch.models.Request.from_prompt>` takes them, or a
        Request), asking for the node's ``response_model`` when the request names none."""
        request = Request.from_prompt(prompt, **options) if isinstance(prompt, str) else prompt
        if self.response_model is not None and request.response_model is None:
            request = dataclasses.replace(request, response_model=self.response_model)
        response: Response = await self.llm.complete(request)
        return response
