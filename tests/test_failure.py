"""Tests for llmbatch.failure: strategies, thresholds and result records."""

from __future__ import annotations

from typing import Any

import pytest

from llmbatch.failure import (
    BatchFailed,
    BatchResult,
    CollectErrors,
    FailFast,
    FailureCounts,
    FailureStrategy,
    ItemError,
    OnError,
    Skip,
    failure_strategy,
    finish,
)


def _error(index: int) -> ItemError:
    return ItemError.from_exception(index, ValueError(f"bad {index}"))


@pytest.mark.parametrize(
    ("on_error", "kwargs", "expected"),
    [
        ("fail_fast", {}, FailFast()),
        (OnError.COLLECT, {}, CollectErrors()),
        ("collect", {"max_failures": 3}, CollectErrors(max_failures=3)),
        ("skip", {"max_failure_rate": 0.5}, Skip(max_failure_rate=0.5)),
    ],
)
def test_failure_strategy_resolves_names(
    on_error: str, kwargs: dict[str, Any], expected: object
) -> None:
    """Names and thresholds resolve to equal strategy objects."""
    assert expected == failure_strategy(on_error, **kwargs)


@pytest.mark.parametrize(
    ("on_error", "kwargs", "message"),
    [
        ("explode", {}, "on_error must be one of"),
        ("fail_fast", {"max_failures": 1}, "apply to 'collect' and 'skip' only"),
        (Skip(), {"max_failures": 1}, "pass thresholds to the strategy object"),
    ],
)
def test_failure_strategy_rejects_bad_input(
    on_error: object, kwargs: dict[str, int], message: str
) -> None:
    """Unknown names and misplaced thresholds are a clear ValueError."""
    with pytest.raises(ValueError, match=message):
        failure_strategy(on_error, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_failures": -1}, "max_failures must be >= 0"),
        ({"max_failure_rate": 1.5}, "max_failure_rate must be within"),
        ({"min_items_for_rate": 0}, "min_items_for_rate must be >= 1"),
    ],
)
def test_thresholds_are_validated(kwargs: dict[str, float], message: str) -> None:
    """Out-of-range thresholds are refused when the strategy is built."""
    with pytest.raises(ValueError, match=message):
        CollectErrors(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("strategy", "finished", "failed", "expected"),
    [
        (FailFast(), 1, 1, "fail_fast"),
        (CollectErrors(), 100, 100, None),
        (CollectErrors(max_failures=2), 10, 2, None),
        (CollectErrors(max_failures=2), 10, 3, "max_failures"),
        (Skip(max_failures=0), 1, 1, "max_failures"),
        (Skip(max_failure_rate=0.5), 19, 19, None),  # below min_items_for_rate
        (Skip(max_failure_rate=0.5), 20, 10, None),
        (Skip(max_failure_rate=0.5), 20, 11, "max_failure_rate"),
        (CollectErrors(max_failure_rate=0.1, min_items_for_rate=1), 1, 1, "max_failure_rate"),
    ],
)
def test_strategy_decisions(
    strategy: object, finished: int, failed: int, expected: str | None
) -> None:
    """Each strategy aborts exactly when its threshold is crossed."""
    assert expected == strategy(_error(0), FailureCounts(finished, failed))  # type: ignore[operator]


def test_strategy_repr_and_hash() -> None:
    """Strategies print their thresholds and are hashable values."""
    assert "CollectErrors(max_failures=2, max_failure_rate=None, min_items_for_rate=20)" == repr(
        CollectErrors(max_failures=2)
    )
    assert "FailFast()" == repr(FailFast())
    assert len({Skip(), Skip(), CollectErrors()}) == 2
    skip: FailureStrategy = Skip()
    assert skip != CollectErrors()  # same settings, different strategies


def test_item_error_from_exception_and_to_dict() -> None:
    """An ItemError records the exception's type, text and attempts; the exception itself
    is kept but left out of equality."""
    exc = KeyError("doc-7")
    error = ItemError.from_exception(4, exc, key="doc-7", attempts=3)
    assert error.exception is exc
    assert error == ItemError(
        index=4, key="doc-7", error_type="KeyError", message="'doc-7'", attempts=3
    )
    assert {
        "index": 4,
        "key": "doc-7",
        "error_type": "KeyError",
        "message": "'doc-7'",
        "attempts": 3,
        "cancelled": False,
    } == error.to_dict()


@pytest.mark.parametrize(
    ("on_error", "for_post", "skipped"),
    [
        (OnError.COLLECT, ["a", _error(1), "c"], []),
        (OnError.SKIP, ["a", "c"], [_error(1)]),
        (OnError.FAIL_FAST, ["a", _error(1), "c"], []),
    ],
)
def test_batch_result_views(
    on_error: OnError, for_post: list[object], skipped: list[ItemError]
) -> None:
    """BatchResult keeps alignment and offers ok/errors/skipped/for_post views."""
    result: BatchResult[str] = BatchResult(["a", _error(1), "c"], on_error)
    assert ["a", "c"] == result.ok
    assert [_error(1)] == result.errors
    assert skipped == result.skipped
    assert for_post == result.for_post()
    assert (2, 1, 3) == (result.succeeded, result.failed, len(result))
    assert ["a", _error(1), "c"] == list(result)


def test_batch_failed_message_names_the_item_and_progress() -> None:
    """BatchFailed's text says why, which item, and how much had succeeded."""
    partial: BatchResult[str] = BatchResult(["ok", _error(1)], OnError.FAIL_FAST)
    exc = BatchFailed(_error(1), reason="fail_fast", result=partial)
    assert (
        "batch aborted (fail_fast) at item 1: ValueError: bad 1 (1 of 2 started items succeeded)"
        == str(exc)
    )
    assert exc.result is partial
    streamed = BatchFailed(_error(5), reason="max_failures", result=None)
    assert "batch aborted (max_failures) at item 5: ValueError: bad 5" == str(streamed)


def _outcomes(pattern: str) -> list[Any]:
    """``"ok x ok"`` -> results with an ItemError where ``x`` is."""
    return [
        ItemError(index=i, key=None, error_type="BadRequest", message=f"bad {i}")
        if kind == "x"
        else f"answer {i}"
        for i, kind in enumerate(pattern.split())
    ]


@pytest.mark.parametrize(
    ("pattern", "on_error", "aborted_at", "reason"),
    [
        ("ok ok ok", "fail_fast", None, None),
        ("ok x ok x", "fail_fast", 1, "fail_fast"),
        ("ok x ok x", "collect", None, None),
        ("ok x ok x", CollectErrors(max_failures=1), 3, "max_failures"),
        ("x ok x ok", Skip(max_failures=5), None, None),
        ("ok x x x", Skip(max_failure_rate=0.5, min_items_for_rate=2), 2, "max_failure_rate"),
    ],
)
def test_finish_judges_a_finished_batch_by_its_strategy(
    pattern: str, on_error: Any, aborted_at: int | None, reason: str | None
) -> None:
    """A batch that ran to the end (a Batch API job) is judged as if its items had
    finished in input order: the error where the strategy aborts raises BatchFailed
    carrying every result; otherwise the result comes back whole."""
    outcomes = _outcomes(pattern)
    if aborted_at is None:
        result = finish(outcomes, on_error)
        assert outcomes == result.results
        assert pattern.split().count("x") == result.failed
        return
    with pytest.raises(BatchFailed) as caught:
        finish(outcomes, on_error)
    assert (aborted_at, reason) == (caught.value.error.index, caught.value.reason)
    assert caught.value.result is not None
    assert outcomes == caught.value.result.results


def test_finish_under_skip_hands_on_the_successes_only() -> None:
    result = finish(_outcomes("ok x ok"), "skip")
    assert ["answer 0", "answer 2"] == result.for_post()
    assert [1] == [e.index for e in result.skipped]
