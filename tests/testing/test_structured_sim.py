"""Structured outputs in the simulator, over real HTTP with the official SDKs.

OpenAI ``response_format`` (``json_schema``, strict or not, and ``json_object``),
Anthropic forced tools and ``output_config.format``; the ``invalid_json`` and
``schema_violations`` fractions and scripted spoils; re-asks; the counters; the Batch APIs.
Every answer is checked with ``jsonschema``, independently of the simulator's own code.
"""

from __future__ import annotations

import importlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal, cast

import aiohttp
import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from llmbatch.testing import (
    BatchSimConfig,
    FakeClock,
    Fault,
    RequestInfo,
    Simulator,
    SimulatorConfig,
)
from llmbatch.testing._content import content_tag
from llmbatch.testing._schema import SchemaError, instance, spoil_json, violate
from llmbatch.testing._structured import StructuredFaults, conversation
from llmbatch.testing.pytest_plugin import SimulatorFactory

jsonschema: Any = importlib.import_module("jsonschema")  # untyped: no stubs installed

GPT = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
PROMPT = "Summarize: the harbour reopened after the storm."

Verdict = Literal["valid", "invalid_json", "schema_violation"]

# -- schemas -------------------------------------------------------------------------------

#: the issue's example: four fields, strict
DOC: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "topics": {"type": "array", "items": {"type": "string"}},
        "sentiment": {"type": "string", "enum": ["pos", "neg", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["summary", "topics", "sentiment", "confidence"],
    "additionalProperties": False,
}

#: objects in objects, arrays of objects, enums, a nullable field; strict
NESTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tier": {"type": "string", "enum": ["free", "pro", "enterprise"]},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "tier", "address"],
            "additionalProperties": False,
        },
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                    "status": {"enum": ["open", "shipped", "returned"]},
                },
                "required": ["sku", "quantity", "status"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "paid": {"type": "boolean"},
    },
    "required": ["order_id", "customer", "lines", "note", "paid"],
    "additionalProperties": False,
}

#: ``$defs``/``$ref``, a recursive definition, a nullable reference; strict
REFS: dict[str, Any] = {
    "$defs": {
        "Person": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "Node": {
            "type": "object",
            "properties": {
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
            },
            "required": ["label", "children"],
            "additionalProperties": False,
        },
    },
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "author": {"$ref": "#/$defs/Person"},
        "reviewer": {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]},
        "outline": {"$ref": "#/$defs/Node"},
    },
    "required": ["title", "author", "reviewer", "outline"],
    "additionalProperties": False,
}

_CONSTRAINTS: dict[str, Any] = {
    "headline": {"type": "string"},
    "published": {"type": "string", "format": "date"},
    "contact": {"type": "string", "format": "email"},
    "id": {"type": "string", "format": "uuid"},
    "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "score": {"type": "integer", "exclusiveMinimum": 0, "maximum": 5},
    "price": {"type": "number", "minimum": 0, "maximum": 50, "multipleOf": 0.25},
    "labels": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
    "version": {"const": 2},
}
#: what strict mode accepts beyond types: formats, patterns, bounds, const
CONSTRAINED: dict[str, Any] = {
    "type": "object",
    "properties": _CONSTRAINTS,
    "required": list(_CONSTRAINTS),
    "additionalProperties": False,
}

#: what only a non-strict schema may say: lengths, uniqueness, allOf, optional properties,
#: a map, a tuple
LOOSE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 12, "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "uniqueItems": True},
        "extra": {"allOf": [{"type": "object", "properties": {"x": {"type": "number"}}}]},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        "maybe": {"type": "string"},
    },
    "required": ["title", "tags", "extra", "counts", "pair"],
}

#: a schema no value satisfies, and what the simulator says about it
EMPTY: dict[str, Any] = {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}
NO_INSTANCE = "In context=('properties', 'a'), an empty enum admits no value"

SCHEMAS = [
    pytest.param(DOC, True, id="flat"),
    pytest.param(NESTED, True, id="nested"),
    pytest.param(REFS, True, id="refs"),
    pytest.param(CONSTRAINED, True, id="constrained"),
    pytest.param(LOOSE, False, id="loose-not-strict"),
]


class Topic(BaseModel):
    """One topic with its weight."""

    name: str
    weight: float = Field(ge=0, le=1)


class Summary(BaseModel):
    """A typed summary, as a user would declare it."""

    summary: str
    topics: list[Topic]
    sentiment: Literal["pos", "neg", "neutral"]
    reviewer: str | None


class Brief(BaseModel):
    """A typed summary without constraints."""

    summary: str
    topics: list[str]
    sentiment: Literal["pos", "neg", "neutral"]
    reviewer: str | None


# -- helpers -------------------------------------------------------------------------------


def response_format(
    schema: Mapping[str, Any], *, strict: bool = True, name: str = "Answer"
) -> dict[str, Any]:
    """OpenAI's ``json_schema`` response format."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": strict},
    }


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def validator(schema: Mapping[str, Any]) -> Any:
    """A jsonschema validator that checks formats too."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def verdict(text: str, schema: Mapping[str, Any]) -> Verdict:
    """What an answer's text is, by jsonschema: valid, unparseable, or against the schema."""
    try:
        value = json.loads(text)
    except ValueError:
        return "invalid_json"
    return "valid" if validator(schema).is_valid(value) else "schema_violation"


def tagged(prompt: str) -> str:
    """The ``[tag]`` an answer to *prompt* carries."""
    return f"[{content_tag(prompt)}]"


def structured(sim: Simulator) -> dict[str, int]:
    return dict(sim.stats().structured)


def counters(**counts: int) -> dict[str, int]:
    """The ``structured`` counters: the ones given, and zero for the rest."""
    base = dict.fromkeys(
        ("answered", "invalid_json", "schema_violations", "truncated", "follow_ups"), 0
    )
    return {**base, **counts}


async def chat(
    client: openai.AsyncOpenAI,
    messages: Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any] = DOC,
    **options: Any,
) -> str:
    """The text of a json_schema (strict) chat completion."""
    options.setdefault("response_format", response_format(schema))
    completion = await client.chat.completions.create(
        model=GPT, messages=cast(Any, messages), **options
    )
    return completion.choices[0].message.content or ""


def forced_tool(schema: Mapping[str, Any] = DOC, name: str = "record") -> dict[str, Any]:
    """Anthropic ``tools`` and ``tool_choice`` forcing one tool."""
    return {
        "tools": [{"name": name, "description": "Record the answer.", "input_schema": schema}],
        "tool_choice": {"type": "tool", "name": name},
    }


async def tool_call(
    client: anthropic.AsyncAnthropic,
    messages: Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any] = DOC,
    **options: Any,
) -> anthropic.types.Message:
    """A Messages call forcing a tool whose input schema is *schema*."""
    message: anthropic.types.Message = await client.messages.create(
        model=CLAUDE,
        max_tokens=options.pop("max_tokens", 1024),
        messages=cast(Any, messages),
        **forced_tool(schema),
        **options,
    )
    return message


def tool_input(message: anthropic.types.Message) -> dict[str, Any]:
    block = message.content[0]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    return cast(dict[str, Any], block.input)


def openai_client(sim: Simulator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)


def anthropic_client(sim: Simulator) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-ant-test", max_retries=0)


@pytest.fixture
async def oai(simulator: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    """An OpenAI client on the default simulator."""
    async with openai.AsyncOpenAI(
        base_url=simulator.base_url, api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def claude(simulator: Simulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """An Anthropic client on the default simulator."""
    async with anthropic.AsyncAnthropic(
        base_url=simulator.url, api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


# -- OpenAI json_schema ----------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "strict"), SCHEMAS)
async def test_json_schema_answers_validate(
    oai: openai.AsyncOpenAI, schema: dict[str, Any], strict: bool
) -> None:
    """Every answer is JSON valid for its schema (formats included) and carries the
    prompt's tag in its first free-form string, for many prompts."""
    for i in range(25):
        prompt = f"{PROMPT} #{i}"
        text = await chat(
            oai, user(prompt), schema, response_format=response_format(schema, strict=strict)
        )
        assert [] == [e.message for e in validator(schema).iter_errors(json.loads(text))]
        assert tagged(prompt) in text


async def test_json_schema_answer_is_deterministic(oai: openai.AsyncOpenAI) -> None:
    """The same prompt gets the same JSON; another prompt gets another."""
    first = await chat(oai, user(PROMPT), NESTED)
    again = await chat(oai, user(PROMPT), NESTED)
    other = await chat(oai, user("Something else entirely."), NESTED)
    assert first == again
    assert first != other


async def test_json_schema_finishes_normally_and_counts_its_tokens(
    oai: openai.AsyncOpenAI,
) -> None:
    """A JSON answer ends with ``stop`` and costs about a token per four characters."""
    completion = await oai.chat.completions.create(
        model=GPT, messages=cast(Any, user(PROMPT)), response_format=cast(Any, response_format(DOC))
    )
    text = completion.choices[0].message.content or ""
    assert completion.usage is not None
    assert ("stop", -(-len(text) // 4)) == (
        completion.choices[0].finish_reason,
        completion.usage.completion_tokens,
    )


async def test_streamed_json_schema_answer_is_the_same_json(oai: openai.AsyncOpenAI) -> None:
    """Streaming delivers, chunk by chunk, the JSON the non-streamed answer has."""
    whole = await chat(oai, user(PROMPT), REFS)
    stream = await oai.chat.completions.create(
        model=GPT,
        messages=cast(Any, user(PROMPT)),
        response_format=cast(Any, response_format(REFS)),
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len(pieces) > 3
    assert whole == "".join(pieces)


async def test_sdk_parse_returns_the_pydantic_model(oai: openai.AsyncOpenAI) -> None:
    """``chat.completions.parse(response_format=Model)`` (the SDK's strict schema) parses."""
    completion = await oai.chat.completions.parse(
        model=GPT, messages=cast(Any, user(PROMPT)), response_format=Summary
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Summary)
    assert parsed.summary.startswith(tagged(PROMPT))


async def test_json_object_answers_a_json_object(oai: openai.AsyncOpenAI) -> None:
    """JSON mode answers an object carrying the prompt's tag."""
    prompt = "Reply in JSON: list some words."
    text = await chat(oai, user(prompt), response_format={"type": "json_object"})
    answer = json.loads(text)
    assert content_tag(prompt) == answer["tag"]
    assert all(isinstance(word, str) for word in answer["words"])


async def test_json_schema_without_a_schema_answers_a_json_object(
    oai: openai.AsyncOpenAI,
) -> None:
    """A ``json_schema`` format that names no schema gets what JSON mode gets."""
    loose = {"type": "json_schema", "json_schema": {"name": "anything"}}
    text = await chat(oai, user(PROMPT), response_format=loose)
    assert json.loads(await chat(oai, user(PROMPT), response_format={"type": "json_object"})) == (
        json.loads(text)
    )


async def test_text_format_answers_plain_text(oai: openai.AsyncOpenAI) -> None:
    """``{"type": "text"}`` is the plain answer, as without a response format."""
    text = await chat(oai, user(PROMPT), response_format={"type": "text"})
    plain = await oai.chat.completions.create(model=GPT, messages=cast(Any, user(PROMPT)))
    assert plain.choices[0].message.content == text
    assert text.startswith(tagged(PROMPT))


async def test_max_tokens_cuts_the_json(simulator: Simulator, oai: openai.AsyncOpenAI) -> None:
    """A JSON answer longer than ``max_tokens`` is cut there: ``length``, and no JSON."""
    completion = await oai.chat.completions.create(
        model=GPT,
        messages=cast(Any, user(PROMPT)),
        response_format=cast(Any, response_format(NESTED)),
        max_completion_tokens=5,
    )
    text = completion.choices[0].message.content or ""
    assert completion.usage is not None
    assert ("length", 5, 20) == (
        completion.choices[0].finish_reason,
        completion.usage.completion_tokens,
        len(text),
    )
    assert "invalid_json" == verdict(text, NESTED)
    assert counters(answered=1, truncated=1) == structured(simulator)


# -- OpenAI refusals -------------------------------------------------------------------------

_OBJECT = {"type": "object", "additionalProperties": False}


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        pytest.param(
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            "In context=(), 'additionalProperties' is required to be supplied and to be false.",
            id="no-additionalProperties",
        ),
        pytest.param(
            {**_OBJECT, "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
            | {"required": ["a"]},
            "In context=(), 'required' is required to be supplied and to be an array "
            "including every key in properties. Missing 'b'.",
            id="optional-property",
        ),
        pytest.param(
            {
                **_OBJECT,
                "properties": {
                    "author": {"type": "object", "properties": {"name": {"type": "string"}}}
                },
                "required": ["author"],
            },
            "In context=('properties', 'author'), 'additionalProperties' is required to be "
            "supplied and to be false.",
            id="nested-object",
        ),
        pytest.param(
            {
                **_OBJECT,
                "$defs": {"P": {"type": "object", "properties": {}}},
                "properties": {"p": {"$ref": "#/$defs/P"}},
                "required": ["p"],
            },
            "In context=('$defs', 'P'), 'additionalProperties' is required to be supplied and "
            "to be false.",
            id="in-defs",
        ),
        pytest.param(
            {
                **_OBJECT,
                "properties": {
                    "items": {"type": "array", "items": {"type": "object", "properties": {}}}
                },
                "required": ["items"],
            },
            "In context=('properties', 'items', 'items'), 'additionalProperties' is required "
            "to be supplied and to be false.",
            id="array-items",
        ),
        pytest.param(
            {"type": "array", "items": {"type": "string"}},
            "schema must be a JSON Schema of 'type: \"object\"', got 'type: \"array\"'.",
            id="root-array",
        ),
        pytest.param(
            {**_OBJECT, "properties": {"a": {"type": "string", "minLength": 3}}, "required": ["a"]},
            "In context=('properties', 'a'), 'minLength' is not permitted.",
            id="minLength",
        ),
        pytest.param(
            {
                **_OBJECT,
                "properties": {"a": {"allOf": [{"type": "string"}]}},
                "required": ["a"],
            },
            "In context=('properties', 'a'), 'allOf' is not permitted.",
            id="allOf",
        ),
        pytest.param(
            {
                **_OBJECT,
                "$defs": {"S": {"type": "string"}},
                "properties": {"a": {"$ref": "#/$defs/S", "description": "an a"}},
                "required": ["a"],
            },
            "In context=('properties', 'a'), $ref cannot have keywords {'description'}.",
            id="ref-with-siblings",
        ),
    ],
)
async def test_strict_mode_refuses_what_openai_refuses(
    simulator: Simulator, oai: openai.AsyncOpenAI, schema: dict[str, Any], problem: str
) -> None:
    """A strict schema outside OpenAI's strict subset gets OpenAI's 400, body and all."""
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(oai, user(PROMPT), schema)
    expected = {
        "error": {
            "message": f"Invalid schema for response_format 'Answer': {problem}",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": None,
        }
    }
    assert (400, expected) == (caught.value.status_code, caught.value.response.json())
    assert counters() == structured(simulator)


async def test_the_same_schema_passes_without_strict(oai: openai.AsyncOpenAI) -> None:
    """Without ``strict`` the rules do not apply: the answer still fits the schema."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
    text = await chat(oai, user(PROMPT), response_format=response_format(schema, strict=False))
    assert "valid" == verdict(text, schema)


async def test_a_refused_schema_is_not_charged(simulator_factory: SimulatorFactory) -> None:
    """The 400 comes at validation: it takes no request from the rate limit, and no ``nth``."""
    sim = await simulator_factory(
        rpm=1, clock=FakeClock(), script=[Fault(kind="invalid_json", nth=1)]
    )
    oai = openai_client(sim)
    async with oai:
        with pytest.raises(openai.BadRequestError):
            await chat(oai, user(PROMPT), {"type": "object", "properties": {}})
        assert "invalid_json" == verdict(await chat(oai, user(PROMPT)), DOC)
        with pytest.raises(openai.RateLimitError):
            await chat(oai, user(PROMPT))


@pytest.mark.parametrize(
    ("response_format_", "param", "code"),
    [
        pytest.param("json", "response_format", "invalid_type", id="not-an-object"),
        pytest.param({"type": "xml"}, "response_format.type", "invalid_value", id="unknown-type"),
        pytest.param(
            {"type": "json_schema"},
            "response_format.json_schema",
            "missing_required_parameter",
            id="no-json_schema",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"schema": DOC}},
            "response_format.json_schema.name",
            "missing_required_parameter",
            id="no-name",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "an answer", "schema": DOC}},
            "response_format.json_schema.name",
            "invalid_value",
            id="bad-name",
        ),
        pytest.param(
            {"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}},
            "response_format.json_schema.schema",
            "invalid_type",
            id="schema-not-object",
        ),
    ],
)
async def test_malformed_response_format_is_a_400(
    oai: openai.AsyncOpenAI, response_format_: object, param: str, code: str
) -> None:
    """A malformed ``response_format`` gets OpenAI's 400 naming the parameter."""
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(oai, user(PROMPT), response_format=response_format_)
    assert (param, code) == (caught.value.param, caught.value.code)


async def test_a_schema_without_an_instance_is_a_400(oai: openai.AsyncOpenAI) -> None:
    """A schema no value satisfies (an empty enum) is refused, not answered with junk."""
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(oai, user(PROMPT), response_format=response_format(EMPTY, strict=False))
    assert caught.value.message.endswith(
        f"Invalid schema for response_format 'Answer': {NO_INSTANCE}"
    )


# -- Anthropic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "strict"), SCHEMAS)
async def test_forced_tool_input_validates(
    claude: anthropic.AsyncAnthropic, schema: dict[str, Any], strict: bool
) -> None:
    """A forced tool answers one ``tool_use`` block whose input fits the input schema."""
    for i in range(10):
        prompt = f"{PROMPT} #{i}"
        message = await tool_call(claude, user(prompt), schema)
        block = message.content[0]
        assert isinstance(block, anthropic.types.ToolUseBlock)
        assert ("tool_use", "record", 1) == (message.stop_reason, block.name, len(message.content))
        assert block.id.startswith("toolu_")
        assert [] == [e.message for e in validator(schema).iter_errors(block.input)]
        assert tagged(prompt) in json.dumps(block.input)


async def test_tool_choice_any_calls_the_first_tool(claude: anthropic.AsyncAnthropic) -> None:
    """``tool_choice: any`` forces a call; the simulated model picks the first tool."""
    message = await claude.messages.create(
        model=CLAUDE,
        max_tokens=1024,
        messages=cast(Any, user(PROMPT)),
        tools=[
            {"name": "first", "input_schema": DOC},
            {"name": "second", "input_schema": NESTED},
        ],
        tool_choice={"type": "any"},
    )
    block = message.content[0]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert "first" == block.name
    assert "valid" == verdict(json.dumps(block.input), DOC)


async def test_tools_without_forcing_answer_text(claude: anthropic.AsyncAnthropic) -> None:
    """With ``tool_choice: auto`` the simulated model writes its plain text answer."""
    message = await claude.messages.create(
        model=CLAUDE,
        max_tokens=1024,
        messages=cast(Any, user(PROMPT)),
        tools=[{"name": "record", "input_schema": DOC}],
    )
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    assert ("end_turn", True) == (message.stop_reason, block.text.startswith(tagged(PROMPT)))


async def test_streamed_tool_call_has_the_same_input(claude: anthropic.AsyncAnthropic) -> None:
    """Streaming sends the input as partial JSON; the SDK rebuilds the same object."""
    whole = await tool_call(claude, user(PROMPT), NESTED)
    async with claude.messages.stream(
        model=CLAUDE, max_tokens=1024, messages=cast(Any, user(PROMPT)), **forced_tool(NESTED)
    ) as stream:
        final = await stream.get_final_message()
    assert "tool_use" == final.stop_reason
    assert tool_input(whole) == tool_input(final)


async def test_output_config_format_answers_json_text(claude: anthropic.AsyncAnthropic) -> None:
    """``messages.parse(output_format=Model)`` (``output_config.format``) gets JSON text
    that the SDK parses into the model. (The SDK moves constraints such as ``ge``/``le``
    into descriptions, which the simulated model does not read: hence a model without.)"""
    message = await claude.messages.parse(
        model=CLAUDE, max_tokens=1024, messages=cast(Any, user(PROMPT)), output_format=Brief
    )
    assert isinstance(message.parsed_output, Brief)
    assert message.parsed_output.summary.startswith(tagged(PROMPT))


async def test_a_cut_tool_call_stops_at_max_tokens(
    simulator: Simulator, claude: anthropic.AsyncAnthropic
) -> None:
    """A tool input longer than ``max_tokens`` stops with ``max_tokens``."""
    message = await tool_call(claude, user(PROMPT), NESTED, max_tokens=10)
    assert ("max_tokens", 10) == (message.stop_reason, message.usage.output_tokens)
    assert counters(answered=1, truncated=1) == structured(simulator)


async def test_server_tools_are_not_forced(claude: anthropic.AsyncAnthropic) -> None:
    """A server tool beside the forced one is left alone (it has no input schema)."""
    options = forced_tool(DOC)
    options["tools"] = [{"type": "web_search_20250305", "name": "web_search"}, *options["tools"]]
    message = await claude.messages.create(
        model=CLAUDE, max_tokens=1024, messages=cast(Any, user(PROMPT)), **options
    )
    assert "valid" == verdict(json.dumps(tool_input(message)), DOC)


async def test_a_cut_tool_call_keeps_the_leading_properties_that_fit(
    claude: anthropic.AsyncAnthropic,
) -> None:
    """A tool call cut at ``max_tokens`` keeps the top-level properties that fit, whole."""
    whole = tool_input(await tool_call(claude, user(PROMPT), NESTED))
    cut = tool_input(await tool_call(claude, user(PROMPT), NESTED, max_tokens=60))
    assert 0 < len(cut) < len(whole)
    assert {key: whole[key] for key in cut} == cut


async def test_a_schema_nothing_can_break_stays_valid(
    simulator_factory: SimulatorFactory,
) -> None:
    """When no property can be dropped or retyped (and a tool input must stay an object),
    a violation cannot be made: the answer is valid and counted as such."""
    sim = await simulator_factory(schema_violations=1.0)
    schema = {"type": "object", "properties": {"anything": {}}}
    claude = anthropic_client(sim)
    async with claude:
        message = await tool_call(claude, user(PROMPT), schema)
    assert "valid" == verdict(json.dumps(tool_input(message)), schema)
    assert counters(answered=1) == structured(sim)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {
                "tools": [{"name": "a", "input_schema": DOC}],
                "tool_choice": {"type": "tool", "name": "b"},
            },
            "tool_choice.name: no tool named 'b' in tools",
            id="unknown-tool",
        ),
        pytest.param(
            {"tool_choice": {"type": "any"}},
            "tool_choice may only be specified while providing tools.",
            id="no-tools",
        ),
        pytest.param(
            {"tools": {"name": "a"}}, "tools: Input should be a valid list", id="tools-not-list"
        ),
        pytest.param(
            {"tools": ["a"]}, "tools.0: Input should be a valid dictionary", id="tool-not-object"
        ),
        pytest.param(
            {"tools": [{"input_schema": DOC}]}, "tools.0.custom.name: Field required", id="no-name"
        ),
        pytest.param(
            {"tools": [{"name": "a"}]},
            "tools.0.custom.input_schema: Field required",
            id="no-input-schema",
        ),
        pytest.param(
            {"tools": [{"name": "a", "input_schema": DOC}], "tool_choice": {"type": "some"}},
            "tool_choice: Input tag 'some' found using 'type' does not match any of the "
            "expected tags: 'auto', 'any', 'tool', 'none'",
            id="unknown-choice",
        ),
        pytest.param(
            {"output_config": {"format": {"type": "xml"}}},
            "output_config.format.type: Input should be 'json_schema'",
            id="output-format-type",
        ),
        pytest.param(
            {"output_config": {"format": {"type": "json_schema"}}},
            "output_config.format.schema: Field required",
            id="output-format-no-schema",
        ),
        pytest.param(
            {"tools": [{"name": "a", "input_schema": {"type": "array"}}]},
            "tools.0.custom.input_schema.type: Input should be 'object'",
            id="array-input",
        ),
        pytest.param(
            forced_tool(EMPTY),
            f"Invalid JSON schema: {NO_INSTANCE}",
            id="no-instance",
        ),
    ],
)
async def test_bad_tools_get_anthropics_400(
    claude: anthropic.AsyncAnthropic, options: dict[str, Any], message: str
) -> None:
    """Malformed tools, or a schema without an instance, get Anthropic's error shape."""
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(
            model=CLAUDE, max_tokens=100, messages=cast(Any, user(PROMPT)), **options
        )
    body = caught.value.response.json()
    assert ("error", "invalid_request_error", message) == (
        body["type"],
        body["error"]["type"],
        body["error"]["message"],
    )


# -- spoiled answers: fractions ----------------------------------------------------------------


async def verdicts(sim: Simulator, prompts: Sequence[str]) -> dict[str, str]:
    """Ask each prompt once (json_schema, DOC); the verdict on each answer."""
    oai = openai_client(sim)
    async with oai:
        return {prompt: verdict(await chat(oai, user(prompt)), DOC) for prompt in prompts}


PROMPTS = [f"Summarize document {i}." for i in range(120)]


async def test_fractions_spoil_about_that_share(simulator_factory: SimulatorFactory) -> None:
    """``invalid_json`` and ``schema_violations`` spoil about their share of the answers,
    and the counters agree with what the client saw."""
    sim = await simulator_factory(invalid_json=0.2, schema_violations=0.2, seed=3)
    seen = Counter((await verdicts(sim, PROMPTS)).values())
    assert 12 <= seen["invalid_json"] <= 36
    assert 12 <= seen["schema_violation"] <= 36
    expected = counters(
        answered=120,
        invalid_json=seen["invalid_json"],
        schema_violations=seen["schema_violation"],
    )
    assert expected == structured(sim)


async def test_fractions_are_drawn_per_prompt_from_the_seed(
    simulator_factory: SimulatorFactory,
) -> None:
    """The same seed spoils the same prompts the same way, whatever the order or repeats;
    another seed spoils others."""
    options = {"invalid_json": 0.25, "schema_violations": 0.25}
    first = await simulator_factory(seed=5, **options)
    second = await simulator_factory(seed=5, **options)
    other = await simulator_factory(seed=6, **options)
    prompts = PROMPTS[:40]
    oai1 = openai_client(first)
    oai2 = openai_client(second)
    async with oai1, oai2:
        forward = [await chat(oai1, user(p)) for p in prompts]
        backward = [await chat(oai2, user(p)) for p in reversed(prompts)][::-1]
        repeated = [await chat(oai1, user(p)) for p in prompts]
    assert forward == backward == repeated
    assert await verdicts(first, prompts) != await verdicts(other, prompts)


async def test_spoiled_answers_keep_the_tag(simulator_factory: SimulatorFactory) -> None:
    """Broken or violating, an answer still says which prompt it answers."""
    sim = await simulator_factory(invalid_json=0.5, schema_violations=0.5)
    oai = openai_client(sim)
    async with oai:
        for prompt in PROMPTS[:30]:
            assert tagged(prompt) in await chat(oai, user(prompt))


async def test_violations_drop_a_required_property_or_change_a_type(
    simulator_factory: SimulatorFactory,
) -> None:
    """A schema violation is valid JSON with one error: a required property missing, or
    one of a wrong type (which a validator may report as ``type``, ``anyOf`` or ``enum``);
    both kinds occur."""
    sim = await simulator_factory(schema_violations=1.0)
    oai = openai_client(sim)
    kinds: Counter[str] = Counter()
    async with oai:
        for prompt in PROMPTS[:30]:
            errors = list(
                validator(NESTED).iter_errors(json.loads(await chat(oai, user(prompt), NESTED)))
            )
            assert 1 == len(errors)
            kinds["missing" if "required" == errors[0].validator else "wrong type"] += 1
    assert {"missing", "wrong type"} == set(kinds)


async def test_invalid_json_does_not_parse(simulator_factory: SimulatorFactory) -> None:
    """``invalid_json`` answers never parse (cut short, or a trailing comma); JSON mode
    and a scalar schema are spoiled too."""
    sim = await simulator_factory(invalid_json=1.0)
    oai = openai_client(sim)
    async with oai:
        for prompt in PROMPTS[:20]:
            assert "invalid_json" == verdict(await chat(oai, user(prompt)), DOC)
        json_mode = await chat(oai, user("json please"), response_format={"type": "json_object"})
        scalar = {"type": "integer"}
        number = await chat(
            oai, user(PROMPT), response_format=response_format(scalar, strict=False)
        )
    assert "invalid_json" == verdict(json_mode, {})
    assert "invalid_json" == verdict(number, scalar)


async def test_fractions_spoil_forced_tool_calls(simulator_factory: SimulatorFactory) -> None:
    """For a forced tool, a violation is a ``tool_use`` input that breaks the schema;
    invalid JSON is a text block holding broken JSON instead of the call."""
    violating = await simulator_factory(schema_violations=1.0)
    broken = await simulator_factory(invalid_json=1.0)
    claude1 = anthropic_client(violating)
    claude2 = anthropic_client(broken)
    async with claude1, claude2:
        message = await tool_call(claude1, user(PROMPT))
        assert "schema_violation" == verdict(json.dumps(tool_input(message)), DOC)
        message = await tool_call(claude2, user(PROMPT))
        block = message.content[0]
        assert isinstance(block, anthropic.types.TextBlock)
        assert ("end_turn", "invalid_json") == (message.stop_reason, verdict(block.text, DOC))
        assert tagged(PROMPT) in block.text


async def test_plain_requests_are_never_spoiled(simulator_factory: SimulatorFactory) -> None:
    """Requests that ask for no JSON answer as always, and are not counted."""
    sim = await simulator_factory(invalid_json=0.5, schema_violations=0.5)
    async with Simulator() as clean:
        oai, claude = openai_client(sim), anthropic_client(sim)
        oai0, claude0 = openai_client(clean), anthropic_client(clean)
        async with oai, claude, oai0, claude0:
            for prompt in PROMPTS[:10]:
                got = await oai.chat.completions.create(model=GPT, messages=cast(Any, user(prompt)))
                want = await oai0.chat.completions.create(
                    model=GPT, messages=cast(Any, user(prompt))
                )
                assert want.choices[0].message.content == got.choices[0].message.content
                reply = await claude.messages.create(
                    model=CLAUDE, max_tokens=100, messages=cast(Any, user(prompt))
                )
                expected = await claude0.messages.create(
                    model=CLAUDE, max_tokens=100, messages=cast(Any, user(prompt))
                )
                assert expected.content == reply.content
    assert counters() == structured(sim)


# -- re-asks -------------------------------------------------------------------------------------

REASK = (
    "That answer is not valid for the JSON Schema Answer:\n- it could not be read as JSON\n"
    "Answer again with only the corrected JSON object, valid against the schema."
)


async def test_a_reask_is_not_spoiled_and_answers_the_original_prompt(
    simulator_factory: SimulatorFactory,
) -> None:
    """A follow-up (the bad answer, then a user turn) is never spoiled by the fractions;
    it gets the JSON the original prompt would have got unspoiled."""
    sim = await simulator_factory(invalid_json=1.0)
    clean = await simulator_factory()
    oai = openai_client(sim)
    oai0 = openai_client(clean)
    async with oai, oai0:
        bad = await chat(oai, user(PROMPT))
        reask = [*user(PROMPT), {"role": "assistant", "content": bad}, *user(REASK)]
        fixed = await chat(oai, reask)
        want = await chat(oai0, user(PROMPT))
    assert ("invalid_json", "valid") == (verdict(bad, DOC), verdict(fixed, DOC))
    assert json.loads(want) == json.loads(fixed)
    assert counters(answered=2, invalid_json=1, follow_ups=1) == structured(sim)


async def test_a_tool_reask_with_a_tool_result_is_not_spoiled(
    simulator_factory: SimulatorFactory,
) -> None:
    """Anthropic's re-ask shape (the ``tool_use`` turn, then a ``tool_result`` saying what
    is wrong) follows up too: the call is valid and belongs to the first prompt."""
    sim = await simulator_factory(schema_violations=1.0)
    claude = anthropic_client(sim)
    async with claude:
        first = await tool_call(claude, user(PROMPT))
        block = first.content[0]
        assert isinstance(block, anthropic.types.ToolUseBlock)
        reask = [
            *user(PROMPT),
            {"role": "assistant", "content": [block.model_dump(exclude_none=True)]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": block.id,
                        "is_error": True,
                        "content": "The input does not match the schema; call the tool again.",
                    }
                ],
            },
        ]
        second = await tool_call(claude, reask)
    assert "schema_violation" == verdict(json.dumps(block.input), DOC)
    assert "valid" == verdict(json.dumps(tool_input(second)), DOC)
    assert tagged(PROMPT) in json.dumps(tool_input(second))
    assert counters(answered=2, schema_violations=1, follow_ups=1) == structured(sim)


async def test_any_multi_turn_conversation_counts_as_a_follow_up(
    simulator_factory: SimulatorFactory,
) -> None:
    """Recognizing a re-ask needs no special wording: a user turn after an assistant turn
    is a follow-up (and a few-shot conversation is one too)."""
    sim = await simulator_factory(invalid_json=1.0)
    oai = openai_client(sim)
    few_shot = [
        {"role": "system", "content": "Answer in JSON."},
        *user("Example question"),
        {"role": "assistant", "content": '{"summary": "example"}'},
        *user(PROMPT),
    ]
    async with oai:
        text = await chat(oai, few_shot)
    assert "valid" == verdict(text, DOC)
    assert tagged(PROMPT) in text  # no tagged answer before: the last user turn is the prompt
    assert counters(answered=1, follow_ups=1) == structured(sim)


# -- spoiled answers: scripts --------------------------------------------------------------------


async def test_scripted_spoils_hit_their_nth_request_reasks_included(
    simulator_factory: SimulatorFactory,
) -> None:
    """``Fault(kind="invalid_json" | "schema_violation", nth=...)`` spoils that request,
    a re-ask too; a request that asks for no JSON ignores it."""
    script = [
        Fault(kind="invalid_json", nth=1),
        Fault(kind="schema_violation", nth=2),
        Fault(kind="invalid_json", nth=3),
        Fault(kind="schema_violation", nth=4),
    ]
    sim = await simulator_factory(script=script)
    oai = openai_client(sim)
    async with oai:
        first = await chat(oai, user(PROMPT))
        second = await chat(oai, user("Another document."))
        plain = await oai.chat.completions.create(model=GPT, messages=cast(Any, user(PROMPT)))
        reask = [*user(PROMPT), {"role": "assistant", "content": first}, *user(REASK)]
        fourth = await chat(oai, reask)
        fifth = await chat(oai, reask)
    assert ["invalid_json", "schema_violation", "schema_violation", "valid"] == [
        verdict(text, DOC) for text in (first, second, fourth, fifth)
    ]
    assert (plain.choices[0].message.content or "").startswith(tagged(PROMPT))
    expected = counters(answered=4, invalid_json=1, schema_violations=2, follow_ups=2)
    assert (expected, {}) == (structured(sim), dict(sim.stats().faults))


async def test_a_script_callable_can_spoil_by_content(simulator_factory: SimulatorFactory) -> None:
    """A callable script decides per request, e.g. by what the prompt says."""

    def poison(info: RequestInfo) -> Fault | None:
        return Fault(kind="schema_violation") if "poison" in json.dumps(info.body) else None

    sim = await simulator_factory(script=poison)
    claude = anthropic_client(sim)
    async with claude:
        bad = await tool_call(claude, user("poison pill"))
        good = await tool_call(claude, user("fine document"))
    assert ["schema_violation", "valid"] == [
        verdict(json.dumps(tool_input(message)), DOC) for message in (bad, good)
    ]


# -- statistics and configuration ----------------------------------------------------------------


async def test_stats_endpoint_serves_the_structured_counters(
    simulator_factory: SimulatorFactory,
) -> None:
    """``GET /stats`` carries ``structured``; ``POST /stats/reset`` zeroes it."""
    sim = await simulator_factory(script=[Fault(kind="invalid_json", nth=1, key="sk-ant-test")])
    oai, claude = openai_client(sim), anthropic_client(sim)
    async with oai, claude, aiohttp.ClientSession() as http:
        await chat(oai, user(PROMPT))
        await tool_call(claude, user(PROMPT))
        await oai.chat.completions.create(model=GPT, messages=cast(Any, user(PROMPT)))
        async with http.get(f"{sim.url}/stats") as response:
            served = (await response.json())["structured"]
        async with http.post(f"{sim.url}/stats/reset"):
            pass
    assert counters(answered=2, invalid_json=1) == served
    assert counters() == structured(sim)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"invalid_json": -0.1}, id="negative"),
        pytest.param({"schema_violations": 1.5}, id="above-one"),
        pytest.param({"invalid_json": 0.6, "schema_violations": 0.6}, id="sum-above-one"),
    ],
)
def test_fractions_must_be_fractions(options: dict[str, Any]) -> None:
    """Out-of-range fractions are refused when the configuration is built."""
    with pytest.raises(ValueError, match="invalid_json"):
        SimulatorConfig(**options)


# -- the Batch APIs ----------------------------------------------------------------------------


async def test_openai_batch_answers_json_unspoiled(simulator_factory: SimulatorFactory) -> None:
    """Batch lines get the same answers as online requests, never spoiled by the online
    fractions: plain text as ever, a json_schema line its valid JSON, a strict schema the
    online endpoint refuses the same 400 in the error file."""
    wall = FakeClock(start=1_700_000_000.0)
    batch = BatchSimConfig(validating_seconds=1, seconds_per_request=1, finalizing_seconds=1)
    sim = await simulator_factory(
        invalid_json=0.5, schema_violations=0.5, batch=batch, batch_clock=wall.time
    )
    clean = await simulator_factory()
    bodies = {
        "plain": {"model": GPT, "messages": user(PROMPT)},
        "doc": {"model": GPT, "messages": user(PROMPT), "response_format": response_format(DOC)},
        "json": {
            "model": GPT,
            "messages": user(PROMPT),
            "response_format": {"type": "json_object"},
        },
        "refused": {
            "model": GPT,
            "messages": user(PROMPT),
            "response_format": response_format({"type": "object", "properties": {}}),
        },
        "empty": {
            "model": GPT,
            "messages": user(PROMPT),
            "response_format": response_format(EMPTY, strict=False),
        },
    }
    lines = [
        {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}
        for key, body in bodies.items()
    ]
    oai = openai_client(sim)
    oai0 = openai_client(clean)
    async with oai, oai0:
        data = "\n".join(json.dumps(line) for line in lines).encode()
        upload = await oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        job = await oai.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wall.advance(1 + 5 + 1)
        done = await oai.batches.retrieve(job.id)
        assert done.output_file_id is not None
        assert done.error_file_id is not None
        output = (await oai.files.content(done.output_file_id)).text.splitlines()
        errors = (await oai.files.content(done.error_file_id)).text.splitlines()
        online = {}
        for key in ("plain", "doc", "json"):
            completion = await oai0.chat.completions.create(**cast(Any, bodies[key]))
            online[key] = completion.choices[0].message.content
    answers = {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
        for line in map(json.loads, output)
    }
    assert online == answers
    assert "valid" == verdict(answers["doc"], DOC)
    refused = {line["custom_id"]: line["response"] for line in map(json.loads, errors)}
    assert {"refused": 400, "empty": 400} == {k: r["status_code"] for k, r in refused.items()}
    assert {
        "refused": "Invalid schema for response_format 'Answer': In context=(), "
        "'additionalProperties' is required to be supplied and to be false.",
        "empty": f"Invalid schema for response_format 'Answer': {NO_INSTANCE}",
    } == {key: r["body"]["error"]["message"] for key, r in refused.items()}
    assert counters() == structured(sim)


async def test_anthropic_batch_answers_forced_tools(simulator_factory: SimulatorFactory) -> None:
    """A Message Batch request forcing a tool succeeds with the ``tool_use`` call an
    online request gets, unspoiled; a bad tool_choice errors with Anthropic's message."""
    wall = FakeClock(start=1_700_000_000.0)
    batch = BatchSimConfig(seconds_per_request=1, finalizing_seconds=1)
    sim = await simulator_factory(schema_violations=1.0, batch=batch, batch_clock=wall.time)
    clean = await simulator_factory()
    params = {"model": CLAUDE, "max_tokens": 1024, "messages": user(PROMPT), **forced_tool(NESTED)}
    bad = {**params, "tool_choice": {"type": "tool", "name": "missing"}}
    empty = {**params, **forced_tool(EMPTY)}
    claude = anthropic_client(sim)
    claude0 = anthropic_client(clean)
    async with claude, claude0:
        job = await claude.messages.batches.create(
            requests=cast(
                Any,
                [
                    {"custom_id": "tool", "params": params},
                    {"custom_id": "bad", "params": bad},
                    {"custom_id": "empty", "params": empty},
                ],
            )
        )
        wall.advance(3 + 1)
        results = {
            line.custom_id: line.result
            async for line in await claude.messages.batches.results(job.id)
        }
        online = await claude0.messages.create(**cast(Any, params))
    succeeded = results["tool"]
    assert isinstance(succeeded, anthropic.types.messages.MessageBatchSucceededResult)
    assert "tool_use" == succeeded.message.stop_reason
    assert tool_input(online) == tool_input(succeeded.message)
    messages = {}
    for key in ("bad", "empty"):
        errored = results[key]
        assert isinstance(errored, anthropic.types.messages.MessageBatchErroredResult)
        messages[key] = errored.error.error.message
    assert {
        "bad": "tool_choice.name: no tool named 'missing' in tools",
        "empty": f"Invalid JSON schema: {NO_INSTANCE}",
    } == messages


# -- the pieces, as pure functions -------------------------------------------------------------


def said(prompt: str) -> str:
    """An assistant's answer to *prompt* (it carries the tag)."""
    return json.dumps({"summary": f"{tagged(prompt)} text"})


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        pytest.param(user("A"), ("A", False), id="one-turn"),
        pytest.param([*user("A"), *user("B")], ("B", False), id="two-user-turns"),
        pytest.param(
            [*user("A"), {"role": "assistant", "content": said("A")}, *user("fix it")],
            ("A", True),
            id="reask",
        ),
        pytest.param(
            [*user("A"), {"role": "assistant", "content": "no tag here"}, *user("B")],
            ("B", True),
            id="untagged-answer",
        ),
        pytest.param(
            [
                *user("A"),
                {"role": "assistant", "content": said("A")},
                *user("B"),
                {"role": "assistant", "content": said("B")},
                *user("fix it"),
            ],
            ("A", True),
            id="first-tagged-answer-wins",
        ),
        pytest.param(
            [
                *user("A"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": said("A")}}],
                },
                *user("fix it"),
            ],
            ("A", True),
            id="openai-tool-call",
        ),
        pytest.param(
            [
                {"role": "user", "content": [{"type": "text", "text": "A"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "input": {"s": f"{tagged('A')} x"}}],
                },
                {"role": "user", "content": [{"type": "tool_result", "content": "bad"}]},
            ],
            ("A", True),
            id="anthropic-tool-use",
        ),
        pytest.param(
            [*user("A"), {"role": "assistant", "content": said("A")}],
            ("A", False),
            id="ends-with-the-answer",
        ),
    ],
)
def test_conversation_finds_the_prompt_and_the_follow_up(
    messages: list[dict[str, Any]], expected: tuple[str, bool]
) -> None:
    """How a request is read: which prompt it answers, and whether it is a follow-up."""
    assert expected == conversation(messages)


def test_structured_faults_refuse_bad_fractions() -> None:
    """The fractions' own value object checks them too."""
    with pytest.raises(ValueError, match="sum to <= 1"):
        StructuredFaults(invalid_json=0.7, schema_violations=0.7)


_BOOLEANS = {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True}


@pytest.mark.parametrize(
    "schema",
    [
        pytest.param(
            {"properties": {"a": {"type": "string"}}, "required": ["a"]}, id="typeless-object"
        ),
        pytest.param({"items": {"type": "integer"}, "minItems": 1}, id="typeless-array"),
        pytest.param({"minimum": 3, "exclusiveMaximum": 4}, id="typeless-number"),
        pytest.param({"type": ["null", "integer"]}, id="type-list"),
        pytest.param({"type": "null"}, id="null"),
        pytest.param({"type": "boolean"}, id="boolean"),
        pytest.param(True, id="true-schema"),
        pytest.param({"anyOf": [{"type": "null"}]}, id="only-null"),
        pytest.param(
            {
                "$defs": {"A": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                "allOf": [{"$ref": "#/$defs/A"}, {"required": ["a"]}, True],
            },
            id="allOf-with-refs",
        ),
        pytest.param(
            {
                "type": "array",
                "prefixItems": [{"type": "string", "maxLength": 5}],
                "items": {"$ref": "#/prefixItems/0"},
                "minItems": 3,
            },
            id="ref-into-a-list",
        ),
        pytest.param(
            {
                "type": "object",
                "properties": {"self": {"$ref": "#"}, "n": {"type": "integer"}},
                "required": ["n"],
            },
            id="ref-to-root",
        ),
        pytest.param(
            {
                "type": "object",
                "properties": {"deep": {"$ref": "#/$defs/D"}},
                "required": ["deep"],
                "$defs": {
                    "D": {
                        "type": "object",
                        "properties": {
                            "next": {"anyOf": [{"$ref": "#/$defs/D"}, {"type": "null"}]},
                            "kind": {"enum": ["a", None]},
                            "t": {"type": ["string", "null"]},
                        },
                        "required": ["next", "kind", "t"],
                    }
                },
            },
            id="nullable-recursion-ends",
        ),
        pytest.param(
            {"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "maxItems": 1},
            id="closed-tuple",
        ),
        pytest.param(
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "array",
                "items": [{"type": "integer"}, {"type": "string"}],
                "additionalItems": False,
                "minItems": 2,
            },
            id="draft7-tuple",
        ),
        pytest.param(
            {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 3},
            id="map",
        ),
        pytest.param(
            {"type": "object", "properties": {}, "required": ["x", "y"]}, id="required-only"
        ),
        pytest.param({**_BOOLEANS, "minItems": 2}, id="unique-booleans"),
        pytest.param({"type": "string", "minLength": 80}, id="long-string"),
        pytest.param({"type": "string", "maxLength": 4}, id="too-short-for-a-tag"),
        pytest.param({"type": "number", "exclusiveMinimum": 1, "maximum": 2}, id="exclusive"),
        pytest.param({"type": "number", "minimum": 1, "exclusiveMinimum": True}, id="draft4"),
        pytest.param({"type": "integer", "maximum": -5}, id="negative-integer"),
        pytest.param({"type": "integer", "multipleOf": 0.5, "minimum": 3}, id="int-half-steps"),
        pytest.param({"type": "number", "multipleOf": 0.1, "maximum": 1}, id="tenths"),
        pytest.param({"type": "number", "multipleOf": 3, "maximum": 10}, id="number-threes"),
        pytest.param({"type": "string", "format": "ipv6"}, id="ipv6"),
        pytest.param({"type": "string", "format": "color"}, id="unknown-format"),
        pytest.param({"type": "string", "pattern": r"^[^a-z]{2}\D\W\S [xyz]x.$"}, id="classes"),
        pytest.param({"type": "string", "pattern": r"^(?:ab|cd)+?(e)\1$"}, id="groups"),
        pytest.param({"type": "string", "pattern": r"^(?>x+)y*+[0-9a-f]{4}$"}, id="atomic"),
        pytest.param({"type": "string", "pattern": r"^(?=.*\d)[a-z0-9]{3,}$"}, id="lookahead"),
        pytest.param({"type": "string", "pattern": "[^\u0100]end"}, id="unanchored"),
        pytest.param(
            {"type": "string", "pattern": r"^\w+$", "minLength": 2, "maxLength": 3},
            id="pattern-and-lengths",
        ),
    ],
)
def test_instances_validate(schema: Any) -> None:
    """The builder's values are valid for each schema (checked by jsonschema), whatever
    the seed."""
    check = validator(schema if isinstance(schema, Mapping) else {})
    for i in range(30):
        value, _ = instance(schema, seed=f"seed-{i}", tag=content_tag(str(i)))
        assert [] == [e.message for e in check.iter_errors(value)]


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        pytest.param(False, "a false schema admits no value", id="false"),
        pytest.param({"anyOf": []}, "an empty anyOf admits no value", id="empty-anyOf"),
        pytest.param({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems", id="items"),
        pytest.param({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength", id="length"),
        pytest.param(
            {"type": "integer", "minimum": 1.2, "maximum": 1.8}, "no integer", id="integer"
        ),
        pytest.param(
            {"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "no number", id="number"
        ),
        pytest.param(
            {"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4},
            "no multiple of multipleOf",
            id="multiple",
        ),
        pytest.param({"type": "number", "multipleOf": -1}, "multipleOf must be", id="step"),
        pytest.param(
            {"type": "object", "required": ["a"], "additionalProperties": False},
            "'a' is required but not allowed",
            id="required-not-allowed",
        ),
        pytest.param(
            {"type": "object", "minProperties": 1, "additionalProperties": False},
            "minProperties exceeds",
            id="minProperties",
        ),
        pytest.param(
            {"type": "array", "prefixItems": [{}], "items": False, "minItems": 2},
            "minItems exceeds prefixItems",
            id="closed-tuple",
        ),
        pytest.param({**_BOOLEANS, "minItems": 3}, "uniqueItems", id="unique"),
        pytest.param({"$ref": "https://example.com/s.json"}, "not a reference into", id="remote"),
        pytest.param({"$ref": "#/$defs/nope"}, "cannot be resolved", id="dangling"),
        pytest.param(
            {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "does not end", id="loop"
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
            "nests without end",
            id="endless",
        ),
        pytest.param(
            {"$defs": {"x": 3}, "$ref": "#/$defs/x"}, "expected a schema", id="not-a-schema"
        ),
        pytest.param({"type": "string", "pattern": "("}, "not a regular expression", id="bad-re"),
        pytest.param(
            {"type": "string", "pattern": "^(a)?(?(1)b|c)$"},
            "cannot build a string",
            id="conditional",
        ),
        pytest.param(
            {"type": "string", "pattern": "^a$", "minLength": 2}, "found no string", id="no-fit"
        ),
    ],
)
def test_schemas_without_an_instance(schema: Any, problem: str) -> None:
    """A schema the builder cannot satisfy raises SchemaError, saying why."""
    with pytest.raises(SchemaError, match=re.escape(problem)):
        instance(schema, seed="s")


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        pytest.param(
            DOC, {"summary": "[t] a", "topics": [], "sentiment": "pos", "confidence": 1}, id="doc"
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
            {"a": 1},
            id="closed-object",
        ),
        pytest.param(
            {"type": "object", "properties": {"a": {"enum": [True, None]}, "b": {"const": [1]}}},
            {"a": True, "b": [1]},
            id="enum-and-const-types",
        ),
        pytest.param(
            {
                "type": "object",
                "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "object"}]}},
            },
            {"a": 2},
            id="anyOf-types",
        ),
        pytest.param({"type": "array", "items": {"type": "string"}}, ["x"], id="array-root"),
    ],
)
def test_violations_break_the_schema(schema: Mapping[str, Any], value: Any) -> None:
    """A violation of a valid value is valid JSON that the schema refuses."""
    assert validator(schema).is_valid(value)
    broken = violate(schema, value, rng=random.Random(1))
    assert broken is not None
    assert not validator(schema).is_valid(json.loads(json.dumps(broken)))


def test_violate_gives_up_when_nothing_can_break() -> None:
    """An object whose properties accept anything cannot be broken while it stays an object."""
    schema = {"type": "object", "properties": {"a": {}, "b": {"anyOf": [{}, {"type": "array"}]}}}
    assert violate(schema, {"a": 1, "b": 2}, rng=random.Random(1), keep_object=True) is None


@pytest.mark.parametrize(
    "text", ['{"a":[1,2],"b":"[tag] x"}', "[1,2,3]", "{}", "[]", "42", '"[tag]"', "true"]
)
def test_spoiled_json_never_parses(text: str) -> None:
    """Whatever the draw, a spoiled document does not parse, and keeps the tag."""
    for i in range(20):
        spoiled = spoil_json(text, rng=random.Random(i), keep="[tag]")
        with pytest.raises(ValueError):
            json.loads(spoiled)
        assert ("[tag]" in text) == ("[tag]" in spoiled)
