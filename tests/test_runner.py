"""Tests for llmbatch.runner: bounded, ordered, cancellable scheduling with failure policies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from llmbatch.errors import FatalError
from llmbatch.failure import BatchFailed, ItemError, OnError
from llmbatch.runner import Outcome, current_item, run_batch, stream_batch


class Probe:
    """Counts items in flight and records which started and finished."""

    def __init__(self, hold: int = 3) -> None:
        self.hold = hold
        self.in_flight = 0
        self.peak = 0
        self.started: list[int] = []
        self.finished: list[int] = []

    async def __call__(self, item: int) -> int:
        self.started.append(item)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            # Let every other worker run before finishing: exposes the true peak.
            for _ in range(self.hold):
                await asyncio.sleep(0)
            if item % 7 == 3:
                raise ValueError(f"item {item} is bad")
            self.finished.append(item)
            return item * 10
        finally:
            self.in_flight -= 1


async def test_results_keep_input_order_when_items_finish_out_of_order() -> None:
    """Results are aligned with the input although later items finish first."""

    async def slow_for_small(item: int) -> str:
        for _ in range(10 - item):
            await asyncio.sleep(0)
        return f"r{item}"

    result = await run_batch(slow_for_small, range(10), max_concurrency=10)
    assert [f"r{i}" for i in range(10)] == result.results


@pytest.mark.parametrize(("cap", "n"), [(1, 20), (7, 200), (64, 1000), (200, 50)])
async def test_peak_in_flight_equals_the_cap(cap: int, n: int) -> None:
    """The number of items in flight reaches the cap and never exceeds it (workers start
    one per turn of the event loop, so items are held longer than that ramp)."""
    probe = Probe(hold=cap + 3)
    result = await run_batch(probe, range(n), max_concurrency=cap, on_error="collect")
    assert min(cap, n) == probe.peak
    assert n == len(result)


async def test_input_is_consumed_lazily() -> None:
    """The runner pulls items as workers free up; it never drains the input up front."""
    pulled = 0
    seen_when_first_finished: list[int] = []

    def generate() -> Iterator[int]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield i

    async def work(item: int) -> int:
        await asyncio.sleep(0)
        if not seen_when_first_finished:
            seen_when_first_finished.append(pulled)
        return item

    result = await run_batch(work, generate(), max_concurrency=8)
    assert 1 == len(seen_when_first_finished)
    assert 1 <= seen_when_first_finished[0] <= 8  # at most one item per worker pulled
    assert 10_000 == len(result)


@pytest.mark.parametrize("items", [None, [], ()])
async def test_empty_and_none_inputs(items: list[int] | None) -> None:
    """No items gives an empty result and never calls the function."""
    calls: list[int] = []

    async def work(item: int) -> int:
        calls.append(item)
        return item

    result = await run_batch(work, items)
    assert ([], []) == (result.results, calls)


async def test_async_iterable_input() -> None:
    """An async generator is consumed safely by many workers at once."""

    async def agen() -> AsyncIterator[int]:
        for i in range(100):
            await asyncio.sleep(0)
            yield i

    async def double(item: int) -> int:
        await asyncio.sleep(0)
        return 2 * item

    result = await run_batch(double, agen(), max_concurrency=16)
    assert [2 * i for i in range(100)] == result.results


async def test_fail_fast_cancels_siblings_and_keeps_partial_results() -> None:
    """The first failure cancels items in flight, starts no new one, and raises BatchFailed
    carrying the error and the partial results."""
    never = asyncio.Event()
    started: list[int] = []
    completed: list[int] = []

    async def work(item: int) -> int:
        started.append(item)
        if item == 0:
            return 0
        if item == 2:
            await asyncio.sleep(0)
            raise ValueError("boom")
        await never.wait()  # would finish later, if it were not cancelled
        completed.append(item)
        return item

    with pytest.raises(BatchFailed) as info:
        await run_batch(work, range(100), max_concurrency=4)
    failed = info.value
    assert "fail_fast" == failed.reason
    assert ItemError(index=2, error_type="ValueError", message="boom") == failed.error
    assert isinstance(failed.__cause__, ValueError)
    assert [] == completed
    assert failed.result is not None
    # Items start in order, at most 4 at a time plus the one item 0 freed a worker for;
    # none starts after the failure. The partial result covers exactly those started.
    assert list(range(len(failed.result))) == sorted(started)
    assert 3 <= len(started) <= 5
    assert 0 == failed.result.results[0]
    cancelled = [e.index for e in failed.result.errors if e.cancelled]
    assert sorted(set(started) - {0, 2}) == cancelled


async def test_collect_keeps_errors_in_place() -> None:
    """Under collect every item runs; failures are ItemError records at their index."""
    probe = Probe()
    result = await run_batch(probe, range(20), max_concurrency=5, on_error="collect")
    assert [3, 10, 17] == [e.index for e in result.errors]
    assert all(r == i * 10 for i, r in enumerate(result.results) if i not in (3, 10, 17))
    assert "item 10 is bad" == result.results[10].message  # type: ignore[union-attr]
    assert 20 == len(probe.started)


async def test_skip_reports_skipped_items() -> None:
    """Under skip, ok holds the successes and skipped lists what was left out."""
    result = await run_batch(Probe(), range(10), on_error=OnError.SKIP)
    assert [0, 10, 20, 40, 50, 60, 70, 80, 90] == result.for_post()
    assert [3] == [e.index for e in result.skipped]


async def test_item_key_is_recorded_on_errors() -> None:
    """A key function names each failed item on its ItemError."""
    result = await run_batch(Probe(), range(5), on_error="collect", key=lambda item: f"doc-{item}")
    assert ["doc-3"] == [e.key for e in result.errors]


async def test_key_function_failure_is_an_item_error() -> None:
    """A key function that raises fails that item, not the batch."""

    def key(item: int) -> str:
        if item == 1:
            raise KeyError("no id")
        return str(item)

    async def work(item: int) -> int:
        return item

    result = await run_batch(work, range(3), on_error="collect", key=key)
    assert [0, ItemError(index=1, error_type="KeyError", message="'no id'"), 2] == result.results


async def test_max_failures_aborts_collect() -> None:
    """With max_failures=2 the third failure aborts the batch."""
    failing = {1, 4, 6, 9}

    async def work(item: int) -> int:
        if item in failing:
            raise RuntimeError(str(item))
        return item

    with pytest.raises(BatchFailed) as info:
        await run_batch(work, range(20), max_concurrency=1, on_error="collect", max_failures=2)
    assert ("max_failures", 6) == (info.value.reason, info.value.error.index)
    assert info.value.result is not None
    assert 7 == len(info.value.result)  # items 0..6 ran; 7.. never started


async def test_max_failure_rate_aborts_skip() -> None:
    """Once 20 items finished, a failure share above the rate aborts the batch."""

    async def work(item: int) -> int:
        if item % 2:
            raise RuntimeError(str(item))
        return item

    with pytest.raises(BatchFailed) as info:
        await run_batch(work, range(1000), max_concurrency=1, on_error="skip", max_failure_rate=0.4)
    assert ("max_failure_rate", 19) == (info.value.reason, info.value.error.index)


async def test_fatal_error_aborts_even_under_collect() -> None:
    """A FatalError stops the whole job whatever the strategy."""

    async def work(item: int) -> int:
        if item == 3:
            raise FatalError("invalid API key")
        return item

    with pytest.raises(BatchFailed) as info:
        await run_batch(work, range(10), max_concurrency=1, on_error="collect")
    assert "fatal" == info.value.reason
    assert info.value.result is not None
    assert [0, 1, 2] == info.value.result.ok
    assert (
        "batch aborted (fatal) at item 3: FatalError: invalid API key "
        "(3 of 4 started items succeeded; 6 not started)"
    ) == str(info.value)


async def test_input_iterator_error_propagates_and_stops_workers() -> None:
    """An exception raised by the input itself ends the batch with that exception."""
    done: list[int] = []

    def broken() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    async def work(item: int) -> int:
        await asyncio.sleep(0)
        done.append(item)
        return item

    with pytest.raises(OSError, match="disk gone"):
        await run_batch(work, broken(), max_concurrency=2, on_error="collect")
    assert {asyncio.current_task()} == asyncio.all_tasks()


async def test_cancelling_the_caller_cancels_every_worker() -> None:
    """Cancelling the task running a batch leaves no task behind."""
    started = asyncio.Event()
    running: list[int] = []
    cancelled: list[int] = []

    async def work(item: int) -> int:
        running.append(item)
        if len(running) == 5:
            started.set()  # every worker is busy
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(item)
            raise
        return item

    task = asyncio.create_task(run_batch(work, range(1000), max_concurrency=5))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [0, 1, 2, 3, 4] == sorted(cancelled)
    assert {asyncio.current_task()} == asyncio.all_tasks()


@pytest.mark.parametrize("bad", [0, -3])
async def test_max_concurrency_must_be_positive(bad: int) -> None:
    """A cap below 1 is a ValueError, not a hang."""

    async def work(item: int) -> int:
        return item

    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        await run_batch(work, [1], max_concurrency=bad)


async def test_current_item_gives_index_and_key() -> None:
    """Code inside an item sees its own index and key."""

    async def work(item: str) -> tuple[int, str | None]:
        await asyncio.sleep(0)
        ctx = current_item()
        assert ctx is not None
        return ctx.index, ctx.key

    result = await run_batch(work, ["a", "b", "c"], key=str.upper)
    assert [(0, "A"), (1, "B"), (2, "C")] == result.results
    assert current_item() is None


async def test_stream_yields_every_index_once_with_errors_as_outcomes() -> None:
    """A streamed batch yields one Outcome per item, failures included."""
    async with stream_batch(Probe(), range(30), max_concurrency=4, on_error="collect") as outcomes:
        got = [o async for o in outcomes]
    assert list(range(30)) == sorted(o.index for o in got)
    assert [3, 10, 17, 24] == sorted(o.index for o in got if not o.ok)
    assert all(o.value == o.index * 10 for o in got if o.ok)


async def test_stream_plain_async_for_and_fail_fast() -> None:
    """Without ``async with`` the stream still cleans up; fail-fast raises from the loop."""
    got: list[Outcome[int]] = []

    async def consume() -> None:
        async for outcome in stream_batch(Probe(), range(30), max_concurrency=1):
            got.append(outcome)

    with pytest.raises(BatchFailed) as info:
        await consume()
    assert [0, 10, 20] == [o.value for o in got[:3]]
    assert [info.value.error] == [o.value for o in got[3:]]
    assert info.value.result is None
    assert {asyncio.current_task()} == asyncio.all_tasks()


async def test_stream_break_cancels_and_pulls_only_what_it_needs() -> None:
    """Leaving a stream early cancels in-flight items; an endless input is not drained."""
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    async def work(item: int) -> int:
        await asyncio.sleep(0)
        return item

    async with stream_batch(work, endless(), max_concurrency=4) as outcomes:
        seen = 0
        async for _ in outcomes:
            seen += 1
            if seen == 10:
                break
    assert pulled <= 10 + 4 + 4 + 1  # consumed + in flight + queued + one being pulled
    assert {asyncio.current_task()} == asyncio.all_tasks()


async def test_on_result_sees_every_item_as_it_finishes() -> None:
    """on_result receives (index, value or ItemError) for every finished item."""
    seen: list[tuple[int, object]] = []
    result = await run_batch(
        Probe(),
        range(6),
        max_concurrency=2,
        on_error="collect",
        on_result=lambda i, v: seen.append((i, v)),
    )
    assert sorted(i for i, _ in seen) == list(range(6))
    assert dict(seen) == dict(enumerate(result.results))


class Wire:
    """Items that put a request "on the wire" (``request_sent``) and wait for its
    answer, released by the test; item 0 fails fatally once items 1 and 2 are out."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.out: set[int] = set()
        self.both_out = asyncio.Event()
        self.waiting = asyncio.Event()
        self.attempts: dict[int, int] = {}

    async def __call__(self, item: int) -> str:
        ctx = current_item()
        assert ctx is not None
        if item == 0:
            await self.both_out.wait()
            await self.waiting.wait()
            raise FatalError("the key was revoked")
        if item in (1, 2):
            self.attempts[item] = self.attempts.get(item, 0) + 1
            ctx.request_sent()
            self.out.add(item)
            if self.out == {1, 2}:
                self.both_out.set()
            await self.answer.wait()
            if item == 2:
                ctx.request_failed()
                raise ConnectionError("reset while reading the answer")
            return f"answer {item}"
        self.waiting.set()
        await asyncio.Event().wait()  # item 3 waits for a permit that never comes
        raise AssertionError("unreachable")


@pytest.mark.parametrize("on_error", ["collect", "fail_fast"])
async def test_an_abort_lets_requests_at_the_provider_finish_and_keeps_their_answers(
    on_error: str,
) -> None:
    """A fatal error stops the batch: nothing new starts and the item waiting for a
    permit is cancelled, but the requests already at the provider finish. Item 1's
    answer (accepted, maybe billed) is kept; item 2's request fails and is not tried
    again: it ends cut short (``cancelled``), like an item never run, not as failed."""
    wire = Wire()
    batch = asyncio.ensure_future(run_batch(wire, range(6), max_concurrency=4, on_error=on_error))
    await wire.both_out.wait()
    for _ in range(10):  # the abort happens; the requests are still out
        await asyncio.sleep(0)
    assert not batch.done()
    wire.answer.set()
    with pytest.raises(BatchFailed) as info:
        await batch
    assert info.value.reason == "fatal"
    assert info.value.result is not None
    results = info.value.result.results
    assert "answer 1" == results[1]
    assert [(0, "FatalError", False), (2, "CancelledError", True), (3, "CancelledError", True)] == [
        (e.index, e.error_type, e.cancelled) for e in info.value.result.errors
    ]
    stopped = results[2]
    assert isinstance(stopped, ItemError)
    assert "reset while reading the answer" in stopped.message
    assert {1: 1, 2: 1} == wire.attempts
    assert 2 == info.value.not_started


async def test_a_streamed_abort_yields_the_answers_of_requests_at_the_provider() -> None:
    """The same under stream_batch: item 1's answer is yielded before the abort is
    raised; item 2 (failed after the abort) and item 3 (cancelled) are not yielded."""
    wire = Wire()
    seen: list[tuple[int, object]] = []

    async def consume() -> None:
        async with stream_batch(wire, range(6), max_concurrency=4, on_error="collect") as out:
            async for outcome in out:
                seen.append((outcome.index, outcome.value))

    task = asyncio.ensure_future(consume())
    await wire.both_out.wait()
    for _ in range(10):
        await asyncio.sleep(0)
    wire.answer.set()
    with pytest.raises(BatchFailed):
        await task
    assert [0, 1] == sorted(index for index, _ in seen)
    assert (1, "answer 1") in seen


async def test_a_permanent_error_after_the_abort_stays_that_items_error() -> None:
    """A request let finish that the provider rejects as bad (a permanent error) is a
    real failure of that item, recorded as such, not as cut short."""
    from llmbatch.errors import BadRequest

    gate = asyncio.Event()
    out = asyncio.Event()

    async def fn(item: int) -> str:
        ctx = current_item()
        assert ctx is not None
        if item == 0:
            await out.wait()
            raise FatalError("quota")
        ctx.request_sent()
        out.set()
        await gate.wait()
        ctx.request_failed()
        raise BadRequest("the prompt is invalid")

    batch = asyncio.ensure_future(run_batch(fn, range(2), max_concurrency=2, on_error="collect"))
    await out.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    with pytest.raises(BatchFailed) as info:
        await batch
    assert info.value.result is not None
    assert [("FatalError", False), ("BadRequest", False)] == [
        (e.error_type, e.cancelled) for e in info.value.result.errors
    ]
