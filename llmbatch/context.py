"""What the scheduler knows about the item the current task runs: :class:`ItemContext`,
read with :func:`current_item`.

The runner (:mod:`llmbatch.runner`) sets it for each item; code running inside the
item reads it: the retry policy (the attempt number belongs to the item, not to a node
shared by parallel items), the client (a request at the provider is not cancelled by
an abort). A module of its own, below both, so that policies can read it without
importing the scheduler.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["ItemContext", "current_item", "enter_item"]


@dataclass(slots=True)
class ItemContext:
    """What the runner knows about the item the current task is working on.

    Attributes:
        index: the item's position in the input.
        key: the item's key (``key=`` function), or ``None``.
        attempts: the number of the attempt in progress, counted from 1; retry loops
            running inside the item update it.
        in_request: a request of this item reached the provider (or is on its way) and
            its answer is not handed back yet: an abort waits for it rather than
            throw away work the provider accepted (see :meth:`request_sent`).
        stopping: the batch was aborted while this item's request was out: let that
            request finish, but start no further attempt or call.
    """

    index: int = -1
    key: str | None = None
    attempts: int = 1
    in_request: bool = False
    stopping: bool = False

    def request_sent(self) -> None:
        """Mark that a request of this item is at the provider. Call it right before
        sending; call :meth:`request_failed` if the attempt fails. After a successful
        answer the mark stays until the item ends, so that an abort lets the item
        hand its (paid) answer back."""
        self.in_request = True

    def request_failed(self) -> None:
        """The request marked by :meth:`request_sent` failed: nothing to keep."""
        self.in_request = False


_CURRENT: ContextVar[ItemContext | None] = ContextVar("llmbatch_current_item", default=None)


def current_item() -> ItemContext | None:
    """The :class:`ItemContext` of the item being run by this task, if any."""
    return _CURRENT.get()


def enter_item(context: ItemContext) -> None:
    """Make *context* the current item of this task (the runner does, per worker)."""
    _CURRENT.set(context)
