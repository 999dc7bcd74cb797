"""What happens to a batch when one of its items fails.

Three strategies, chosen per batch with ``on_error=``:

``"fail_fast"`` (:class:`FailFast`, the default, as PocketFlow behaves)
    The first failure aborts the batch: items still in flight are cancelled, pending
    items never start, and :class:`BatchFailed` is raised carrying the first error
    *and* the partial results. A node's ``post`` is never called.
``"collect"`` (:class:`CollectErrors`)
    Every item runs. Failures become :class:`ItemError` records in place, so the
    results stay aligned with the input; ``post`` receives that aligned list.
``"skip"`` (:class:`Skip`)
    Every item runs. ``post`` receives the successful results only (input order);
    :attr:`BatchResult.skipped` says which items were dropped and why.

Collect and skip accept an abort threshold: ``max_failures`` (abort when more than
that many items failed) and ``max_failure_rate`` (abort when the share of failed items
among finished ones exceeds it, once at least ``min_items_for_rate`` have finished).
A :class:`~llmbatch.errors.FatalError` aborts the batch under every strategy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from llmbatch.errors import FatalError, LLMBatchError

__all__ = [
    "AbortReason",
    "BatchFailed",
    "BatchResult",
    "CollectErrors",
    "FailFast",
    "FailureCounts",
    "FailureStrategy",
    "ItemError",
    "OnError",
    "Skip",
    "failure_strategy",
    "finish",
]

T = TypeVar("T")

#: why a batch was aborted (:attr:`BatchFailed.reason`)
AbortReason = Literal["fail_fast", "max_failures", "max_failure_rate", "fatal"]


class OnError(enum.StrEnum):
    """The three failure strategies, by name."""

    FAIL_FAST = "fail_fast"
    COLLECT = "collect"
    SKIP = "skip"


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemError:
    """The record of one item that did not produce a result.

    Args:
        index: position of the item in the input.
        key: the item's key, when the batch was given a ``key=`` function.
        error_type: the exception's class name (``"ValueError"``).
        message: ``str()`` of the exception.
        attempts: how many times the item was tried (1 without retries).
        cancelled: the item was in flight when a fail-fast abort cancelled it.
        exception: the exception itself (not part of equality or repr).
    """

    index: int
    key: str | None = None
    error_type: str
    message: str
    attempts: int = 1
    cancelled: bool = False
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_exception(
        cls, index: int, exc: BaseException, *, key: str | None = None, attempts: int = 1
    ) -> ItemError:
        """Build the record of *exc* raised by the item at *index*."""
        return cls(
            index=index,
            key=key,
            error_type=type(exc).__name__,
            message=str(exc),
            attempts=attempts,
            cancelled=False,
            exception=exc,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form, as written to error records."""
        return {
            "index": self.index,
            "key": self.key,
            "error_type": self.error_type,
            "message": self.message,
            "attempts": self.attempts,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True, slots=True)
class BatchResult(Generic[T]):
    """The outcome of a batch, aligned with its input.

    ``results[i]`` is the value of item *i* or an :class:`ItemError` in its place. After a
    fail-fast abort (see :class:`BatchFailed`) it covers only the items that had started.
    """

    results: list[T | ItemError]
    on_error: OnError = OnError.FAIL_FAST

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[T | ItemError]:
        return iter(self.results)

    @property
    def ok(self) -> list[T]:
        """The successful results, in input order."""
        return [r for r in self.results if not isinstance(r, ItemError)]

    @property
    def errors(self) -> list[ItemError]:
        """Every failed (or cancelled) item, in input order."""
        return [r for r in self.results if isinstance(r, ItemError)]

    @property
    def skipped(self) -> list[ItemError]:
        """The items a ``"skip"`` batch left out of its results (empty under other strategies)."""
        return self.errors if self.on_error is OnError.SKIP else []

    @property
    def succeeded(self) -> int:
        """How many items produced a result."""
        return len(self.results) - self.failed

    @property
    def failed(self) -> int:
        """How many items ended as an :class:`ItemError`."""
        return sum(1 for r in self.results if isinstance(r, ItemError))

    def for_post(self) -> list[Any]:
        """What a batch node's ``post`` receives: aligned, or only the successes under skip."""
        if self.on_error is OnError.SKIP:
            return self.ok
        return list(self.results)


class BatchFailed(LLMBatchError):
    """A batch was aborted; nothing more will run.

    Attributes:
        error: the :class:`ItemError` that caused the abort (the first failure under
            fail-fast, the one that crossed the threshold otherwise).
        reason: ``"fail_fast"``, ``"max_failures"``, ``"max_failure_rate"`` or ``"fatal"``.
        result: the partial :class:`BatchResult` (finished items, errors, and in-flight
            items marked ``cancelled``); ``None`` for streamed batches, whose results
            were already handed out.
    """

    def __init__(
        self,
        error: ItemError,
        *,
        reason: AbortReason,
        result: BatchResult[Any] | None,
        not_started: int | None = None,
    ) -> None:
        self.error = error
        self.reason: AbortReason = reason
        self.result = result
        #: items never started (known when the input has a length)
        self.not_started = not_started
        super().__init__(self._describe())

    def _describe(self) -> str:
        cause = f"{self.error.error_type}: {self.error.message}"
        counts = []
        if self.result is not None:
            counts.append(f"{self.result.succeeded} of {len(self.result)} started items succeeded")
        if self.not_started is not None:
            counts.append(f"{self.not_started} not started")
        tail = f" ({'; '.join(counts)})" if counts else ""
        return f"batch aborted ({self.reason}) at item {self.error.index}: {cause}{tail}"

    def __str__(self) -> str:
        # Computed when shown: in-flight items are marked cancelled after the abort.
        return self._describe()


@dataclass(frozen=True, slots=True)
class FailureCounts:
    """How a batch stands when a strategy is consulted."""

    finished: int
    failed: int


class FailureStrategy:
    """Base of the failure strategies: decides whether a failure aborts the batch.

    Strategies are small frozen values (equal when their settings are equal).
    """

    __slots__ = ()
    on_error: ClassVar[OnError]

    def __call__(self, error: ItemError, counts: FailureCounts) -> AbortReason | None:
        """Return the abort reason, or ``None`` to keep going."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class FailFast(FailureStrategy):
    """Abort the batch at the first failure."""

    on_error: ClassVar[OnError] = OnError.FAIL_FAST

    def __call__(self, error: ItemError, counts: FailureCounts) -> AbortReason | None:
        return "fail_fast"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Tolerant(FailureStrategy):
    max_failures: int | None = None
    max_failure_rate: float | None = None
    min_items_for_rate: int = 20

    def __post_init__(self) -> None:
        if self.max_failures is not None and self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, not {self.max_failures!r}")
        rate = self.max_failure_rate
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"max_failure_rate must be within [0, 1], not {rate!r}")
        if self.min_items_for_rate < 1:
            raise ValueError(f"min_items_for_rate must be >= 1, not {self.min_items_for_rate!r}")

    def __call__(self, error: ItemError, counts: FailureCounts) -> AbortReason | None:
        if self.max_failures is not None and counts.failed > self.max_failures:
            return "max_failures"
        if (
            self.max_failure_rate is not None
            and counts.finished >= self.min_items_for_rate
            and counts.failed / counts.finished > self.max_failure_rate
        ):
            return "max_failure_rate"
        return None


class CollectErrors(_Tolerant):
    """Run every item; failures stay in place as ItemError records."""

    __slots__ = ()
    on_error: ClassVar[OnError] = OnError.COLLECT


class Skip(_Tolerant):
    """Run every item; hand on the successes only and report the skipped ones."""

    __slots__ = ()
    on_error: ClassVar[OnError] = OnError.SKIP


def failure_strategy(
    on_error: OnError | str | FailureStrategy = OnError.FAIL_FAST,
    *,
    max_failures: int | None = None,
    max_failure_rate: float | None = None,
) -> FailureStrategy:
    """Resolve ``on_error=`` (a name or a strategy) and the thresholds into a strategy.

    Raises:
        ValueError: unknown name, or thresholds given with fail-fast (which has none).
    """
    if isinstance(on_error, FailureStrategy):
        if max_failures is not None or max_failure_rate is not None:
            raise ValueError("pass thresholds to the strategy object, not next to it")
        return on_error
    try:
        name = OnError(on_error)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in OnError)
        raise ValueError(f"on_error must be one of {choices}, not {on_error!r}") from None
    if name is OnError.FAIL_FAST:
        if max_failures is not None or max_failure_rate is not None:
            raise ValueError("max_failures/max_failure_rate apply to 'collect' and 'skip' only")
        return FailFast()
    cls = CollectErrors if name is OnError.COLLECT else Skip
    return cls(max_failures=max_failures, max_failure_rate=max_failure_rate)


def finish(
    results: Sequence[T | ItemError], on_error: OnError | str | FailureStrategy
) -> BatchResult[T]:
    """The outcomes of a batch that ran to the end (a Batch API job, prompts that could
    not be built) as a :class:`BatchResult`, judged by the strategy as if the items had
    finished in input order: the first error that makes the strategy abort (any error
    under fail-fast, the one that crosses a threshold otherwise) raises
    :class:`BatchFailed` carrying the whole result.
    """
    strategy = failure_strategy(on_error)
    result = BatchResult(
        list(results),
        on_error=OnError.SKIP if isinstance(strategy, Skip) else OnError.COLLECT,
    )
    failed = 0
    for finished, outcome in enumerate(result.results, start=1):
        if not isinstance(outcome, ItemError):
            continue
        failed += 1
        reason = strategy(outcome, FailureCounts(finished=finished, failed=failed))
        if reason is not None:
            raise BatchFailed(outcome, reason=reason, result=result)
    return result


def is_fatal(exc: BaseException) -> bool:
    """Whether *exc* must stop the whole job whatever the strategy."""
    return isinstance(exc, FatalError)
