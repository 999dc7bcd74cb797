"""PocketFlow's API on llmbatch: change ``from pocketflow import ...`` to
``from llmbatch.compat.pocketflow import ...`` and the program runs unchanged, with
bounded parallelism and per-item retry state (see :mod:`llmbatch.flow`).

Every name is :mod:`llmbatch.flow`'s class, except the two parallel variants, which
differ in one thing: what a failure raises. In PocketFlow, a failing item of an
``AsyncParallelBatchNode`` or ``AsyncParallelBatchFlow`` raises its own exception out of
``asyncio.gather``, so PocketFlow programs catch it by its type (``except ValueError``).
The classes here do the same: under the default fail-fast strategy the first item to fail
raises its own exception (``llmbatch.flow`` raises :class:`~llmbatch.failure.BatchFailed`
instead). What is kept from llmbatch:

* the siblings still running are cancelled and the items not yet started never start
  (PocketFlow lets them run on, unobserved);
* the work that finished is not lost: the exception carries the partial
  :class:`~llmbatch.failure.BatchResult` as ``exc.batch_result`` (values of the items
  that finished, :class:`~llmbatch.failure.ItemError` records for the failed and the
  cancelled ones), and a note (:pep:`678`, shown under the traceback) that says which
  item failed and how many succeeded, were cancelled and never started. When parallel
  batches nest, each adds its note and ``batch_result`` is the outermost batch's.

A :class:`~llmbatch.errors.FatalError` raised by an item (bad credentials, no quota)
stops the batch under every strategy and is raised the same way. A batch aborted by a
threshold PocketFlow does not have (``max_failures`` / ``max_failure_rate`` with
``on_error="collect"`` or ``"skip"``) failed because of no single item: it raises
:class:`~llmbatch.failure.BatchFailed`, as :mod:`llmbatch.flow` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import llmbatch.flow
from llmbatch.failure import BatchFailed, BatchResult
from llmbatch.flow import (
    AsyncBatchFlow,
    AsyncBatchNode,
    AsyncFlow,
    AsyncNode,
    BaseNode,
    BatchFlow,
    BatchNode,
    Flow,
    Node,
)

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
    "Node",
]

#: abort reasons that name one item's exception as the cause (the others are thresholds)
_ITEM_REASONS = ("fail_fast", "fatal")


def _as_pocketflow_raises(failed: BatchFailed, where: str) -> BaseException:
    """What a PocketFlow program sees for *failed*: the failing item's own exception,
    carrying the partial results and a note; or *failed* itself after a threshold abort."""
    exc = failed.error.exception
    if exc is None or failed.reason not in _ITEM_REASONS:
        return failed
    result = failed.result
    counts: list[str] = []
    if result is not None:
        counts.append(f"succeeded: {result.succeeded}")
        counts.append(f"cancelled: {sum(1 for e in result.errors if e.cancelled)}")
    if failed.not_started is not None:
        counts.append(f"not started: {failed.not_started}")
    note = (
        f"llmbatch: item {failed.error.index} of {where}'s batch failed first "
        f"({', '.join(counts)}); the partial results are in this exception's batch_result"
    )
    # An exception class may refuse new attributes (a frozen dataclass): it is raised
    # all the same, without them.
    with contextlib.suppress(AttributeError):
        exc.add_note(note)
    with contextlib.suppress(AttributeError):
        exc.batch_result = result  # type: ignore[attr-defined]
    return exc


class AsyncParallelBatchNode(llmbatch.flow.AsyncParallelBatchNode):
    """:class:`llmbatch.flow.AsyncParallelBatchNode` whose fail-fast abort raises the
    failing item's own exception, as PocketFlow's does (see the module docstring)."""

    async def _run_items(self, fn: Callable[[Any], Awaitable[Any]], items: Any) -> BatchResult[Any]:
        try:
            return await super()._run_items(fn, items)
        except BatchFailed as failed:
            error = _as_pocketflow_raises(failed, type(self).__name__)
        # raised outside the except block, so that it is not chained to BatchFailed
        raise error


class AsyncParallelBatchFlow(llmbatch.flow.AsyncParallelBatchFlow):
    """:class:`llmbatch.flow.AsyncParallelBatchFlow` whose fail-fast abort raises the
    exception of the failing run, as PocketFlow's does (see the module docstring)."""

    async def _run_items(self, fn: Callable[[Any], Awaitable[Any]], items: Any) -> BatchResult[Any]:
        try:
            return await super()._run_items(fn, items)
        except BatchFailed as failed:
            error = _as_pocketflow_raises(failed, type(self).__name__)
        raise error
