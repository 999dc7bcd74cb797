"""A PocketFlow program runs on ``llmbatch.compat.pocketflow`` with only its import changed."""

from __future__ import annotations

import asyncio
from typing import Any

import llmbatch.flow
from llmbatch.compat import pocketflow
from llmbatch.compat.pocketflow import AsyncFlow, AsyncNode, AsyncParallelBatchNode, Flow, Node


def test_compat_names_are_the_flow_classes() -> None:
    """The compat module re-exports llmbatch.flow's classes; there is no second implementation."""
    for name in pocketflow.__all__:
        assert getattr(llmbatch.flow, name) is getattr(pocketflow, name)


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
