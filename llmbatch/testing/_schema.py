"""JSON Schema as the simulated models read it: an instance of a schema, OpenAI's strict-mode
rules, and the two ways to spoil an answer (broken JSON, a schema violation).

Nothing here knows about requests or providers; :mod:`llmbatch.testing._structured` does.

The subset understood is what models' structured outputs and pydantic v2 produce:
``object`` (``properties``, ``required``, ``additionalProperties``, ``minProperties``),
``array`` (``items``, ``prefixItems``, ``minItems``/``maxItems``, ``uniqueItems``),
``string`` (``enum``, ``minLength``/``maxLength``, ``format`` ``date``, ``date-time``,
``time``, ``email``, ``uri``, ``uuid``, ``hostname``, ``ipv4``, ``ipv6``, ``duration``),
``integer``/``number`` (``minimum``/``maximum``, ``exclusiveMinimum``/``exclusiveMaximum``,
``multipleOf``), ``boolean``, ``null``, ``anyOf``/``oneOf`` (the first non-null branch),
``allOf`` (merged), ``const``, ``$ref`` (JSON pointers into the schema, e.g. ``$defs``),
and type lists (``["string", "null"]``). A string's ``pattern`` is honoured for the
regular expressions schemas use (literals, character classes, groups, alternatives,
repeats, anchors, back references); lookarounds are checked, not steered (see
:func:`_pattern_string`). Draft 4-7's tuple ``items`` (a list) reads as ``prefixItems``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import random
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SchemaError", "instance", "json_types", "spoil_json", "strict_problem", "violate"]

#: keywords OpenAI's strict mode refuses anywhere in a schema ("'minLength' is not
#: permitted."): the composition keywords it lacks, and the constraints its structured
#: outputs guide does not list as supported (strings: pattern, format; numbers: minimum,
#: maximum, their exclusive forms, multipleOf; arrays: minItems, maxItems)
STRICT_FORBIDDEN = (
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "patternProperties",
    "propertyNames",
    "unevaluatedProperties",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedItems",
    "additionalItems",
)
#: a string pattern's repeats without an upper bound draw at most this many more
_OPEN_REPEAT = 3
#: attempts at a value that meets every constraint (pattern, length, uniqueness)
_ATTEMPTS = 20
#: past this depth an instance keeps only what is required (optional properties dropped,
#: arrays at ``minItems``, nullable values null), so that recursive schemas end
_SHALLOW_DEPTH = 5
#: a schema still nesting here has no finite instance
_MAX_DEPTH = 32
_WORDS = (
    "amber",
    "basalt",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "iris",
    "juniper",
    "kestrel",
    "lagoon",
    "meadow",
    "nimbus",
    "orchid",
    "prairie",
    "quartz",
    "river",
    "summit",
    "tundra",
)
_Path = tuple[str, ...]


class SchemaError(ValueError):
    """A schema that admits no value the simulator can build (or cannot be read).

    Args:
        message: what is wrong.
        path: where, as keys from the schema's root.
    """

    def __init__(self, message: str, path: _Path = ()) -> None:
        super().__init__(f"In context={path!r}, {message}")
        self.path = path


def _resolve_pointer(root: Mapping[str, Any], ref: str, path: _Path) -> Any:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise SchemaError(f"$ref {ref!r} is not a reference into this schema", path)
    node: Any = root
    for raw in ref[2:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, Sequence) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise SchemaError(f"$ref {ref!r} cannot be resolved", path)
    return node


def _resolve(root: Mapping[str, Any], schema: Any, path: _Path) -> Any:
    """*schema* with ``$ref`` replaced by its target (siblings win) and ``allOf`` merged."""
    for _ in range(_MAX_DEPTH):
        if not isinstance(schema, Mapping) or "$ref" not in schema:
            break
        target = _resolve_pointer(root, schema["$ref"], path)
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **siblings} if isinstance(target, Mapping) else target
    else:
        raise SchemaError("$ref chain does not end", path)
    if isinstance(schema, Mapping) and "allOf" in schema:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(root, part, path)
            if not isinstance(part, Mapping):
                continue
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**value, **merged.get("properties", {})}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        schema = merged
    return schema


def _is_null(schema: Any) -> bool:
    return isinstance(schema, Mapping) and (
        schema.get("type") == "null" or ("const" in schema and schema["const"] is None)
    )


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


class _Builder:
    """Builds one instance of *root*; the first free-form string carries ``[tag]``."""

    def __init__(self, root: Mapping[str, Any], rng: random.Random, tag: str | None) -> None:
        self.root = root
        self.rng = rng
        self.tag = tag
        #: where the tagged string went (keys from the instance's root), once placed
        self.tag_path: _Path | None = None

    def value(self, schema: Any, at: _Path, where: _Path) -> Any:
        """An instance of *schema*; *at* is the instance path, *where* the schema path."""
        depth = len(at)
        if depth > _MAX_DEPTH:
            raise SchemaError("the schema nests without end (no finite instance)", where)
        if schema is True or schema is None:
            schema = {}
        if schema is False:
            raise SchemaError("a false schema admits no value", where)
        schema = _resolve(self.root, schema, where)
        if not isinstance(schema, Mapping):
            raise SchemaError(f"expected a schema object, got {schema!r}", where)
        shallow = depth >= _SHALLOW_DEPTH
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = list(schema["enum"])
            if not options:
                raise SchemaError("an empty enum admits no value", where)
            if shallow and None in options:
                return None
            return self.rng.choice(options)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = list(schema[key])
                solid = [b for b in branches if not _is_null(_resolve(self.root, b, where))]
                if solid and not (shallow and len(solid) < len(branches)):
                    rest = {k: v for k, v in schema.items() if k != key}
                    branch = _resolve(self.root, solid[0], where)
                    merged = {**rest, **branch} if isinstance(branch, Mapping) else branch
                    return self.value(merged, at, (*where, key, str(branches.index(solid[0]))))
                if branches:
                    return None
                raise SchemaError(f"an empty {key} admits no value", where)
        kind = self._kind(schema, shallow)
        if kind == "null":
            return None
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "integer":
            return self._integer(schema, where)
        if kind == "number":
            return self._number(schema, where)
        if kind == "array":
            return self._array(schema, at, where, shallow)
        if kind == "object":
            return self._object(schema, at, where, shallow)
        return self._string(schema, at, where)

    @staticmethod
    def _kind(schema: Mapping[str, Any], shallow: bool) -> str:
        declared = schema.get("type")
        if isinstance(declared, str):
            return declared
        if isinstance(declared, Sequence) and declared:
            solid = [t for t in declared if t != "null"]
            return "null" if not solid or (shallow and "null" in declared) else solid[0]
        if {"properties", "additionalProperties", "required", "minProperties"} & schema.keys():
            return "object"
        if {"items", "prefixItems", "minItems", "maxItems"} & schema.keys():
            return "array"
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
            return "number"
        return "string"

    def _object(
        self, schema: Mapping[str, Any], at: _Path, where: _Path, shallow: bool
    ) -> dict[str, Any]:
        properties: Mapping[str, Any] = schema.get("properties") or {}
        required = list(schema.get("required") or ())
        extra = schema.get("additionalProperties", True)
        result: dict[str, Any] = {}
        for name, sub in properties.items():
            if shallow and name not in required:
                continue
            result[name] = self.value(sub, (*at, name), (*where, "properties", name))
        for name in required:
            if name not in result:
                if extra is False:
                    raise SchemaError(f"{name!r} is required but not allowed", where)
                result[name] = self.value(extra, (*at, name), (*where, "additionalProperties"))
        wanted = int(schema.get("minProperties") or 0)
        if not properties and isinstance(extra, Mapping) and not shallow:
            wanted = max(wanted, 1 + self.rng.randrange(2))
        if wanted > len(result) and extra is False:
            raise SchemaError("minProperties exceeds the properties allowed", where)
        names = iter(f"{word}_{i}" for i in itertools.count(1) for word in _WORDS)
        while len(result) < wanted:
            name = next(names)
            if name not in result:
                result[name] = self.value(extra, (*at, name), (*where, "additionalProperties"))
        return result

    def _array(
        self, schema: Mapping[str, Any], at: _Path, where: _Path, shallow: bool
    ) -> list[Any]:
        low = int(schema.get("minItems") or 0)
        high = schema.get("maxItems")
        if high is not None and high < low:
            raise SchemaError("maxItems is below minItems", where)
        prefix = list(schema.get("prefixItems") or ())
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7's tuple form
            prefix, items = items, schema.get("additionalItems", True)
        size = low if shallow else max(low, 1 + self.rng.randrange(3))
        if high is not None:
            size = min(size, int(high))
        if items is False:
            if low > len(prefix):
                raise SchemaError("minItems exceeds prefixItems with items: false", where)
            size = min(size, len(prefix))
        unique = bool(schema.get("uniqueItems"))
        result: list[Any] = []
        seen: set[str] = set()
        for i in range(size):
            sub, sub_where = (
                (prefix[i], (*where, "prefixItems", str(i)))
                if i < len(prefix)
                else (items, (*where, "items"))
            )
            for _ in range(_ATTEMPTS):
                value = self.value(sub, (*at, str(i)), sub_where)
                key = json.dumps(value, sort_keys=True)
                if not unique or key not in seen:
                    break
            else:
                if i >= low:
                    break
                raise SchemaError("uniqueItems: too few distinct values for minItems", where)
            seen.add(key)
            result.append(value)
        return result

    def _string(self, schema: Mapping[str, Any], at: _Path, where: _Path) -> str:
        rng = self.rng
        fmt = schema.get("format")
        if fmt is not None:
            formatted = _formatted(fmt, rng)
            if formatted is not None:
                return formatted
        low = int(schema.get("minLength") or 0)
        high = schema.get("maxLength")
        if high is not None and high < low:
            raise SchemaError("maxLength is below minLength", where)
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            return _pattern_string(pattern, rng, low, high, where)
        text = _words(rng, 1, 3)
        if self.tag is not None and self.tag_path is None:
            marker = f"[{self.tag}]"
            if high is None or high >= len(marker):
                text = f"{marker} {_words(rng, 2, 5)}"
                self.tag_path = at
        while len(text) < low:
            text += " " + _words(rng, 1, 3)
        if high is not None and len(text) > high:
            text = text[:high].rstrip() if len(text[:high].rstrip()) >= low else text[:high]
        return text

    def _integer(self, schema: Mapping[str, Any], where: _Path) -> int:
        low, high = _bounds(schema)
        lo = None if low is None else math.floor(low[0]) + 1 if low[1] else math.ceil(low[0])
        hi = None if high is None else math.ceil(high[0]) - 1 if high[1] else math.floor(high[0])
        lo, hi = _span(lo, hi, 100)
        if schema.get("multipleOf"):
            return int(self._multiple(schema, where, integer=True))
        if lo > hi:
            raise SchemaError("no integer lies within the bounds", where)
        return self.rng.randint(int(lo), int(hi))

    def _number(self, schema: Mapping[str, Any], where: _Path) -> float | int:
        if schema.get("multipleOf"):
            return self._multiple(schema, where, integer=False)
        low, high = _bounds(schema)
        lo, hi = _span(None if low is None else low[0], None if high is None else high[0], 100.0)
        if lo > hi or (lo == hi and ((low and low[1]) or (high and high[1]))):
            raise SchemaError("no number lies within the bounds", where)
        value: float = lo + (hi - lo) * (0.1 + 0.8 * self.rng.random())
        rounded = round(value, 2)
        return rounded if _inside(rounded, low, high) else value

    def _multiple(self, schema: Mapping[str, Any], where: _Path, *, integer: bool) -> float | int:
        """A multiple of ``multipleOf`` within the bounds (an integer if *integer*), which
        a validator dividing in floating point also accepts (``0.07 / 0.01`` is not 7)."""
        step = schema["multipleOf"]
        if not isinstance(step, int | float) or isinstance(step, bool) or step <= 0:
            raise SchemaError(f"multipleOf must be a number > 0, not {step!r}", where)
        low, high = _bounds(schema)
        lo, hi = _span(
            None if low is None else low[0], None if high is None else high[0], 100.0 * step
        )
        first, last = math.ceil(lo / step), math.floor(hi / step)
        if first <= last:
            for k in [self.rng.randint(first, last) for _ in range(_ATTEMPTS)] + [0, first, last]:
                value: float | int = k * step
                if integer or isinstance(step, int):
                    if not float(value).is_integer():
                        continue
                    value = int(value)
                quotient = value / step
                if _inside(value, low, high) and quotient == int(quotient):
                    return value
        raise SchemaError("no multiple of multipleOf lies within the bounds", where)


_Bound = tuple[float, bool] | None


def _inside(x: float, low: _Bound, high: _Bound) -> bool:
    """Whether *x* lies within ``(value, exclusive)`` bounds (None: unbounded)."""
    above = low is None or (x > low[0] if low[1] else x >= low[0])
    below = high is None or (x < high[0] if high[1] else x <= high[0])
    return above and below


def _bounds(
    schema: Mapping[str, Any],
) -> tuple[_Bound, _Bound]:
    """``((low, exclusive), (high, exclusive))``, each None when unbounded (draft 4's
    boolean ``exclusiveMinimum`` included)."""
    low: _Bound = None
    high: _Bound = None
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    ex_min, ex_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(minimum, int | float) and not isinstance(minimum, bool):
        low = (minimum, ex_min is True)
    if (
        isinstance(ex_min, int | float)
        and not isinstance(ex_min, bool)
        and (low is None or ex_min >= low[0])
    ):
        low = (ex_min, True)
    if isinstance(maximum, int | float) and not isinstance(maximum, bool):
        high = (maximum, ex_max is True)
    if (
        isinstance(ex_max, int | float)
        and not isinstance(ex_max, bool)
        and (high is None or ex_max <= high[0])
    ):
        high = (ex_max, True)
    return low, high


def _span(lo: Any, hi: Any, width: float) -> tuple[Any, Any]:
    if lo is None and hi is None:
        return 0, width
    if lo is None:
        return hi - width, hi
    if hi is None:
        return lo, lo + width
    return lo, hi


#: the standard library's own regular-expression parser (``re._parser``, Python 3.11+)
_RE_PARSER: Any = importlib.import_module("re._parser")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
#: what a character class (digit, word, space, or their negations) draws from
_CATEGORIES = {
    "CATEGORY_DIGIT": _DIGITS,
    "CATEGORY_NOT_DIGIT": _LETTERS + " -",
    "CATEGORY_WORD": _LETTERS + _LETTERS.upper() + _DIGITS + "_",
    "CATEGORY_NOT_WORD": " -.,",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_SPACE": _LETTERS + _DIGITS,
}
_PRINTABLE = _LETTERS + _LETTERS.upper() + _DIGITS + " -_.,:;/@#+"


class _Unsupported(Exception):
    """A regular-expression construct the string builder does not steer."""


def _class_char(items: Sequence[tuple[Any, Any]], rng: random.Random) -> str:
    """One character of a class ``[...]`` (its parsed *items*)."""
    negate = bool(items) and str(items[0][0]) == "NEGATE"
    chars: list[str] = []
    for op, arg in items[1:] if negate else items:
        name = str(op)
        if name == "LITERAL":
            chars.append(chr(arg))
        elif name == "RANGE":
            lo, hi = arg
            inside = [c for c in _PRINTABLE if lo <= ord(c) <= hi]
            chars.extend(inside or [chr(lo)])
        elif name == "CATEGORY":
            chars.extend(_CATEGORIES.get(str(arg), ""))
        else:
            raise _Unsupported(name)
    if negate:
        chars = [c for c in _PRINTABLE if c not in chars]
    if not chars:
        raise _Unsupported("an empty class")
    return rng.choice(chars)


def _emit(items: Sequence[tuple[Any, Any]], rng: random.Random, groups: dict[int, str]) -> str:
    """A string the parsed pattern *items* match (anchors and lookarounds are skipped:
    the caller checks the result); _Unsupported names a construct it cannot build."""
    out: list[str] = []
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append(rng.choice([c for c in _PRINTABLE if ord(c) != arg]))
        elif name == "ANY":
            out.append(rng.choice(_LETTERS))
        elif name == "IN":
            out.append(_class_char(arg, rng))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            least, most, sub = arg
            count = rng.randint(least, min(int(most), least + _OPEN_REPEAT))
            out.extend(_emit(sub, rng, groups) for _ in range(count))
        elif name == "SUBPATTERN":
            group, _, _, sub = arg
            text = _emit(sub, rng, groups)
            if group is not None:
                groups[group] = text
            out.append(text)
        elif name == "ATOMIC_GROUP":
            out.append(_emit(arg, rng, groups))
        elif name == "BRANCH":
            out.append(_emit(rng.choice(arg[1]), rng, groups))
        elif name == "GROUPREF":
            out.append(groups.get(arg, ""))
        elif name not in ("AT", "ASSERT", "ASSERT_NOT"):
            raise _Unsupported(name)
    return "".join(out)


def _pattern_string(
    pattern: str, rng: random.Random, low: int, high: int | None, where: _Path
) -> str:
    """A string that *pattern* matches (``re.search``, as JSON Schema reads it) and whose
    length lies within ``[low, high]``.

    Raises:
        SchemaError: *pattern* does not compile, or no string was found for it (a
            construct not steered, such as a conditional group, or lookarounds and length
            limits that the drawn strings keep missing).
    """
    try:
        compiled = re.compile(pattern)
        parsed = list(_RE_PARSER.parse(pattern))
    except re.error as error:
        raise SchemaError(
            f"pattern {pattern!r} is not a regular expression: {error}", where
        ) from None
    for _ in range(_ATTEMPTS):
        try:
            text = _emit(parsed, rng, {})
        except _Unsupported as construct:
            raise SchemaError(
                f"the simulator cannot build a string for pattern {pattern!r} ({construct})",
                where,
            ) from None
        if compiled.search(text) and low <= len(text) and (high is None or len(text) <= high):
            return text
    raise SchemaError(f"the simulator found no string for pattern {pattern!r}", where)


def _formatted(fmt: str, rng: random.Random) -> str | None:
    """A plausible value of a string ``format`` (None for formats not simulated)."""
    year, month, day = rng.randint(2019, 2026), rng.randint(1, 12), rng.randint(1, 28)
    hour, minute, second = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    first, second_word = rng.choice(_WORDS), rng.choice(_WORDS)
    formats = {
        "date": f"{year:04d}-{month:02d}-{day:02d}",
        "date-time": f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z",
        "time": f"{hour:02d}:{minute:02d}:{second:02d}Z",
        "email": f"{first}.{second_word}@example.com",
        "uri": f"https://example.com/{first}/{second_word}",
        "url": f"https://example.com/{first}/{second_word}",
        "hostname": f"{first}.example.com",
        "ipv4": f"192.0.2.{rng.randint(1, 254)}",
        "ipv6": f"2001:db8::{rng.randint(1, 0xFFFF):x}",
        "duration": f"P{day}DT{hour}H",
    }
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return formats.get(fmt)


def instance(
    schema: Mapping[str, Any], *, seed: str, tag: str | None = None
) -> tuple[Any, _Path | None]:
    """A deterministic instance of *schema* and where its ``[tag]`` string went.

    Args:
        schema: the JSON Schema (its ``$ref`` s point into it).
        seed: every choice (lengths, enum members, numbers) derives from it.
        tag: the first free-form string (no ``format``, ``enum`` or ``const``, and a
            ``maxLength`` of at least ten) starts with ``[tag]``.

    Returns:
        ``(value, tag_path)``; ``tag_path`` is the key path of the tagged string, or
        None when no string could carry the tag.

    Raises:
        SchemaError: the schema admits no value the simulator can build.
    """
    builder = _Builder(schema, random.Random(seed), tag)
    value = builder.value(schema, (), ())
    return value, builder.tag_path


def json_types(root: Mapping[str, Any], schema: Any) -> frozenset[str] | None:
    """The JSON types *schema* may accept (``"integer"`` implies ``"number"`` and back), or
    None when it does not constrain the type."""
    try:
        schema = _resolve(root, schema, ())
    except SchemaError:
        return None
    if not isinstance(schema, Mapping):
        return None if schema is not False else frozenset()
    found: set[str] = set()
    if "const" in schema or "enum" in schema:
        for value in [schema["const"]] if "const" in schema else schema["enum"]:
            found.add(_type_of(value))
    elif "anyOf" in schema or "oneOf" in schema:
        for branch in schema.get("anyOf") or schema.get("oneOf") or ():
            types = json_types(root, branch)
            if types is None:
                return None
            found |= types
    elif "type" in schema:
        declared = schema["type"]
        found |= {declared} if isinstance(declared, str) else set(declared)
    else:
        return None
    if found & {"integer", "number"}:
        found |= {"integer", "number"}
    return frozenset(found)


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _wrong_type(root: Mapping[str, Any], schema: Any, value: Any) -> Any:
    """*value* turned into a type *schema* refuses (keeping its text), or None if no
    such type is known: wrapped in a list, or else in an object."""
    types = json_types(root, schema)
    if types is None:
        return None
    if "array" not in types:
        return [value]
    if "object" not in types:
        return {"value": value}
    return None


def violate(
    schema: Mapping[str, Any],
    value: Any,
    *,
    rng: random.Random,
    tag_path: _Path | None = None,
    keep_object: bool = False,
) -> Any | None:
    """Valid JSON close to *value* that violates *schema*, or None when none is found.

    A required property goes missing, or one property gets a wrong type; *rng* picks
    which and where. The tagged property (``tag_path[0]``) is never the one dropped, and a
    wrong type wraps the old value, so the answer still carries its tag. As a last resort
    a property is added where ``additionalProperties`` is false, or (unless
    *keep_object*, for tool inputs that must stay objects) the whole value is wrapped.
    """
    root = schema
    resolved = _resolve(root, schema, ())
    if isinstance(value, dict) and isinstance(resolved, Mapping):
        properties: Mapping[str, Any] = resolved.get("properties") or {}
        tagged = tag_path[0] if tag_path else None
        droppable = [k for k in resolved.get("required") or () if k in value and k != tagged]
        retypable = [
            k for k in value if k in properties and _wrong_type(root, properties[k], value[k])
        ]
        moves = [("drop", k) for k in droppable] + [("retype", k) for k in retypable]
        if moves:
            how, name = moves[rng.randrange(len(moves))]
            broken = dict(value)
            if how == "drop":
                del broken[name]
            else:
                broken[name] = _wrong_type(root, properties[name], value[name])
            return broken
        if resolved.get("additionalProperties") is False:
            return {**value, "unexpected_field": "not in the schema"}
    if keep_object:
        return None
    return _wrong_type(root, resolved, value)


def spoil_json(text: str, *, rng: random.Random, keep: str = "") -> str:
    """*text* (a JSON document) made unparseable, keeping the substring *keep* whole.

    An object or array is either cut short (at two thirds of its length or just after
    *keep*, whichever is later, and always before its closing bracket) or given a
    trailing comma before that bracket; a scalar gets an opening brace in front.
    """
    if text[:1] not in ("{", "["):
        # a scalar's prefix may still parse ("42" cut is "4"): open an object instead
        return "{" + text
    if rng.random() < 0.5:
        return f"{text[:-1]},{text[-1]}"
    kept = text.find(keep) + len(keep) if keep and keep in text else 0
    return text[: min(max(kept, 2 * len(text) // 3, 1), len(text) - 1)]


def strict_problem(schema: Any) -> str | None:
    """Why OpenAI's strict mode refuses *schema*, in its words, or None if it accepts it.

    The rules: the root is an object (not ``anyOf``); every object sets
    ``additionalProperties: false`` and lists every property in ``required``; a ``$ref``
    has no sibling keywords; :data:`STRICT_FORBIDDEN` keywords appear nowhere.
    """
    if not isinstance(schema, Mapping) or schema.get("type") != "object":
        declared = schema.get("type") if isinstance(schema, Mapping) else None
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{declared}\"'."
    return _strict_walk(schema, ())


def _strict_walk(schema: Any, path: _Path) -> str | None:
    if not isinstance(schema, Mapping):
        return None
    context = f"In context={path!r},"
    if "$ref" in schema and len(schema) > 1:
        extra = ", ".join(repr(k) for k in schema if k != "$ref")
        return f"{context} $ref cannot have keywords {{{extra}}}."
    for keyword in STRICT_FORBIDDEN:
        if keyword in schema:
            return f"{context} '{keyword}' is not permitted."
    declared = schema.get("type")
    objectish = declared == "object" or (isinstance(declared, list) and "object" in declared)
    if objectish or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            return f"{context} 'additionalProperties' is required to be supplied and to be false."
        required = schema.get("required") or []
        missing = [k for k in schema.get("properties") or {} if k not in required]
        if missing:
            return (
                f"{context} 'required' is required to be supplied and to be an array "
                f"including every key in properties. Missing '{missing[0]}'."
            )
    children: list[tuple[_Path, Any]] = []
    for group in ("$defs", "definitions", "properties"):
        for name, sub in (schema.get(group) or {}).items():
            children.append(((*path, group, name), sub))
    for group in ("anyOf", "oneOf", "prefixItems"):
        for i, sub in enumerate(schema.get(group) or ()):
            children.append(((*path, group, str(i)), sub))
    if isinstance(schema.get("items"), Mapping):
        children.append(((*path, "items"), schema["items"]))
    for where, sub in children:
        problem = _strict_walk(sub, where)
        if problem is not None:
            return problem
    return None
