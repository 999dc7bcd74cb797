"""Tests for llmbatch.structured: schemas per provider, validation, re-ask, finish reasons."""

from __future__ import annotations

import ast
import copy
import datetime
import enum
import importlib
import json
import pickle
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from llmbatch.errors import ContentFiltered, LLMBatchError, PermanentError
from llmbatch.structured import (
    FinishDecision,
    FinishPolicy,
    InvalidOutput,
    ResponseSchema,
    StrictSchema,
    decide,
)

jsonschema: Any = importlib.import_module("jsonschema")  # untyped: no stubs installed

# --- response models -------------------------------------------------------------------


class Sentiment(enum.Enum):
    POSITIVE = "pos"
    NEGATIVE = "neg"
    NEUTRAL = "neutral"


class Author(BaseModel):
    """Who wrote the document."""

    name: str = Field(min_length=1, description="full name")
    age: int | None = Field(default=None, ge=0)
    affiliation: str = "unknown"


class Doc(BaseModel):
    """A document, summarized."""

    summary: str = Field(max_length=200)
    topics: list[str] = Field(min_length=1)
    sentiment: Sentiment = Sentiment.NEUTRAL
    kind: Literal["article", "note"] = "article"
    author: Author
    coauthors: list[Author] = []
    score: float = Field(default=0.5, ge=0, le=1)
    meta: dict[str, int] = {}
    code: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")


class Node(BaseModel):
    """A tree (a recursive model)."""

    name: str
    children: list[Node] = []


class Plain(BaseModel):
    """Nothing strict mode cannot carry."""

    title: str
    count: int = 0
    tags: list[str] = []
    note: str | None = None


@dataclass
class Point:
    x: int
    label: str = "origin"


class Row(TypedDict):
    id: int
    text: str


DICT_SCHEMA: dict[str, Any] = {
    "title": "Extraction",
    "description": "Fields taken from a document.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "year": {"type": "integer", "minimum": 1900},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "site": {"type": "string", "format": "uri"},
    },
    "required": ["name", "year"],
}

#: keywords OpenAI's strict mode accepts (guides/structured-outputs, "Supported schemas")
OPENAI_STRICT_KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "anyOf",
    "enum",
    "const",
    "$ref",
    "$defs",
    "definitions",
    "title",
    "description",
    "pattern",
    "format",
    "multipleOf",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
}


def subschemas(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema of *schema* (that strict mode can have), with its JSON pointer."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            yield from subschemas(sub, f"{path}/{key}/{name}")
    if isinstance(schema.get("items"), dict):
        yield from subschemas(schema["items"], f"{path}/items")
    for i, sub in enumerate(schema.get("anyOf") or []):
        yield from subschemas(sub, f"{path}/anyOf/{i}")


def strict_violations(schema: dict[str, Any]) -> list[str]:
    """What OpenAI's strict mode would refuse in *schema* (empty: nothing)."""
    problems = []
    if schema.get("type") != "object":
        problems.append("#: the root is not an object")
    for path, node in subschemas(schema):
        unknown = set(node) - OPENAI_STRICT_KEYWORDS
        if unknown:
            problems.append(f"{path}: unsupported {sorted(unknown)}")
        if "$ref" in node:
            if len(node) > 1:
                problems.append(f"{path}: $ref with siblings {sorted(node)}")
            ref = node["$ref"]
            target: Any = schema
            for part in ref.removeprefix("#/").split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                problems.append(f"{path}: $ref {ref} points at nothing")
        elif not {"type", "anyOf", "enum", "const"} & set(node):
            problems.append(f"{path}: no type")
        if node.get("type") == "object" or "properties" in node:
            if node.get("type") != "object":
                problems.append(f"{path}: an object without type: object")
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: additionalProperties is not false")
            if list(node.get("required", ())) != list(node.get("properties", {})):
                problems.append(f"{path}: not every property is required")
    return problems


# --- ResponseSchema.of ------------------------------------------------------------------


def test_of_pydantic_model() -> None:
    """A pydantic model gives its name, its docstring and its JSON Schema."""
    schema = ResponseSchema.of(Doc)

    assert "Doc" == schema.name
    assert Doc is schema.model
    assert "A document, summarized." == schema.description
    assert "object" == schema.schema["type"]
    assert list(Doc.model_fields) == list(schema.schema["properties"])
    assert ["summary", "topics", "author"] == schema.schema["required"]


def test_of_is_idempotent_and_cached() -> None:
    """A ResponseSchema passes through; one model class gives one shared schema."""
    schema = ResponseSchema.of(Doc)

    assert schema is ResponseSchema.of(schema)
    assert schema is ResponseSchema.of(Doc)


def test_of_json_schema_dict() -> None:
    """A JSON Schema dict is named after its title and copied (later edits do not leak)."""
    original = copy.deepcopy(DICT_SCHEMA)
    schema = ResponseSchema.of(original)
    original["properties"]["name"]["type"] = "integer"

    assert "Extraction" == schema.name
    assert schema.model is None
    assert "Fields taken from a document." == schema.description
    assert DICT_SCHEMA == schema.schema


@pytest.mark.parametrize(
    "wrapped",
    [
        {"name": "extraction", "description": "the fields", "schema": DICT_SCHEMA},
        {
            "type": "json_schema",
            "json_schema": {
                "name": "extraction",
                "description": "the fields",
                "schema": DICT_SCHEMA,
            },
        },
    ],
    ids=["json_schema object", "response_format"],
)
def test_of_openai_wrapped_schema(wrapped: dict[str, Any]) -> None:
    """OpenAI's json_schema object (alone or inside response_format) is unwrapped."""
    schema = ResponseSchema.of(wrapped)

    assert ("extraction", "the fields") == (schema.name, schema.description)
    assert DICT_SCHEMA == schema.schema


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        (None, "response"),
        ("My schema: v2!", "My_schema_v2"),
        ("!!!", "response"),
        ("x" * 100, "x" * 64),
        ("ok-name_1", "ok-name_1"),
    ],
)
def test_names_are_provider_safe(title: str | None, expected: str) -> None:
    """Names fit ``[A-Za-z0-9_-]{1,64}``, which OpenAI and Anthropic both require."""
    data: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}}
    if title is not None:
        data["title"] = title

    assert expected == ResponseSchema.of(data).name


def test_of_adds_the_object_type_at_the_root() -> None:
    """A root with properties but no type is said to be an object (providers need it)."""
    schema = ResponseSchema.of({"properties": {"a": {"type": "integer"}}})

    assert "object" == schema.schema["type"]
    assert "object" == schema.anthropic_tool()["input_schema"]["type"]


class NotAModel:
    pass


@pytest.mark.parametrize(
    "response_model",
    [
        int,
        list[Doc],
        NotAModel,
        Doc.model_construct(),
        "Doc",
        {"type": "array", "items": {"type": "string"}},
        {"type": "string"},
    ],
    ids=["int", "list[Doc]", "plain class", "instance", "str", "array schema", "string schema"],
)
def test_of_refuses_what_is_not_an_object_model(response_model: Any) -> None:
    """Only models (or schemas) of a JSON object are accepted, with a TypeError."""
    with pytest.raises(TypeError):
        ResponseSchema.of(response_model)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"type": "objekt"}, "not a valid JSON Schema"),
        ({"type": "object", "required": "name"}, "not a valid JSON Schema"),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://x.test/s.json"}}},
            "only local",
        ),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "points at nothing"),
    ],
)
def test_of_refuses_broken_schemas(data: dict[str, Any], match: str) -> None:
    """A schema that is invalid or points elsewhere fails before any request is sent."""
    with pytest.raises(ValueError, match=match):
        ResponseSchema.of(data)


def test_dataclass_and_typeddict() -> None:
    """Classes pydantic validates (a dataclass, a TypedDict) work like models."""
    point = ResponseSchema.of(Point)
    row = ResponseSchema.of(Row)

    assert Point(x=3) == point.validate('{"x": 3}')
    assert {"id": 1, "text": "hi"} == row.validate('{"id": 1, "text": "hi"}')
    assert [] == strict_violations(point.strict_schema().schema)
    assert [] == strict_violations(row.strict_schema().schema)
    with pytest.raises(InvalidOutput) as info:
        row.validate('{"id": "one"}')
    assert ["id: Input should be a valid integer, unable to parse string as an integer"] == [
        info.value.errors[0]
    ]
    assert "text: Field required" in info.value.errors


def test_recursive_model() -> None:
    """A recursive model's root ``$ref`` is inlined; the recursion stays a ``$ref``."""
    schema = ResponseSchema.of(Node)
    strict = schema.strict_schema().schema

    assert "$ref" not in schema.schema
    assert "object" == schema.schema["type"]
    assert [] == strict_violations(strict)
    assert {"$ref": "#/$defs/Node"} == strict["$defs"]["Node"]["properties"]["children"]["anyOf"][
        0
    ]["items"]
    answer = '{"name": "a", "children": [{"name": "b", "children": null}]}'
    assert Node(name="a", children=[Node(name="b")]) == schema.validate(answer)


# --- strict_schema ---------------------------------------------------------------------

TRICKY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "Cat": {
            "type": "object",
            "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
            "required": ["kind"],
        },
        "Dog": {
            "type": "object",
            "properties": {"kind": {"const": "dog"}},
            "required": ["kind"],
        },
    },
    "properties": {
        "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
        "both": {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}},
            ]
        },
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        "free": {"type": "object"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "odd": {"type": "integer", "not": {"const": 3}},
        "keyed": {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
        "day": {"type": "string", "format": "date", "examples": ["2024-01-02"]},
        "implicit": {"properties": {"z": {"type": "boolean"}}},
    },
    "required": ["pet"],
}


@pytest.mark.parametrize(
    "response_model",
    [Doc, Author, Node, Plain, Point, Row, DICT_SCHEMA, TRICKY_SCHEMA],
    ids=lambda m: getattr(m, "__name__", None) or m.get("title") or "tricky",
)
def test_strict_schema_follows_openai_rules(response_model: Any) -> None:
    """Every object closed and fully required, only supported keywords, $refs alone and
    resolvable; and still a valid JSON Schema."""
    strict = ResponseSchema.of(response_model).strict_schema().schema

    assert [] == strict_violations(strict)
    jsonschema.Draft202012Validator.check_schema(strict)


def test_strict_optional_fields_become_nullable() -> None:
    """A property that was optional is required and nullable; one already nullable is
    not wrapped again; a required one stays as it was."""
    properties = ResponseSchema.of(Doc).strict_schema().schema["properties"]

    assert [{"type": "array", "items": {"type": "string"}, "minItems": 1}] == [
        {k: v for k, v in properties["topics"].items() if k != "title"}
    ]
    assert {"$ref": "#/$defs/Author"} == properties["author"]
    assert [
        {"type": "number", "minimum": 0, "maximum": 1},
        {"type": "null"},
    ] == properties["score"]["anyOf"]
    assert [{"$ref": "#/$defs/Sentiment"}, {"type": "null"}] == properties["sentiment"]["anyOf"]
    assert [{"type": "string", "pattern": "^[A-Z]{3}$"}, {"type": "null"}] == properties["code"][
        "anyOf"
    ]
    author = ResponseSchema.of(Doc).strict_schema().schema["$defs"]["Author"]["properties"]
    assert [{"type": "integer", "minimum": 0}, {"type": "null"}] == author["age"]["anyOf"]


def test_strict_keeps_defs_and_refs() -> None:
    """Shared definitions stay in ``$defs`` and are referred to, not copied."""
    strict = ResponseSchema.of(Doc).strict_schema().schema

    assert {"Author", "Sentiment"} == set(strict["$defs"])
    assert {"$ref": "#/$defs/Author"} == strict["properties"]["coauthors"]["anyOf"][0]["items"]
    assert ["pos", "neg", "neutral"] == strict["$defs"]["Sentiment"]["enum"]


def test_strict_inlines_a_ref_with_siblings() -> None:
    """A ``$ref`` with a description beside it is replaced by its target (siblings win)."""

    class Review(BaseModel):
        by: Author = Field(description="the reviewer")

    strict = ResponseSchema.of(Review).strict_schema().schema
    by = strict["properties"]["by"]

    assert "$ref" not in by
    assert "the reviewer" == by["description"]
    assert ["name", "age", "affiliation"] == by["required"]
    assert by["additionalProperties"] is False
    assert [] == strict_violations(strict)


def test_strict_moves_constraints_into_descriptions() -> None:
    """Constraints strict mode lacks are dropped, said in the description, and listed;
    the ones it supports stay."""
    strict = ResponseSchema.of(Doc).strict_schema()
    summary = strict.schema["properties"]["summary"]
    name = strict.schema["$defs"]["Author"]["properties"]["name"]

    assert "maxLength" not in summary
    assert "(maxLength: 200)" == summary["description"]
    assert "full name (minLength: 1)" == name["description"]
    assert not strict.exact
    assert "#/properties/summary: maxLength dropped (stated in the description)" in strict.changes
    assert (
        "#/$defs/Author/properties/name: minLength dropped (stated in the description)"
        in strict.changes
    )


def test_strict_changes_on_a_dict_schema() -> None:
    """Unsupported formats and constraints are reported with their JSON pointer."""
    strict = ResponseSchema.of(DICT_SCHEMA).strict_schema()
    properties = strict.schema["properties"]

    assert 1900 == properties["year"]["minimum"]
    assert "(uniqueItems: true)" == properties["tags"]["description"]
    assert '(format: "uri")' == properties["site"]["description"]
    assert "format" not in properties["site"]["anyOf"][0]
    assert {
        "#/properties/name: minLength dropped (stated in the description)",
        "#/properties/tags: uniqueItems dropped (stated in the description)",
        "#/properties/site: format 'uri' dropped (stated in the description)",
    } == set(strict.changes)


def test_strict_rewrites_compositions() -> None:
    """oneOf becomes anyOf, allOf is merged, a tuple relaxes to items, maps are closed."""
    strict = ResponseSchema.of(TRICKY_SCHEMA).strict_schema()
    properties = strict.schema["properties"]

    assert [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}] == properties["pet"]["anyOf"]
    both = properties["both"]["anyOf"][0]
    assert ["a", "b"] == both["required"]
    assert [{"type": "string"}, {"anyOf": [{"type": "integer"}, {"type": "null"}]}] == [
        both["properties"]["a"],
        both["properties"]["b"],
    ]
    assert {"anyOf": [{"type": "integer"}, {"type": "string"}]} == properties["pair"]["anyOf"][0][
        "items"
    ]
    assert {"type": "object", "properties": {}, "required": [], "additionalProperties": False} == (
        properties["counts"]["anyOf"][0]
    )
    assert "date" == properties["day"]["anyOf"][0]["format"]
    assert "object" == properties["implicit"]["anyOf"][0]["type"]
    assert {
        "#/properties/pet: oneOf became anyOf",
        "#/properties/both: allOf of 2 schemas merged into one",
        "#/properties/pair: a tuple (prefixItems) relaxed to items of any of its types",
        "#/properties/free: additionalProperties dropped: only the listed properties can appear",
        "#/properties/counts: additionalProperties dropped: only the listed properties can appear",
        "#/properties/odd: not dropped",
        "#/properties/keyed: patternProperties dropped",
        "#/properties/keyed: additionalProperties dropped: only the listed properties can appear",
    } == set(strict.changes)


def test_strict_draft7_tuple_items() -> None:
    """A draft-7 ``items`` list (a tuple) relaxes to items like ``prefixItems``."""
    schema = ResponseSchema.of(
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"p": {"type": "array", "items": [{"type": "number"}]}},
            "required": ["p"],
        }
    )
    strict = schema.strict_schema().schema

    assert {"type": "number"} == strict["properties"]["p"]["items"]
    assert [] == strict_violations(strict)


def test_strict_is_exact_when_nothing_is_lost() -> None:
    """Defaults and optional fields lose nothing: the rewrite is exact."""
    strict = ResponseSchema.of(Plain).strict_schema()

    assert () == strict.changes
    assert strict.exact


def test_strict_schema_leaves_the_original_alone() -> None:
    """The rewrite works on a copy, once per schema."""
    schema = ResponseSchema.of(TRICKY_SCHEMA)
    before = copy.deepcopy(schema.schema)

    first = schema.strict_schema()

    assert before == schema.schema
    assert TRICKY_SCHEMA == schema.schema
    assert first is schema.strict_schema()
    assert isinstance(first, StrictSchema)


def test_strict_nulls_for_absent_fields_validate_to_defaults() -> None:
    """What strict mode makes the model send for "nothing" (null) becomes the default."""
    answer = {
        "summary": "s",
        "topics": ["t"],
        "sentiment": None,
        "kind": None,
        "author": {"name": "Ann", "age": None, "affiliation": None},
        "coauthors": [{"name": "Bo", "age": 3, "affiliation": None}],
        "score": None,
        "meta": None,
        "code": None,
    }
    schema = ResponseSchema.of(Doc)
    jsonschema.validate(answer, schema.strict_schema().schema)

    doc = schema.validate(json.dumps(answer))

    assert (
        Doc(
            summary="s",
            topics=["t"],
            author=Author(name="Ann"),
            coauthors=[Author(name="Bo", age=3)],
        )
        == doc
    )


# --- the other provider forms ----------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_openai_response_format(strict: bool) -> None:
    """json_schema with the strict rewrite (or the schema as it is, as a hint)."""
    schema = ResponseSchema.of(Doc)
    expected_schema = schema.strict_schema().schema if strict else schema.schema

    assert {
        "type": "json_schema",
        "json_schema": {"name": "Doc", "schema": expected_schema, "strict": strict},
    } == schema.openai_response_format(strict=strict)


def test_anthropic_tool_and_choice() -> None:
    """A tool whose input schema is the model's, forced by tool_choice."""
    schema = ResponseSchema.of(Doc)

    assert {
        "name": "Doc",
        "description": "A document, summarized.",
        "input_schema": schema.schema,
    } == schema.anthropic_tool()
    assert {"type": "tool", "name": "Doc"} == schema.anthropic_tool_choice()


def test_anthropic_tool_without_description() -> None:
    """A schema that says nothing of itself still gets a tool description."""
    tool = ResponseSchema.of({"type": "object", "properties": {"a": {"type": "string"}}})

    assert (
        "Submit the answer: the input is the response object the task asks for."
        == tool.anthropic_tool()["description"]
    )


def test_llama_cpp_response_format() -> None:
    """A grammar-ready schema: annotations and unanchored patterns out, constraints in."""
    schema = ResponseSchema.of(
        {
            "title": "T",
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]+$", "title": "Code"},
                "word": {"type": "string", "pattern": "[a-z]+", "default": "x"},
                "name": {"type": "string", "minLength": 2, "description": "a name"},
            },
            "required": ["code"],
        }
    )

    assert {
        "type": "json_object",
        "schema": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]+$"},
                "word": {"type": "string"},
                "name": {"type": "string", "minLength": 2},
            },
            "required": ["code"],
        },
    } == schema.llama_cpp_response_format()


def test_llama_cpp_keeps_property_names_that_look_like_keywords() -> None:
    """Only schema keywords are removed, not properties named title or description."""
    grammar = ResponseSchema.of(Plain).llama_cpp_response_format()["schema"]

    assert ["title", "count", "tags", "note"] == list(grammar["properties"])
    assert ["title"] == grammar["required"]


def test_json_mode_instruction() -> None:
    """The instruction says JSON (OpenAI's JSON mode requires it) and carries the schema."""
    instruction = ResponseSchema.of(DICT_SCHEMA).json_mode_instruction()
    _, _, schema_text = instruction.partition("\n")
    expected = {k: v for k, v in DICT_SCHEMA.items() if k != "title"}

    assert "JSON" in instruction.splitlines()[0]
    assert expected == json.loads(schema_text)


# --- validate --------------------------------------------------------------------------

VALID_DOC = {
    "summary": "A short text.",
    "topics": ["x", "y"],
    "sentiment": "pos",
    "author": {"name": "Ann", "age": 40},
}


def test_validate_returns_the_model() -> None:
    """A valid answer becomes the model's instance, defaults applied."""
    doc = ResponseSchema.of(Doc).validate(json.dumps(VALID_DOC))

    assert (
        Doc(
            summary="A short text.",
            topics=["x", "y"],
            sentiment=Sentiment.POSITIVE,
            author=Author(name="Ann", age=40),
        )
        == doc
    )


@pytest.mark.parametrize(
    "template",
    [
        "```json\n{}\n```",
        "```JSON\n{}```",
        "Here it is:\n```\n{}\n```\nAnything else?",
        "Sure! {} Hope that helps {{or not}}.",
        "Use {{braces}} like this: {}",
        "   {}   \n",
    ],
)
def test_validate_finds_json_in_prose_and_fences(template: str) -> None:
    """The JSON object is read out of a code fence or surrounding prose."""
    text = template.replace("{}", json.dumps(VALID_DOC), 1)

    assert "A short text." == ResponseSchema.of(Doc).validate(text).summary


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "the answer is empty"),
        ("   ", "the answer is empty"),
        ("I cannot help with that.", "the answer has no JSON object in it"),
        (
            '{"summary": "x", "author": {"name": "Ann", "age": 40}',
            "the answer is not valid JSON: Expecting ',' delimiter: line 1 column 54 (char 53)",
        ),
        ("{'summary': 'x'}", "the answer is not valid JSON: Expecting property name enclosed"),
    ],
    ids=["empty", "blank", "prose", "truncated", "python dict"],
)
def test_validate_invalid_json(text: str, error: str) -> None:
    """No JSON object (or a broken one) fails with one line saying why; a truncated
    answer is not mistaken for the object nested in it."""
    with pytest.raises(InvalidOutput) as info:
        ResponseSchema.of(Doc).validate(text, attempts=2)

    assert 1 == len(info.value.errors)
    assert info.value.errors[0].startswith(error)
    assert text == info.value.raw
    assert 2 == info.value.attempts


def test_validate_schema_violations_are_listed() -> None:
    """Each violation is one readable line with its location."""
    answer = {
        "summary": "x" * 201,
        "topics": ["ok", 7],
        "sentiment": "angry",
        "author": {"name": ""},
        "score": 2,
    }
    text = json.dumps(answer)

    with pytest.raises(InvalidOutput) as info:
        ResponseSchema.of(Doc).validate(text)

    assert [
        "summary: String should have at most 200 characters",
        "topics.1: Input should be a valid string",
        "sentiment: Input should be 'pos', 'neg' or 'neutral'",
        "author.name: String should have at least 1 character",
        "score: Input should be less than or equal to 1",
    ] == info.value.errors
    assert text == info.value.raw
    assert (
        "the answer does not match the response model: summary: String should have at most "
        "200 characters (and 4 more)"
    ) == str(info.value)


def test_validate_null_for_a_required_field_is_an_error() -> None:
    """Only optional properties read null as absent."""
    with pytest.raises(InvalidOutput) as info:
        ResponseSchema.of(Doc).validate({**VALID_DOC, "summary": None})

    assert ["summary: Input should be a valid string"] == info.value.errors


def test_validate_a_tool_input() -> None:
    """Anthropic's tool input (a dict) is validated as it is; the error's raw is its JSON."""
    schema = ResponseSchema.of(Doc)

    assert Author(name="Ann", age=40) == schema.validate(VALID_DOC).author
    with pytest.raises(InvalidOutput) as info:
        schema.validate({"summary": "x"})
    assert {"summary": "x"} == json.loads(info.value.raw)
    assert ["topics: Field required", "author: Field required"] == info.value.errors


@pytest.mark.parametrize(
    "answer",
    ["[1, 2]", '"just a string"', "42", "null"],
)
def test_validate_refuses_a_non_object(answer: str) -> None:
    """JSON that is not an object is a violation at the root."""
    with pytest.raises(InvalidOutput) as info:
        ResponseSchema.of(Doc).validate(answer)

    assert [info.value.errors[0]] == [
        e for e in info.value.errors if e.startswith("(root): Input should be")
    ]


def test_validate_a_strict_pydantic_model() -> None:
    """A strict model reads JSON as JSON: a date string, an enum value, a list as tuple."""

    class Event(BaseModel):
        model_config = ConfigDict(strict=True)
        day: datetime.date
        mood: Sentiment
        span: tuple[int, int]

    event = ResponseSchema.of(Event).validate(
        '{"day": "2024-01-02", "mood": "neg", "span": [1, 2]}'
    )

    assert Event(day=datetime.date(2024, 1, 2), mood=Sentiment.NEGATIVE, span=(1, 2)) == event


def test_validate_a_dict_schema() -> None:
    """A schema dict validates with jsonschema and gives the dict; nulls for optional
    properties (strict mode's "absent") are dropped."""
    schema = ResponseSchema.of(DICT_SCHEMA)

    assert {"name": "Ann", "year": 1999} == schema.validate(
        '{"name": "Ann", "year": 1999, "tags": null, "site": null}'
    )
    with pytest.raises(InvalidOutput) as info:
        schema.validate('{"name": "A", "year": "1999", "tags": ["a", "a"]}')
    assert [
        "name: 'A' is too short",
        "year: '1999' is not of type 'integer'",
        "tags: ['a', 'a'] has non-unique elements",
    ] == info.value.errors


def test_validate_a_dict_schema_missing_property() -> None:
    """A missing required property is reported at the root."""
    with pytest.raises(InvalidOutput) as info:
        ResponseSchema.of(DICT_SCHEMA).validate('{"name": "Ann"}')

    assert ["(root): 'year' is a required property"] == info.value.errors


def test_validate_nulls_inside_a_union_branch() -> None:
    """A null for an optional field inside one branch of a tagged union is dropped too."""
    schema = ResponseSchema.of(TRICKY_SCHEMA)

    assert {"pet": {"kind": "dog"}} == schema.validate('{"pet": {"kind": "dog"}}')
    assert {"pet": {"kind": "cat"}} == schema.validate('{"pet": {"kind": "cat", "lives": null}}')


# --- InvalidOutput ---------------------------------------------------------------------


def test_invalid_output_is_a_permanent_error() -> None:
    """InvalidOutput fails the item (permanent), carrying the answer and its errors."""
    error = InvalidOutput(raw="{", errors=["a: bad"], attempts=1, item_key="k7")

    assert isinstance(error, PermanentError)
    assert isinstance(error, LLMBatchError)
    assert ("{", ["a: bad"], 1, "k7") == (error.raw, error.errors, error.attempts, error.item_key)
    assert "the answer does not match the response model: a: bad" == str(error)


def test_invalid_output_message() -> None:
    """A given message wins; with no errors the default says so."""
    assert "cut off" == str(InvalidOutput("cut off", errors=["x"]))
    assert "the answer does not match the response model: no details" == str(InvalidOutput())


def test_invalid_output_pickles() -> None:
    """The error crosses process boundaries (Ray, multiprocessing) with all it carries."""
    error = InvalidOutput(
        raw='{"a": 1', errors=["x: bad", "y: worse"], attempts=2, provider="openai", model="m"
    )

    copy_ = pickle.loads(pickle.dumps(error))

    assert InvalidOutput is type(copy_)
    assert (error.raw, error.errors, error.attempts) == (copy_.raw, copy_.errors, copy_.attempts)
    assert {"provider": "openai", "model": "m"} == copy_.context()
    assert str(error) == str(copy_)


# --- identity --------------------------------------------------------------------------


@pytest.mark.parametrize("response_model", [Doc, DICT_SCHEMA])
def test_response_schema_pickles(response_model: Any) -> None:
    """A used schema (validators memoized) pickles, equal, and still validates."""
    schema = ResponseSchema.of(response_model)
    schema.validate(
        json.dumps(VALID_DOC if response_model is Doc else {"name": "Al", "year": 2000})
    )

    clone = pickle.loads(pickle.dumps(schema))

    assert schema == clone
    assert schema.fingerprint == clone.fingerprint
    assert schema.strict_schema() == clone.strict_schema()
    with pytest.raises(InvalidOutput):
        clone.validate("{}")


def test_equality_and_fingerprint() -> None:
    """Equal schemas are equal and hash alike; another schema is not."""
    one = ResponseSchema.of(DICT_SCHEMA)
    two = ResponseSchema.of(copy.deepcopy(DICT_SCHEMA))
    other = ResponseSchema.of({**DICT_SCHEMA, "required": ["name"]})

    assert one == two
    assert hash(one) == hash(two)
    assert one != other
    assert one != ResponseSchema.of(Doc)
    assert 64 == len(one.fingerprint)
    assert one.fingerprint == two.fingerprint != other.fingerprint


def test_repr() -> None:
    """The repr names the schema, the model and the top-level fields."""
    assert (
        "ResponseSchema(name='Author', model=Author, fields=['name', 'age', 'affiliation'])"
        == repr(ResponseSchema.of(Author))
    )


# --- reask_messages --------------------------------------------------------------------


def test_reask_messages() -> None:
    """The bad answer goes back as the assistant's turn, then the errors as the user's."""
    messages = ResponseSchema.of(Doc).reask_messages('{"summary": 1}', ["summary: bad", "x: y"])

    assert [
        {"role": "assistant", "content": '{"summary": 1}'},
        {
            "role": "user",
            "content": (
                "That answer is not valid for the JSON Schema Doc:\n- summary: bad\n- x: y\n"
                "Answer again with only the corrected JSON object, valid against the schema, "
                "and no other text."
            ),
        },
    ] == messages


def test_reask_messages_limits_and_empty_answer() -> None:
    """At most 20 errors are quoted; an empty answer is never an empty turn."""
    errors = [f"f{i}: bad" for i in range(25)]

    assistant, user = ResponseSchema.of(Doc).reask_messages("  ", errors)

    assert "(no answer)" == assistant["content"]
    assert "- f19: bad" in user["content"]
    assert "f20" not in user["content"]
    assert "- ... and 5 more" in user["content"]


def test_reask_from_an_invalid_output() -> None:
    """What InvalidOutput carries is what the re-ask sends."""
    schema = ResponseSchema.of(Doc)
    with pytest.raises(InvalidOutput) as info:
        schema.validate('Here: {"summary": 5}')

    assistant, user = schema.reask_messages(info.value.raw, info.value.errors)

    assert 'Here: {"summary": 5}' == assistant["content"]
    assert all(f"- {line}" in user["content"] for line in info.value.errors)
    assert "- summary: Input should be a valid string" in user["content"]


# --- finish reasons --------------------------------------------------------------------

ERROR = FinishPolicy()
KEEP = FinishPolicy(length="keep", content_filter="keep", refusal="keep")
LARGER = FinishPolicy(length="retry_larger")


@pytest.mark.parametrize(
    ("finish_reason", "refusal", "policy", "attempt", "max_tokens", "limit", "expected"),
    [
        # a normal stop, or no reason at all, is accepted under any policy
        ("stop", None, ERROR, 0, 100, None, ("accept", None, None)),
        ("end_turn", None, ERROR, 0, 100, None, ("accept", None, None)),
        ("tool_use", None, ERROR, 0, 100, None, ("accept", None, None)),
        (None, None, ERROR, 0, None, None, ("accept", None, None)),
        # length
        ("length", None, ERROR, 0, 100, None, ("error", None, "length")),
        ("max_tokens", None, ERROR, 0, 100, None, ("error", None, "length")),
        ("MAX_TOKENS", None, ERROR, 0, 100, None, ("error", None, "length")),
        ("model_context_window_exceeded", None, ERROR, 0, 100, None, ("error", None, "length")),
        ("length", None, KEEP, 0, 100, None, ("accept", None, "length")),
        ("length", None, LARGER, 0, 100, None, ("retry", 200, "length")),
        ("max_output_tokens", None, LARGER, 0, 100, None, ("retry", 200, "length")),
        ("length", None, LARGER, 1, 200, None, ("error", None, "length")),
        ("length", None, LARGER, 0, 100, 150, ("retry", 150, "length")),
        ("length", None, LARGER, 0, 100, 100, ("error", None, "length")),
        ("length", None, LARGER, 0, None, None, ("error", None, "length")),
        ("length", None, FinishPolicy(length="retry_larger", growth=1.5), 0, 3, None,
         ("retry", 5, "length")),
        ("length", None, FinishPolicy(length="retry_larger", max_retries=0), 0, 100, None,
         ("error", None, "length")),
        # content filter
        ("content_filter", None, ERROR, 0, 100, None, ("error", None, "content_filter")),
        ("SAFETY", None, ERROR, 0, 100, None, ("error", None, "content_filter")),
        ("content_filter", None, KEEP, 0, 100, None, ("accept", None, "content_filter")),
        ("content_filter", None, LARGER, 0, 100, None, ("error", None, "content_filter")),
        # refusal: Anthropic's stop_reason, OpenAI's message.refusal (which wins)
        ("refusal", None, ERROR, 0, 100, None, ("error", None, "refusal")),
        ("refusal", None, KEEP, 0, 100, None, ("accept", None, "refusal")),
        ("stop", "I can't help with that.", ERROR, 0, 100, None, ("error", None, "refusal")),
        ("length", "I can't help with that.", LARGER, 0, 100, None, ("error", None, "refusal")),
        ("stop", "I can't help with that.", KEEP, 0, 100, None, ("accept", None, "refusal")),
        ("stop", "", ERROR, 0, 100, None, ("accept", None, None)),
    ],
)  # fmt: skip
def test_decide(
    finish_reason: str | None,
    refusal: str | None,
    policy: FinishPolicy,
    attempt: int,
    max_tokens: int | None,
    limit: int | None,
    expected: tuple[str, int | None, str | None],
) -> None:
    """The verdict, the retry's max_tokens and the cause for each reason and policy."""
    decision = decide(
        finish_reason,
        refusal,
        policy,
        attempt,
        max_tokens=max_tokens,
        max_tokens_limit=limit,
    )

    assert expected == (decision.verdict, decision.max_tokens, decision.cause)
    assert (decision.cause is None) == (decision.reason == "")


@pytest.mark.parametrize(
    ("policy", "limit", "expected_sizes"),
    [
        (LARGER, None, [100, 200]),
        (FinishPolicy(length="retry_larger", max_retries=3), None, [100, 200, 400, 800]),
        (FinishPolicy(length="retry_larger", max_retries=10), 300, [100, 200, 300]),
    ],
)
def test_retry_larger_is_bounded(
    policy: FinishPolicy, limit: int | None, expected_sizes: list[int]
) -> None:
    """A model that is always cut off ends in an error: after max_retries, or when the
    context window leaves no more room; never a loop."""
    sizes = [100]
    decision = decide("length", None, policy, 0, max_tokens=100, max_tokens_limit=limit)
    while decision.verdict == "retry":
        assert decision.max_tokens is not None
        sizes.append(decision.max_tokens)
        assert len(sizes) < 20
        decision = decide(
            "length", None, policy, len(sizes) - 1, max_tokens=sizes[-1], max_tokens_limit=limit
        )

    assert expected_sizes == sizes
    assert "error" == decision.verdict


def test_decide_reasons() -> None:
    """The reasons say what happened, for the logs and the error."""
    assert "the answer was cut off at max_tokens=200 (after 1 retry with a larger max_tokens)" == (
        decide("length", None, LARGER, 1, max_tokens=200).reason
    )
    assert "the answer was cut off at max_tokens=100: retrying with 200" == (
        decide("length", None, LARGER, 0, max_tokens=100).reason
    )
    assert (
        "the answer was cut off (finish_reason='length'), and its max_tokens is unknown: "
        "no retry with a larger one"
    ) == decide("length", None, LARGER, 0).reason
    assert "the model refused: no" == decide("stop", "no", ERROR, 0).reason
    assert "a content filter stopped the answer (finish_reason='content_filter')" == (
        decide("content_filter", None, ERROR, 0).reason
    )


def test_finish_decision_exception() -> None:
    """A filter or a refusal is ContentFiltered; a cut answer is InvalidOutput with its text."""
    filtered = decide("content_filter", None, ERROR, 0).exception(item_key="k1")
    refused = decide("refusal", None, ERROR, 0).exception()
    cut = decide("length", None, ERROR, 0, max_tokens=10).exception('{"a": ', item_key="k2")

    assert isinstance(filtered, ContentFiltered)
    assert "k1" == filtered.item_key
    assert isinstance(refused, ContentFiltered)
    assert isinstance(cut, InvalidOutput)
    assert ('{"a": ', ["the answer was cut off at max_tokens=10"], "k2") == (
        cut.raw,
        cut.errors,
        cut.item_key,
    )
    assert isinstance(FinishDecision(verdict="error", cause="length").exception(), PermanentError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"length": "retry"},
        {"content_filter": "retry_larger"},
        {"refusal": "ignore"},
        {"growth": 1.0},
        {"growth": float("inf")},
        {"growth": float("nan")},
        {"max_retries": -1},
    ],
)
def test_finish_policy_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    """A policy that could loop or means nothing is refused when built."""
    with pytest.raises(ValueError):
        FinishPolicy(**kwargs)


def test_finish_policy_is_a_frozen_value() -> None:
    """Policies compare by value and cannot be changed in place."""
    assert FinishPolicy(length="keep") == FinishPolicy(length="keep")
    with pytest.raises(AttributeError):
        FinishPolicy().length = "keep"  # type: ignore[misc]


# --- optional dependencies -------------------------------------------------------------


def test_missing_pydantic_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pydantic, a model (new or already built) asks for the structured extra."""

    class Fresh(BaseModel):
        a: int

    built: ResponseSchema[Doc] = ResponseSchema(
        name="Doc", schema=ResponseSchema.of(Doc).schema, model=Doc
    )
    monkeypatch.setitem(sys.modules, "pydantic", None)

    with pytest.raises(ImportError, match=r"need pydantic: pip install 'llmbatch\[structured\]'"):
        ResponseSchema.of(Fresh)
    with pytest.raises(ImportError, match=r"llmbatch\[structured\]"):
        built.validate('{"summary": "x"}')


def test_missing_jsonschema_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without jsonschema, a schema dict asks for the structured extra."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)

    with pytest.raises(ImportError, match=r"need jsonschema: pip install 'llmbatch\[structured\]'"):
        ResponseSchema.of({"type": "object", "properties": {"b": {"type": "string"}}})


def test_pydantic_1_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic 1 is not enough, and the error says so."""

    class Fresh(BaseModel):
        a: int

    old = types.ModuleType("pydantic")
    old.VERSION = "1.10.13"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pydantic", old)

    with pytest.raises(ImportError, match=r"need pydantic 2, not 1\.10\.13"):
        ResponseSchema.of(Fresh)


def test_imports_only_leaves_and_optional_deps_lazily() -> None:
    """structured imports only errors/models of llmbatch, and pydantic/jsonschema at use."""
    source = Path(__file__).parent.parent / "llmbatch" / "structured.py"
    tree = ast.parse(source.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)

    assert {"llmbatch.errors"} <= imported
    assert set() == {m for m in imported if m.startswith("llmbatch")} - {
        "llmbatch.errors",
        "llmbatch.models",
    }
    assert set() == {m for m in imported if m.split(".")[0] in ("pydantic", "jsonschema")}


def test_shape_kept_tells_lost_constraints_from_a_lost_shape() -> None:
    """Dropped constraints keep the shape (strict mode still fixes every field and type);
    a map or an untyped value loses it (providers then send the schema non-strict)."""

    class Constrained(BaseModel):
        name: str = Field(min_length=1)

    class Mapped(BaseModel):
        counts: dict[str, int]

    class Untyped(BaseModel):
        anything: Any

    constrained = ResponseSchema.of(Constrained).strict_schema()
    assert (False, True) == (constrained.exact, constrained.shape_kept)
    assert not ResponseSchema.of(Mapped).strict_schema().shape_kept
    assert not ResponseSchema.of(Untyped).strict_schema().shape_kept
