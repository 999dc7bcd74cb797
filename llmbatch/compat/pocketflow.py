"""PocketFlow's API on llmbatch: change ``from pocketflow import ...`` to
``from llmbatch.compat.pocketflow import ...`` and the program runs unchanged, with
bounded parallelism and per-item retry state (see :mod:`llmbatch.flow`).

One visible difference: when an item of a parallel batch node fails under the default
fail-fast strategy, the error raised is :class:`llmbatch.BatchFailed` (its ``__cause__``
is the item's original exception) instead of the bare exception.
"""

from llmbatch.flow import (
    AsyncBatchFlow,
    AsyncBatchNode,
    AsyncFlow,
    AsyncNode,
    AsyncParallelBatchFlow,
    AsyncParallelBatchNode,
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
