"""Typed answers (``response_model``) through the provider adapters.

Over real HTTP against the simulator, whose OpenAI endpoint enforces strict mode's rules
(a schema outside them gets OpenAI's 400) and whose answers fit the schema sent: OpenAI
``json_schema`` (strict or not) and JSON mode, Anthropic's forced tool, the two Batch APIs,
refusals; then the admission arithmetic and the local model's grammar. What each
provider puts on the wire is read where the server sees it: a scripted-fault callable
that records each request body and injects nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal, cast

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from llmbatch.batchapi import run_batch_api
from llmbatch.errors import BadRequest
from llmbatch.models import Request, Response
from llmbatch.providers.anthropic import TOOL_PROMPT_TOKENS, AnthropicProvider
from llmbatch.providers.local import LocalProvider
from llmbatch.providers.openai import OpenAIProvider, chat_response, strict_fits
from llmbatch.structured import InvalidOutput, ResponseSchema
from llmbatch.testing import FakeClock, Fault, RequestInfo, Simulator
from llmbatch.testing._structured import REFUSAL, stated_schema
from llmbatch.testing.pytest_plugin import SimulatorFactory
from llmbatch.testing.simulator import BatchSimConfig

GPT = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
PROMPT = "Summarize: the harbour reopened after the storm."

# -- response models, as users declare them ------------------------------------------------


class Sentiment(StrEnum):
    """How a document feels."""

    POS = "pos"
    NEG = "neg"
    NEUTRAL = "neutral"


class Address(BaseModel):
    city: str
    zip: str | None = None


class Topic(BaseModel):
    name: str
    weight: float = Field(ge=0, le=1)


class Summary(BaseModel):
    """A document's summary: optional, nested, enum and list fields."""

    summary: str
    topics: list[Topic]
    sentiment: Sentiment
    reviewer: str | None = None
    address: Address | None = None
    tags: list[str] = []


class Node(BaseModel):
    """A recursive outline."""

    label: str
    children: list[Node] = []


class Outline(BaseModel):
    title: str
    kind: Literal["report", "memo"]
    root: Node


class Constrained(BaseModel):
    """Constraints strict mode lacks: the rewrite drops them, validation keeps them."""

    title: str = Field(min_length=3, max_length=80)
    labels: set[str]
    code: str = Field(json_schema_extra={"format": "color"})


class Counts(BaseModel):
    """A map: strict mode could only ever answer it empty."""

    word: str
    counts: dict[str, int]


class Loose(BaseModel):
    """A value of any type: strict mode refuses it."""

    anything: Any
    note: str


class Tagged(BaseModel):
    tag: str
    words: list[str]


TYPED = [
    pytest.param(Summary, id="optional-nested-enum-list"),
    pytest.param(Outline, id="recursive-literal"),
    pytest.param(Constrained, id="constraints-dropped"),
    pytest.param(Counts, id="map-not-strict"),
    pytest.param(Loose, id="any-not-strict"),
]

# -- helpers -------------------------------------------------------------------------------


def typed(response_model: type[Any], prompt: str = PROMPT, **options: Any) -> Request:
    """A one-prompt request for a typed answer (on GPT unless ``model=`` says otherwise)."""
    options.setdefault("model", GPT)
    return Request.from_prompt(prompt, response_model=response_model, **options)


def schema_of(request: Request) -> ResponseSchema[Any]:
    assert request.schema is not None
    return request.schema


class Wire:
    """A scripted-fault callable that injects nothing: it records the body of every
    request the simulator accepted, as the server received it."""

    def __init__(self) -> None:
        self.bodies: list[Mapping[str, Any]] = []

    def __call__(self, info: RequestInfo) -> Fault | None:
        self.bodies.append(info.body)
        return None


async def recording(factory: SimulatorFactory, wire: Wire, **options: Any) -> Simulator:
    return await factory(script=wire, **options)


def openai_provider(sim: Simulator, **options: Any) -> OpenAIProvider:
    return OpenAIProvider(base_url=sim.base_url, api_key="sk-test", **options)


def anthropic_provider(sim: Simulator) -> AnthropicProvider:
    return AnthropicProvider(base_url=sim.url, api_key="sk-ant-test")


@pytest.fixture
async def oai(simulator: Simulator) -> AsyncIterator[OpenAIProvider]:
    async with openai_provider(simulator) as provider:
        yield provider


# -- OpenAI json_schema ----------------------------------------------------------------------


@pytest.mark.parametrize("model", TYPED)
async def test_openai_answers_validate_against_the_model(
    oai: OpenAIProvider, model: type[BaseModel]
) -> None:
    """Whatever the model declares, the server takes the response_format it is sent
    (strict or not) and answers text the model validates; ``parsed`` stays for the
    client to fill."""
    for i in range(5):
        request = typed(model, f"{PROMPT} #{i}")
        response = await oai.complete(request)
        assert isinstance(schema_of(request).validate(response.text), model)
        assert (None, None, "stop") == (response.parsed, response.refusal, response.finish_reason)


@pytest.mark.parametrize(
    ("model", "strict"),
    [
        pytest.param(Summary, True, id="exact"),
        pytest.param(Outline, True, id="exact-recursive"),
        pytest.param(Constrained, True, id="only-constraints-dropped"),
        pytest.param(Counts, False, id="map"),
        pytest.param(Loose, False, id="any"),
    ],
)
def test_strict_is_sent_when_strict_mode_can_carry_the_shape(
    model: type[BaseModel], strict: bool
) -> None:
    """Strict goes with the rewrite unless the rewrite lost the shape itself; without
    strict the original schema goes, as a hint."""
    schema = ResponseSchema.of(model)
    sent = OpenAIProvider(api_key="sk-test").chat_params(typed(model))["response_format"]
    expected = schema.strict_schema().schema if strict else schema.schema
    assert strict == strict_fits(schema.strict_schema())
    assert {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": expected, "strict": strict},
    } == sent


@pytest.mark.parametrize(("strict", "model"), [(True, Counts), (False, Summary)])
def test_the_strict_option_overrides_the_choice(strict: bool, model: type[BaseModel]) -> None:
    """``strict=True`` always sends the rewrite strict; ``strict=False`` never does."""
    provider = OpenAIProvider(api_key="sk-test", strict=strict)
    sent = provider.chat_params(typed(model))["response_format"]
    assert strict == sent["json_schema"]["strict"]


async def test_the_schema_goes_on_the_wire_rewritten_for_strict_mode(
    simulator_factory: SimulatorFactory,
) -> None:
    """The server receives the strict rewrite (every property required, optional ones
    nullable, no additional properties) for a model the simulator's strict check would
    refuse as pydantic writes it."""
    wire = Wire()
    sim = await recording(simulator_factory, wire)
    schema = ResponseSchema.of(Summary)
    async with openai_provider(sim) as provider:
        await provider.complete(typed(Summary))
        as_pydantic_writes_it = {
            "type": "json_schema",
            "json_schema": {"name": "Summary", "schema": schema.schema, "strict": True},
        }
        with pytest.raises(BadRequest, match="Invalid schema for response_format 'Summary'"):
            await provider.complete(
                typed(Summary, extra={"response_format": as_pydantic_writes_it})
            )
    sent = wire.bodies[0]["response_format"]["json_schema"]
    root = sent["schema"]
    assert (True, False) == (sent["strict"], root["additionalProperties"])
    assert list(Summary.model_fields) == root["required"]
    assert {"type": "null"} in root["properties"]["reviewer"]["anyOf"]


def test_a_raw_response_format_still_parses_the_text() -> None:
    """A request with ``response_format`` (no model) keeps today's behaviour: the text
    parsed as JSON; with a model, ``parsed`` stays None."""
    completion = {
        "model": GPT,
        "choices": [{"message": {"content": '{"a": 1}'}, "finish_reason": "stop"}],
    }
    raw = Request.from_prompt("x", model=GPT, response_format={"type": "json_object"})
    model = typed(Tagged)
    assert {"a": 1} == chat_response(completion, raw, request_id=None).parsed
    assert (None, '{"a": 1}') == (
        chat_response(completion, model, request_id=None).parsed,
        chat_response(completion, model, request_id=None).text,
    )


# -- OpenAI JSON mode ----------------------------------------------------------------------


async def test_json_mode_sends_json_object_and_the_schema_in_the_system_prompt(
    simulator_factory: SimulatorFactory,
) -> None:
    """``structured_outputs="json_object"``: JSON mode, the schema stated in a new system
    message; the simulated model reads it there, and its answer validates."""
    wire = Wire()
    sim = await recording(simulator_factory, wire)
    request = typed(Summary)
    async with openai_provider(sim, structured_outputs="json_object") as provider:
        response = await provider.complete(request)
    assert isinstance(schema_of(request).validate(response.text), Summary)
    body = wire.bodies[0]
    assert {"type": "json_object"} == body["response_format"]
    assert [
        {"role": "system", "content": schema_of(request).json_mode_instruction()},
        {"role": "user", "content": PROMPT},
    ] == body["messages"]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        pytest.param(
            [{"role": "user", "content": "u"}],
            [{"role": "system", "content": "I"}, {"role": "user", "content": "u"}],
            id="no-system",
        ),
        pytest.param(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u"}],
            [{"role": "system", "content": "Be brief.\n\nI"}, {"role": "user", "content": "u"}],
            id="system-extended",
        ),
        pytest.param(
            [{"role": "developer", "content": "D"}, {"role": "user", "content": "u"}],
            [{"role": "developer", "content": "D\n\nI"}, {"role": "user", "content": "u"}],
            id="developer-extended",
        ),
        pytest.param(
            [
                {"role": "system", "content": [{"type": "text", "text": "S"}]},
                {"role": "user", "content": "u"},
            ],
            [
                {
                    "role": "system",
                    "content": [{"type": "text", "text": "S"}, {"type": "text", "text": "I"}],
                },
                {"role": "user", "content": "u"},
            ],
            id="system-parts",
        ),
        pytest.param(
            [{"role": "user", "content": "u"}, {"role": "system", "content": "late"}],
            [
                {"role": "system", "content": "I"},
                {"role": "user", "content": "u"},
                {"role": "system", "content": "late"},
            ],
            id="system-not-first",
        ),
    ],
)
def test_json_mode_instruction_placement(
    monkeypatch: pytest.MonkeyPatch,
    messages: list[dict[str, Any]],
    expected: list[dict[str, Any]],
) -> None:
    """The instruction ends the leading system (or developer) message, else leads in a
    system message of its own; the request's own messages are left as they are."""
    monkeypatch.setattr(ResponseSchema, "json_mode_instruction", lambda self: "I")
    request = Request(messages=messages, model=GPT, response_model=Tagged)
    provider = OpenAIProvider(api_key="sk-test", structured_outputs="json_object")
    assert expected == provider.chat_params(request)["messages"]
    assert messages == [dict(m) for m in request.messages]


_STATED = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        pytest.param(
            [{"role": "system", "content": f"Be brief. JSON Schema:\n{json.dumps(_STATED)}"}],
            _STATED,
            id="system",
        ),
        pytest.param(
            [{"role": "user", "content": f"Use this JSON Schema: {json.dumps(_STATED)} now"}],
            _STATED,
            id="user-with-text-after",
        ),
        pytest.param(
            [{"role": "assistant", "content": f"JSON Schema: {json.dumps(_STATED)}"}],
            None,
            id="assistant-ignored",
        ),
        pytest.param(
            [{"role": "system", "content": 'JSON Schema: {"type": "array"}'}], None, id="array"
        ),
        pytest.param([{"role": "system", "content": "JSON Schema: {oops"}], None, id="broken"),
        pytest.param([{"role": "user", "content": "json please"}], None, id="none"),
    ],
)
def test_the_simulator_reads_a_schema_stated_in_the_prompt(
    messages: list[dict[str, Any]], expected: dict[str, Any] | None
) -> None:
    """In JSON mode the simulated model answers the object schema a system, developer or
    user message states after ``JSON Schema:``, if any."""
    assert expected == stated_schema(messages)


def test_an_unknown_structured_outputs_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="structured_outputs must be"):
        OpenAIProvider(api_key="sk-test", structured_outputs=cast(Any, "xml"))


# -- Anthropic forced tool -----------------------------------------------------------------


@pytest.mark.parametrize("model", TYPED)
async def test_anthropic_tool_input_becomes_the_json_text(
    simulator_factory: SimulatorFactory, model: type[BaseModel]
) -> None:
    """A forced tool is sent; its ``tool_use`` input comes back as the text, JSON the
    model validates, with the tool call's stop reason."""
    wire = Wire()
    sim = await recording(simulator_factory, wire)
    request = typed(model, model=CLAUDE)
    schema = schema_of(request)
    async with anthropic_provider(sim) as provider:
        response = await provider.complete(request)
    assert isinstance(schema.validate(response.text), model)
    assert ("tool_use", None, None) == (response.finish_reason, response.refusal, response.parsed)
    body = wire.bodies[0]
    assert ([schema.anthropic_tool()], schema.anthropic_tool_choice()) == (
        body["tools"],
        body["tool_choice"],
    )


async def test_anthropic_reask_after_a_violation(simulator_factory: SimulatorFactory) -> None:
    """A tool input that breaks the schema fails validation; sent back as the client
    re-asks (the bad JSON as an assistant turn, then the errors), the next answer is
    valid and belongs to the same prompt."""
    sim = await simulator_factory(script=[Fault(kind="schema_violation", nth=1)])
    request = typed(Summary, model=CLAUDE)
    schema = schema_of(request)
    async with anthropic_provider(sim) as provider:
        bad = await provider.complete(request)
        with pytest.raises(InvalidOutput) as caught:
            schema.validate(bad.text)
        messages = [*request.messages, *schema.reask_messages(bad.text, caught.value.errors)]
        again = await provider.complete(
            Request(messages=messages, model=CLAUDE, response_model=Summary)
        )
    fixed = schema.validate(again.text)
    assert fixed.summary.split(" ")[0] in bad.text
    assert 1 == sim.stats().structured["follow_ups"]


async def test_anthropic_broken_json_stays_text(simulator_factory: SimulatorFactory) -> None:
    """When no tool call comes (broken JSON written as text), the text is kept as it is
    and fails validation: the client re-asks."""
    sim = await simulator_factory(script=[Fault(kind="invalid_json", nth=1)])
    request = typed(Summary, model=CLAUDE)
    async with anthropic_provider(sim) as provider:
        response = await provider.complete(request)
    assert response.text
    with pytest.raises(InvalidOutput):
        schema_of(request).validate(response.text)


# -- refusals ------------------------------------------------------------------------------


async def test_openai_refusal_is_read(simulator_factory: SimulatorFactory) -> None:
    """``message.refusal`` becomes ``refusal``; ``content: null`` reads as empty text."""
    sim = await simulator_factory(script=[Fault(kind="refusal", nth=1)])
    async with openai_provider(sim) as provider:
        refused = await provider.complete(typed(Summary))
        answered = await provider.complete(typed(Summary))
    assert ("", REFUSAL, "stop") == (refused.text, refused.refusal, refused.finish_reason)
    assert answered.refusal is None
    assert 2 == sim.stats().structured["answered"]


async def test_anthropic_refusal_is_read(simulator_factory: SimulatorFactory) -> None:
    """``stop_reason: "refusal"`` sets ``refusal`` to the message's text, for a typed
    answer and for plain text alike."""
    sim = await simulator_factory(
        script=[Fault(kind="refusal", nth=1), Fault(kind="refusal", nth=2)]
    )
    async with anthropic_provider(sim) as provider:
        for_model = await provider.complete(typed(Summary, model=CLAUDE))
        for_text = await provider.complete(Request.from_prompt(PROMPT, model=CLAUDE))
        answered = await provider.complete(Request.from_prompt(PROMPT, model=CLAUDE))
    for response in (for_model, for_text):
        assert (REFUSAL, "refusal") == (response.refusal, response.finish_reason)
    assert (None, "end_turn") == (answered.refusal, answered.finish_reason)


async def test_refusals_stream_as_the_sdks_expect(simulator_factory: SimulatorFactory) -> None:
    """Streamed, a refusal arrives as ``refusal`` deltas (OpenAI) or a text block ending
    with ``stop_reason: "refusal"`` (Anthropic)."""
    sim = await simulator_factory(script=[Fault(kind="refusal", nth=1)])
    messages: Any = [{"role": "user", "content": PROMPT}]
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0) as raw:
        stream = await raw.chat.completions.create(model=GPT, messages=messages, stream=True)
        deltas = [chunk.choices[0].delta async for chunk in stream if chunk.choices]
    refused = "".join(delta.refusal or "" for delta in deltas)
    said = "".join(delta.content or "" for delta in deltas)
    assert (REFUSAL, "") == (refused, said)
    sim2 = await simulator_factory(script=[Fault(kind="refusal", nth=1)])
    raw2 = anthropic.AsyncAnthropic(base_url=sim2.url, api_key="sk-a", max_retries=0)
    async with raw2, raw2.messages.stream(model=CLAUDE, max_tokens=64, messages=messages) as events:
        final = await events.get_final_message()
    block = final.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert ("refusal", REFUSAL) == (final.stop_reason, block.text)


# -- the Batch APIs ------------------------------------------------------------------------

START = 1_700_000_000.0


def keyed(n: int, model: str) -> list[tuple[str, Request]]:
    return [(f"doc-{i}", typed(Summary, f"{PROMPT} #{i}", model=model)) for i in range(n)]


def assert_valid(outcomes: Mapping[str, Any], requests: Sequence[tuple[str, Request]]) -> None:
    """Every item answered, with JSON its model validates."""
    assert {key for key, _ in requests} == set(outcomes)
    for key, request in requests:
        outcome = outcomes[key]
        assert isinstance(outcome, Response), outcome
        assert isinstance(schema_of(request).validate(outcome.text), Summary)


async def batch_simulator(factory: SimulatorFactory) -> tuple[Simulator, FakeClock]:
    wall = FakeClock(start=START)
    timing = BatchSimConfig(
        validating_seconds=1.0, seconds_per_request=0.125, finalizing_seconds=1.0
    )
    return await factory(batch=timing, batch_clock=wall.time), wall


async def test_openai_batch_lines_carry_the_schema(simulator_factory: SimulatorFactory) -> None:
    """Every JSONL line's body has the same ``response_format`` as an online request,
    and the batch's answers validate."""
    sim, wall = await batch_simulator(simulator_factory)
    requests = keyed(4, GPT)
    async with openai_provider(sim) as provider:
        backend = provider.batch()
        lines = [backend.line(key, request) for key, request in requests]
        outcomes = await run_batch_api(backend, requests, poll_interval=60.0, sleep=wall.sleep)
        online = provider.chat_params(requests[0][1])["response_format"]
    assert_valid(outcomes, requests)
    assert [online] * 4 == [line["body"]["response_format"] for line in lines]
    assert 1 == sim.stats().batch["openai_batches_created"]
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as raw:
        uploaded = [f async for f in raw.files.list(purpose="batch")]
        content = (await raw.files.content(uploaded[0].id)).text
    assert [online] * 4 == [
        json.loads(text)["body"]["response_format"] for text in content.splitlines()
    ]


async def test_anthropic_batch_params_force_the_tool(simulator_factory: SimulatorFactory) -> None:
    """Every Message Batch request forces the same tool as an online request, and the
    tool inputs come back as JSON text that validates."""
    sim, wall = await batch_simulator(simulator_factory)
    requests = keyed(4, CLAUDE)
    async with anthropic_provider(sim) as provider:
        backend = provider.batch()
        lines = [backend.line(key, request) for key, request in requests]
        outcomes = await run_batch_api(backend, requests, poll_interval=60.0, sleep=wall.sleep)
    assert_valid(outcomes, requests)
    schema = schema_of(requests[0][1])
    assert {json.dumps([[schema.anthropic_tool()], schema.anthropic_tool_choice()])} == {
        json.dumps([line["params"]["tools"], line["params"]["tool_choice"]]) for line in lines
    }
    assert {"tool_use"} == {o.finish_reason for o in outcomes.values() if isinstance(o, Response)}


# -- admission -----------------------------------------------------------------------------


def _schema_with(n: int) -> dict[str, Any]:
    """An object schema with *n* string properties."""
    return {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string"} for i in range(n)},
        "required": [f"field_{i}" for i in range(n)],
        "additionalProperties": False,
    }


@pytest.mark.parametrize("structured_outputs", ["json_schema", "json_object"])
def test_openai_admission_grows_with_the_schema(
    structured_outputs: Literal["json_schema", "json_object"],
) -> None:
    """The schema travels with every request and counts as prompt tokens: the larger
    the schema, the larger the admission; settlement keeps it."""
    provider = OpenAIProvider(api_key="sk-test", structured_outputs=structured_outputs)
    plain = Request.from_prompt(PROMPT, model=GPT, max_tokens=100)
    charged = [provider.admission(plain, GPT)["tokens"]]
    for n in (1, 10, 100):
        request = Request.from_prompt(
            PROMPT, model=GPT, max_tokens=100, response_model=_schema_with(n)
        )
        charged.append(provider.admission(request, GPT)["tokens"])
        response = Response(text="{}")
        assert provider.admission(request, GPT) == {
            "requests": 1,
            **provider.settlement(request, response),
        }
    assert charged == sorted(set(charged))
    assert charged[3] - charged[0] > 100 * len('"field_00":{"type":"string"}') / 4


def test_openai_admission_counts_the_response_format_by_characters() -> None:
    """json_schema: ceil(characters of the response_format's JSON / 4) on top of the
    messages' estimate; JSON mode: the instruction (and a system message) instead."""
    schema = ResponseSchema.of(_schema_with(3))
    request = Request.from_prompt("hello world", model=GPT, max_tokens=10, response_model=schema)
    sent = json.dumps(schema.openai_response_format(strict=True), separators=(",", ":"))
    # "hello world": ceil(11/4) + 4
    expected = 7 + math.ceil(len(sent) / 4) + 10
    assert expected == OpenAIProvider(api_key="k").admission(request, GPT)["tokens"]
    json_mode = OpenAIProvider(api_key="k", structured_outputs="json_object")
    on_the_wire = json_mode.chat_params(request)["messages"]
    from_wire = sum(math.ceil(len(m["content"]) / 4) + 4 for m in on_the_wire)
    charged = json_mode.admission(request, GPT)["tokens"] - 10
    assert 0 <= charged - from_wire <= 8  # the {"type": "json_object"} itself, and rounding


def test_anthropic_admission_counts_the_tool_as_input() -> None:
    """The forced tool's definition (by characters) and the tool-use system prompt are
    input tokens; output is unchanged."""
    provider = AnthropicProvider(api_key="sk-ant-test")
    plain = Request.from_prompt(PROMPT, model=CLAUDE, max_tokens=100)
    base = provider.admission(plain, CLAUDE)
    sizes = []
    for n in (1, 10, 100):
        schema = ResponseSchema.of(_schema_with(n))
        request = Request.from_prompt(PROMPT, model=CLAUDE, max_tokens=100, response_model=schema)
        charged = provider.admission(request, CLAUDE)
        tool = [schema.anthropic_tool(), schema.anthropic_tool_choice()]
        expected = math.ceil(len(json.dumps(tool, separators=(",", ":"))) / 4) + TOOL_PROMPT_TOKENS
        assert (base["input_tokens"] + expected, base["output_tokens"]) == (
            charged["input_tokens"],
            charged["output_tokens"],
        )
        sizes.append(charged["input_tokens"])
    assert sizes == sorted(set(sizes))


# -- the local model -----------------------------------------------------------------------


class Review(BaseModel):
    sentiment: Literal["pos", "neg", "neutral"]
    topic: str


@pytest.mark.local_model
async def test_local_model_answers_json_the_grammar_allows() -> None:
    """llama.cpp's grammar, built from the schema, makes even the 135M model write JSON
    the model validates (one short request: the CI machine is slow)."""
    request = Request.from_prompt(
        "Review: I loved this phone, the battery lasts for days.",
        response_model=Review,
        max_tokens=48,
    )
    async with LocalProvider(n_ctx=512) as provider:
        response = await provider.complete(request)
    assert "stop" == response.finish_reason
    assert isinstance(schema_of(request).validate(response.text), Review)
