from __future__ import annotations   # the dataclasses below are resolved with get_type_hints

import copy
import dataclasses
import errno
import io
import json
import logging
import os
import re
import sys
import threading
import typing
import urllib.parse
import wsgiref.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

import fabrica
from fabrica import (ConfigurationError, Schema, ValidationError, schema_engine,
                         schema_from_dataclass)

try:
    import jsonschema  # noqa: F401
    HAVE_JSONSCHEMA = True
except ImportError:
    HAVE_JSONSCHEMA = False

ENGINES = ["builtin", pytest.param("jsonschema", marks=pytest.mark.skipif(
    not HAVE_JSONSCHEMA, reason="jsonschema not installed"))]
DROP = object()     # in a table patch: remove this key from the valid value


# --- dataclasses under test (module level, so get_type_hints can resolve them) ---

@dataclass
class Chassis:
    bladeCount: int = field(metadata={"minimum": 1, "maximum": 42, "description": "blades"})
    model: str = "x1"


@dataclass
class Port:
    name: str
    speed: int = 10


@dataclass
class Rack:
    name: str = field(metadata={"pattern": "^[a-z]", "minLength": 2, "maxLength": 8})
    height: float
    enabled: bool
    count: int
    tags: list[str]
    ports: list[Port]
    labels: dict[str, int]
    note: Optional[str]
    owner: str | None
    phase: Literal["Pending", "Ready"]
    chassis: Chassis
    spare: Optional[Chassis] = None
    anything: Any = None
    location: str = "dc1"
    zones: list[str] = field(default_factory=lambda: ["a"])
    backup: Chassis = field(default_factory=lambda: Chassis(bladeCount=2))
    flavor: int | str = 0
    untyped: list = field(default_factory=list)
    free: dict = field(default_factory=dict)


VALID_RACK = {
    "name": "rack01", "height": 2.5, "enabled": True, "count": 3, "tags": ["x"],
    "ports": [{"name": "p0"}], "labels": {"env": 1}, "note": None, "owner": "ops",
    "phase": "Ready", "chassis": {"bladeCount": 4},
}

# (id, patch applied to VALID_RACK, failing fields)
DATACLASS_CASES = [
    ("str", {"owner": "x"}, []),
    ("str-bad", {"location": 5}, ["spec.location"]),
    ("int", {"count": 0}, []),
    ("int-as-1.0", {"count": 1.0}, []),
    ("int-bad-float", {"count": 1.5}, ["spec.count"]),
    ("int-bad-bool", {"count": True}, ["spec.count"]),
    ("float", {"height": 3}, []),
    ("float-bad", {"height": "tall"}, ["spec.height"]),
    ("float-bad-bool", {"height": False}, ["spec.height"]),
    ("bool", {"enabled": False}, []),
    ("bool-bad", {"enabled": 1}, ["spec.enabled"]),
    ("list", {"tags": []}, []),
    ("list-bad", {"tags": "x"}, ["spec.tags"]),
    ("list-bad-item", {"tags": ["a", "b", 3]}, ["spec.tags[2]"]),
    ("list-of-dataclass-bad", {"ports": [{"name": "p0"}, {"speed": 1}]}, ["spec.ports[1].name"]),
    ("bare-list", {"untyped": [1, "a", None]}, []),
    ("bare-list-bad", {"untyped": {}}, ["spec.untyped"]),
    ("dict", {"labels": {}}, []),
    ("dict-bad", {"labels": []}, ["spec.labels"]),
    ("dict-bad-value", {"labels": {"a": 1, "b": "2"}}, ["spec.labels.b"]),
    ("bare-dict", {"free": {"a": [1]}}, []),
    ("bare-dict-bad", {"free": 1}, ["spec.free"]),
    ("optional", {"note": "hi"}, []),
    ("optional-bad", {"note": 1}, ["spec.note"]),
    ("pipe-none", {"owner": None}, []),
    ("pipe-none-bad", {"owner": []}, ["spec.owner"]),
    ("literal", {"phase": "Pending"}, []),
    ("literal-bad", {"phase": "Gone"}, ["spec.phase"]),
    ("union", {"flavor": "big"}, []),
    ("union-bad", {"flavor": 1.5}, ["spec.flavor"]),
    ("any", {"anything": {"deep": [1]}}, []),
    ("nested", {"chassis": {"bladeCount": 1, "model": "m"}}, []),
    ("nested-bad", {"chassis": {"bladeCount": "4"}}, ["spec.chassis.bladeCount"]),
    ("nested-missing", {"chassis": DROP}, ["spec.chassis"]),
    ("nested-unknown", {"chassis": {"bladeCount": 4, "color": "red"}}, ["spec.chassis.color"]),
    ("optional-nested", {"spare": {"bladeCount": 42}}, []),
    ("optional-nested-bad", {"spare": {"bladeCount": 43}}, ["spec.spare.bladeCount"]),
    ("optional-nested-wrong-type", {"spare": 7}, ["spec.spare"]),
    ("metadata-minimum", {"chassis": {"bladeCount": 0}}, ["spec.chassis.bladeCount"]),
    ("metadata-maximum", {"backup": {"bladeCount": 43}}, ["spec.backup.bladeCount"]),
    ("metadata-pattern", {"name": "Rack"}, ["spec.name"]),
    ("metadata-minLength", {"name": "r"}, ["spec.name"]),
    ("metadata-maxLength", {"name": "rack-number-1"}, ["spec.name"]),
    ("required", {"name": DROP}, ["spec.name"]),
    ("defaults-may-be-omitted", {}, []),       # VALID_RACK sets no defaulted field
    ("unknown-field", {"colour": "red"}, ["spec.colour"]),
]


def patched(base, patch):
    value = copy.deepcopy(base)
    for key, item in patch.items():
        if item is DROP:
            value.pop(key)
        else:
            value[key] = item
    return value


def fields(errors):
    return [e["field"] for e in errors]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("patch, expected", [c[1:] for c in DATACLASS_CASES],
                         ids=[c[0] for c in DATACLASS_CASES])
def test_dataclass_table(engine, patch, expected):
    _, errors = Schema(Rack, engine=engine).validate(patched(VALID_RACK, patch))
    assert fields(errors) == expected
    assert all(isinstance(e["message"], str) and e["message"] for e in errors)


# --- schema keywords: each case wraps its schema as property "x" ---

def prop(schema, **outer):
    return {"type": "object", "properties": {"x": schema}, **outer}


KEYWORD_CASES = [
    # (id, schema, value, failing fields)
    ("type-string", prop({"type": "string"}), {"x": "a"}, []),
    ("type-string-bad", prop({"type": "string"}), {"x": 1}, ["spec.x"]),
    ("type-integer", prop({"type": "integer"}), {"x": 2.0}, []),
    ("type-integer-bad", prop({"type": "integer"}), {"x": 2.5}, ["spec.x"]),
    ("type-integer-bool", prop({"type": "integer"}), {"x": False}, ["spec.x"]),
    ("type-number", prop({"type": "number"}), {"x": 1}, []),
    ("type-number-bad", prop({"type": "number"}), {"x": True}, ["spec.x"]),
    ("type-boolean", prop({"type": "boolean"}), {"x": True}, []),
    ("type-boolean-bad", prop({"type": "boolean"}), {"x": 0}, ["spec.x"]),
    ("type-object", prop({"type": "object"}), {"x": {}}, []),
    ("type-object-bad", prop({"type": "object"}), {"x": []}, ["spec.x"]),
    ("type-array", prop({"type": "array"}), {"x": []}, []),
    ("type-array-bad", prop({"type": "array"}), {"x": {}}, ["spec.x"]),
    ("type-null", prop({"type": "null"}), {"x": None}, []),
    ("type-null-bad", prop({"type": "null"}), {"x": 0}, ["spec.x"]),
    ("type-list", prop({"type": ["string", "null"]}), {"x": None}, []),
    ("type-list-bad", prop({"type": ["string", "null"]}), {"x": 1}, ["spec.x"]),
    ("type-root-bad", {"type": "object"}, [], ["spec"]),
    ("properties", prop(prop({"type": "integer"})), {"x": {"x": 1}}, []),
    ("properties-bad", prop(prop({"type": "integer"})), {"x": {"x": "1"}}, ["spec.x.x"]),
    ("required", prop({}, required=["x"]), {"x": 1}, []),
    ("required-bad", prop({}, required=["x", "y"]), {}, ["spec.x", "spec.y"]),
    ("required-nested-bad", prop({"type": "object", "required": ["a"]}), {"x": {}}, ["spec.x.a"]),
    ("additionalProperties-false", prop({}, additionalProperties=False), {"x": 1}, []),
    ("additionalProperties-false-bad", prop({}, additionalProperties=False),
     {"x": 1, "y": 2, "z": 3}, ["spec.y", "spec.z"]),
    ("additionalProperties-schema", {"additionalProperties": {"type": "integer"}}, {"a": 1}, []),
    ("additionalProperties-schema-bad", {"additionalProperties": {"type": "integer"}},
     {"a": 1, "b": "2"}, ["spec.b"]),
    ("additionalProperties-true", {"type": "object", "additionalProperties": True}, {"a": 1}, []),
    ("enum", prop({"enum": ["a", 1, None]}), {"x": 1.0}, []),
    ("enum-bad", prop({"enum": ["a", 1, None]}), {"x": "b"}, ["spec.x"]),
    ("enum-bool-is-not-1", prop({"enum": [1]}), {"x": True}, ["spec.x"]),
    ("const", prop({"const": {"a": [1]}}), {"x": {"a": [1]}}, []),
    ("const-bad", prop({"const": {"a": [1]}}), {"x": {"a": [2]}}, ["spec.x"]),
    ("const-bool-bad", prop({"const": False}), {"x": 0}, ["spec.x"]),
    ("minimum", prop({"minimum": 1}), {"x": 1}, []),
    ("minimum-bad", prop({"minimum": 1}), {"x": 0.5}, ["spec.x"]),
    ("minimum-ignores-strings", prop({"minimum": 1}), {"x": "0"}, []),
    ("maximum", prop({"maximum": 5}), {"x": 5}, []),
    ("maximum-bad", prop({"maximum": 5}), {"x": 6}, ["spec.x"]),
    ("exclusiveMinimum", prop({"exclusiveMinimum": 0}), {"x": 0.1}, []),
    ("exclusiveMinimum-bad", prop({"exclusiveMinimum": 0}), {"x": 0}, ["spec.x"]),
    ("exclusiveMaximum", prop({"exclusiveMaximum": 10}), {"x": 9}, []),
    ("exclusiveMaximum-bad", prop({"exclusiveMaximum": 10}), {"x": 10}, ["spec.x"]),
    ("minLength", prop({"minLength": 2}), {"x": "ab"}, []),
    ("minLength-bad", prop({"minLength": 2}), {"x": "a"}, ["spec.x"]),
    ("maxLength", prop({"maxLength": 2}), {"x": "\u00e9\u00e9"}, []),
    ("maxLength-bad", prop({"maxLength": 2}), {"x": "abc"}, ["spec.x"]),
    ("pattern-search", prop({"pattern": "b+"}), {"x": "abbc"}, []),
    ("pattern-bad", prop({"pattern": "^b"}), {"x": "abc"}, ["spec.x"]),
    ("items", prop({"items": {"type": "string"}}), {"x": ["a", "b"]}, []),
    ("items-bad", prop({"items": {"type": "string"}}), {"x": ["a", 2, "c", None]},
     ["spec.x[1]", "spec.x[3]"]),
    ("items-nested-bad", prop({"items": prop({"type": "integer"})}),
     {"x": [{"x": 1}, {"x": "a"}]}, ["spec.x[1].x"]),
    ("minItems", prop({"minItems": 1}), {"x": [0]}, []),
    ("minItems-bad", prop({"minItems": 1}), {"x": []}, ["spec.x"]),
    ("maxItems", prop({"maxItems": 1}), {"x": [0]}, []),
    ("maxItems-bad", prop({"maxItems": 1}), {"x": [0, 1]}, ["spec.x"]),
    ("anyOf", prop({"anyOf": [{"type": "string"}, {"minimum": 3}]}), {"x": 4}, []),
    ("anyOf-bad", prop({"anyOf": [{"type": "string"}, {"type": "integer"}]}), {"x": 1.5},
     ["spec.x"]),
    ("anyOf-one-candidate-bad",
     prop({"anyOf": [prop({"type": "integer"}), {"type": "null"}]}), {"x": {"x": "a"}},
     ["spec.x.x"]),
    ("anyOf-two-candidates-bad", prop({"anyOf": [{"minimum": 5}, {"maximum": 0}]}), {"x": 3},
     ["spec.x"]),
    ("false-schema", prop(False), {}, []),
    ("false-schema-bad", prop(False), {"x": 1}, ["spec.x"]),
    ("items-false-bad", prop({"items": False}), {"x": [1]}, ["spec.x"]),
    ("annotations-ignored", prop({"title": "X", "description": "d", "format": "email",
                                  "examples": ["no"], "x-kubernetes": 1, "default": "b"}),
     {"x": "not-an-email"}, []),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("schema, value, expected", [c[1:] for c in KEYWORD_CASES],
                         ids=[c[0] for c in KEYWORD_CASES])
def test_keyword_table(engine, schema, value, expected):
    _, errors = Schema(schema, engine=engine).validate(value)
    assert fields(errors) == expected


AGREEMENT_CASES = [(c[0], c[1], c[2]) for c in KEYWORD_CASES] + [
    (c[0], Rack, patched(VALID_RACK, c[1])) for c in DATACLASS_CASES]


@pytest.mark.skipif(not HAVE_JSONSCHEMA, reason="jsonschema not installed")
@pytest.mark.parametrize("schema, value", [c[1:] for c in AGREEMENT_CASES],
                         ids=[c[0] for c in AGREEMENT_CASES])
def test_engines_agree_word_for_word(schema, value, monkeypatch):
    builtin = Schema(schema, engine="builtin").validate(value)
    calls = []
    real = jsonschema.Draft202012Validator.iter_errors
    monkeypatch.setattr(jsonschema.Draft202012Validator, "iter_errors",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert Schema(schema, engine="jsonschema").validate(value) == builtin
    assert calls, "the jsonschema engine did not ask jsonschema"


def test_messages():
    schema = Schema({"properties": {"x": {"type": "integer", "minimum": 1}, "y": {}},
                     "required": ["x", "y"], "additionalProperties": False}, engine="builtin")
    assert schema.validate({"x": 0, "z": 1})[1] == [
        {"field": "spec.x", "message": "must be >= 1"},
        {"field": "spec.y", "message": "is required"},
        {"field": "spec.z", "message": "unknown field; known fields: x, y"},
    ]
    _, errors = Schema(Rack, engine="builtin").validate(patched(VALID_RACK, {"note": 1}))
    assert errors == [{"field": "spec.note",
                       "message": "must be of type string or null, not integer"}]


@pytest.mark.parametrize("engine", ENGINES)
def test_every_error_is_listed_and_check_raises(engine):
    bad = patched(VALID_RACK, {"name": DROP, "count": "3", "tags": [1],
                               "chassis": {"bladeCount": 0}, "extra": 1})
    schema = Schema(Rack, engine=engine)
    _, errors = schema.validate(bad, path="status")
    assert sorted(fields(errors)) == sorted(["status.name", "status.count", "status.tags[0]",
                                             "status.chassis.bladeCount", "status.extra"])
    with pytest.raises(ValidationError) as info:
        schema.check(bad, path="status")
    assert info.value.status == 422
    assert info.value.details == errors
    assert info.value.message.startswith("status is invalid: ")
    assert info.value.message.endswith("; ... (5 errors)")
    assert f"{errors[0]['field']}: {errors[0]['message']}" in info.value.message


def test_check_single_error_message_and_success():
    schema = Schema(prop({"type": "integer"}), engine="builtin")
    with pytest.raises(ValidationError, match=r"^spec is invalid: spec.x: must be of type integer, "
                                              r"not string$"):
        schema.check({"x": "1"})
    assert schema.check({"x": 1}) == {"x": 1}


# --- defaults ---

@pytest.mark.parametrize("engine", ENGINES)
def test_dataclass_defaults_filled_and_input_untouched(engine):
    value = patched(VALID_RACK, {"spare": {"bladeCount": 3}})
    before = copy.deepcopy(value)
    result, errors = Schema(Rack, engine=engine).validate(value)
    assert errors == []
    assert value == before
    assert result["location"] == "dc1" and result["zones"] == ["a"]
    assert result["backup"] == {"bladeCount": 2, "model": "x1"}
    assert result["chassis"] == {"bladeCount": 4, "model": "x1"}        # nested, present
    assert result["spare"] == {"bladeCount": 3, "model": "x1"}          # through X | None
    assert result["ports"] == [{"name": "p0", "speed": 10}]             # list items
    assert result["spare"] is not None and result["untyped"] == [] and result["free"] == {}
    result["tags"].append("mutated")
    result["zones"].append("mutated")
    assert value == before and Schema(Rack).validate(value)[0]["zones"] == ["a"]


def test_schema_defaults_deep_copied_and_only_into_present_or_defaulted_objects():
    schema = Schema({
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"n": {"type": "integer", "default": 1}}},
            "b": {"type": "object", "default": {}, "properties": {"m": {"default": [1]}}},
            "c": {"type": "array", "items": {"properties": {"k": {"default": "z"}}}},
            "d": {"additionalProperties": {"properties": {"k": {"default": 0}}}},
        },
    })
    first, errors = schema.validate({"c": [{}, {"k": "y"}, 5], "d": {"p": {}}})
    assert errors == []
    assert first == {"c": [{"k": "z"}, {"k": "y"}, 5], "d": {"p": {"k": 0}}, "b": {"m": [1]}}
    assert "a" not in first                 # missing, no default of its own
    first["b"]["m"].append(2)
    assert schema.validate({})[0]["b"] == {"m": [1]}
    assert schema.json["properties"]["b"]["properties"]["m"]["default"] == [1]
    assert schema.validate({"a": {}})[0]["a"] == {"n": 1}


def test_anyof_defaults_come_from_the_branch_that_fits():
    schema = Schema(prop({"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "n": {"default": 1}},
         "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "m": {"default": 2}},
         "required": ["kind"]},
    ]}))
    assert schema.validate({"x": {"kind": "b"}}) == ({"x": {"kind": "b", "m": 2}}, [])
    assert schema.validate({"x": {"kind": "a"}}) == ({"x": {"kind": "a", "n": 1}}, [])


def test_dataclass_instance_is_accepted():
    result = Schema(Chassis).check(Chassis(bladeCount=3))
    assert result == {"bladeCount": 3, "model": "x1"}


# --- schema_from_dataclass output ---

@dataclass
class Small:
    n: int = field(default=1, metadata={"minimum": 0, "unit": "ignored: not a schema keyword"})
    maybe: Optional[Port] = None
    mode: Literal["a", "b"] | None = None
    both: int | str = 0
    names: typing.List[str] = field(default_factory=list)
    table: typing.Dict[str, float] = field(default_factory=dict)
    other: Any = None


def test_schema_from_dataclass_shape():
    port = {"type": "object",
            "properties": {"name": {"type": "string"}, "speed": {"type": "integer", "default": 10}},
            "required": ["name"], "additionalProperties": False}
    assert schema_from_dataclass(Small) == {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "default": 1},
            "maybe": {**port, "type": ["object", "null"], "default": None},
            "mode": {"enum": ["a", "b", None], "default": None},
            "both": {"anyOf": [{"type": "integer"}, {"type": "string"}], "default": 0},
            "names": {"type": "array", "items": {"type": "string"}, "default": []},
            "table": {"type": "object", "additionalProperties": {"type": "number"}, "default": {}},
            "other": {"default": None},
        },
        "additionalProperties": False,
    }
    assert schema_from_dataclass(Port)["required"] == ["name"]


def test_default_factory_called_once_per_call():
    calls = []

    @dataclass
    class Counted:
        tags: list = field(default_factory=lambda: calls.append(1) or ["t"])

    assert schema_from_dataclass(Counted)["properties"]["tags"]["default"] == ["t"]
    Schema(Counted).validate({})
    Schema(Counted).validate({})
    assert len(calls) == 3          # once per schema built, never per validation


# --- configuration errors ---

@dataclass
class HasSet:
    ids: set[int]


@dataclass
class HasTuple:
    pair: tuple[int, int]


class Plain:
    pass


@dataclass
class HasClass:
    thing: Plain


@dataclass
class HasIntKeys:
    table: dict[int, str]


@dataclass
class HasNestedBad:
    inner: list[HasSet]


@dataclass
class Node:
    children: list[Node]


@dataclass
class Unresolvable:
    x: NoSuchType  # noqa: F821


@dataclass
class BadDefault:
    when: str = field(default_factory=object)


@dataclass
class WrongDefault:
    n: int = "one"


@dataclass
class BadMetadata:
    n: int = field(metadata={"minimum": "1"})


@pytest.mark.parametrize("cls, words", [
    (HasSet, ["HasSet.ids", "set[int]"]),
    (HasTuple, ["HasTuple.pair", "tuple[int, int]"]),
    (HasClass, ["HasClass.thing", "Plain"]),
    (HasIntKeys, ["HasIntKeys.table", "dict[int, str]"]),
    (HasNestedBad, ["HasSet.ids"]),
    (Node, ["Node -> Node", "recursion is not supported"]),
    (Unresolvable, ["Unresolvable", "NoSuchType"]),
    (BadDefault, ["BadDefault.when", "not JSON data"]),
    (WrongDefault, ["WrongDefault.n", "default 'one' does not validate"]),
    (BadMetadata, ["BadMetadata.n", "must be a number"]),
    (Plain, ["not a dataclass"]),
])
def test_dataclass_configuration_errors(cls, words):
    with pytest.raises(ConfigurationError) as info:
        schema_from_dataclass(cls)
    for word in words:
        assert word in info.value.message
    with pytest.raises(ConfigurationError):
        Schema(cls)


@pytest.mark.parametrize("schema, words", [
    ({"type": "str"}, ["#/type"]),
    ({"type": []}, ["#/type"]),
    ({"type": ["string", "string"]}, ["#/type"]),
    ({"required": "name"}, ["#/required", "list of field names"]),
    ({"properties": ["a"]}, ["#/properties"]),
    ({"properties": {"a": {"type": "strnig"}}}, ["#/properties/a/type"]),
    ({"properties": {"a": 1}}, ["#/properties/a", "dict or a boolean"]),
    ({"additionalProperties": "no"}, ["#/additionalProperties"]),
    ({"items": [{"type": "string"}]}, ["#/items"]),
    ({"items": {"minItems": -1}}, ["#/items/minItems", "non-negative integer"]),
    ({"enum": []}, ["#/enum"]),
    ({"anyOf": [{"type": "x"}]}, ["#/anyOf/0/type"]),
    ({"minimum": "1"}, ["#/minimum", "a number"]),
    ({"maxLength": 1.5}, ["#/maxLength"]),
    ({"pattern": "("}, ["#/pattern", "regular expression"]),
    ({"description": 3}, ["#/description"]),
    ({"oneOf": [{}]}, ["unsupported keyword 'oneOf'"]),
    ({"properties": {"a": {"type": "integer", "default": "1"}}}, ["#/properties/a", "default"]),
    ({"required": ["a"], "properties": {}, "additionalProperties": False}, ["['a']"]),
])
def test_malformed_schema_dicts(schema, words):
    with pytest.raises(ConfigurationError) as info:
        Schema(schema, engine="builtin")
    for word in words:
        assert word in info.value.message


def test_not_a_schema_and_unknown_engine():
    with pytest.raises(ConfigurationError, match="dataclass type, a JSON-Schema dict or None"):
        Schema("string")
    with pytest.raises(ConfigurationError, match="unknown schema engine"):
        Schema({}, engine="fast")


# --- Schema object and engines ---

def test_none_means_any_object_and_json_is_a_copy():
    assert Schema(None).json == {"type": "object"}
    assert Schema(None).validate({"a": [1]}) == ({"a": [1]}, [])
    assert fields(Schema(None).validate([1])[1]) == ["spec"]
    original = prop({"type": "integer"})
    schema = Schema(original)
    original["properties"]["x"]["type"] = "string"
    assert schema.validate({"x": 1})[1] == []
    assert Schema(schema).json == schema.json


def test_engine_selection(monkeypatch):
    assert schema_engine() == ("jsonschema" if HAVE_JSONSCHEMA else "builtin")
    assert Schema({}).engine == schema_engine()
    assert Schema({}, engine="builtin").engine == "builtin"
    monkeypatch.setitem(sys.modules, "jsonschema", None)     # makes `import jsonschema` fail
    assert schema_engine() == "builtin"
    assert Schema({}).engine == "builtin"
    with pytest.raises(ConfigurationError, match="pip install jsonschema"):
        Schema({}, engine="jsonschema")


def test_dataclass_fields_resolve_under_future_annotations():
    # This module uses `from __future__ import annotations`: every hint is a string.
    assert isinstance(Rack.__annotations__["tags"], str)
    assert dataclasses.is_dataclass(Rack)
    assert schema_from_dataclass(Rack)["properties"]["tags"] == {"type": "array",
                                                                 "items": {"type": "string"}}


# -- REST: empty list options (SPEC §6.5) and status in flat bodies and spec patches (§6.2, §6.4) --

MERGE, JSONP, SHORT = ("application/merge-patch+json", "application/json-patch+json",
                       "application/shorthand-patch+json")


def rest(app, method, path, body=None, ctype="application/json"):
    """One in-process request through app.wsgi -> (status, headers, decoded JSON or None)."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    path_info, _, query = path.partition("?")
    raw = b"" if body is None else json.dumps(body).encode()
    environ.update(REQUEST_METHOD=method, PATH_INFO=path_info, QUERY_STRING=query, CONTENT_TYPE=ctype,
                   CONTENT_LENGTH=str(len(raw)), **{"wsgi.input": io.BytesIO(raw)})
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = int(status.split()[0]), {k.lower(): v for k, v in headers}
    data = b"".join(app.wsgi(environ, start_response))
    return seen["status"], seen["headers"], (json.loads(data) if data else None)


@pytest.fixture(params=["registered", "open server"])
def widgets(request, tmp_path):
    """A started app serving /widgets, as a registered kind or made at first create by the open server."""
    app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False, open=request.param == "open server")
    if request.param == "registered":
        app.register("Widget")
    with app:
        yield app


def names(items):
    return [o["metadata"]["name"] for o in items]


class TestEmptyListOptions:
    """An empty list option is an absent one, as in Kubernetes (whose clients page from continue="")."""

    @pytest.fixture
    def app(self, widgets):
        for name in ("w3", "w1", "w4", "w2", "w5"):
            assert rest(widgets, "POST", "/widgets", {"name": name, "labels": {"n": name}})[0] == 201
        return widgets

    def test_a_kubernetes_paging_loop_starts_with_an_empty_continue(self, app):
        pages, token = [], ""
        for _ in range(10):
            status, headers, items = rest(app, "GET", "/widgets?" + urllib.parse.urlencode(
                {"limit": 2, "continue": token}))
            assert status == 200, items
            pages.append(names(items))
            token = headers.get("x-continue", "")
            if not token:
                break
        assert pages == [["w1", "w2"], ["w3", "w4"], ["w5"]]

    @pytest.mark.parametrize("query", ["continue=", "limit=", "labelSelector=", "name=",
                                       "limit=&continue=&labelSelector=&name="])
    def test_empty_option_means_no_option(self, app, query):
        status, headers, items = rest(app, "GET", "/widgets?" + query)
        assert status == 200, items
        assert names(items) == ["w1", "w2", "w3", "w4", "w5"] and headers["x-total-count"] == "5"
        assert "x-continue" not in headers

    def test_empty_options_next_to_real_ones(self, app):
        status, _, items = rest(app, "GET", "/widgets?name=&labelSelector=n%3Dw4&continue=")
        assert status == 200 and names(items) == ["w4"]
        status, headers, items = rest(app, "GET", "/widgets?limit=&continue=&name=w2")
        assert status == 200 and names(items) == ["w2"] and headers["x-total-count"] == "1"


class TestStatusIsNotASpecField:
    """A top-level status in a flat body or a spec patch is a 422 (status goes through /status);
    the envelope form keeps ignoring it, and a spec field named status is written with the envelope."""

    @staticmethod
    def refused(status, body):
        assert status == 422, body
        assert [d["field"] for d in body["details"]] == ["status"] and "/status" in body["details"][0]["message"]

    def test_flat_create_and_put(self, widgets):
        self.refused(*rest(widgets, "POST", "/widgets", {"name": "w1", "status": {"phase": "x"}})[::2])
        assert rest(widgets, "GET", "/widgets/w1")[0] == 404
        status, _, obj = rest(widgets, "POST", "/widgets", {"name": "w1", "size": 1})
        assert status == 201 and obj["spec"] == {"size": 1}
        self.refused(*rest(widgets, "PUT", "/widgets/w1", {"size": 2, "status": {"phase": "x"}})[::2])
        self.refused(*rest(widgets, "PUT", "/widgets/w1", {"status": None})[::2])
        assert rest(widgets, "GET", "/widgets/w1")[2] == obj

    @pytest.mark.parametrize("ctype, patch", [
        (MERGE, {"status": {"phase": "x"}}),
        (MERGE, {"size": 2, "status": None}),
        ("application/json", {"status": {}}),
        (JSONP, [{"op": "add", "path": "/status", "value": {"phase": "x"}}]),
        (JSONP, [{"op": "move", "from": "/size", "path": "/status"}]),
        (JSONP, [{"op": "copy", "from": "/size", "path": "/status"}]),
        (JSONP, [{"op": "replace", "path": "", "value": {"size": 1, "status": {}}}]),
        (SHORT, {"status.phase": "x"}),
        (SHORT, {"status": None}),
    ])
    def test_spec_patch_that_touches_status(self, widgets, ctype, patch):
        status, _, obj = rest(widgets, "POST", "/widgets", {"name": "w1", "size": 1})
        assert status == 201
        self.refused(*rest(widgets, "PATCH", "/widgets/w1", patch, ctype)[::2])
        assert rest(widgets, "GET", "/widgets/w1")[2] == obj            # nothing stored
        with pytest.raises(fabrica.ValidationError):
            widgets.client.patch("Widget", "w1", patch, {MERGE: "merge", "application/json": "merge",
                                                         JSONP: "json", SHORT: "shorthand"}[ctype])

    def test_envelope_ignores_status_and_writes_a_spec_field_named_status(self, widgets):
        status, _, obj = rest(widgets, "POST", "/widgets", {"metadata": {"name": "w1"}, "spec": {
            "status": "spare", "size": 1}, "status": {"phase": "x"}})
        assert status == 201 and obj["spec"] == {"status": "spare", "size": 1} and obj["status"] == {}
        # a patch that leaves that spec field alone is fine; one that touches it is refused
        status, _, obj = rest(widgets, "PATCH", "/widgets/w1", {"size": 2}, MERGE)
        assert status == 200 and obj["spec"] == {"status": "spare", "size": 2}
        self.refused(*rest(widgets, "PATCH", "/widgets/w1", {"status": "used"}, MERGE)[::2])
        status, _, obj = rest(widgets, "PUT", "/widgets/w1", {"spec": {"status": "used", "size": 2}})
        assert status == 200 and obj["spec"] == {"status": "used", "size": 2} and obj["status"] == {}
        # the status route still takes a status (and a member named status inside it)
        status, _, obj = rest(widgets, "PATCH", "/widgets/w1/status", {"status": "ok"}, MERGE)
        assert status == 200 and obj["status"] == {"status": "ok"}


# -- issue 11 reviews: condition types and every line-oriented output (F2), the write that removes the last
# -- finalizer (NU-1), the flat form's reserved keys in spec patches (SPEC §6.2, §6.4), the README's claims

def open_events(app, last_event_id=None):
    """GET /events in-process -> (status, the response's chunk iterator); close the iterator when done."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO="/events", QUERY_STRING="")
    if last_event_id is not None:
        environ["HTTP_LAST_EVENT_ID"] = last_event_id
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = int(status.split()[0])
    body = app.wsgi(environ, start_response)
    return seen["status"], body


def sse_events(raw: str) -> list[dict]:
    """The events a WHATWG EventSource dispatches for ``raw``: lines end at CRLF, CR or LF, a blank line
    dispatches, ``id``/``event``/``data`` fields (a leading space dropped), ``:`` comments ignored."""
    events, fields, data = [], {}, []
    for line in re.split(r"\r\n|\r|\n", raw):
        if not line:
            if data:
                events.append({**fields, "data": "\n".join(data)})
            fields, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("id", "event"):
            fields[name] = value
    return events


def backlog(app, last_event_id="0") -> list[dict]:
    """What a client resuming from ``last_event_id`` receives: every buffered event after it, as parsed."""
    expected = len(app.bus.since(fabrica.parse_position(last_event_id)))
    status, body = open_events(app, last_event_id)
    assert status == 200
    chunks = iter(body)
    try:
        # the opening comment, then one chunk per buffered event: read no further (live events block)
        raw = b"".join(next(chunks) for _ in range(1 + expected))
    finally:
        body.close()
    return sse_events(raw.decode())


FORGED_TYPE = 'Ready\nid: 99999999\nevent: io.fabrica.widget.deleted\ndata: {"forged":true}\n\nevent: x'


class TestConditionTypesAreNames:
    """F2 (a): a condition's type is a Kubernetes condition type (a qualified name, at most 316 characters)
    and its status True, False or Unknown, on every status write and in set_condition."""

    VALID = ["Ready", "example.com/Ready", "a", "A_b.c-9", "x" * 316, "a.b-c/D_e.f"]
    INVALID = [FORGED_TYPE, "Ready\n", "Disk Pressure", "-Ready", "Ready-", "example.com/", "/Ready",
               "Example.com/Ready", "a/b/c", "x" * 317, "Réady", "Ready\r", "Re\x00ady", "Ready\u2028"]

    def test_a_forged_condition_type_is_refused_and_no_client_sees_a_forged_event(self, widgets):
        assert rest(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        status, _, err = rest(widgets, "PUT", "/widgets/w1/status",
                              {"conditions": [{"type": FORGED_TYPE, "status": "True"}]})
        assert status == 422 and err["details"][0]["field"] == "status.conditions[0].type", err
        status, _, obj = rest(widgets, "PUT", "/widgets/w1/status",
                              {"conditions": [{"type": "Ready", "status": "True"}]})
        assert status == 200, obj
        events = backlog(widgets)
        assert [(e["id"], e["event"]) for e in events] == [
            ("1", "io.fabrica.widget.created"), ("2", "io.fabrica.widget.updated"),
            ("2.1", "io.fabrica.condition.ready")]
        assert all(json.loads(e["data"])["sequence"] == e["id"] for e in events)

    @pytest.mark.parametrize("ctype", INVALID, ids=range(len(INVALID)))
    def test_every_status_write_checks_the_type(self, widgets, ctype):
        assert rest(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        conditions = [{"type": ctype, "status": "True"}]
        for status, _, body in (
                rest(widgets, "PUT", "/widgets/w1/status", {"conditions": conditions}),
                rest(widgets, "PATCH", "/widgets/w1/status", {"conditions": conditions}, MERGE),
                rest(widgets, "PATCH", "/widgets/w1/status", [{"op": "add", "path": "/conditions",
                                                               "value": conditions}], JSONP)):
            assert status == 422, body
            assert body["details"][0]["field"] == "status.conditions[0].type"
            assert "qualified name" in body["details"][0]["message"]
        with pytest.raises(ValidationError):
            widgets.client.update_status("Widget", "w1", {"conditions": conditions})
        with pytest.raises(ValidationError):
            widgets.client.patch_status("Widget", "w1", {"conditions": conditions})
        assert rest(widgets, "GET", "/widgets/w1")[2]["status"] == {}
        for valid in self.VALID:        # what the rule admits
            conditions = [{"type": valid, "status": "True"}]
            status, _, obj = rest(widgets, "PUT", "/widgets/w1/status", {"conditions": conditions})
            assert status == 200 and obj["status"] == {"conditions": conditions}, obj
            conditions[0]["status"] = "False"
            assert widgets.client.patch_status("Widget", "w1", {"conditions": conditions}).status == {
                "conditions": conditions}

    @pytest.mark.parametrize("cond", [{"type": "Ready", "status": "true"}, {"type": "Ready", "status": "Yes"},
                                      {"type": "Ready", "status": ""}, {"type": "Ready"}])
    def test_the_status_is_true_false_or_unknown(self, widgets, cond):
        assert rest(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        status, _, err = rest(widgets, "PUT", "/widgets/w1/status", {"conditions": [cond]})
        assert status == 422 and err["details"][0]["field"] == "status.conditions[0].status", err
        for value in ("True", "False", "Unknown"):
            status, _, obj = rest(widgets, "PUT", "/widgets/w1/status",
                                  {"conditions": [{"type": "Ready", "status": value}]})
            assert status == 200, obj

    @pytest.mark.parametrize("ctype", INVALID + [None, 7], ids=range(len(INVALID) + 2))
    def test_set_condition_raises_value_error(self, ctype):
        obj = fabrica.Resource(fabrica.new_object("Widget", "w1", "widget-00000001"))
        with pytest.raises(ValueError, match="qualified name"):
            obj.set_condition(ctype, True)
        assert obj.status == {}
        for valid in self.VALID:
            assert obj.set_condition(valid, True, reason="R")

    def test_a_reconcile_that_writes_a_bad_type_is_recorded_as_a_failure(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            obj.status.setdefault("conditions", []).append({"type": "Disk Pressure", "status": "True"})
        with app:
            app.client.create("Widget", "w1")
            assert poll(lambda: app.client.get("Widget", "w1").condition("Ready") is not None)
            obj = app.client.get("Widget", "w1")
        assert obj.condition("Disk Pressure") is None
        assert obj.condition("Ready")["status"] == "False" and obj.condition("Ready")["reason"] == "ReconcileError"
        assert "qualified name" in obj.condition("Ready")["message"]

    def test_conditions_an_older_fabrica_stored_still_load_and_can_be_kept(self, tmp_path):
        """Files written before the rule (any non-empty type, any string status) are not quarantined;
        their conditions may be written back unchanged, and only a new condition or a status change
        must follow the rule (ratcheting, as Kubernetes does)."""
        data = tmp_path / "data"
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        app.register("Widget")
        with app:
            uid = app.client.create("Widget", "w1").uid
        legacy = [{"type": "Disk Pressure", "status": "true", "reason": "", "message": ""},
                  {"type": "Ready\nid: 7", "status": "True"}, {"type": "Synced"}]
        path = data / "widgets" / f"{uid}.json"
        doc = json.loads(path.read_text())
        doc["status"]["conditions"] = legacy
        path.write_text(json.dumps(doc))
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        app.register("Widget")
        with app:
            assert app.health()["quarantined"] == [] and app.client.get("Widget", "w1").status["conditions"] == legacy
            # kept as they are, beside a new valid condition and another status field
            kept = [*legacy, {"type": "Ready", "status": "True"}]
            status, _, obj = rest(app, "PUT", "/widgets/w1/status", {"conditions": kept, "phase": "x"})
            assert status == 200 and obj["status"]["conditions"] == kept, obj
            changed = [dict(legacy[0], reason="Changed"), *legacy[1:]]
            assert rest(app, "PUT", "/widgets/w1/status", {"conditions": changed})[0] == 200
            # a status change publishes a condition event: then the type must be a name, the status valid
            for i, cond in ((0, dict(legacy[0], status="False")), (1, dict(legacy[1], status="False")),
                            (2, dict(legacy[2], status="yes"))):
                conditions = list(changed)
                conditions[i] = cond
                status, _, err = rest(app, "PUT", "/widgets/w1/status", {"conditions": conditions})
                assert status == 422 and err["details"][0]["field"].startswith(f"status.conditions[{i}]"), err
            obj = app.client.get("Widget", "w1")
            assert obj.set_condition("Ready", False, reason="Down")
            app.client.update_status("Widget", "w1", obj.status)


def poll(predicate, timeout: float = 10.0) -> bool:
    """Whether ``predicate()`` turns true within ``timeout`` seconds (checked every 10 ms)."""
    deadline, pause = fabrica.time.monotonic() + timeout, threading.Event()
    while not predicate() and fabrica.time.monotonic() < deadline:
        pause.wait(0.01)
    return predicate()


class TestLineOrientedOutputs:
    """F2 (b): whatever reaches them, SSE fields, log lines and metric labels stay on their line."""

    @pytest.mark.parametrize("bad", ["\n", "\r", "\r\n", "\n\n", "\n\r"])
    def test_an_sse_frame_is_one_event_whatever_its_type(self, bad):
        event = {"type": f"io.x{bad}id: 99999999{bad}event: forged{bad}{bad}data: {{}}",
                 "data": {"text": f"a{bad}b\r\nc\u2028d"}}
        frame = fabrica._sse_frame((42, 3), event).decode()
        assert frame.count("\n") == 4 and "\r" not in frame and frame.endswith("\n\n")
        [parsed] = sse_events(frame)
        assert parsed["id"] == "42.3" and json.loads(parsed["data"]) == event
        assert parsed["event"].startswith("io.x") and "99999999" in parsed["event"]

    def test_the_stream_escapes_a_configured_type_with_line_breaks(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False,
                              event_prefix="io.x\r\nid: 99999999\nevent: io.x.widget.deleted\n\nid: 5")
        app.register("Widget")
        with app:
            app.client.create("Widget", "w1")
            events = backlog(app)
        assert [e["id"] for e in events] == ["1"]
        assert events[0]["event"] == "io.x\\r\\nid: 99999999\\nevent: io.x.widget.deleted\\n\\nid: 5.widget.created"

    def test_a_last_event_id_newer_than_every_event_is_gone(self, widgets):
        assert rest(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        for since in ("99999999", "2", "2.1"):
            status, body = open_events(widgets, since)
            if hasattr(body, "close"):
                body.close()        # a stream (an error answer is a list)
            assert status == 410, since
        assert [e["id"] for e in backlog(widgets, "1")] == []
        assert [e["id"] for e in backlog(widgets, "0")] == ["1"]

    def test_a_request_path_cannot_forge_a_log_line(self, tmp_path, caplog, monkeypatch):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget", history=True)

        @app.wsgi.route("/boom/<x>")        # an app's own route that fails: Bottle's 500 handler logs it
        def boom(x):
            raise RuntimeError("boom")

        def broken(*args):
            raise RuntimeError("the store failed")
        caplog.set_level(logging.DEBUG, logger="fabrica")
        with app:
            app.client.create("Widget", "w1")
            monkeypatch.setattr(app.store, "get_version", broken)     # fabrica's own route fails
            assert rest(app, "GET", "/boom/a\nFORGED line\r\x1b[2J")[0] == 500
            assert rest(app, "GET", "/widgets/w1/versions/1\nFORGED line\r\x1b[2J")[0] == 500
        messages = [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()]
        assert len(messages) == 2
        assert "GET /boom/a\\nFORGED line\\r\\x1b[2J" in messages[0]
        assert "GET /widgets/w1/versions/1\\nFORGED line\\r\\x1b[2J" in messages[1]
        for message in messages:
            assert not any(line.startswith("FORGED") for line in message.splitlines()) and "\x1b" not in message

    def test_the_built_in_server_logs_the_request_line_on_one_line(self, caplog):
        handler = object.__new__(fabrica._WSGIRequestHandler)
        handler.client_address = ("127.0.0.1", 5000)
        caplog.set_level(logging.DEBUG, logger="fabrica.http")
        handler.log_message('"%s" %s %s', "GET /a\rFORGED\x1b[2J\x85 HTTP/1.1", "404", "-")
        [record] = caplog.records
        assert record.getMessage() == '127.0.0.1 - "GET /a\\rFORGED\\x1b[2J\\x85 HTTP/1.1" 404 -'


class TestTheLastFinalizerRemoved:
    """NU-1: the write that removes the last finalizer of an object being deleted deletes it; its answer and
    its deleted event show the object as that write left it (finalizers gone), at the delete's
    resourceVersion (Kubernetes; SPEC §4, §5.6), whoever removes it."""

    @staticmethod
    def deleted_event(app, obj) -> dict:
        """The deleted event of ``obj`` in the event ring."""
        [event] = [ev for _, ev in app.bus.since((app.bus.start_rv, 0))
                   if ev["type"].endswith(".deleted") and ev["resourceuid"] == obj["metadata"]["uid"]]
        return event

    @staticmethod
    def assert_final_state(event, before, finalizers=()):
        """The deleted event's object is ``before`` with ``finalizers`` left, at the event's resourceVersion."""
        resource = event["data"]["resource"]
        assert resource["metadata"]["finalizers"] == list(finalizers)
        assert resource["metadata"]["resourceVersion"] == event["resourceversion"]
        assert int(event["resourceversion"]) > int(before["metadata"]["resourceVersion"])
        assert resource["metadata"]["deletionTimestamp"] is not None
        same = {k: v for k, v in resource["metadata"].items() if k not in ("finalizers", "resourceVersion",
                                                                          "updatedAt", "deletionTimestamp")}
        assert same == {k: before["metadata"][k] for k in same} and resource["spec"] == before["spec"]

    @pytest.fixture
    def app(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Box")
        with app:
            yield app

    def test_a_put_that_removes_the_last_finalizer(self, app):
        status, _, obj = rest(app, "POST", "/boxes", {"metadata": {"name": "b3", "finalizers": ["example.com/keep"]}})
        assert status == 201
        status, _, deleting = rest(app, "DELETE", "/boxes/b3")
        assert status == 202 and deleting["metadata"]["finalizers"] == ["example.com/keep"]
        status, headers, gone = rest(app, "PUT", "/boxes/b3", {"metadata": {"finalizers": []}})
        assert status == 200 and gone["metadata"]["finalizers"] == [], gone
        assert headers["etag"] == f'"{gone["metadata"]["resourceVersion"]}"'
        assert rest(app, "GET", "/boxes/b3")[0] == 404
        event = self.deleted_event(app, obj)
        assert event["data"]["resource"] == gone
        self.assert_final_state(event, deleting)

    def test_app_client_update_that_removes_the_last_finalizer(self, app):
        app.client.create("Box", "b3", finalizers=["example.com/a", "example.com/b"])
        deleting = app.client.delete("Box", "b3")
        deleting.metadata["finalizers"] = ["example.com/b"]
        deleting = app.client.update(deleting)
        assert deleting.finalizers == ["example.com/b"]
        deleting.metadata["finalizers"] = []
        deleting.spec["size"] = 2          # the same write changes the spec: the final state shows it
        gone = app.client.update(deleting)
        assert gone.finalizers == [] and gone.spec == {"size": 2} and gone.generation == 2
        with pytest.raises(fabrica.NotFoundError):
            app.client.get("Box", "b3")
        event = self.deleted_event(app, gone)
        assert event["data"]["resource"] == gone

    def test_the_controller_removes_its_finalizer_after_finalize(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        finalized = []
        app.register("Box", finalize=lambda ctx, obj: finalized.append(obj.name))
        with app:
            app.client.create("Box", "b1", spec={"size": 1})
            deleting = app.client.delete("Box", "b1")
            assert deleting.finalizers == [fabrica.FINALIZER]
            assert poll(lambda: app.store.get("Box", deleting.uid) is None)
            assert finalized == ["b1"]
            self.assert_final_state(self.deleted_event(app, deleting), deleting)

    def test_start_up_removes_fabricas_finalizer_from_an_object_being_deleted(self, tmp_path):
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)

        def finalize(ctx, obj):
            raise RuntimeError("not yet")       # keeps the object waiting for its finalizer
        app.register("Box", finalize=finalize)
        with app:
            app.client.create("Box", "b1")
            deleting = app.client.delete("Box", "b1")
            assert deleting.finalizers == [fabrica.FINALIZER]
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Box")         # finalize= is gone: nothing would remove it
        with app:
            assert app.store.get("Box", deleting.uid) is None
            self.assert_final_state(self.deleted_event(app, deleting), deleting)

    def test_delete_removes_fabricas_finalizer_that_start_up_could_not(self, tmp_path, monkeypatch):
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Box", finalize=lambda ctx, obj: None)
        with app:
            obj = app.client.create("Box", "b1", spec={"size": 1})
            assert obj.finalizers == [fabrica.FINALIZER]
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Box")
        real = os.replace

        def failing(*args, **kwargs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(os, "replace", failing)       # start-up's sweep cannot take the finalizer off
        with app:
            monkeypatch.setattr(os, "replace", real)
            before = app.client.get("Box", "b1")
            assert before.finalizers == [fabrica.FINALIZER]
            status, _, body = rest(app, "DELETE", "/boxes/b1")
            assert status == 200 and body["uid"] == obj.uid, body
            event = self.deleted_event(app, obj)
        resource = event["data"]["resource"]
        assert resource["metadata"]["finalizers"] == [] and resource["spec"] == {"size": 1}
        assert resource["metadata"]["resourceVersion"] == event["resourceversion"]
        assert int(event["resourceversion"]) > int(before.resource_version)


class TestReservedKeysInSpecPatches:
    """SPEC §6.2, §6.4: a spec patch (merge, shorthand, JSON Patch; REST and app.client) that would create,
    change or remove a top-level spec key among the flat form's reserved keys and the envelope's markers is
    a 422 saying what to do instead, by one rule with status; a patch that leaves such a key alone works."""

    TYPES = {MERGE: "merge", "application/json": "merge", JSONP: "json", SHORT: "shorthand"}

    @pytest.mark.parametrize("ctype, patch, field, advice", [
        (MERGE, {"metadata": {"labels": {"a": "1"}}}, "metadata", "PUT the envelope"),
        (MERGE, {"labels": {"a": "1"}}, "labels", "PUT the envelope form"),
        ("application/json", {"annotations": {"a": "1"}}, "annotations", "or the flat form"),
        (MERGE, {"spec": {"x": 9}}, "spec", "patch its fields directly"),
        (MERGE, {"x": 2, "name": "g3"}, "name", "never changes"),
        (MERGE, {"kind": "Other"}, "kind", "served at the URL"),
        (MERGE, {"apiVersion": "v2"}, "apiVersion", "'v1'"),
        (MERGE, {"labels": None}, "labels", "PUT the envelope form"),
        (SHORT, {"labels.a": "1"}, "labels", "PUT the envelope form"),
        (SHORT, {"metadata.labels.a": "1"}, "metadata", "PUT the envelope"),
        (SHORT, {"spec.x": 9}, "spec", "patch its fields directly"),
        (JSONP, [{"op": "add", "path": "/metadata", "value": {"labels": {"a": "1"}}}], "metadata", "PUT"),
        (JSONP, [{"op": "add", "path": "/spec", "value": {"x": 9}}], "spec", "patch its fields directly"),
        (JSONP, [{"op": "move", "from": "/x", "path": "/name"}], "name", "never changes"),
        (JSONP, [{"op": "copy", "from": "/x", "path": "/kind"}], "kind", "served at the URL"),
        (JSONP, [{"op": "replace", "path": "", "value": {"x": 1, "labels": {}}}], "labels", "PUT the envelope"),
    ])
    def test_a_spec_patch_that_writes_one_is_refused(self, widgets, ctype, patch, field, advice):
        status, _, obj = rest(widgets, "POST", "/widgets", {"name": "g2", "x": 1})
        assert status == 201
        status, _, err = rest(widgets, "PATCH", "/widgets/g2", patch, ctype)
        assert status == 422, err
        assert [d["field"] for d in err["details"]] == [field] and advice in err["details"][0]["message"], err
        assert rest(widgets, "GET", "/widgets/g2")[2] == obj            # nothing stored, no generation bump
        with pytest.raises(ValidationError, match=re.escape(advice)):
            widgets.client.patch("Widget", "g2", patch, self.TYPES[ctype])
        assert widgets.client.get("Widget", "g2") == obj

    @pytest.mark.parametrize("key", ["labels", "metadata", "spec", "name", "kind", "apiVersion", "annotations"])
    def test_a_spec_field_of_that_name_is_written_with_the_envelope_and_left_alone(self, widgets, key):
        status, _, obj = rest(widgets, "POST", "/widgets", {"metadata": {"name": "g2"}, "spec": {key: "kept", "x": 1}})
        assert status == 201 and obj["spec"] == {key: "kept", "x": 1}
        for ctype, patch in ((MERGE, {"x": 2}), (SHORT, {"x": 3}), (JSONP, [{"op": "replace", "path": "/x", "value": 4},
                                                                           {"op": "test", "path": f"/{key}",
                                                                            "value": "kept"}])):
            status, _, obj = rest(widgets, "PATCH", "/widgets/g2", patch, ctype)
            assert status == 200 and obj["spec"][key] == "kept", obj
        assert widgets.client.patch("Widget", "g2", {"x": 5}).spec == {key: "kept", "x": 5}
        status, _, err = rest(widgets, "PATCH", "/widgets/g2", {key: "changed"}, MERGE)
        assert status == 422 and err["details"][0]["field"] == key
        status, _, obj = rest(widgets, "PUT", "/widgets/g2", {"spec": {key: "changed", "x": 5}})
        assert status == 200 and obj["spec"] == {key: "changed", "x": 5} and obj["metadata"]["generation"] == 6


def readme_paragraph(containing: str) -> str:
    """The README paragraph (or list item) that holds ``containing``, its whitespace made single spaces."""
    text = (Path(__file__).resolve().parent / "README.md").read_text()
    blocks = [" ".join(b.split()) for b in re.split(r"\n\s*\n|\n(?=- )", text)]
    [block] = [b for b in blocks if containing in b]
    return block


class TestTheReadmeSaysWhatHappens:
    """The README's claims next to finalizers and paging match what the server does."""

    def test_a_deletion_timestamp_in_a_body_is_ignored(self, widgets):
        status, _, obj = rest(widgets, "POST", "/widgets", {"metadata": {"name": "w1", "finalizers": ["x.io/keep"]},
                                                            "spec": {}})
        assert status == 201
        status, _, live = rest(widgets, "PUT", "/widgets/w1",
                               {"metadata": {"deletionTimestamp": "2020-01-01T00:00:00Z"}})
        assert status == 200 and live == obj
        status, _, deleting = rest(widgets, "DELETE", "/widgets/w1")
        assert status == 202 and deleting["metadata"]["deletionTimestamp"] is not None
        status, _, same = rest(widgets, "PUT", "/widgets/w1", {"metadata": {"deletionTimestamp": None}})
        assert status == 200 and same == deleting
        paragraph = readme_paragraph("Finalizers follow Kubernetes")
        assert "cannot be cleared" not in paragraph
        assert 'a PUT of `{"metadata": {"deletionTimestamp": null}}` answers 200 and changes nothing' in paragraph
        assert "server-managed, never taken from a body" in readme_paragraph("`deletionTimestamp` are server-managed")

    def test_the_continue_token_is_opaque(self, widgets):
        for name in ("w1", "w2"):
            assert rest(widgets, "POST", "/widgets", {"name": name})[0] == 201
        token = rest(widgets, "GET", "/widgets?limit=1")[1]["x-continue"]
        assert token not in (fabrica.base64.urlsafe_b64encode(b"w1").decode().rstrip("="), "w1")
        bullet = readme_paragraph("The continue token")
        assert "opaque" in bullet and "base64" not in bullet
