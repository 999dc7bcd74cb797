"""Tests for llmbatch.flow: PocketFlow's semantics, and the parallel variants' additions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiolimiter import AsyncLimiter

from llmbatch.failure import BatchFailed, ItemError
from llmbatch.flow import (
    AsyncBatchFlow,
    AsyncBatchNode,
    AsyncFlow,
    AsyncNode,
    AsyncParallelBatchFlow,
    AsyncParallelBatchNode,
    BatchFlow,
    BatchNode,
    Flow,
    Node,
)
from llmbatch.testing.clock import FakeClock

Shared = dict[str, Any]


class Add(Node):
    """Adds ``params['n']`` (or its constructor amount) to ``shared['value']``."""

    def __init__(self, amount: int = 0, action: str | None = None) -> None:
        super().__init__()
        self.amount = amount
        self.action = action

    def prep(self, shared: Shared) -> int:
        return int(shared.get("value", 0))

    def exec(self, prep_res: int) -> int:
        return prep_res + int(self.params.get("n", self.amount))

    def post(self, shared: Shared, prep_res: int, exec_res: int) -> str | None:
        shared["value"] = exec_res
        shared.setdefault("trail", []).append(exec_res)
        return self.action


class Branch(Node):
    """Returns ``"even"`` or ``"odd"`` by ``shared['value']``."""

    def post(self, shared: Shared, prep_res: Any, exec_res: Any) -> str:
        return "even" if shared["value"] % 2 == 0 else "odd"


# -- wiring and actions ---------------------------------------------------------------


def test_rshift_wires_default_and_returns_the_target() -> None:
    """``a >> b`` sets b as a's default successor and returns b, so chains read left to right."""
    a, b, c = Add(1), Add(2), Add(3)
    assert c is (a >> b >> c)
    assert {"default": b} == a.successors
    assert {"default": c} == b.successors


def test_conditional_transition_and_non_string_action() -> None:
    """``a - "x" >> b`` wires action "x"; a non-string action is a TypeError."""
    a, b = Add(1), Add(2)
    a - "x" >> b
    assert {"x": b} == a.successors
    with pytest.raises(TypeError, match="Action must be a string"):
        a - 3  # type: ignore[operator]


def test_overwriting_a_successor_warns() -> None:
    """Wiring the same action twice warns with PocketFlow's text."""
    a = Add(1)
    a >> Add(2)
    with pytest.warns(UserWarning, match="Overwriting successor for action 'default'"):
        a >> Add(3)


def test_flow_follows_actions_and_returns_the_last_action() -> None:
    """A flow branches on post's return value and returns the final action."""
    start = Add(1)
    branch = Branch()
    even_end = Add(100, action="done-even")
    odd_end = Add(1000, action="done-odd")
    start >> branch
    branch - "even" >> even_end
    branch - "odd" >> odd_end
    shared: Shared = {"value": 1}
    assert "done-even" == Flow(start=start).run(shared)
    assert 102 == shared["value"]
    shared = {"value": 2}
    assert "done-odd" == Flow(start=start).run(shared)
    assert 1003 == shared["value"]


def test_flow_ends_with_a_warning_on_an_unknown_action() -> None:
    """An action with no successor ends the flow with PocketFlow's warning."""
    a = Add(1, action="nowhere")
    a - "somewhere" >> Add(2)
    shared: Shared = {}
    with pytest.warns(UserWarning, match=r"Flow ends: 'nowhere' not found in \['somewhere'\]"):
        assert "nowhere" == Flow(a).run(shared)
    assert [1] == shared["trail"]


def test_running_a_node_with_successors_warns() -> None:
    """``node.run`` runs that node only and warns that successors are ignored."""
    a = Add(5)
    a >> Add(1)
    shared: Shared = {}
    with pytest.warns(UserWarning, match=r"Node won't run successors\. Use Flow\."):
        a.run(shared)
    assert [5] == shared["trail"]


def test_flow_start_method_and_nesting() -> None:
    """``Flow.start`` sets the start node; a flow is a node inside another flow."""
    inner = Flow()
    inner.start(Add(1)) >> Add(2)
    outer = Flow(start=Add(10))
    outer.start_node >> inner >> Add(100)  # type: ignore[operator]
    shared: Shared = {}
    outer.run(shared)
    assert [10, 11, 13, 113] == shared["trail"]


def test_flow_runs_shallow_copies_of_its_nodes() -> None:
    """State a node sets during a run lands on a copy, not on the wired node."""

    class Remember(Node):
        def exec(self, prep_res: Any) -> None:
            self.seen = True

    node = Remember()
    Flow(node).run({})
    assert not hasattr(node, "seen")


def test_flow_params_reach_every_node() -> None:
    """A flow's params are set on each node it runs."""
    flow = Flow(Add())
    flow.start_node >> Add()  # type: ignore[operator]
    flow.set_params({"n": 7})
    shared: Shared = {}
    flow.run(shared)
    assert [7, 14] == shared["trail"]


def test_batch_flow_merges_params_per_item() -> None:
    """BatchFlow runs once per params dict, merged over the flow's own params."""

    class Record(Node):
        def post(self, shared: Shared, prep_res: Any, exec_res: Any) -> None:
            shared.setdefault("seen", []).append(dict(self.params))

    class Files(BatchFlow):
        def prep(self, shared: Shared) -> list[dict[str, Any]]:
            return [{"file": "a"}, {"file": "b", "mode": "override"}]

    flow = Files(Record())
    flow.set_params({"mode": "base", "user": "u1"})
    shared: Shared = {}
    flow.run(shared)
    assert [
        {"mode": "base", "user": "u1", "file": "a"},
        {"mode": "override", "user": "u1", "file": "b"},
    ] == shared["seen"]


def test_batch_flow_with_no_params_runs_nothing() -> None:
    """A BatchFlow whose prep returns None runs the flow zero times."""
    shared: Shared = {}
    BatchFlow(Add(1)).run(shared)
    assert {} == shared


# -- retries and fallback --------------------------------------------------------------


class Flaky(Node):
    """Fails until its ``fail_times`` attempts are used up."""

    def __init__(self, fail_times: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_times = fail_times
        self.attempts: list[int] = []

    def exec(self, prep_res: Any) -> str:
        self.attempts.append(self.cur_retry)
        if len(self.attempts) <= self.fail_times:
            raise ConnectionError(f"attempt {self.cur_retry}")
        return "ok"

    def post(self, shared: Shared, prep_res: Any, exec_res: Any) -> None:
        shared["result"] = exec_res


def test_sync_retries_until_success_with_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """exec is retried with ``cur_retry`` counting attempts and ``wait`` between them."""
    slept: list[float] = []
    monkeypatch.setattr(Node, "_sleep", staticmethod(slept.append))
    node = Flaky(2, max_retries=3, wait=1.5)
    shared: Shared = {}
    node.run(shared)
    assert ([0, 1, 2], [1.5, 1.5], "ok") == (node.attempts, slept, shared["result"])


def test_sync_fallback_after_the_last_attempt() -> None:
    """When every attempt fails, exec_fallback receives the last exception."""

    class WithFallback(Flaky):
        def exec_fallback(self, prep_res: Any, exc: Exception) -> str:
            return f"fallback: {exc}"

    node = WithFallback(5, max_retries=2)
    shared: Shared = {}
    node.run(shared)
    assert "fallback: attempt 1" == shared["result"]


def test_sync_default_fallback_reraises() -> None:
    """Without a fallback the last exception propagates."""
    with pytest.raises(ConnectionError, match="attempt 0"):
        Flaky(1).run({})


def test_batch_node_runs_exec_per_item_in_order() -> None:
    """BatchNode calls exec once per item; None items give an empty list."""

    class Upper(BatchNode):
        def prep(self, shared: Shared) -> Any:
            return shared.get("words")

        def exec(self, word: str) -> str:
            return word.upper()

        def post(self, shared: Shared, prep_res: Any, exec_res: list[str]) -> None:
            shared["out"] = exec_res

    shared: Shared = {"words": ["a", "b"]}
    Upper().run(shared)
    assert ["A", "B"] == shared["out"]
    shared = {}
    Upper().run(shared)
    assert [] == shared["out"]


# -- async ----------------------------------------------------------------------------


class AsyncAdd(AsyncNode):
    def __init__(self, amount: int, action: str | None = None) -> None:
        super().__init__()
        self.amount = amount
        self.action = action

    async def prep_async(self, shared: Shared) -> int:
        return int(shared.get("value", 0))

    async def exec_async(self, prep_res: int) -> int:
        await asyncio.sleep(0)
        return prep_res + self.amount

    async def post_async(self, shared: Shared, prep_res: int, exec_res: int) -> str | None:
        shared["value"] = exec_res
        return self.action


async def test_async_flow_mixes_async_and_sync_nodes() -> None:
    """An AsyncFlow awaits async nodes and runs sync ones inline; returns the last action."""
    start = AsyncAdd(1)
    start >> Add(10) >> AsyncAdd(100, action="end")
    shared: Shared = {}
    assert "end" == await AsyncFlow(start).run_async(shared)
    assert 111 == shared["value"]


async def test_async_node_refuses_sync_run() -> None:
    """Calling run() on an async node is a RuntimeError."""
    with pytest.raises(RuntimeError, match=r"Use run_async\."):
        AsyncAdd(1).run({})


async def test_async_node_with_successors_warns() -> None:
    """run_async on a wired async node warns that successors are ignored."""
    node = AsyncAdd(1)
    node >> AsyncAdd(2)
    with pytest.warns(UserWarning, match=r"Node won't run successors\. Use AsyncFlow\."):
        await node.run_async({})


async def test_async_retries_wait_on_the_event_loop_clock() -> None:
    """Async retries sleep ``wait`` seconds between attempts (virtual time here)."""

    class AsyncFlaky(AsyncNode):
        attempts: list[int]

        async def exec_async(self, prep_res: Any) -> str:
            self.attempts.append(self.cur_retry)
            if len(self.attempts) < 3:
                raise TimeoutError("slow")
            return "ok"

        async def post_async(self, shared: Shared, prep_res: Any, exec_res: Any) -> None:
            shared["result"] = exec_res

    clock = FakeClock()
    node = AsyncFlaky(max_retries=3, wait=30)
    node.attempts = []
    shared: Shared = {}
    with clock.patch_loop():
        await node.run_async(shared)
    assert ([0, 1, 2], "ok", 60.0) == (node.attempts, shared["result"], clock.time())


async def test_async_fallback() -> None:
    """exec_fallback_async decides the result after the last failed attempt."""

    class Fallback(AsyncNode):
        async def exec_async(self, prep_res: Any) -> str:
            raise ValueError("nope")

        async def exec_fallback_async(self, prep_res: Any, exc: Exception) -> str:
            return f"fallback: {exc}"

        async def post_async(self, shared: Shared, prep_res: Any, exec_res: Any) -> None:
            shared["result"] = exec_res

    shared: Shared = {}
    await Fallback(max_retries=2).run_async(shared)
    assert "fallback: nope" == shared["result"]


class Square(AsyncBatchNode):
    async def prep_async(self, shared: Shared) -> Any:
        return shared.get("numbers")

    async def exec_async(self, n: int) -> int:
        await asyncio.sleep(0)
        return n * n

    async def post_async(self, shared: Shared, prep_res: Any, exec_res: list[int]) -> None:
        shared["squares"] = exec_res


async def test_async_batch_node_sequential() -> None:
    """AsyncBatchNode runs items one after another; None gives an empty list."""
    shared: Shared = {"numbers": [1, 2, 3]}
    await Square().run_async(shared)
    assert [1, 4, 9] == shared["squares"]
    shared = {}
    await Square().run_async(shared)
    assert [] == shared["squares"]


class Tracked(AsyncParallelBatchNode):
    """Records peak concurrency; items listed in ``bad`` fail."""

    def __init__(self, bad: frozenset[int] = frozenset(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad = bad
        self.in_flight = 0
        self.peak = 0
        self.completed: list[int] = []

    async def prep_async(self, shared: Shared) -> Any:
        return shared.get("items")

    async def exec_async(self, item: int) -> int:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for _ in range(item % 4 + 1):
                await asyncio.sleep(0)
            if item in self.bad:
                raise ValueError(f"bad item {item}")
            self.completed.append(item)
            return item * 2
        finally:
            self.in_flight -= 1

    async def post_async(self, shared: Shared, prep_res: Any, exec_res: Any) -> str:
        shared["out"] = exec_res
        shared["batch_result"] = self.batch_result
        return "done"


async def test_parallel_node_keeps_order_and_caps_concurrency() -> None:
    """Results come back in input order; peak in-flight equals max_concurrency."""
    node = Tracked(max_concurrency=5)
    shared: Shared = {"items": list(range(50))}
    assert "done" == await node.run_async(shared)
    assert [i * 2 for i in range(50)] == shared["out"]
    assert 5 == node.peak


class Barrier(Tracked):
    """Every item waits until *count* items are in flight at once."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.all_in = asyncio.Event()

    async def exec_async(self, item: int) -> int:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.in_flight == self.count:
            self.all_in.set()
        try:
            await self.all_in.wait()
            return item * 2
        finally:
            self.in_flight -= 1


async def test_parallel_node_default_cap_is_generous() -> None:
    """The default cap (64) lets a 40-item batch run fully in parallel, like PocketFlow:
    40 items that each wait for all the others finish (a lower cap would never get there)."""
    node = Barrier(40)
    async with asyncio.timeout(5):
        await node.run_async({"items": list(range(40))})
    assert (64, 40) == (node.max_concurrency, node.peak)


async def test_parallel_node_fail_fast_never_calls_post() -> None:
    """Fail-fast raises BatchFailed with partial results; post is not called."""
    node = Tracked(bad=frozenset({5}), max_concurrency=3)
    shared: Shared = {"items": list(range(100))}
    with pytest.raises(BatchFailed) as info:
        await node.run_async(shared)
    assert "out" not in shared
    assert 5 == info.value.error.index
    assert info.value.result is not None
    assert len(info.value.result) < 100
    assert all(i < len(info.value.result) for i in node.completed)


async def test_parallel_node_collect_gives_post_an_aligned_list() -> None:
    """Under collect, post receives results aligned with input, ItemError in place."""
    node = Tracked(bad=frozenset({1, 3}), on_error="collect")
    shared: Shared = {"items": [0, 1, 2, 3]}
    await node.run_async(shared)
    out = shared["out"]
    assert [0, 4] == [out[0], out[2]]
    assert [ItemError(index=1, error_type="ValueError", message="bad item 1")] == [out[1]]
    assert isinstance(out[3], ItemError)


async def test_parallel_node_skip_gives_post_successes_and_the_skipped_list() -> None:
    """Under skip, post receives successes only; self.batch_result.skipped names the rest."""
    node = Tracked(bad=frozenset({1, 3}), on_error="skip")
    shared: Shared = {"items": [0, 1, 2, 3, 4]}
    await node.run_async(shared)
    assert [0, 4, 8] == shared["out"]
    assert [1, 3] == [e.index for e in shared["batch_result"].skipped]


async def test_parallel_node_threshold_aborts_collect() -> None:
    """max_failures turns collect into an abort once crossed."""
    node = Tracked(bad=frozenset({0, 1, 2}), on_error="collect", max_failures=1, max_concurrency=1)
    with pytest.raises(BatchFailed, match="max_failures"):
        await node.run_async({"items": [0, 1, 2, 3]})


async def test_parallel_retry_state_is_per_item() -> None:
    """Each item counts its own attempts although items interleave on one node."""

    class PerItem(AsyncParallelBatchNode):
        def __init__(self) -> None:
            super().__init__(max_retries=4, max_concurrency=10)
            self.log: dict[int, list[int]] = {}

        async def exec_async(self, item: int) -> int:
            self.log.setdefault(item, []).append(self.cur_retry)
            await asyncio.sleep(0)  # let siblings run between reading and failing
            if self.cur_retry < item % 4:
                raise ConnectionError("transient")
            return self.cur_retry

    node = PerItem()
    result = await node._exec(list(range(12)))
    assert [i % 4 for i in range(12)] == result
    assert {i: list(range(i % 4 + 1)) for i in range(12)} == node.log


async def test_item_error_reports_attempts_of_that_item() -> None:
    """An item that exhausts its retries reports how many attempts it made."""

    class AlwaysFails(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            await asyncio.sleep(0)
            raise RuntimeError(f"no {item}")

    node = AlwaysFails(max_retries=3, on_error="collect")
    await node._exec([1, 2])
    assert node.batch_result is not None
    assert [3, 3] == [e.attempts for e in node.batch_result.errors]


async def test_parallel_node_limiter_wraps_every_attempt() -> None:
    """A limiter passed to the node is entered around every exec attempt."""

    class CountingGate:
        def __init__(self) -> None:
            self.entered = 0

        async def __aenter__(self) -> None:
            self.entered += 1

        async def __aexit__(self, *exc: object) -> None:
            return None

    gate = CountingGate()

    class Retry(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            if self.cur_retry == 0:
                raise ConnectionError("first attempt fails")
            return item

    node = Retry(max_retries=2, limiter=gate)
    assert [1, 2, 3] == await node._exec([1, 2, 3])
    assert 6 == gate.entered


async def test_parallel_node_with_aiolimiter_on_virtual_time() -> None:
    """An aiolimiter AsyncLimiter paces the items (2 per second: 6 items take 2 s more)."""

    class Echo(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            return item

    clock = FakeClock(start=1000.0)
    with clock.patch_loop():
        node = Echo(limiter=AsyncLimiter(2, 1))
        assert list(range(6)) == await node._exec(list(range(6)))
    assert 1001.5 <= clock.time() <= 1002.5


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_concurrency": 0}, ValueError),
        ({"max_concurrency": 2.5}, TypeError),
        ({"on_error": "ignore"}, ValueError),
    ],
)
def test_parallel_options_are_validated(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Bad options fail when the node is built, not mid-run."""
    with pytest.raises(error):
        AsyncParallelBatchNode(**kwargs)


class RecordParams(AsyncNode):
    async def exec_async(self, prep_res: Any) -> None:
        await asyncio.sleep(0)

    async def post_async(self, shared: Shared, prep_res: Any, exec_res: Any) -> None:
        if self.params.get("fail"):
            raise ValueError(f"flow for {self.params['id']} failed")
        shared.setdefault("seen", []).append(dict(self.params))


class Ids(AsyncBatchFlow):
    async def prep_async(self, shared: Shared) -> list[dict[str, Any]]:
        return [{"id": i} for i in range(4)]


class ParallelIds(AsyncParallelBatchFlow):
    async def prep_async(self, shared: Shared) -> list[dict[str, Any]]:
        return [{"id": i, "fail": i in shared.get("fail", ())} for i in range(6)]


async def test_async_batch_flow_runs_sequentially_with_merged_params() -> None:
    """AsyncBatchFlow runs once per params dict, in order, merged over its params."""
    flow = Ids(RecordParams())
    flow.set_params({"user": "u"})
    shared: Shared = {}
    await flow.run_async(shared)
    assert [{"user": "u", "id": i} for i in range(4)] == shared["seen"]


async def test_async_parallel_batch_flow_runs_each_params_dict() -> None:
    """AsyncParallelBatchFlow runs every params dict (bounded) and then post."""
    flow = ParallelIds(RecordParams(), max_concurrency=2)
    shared: Shared = {}
    await flow.run_async(shared)
    assert list(range(6)) == sorted(p["id"] for p in shared["seen"])
    assert flow.batch_result is not None
    assert 6 == flow.batch_result.succeeded


async def test_async_parallel_batch_flow_collect_records_failed_runs() -> None:
    """Under collect a failing sub-flow is recorded and the others still run."""
    flow = ParallelIds(RecordParams(), on_error="collect")
    shared: Shared = {"fail": {2, 4}}
    await flow.run_async(shared)
    assert [0, 1, 3, 5] == sorted(p["id"] for p in shared["seen"])
    assert flow.batch_result is not None
    assert [2, 4] == [e.index for e in flow.batch_result.errors]


async def test_async_parallel_batch_flow_fail_fast() -> None:
    """Under fail-fast a failing sub-flow aborts the whole batch flow."""
    flow = ParallelIds(RecordParams(), max_concurrency=1)
    with pytest.raises(BatchFailed, match="flow for 1 failed"):
        await flow.run_async({"fail": {1}})


async def test_nested_async_flow_inside_parallel_node_items() -> None:
    """A parallel node's items can run whole flows (flows nest inside items)."""

    class RunFlowPerItem(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            start = AsyncAdd(item)
            start >> AsyncAdd(1000)
            shared: Shared = {}
            await AsyncFlow(start).run_async(shared)
            return int(shared["value"])

    assert [1000, 1001, 1002] == await RunFlowPerItem()._exec([0, 1, 2])
