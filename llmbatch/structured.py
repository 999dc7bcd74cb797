"""Typed outputs: one response model, the schema each provider enforces, validation, re-ask.

A response model is a pydantic v2 model class (or another class pydantic validates, such as a
dataclass or a ``TypedDict``) or a JSON Schema dict. :meth:`ResponseSchema.of` turns it into one
frozen value, and each provider adapter asks it for the form that provider enforces best:

=======================  ===================================================================
provider                 what to send
=======================  ===================================================================
OpenAI                   :meth:`~ResponseSchema.openai_response_format` (``json_schema``,
                         ``strict``, the schema rewritten by :meth:`~ResponseSchema.strict_schema`)
Anthropic                :meth:`~ResponseSchema.anthropic_tool` forced by
                         :meth:`~ResponseSchema.anthropic_tool_choice`; the tool call's
                         ``input`` is the answer
local (llama.cpp)        :meth:`~ResponseSchema.llama_cpp_response_format`: a grammar
OpenAI-compatible        ``{"type": "json_object"}`` plus
(JSON mode only)         :meth:`~ResponseSchema.json_mode_instruction` in the system prompt
=======================  ===================================================================

Whatever the provider enforced, the answer is then checked here against the full model
(:meth:`~ResponseSchema.validate`): constraints a provider could not carry are enforced on our
side. An invalid answer is re-asked (:meth:`~ResponseSchema.reask_messages`) a bounded number of
times, and what still fails becomes the item's :class:`InvalidOutput`, a permanent error.

Why an answer stopped (``finish_reason``: truncated, filtered, refused) is decided by one pure
function, :func:`decide`, under a :class:`FinishPolicy`: accept it, fail the item, or retry it once
with a larger ``max_tokens``; never an unbounded loop.

pydantic and jsonschema are optional (``pip install 'llmbatch[structured]'``) and imported
only when a response model needs them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Generic, Literal, TypeVar, cast, overload

from llmbatch.errors import ContentFiltered, PermanentError

__all__ = [
    "FinishDecision",
    "FinishPolicy",
    "InvalidOutput",
    "ResponseModel",
    "ResponseSchema",
    "StrictSchema",
    "decide",
]

T = TypeVar("T")

_EXTRA = "pip install 'llmbatch[structured]'"


def _import(name: str) -> ModuleType:
    """*name*, imported on first use, or an ImportError that says which extra to install."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"typed outputs (response_model=) need {name}: {_EXTRA}") from exc
    if name == "pydantic" and int(str(module.VERSION).split(".")[0]) < 2:
        raise ImportError(f"typed outputs need pydantic 2, not {module.VERSION}: {_EXTRA}")
    return module


# --- the error -------------------------------------------------------------------------


class InvalidOutput(PermanentError):
    """The answer is not valid for the response model, after every re-ask allowed.

    A permanent error: the item failed on its own answer, and sending the same request
    again through the retry layer is not the cure (re-asks are; they are already spent).

    Attributes:
        raw: the text of the last answer (the JSON, for an answer that came as a tool call).
        errors: what is wrong with it, one readable line each (``"topics.2: Input should
            be a valid string"``).
        attempts: the re-asks made before giving up.
        input_tokens, output_tokens, cost: what the item's calls (the first and every
            re-ask) used and cost, paid for though no answer is kept (set by the client;
            cost ``None``: prices unknown).
    """

    def __init__(
        self,
        message: str = "",
        *,
        raw: str = "",
        errors: Sequence[str] = (),
        attempts: int = 0,
        **context: Any,
    ) -> None:
        self.raw = raw
        self.errors = list(errors)
        self.attempts = attempts
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost: float | None = None
        if not message:
            first = self.errors[0] if self.errors else "no details"
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            message = f"the answer does not match the response model: {first}{more}"
        super().__init__(message, **context)


# --- the schema value ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StrictSchema:
    """A schema rewritten to what OpenAI's strict structured outputs accept.

    Attributes:
        schema: the rewritten JSON Schema (read-only: it is shared between requests).
        changes: what the rewrite could not carry over, one line each with its JSON
            pointer (``"#/properties/name: minLength dropped"``). Empty when the rewrite
            kept the meaning; either way :meth:`ResponseSchema.validate` checks the answer
            against the original.
    """

    schema: dict[str, Any]
    changes: tuple[str, ...] = ()
    #: the rewrite kept every field and type (it may have dropped constraints strict
    #: mode lacks); ``False`` when it lost the shape itself: a value of any type, or a
    #: ``dict[str, X]`` map, which strict mode could only answer empty
    shape_kept: bool = True

    @property
    def exact(self) -> bool:
        """The rewrite lost nothing: strict mode enforces the whole schema."""
        return not self.changes


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ResponseSchema(Generic[T]):
    """A response model, ready for every provider. Build it with :meth:`of`.

    Attributes:
        name: a provider-safe name (``[A-Za-z0-9_-]{1,64}``): the model's class name, or the
            schema's ``name``/``title``.
        schema: the JSON Schema of the answer, always an object at the root (read-only).
        model: the pydantic model (or other validated class), or ``None`` for a schema dict.
        description: what the answer is, from the schema (a model's docstring), if any.

    The provider forms are computed once and shared (they are built for every request):
    treat the returned dicts as read-only.
    """

    name: str
    schema: dict[str, Any]
    model: type[Any] | None = None
    description: str | None = None
    _memo: dict[str, Any] = field(default_factory=dict, init=False, compare=False)

    @overload
    @classmethod
    def of(cls, response_model: ResponseSchema[T]) -> ResponseSchema[T]: ...

    @overload
    @classmethod
    def of(cls, response_model: type[T]) -> ResponseSchema[T]: ...

    @overload
    @classmethod
    def of(cls, response_model: Mapping[str, Any]) -> ResponseSchema[dict[str, Any]]: ...

    @classmethod
    def of(cls, response_model: Any) -> ResponseSchema[Any]:
        """The schema of *response_model*.

        Args:
            response_model: a pydantic ``BaseModel`` subclass (or a dataclass / ``TypedDict``
                pydantic can validate); or a JSON Schema dict, bare or wrapped as
                ``{"name": ..., "schema": ..., "description": ...}`` (OpenAI's
                ``json_schema`` object, also inside its ``response_format``); or a
                :class:`ResponseSchema` (returned as it is).

        Raises:
            TypeError: not one of those, or its JSON Schema is not an object at the root
                (every provider needs one: wrap a list or a scalar in a model).
            ValueError: the dict is not a valid JSON Schema, or has a non-local ``$ref``.
            ImportError: pydantic (for a class) or jsonschema (for a dict) is missing.
        """
        if isinstance(response_model, ResponseSchema):
            return response_model
        if isinstance(response_model, Mapping):
            return _of_mapping(response_model)
        if isinstance(response_model, type):
            return _of_class(response_model)
        raise TypeError(
            "response_model must be a pydantic model class or a JSON Schema dict, "
            f"not {response_model!r}"
        )

    # -- identity --

    @property
    def fingerprint(self) -> str:
        """A stable hash of the name and schema, for cache keys and job checks."""
        cached: str | None = self._memo.get("fingerprint")
        if cached is None:
            blob = json.dumps([self.name, self.schema], sort_keys=True, default=str)
            cached = self._memo["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()
        return cached

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResponseSchema):
            return NotImplemented
        return (self.name, self.model, self.fingerprint) == (
            other.name,
            other.model,
            other.fingerprint,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.fingerprint))

    def __reduce__(self) -> tuple[Any, ...]:
        # the memo holds validators that do not pickle; they are rebuilt on first use
        # (a schema travels to Ray workers and subprocesses)
        return (ResponseSchema, (self.name, self.schema, self.model, self.description))

    def __repr__(self) -> str:
        fields = list(self.schema.get("properties", {}))
        model = f", model={self.model.__qualname__}" if self.model is not None else ""
        return f"ResponseSchema(name={self.name!r}{model}, fields={fields!r})"

    # -- provider forms --

    def strict_schema(self) -> StrictSchema:
        """The schema rewritten to OpenAI's strict subset (computed once).

        Every object gets ``additionalProperties: false`` and lists all its properties in
        ``required``; a property that was optional becomes nullable (``anyOf [..., {"type":
        "null"}]``; :meth:`validate` reads a ``null`` there as "absent", so the default
        applies). An object with properties but no ``type`` gets ``"type": "object"``.
        ``$defs``/``$ref`` are kept (a ``$ref`` with sibling keywords is inlined, and a
        recursive model's root ``$ref`` is too), ``oneOf`` becomes ``anyOf``, a one-part
        ``allOf`` is merged (several are merged, noted), a tuple's ``prefixItems`` (or a
        draft-7 ``items`` list) become ``items`` of any of its types (noted).

        Kept, as OpenAI documents them (guides/structured-outputs, "Supported schemas"):
        ``type``, ``properties``, ``required``, ``additionalProperties``, ``items``,
        ``anyOf``, ``enum``, ``const``, ``$ref``, ``$defs``/``definitions``, ``title``,
        ``description``; for strings ``pattern`` and ``format`` (date-time, time, date,
        duration, email, hostname, ipv4, ipv6, uuid); for numbers ``multipleOf``,
        ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``; for arrays
        ``minItems``, ``maxItems``.

        Dropped, and listed in :attr:`StrictSchema.changes`: other ``format`` values,
        ``minLength``, ``maxLength``, ``uniqueItems``,
        ``contains``/``minContains``/``maxContains``, ``unevaluatedItems``,
        ``additionalItems``, ``patternProperties``, ``propertyNames``,
        ``minProperties``/``maxProperties``, ``unevaluatedProperties``, ``not``,
        ``if``/``then``/``else``, ``dependentRequired``/``dependentSchemas``/
        ``dependencies``, and a schema-valued or free-form ``additionalProperties`` (a map
        such as ``dict[str, int]``: strict mode can produce only the listed properties).
        Those with a plain value (a ``format``, ``minLength: 3``...) move into the
        ``description`` instead, as ``"(minLength: 3)"``, so the model still reads them.
        Annotations (``default``, ``examples``, ``$schema``, ``$comment``,
        ``discriminator``, ``deprecated``...) are dropped silently: they constrain nothing,
        and :meth:`validate` applies the defaults. Fine-tuned models accept less (OpenAI:
        no string, number or array constraints): send ``strict=False`` to those.
        """
        cached: StrictSchema | None = self._memo.get("strict")
        if cached is None:
            cached = self._memo["strict"] = _strict(self.schema)
        return cached

    def openai_response_format(self, strict: bool = True) -> dict[str, Any]:
        """OpenAI's ``response_format`` (chat completions, and each batch line's body).

        Args:
            strict: send :meth:`strict_schema` with ``strict: true`` (the model is held to
                it). With ``False`` the schema goes as it is, as a hint; for a schema whose
                rewrite is not :attr:`~StrictSchema.exact`, or a fine-tuned model.
        """
        key = f"openai:{strict}"
        cached: dict[str, Any] | None = self._memo.get(key)
        if cached is None:
            schema = self.strict_schema().schema if strict else self.schema
            cached = self._memo[key] = {
                "type": "json_schema",
                "json_schema": {"name": self.name, "schema": schema, "strict": strict},
            }
        return cached

    def anthropic_tool(self) -> dict[str, Any]:
        """A tool whose input is the answer; force it with :meth:`anthropic_tool_choice`.

        The ``tool_use`` block's ``input`` (a dict) goes to :meth:`validate`. Anthropic
        refuses a forced tool together with extended thinking.
        """
        description = self.description or (
            f"Submit the answer: the input is the {self.name} object the task asks for."
        )
        return {"name": self.name, "description": description, "input_schema": self.schema}

    def anthropic_tool_choice(self) -> dict[str, Any]:
        """Anthropic's ``tool_choice`` forcing :meth:`anthropic_tool`."""
        return {"type": "tool", "name": self.name}

    def llama_cpp_response_format(self) -> dict[str, Any]:
        """llama-cpp-python's ``response_format`` for ``create_chat_completion``: JSON
        constrained by a grammar built from the schema.

        llama-cpp-python silently falls back to "any JSON" when it cannot convert a schema,
        so the schema sent is trimmed to what its converter handles: annotations
        (``title``, ``description``, ``default``...) are removed (a typeless ``{"title":
        ...}`` would fail it) and so are unanchored ``pattern``\\ s (it takes only
        ``^...$``). :meth:`validate` still checks those.
        """
        cached: dict[str, Any] | None = self._memo.get("llama")
        if cached is None:
            schema = _map_schema(self.schema, _for_grammar)
            cached = self._memo["llama"] = {"type": "json_object", "schema": schema}
        return cached

    def json_mode_instruction(self) -> str:
        """A system-prompt paragraph with the schema, for servers that offer only
        ``{"type": "json_object"}`` (it contains the word JSON, which OpenAI's JSON mode
        requires somewhere in the messages)."""
        cached: str | None = self._memo.get("instruction")
        if cached is None:
            compact = json.dumps(
                _map_schema(self.schema, _without_titles),
                separators=(",", ":"),
                ensure_ascii=False,
            )
            cached = self._memo["instruction"] = (
                "Answer with a single JSON object and nothing else (no prose, no code fence). "
                f"It must be valid against this JSON Schema:\n{compact}"
            )
        return cached

    # -- the answer --

    def validate(self, output: str | Mapping[str, Any], *, attempts: int = 0) -> T:
        """The answer as the model's instance (or as a dict, for a schema dict).

        Args:
            output: the answer's text, or the object itself (an Anthropic tool call's
                ``input``). Prose or a ```json fence around the JSON is tolerated: the
                first JSON object in the text is taken.
            attempts: the re-asks made so far, recorded on the error.

        A ``null`` for an optional property that does not accept null (what
        :meth:`strict_schema` asks the model for when it has nothing) counts as absent.

        Raises:
            InvalidOutput: no JSON object in the text, or not valid for the schema; its
                ``errors`` say where and why.
        """
        if isinstance(output, str):
            raw = output
            try:
                value = _extract_json(output)
            except ValueError as exc:
                raise InvalidOutput(raw=raw, errors=[str(exc)], attempts=attempts) from None
        else:
            value = dict(output)
            raw = json.dumps(value, ensure_ascii=False, default=str)
        result, errors = self._check(value)
        if errors:
            cleaned = _drop_absent_nulls(value, self.schema, self.schema)
            if cleaned != value:
                result, errors = self._check(cleaned)
        if errors:
            raise InvalidOutput(raw=raw, errors=errors, attempts=attempts)
        return cast(T, result)

    def reask_messages(self, bad_text: str, errors: Sequence[str]) -> list[dict[str, str]]:
        """The two messages to append for a re-ask: the bad answer, then what is wrong.

        At most 20 errors are quoted. For Anthropic's forced tool, *bad_text* is the tool
        input as JSON (:attr:`InvalidOutput.raw`), sent back as text.
        """
        shown = [f"- {line}" for line in errors[:_MAX_ERRORS_SHOWN]]
        if len(errors) > _MAX_ERRORS_SHOWN:
            shown.append(f"- ... and {len(errors) - _MAX_ERRORS_SHOWN} more")
        problems = "\n".join(shown) or "- it could not be read as JSON"
        return [
            # an empty assistant turn is refused by some providers (Anthropic)
            {"role": "assistant", "content": bad_text if bad_text.strip() else "(no answer)"},
            {
                "role": "user",
                "content": (
                    f"That answer is not valid for the JSON Schema {self.name}:\n{problems}\n"
                    "Answer again with only the corrected JSON object, valid against the "
                    "schema, and no other text."
                ),
            },
        ]

    def _check(self, value: Any) -> tuple[Any, list[str]]:
        """(the validated value, []) or (None, the errors)."""
        if self.model is not None:
            pydantic = _import("pydantic")
            adapter = self._memo.get("adapter")
            if adapter is None:
                adapter = self._memo["adapter"] = pydantic.TypeAdapter(self.model)
            # validated as JSON, which it came as: a strict model then still takes "2024-01-02"
            # for a date and "pos" for an enum (in Python mode it would demand the objects)
            try:
                text = json.dumps(value, ensure_ascii=False, allow_nan=True)
            except (TypeError, ValueError) as exc:  # a tool input that is not JSON (unlikely)
                return None, [f"(root): not JSON: {exc}"]
            try:
                return adapter.validate_json(text), []
            except pydantic.ValidationError as exc:
                return None, [_pydantic_line(e) for e in exc.errors(include_url=False)]
        validator = self._memo.get("validator")
        if validator is None:
            validator = self._memo["validator"] = _json_validator(self.schema)
        errors = [_jsonschema_line(e) for e in validator.iter_errors(value)]
        return (None if errors else value), errors


_MAX_ERRORS_SHOWN = 20


# --- building a ResponseSchema ---------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]+")


#: what ``response_model=`` accepts: a model class, a JSON Schema dict, or a ResponseSchema
ResponseModel = ResponseSchema[Any] | type[Any] | Mapping[str, Any]


def _safe_name(raw: object) -> str:
    """A name OpenAI and Anthropic accept: ``[A-Za-z0-9_-]{1,64}``."""
    name = _UNSAFE_NAME.sub("_", raw if isinstance(raw, str) else "").strip("_")[:64]
    return name or "response"


@functools.lru_cache(maxsize=256)
def _of_class(model: type[Any]) -> ResponseSchema[Any]:
    pydantic = _import("pydantic")
    try:
        if issubclass(model, pydantic.BaseModel):
            schema = model.model_json_schema()
        else:
            schema = pydantic.TypeAdapter(model).json_schema()
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError) as exc:
        raise TypeError(
            f"response_model must be a pydantic model (or a class pydantic can validate): "
            f"{model.__qualname__}: {exc}"
        ) from exc
    schema = _object_root(schema)
    description = schema.get("description")
    return ResponseSchema(
        name=_safe_name(model.__name__),
        schema=schema,
        model=model,
        description=description if isinstance(description, str) else None,
    )


def _of_mapping(data: Mapping[str, Any]) -> ResponseSchema[dict[str, Any]]:
    if data.get("type") == "json_schema" and isinstance(data.get("json_schema"), Mapping):
        data = data["json_schema"]  # a whole OpenAI response_format
    if isinstance(data.get("schema"), Mapping) and not {"type", "properties"} & set(data):
        name, description, schema = data.get("name"), data.get("description"), data["schema"]
    else:
        name, description, schema = data.get("title"), data.get("description"), data
    schema = copy.deepcopy(dict(schema))
    for ref in _refs(schema):
        _resolve(schema, ref)  # a remote or dangling $ref fails here
    _json_validator(schema)  # a bad schema fails here, before any request is sent
    schema = _object_root(schema)
    return ResponseSchema(
        name=_safe_name(name),
        schema=schema,
        description=description if isinstance(description, str) else None,
    )


def _object_root(schema: dict[str, Any]) -> dict[str, Any]:
    """*schema* with a root ``$ref`` (a recursive pydantic model) inlined; TypeError if
    the root is not an object."""
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(schema, ref)
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
    kind = schema.get("type")
    if kind == "object":
        return schema
    if kind is None and "properties" in schema:
        return {"type": "object", **schema}  # Anthropic and OpenAI want the type said
    raise TypeError(
        "a response model must describe a JSON object at its root (every provider needs "
        f"one), not type={kind!r}: wrap a list or a scalar in a model with one field"
    )


def _json_validator(schema: dict[str, Any]) -> Any:
    """A jsonschema validator for *schema* (its ``$schema`` draft, else 2020-12)."""
    jsonschema = _import("jsonschema")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


# --- walking schemas -------------------------------------------------------------------

#: keywords whose value is a schema, a list of schemas, or a dict of named schemas
_ONE_SCHEMA = (
    "items",
    "additionalProperties",
    "additionalItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_NAMED_SCHEMAS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def _map_schema(
    node: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]
) -> Any:  # dict in, dict out
    """A copy of *node* with *fn* applied to every subschema, children first."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _map_schema(out[key], fn)
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_map_schema(s, fn) for s in out[key]]
    for key in _NAMED_SCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _map_schema(s, fn) for name, s in out[key].items()}
    return fn(out)


def _refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in *node*."""
    found: list[str] = []

    def visit(schema: dict[str, Any]) -> dict[str, Any]:
        if isinstance(schema.get("$ref"), str):
            found.append(schema["$ref"])
        return schema

    _map_schema(node, visit)
    return iter(found)


def _resolve(root: Mapping[str, Any], ref: str) -> dict[str, Any]:
    """The subschema a local ``$ref`` (``#``, ``#/$defs/Name``) points at."""
    if not ref.startswith("#"):
        raise ValueError(f"only local $refs (#/...) are supported, not {ref!r}")
    target: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, Mapping) or part not in target:
            raise ValueError(f"$ref {ref!r} points at nothing")
        target = target[part]
    if not isinstance(target, Mapping):
        raise ValueError(f"$ref {ref!r} does not point at a schema")
    return dict(target)


def _accepts_null(schema: Any, root: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether ``null`` is valid for *schema* (as far as type/const/enum/anyOf/$ref say)."""
    if not isinstance(schema, Mapping):
        return schema is not False
    if depth > 32:  # a $ref cycle with no type in it
        return True
    ref = schema.get("$ref")
    if isinstance(ref, str) and not _accepts_null(_resolve(root, ref), root, depth + 1):
        return False
    kind = schema.get("type")
    if kind is not None and kind != "null" and not (isinstance(kind, list) and "null" in kind):
        return False
    if "const" in schema and schema["const"] is not None:
        return False
    if isinstance(schema.get("enum"), list) and None not in schema["enum"]:
        return False
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and not any(
            _accepts_null(b, root, depth + 1) for b in branches
        ):
            return False
    parts = schema.get("allOf")
    return not (
        isinstance(parts, list) and not all(_accepts_null(p, root, depth + 1) for p in parts)
    )


# --- the strict rewrite ----------------------------------------------------------------

# fmt: off
_STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const",
    "$ref", "$defs", "definitions", "title", "description", "pattern", "format", "multipleOf",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
})
# fmt: on
_STRICT_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)
#: keywords that constrain values: dropping one is a change worth reporting
# fmt: off
_CONSTRAINTS = frozenset({
    "minLength", "maxLength", "uniqueItems", "contains", "minContains", "maxContains",
    "unevaluatedItems", "additionalItems", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "unevaluatedProperties", "not", "if", "then", "else",
    "dependentRequired", "dependentSchemas", "dependencies",
})
# fmt: on
#: dropped constraints with a scalar value, written into the description instead
_HINTS = frozenset(
    {
        "minLength",
        "maxLength",
        "uniqueItems",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
    }
)


def _strict(schema: dict[str, Any]) -> StrictSchema:
    rewrite = _StrictRewrite(schema)
    rewritten = rewrite.node(schema, "#")
    return StrictSchema(
        schema=rewritten, changes=tuple(rewrite.changes), shape_kept=not rewrite.shape_lost
    )


class _StrictRewrite:
    """One rewrite of a schema to OpenAI's strict subset (see ResponseSchema.strict_schema)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.changes: list[str] = []
        self.shape_lost = False
        self.inlining: set[str] = set()

    def note(self, path: str, change: str) -> None:
        self.changes.append(f"{path}: {change}")

    def node(self, schema: Any, path: str) -> Any:
        if not isinstance(schema, dict):
            return schema
        node = self.normalize(dict(schema), path)
        ref = node.get("$ref")
        if isinstance(ref, str) and len(node) > 1:
            # a $ref with siblings cannot be sent: inline its target (the siblings win),
            # except inside itself (a recursive model), where the siblings are only
            # annotations and go
            if ref in self.inlining:
                return {"$ref": ref}
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            self.inlining.add(ref)
            try:
                return self.node({**_resolve(self.root, ref), **siblings}, path)
            finally:
                self.inlining.discard(ref)
        for key in ("$defs", "definitions"):
            if isinstance(node.get(key), dict):
                node[key] = {
                    name: self.node(sub, f"{path}/{key}/{_pointer(name)}")
                    for name, sub in node[key].items()
                }
        if isinstance(node.get("items"), dict):
            node["items"] = self.node(node["items"], f"{path}/items")
        if isinstance(node.get("anyOf"), list):
            node["anyOf"] = [self.node(s, f"{path}/anyOf/{i}") for i, s in enumerate(node["anyOf"])]
        kind = node.get("type")
        if (
            "properties" in node
            or kind == "object"
            or (isinstance(kind, list) and "object" in kind)
        ):
            self.object(node, path)
        if not {"type", "anyOf", "$ref", "enum", "const"} & set(node):
            self.note(path, "no type (any value): strict mode needs one")
            self.shape_lost = True
        return node

    def normalize(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        """Compositions strict mode lacks rewritten, unsupported keywords dropped."""
        parts = node.pop("allOf", None)
        if isinstance(parts, list):
            if len(parts) > 1:
                self.note(path, f"allOf of {len(parts)} schemas merged into one")
            node = _merge_all_of(self.root, node, parts)
        one_of = node.pop("oneOf", None)
        if isinstance(one_of, list):
            if "anyOf" in node:
                self.note(path, "oneOf dropped (anyOf kept)")
            else:
                node["anyOf"] = one_of
                if "discriminator" not in node:  # a tagged union's branches never overlap
                    self.note(path, "oneOf became anyOf")
        prefix = node.pop("prefixItems", None)
        if isinstance(node.get("items"), list):  # the tuple form before draft 2020-12
            prefix = node.pop("items")
        if isinstance(prefix, list) and prefix:
            rest = node.get("items")
            kinds = [*prefix, rest] if isinstance(rest, dict) else prefix
            node["items"] = kinds[0] if len(kinds) == 1 else {"anyOf": kinds}
            self.note(path, "a tuple (prefixItems) relaxed to items of any of its types")
        hints: list[str] = []
        for key in [k for k in node if k not in _STRICT_KEYWORDS]:
            value = node.pop(key)
            if key not in _CONSTRAINTS:
                continue  # an annotation (default, examples...): validate() applies defaults
            if key in _HINTS and isinstance(value, (int, str)):
                hints.append(f"{key}: {json.dumps(value)}")
                self.note(path, f"{key} dropped (stated in the description)")
            else:
                self.note(path, f"{key} dropped")
        if "format" in node and node["format"] not in _STRICT_FORMATS:
            value = node.pop("format")
            hints.append(f"format: {json.dumps(value, default=str)}")
            self.note(path, f"format {value!r} dropped (stated in the description)")
        if hints:
            # the model still reads what strict mode cannot enforce; validate() enforces it
            said = node.get("description")
            hint = f"({', '.join(hints)})"
            node["description"] = f"{said} {hint}" if isinstance(said, str) and said else hint
        return node

    def object(self, node: dict[str, Any], path: str) -> None:
        """Every property required (optional ones nullable), no additional properties."""
        properties = node.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        extra = node.get("additionalProperties")
        if (extra is not None and extra is not False) or (extra is None and not properties):
            self.note(path, "additionalProperties dropped: only the listed properties can appear")
            self.shape_lost = True
        required = set(node.get("required") or ())
        strict_properties: dict[str, Any] = {}
        for name, sub in properties.items():
            sub = self.node(sub, f"{path}/properties/{_pointer(name)}")
            if name not in required and not _accepts_null(sub, self.root):
                sub = _nullable(sub)
            strict_properties[name] = sub
        node.setdefault("type", "object")
        node["properties"] = strict_properties
        node["required"] = list(strict_properties)
        node["additionalProperties"] = False


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """*schema* or null; its title and description stay outside the union."""
    outer: dict[str, Any] = {k: schema[k] for k in ("title", "description") if k in schema}
    inner = {k: v for k, v in schema.items() if k not in outer}
    if set(inner) == {"anyOf"}:
        return {**outer, "anyOf": [*inner["anyOf"], {"type": "null"}]}
    return {**outer, "anyOf": [inner, {"type": "null"}]}


def _merge_all_of(
    root: Mapping[str, Any], node: dict[str, Any], parts: list[Any]
) -> dict[str, Any]:
    """*node* with its ``allOf`` *parts* merged in: properties and required are united,
    other keywords come from the first that has them (*node* first). One part that is a
    bare ``$ref`` stays one (it is inlined later only if it has siblings)."""
    merged: dict[str, Any] = {}
    for part in [node, *parts]:
        if not isinstance(part, dict):
            continue
        if len(parts) > 1 and set(part) == {"$ref"}:
            part = _resolve(root, part["$ref"])
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                have = merged.setdefault("required", [])
                have.extend(r for r in value if r not in have)
            else:
                merged.setdefault(key, value)
    return merged


# --- the llama.cpp grammar and the JSON-mode instruction -------------------------------

# fmt: off
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
    "readOnly", "writeOnly", "discriminator",
})
# fmt: on


def _for_grammar(node: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in node.items() if k not in _ANNOTATIONS}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and not (pattern.startswith("^") and pattern.endswith("$")):
        del out["pattern"]
    return out


def _without_titles(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in ("title", "$schema")}


# --- reading and checking an answer ----------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()
_MAX_CANDIDATES = 100


def _extract_json(text: str) -> Any:
    """The JSON in *text*: all of it, else a fenced block, else the first top-level
    ``{...}`` that parses. ValueError, saying why, when there is none."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("the answer is empty")
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    for match in _FENCE.finditer(stripped):
        try:
            return json.loads(match.group(1).strip())
        except ValueError:
            pass
    start = stripped.find("{")
    if start < 0:
        raise ValueError("the answer has no JSON object in it")
    first_error: ValueError | None = None
    for _ in range(_MAX_CANDIDATES):
        try:
            value, _end = _DECODER.raw_decode(stripped, start)
            return value
        except ValueError as exc:
            first_error = first_error or exc
        # the next candidate starts after this one's closing brace: an object nested in a
        # broken one (a truncated answer's last field) is not the answer
        end = _object_end(stripped, start)
        start = stripped.find("{", end) if end > 0 else -1
        if start < 0:
            break
    raise ValueError(f"the answer is not valid JSON: {first_error}")


def _object_end(text: str, start: int) -> int:
    """The index after the ``}`` that closes the ``{`` at *start* (braces in strings do not
    count), or -1 when it is never closed."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _drop_absent_nulls(value: Any, schema: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    """*value* without the nulls given for optional properties that do not accept null
    (strict mode's way of saying "absent")."""
    if not isinstance(schema, Mapping) or depth > 64:
        return value
    for _ in range(8):
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            break
        schema = _resolve(root, ref)
    if isinstance(value, dict):
        properties = schema.get("properties")
        if isinstance(properties, Mapping):
            required = set(schema.get("required") or ())
            out = {}
            for key, item in value.items():
                sub = properties.get(key)
                if sub is None:
                    out[key] = item
                elif item is None and key not in required and not _accepts_null(sub, root):
                    continue
                else:
                    out[key] = _drop_absent_nulls(item, sub, root, depth + 1)
            return out
        branch = _only_object_branch(value, schema, root)
        if branch is not None:
            return _drop_absent_nulls(value, branch, root, depth + 1)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_drop_absent_nulls(item, schema["items"], root, depth + 1) for item in value]
    return value


def _only_object_branch(
    value: dict[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """The one ``anyOf``/``oneOf`` branch *value* can be (its keys listed, its consts
    equal), or None when it is not clear."""
    branches = schema.get("anyOf") or schema.get("oneOf")
    if not isinstance(branches, list):
        return None
    fits = []
    for branch in branches:
        if isinstance(branch, Mapping) and isinstance(branch.get("$ref"), str):
            branch = _resolve(root, branch["$ref"])
        properties = branch.get("properties") if isinstance(branch, Mapping) else None
        if not isinstance(properties, Mapping) or not set(value) <= set(properties):
            continue
        consts = {
            k: s["const"] for k, s in properties.items() if isinstance(s, Mapping) and "const" in s
        }
        if all(value.get(k, c) == c for k, c in consts.items()):
            fits.append(branch)
    return fits[0] if len(fits) == 1 else None


def _pydantic_line(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(root)"
    return f"{where}: {error['msg']}"


def _jsonschema_line(error: Any) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "(root)"
    message = str(error.message)
    return f"{where}: {message if len(message) <= 300 else message[:297] + '...'}"


# --- finish reasons --------------------------------------------------------------------

FinishAction = Literal["error", "keep", "retry_larger"]
Verdict = Literal["accept", "error", "retry"]
Cause = Literal["length", "content_filter", "refusal"]

#: finish reasons meaning the output hit its cap: OpenAI/llama.cpp, Anthropic (its output
#: cap, and the context window), Responses, Gemini
TRUNCATED = frozenset(
    {"length", "max_tokens", "model_context_window_exceeded", "max_output_tokens", "MAX_TOKENS"}
)
#: finish reasons meaning a filter stopped the output: OpenAI, Gemini
FILTERED = frozenset(
    {"content_filter", "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII"}
)
#: finish reasons meaning the model declined: Anthropic's stop_reason
REFUSED = frozenset({"refusal"})


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishPolicy:
    """What to do with an answer that did not end normally. The defaults suit structured
    outputs (a cut or filtered answer cannot be a valid object); for plain text,
    ``FinishPolicy(length="keep", content_filter="keep", refusal="keep")`` keeps all.

    Args:
        length: the output hit ``max_tokens``: ``"error"``, ``"keep"`` it as it is (a
            structured one is then validated and re-asked), or ``"retry_larger"``: ask again
            with ``max_tokens * growth``, capped by the room left in the context window,
            at most *max_retries* times.
        content_filter: a content filter stopped the output: ``"error"`` or ``"keep"``.
        refusal: the model refused (OpenAI's ``message.refusal``, Anthropic's
            ``stop_reason: "refusal"``): ``"error"`` or ``"keep"``.
        growth: the factor ``max_tokens`` grows by on each ``retry_larger`` (> 1).
        max_retries: the most ``retry_larger`` retries per item.
    """

    length: FinishAction = "error"
    content_filter: Literal["error", "keep"] = "error"
    refusal: Literal["error", "keep"] = "error"
    growth: float = 2.0
    max_retries: int = 1

    def __post_init__(self) -> None:
        if self.length not in ("error", "keep", "retry_larger"):
            raise ValueError(f"length must be error, keep or retry_larger, not {self.length!r}")
        for name in ("content_filter", "refusal"):
            if getattr(self, name) not in ("error", "keep"):
                raise ValueError(f"{name} must be error or keep, not {getattr(self, name)!r}")
        if not (self.growth > 1 and math.isfinite(self.growth)):
            raise ValueError(f"growth must be a finite number > 1, not {self.growth!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FinishDecision:
    """What :func:`decide` says.

    Attributes:
        verdict: ``"accept"`` the answer, fail the item (``"error"``), or ``"retry"``.
        max_tokens: for a retry, the ``max_tokens`` to send.
        cause: why the answer stopped, when it was not a normal stop.
        reason: a sentence for logs and for the error.
    """

    verdict: Verdict
    max_tokens: int | None = None
    cause: Cause | None = None
    reason: str = ""

    def exception(self, raw: str = "", **context: Any) -> PermanentError:
        """The error for an ``"error"`` verdict: :class:`~llmbatch.errors.ContentFiltered`
        for a filter or a refusal, :class:`InvalidOutput` for a cut answer."""
        if self.cause in ("content_filter", "refusal"):
            return ContentFiltered(self.reason, **context)
        return InvalidOutput(self.reason, raw=raw, errors=[self.reason], **context)


def decide(
    finish_reason: str | None,
    refusal: str | None,
    policy: FinishPolicy,
    attempt: int,
    *,
    max_tokens: int | None = None,
    max_tokens_limit: int | None = None,
) -> FinishDecision:
    """What to do with an answer, given why it stopped. Pure: the caller acts on it.

    Args:
        finish_reason: the provider's ``finish_reason`` / ``stop_reason``.
        refusal: OpenAI's ``message.refusal`` text, if any (it wins over the finish reason).
        policy: the job's policy.
        attempt: ``retry_larger`` retries already made for this item (0 at first).
        max_tokens: the ``max_tokens`` this answer had (unknown: no retry_larger).
        max_tokens_limit: the most ``max_tokens`` may be: the model's context window less
            the prompt's tokens (or the model's output cap). None: no cap but *max_retries*.

    The rule for ``retry_larger``: ``ceil(max_tokens * growth)``, capped by
    *max_tokens_limit*; no retry when that is not larger, or *max_retries* are spent.
    """
    if refusal:
        return _keep_or_error(policy.refusal, "refusal", f"the model refused: {refusal}")
    if finish_reason in REFUSED:
        return _keep_or_error(policy.refusal, "refusal", "the model refused to answer")
    if finish_reason in FILTERED:
        return _keep_or_error(
            policy.content_filter,
            "content_filter",
            f"a content filter stopped the answer (finish_reason={finish_reason!r})",
        )
    if finish_reason not in TRUNCATED:
        return FinishDecision(verdict="accept")
    cut = (
        f"the answer was cut off at max_tokens={max_tokens}"
        if max_tokens is not None
        else f"the answer was cut off (finish_reason={finish_reason!r})"
    )
    if policy.length == "keep":
        return FinishDecision(verdict="accept", cause="length", reason=cut)
    if policy.length == "error":
        return FinishDecision(verdict="error", cause="length", reason=cut)
    if max_tokens is None:  # nothing to grow from
        reason = f"{cut}, and its max_tokens is unknown: no retry with a larger one"
        return FinishDecision(verdict="error", cause="length", reason=reason)
    if attempt >= policy.max_retries:
        retries = "1 retry" if attempt == 1 else f"{attempt} retries"
        reason = f"{cut} (after {retries} with a larger max_tokens)"
        return FinishDecision(verdict="error", cause="length", reason=reason)
    larger = math.ceil(max_tokens * policy.growth)
    if max_tokens_limit is not None:
        larger = min(larger, max_tokens_limit)
    if larger <= max_tokens:
        reason = f"{cut}, and the context window leaves no room for more"
        return FinishDecision(verdict="error", cause="length", reason=reason)
    return FinishDecision(
        verdict="retry", max_tokens=larger, cause="length", reason=f"{cut}: retrying with {larger}"
    )


def _keep_or_error(action: str, cause: Cause, reason: str) -> FinishDecision:
    verdict: Verdict = "accept" if action == "keep" else "error"
    return FinishDecision(verdict=verdict, cause=cause, reason=reason)
