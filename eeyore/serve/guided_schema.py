"""`response_format` into the tree constrained decoding walks (see `guided.py`).

Supported, as vLLM and OpenAI accept them: `{"type": "text"}` (no constraint),
`{"type": "json_object"}` (any JSON object) and `{"type": "json_schema", "json_schema":
{"name": ..., "schema": {...}, "strict": ...}}` with the JSON Schema subset: `type` object
(`properties`, `required`, `additionalProperties`), string (`enum`, `maxLength`), integer and
number (`enum`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`), boolean, null,
array (`items`, `minItems`, `maxItems`), `enum` and `const` of any JSON values, and `{}` (any
value). Annotations (`title`, `description`, `default`, `examples`, `$schema`, ...) are ignored.
Anything else (`anyOf`, type lists, `pattern`, `$ref`, ...) is refused with a `GuidedError`
naming the keyword and where it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SMALL_RANGE = 64  # a bounded integer with at most this many values is chosen like an enum
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "readOnly", "writeOnly", "deprecated"})
ALLOWED = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "string": {"type", "enum", "maxLength"},
    "integer": {"type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": {"type", "enum"},
    "null": {"type", "enum"},
    "array": {"type", "items", "minItems", "maxItems"},
}
ALLOWED["number"] = ALLOWED["integer"]


class GuidedError(ValueError):
    """A `response_format` this server cannot follow; the message is one line for a 400."""


@dataclass(frozen=True)
class Node:
    """One value of the reply. `kind`: object, string, integer, array, free_object (any object),
    any (any value); `enum` (any kind) lists the JSON values allowed, None when free."""

    kind: str
    enum: tuple[Any, ...] | None = None
    properties: tuple[tuple[str, "Node", bool], ...] = ()  # (name, value, required), schema order
    max_length: int | None = None
    lo: int | None = None
    hi: int | None = None
    items: "Node | None" = None
    min_items: int = 0
    max_items: int | None = None
    depth: int = 0  # free_object / any: how deep inside a json_object reply


def compile_format(fmt: Any) -> Node | None:
    """The tree for a `response_format`; None for plain text. Raises GuidedError."""
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise GuidedError("'response_format' must be an object with a 'type'")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Node("free_object")
    if kind != "json_schema":
        raise GuidedError(f"response_format type {kind!r} is not supported (text, json_object or json_schema)")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise GuidedError("response_format json_schema needs a 'json_schema' object holding a 'schema' object")
    return compile_schema(spec["schema"])


def compile_schema(schema: Any, where: str = "schema") -> Node:
    if not isinstance(schema, dict):
        raise GuidedError(f"response_format {where} must be an object")
    if "enum" in schema or "const" in schema:
        return _enum(schema, where)
    kind = schema.get("type")
    if kind is None:
        _only(schema, set(), where)
        return Node("any")
    if not isinstance(kind, str):
        raise GuidedError(f"response_format {where}: type lists are not supported (one type per schema)")
    if kind not in ALLOWED:
        raise GuidedError(f"response_format {where}: type {kind!r} is not supported")
    _only(schema, ALLOWED[kind], where)
    if kind == "object":
        return _object(schema, where)
    if kind == "string":
        return Node("string", max_length=_count(schema, "maxLength", where))
    if kind in ("integer", "number"):
        return _integer(schema, where)
    if kind == "boolean":
        return Node("boolean", enum=(True, False))
    if kind == "null":
        return Node("null", enum=(None,))
    items = schema.get("items", {})
    lo, hi = _count(schema, "minItems", where) or 0, _count(schema, "maxItems", where)
    if hi is not None and lo > hi:
        raise GuidedError(f"response_format {where}: minItems {lo} is above maxItems {hi}")
    return Node("array", items=compile_schema(items, f"{where}.items"), min_items=lo, max_items=hi)


def _only(schema: dict, allowed: set[str], where: str) -> None:
    for key in schema:
        if key not in allowed and key not in ANNOTATIONS:
            raise GuidedError(f"response_format {where}: keyword {key!r} is not supported")


def _count(schema: dict, key: str, where: str) -> int | None:
    v = schema.get(key)
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31):
        raise GuidedError(f"response_format {where}.{key} must be an integer >= 0")
    return v


def _enum(schema: dict, where: str) -> Node:
    _only(schema, {"enum", "const", "type"}, where)
    values = [schema["const"]] if "const" in schema else schema["enum"]
    if not isinstance(values, list) or not values:
        raise GuidedError(f"response_format {where}.enum must be a non-empty list")
    kind = schema.get("type")
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None)}
    if kind is not None and not all(isinstance(v, types.get(kind, ())) for v in values):
        raise GuidedError(f"response_format {where}.enum holds values that are not of type {kind!r}")
    return Node("enum", enum=tuple(values))


def _integer(schema: dict, where: str) -> Node:
    def bound(key: str) -> float | None:
        v = schema.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise GuidedError(f"response_format {where}.{key} must be a finite number")
        return v

    lows, highs = [], []
    if bound("minimum") is not None:
        lows.append(math.ceil(schema["minimum"]))
    if bound("exclusiveMinimum") is not None:
        lows.append(math.floor(schema["exclusiveMinimum"]) + 1)
    if bound("maximum") is not None:
        highs.append(math.floor(schema["maximum"]))
    if bound("exclusiveMaximum") is not None:
        highs.append(math.ceil(schema["exclusiveMaximum"]) - 1)
    lo, hi = max(lows, default=None), min(highs, default=None)
    if lo is not None and hi is not None:
        if lo > hi:
            raise GuidedError(f"response_format {where}: no integer lies within the bounds")
        if hi - lo < SMALL_RANGE:
            return Node("integer", enum=tuple(range(lo, hi + 1)))
    return Node("integer", lo=lo, hi=hi)


def _object(schema: dict, where: str) -> Node:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(props, dict):
        raise GuidedError(f"response_format {where}.properties must be an object")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise GuidedError(f"response_format {where}.required must be a list of names")
    missing = [r for r in required if r not in props]
    if missing:
        raise GuidedError(f"response_format {where}.required names {missing[0]!r}, which is not in its properties")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, (bool, dict)):
        raise GuidedError(f"response_format {where}.additionalProperties must be a boolean or a schema")
    # Extra properties are allowed by the schema but never emitted: the reply stays valid either way.
    return Node("object", properties=tuple(
        (name, compile_schema(sub, f"{where}.properties.{name}"), name in required) for name, sub in props.items()))
