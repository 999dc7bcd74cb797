"""A PocketFlow program runs on ``llmbatch.compat.pocketflow`` with only its import changed."""

from __future__ import annotations

import asyncio
import dataclasses
import traceback
from typing import Any

import pytest

import llmbatch.flow
from llmbatch.compat import pocketflow
from llmbatch.compat.pocketflow import (
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
from llmbatch.errors import AuthenticationFailed
from llmbatch.failure import BatchFailed, BatchResult

PARALLEL = {"AsyncParallelBatchNode", "AsyncParallelBatchFlow"}


def test_compat_names_are_the_flow_classes() -> None:
    """The compat module re-exports llmbatch.flow's classes; the two parallel variants are
    thin subclasses (they change what a failure raises), not a second implementation."""
    for name in pocketflow.__all__:
        compat, native = getattr(pocketflow, name), getattr(llmbatch.flow, name)
        if name in PARALLEL:
            assert compat is not native
            assert native in compat.__bases__
        else:
            assert compat is native


# The program below is written the way PocketFlow's documentation writes programs: a
# question-answering agent that decides, searches, and answers, with a fake "LLM".


def call_llm(prompt: str) -> str:
    if "Decide" in prompt:
        return "answer" if "context:" in prompt else "search"
    return f"answer to: {prompt.splitlines()[-1]}"


class DecideAction(Node):
    def prep(self, shared: dict[str, Any]) -> str:
        context = shared.get("context")
        return f"Decide.\n{'context: ' + context if context else ''}\n{shared['question']}"

    def exec(self, prompt: str) -> str:
        return call_llm(prompt)

    def post(self, shared: dict[str, Any], prep_res: str, exec_res: str) -> str:
        shared.setdefault("decisions", []).append(exec_res)
        return exec_res


class SearchWeb(Node):
    def exec(self, prep_res: Any) -> str:
        return "Paris is the capital of France."

    def post(self, shared: dict[str, Any], prep_res: Any, exec_res: str) -> str:
        shared["context"] = exec_res
        return "decide"


class Answer(Node):
    def prep(self, shared: dict[str, Any]) -> str:
        return str(shared["question"])

    def exec(self, question: str) -> str:
        return call_llm(question)

    def post(self, shared: dict[str, Any], prep_res: str, exec_res: str) -> None:
        shared["answer"] = exec_res


def test_agent_loop_program() -> None:
    """A looping agent graph (decide → search → decide → answer) runs as in PocketFlow."""
    decide = DecideAction()
    search = SearchWeb()
    answer = Answer()
    decide - "search" >> search
    decide - "answer" >> answer
    search - "decide" >> decide
    shared: dict[str, Any] = {"question": "What is the capital of France?"}
    assert Flow(start=decide).run(shared) is None
    assert ["search", "answer"] == shared["decisions"]
    assert "answer to: What is the capital of France?" == shared["answer"]


class SummarizeChunks(AsyncParallelBatchNode):
    async def prep_async(self, shared: dict[str, Any]) -> list[str]:
        text = shared["text"]
        return [text[i : i + 10] for i in range(0, len(text), 10)]

    async def exec_async(self, chunk: str) -> str:
        await asyncio.sleep(0)
        return chunk.upper()

    async def post_async(
        self, shared: dict[str, Any], prep_res: list[str], exec_res: list[str]
    ) -> str:
        shared["summary"] = "|".join(exec_res)
        return "default"


class Publish(AsyncNode):
    async def prep_async(self, shared: dict[str, Any]) -> str:
        return str(shared["summary"])

    async def exec_async(self, summary: str) -> int:
        return len(summary)

    async def post_async(self, shared: dict[str, Any], prep_res: str, exec_res: int) -> None:
        shared["published_chars"] = exec_res


async def test_map_reduce_program() -> None:
    """A parallel map over chunks followed by a reduce keeps chunk order."""
    summarize = SummarizeChunks()
    summarize >> Publish()
    shared: dict[str, Any] = {"text": "abcdefghijklmnopqrstuvwxyz"}
    await AsyncFlow(start=summarize).run_async(shared)
    assert "ABCDEFGHIJ|KLMNOPQRST|UVWXYZ" == shared["summary"]
    assert 28 == shared["published_chars"]


# -- a failing item raises its own exception, as PocketFlow's gather does ----------------
#
# PocketFlow programs catch the item's exception by its type around a parallel node or
# flow. Items follow a script: "ok" returns, "bad" raises ValueError, "hang" waits until
# it is cancelled.


class Script:
    """Runs scripted items and records which started and which were cancelled."""

    def __init__(self, kinds: list[str]) -> None:
        self.kinds = kinds
        self.started: list[int] = []
        self.cancelled: list[int] = []

    async def run(self, index: int) -> str:
        self.started.append(index)
        kind = self.kinds[index]
        await asyncio.sleep(0)
        if kind == "ok":
            return f"ok {index}"
        if kind == "bad":
            raise ValueError(f"bad item {index}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        raise AssertionError("a hanging item is only ever cancelled")


KINDS = ["ok", "hang", "bad"] + ["ok"] * 7


def batch_result_of(exc: BaseException) -> BatchResult[Any]:
    """The partial results riding on a compat exception."""
    result = vars(exc)["batch_result"]
    assert isinstance(result, BatchResult)
    return result


class Summarize(AsyncParallelBatchNode):
    def __init__(self, script: Script, **options: Any) -> None:
        super().__init__(**options)
        self.script = script

    async def prep_async(self, shared: dict[str, Any]) -> list[int]:
        return list(range(len(self.script.kinds)))

    async def exec_async(self, index: int) -> str:
        return await self.script.run(index)

    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str:
        shared["summaries"] = exec_res
        return "default"


class Report(AsyncNode):
    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> None:
        shared["reported"] = True


async def test_parallel_node_failure_raises_the_items_own_exception() -> None:
    """``except ValueError`` around a flow with a parallel node catches the item's
    ValueError; siblings in flight are cancelled, later items never start, post and the
    successors never run, and the partial results ride on the exception."""
    script = Script(KINDS)
    summarize = Summarize(script, max_concurrency=3)
    summarize >> Report()
    shared: dict[str, Any] = {}
    try:
        await AsyncFlow(start=summarize).run_async(shared)
    except ValueError as exc:
        caught: ValueError = exc
    else:
        pytest.fail("the item's ValueError was not raised")
    assert "bad item 2" == str(caught)
    assert {} == shared
    assert len(script.started) < len(KINDS)
    result = batch_result_of(caught)
    assert sorted(script.started) == list(range(len(result)))
    assert ["ok 0"] == result.ok
    assert 1 in script.cancelled
    assert script.cancelled == [e.index for e in result.errors if e.cancelled]
    failed = [(e.index, e.error_type) for e in result.errors if not e.cancelled]
    assert [(2, "ValueError")] == failed
    not_started = len(KINDS) - len(script.started)
    assert [
        f"llmbatch: item 2 of Summarize's batch failed first (succeeded: 1, cancelled: "
        f"{len(script.cancelled)}, not started: {not_started}); the partial results are in "
        "this exception's batch_result"
    ] == caught.__notes__


async def test_the_items_exception_keeps_its_traceback_and_is_not_chained() -> None:
    """The raised exception is the item's: its traceback reaches ``exec_async`` and it is
    neither caused by nor chained to llmbatch's BatchFailed."""
    with pytest.raises(ValueError) as info:
        await Summarize(Script(KINDS)).run_async({})
    assert "exec_async" in [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert info.value.__cause__ is None
    assert not isinstance(info.value.__context__, BatchFailed)


async def test_native_flow_keeps_batch_failed() -> None:
    """The same node on llmbatch.flow raises BatchFailed, caused by the item's exception,
    which it leaves untouched."""

    class NativeSummarize(llmbatch.flow.AsyncParallelBatchNode):
        async def exec_async(self, index: int) -> str:
            return await script.run(index)

    script = Script(KINDS)
    with pytest.raises(BatchFailed) as info:
        await NativeSummarize()._exec(list(range(len(KINDS))))
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert "batch_result" not in vars(cause)
    assert not hasattr(cause, "__notes__")


class Answer1(AsyncNode):
    """One run of the parallel flow: answers the item named by ``params['index']``."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script

    async def exec_async(self, prep_res: Any) -> str:
        return await self.script.run(int(self.params["index"]))

    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: str) -> str:
        shared.setdefault("answers", {})[self.params["index"]] = exec_res
        return "answered"


class AnswerAll(AsyncParallelBatchFlow):
    def __init__(self, script: Script, **options: Any) -> None:
        super().__init__(Answer1(script), **options)
        self.script = script

    async def prep_async(self, shared: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"index": i} for i in range(len(self.script.kinds))]

    async def post_async(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> str:
        shared["all_answered"] = True
        return "default"


async def test_parallel_flow_failure_raises_the_runs_own_exception() -> None:
    """``except ValueError`` around a parallel batch flow catches the failing run's
    ValueError; runs in flight are cancelled, later ones never start, and what finished
    is in the shared store and on the exception."""
    script = Script(KINDS)
    shared: dict[str, Any] = {}
    try:
        await AnswerAll(script, max_concurrency=3).run_async(shared)
    except ValueError as exc:
        caught: ValueError = exc
    else:
        pytest.fail("the run's ValueError was not raised")
    assert "bad item 2" == str(caught)
    assert {"answers": {0: "ok 0"}} == shared
    assert len(script.started) < len(KINDS)
    result = batch_result_of(caught)
    assert ["answered"] == result.ok
    assert 1 in script.cancelled
    assert script.cancelled == [e.index for e in result.errors if e.cancelled]
    assert 1 == len(caught.__notes__)
    assert caught.__notes__[0].startswith("llmbatch: item 2 of AnswerAll's batch failed first")


async def test_nested_parallel_batches_note_each_level() -> None:
    """A parallel node inside a parallel flow: the item's exception comes out of both,
    with a note from each; ``batch_result`` is the outer (the flow's) batch."""

    class Inner(AsyncParallelBatchNode):
        async def prep_async(self, shared: dict[str, Any]) -> list[int]:
            return [self.params["chunk"] * 10 + i for i in range(3)]

        async def exec_async(self, item: int) -> int:
            await asyncio.sleep(0)
            if item == 11:
                raise KeyError(item)
            return item

    class Outer(AsyncParallelBatchFlow):
        async def prep_async(self, shared: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"chunk": 0}, {"chunk": 1}]

    with pytest.raises(KeyError) as info:
        await Outer(Inner(), max_concurrency=1).run_async({})
    notes = info.value.__notes__
    assert [True, True] == [
        notes[0].startswith("llmbatch: item 1 of Inner's"),
        notes[1].startswith("llmbatch: item 1 of Outer's"),
    ]
    result = batch_result_of(info.value)
    assert [1] == [e.index for e in result.errors]
    assert 2 == len(result)


class ChunkNode(BatchNode):
    def prep(self, shared: dict[str, Any]) -> list[int]:
        return [0, 1, 2, 3]

    def exec(self, item: int) -> int:
        self.params.setdefault("ran", []).append(item)
        if item == 1:
            raise ValueError(f"bad item {item}")
        return item


class AsyncChunkNode(AsyncBatchNode):
    async def prep_async(self, shared: dict[str, Any]) -> list[int]:
        return [0, 1, 2, 3]

    async def exec_async(self, item: int) -> int:
        self.params.setdefault("ran", []).append(item)
        if item == 1:
            raise ValueError(f"bad item {item}")
        return item


class PerUser(BatchFlow):
    def prep(self, shared: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"user": u} for u in ("a", "b", "c")]


class AsyncPerUser(AsyncBatchFlow):
    async def prep_async(self, shared: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"user": u} for u in ("a", "b", "c")]


class FailForB(Node):
    def exec(self, prep_res: Any) -> None:
        if self.params["user"] == "b":
            raise ValueError("bad user b")

    def post(self, shared: dict[str, Any], prep_res: Any, exec_res: Any) -> None:
        shared.setdefault("done", []).append(self.params["user"])


def test_sync_batch_node_and_flow_raise_the_items_own_exception() -> None:
    """The sequential sync variants raise the item's exception too, and the items after
    it never run (PocketFlow's behaviour, unchanged)."""
    node = ChunkNode()
    node.set_params({})
    with pytest.raises(ValueError, match="bad item 1"):
        Flow(start=node).run({})
    shared: dict[str, Any] = {}
    with pytest.raises(ValueError, match="bad user b"):
        PerUser(start=FailForB()).run(shared)
    assert ["a"] == shared["done"]


async def test_async_batch_node_and_flow_raise_the_items_own_exception() -> None:
    """The sequential async variants raise the item's exception; later items never run."""
    node = AsyncChunkNode()
    params: dict[str, Any] = {}
    node.set_params(params)
    with pytest.raises(ValueError, match="bad item 1"):
        await node.run_async({})
    assert [0, 1] == params["ran"]
    shared: dict[str, Any] = {}
    with pytest.raises(ValueError, match="bad user b"):
        await AsyncPerUser(start=FailForB()).run_async(shared)
    assert ["a"] == shared["done"]


async def test_a_fatal_error_under_collect_is_raised_as_itself() -> None:
    """A FatalError stops a collect batch too, and comes out as itself with the results."""

    class Calls(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            await asyncio.sleep(0)
            if item == 1:
                raise AuthenticationFailed("bad key", provider="openai")
            return item

    with pytest.raises(AuthenticationFailed) as info:
        await Calls(on_error="collect", max_concurrency=1)._exec([0, 1, 2])
    assert [0] == batch_result_of(info.value).ok


async def test_a_threshold_abort_still_raises_batch_failed() -> None:
    """max_failures (an llmbatch threshold, no single item's error) keeps BatchFailed."""

    class Calls(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            raise ValueError(f"bad item {item}")

    with pytest.raises(BatchFailed, match="max_failures"):
        await Calls(on_error="collect", max_failures=1, max_concurrency=1)._exec([0, 1, 2])


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    code: int


async def test_an_exception_refusing_attributes_is_raised_all_the_same() -> None:
    """An exception class that refuses new attributes (a frozen dataclass) is raised as
    itself, without the note and batch_result it cannot take."""

    class Calls(AsyncParallelBatchNode):
        async def exec_async(self, item: int) -> int:
            raise FrozenError(item)

    with pytest.raises(FrozenError) as info:
        await Calls()._exec([7])
    assert FrozenError(7) == info.value
    assert "batch_result" not in vars(info.value)
