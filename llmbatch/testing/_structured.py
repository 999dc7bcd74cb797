"""Structured outputs in the simulator: which JSON a request asks for, and what the
simulated model writes for it (online and in the Batch APIs alike).

Requests that ask for JSON
--------------------------
* OpenAI chat completions, ``response_format``:

  - ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``:
    ``message.content`` is a JSON document valid for ``schema`` (the subset of
    :mod:`llmbatch.testing._schema`). With ``"strict": true`` the schema must first pass
    OpenAI's strict rules (:func:`~llmbatch.testing._schema.strict_problem`), or the
    request gets OpenAI's 400 ``Invalid schema for response_format '<name>': ...``.
  - ``{"type": "json_object"}``: a JSON object ``{"tag": ..., "words": [...]}``; or, when
    a system, developer or user message states a JSON Schema (an object schema right after
    ``JSON Schema:``, as :meth:`llmbatch.structured.ResponseSchema.json_mode_instruction`
    writes it), a value valid for it: the simulated model reads the schema it is told,
    as a model in JSON mode does (:func:`stated_schema`).

* Anthropic messages:

  - ``tools`` with ``tool_choice={"type": "tool", "name": ...}`` (or ``{"type": "any"}``:
    the first tool): the answer is one ``tool_use`` block whose ``input`` is valid for
    that tool's ``input_schema``, with ``stop_reason: "tool_use"``. Without a forcing
    ``tool_choice`` the answer is text.
  - ``output_config={"format": {"type": "json_schema", "schema": ...}}`` (what
    ``messages.parse(output_format=Model)`` sends): a text block holding the JSON.

How answers are tagged
----------------------
Each value is built from the prompt (see :func:`conversation`), like the text answers of
:mod:`llmbatch.testing._content`: its first free-form string (no ``format``, ``enum`` or
``const``; ``maxLength`` at least 10) starts with ``[tag]``, ``tag`` being
:func:`~llmbatch.testing._content.content_tag` of the prompt. ``json_object`` answers carry
it as ``"tag"``. A schema without such a string has no tag.

Length
------
A JSON answer costs ``ceil(characters / 4)`` output tokens. One that would exceed
``max_tokens`` (``max_completion_tokens``) is cut to ``4 x max_tokens`` characters and ends
with ``finish_reason: "length"`` (Anthropic ``stop_reason: "max_tokens"``; a cut tool call
keeps the top-level properties that fit), as the providers do: the text no longer parses.

Spoiled answers (fault injection for re-asks)
---------------------------------------------
``invalid_json`` answers unparseable text (cut short, or a trailing comma before the
closing bracket; a forced Anthropic tool call becomes a text block holding it);
``schema_violation`` answers valid JSON that breaks the schema (a required property
missing, or one property of the wrong type; a ``json_object`` answer becomes an array).
Both keep the ``[tag]``. They come from :class:`StructuredFaults` (fractions, drawn per
prompt from the seed, so the same prompt is always spoiled the same way) or from a script.
A *follow-up* (a re-ask) is never spoiled by the fractions, only by a script.

A scripted ``Fault(kind="refusal")`` makes the model decline instead, for any chat
request, JSON or not: :data:`REFUSAL` as OpenAI's ``message.refusal`` (``content: null``,
``finish_reason: "stop"``), or as Anthropic's text with ``stop_reason: "refusal"``. A
refused JSON answer counts as ``answered`` only.

Re-asks
-------
A request is a follow-up when a user turn comes after an assistant turn (see
:func:`conversation`): a re-ask (the bad answer, then what is wrong with it), or any
multi-turn conversation, few-shot examples included. Its prompt is the user turn that the
first assistant turn carrying a tag answered, so a re-ask gets the unspoiled answer to the
original prompt; without such a turn it is the last user turn.

Refusals and the Batch APIs
---------------------------
:func:`openai_request_spec` and :func:`anthropic_request_spec` decide, for the online
endpoints and the Batch APIs alike, what a request asks for or which 400 it gets: a
malformed format, a strict schema outside OpenAI's rules, or a schema without a value the
simulator can build (answered at validation, before the request is counted or charged).
Batch requests get the online answer, never spoiled (:func:`batch_output`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from llmbatch.testing._content import (
    DEFAULT_MAX_TOKENS,
    Output,
    content_tag,
    last_user_text,
    tagged_words,
    text_of,
    text_output,
)
from llmbatch.testing._schema import SchemaError, instance, spoil_json, strict_problem, violate

__all__ = [
    "NO_FAULTS",
    "REFUSAL",
    "SPOILS",
    "FormatError",
    "OutputSpec",
    "SchemaError",
    "Spoil",
    "StructuredFaults",
    "anthropic_request_spec",
    "anthropic_spec",
    "batch_output",
    "check_output",
    "conversation",
    "openai_request_spec",
    "openai_spec",
    "plan_output",
    "stated_schema",
]

Spoil: TypeAlias = Literal["invalid_json", "schema_violation", "refusal"]
#: the ways an answer can be spoiled (``"refusal"`` only by a script, and for any request)
SPOILS: tuple[Spoil, ...] = ("invalid_json", "schema_violation", "refusal")
#: what the simulated model says when a script makes it refuse
REFUSAL = "I'm sorry, but I can't help with that request."
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_JSON_OBJECT: Mapping[str, Any] = {"type": "object"}


class FormatError(ValueError):
    """A request's output format (``response_format``, ``tools``, ...) is refused: the
    endpoints answer it with their provider's 400.

    Args:
        message: the provider's message.
        param: OpenAI's ``param``.
        code: OpenAI's ``code``.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """The JSON a request asks for.

    Args:
        kind: ``"json_object"`` (any object), ``"json_schema"`` (text valid for
            ``schema``) or ``"tool"`` (an Anthropic tool call whose input fits ``schema``).
        schema: the JSON Schema; None for ``json_object``.
        name: the schema's or the tool's name.
    """

    kind: Literal["json_object", "json_schema", "tool"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class StructuredFaults:
    """The fractions of JSON answers to spoil, drawn per prompt from ``seed``.

    Args:
        invalid_json: fraction answered with unparseable JSON.
        schema_violations: fraction answered with JSON that violates the schema.
        seed: seeds the draws.
    """

    invalid_json: float = 0.0
    schema_violations: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.invalid_json, self.schema_violations)
        if not all(0 <= p <= 1 for p in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(
                "invalid_json and schema_violations must be fractions within [0, 1] "
                f"that sum to <= 1, not {self.invalid_json!r} and {self.schema_violations!r}"
            )

    def draw(self, prompt: str) -> Spoil | None:
        """How the answer to *prompt* is spoiled, if it is (the same every time)."""
        if not (self.invalid_json or self.schema_violations):
            return None
        digest = hashlib.sha256(f"{self.seed}:structured:{prompt}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw < self.invalid_json:
            return "invalid_json"
        if draw < self.invalid_json + self.schema_violations:
            return "schema_violation"
        return None


def openai_spec(body: Mapping[str, Any], *, check_strict: bool = True) -> OutputSpec | None:
    """What an OpenAI chat request's ``response_format`` asks for (None: text).

    Raises:
        FormatError: OpenAI's 400 for a malformed ``response_format``, or (when
            *check_strict*) a ``strict`` schema that strict mode refuses.
    """
    response_format = body.get("response_format")
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise FormatError(
            "Invalid type for 'response_format': expected an object, "
            f"but got {type(response_format).__name__} instead.",
            param="response_format",
            code="invalid_type",
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputSpec("json_object")
    if kind != "json_schema":
        raise FormatError(
            f"Invalid value: {kind!r}. Supported values are: 'text', 'json_object', "
            "and 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise FormatError(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise FormatError(
            "Missing required parameter: 'response_format.json_schema.name'.",
            param="response_format.json_schema.name",
            code="missing_required_parameter",
        )
    if not _NAME.fullmatch(name):
        raise FormatError(
            "Invalid 'response_format.json_schema.name': string does not match pattern. "
            "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
            param="response_format.json_schema.name",
            code="invalid_value",
        )
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        raise FormatError(
            "Invalid type for 'response_format.json_schema.schema': expected an object, "
            f"but got {type(schema).__name__} instead.",
            param="response_format.json_schema.schema",
            code="invalid_type",
        )
    if check_strict and spec.get("strict") is True:
        problem = strict_problem(schema)
        if problem is not None:
            raise FormatError(
                f"Invalid schema for response_format '{name}': {problem}",
                param="response_format",
            )
    if schema is None:
        return OutputSpec("json_object", None, name)
    return OutputSpec("json_schema", schema, name)


def anthropic_spec(body: Mapping[str, Any]) -> OutputSpec | None:
    """What an Anthropic messages request asks for: a forced tool call, JSON text
    (``output_config.format``), or None (text).

    Raises:
        FormatError: Anthropic's 400 for malformed ``tools``, ``tool_choice`` or
            ``output_config.format``.
    """
    tools = body.get("tools")
    custom: dict[str, Mapping[str, Any]] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise FormatError("tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise FormatError(f"tools.{i}: Input should be a valid dictionary")
            if tool.get("type") not in (None, "custom"):
                continue  # a server tool (web search, code execution, ...)
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise FormatError(f"tools.{i}.custom.name: Field required")
            schema = tool.get("input_schema")
            if not isinstance(schema, Mapping):
                raise FormatError(f"tools.{i}.custom.input_schema: Field required")
            if schema.get("type") != "object":
                raise FormatError(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
            custom.setdefault(name, schema)
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, Mapping) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise FormatError(
                f"tool_choice: Input tag {kind!r} found using 'type' does not match any of the "
                "expected tags: 'auto', 'any', 'tool', 'none'",
            )
        assert isinstance(choice, Mapping)
        if kind in ("any", "tool") and not tools:
            raise FormatError("tool_choice may only be specified while providing tools.")
        if kind == "tool":
            name = choice.get("name")
            if name not in custom:
                raise FormatError(f"tool_choice.name: no tool named {name!r} in tools")
            return OutputSpec("tool", custom[name], name)
        if kind == "any" and custom:
            name = next(iter(custom))
            return OutputSpec("tool", custom[name], name)
    config = body.get("output_config")
    output_format = config.get("format") if isinstance(config, Mapping) else None
    if output_format is None:
        return None
    if not isinstance(output_format, Mapping) or output_format.get("type") != "json_schema":
        raise FormatError("output_config.format.type: Input should be 'json_schema'")
    schema = output_format.get("schema")
    if not isinstance(schema, Mapping):
        raise FormatError("output_config.format.schema: Field required")
    return OutputSpec("json_schema", schema)


def _said(message: Mapping[str, Any]) -> str:
    """Everything an assistant turn said: text, tool-call inputs and arguments."""
    content = message.get("content")
    parts = [text_of(content)]
    if isinstance(content, Sequence) and not isinstance(content, str):
        parts += [
            json.dumps(part.get("input"))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "tool_use"
        ]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            parts.append(str(function.get("arguments", "")))
    return "\n".join(parts)


def conversation(messages: Sequence[Mapping[str, Any]]) -> tuple[str, bool]:
    """``(prompt, follow_up)`` for a chat/messages conversation.

    ``follow_up`` is True when a user turn follows an assistant turn (a re-ask, or any
    multi-turn conversation). ``prompt`` is the text of the user turn that the first
    assistant turn carrying its tag answered (so a re-ask belongs to the original
    prompt), else the last user turn.
    """
    follow_up = answered = False
    previous: str | None = None
    origin: str | None = None
    for message in messages:
        role = message.get("role")
        if role == "user":
            follow_up = follow_up or answered
            previous = text_of(message.get("content"))
        elif role == "assistant":
            answered = True
            if origin is None and previous is not None and content_tag(previous) in _said(message):
                origin = previous
    return (origin if origin is not None else last_user_text(messages)), follow_up


#: no fractions: answers that are never spoiled (validation, the Batch APIs)
NO_FAULTS = StructuredFaults()


def check_output(body: Mapping[str, Any], spec: OutputSpec | None) -> None:
    """Build the answer to *body* once, so that a schema the simulator cannot answer is
    refused while the request is validated (before it is counted and charged).

    Raises:
        SchemaError: the schema admits no value the simulator can build.
    """
    if spec is not None and spec.schema is not None:
        plan_output(body, spec, faults=NO_FAULTS)


def openai_request_spec(body: Mapping[str, Any]) -> OutputSpec | None:
    """What an OpenAI chat request asks for, once validated the way OpenAI validates it
    (the chat endpoint and the Batch API both ask here).

    Raises:
        FormatError: OpenAI's 400: a malformed ``response_format``, a ``strict`` schema
            that strict mode refuses, or a schema the simulator cannot answer.
    """
    spec = openai_spec(body)
    try:
        check_output(body, spec)
    except SchemaError as error:
        name = spec.name if spec is not None else None
        raise FormatError(
            f"Invalid schema for response_format '{name}': {error}", param="response_format"
        ) from None
    return spec


def anthropic_request_spec(body: Mapping[str, Any]) -> OutputSpec | None:
    """What an Anthropic messages request asks for, once validated as Anthropic does
    (the messages endpoint and Message Batches both ask here).

    Raises:
        FormatError: Anthropic's 400: malformed ``tools``, ``tool_choice`` or
            ``output_config.format``, or a schema the simulator cannot answer.
    """
    spec = anthropic_spec(body)
    try:
        check_output(body, spec)
    except SchemaError as error:
        raise FormatError(f"Invalid JSON schema: {error}") from None
    return spec


def batch_output(body: Mapping[str, Any], provider: Literal["openai", "anthropic"]) -> Output:
    """What the model writes for one Batch API request already validated (by
    :func:`openai_request_spec` / :func:`anthropic_request_spec`): the online answer,
    never spoiled (``invalid_json``/``schema_violations`` and scripts are for the online
    endpoints)."""
    spec = openai_spec(body, check_strict=False) if provider == "openai" else anthropic_spec(body)
    return plan_output(body, spec, faults=NO_FAULTS)


def _fitting(value: Any, budget: int) -> dict[str, Any]:
    """The leading top-level properties of *value* whose JSON fits in *budget* characters."""
    kept: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if len(json.dumps({**kept, key: item}, separators=(",", ":"))) > budget:
                break
            kept[key] = item
    return kept


_STATED = re.compile(r"JSON Schema:\s*(?=\{)")
_DECODER = json.JSONDecoder()


def stated_schema(messages: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The object schema a system, developer or user message states right after
    ``JSON Schema:`` (the first that parses), or None."""
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in (
            "system",
            "developer",
            "user",
        ):
            continue
        text = text_of(message.get("content"))
        for found in _STATED.finditer(text):
            try:
                value, _ = _DECODER.raw_decode(text, found.end())
            except ValueError:
                continue
            if isinstance(value, dict) and value.get("type") == "object":
                return value
    return None


def _json_mode_value(
    messages: Sequence[Mapping[str, Any]], tag: str
) -> tuple[Mapping[str, Any], Any, tuple[str, ...] | None]:
    """``(schema, value, tag path)`` for a JSON-mode answer: a value for the schema the
    prompt states, or (none stated, or none the simulator can build) the tagged words."""
    stated = stated_schema(messages)
    if stated is not None:
        try:
            value, tag_path = instance(stated, seed=tag, tag=tag)
        except SchemaError:
            pass
        else:
            return stated, value, tag_path
    return _JSON_OBJECT, {"tag": tag, "words": tagged_words(tag)[1:]}, ("tag",)


def plan_output(
    body: Mapping[str, Any],
    spec: OutputSpec | None,
    *,
    faults: StructuredFaults,
    spoil: Spoil | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Output:
    """What the simulated model writes for *body*, whose output format is *spec*.

    Args:
        body: the (validated) request body.
        spec: from :func:`openai_spec` / :func:`anthropic_spec`; None gives plain text.
        faults: the fractions of answers to spoil (not applied to follow-ups).
        spoil: a scripted spoil; it wins over the fractions and applies to follow-ups.
        default_max_tokens: the output limit when the request sets none.

    Raises:
        SchemaError: the schema admits no value the simulator can build.
    """
    if spoil == "refusal":
        follow_up = conversation(body.get("messages") or ())[1]
        outcome = None if spec is None else "refusal"
        tokens = math.ceil(len(REFUSAL) / 4)
        return Output(REFUSAL, tokens, False, None, outcome, follow_up, refusal=True)
    if spec is None:
        return text_output(body)
    prompt, follow_up = conversation(body.get("messages") or ())
    tag = content_tag(prompt)
    if spoil is None and not follow_up:
        spoil = faults.draw(prompt)
    schema = spec.schema or _JSON_OBJECT
    tag_path: tuple[str, ...] | None
    if spec.schema is None:
        schema, value, tag_path = _json_mode_value(body.get("messages") or (), tag)
    else:
        value, tag_path = instance(spec.schema, seed=tag, tag=tag)
    outcome = "valid"
    # the same prompt is spoiled the same way: the draws are seeded by the seed and the tag
    spoiler = f"spoil:{faults.seed}:{tag}"
    if spoil == "schema_violation":
        broken = violate(
            schema,
            value,
            rng=random.Random(spoiler),
            tag_path=tag_path,
            keep_object=spec.kind == "tool",
        )
        if broken is not None:
            value, outcome = broken, "schema_violation"
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    tool: Mapping[str, Any] | None = None
    if spoil == "invalid_json":
        text, outcome = spoil_json(text, rng=random.Random(spoiler), keep=tag), "invalid_json"
    elif spec.kind == "tool":
        tool = {"name": spec.name, "input": value}
    limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens)
    tokens = max(1, math.ceil(len(text) / 4))
    if tokens <= limit:
        return Output(text, tokens, False, tool, outcome, follow_up)
    text = text[: 4 * limit]
    if tool is not None:
        tool = {"name": spec.name, "input": _fitting(value, 4 * limit)}
    return Output(text, limit, True, tool, "truncated", follow_up)
