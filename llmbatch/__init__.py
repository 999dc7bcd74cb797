"""llmbatch: run thousands to millions of LLM calls as fast as a provider's limits allow.

The public API is what ``__all__`` lists; import it from ``llmbatch`` or from a public
submodule (``llmbatch.flow``, ``llmbatch.runner``, ``llmbatch.failure``,
``llmbatch.testing``, ``llmbatch.compat.pocketflow``).
"""

from llmbatch.client import LLMClient, map
from llmbatch.errors import (
    AuthenticationFailed,
    BadRequest,
    BatchExpired,
    ConnectionFailed,
    ContentFiltered,
    ContextLengthExceeded,
    FatalError,
    LLMBatchError,
    NotFound,
    PermanentError,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    RequestTooLarge,
    Timeout,
    TransientError,
)
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
    LLMParallelBatchNode,
    Node,
)
from llmbatch.limits import Limits, RateLimiter, get_limiter
from llmbatch.models import Embedding, EmbeddingRequest, Request, Response, Usage
from llmbatch.retry import RetryPolicy
from llmbatch.runner import BatchStream, Outcome, current_item, run_batch, stream_batch

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncBatchFlow",
    "AsyncBatchNode",
    "AsyncFlow",
    "AsyncNode",
    "AsyncParallelBatchFlow",
    "AsyncParallelBatchNode",
    "AuthenticationFailed",
    "BadRequest",
    "BaseNode",
    "BatchExpired",
    "BatchFailed",
    "BatchFlow",
    "BatchNode",
    "BatchResult",
    "BatchStream",
    "CollectErrors",
    "ConnectionFailed",
    "ContentFiltered",
    "ContextLengthExceeded",
    "Embedding",
    "EmbeddingRequest",
    "FailFast",
    "FailureStrategy",
    "FatalError",
    "Flow",
    "ItemError",
    "LLMBatchError",
    "LLMClient",
    "LLMParallelBatchNode",
    "Limits",
    "Node",
    "NotFound",
    "OnError",
    "Outcome",
    "PermanentError",
    "ProviderUnavailable",
    "QuotaExhausted",
    "RateLimited",
    "RateLimiter",
    "Request",
    "RequestTooLarge",
    "Response",
    "RetryPolicy",
    "Skip",
    "Timeout",
    "TransientError",
    "Usage",
    "__version__",
    "current_item",
    "get_limiter",
    "map",
    "run_batch",
    "stream_batch",
]
