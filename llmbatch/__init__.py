"""llmbatch: run thousands to millions of LLM calls as fast as a provider's limits allow.

The public API is what ``__all__`` lists; import it from ``llmbatch`` or from a public
submodule (``llmbatch.flow``, ``llmbatch.runner``, ``llmbatch.failure``,
``llmbatch.testing``, ``llmbatch.compat.pocketflow``).
"""

from llmbatch.errors import FatalError, LLMBatchError
from llmbatch.failure import (
    BatchFailed,
    BatchResult,
    CollectErrors,
    FailFast,
    FailureStrategy,
    ItemError,
    OnError,
    Skip,
)
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
from llmbatch.runner import BatchStream, Outcome, current_item, run_batch, stream_batch

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncBatchFlow",
    "AsyncBatchNode",
    "AsyncFlow",
    "AsyncNode",
    "AsyncParallelBatchFlow",
    "AsyncParallelBatchNode",
    "BaseNode",
    "BatchFailed",
    "BatchFlow",
    "BatchNode",
    "BatchResult",
    "BatchStream",
    "CollectErrors",
    "FailFast",
    "FailureStrategy",
    "FatalError",
    "Flow",
    "ItemError",
    "LLMBatchError",
    "Node",
    "OnError",
    "Outcome",
    "Skip",
    "__version__",
    "current_item",
    "run_batch",
    "stream_batch",
]
