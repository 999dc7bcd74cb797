"""llmbatch's exceptions, in one tree.

::

    LLMBatchError
    ├── FatalError            stop the whole job whatever the failure policy says
    └── BatchFailed           a batch was aborted (fail-fast, a failure threshold, a fatal error)

Later layers (providers, retry, limits) hang their errors under this root, so that
``except llmbatch.LLMBatchError`` catches everything the library raises on purpose.
"""

from __future__ import annotations

__all__ = ["FatalError", "LLMBatchError"]


class LLMBatchError(Exception):
    """The root of every exception llmbatch raises on purpose."""


class FatalError(LLMBatchError):
    """An error after which no further item can succeed (bad credentials, no quota left).

    The runner aborts the batch on a fatal error under every failure policy, keeping
    what already finished.
    """
