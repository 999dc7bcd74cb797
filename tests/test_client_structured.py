"""Typed answers through the client: validation into ``Response.parsed``, bounded re-asks
quoting the errors, the finish policy, and what an invalid item costs and leaves behind.

The provider here is :class:`FakeProvider` (its handler sees every request the client
sends, so the re-ask conversation is checked exactly); the same path over real HTTP with
the official SDKs is in ``tests/providers/test_structured.py`` and the CLI tests.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import AsyncIterator
from typing import Literal

import pytest
from pydantic import BaseModel, Field, field_validator

import llmbatch
from llmbatch.client import LLMClient
from llmbatch.config import ModelProfile
from llmbatch.errors import BudgetExhausted, ContentFiltered
from llmbatch.failure import BatchResult, ItemError
from llmbatch.flow import LLMParallelBatchNode
from llmbatch.models import Request, Response, Usage
from llmbatch.providers.fake import FakeProvider
from llmbatch.providers.openai import OpenAIProvider
from llmbatch.structured import FinishPolicy, InvalidOutput
from llmbatch.testing import FakeClock
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig, SimulatorStats

#: a tenth of a cent per token, in and out: every call has a visible price
PRICED = {
    "fake/m": ModelProfile(
        provider="fake",
        model="m",
        input_price=1_000.0,
        output_price=1_000.0,
        context_window=100_000,
        limits=llmbatch.Limits(),
    )
}


class Summary(BaseModel):
    summary: str
    topics: list[str] = Field(min_length=1)
    sentiment: Literal["pos", "neg", "neutral"]


GOOD = json.dumps({"summary": "s", "topics": ["a"], "sentiment": "pos"})
WRONG_TYPE = json.dumps({"summary": "s", "topics": "a", "sentiment": "pos"})


@pytest.fixture
async def clock() -> AsyncIterator[FakeClock]:
    clock = FakeClock()
    with clock.patch_loop():
        yield clock


def scripted(*answers: str | Response) -> FakeProvider:
    """A provider answering *answers* in turn (the last one repeats)."""
    queue = list(answers)

    def handler(request: Request) -> str | Response:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return FakeProvider(handler)


def client(provider: FakeProvider, **options: object) -> LLMClient:
    return LLMClient(provider, model="m", profiles=PRICED, **options)  # type: ignore[arg-type]


async def test_a_valid_answer_is_parsed_into_the_model(clock: FakeClock) -> None:
    provider = scripted(GOOD)
    response = await client(provider).complete(
        Request.from_prompt("Summarize: x", response_model=Summary)
    )
    assert Summary(summary="s", topics=["a"], sentiment="pos") == response.parsed
    assert (0, 1) == (response.reasks, len(provider.calls))
    assert provider.calls[0].schema is not None
    assert "Summary" == provider.calls[0].schema.name


async def test_a_json_schema_dict_gives_a_dict(clock: FakeClock) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
    }
    response = await client(scripted('{"n": 3}')).complete(
        Request.from_prompt("count", response_model=schema)
    )
    assert {"n": 3} == response.parsed


async def test_an_invalid_answer_is_re_asked_with_its_errors(clock: FakeClock) -> None:
    """The follow-up carries the whole conversation: the prompt, the bad answer as the
    assistant's turn, and a user turn naming what is wrong; its usage and price are
    added to the item's."""
    provider = scripted(WRONG_TYPE, GOOD)
    llm = client(provider)
    response = await llm.complete(Request.from_prompt("Summarize: x", response_model=Summary))
    assert 1 == response.reasks
    assert isinstance(response.parsed, Summary)
    first, second = provider.calls
    assert list(first.messages) == list(second.messages[:1])
    assert {"role": "assistant", "content": WRONG_TYPE} == second.messages[1]
    assert "user" == second.messages[2]["role"]
    assert "topics" in second.messages[2]["content"]
    one_call = first.messages[0]["content"]
    assert response.usage.input_tokens > max(1, len(one_call) // 4)
    stats = llm.statistics()
    assert (1, 1, 0) == (stats.succeeded, stats.reasks, stats.invalid)
    assert response.usage == stats.usage
    assert stats.cost == pytest.approx(response.cost)


async def test_what_stays_invalid_is_the_items_invalid_output(clock: FakeClock) -> None:
    """After max_reasks follow-ups the item fails permanently (never retried by the
    retry policy), carrying the last raw text and the errors; the calls it made are
    still counted in the usage and the cost."""
    provider = scripted("not json at all")
    llm = client(provider, max_reasks=1)
    with pytest.raises(InvalidOutput) as caught:
        await llm.complete(Request.from_prompt("Summarize: x", response_model=Summary, key="k7"))
    error = caught.value
    assert 2 == len(provider.calls)
    assert ("not json at all", 1, "k7") == (error.raw, error.attempts, error.item_key)
    assert error.errors
    assert "JSON" in error.errors[0]
    assert isinstance(error, llmbatch.PermanentError)
    stats = llm.statistics()
    assert (0, 1, 1, 1) == (stats.succeeded, stats.failed, stats.invalid, stats.reasks)
    assert stats.usage.input_tokens > 0
    assert stats.cost is not None
    assert stats.cost > 0
    assert (error.input_tokens, error.output_tokens) == (
        stats.usage.input_tokens,
        stats.usage.output_tokens,
    )
    assert error.cost == pytest.approx(stats.cost)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.raw, copy.errors) == (error.raw, error.errors)


async def test_no_reasks_when_max_reasks_is_zero(clock: FakeClock) -> None:
    provider = scripted(WRONG_TYPE)
    with pytest.raises(InvalidOutput):
        await client(provider, max_reasks=0).complete(
            Request.from_prompt("x", response_model=Summary)
        )
    assert 1 == len(provider.calls)


def cut(text: str) -> Response:
    return Response(text=text, finish_reason="length", usage=Usage(output_tokens=10))


async def test_a_truncated_typed_answer_is_an_error_by_default(clock: FakeClock) -> None:
    """A cut object can never be valid: by default it fails at once, without re-asks."""
    provider = scripted(cut('{"summary": "s", "top'))
    with pytest.raises(InvalidOutput, match="cut off at max_tokens=10"):
        await client(provider).complete(
            Request.from_prompt("x", response_model=Summary, max_tokens=10)
        )
    assert 1 == len(provider.calls)


async def test_retry_larger_asks_once_with_more_tokens(clock: FakeClock) -> None:
    provider = scripted(cut('{"summary": "s", "top'), GOOD)
    policy = FinishPolicy(length="retry_larger")
    response = await client(provider, finish_policy=policy).complete(
        Request.from_prompt("x", response_model=Summary, max_tokens=10)
    )
    assert [10, 20] == [r.max_tokens for r in provider.calls]
    assert isinstance(response.parsed, Summary)


async def test_retry_larger_is_bounded(clock: FakeClock) -> None:
    """Never an unbounded loop: one retry with a larger max_tokens, then the error."""
    provider = scripted(cut("{"))
    policy = FinishPolicy(length="retry_larger")
    with pytest.raises(InvalidOutput, match="after 1 retry"):
        await client(provider, finish_policy=policy).complete(
            Request.from_prompt("x", response_model=Summary, max_tokens=10)
        )
    assert [10, 20] == [r.max_tokens for r in provider.calls]


async def test_plain_text_keeps_a_truncated_answer_by_default(clock: FakeClock) -> None:
    """Without a response model nothing changes: a cut answer is kept as it came."""
    provider = scripted(cut("half a sent"))
    response = await client(provider).complete(Request.from_prompt("x", max_tokens=10))
    assert ("half a sent", "length") == (response.text, response.finish_reason)


async def test_a_refusal_is_content_filtered_unless_kept(clock: FakeClock) -> None:
    refused = Response(text="", refusal="I can't help with that.", finish_reason="stop")
    with pytest.raises(ContentFiltered, match="refused: I can't help"):
        await client(scripted(refused)).complete(Request.from_prompt("x", response_model=Summary))
    keep = FinishPolicy(refusal="keep")
    response = await client(scripted(refused), finish_policy=keep).complete(
        Request.from_prompt("x")
    )
    assert "I can't help with that." == response.refusal


async def test_the_budget_bounds_the_reasks(clock: FakeClock) -> None:
    """Each follow-up reserves what it may cost: a re-ask that would not fit max_cost is
    BudgetExhausted (fatal), not a silent overspend."""
    provider = scripted(WRONG_TYPE)
    # the first call may cost ~$0.1 (its bytes and 100 output tokens); the re-ask, which
    # quotes the bad answer and the errors, ~$0.5: $0.2 fits the first only
    request = Request.from_prompt("x", response_model=Summary, max_tokens=100)
    with pytest.raises(BudgetExhausted):
        await client(provider, max_cost=0.2).complete(request)
    assert 1 == len(provider.calls)


async def test_map_with_a_response_model(clock: FakeClock) -> None:
    """``llmbatch.map(..., response_model=)``: every item parsed, invalid ones re-asked,
    and an item still invalid is its own InvalidOutput error in place."""

    def handler(request: Request) -> str:
        prompt = request.messages[0]["content"]
        if "bad" in prompt:
            return "nope"
        if len(request.messages) == 1 and "flaky" in prompt:
            return WRONG_TYPE
        return GOOD

    provider = FakeProvider(handler)
    docs = [{"text": "ok"}, {"text": "flaky"}, {"text": "bad"}]
    result = await llmbatch.map(
        "Summarize: {text}",
        docs,
        model="m",
        provider=provider,
        response_model=Summary,
        max_reasks=1,
    )
    first, second, third = result.results
    assert isinstance(first, Response)
    assert isinstance(first.parsed, Summary)
    assert isinstance(second, Response)
    assert 1 == second.reasks
    assert isinstance(third, ItemError)
    assert "InvalidOutput" == third.error_type
    assert 1 + 2 + 2 == len(provider.calls)


def test_a_bad_response_model_fails_the_call_not_each_item() -> None:
    with pytest.raises(TypeError, match="response_model must be"):
        llmbatch.map_sync(
            "x {text}",
            [{"text": "a"}],
            model="m",
            provider=scripted(GOOD),
            response_model=42,
        )


def test_response_model_and_response_format_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        Request.from_prompt("x", response_model=Summary, response_format={"type": "json_object"})


async def test_the_llm_node_asks_for_its_response_model(clock: FakeClock) -> None:
    """The flow's LLM node: ``self.ask(prompt)`` carries the node's response model."""
    provider = scripted(GOOD)

    class Summarize(LLMParallelBatchNode):
        async def prep_async(self, shared: dict[str, object]) -> list[str]:
            return ["one", "two"]

        async def exec_async(self, item: str) -> object:
            return (await self.ask(f"Summarize: {item}")).parsed

        async def post_async(
            self, shared: dict[str, object], prep: object, exec_res: object
        ) -> None:
            shared["out"] = exec_res

    shared: dict[str, object] = {}
    node = Summarize(client(provider), response_model=Summary)
    await node.run_async(shared)
    assert [Summary(summary="s", topics=["a"], sentiment="pos")] * 2 == shared["out"]
    assert all(r.schema is not None for r in provider.calls)


# -- through a Batch API: the schema in every line, validation on collection ------------

BATCH_PROFILE = {
    "openai/gpt-4o-mini": ModelProfile(
        provider="openai", model="gpt-4o-mini", input_price=0.15, output_price=0.60
    )
}


class Tagged(BaseModel):
    tag: str
    words: list[str]


class NeverValid(BaseModel):
    """Valid JSON from the simulator, but a check the schema cannot carry fails it."""

    tag: str
    words: list[str]

    @field_validator("tag")
    @classmethod
    def impossible(cls, value: str) -> str:
        raise ValueError("this tag is never accepted")


async def batch_map(
    simulator_factory: SimulatorFactory, model: type[BaseModel], **options: object
) -> tuple[BatchResult[Response], LLMClient, SimulatorStats]:
    wall = FakeClock(start=1_700_000_000.0)
    sim = await simulator_factory(
        batch=BatchSimConfig(validating_seconds=1, seconds_per_request=0.1, finalizing_seconds=1),
        batch_clock=wall.time,
    )
    provider = OpenAIProvider(base_url=sim.base_url, api_key="sk-test")
    llm = LLMClient(
        provider,
        model="gpt-4o-mini",
        sleep=wall.sleep,
        profiles=BATCH_PROFILE,
        **options,  # type: ignore[arg-type]
    )
    llm.batch_poll_interval = 60.0
    requests = [
        Request.from_prompt(f"paragraph {i}", key=f"p{i}", response_model=model) for i in range(4)
    ]
    async with llm:
        result = await llm.map(requests, mode="batch", on_error="collect")
    return result, llm, sim.stats()


async def test_batch_answers_are_validated_on_collection(
    simulator_factory: SimulatorFactory,
) -> None:
    """``LLMClient.map(mode="batch", ...)`` with typed requests: the schema goes in every
    batch line, the answers come back parsed and priced at the batch discount, and no
    online request is made."""
    result, _, stats = await batch_map(simulator_factory, Tagged)
    answers = [r for r in result.results if isinstance(r, Response)]
    assert [Tagged] * 4 == [type(r.parsed) for r in answers]
    assert (1, 0) == (stats.batch["openai_batches_created"], stats.ok)
    first = answers[0]
    full = (first.usage.input_tokens * 0.15 + first.usage.output_tokens * 0.60) / 1e6
    assert first.cost == pytest.approx(full / 2)


async def test_invalid_batch_answers_are_re_asked_online(
    simulator_factory: SimulatorFactory,
) -> None:
    """An answer that fails validation is re-asked online (max_reasks follow-ups each),
    and what stays invalid is the item's InvalidOutput in place, the calls counted."""
    result, llm, stats = await batch_map(simulator_factory, NeverValid, max_reasks=1)
    errors = [r for r in result.results if isinstance(r, ItemError)]
    assert ["InvalidOutput"] * 4 == [e.error_type for e in errors]
    assert all("never accepted" in e.message for e in errors)
    assert 4 == stats.ok
    assert 4 == stats.structured["follow_ups"]
    counts = llm.statistics()
    assert (0, 4, 4) == (counts.succeeded, counts.invalid, counts.reasks)
