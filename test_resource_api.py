"""fabrica.py tests, REST API section: PATCH (SPEC §6.4), validation on every write path (§2),
list options and paging (§6.5) and spec history (§6.9), driven through the WSGI app in-process
and through ``app.client``. The pure patch, selector and schema functions have their own unit
tests (test_patches.py, test_schemas.py); here they are exercised end to end.
"""
from __future__ import annotations   # the dataclasses below are resolved with get_type_hints

import io
import json
import os
import re
import tempfile
import urllib.parse
import wsgiref.util
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fabrica

ACCEPT_PATCH_TYPES = {"application/merge-patch+json", "application/json-patch+json",
                      "application/shorthand-patch+json"}
MERGE, JSONP, SHORT = ("application/merge-patch+json", "application/json-patch+json",
                       "application/shorthand-patch+json")


###############################################################################
# Helpers #####################################################################
###############################################################################

def call(app, method, path, body=None, headers=None, ctype="application/json"):
    """One in-process request through app.wsgi -> (status, headers, decoded JSON or None).

    ``body`` may be bytes (sent verbatim) or any JSON value; ``ctype=None``
    sends no Content-Type at all.
    """
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    path_info, _, query = path.partition("?")
    environ.update(REQUEST_METHOD=method, PATH_INFO=urllib.parse.unquote(path_info), QUERY_STRING=query)
    raw = b""
    if body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    environ["wsgi.input"] = io.BytesIO(raw)
    environ["CONTENT_LENGTH"] = str(len(raw))
    environ.pop("CONTENT_TYPE", None)
    if ctype is not None:
        environ["CONTENT_TYPE"] = ctype
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status.split()[0])
        seen["headers"] = {k.lower(): v for k, v in response_headers}
    chunks = app.wsgi(environ, start_response)
    try:
        data = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return seen["status"], seen["headers"], (json.loads(data) if data else None)


def canon(value):
    """JSON value -> comparable form: true != 1, 1 == 1.0."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, list):
        return ("array", [canon(v) for v in value])
    if isinstance(value, dict):
        return ("object", {k: canon(v) for k, v in value.items()})
    return (type(value).__name__, value)


def assert_error(status, body, code):
    """A fabrica error body (SPEC §6.6) with the given code."""
    assert status == code, body
    assert isinstance(body, dict) and set(body) == {"error", "code", "details"}, body
    assert body["code"] == code and isinstance(body["error"], str) and body["error"]
    assert isinstance(body["details"], list)


def fields_of(details):
    return sorted(d["field"] for d in details)


@pytest.fixture
def make_app(tmp_path):
    """make_app(register) -> a started Fabrica on tmp_path/data; register(app) declares the kinds."""
    apps = []

    def make(register, data_dir=None):
        app = fabrica.Fabrica(data_dir=str(data_dir or tmp_path / "data"), durable=False)
        register(app)
        app.start()
        apps.append(app)
        return app
    yield make
    for app in reversed(apps):
        app.stop()


def plain(app):
    app.register("Rack")


###############################################################################
# PATCH (SPEC §6.4) ###########################################################
###############################################################################

def new_rack(app, name="r1", spec=None, path="/racks"):
    status, _, obj = call(app, "POST", path, {"metadata": {"name": name}, "spec": spec or {}})
    assert status == 201, obj
    return obj


class TestPatch:

    @pytest.mark.parametrize("ctype", [MERGE, MERGE + "; charset=utf-8", "application/json",
                                       "application/json; charset=UTF-8", None])
    @pytest.mark.parametrize("part", ["spec", "status"])
    def test_merge_patch_by_content_type(self, make_app, ctype, part):
        app = make_app(plain)
        new_rack(app, spec={"a": {"b": 1, "c": 2}, "keep": True})
        if part == "status":
            call(app, "PUT", "/racks/r1/status", {"a": {"b": 1, "c": 2}, "keep": True})
        url = "/racks/r1" + ("/status" if part == "status" else "")
        status, headers, obj = call(app, "PATCH", url, {"a": {"b": 10, "c": None}, "new": [1]}, ctype=ctype)
        assert status == 200, obj
        assert obj[part] == {"a": {"b": 10}, "keep": True, "new": [1]}
        assert set(t.strip() for t in headers["accept-patch"].split(",")) == ACCEPT_PATCH_TYPES
        assert headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        assert call(app, "GET", "/racks/r1")[2][part] == obj[part]

    @pytest.mark.parametrize("part", ["spec", "status"])
    def test_json_patch_every_op_and_pointer_escapes(self, make_app, part):
        app = make_app(plain)
        doc = {"a": {"b": 1}, "list": [1, 2, 3], "x/y": "slash", "m~n": "tilde"}
        new_rack(app, spec=doc)
        call(app, "PUT", "/racks/r1/status", doc)
        ops = [
            {"op": "test", "path": "/x~1y", "value": "slash"},
            {"op": "test", "path": "/m~0n", "value": "tilde"},
            {"op": "add", "path": "/list/-", "value": 4},
            {"op": "add", "path": "/list/0", "value": 0},
            {"op": "remove", "path": "/list/1"},
            {"op": "replace", "path": "/a/b", "value": 2},
            {"op": "move", "from": "/a/b", "path": "/moved"},
            {"op": "copy", "from": "/list", "path": "/copied"},
            {"op": "replace", "path": "/x~1y", "value": "new slash"},
            {"op": "remove", "path": "/m~0n"},
            {"op": "add", "path": "/a~1b", "value": {"~": 1}},
        ]
        url = "/racks/r1" + ("/status" if part == "status" else "")
        status, headers, obj = call(app, "PATCH", url, ops, ctype=JSONP)
        assert status == 200, obj
        assert obj[part] == {"a": {}, "list": [0, 2, 3, 4], "x/y": "new slash", "moved": 2,
                             "copied": [0, 2, 3, 4], "a/b": {"~": 1}}
        assert "accept-patch" in headers

    @pytest.mark.parametrize("part", ["spec", "status"])
    def test_shorthand_patch(self, make_app, part):
        app = make_app(plain)
        doc = {"a": {"b": 0, "keep": 1}, "c": 5, "n": None}
        new_rack(app, spec=doc)
        call(app, "PUT", "/racks/r1/status", doc)
        url = "/racks/r1" + ("/status" if part == "status" else "")
        patch = {"a.b": 1, "c": None, "d.e.f": "x", "gone.deeper": None, "n.x": True, "missing": None}
        status, headers, obj = call(app, "PATCH", url, patch, ctype=SHORT)
        assert status == 200, obj
        assert obj[part] == {"a": {"b": 1, "keep": 1}, "d": {"e": {"f": "x"}}, "n": {"x": True}}
        assert "accept-patch" in headers

    @pytest.mark.parametrize("part", ["spec", "status"])
    @pytest.mark.parametrize("ctype, patch, field", [
        (JSONP, [{"op": "add", "path": "/x", "value": 1}, {"op": "test", "path": "/c", "value": 6}], "patch[1]"),
        (JSONP, [{"op": "remove", "path": "/nope"}], "patch[0]"),
        (JSONP, [{"op": "replace", "path": "/nope/deeper", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "/a/5", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "/a/01", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "move", "from": "/nope", "path": "/x"}], "patch[0]"),
        (JSONP, [{"op": "frobnicate", "path": "/c"}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "c", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "/c"}], "patch[0]"),
        (JSONP, [{"op": "replace", "path": "", "value": [1, 2]}], None),   # the result is not an object
        (SHORT, {"c.x": 1}, None),                                            # c is a number
        (SHORT, {"a..b": 1}, None),
    ])
    def test_patch_that_cannot_apply_is_422_and_writes_nothing(self, make_app, part, ctype, patch, field):
        app = make_app(plain)
        doc = {"a": [1], "c": 5}
        new_rack(app, spec=doc)
        before = call(app, "PUT", "/racks/r1/status", doc)[2]
        url = "/racks/r1" + ("/status" if part == "status" else "")
        status, _, body = call(app, "PATCH", url, patch, ctype=ctype)
        assert_error(status, body, 422)
        if field is not None:
            assert field in fields_of(body["details"]), body
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("ctype", ["application/strategic-merge-patch+json", "text/plain",
                                       "application/xml", "application/apply-patch+yaml"])
    @pytest.mark.parametrize("suffix", ["", "/status"])
    def test_unsupported_patch_type_is_415_with_accept_patch(self, make_app, ctype, suffix):
        app = make_app(plain)
        before = new_rack(app, spec={"a": 1})
        status, headers, body = call(app, "PATCH", "/racks/r1" + suffix, {"a": 2}, ctype=ctype)
        assert_error(status, body, 415)
        assert set(t.strip() for t in headers["accept-patch"].split(",")) == ACCEPT_PATCH_TYPES
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("body", [{"op": "add", "path": "/a", "value": 1}, "ops", 1, None, True])
    @pytest.mark.parametrize("suffix", ["", "/status"])
    def test_json_patch_body_that_is_not_a_list(self, make_app, body, suffix):
        app = make_app(plain)
        before = new_rack(app, spec={"a": 1})
        status, _, err = call(app, "PATCH", "/racks/r1" + suffix, json.dumps(body).encode(), ctype=JSONP)
        assert status in (400, 422), err
        assert_error(status, err, status)
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("ctype", [MERGE, SHORT])
    @pytest.mark.parametrize("body", [b"[1]", b'"x"', b"1", b"null", b"{", b"", b'{"a": NaN}'])
    def test_object_patch_bodies_that_are_not_objects_are_400(self, make_app, ctype, body):
        app = make_app(plain)
        before = new_rack(app, spec={"a": 1})
        status, _, err = call(app, "PATCH", "/racks/r1", body, ctype=ctype)
        assert_error(status, err, 400)
        assert call(app, "GET", "/racks/r1")[2] == before

    def test_patch_of_a_missing_object_is_404(self, make_app):
        app = make_app(plain)
        for suffix in ("", "/status"):
            status, _, err = call(app, "PATCH", "/racks/nope" + suffix, {"a": 1}, ctype=MERGE)
            assert_error(status, err, 404)

    def test_generation_moves_only_when_the_spec_changes(self, make_app):
        app = make_app(plain)
        obj = new_rack(app, spec={"a": 1})
        gen, rv = obj["metadata"]["generation"], int(obj["metadata"]["resourceVersion"])
        assert gen == 1
        # A spec change: generation and resourceVersion move.
        _, _, obj = call(app, "PATCH", "/racks/r1", {"a": 2}, ctype=MERGE)
        assert obj["metadata"]["generation"] == 2 and int(obj["metadata"]["resourceVersion"]) > rv
        rv = int(obj["metadata"]["resourceVersion"])
        # Patches that change nothing: 200, nothing written (SPEC §1).
        for ctype, patch in ((MERGE, {"a": 2}), (MERGE, {}), (MERGE, {"zz": None}),
                             (JSONP, []), (JSONP, [{"op": "test", "path": "/a", "value": 2}]),
                             (JSONP, [{"op": "replace", "path": "/a", "value": 2}]),
                             (SHORT, {"a": 2}), (SHORT, {"q.r": None})):
            status, _, same = call(app, "PATCH", "/racks/r1", patch, ctype=ctype)
            assert status == 200 and same == obj, (ctype, patch)
        # A status patch moves resourceVersion only.
        status, _, st_obj = call(app, "PATCH", "/racks/r1/status", {"phase": "Ready"}, ctype=MERGE)
        assert status == 200 and st_obj["status"] == {"phase": "Ready"}
        assert st_obj["metadata"]["generation"] == 2 and st_obj["spec"] == {"a": 2}
        assert int(st_obj["metadata"]["resourceVersion"]) > rv
        for ctype, patch in ((JSONP, [{"op": "add", "path": "/n", "value": 1}]), (SHORT, {"m.k": "v"})):
            status, _, st_obj = call(app, "PATCH", "/racks/r1/status", patch, ctype=ctype)
            assert status == 200 and st_obj["metadata"]["generation"] == 2
        assert st_obj["status"] == {"phase": "Ready", "n": 1, "m": {"k": "v"}}
        # Each spec patch type bumps it by exactly one.
        for gen, (ctype, patch) in enumerate(((MERGE, {"b": 1}), (JSONP, [{"op": "add", "path": "/c", "value": 1}]),
                                              (SHORT, {"d.e": 1})), start=3):
            _, _, obj = call(app, "PATCH", "/racks/r1", patch, ctype=ctype)
            assert obj["metadata"]["generation"] == gen
        assert obj["spec"] == {"a": 2, "b": 1, "c": 1, "d": {"e": 1}}
        assert obj["status"] == st_obj["status"]

    @pytest.mark.parametrize("suffix, part", [("", "spec"), ("/status", "status")])
    def test_patch_true_to_1_is_a_change(self, make_app, suffix, part):
        app = make_app(plain)
        new_rack(app, spec={"x": True})
        call(app, "PUT", "/racks/r1/status", {"x": True})
        status, _, obj = call(app, "PATCH", "/racks/r1" + suffix, {"x": 1}, ctype=MERGE)
        assert status == 200
        assert canon(obj[part]) == canon({"x": 1}), obj[part]

    def test_client_patch_types(self, make_app):
        app = make_app(plain)
        app.client.create("Rack", "r1", spec={"a": {"b": 1}, "l": [1]})
        obj = app.client.patch("Rack", "r1", {"a": {"c": 2}})
        assert obj.spec == {"a": {"b": 1, "c": 2}, "l": [1]} and obj.generation == 2
        obj = app.client.patch("Rack", "r1", [{"op": "add", "path": "/l/-", "value": 2}], type="json")
        assert obj.spec["l"] == [1, 2] and obj.generation == 3
        obj = app.client.patch("Rack", "r1", {"a.b": None, "z.y": 0}, type="shorthand")
        assert obj.spec == {"a": {"c": 2}, "l": [1, 2], "z": {"y": 0}} and obj.generation == 4
        obj = app.client.patch_status("Rack", "r1", {"phase": "Ready"})
        obj = app.client.patch_status("Rack", "r1", [{"op": "add", "path": "/n", "value": 1}], type="json")
        obj = app.client.patch_status("Rack", "r1", {"m.k": "v", "phase": None}, type="shorthand")
        assert obj.status == {"n": 1, "m": {"k": "v"}} and obj.generation == 4
        with pytest.raises(fabrica.PatchError) as err:
            app.client.patch("Rack", "r1", [{"op": "remove", "path": "/nope"}], type="json")
        assert err.value.status == 422
        with pytest.raises(fabrica.FabricaError) as err:
            app.client.patch("Rack", "r1", {"a": 1}, type="strategic")
        assert err.value.status == 415
        assert app.client.get("Rack", "r1") == obj


###############################################################################
# Validation on every write path (SPEC §2) ###################################
###############################################################################

@dataclass
class BladeConfig:
    nodeCount: int = field(default=1, metadata={"minimum": 1})
    bmcMode: Literal["shared", "dedicated"] = "shared"


@dataclass
class RackSpec:
    chassisCount: int = field(metadata={"minimum": 1, "maximum": 42})
    bmcMode: Literal["shared", "dedicated"] = "shared"
    blade: BladeConfig = field(default_factory=BladeConfig)
    location: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)


RACK_STATUS = {
    "type": "object",
    "properties": {
        "phase": {"enum": ["Pending", "Ready", "Error"]},
        "totalChassis": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}

GOOD_SPEC = {"chassisCount": 2}
DEFAULTED = {"chassisCount": 2, "bmcMode": "shared", "blade": {"nodeCount": 1, "bmcMode": "shared"},
             "location": None, "tags": [], "ports": {}}
BAD_SPECS = [  # (a bad spec or spec patch, every field that must be reported)
    ({"chassisCount": 0, "bmcMode": "bogus", "blade": {"nodeCount": "x"}},
     ["spec.blade.nodeCount", "spec.bmcMode", "spec.chassisCount"]),
    ({"chassisCount": 43, "location": 5, "tags": ["ok", 1], "ports": {"a": "x"}, "blade": {"bmcMode": "none"}},
     ["spec.blade.bmcMode", "spec.chassisCount", "spec.location", "spec.ports.a", "spec.tags[1]"]),
    ({"chassisCount": 2, "bogus": 1}, ["spec.bogus"]),
    ({"chassisCount": 2.5}, ["spec.chassisCount"]),
    ({"chassisCount": True}, ["spec.chassisCount"]),
    ({"chassisCount": 2, "blade": {"nodeCount": 1, "extra": True}}, ["spec.blade.extra"]),
]
BAD_STATUS = {"phase": "Bogus", "totalChassis": -1, "extra": 1}
BAD_STATUS_FIELDS = ["status.extra", "status.phase", "status.totalChassis"]


def forbid(obj):
    if not isinstance(obj, fabrica.Resource):
        raise AssertionError("validate must receive a Resource")
    if obj.spec.get("location") == "forbidden":
        raise fabrica.ValidationError("location 'forbidden' is not allowed",
                                      [{"field": "spec.location", "message": "is not allowed"}])
    if obj.labels.get("stop") == "yes":
        raise fabrica.ValidationError("label stop=yes is not allowed",
                                      [{"field": "metadata.labels.stop", "message": "is not allowed"}])


def typed(app):
    app.register("Rack", spec=RackSpec, status=RACK_STATUS, validate=forbid)


def flatten(value, prefix=""):
    """A nested dict as shorthand patch keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    out = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out.update(flatten(item, prefix + key + "."))
        else:
            out[prefix + key] = item
    return out


def as_json_patch(value):
    return [{"op": "add", "path": "/" + key, "value": item} for key, item in value.items()]


# Each spec write path: fn(app, bad_spec) -> (status, details) of the refused write to r1.
def _rest(method, path, body_of, ctype="application/json"):
    def run(app, bad):
        status, _, body = call(app, method, path, body_of(bad), ctype=ctype)
        if status < 400:
            return status, body
        assert_error(status, body, status)
        return status, body["details"]
    return run


def _client(fn):
    def run(app, bad):
        with pytest.raises(fabrica.FabricaError) as err:
            fn(app, bad)
        return err.value.status, err.value.details
    return run


def _client_update(app, spec):
    obj = app.client.get("Rack", "r1")
    obj["spec"] = spec
    app.client.update(obj)


SPEC_WRITES = {
    "POST flat": _rest("POST", "/racks", lambda bad: {"name": "r2", **bad}),
    "POST envelope": _rest("POST", "/racks", lambda bad: {"metadata": {"name": "r2"}, "spec": bad}),
    "PUT flat": _rest("PUT", "/racks/r1", lambda bad: {"name": "r1", **bad}),
    "PUT envelope": _rest("PUT", "/racks/r1", lambda bad: {"metadata": {"name": "r1"}, "spec": bad}),
    "PATCH merge": _rest("PATCH", "/racks/r1", lambda bad: bad, MERGE),
    "PATCH json (application/json)": _rest("PATCH", "/racks/r1", lambda bad: bad),
    "PATCH json-patch": _rest("PATCH", "/racks/r1", as_json_patch, JSONP),
    "PATCH shorthand": _rest("PATCH", "/racks/r1", flatten, SHORT),
    "client.create": _client(lambda app, bad: app.client.create("Rack", "r2", spec=bad)),
    "client.update": _client(_client_update),
    "client.patch merge": _client(lambda app, bad: app.client.patch("Rack", "r1", bad)),
    "client.patch json": _client(lambda app, bad: app.client.patch("Rack", "r1", as_json_patch(bad), type="json")),
    "client.patch shorthand": _client(lambda app, bad: app.client.patch("Rack", "r1", flatten(bad),
                                                                        type="shorthand")),
}
STATUS_WRITES = {
    "PUT status": _rest("PUT", "/racks/r1/status", lambda bad: bad),
    "PATCH status merge": _rest("PATCH", "/racks/r1/status", lambda bad: bad, MERGE),
    "PATCH status json-patch": _rest("PATCH", "/racks/r1/status", as_json_patch, JSONP),
    "PATCH status shorthand": _rest("PATCH", "/racks/r1/status", flatten, SHORT),
    "client.update_status": _client(lambda app, bad: app.client.update_status("Rack", "r1", bad)),
    "client.patch_status merge": _client(lambda app, bad: app.client.patch_status("Rack", "r1", bad)),
    "client.patch_status json": _client(lambda app, bad: app.client.patch_status("Rack", "r1", as_json_patch(bad),
                                                                                 type="json")),
    "client.patch_status shorthand": _client(lambda app, bad: app.client.patch_status("Rack", "r1", flatten(bad),
                                                                                      type="shorthand")),
}


class TestValidation:

    @pytest.fixture
    def app(self, make_app):
        app = make_app(typed)
        status, _, obj = call(app, "POST", "/racks", {"name": "r1", **GOOD_SPEC})
        assert status == 201, obj
        call(app, "PUT", "/racks/r1/status", {"phase": "Pending"})
        return app

    @pytest.mark.parametrize("bad, expected", BAD_SPECS)
    @pytest.mark.parametrize("path", list(SPEC_WRITES))
    def test_every_spec_write_path_lists_every_failing_field(self, app, path, bad, expected):
        before = call(app, "GET", "/racks/r1")[2]
        status, details = SPEC_WRITES[path](app, bad)
        assert status == 422, details
        assert fields_of(details) == expected, details
        assert all(isinstance(d["message"], str) and d["message"] for d in details)
        assert call(app, "GET", "/racks/r1")[2] == before          # rv, spec, status unchanged
        assert call(app, "GET", "/racks/r2")[0] == 404             # and no create happened
        assert call(app, "GET", "/racks")[2] == [before]

    @pytest.mark.parametrize("path", list(STATUS_WRITES))
    def test_every_status_write_path_lists_every_failing_field(self, app, path):
        before = call(app, "GET", "/racks/r1")[2]
        status, details = STATUS_WRITES[path](app, BAD_STATUS)
        assert status == 422, details
        assert fields_of(details) == BAD_STATUS_FIELDS, details
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("path", list(SPEC_WRITES))
    def test_validate_function_refuses_on_every_spec_write_path(self, app, path):
        before = call(app, "GET", "/racks/r1")[2]
        status, details = SPEC_WRITES[path](app, {"chassisCount": 3, "location": "forbidden"})
        assert status == 422, details
        assert details == [{"field": "spec.location", "message": "is not allowed"}]
        assert call(app, "GET", "/racks/r1")[2] == before
        assert call(app, "GET", "/racks/r2")[0] == 404

    def test_validate_function_error_body_on_create_and_update(self, app):
        status, _, body = call(app, "POST", "/racks", {"name": "r2", "chassisCount": 1, "location": "forbidden"})
        assert_error(status, body, 422)
        assert "forbidden" in body["error"]
        assert body["details"] == [{"field": "spec.location", "message": "is not allowed"}]
        status, _, body = call(app, "PUT", "/racks/r1", {"name": "r1", "chassisCount": 1, "labels": {"stop": "yes"}})
        assert_error(status, body, 422)
        assert body["details"] == [{"field": "metadata.labels.stop", "message": "is not allowed"}]
        with pytest.raises(fabrica.ValidationError) as err:
            app.client.create("Rack", "r3", spec=GOOD_SPEC, labels={"stop": "yes"})
        assert err.value.status == 422 and err.value.details[0]["field"] == "metadata.labels.stop"
        assert [o["metadata"]["name"] for o in call(app, "GET", "/racks")[2]] == ["r1"]

    def test_defaults_are_filled_in_and_stored(self, app, tmp_path):
        obj = call(app, "GET", "/racks/r1")[2]
        assert obj["spec"] == DEFAULTED
        status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "r2"},
                                                      "spec": {"chassisCount": 5, "blade": {"nodeCount": 3}}})
        assert status == 201
        assert obj["spec"] == {**DEFAULTED, "chassisCount": 5, "blade": {"nodeCount": 3, "bmcMode": "shared"}}
        assert call(app, "GET", "/racks/r2")[2]["spec"] == obj["spec"]
        with open(tmp_path / "data" / "racks" / f"{obj['metadata']['uid']}.json") as f:
            assert json.load(f)["spec"] == obj["spec"]      # stored, not filled in on read
        # Removing a defaulted field by patch brings the default back: no spec change, no write.
        status, _, same = call(app, "PATCH", "/racks/r2", {"bmcMode": None, "tags": None}, ctype=MERGE)
        assert status == 200 and same == obj
        # A PUT replaces the spec, so unspecified fields return to their defaults.
        _, _, obj = call(app, "PUT", "/racks/r2", {"name": "r2", "chassisCount": 6})
        assert obj["spec"] == {**DEFAULTED, "chassisCount": 6} and obj["metadata"]["generation"] == 2
        assert app.client.create("Rack", "r3", spec={"chassisCount": 2}).spec == DEFAULTED

    def test_good_writes_on_every_path_pass(self, app):
        ok = {"chassisCount": 4, "bmcMode": "dedicated", "tags": ["a"], "ports": {"p": 1}, "location": "dc2"}
        # Each spec write path accepts a valid spec (defaults filled in).
        writes = [
            lambda s: call(app, "PUT", "/racks/r1", {"name": "r1", **s}),
            lambda s: call(app, "PUT", "/racks/r1", {"metadata": {"name": "r1"}, "spec": s}),
            lambda s: call(app, "PATCH", "/racks/r1", s, ctype=MERGE),
            lambda s: call(app, "PATCH", "/racks/r1", as_json_patch(s), ctype=JSONP),
            lambda s: call(app, "PATCH", "/racks/r1", flatten(s), ctype=SHORT),
        ]
        for count, write in enumerate(writes, start=10):
            status, _, obj = write({**ok, "chassisCount": count})
            assert status == 200, obj
            assert obj["spec"]["chassisCount"] == count and obj["spec"]["bmcMode"] == "dedicated"
        obj = app.client.patch("Rack", "r1", {"chassisCount": 30})
        obj["spec"]["chassisCount"] = 31
        assert app.client.update(obj).spec["chassisCount"] == 31
        for status_write in (
                lambda: call(app, "PUT", "/racks/r1/status", {"phase": "Ready", "totalChassis": 3})[2],
                lambda: call(app, "PATCH", "/racks/r1/status", {"totalChassis": 4}, ctype=MERGE)[2],
                lambda: app.client.update_status("Rack", "r1", {"phase": "Error"}),
                lambda: app.client.patch_status("Rack", "r1", {"totalChassis": 0})):
            assert isinstance(status_write()["status"], dict)
        assert call(app, "GET", "/racks/r1/status")[2] == {"phase": "Error", "totalChassis": 0}

    def test_status_schema_admits_the_framework_fields(self, app):
        status_body = {"phase": "Ready", "observedGeneration": 1,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned", "message": "",
                                       "lastTransitionTime": "2026-11-26T07:00:01Z", "observedGeneration": 1}]}
        status, _, obj = call(app, "PUT", "/racks/r1/status", status_body)
        assert status == 200, obj
        assert obj["status"] == status_body
        status, _, obj = call(app, "PATCH", "/racks/r1/status", {"observedGeneration": 2}, ctype=MERGE)
        assert status == 200 and obj["status"]["observedGeneration"] == 2
        # ...yet they are still typed.
        status, _, err = call(app, "PATCH", "/racks/r1/status", {"observedGeneration": "two"}, ctype=MERGE)
        assert_error(status, err, 422)
        assert fields_of(err["details"]) == ["status.observedGeneration"]

    def test_framework_status_fields_pass_a_status_schema_without_properties(self, make_app):
        counts = {"type": "object", "additionalProperties": {"type": "integer"}}
        app = make_app(lambda app: app.register("Rack", status=counts, history=True))
        new_rack(app)
        status, _, obj = call(app, "PUT", "/racks/r1/status", {"a": 1})
        assert status == 200 and obj["status"] == {"a": 1, "version": "1"}
        status, _, obj = call(app, "PATCH", "/racks/r1/status", {"b": 2}, ctype=MERGE)
        assert status == 200, obj
        assert obj["status"] == {"a": 1, "b": 2, "version": "1"}
        body = {"a": 1, "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": "True", "reason": "", "message": "",
                                "lastTransitionTime": "2026-11-26T07:00:01Z", "observedGeneration": 1}]}
        status, _, obj = call(app, "PUT", "/racks/r1/status", body)
        assert status == 200, obj

    def test_reconciler_status_with_conditions_passes_a_status_schema_without_them(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Rack", spec=RackSpec, status=RACK_STATUS)
        def reconcile(ctx, rack):
            rack.status["phase"] = "Ready"
            rack.status["totalChassis"] = rack.spec["chassisCount"]
            rack.set_condition("Ready", True, reason="Provisioned")
        with app:
            app.client.create("Rack", "r1", spec={"chassisCount": 3})
            assert app.wait_idle(10)
            obj = app.client.get("Rack", "r1")
        assert obj.status["phase"] == "Ready" and obj.status["totalChassis"] == 3
        assert obj.status["observedGeneration"] == 1
        assert obj.condition("Ready")["status"] == "True"
        assert obj.condition("Ready")["reason"] == "Provisioned"

    @pytest.mark.parametrize("method, path", [("POST", "/racks"), ("PUT", "/racks/r1")])
    def test_metadata_and_spec_errors_are_listed_together(self, app, method, path):
        body = {"name": "r1", "labels": {"bad key": "v"}, "chassisCount": 0, "bmcMode": "bogus"}
        status, _, err = call(app, method, path, body)
        assert_error(status, err, 422)
        assert fields_of(err["details"]) == ["metadata.labels.bad key", "spec.bmcMode", "spec.chassisCount"]

    def test_envelope_and_metadata_errors_are_422_and_listed(self, app):
        before = call(app, "GET", "/racks/r1")[2]
        body = {"metadata": {"name": "r1", "labels": {"bad key!": "v", "ok": "-bad"}}, "spec": {"chassisCount": 0}}
        status, _, err = call(app, "PUT", "/racks/r1", body)
        assert_error(status, err, 422)
        assert {"metadata.labels.bad key!", "metadata.labels.ok"} <= set(fields_of(err["details"]))
        status, _, err = call(app, "PUT", "/racks/r1", {"metadata": {"name": "r1"}, "spec": GOOD_SPEC, "extra": 1})
        assert_error(status, err, 422)
        assert fields_of(err["details"]) == ["extra"]
        assert call(app, "GET", "/racks/r1")[2] == before


###############################################################################
# List options (SPEC §6.5) ####################################################
###############################################################################

LABELS = {
    "a1": {"env": "prod", "tier": "web"},
    "a2": {"env": "prod", "tier": "db"},
    "a3": {"env": "dev", "tier": "web", "canary": "true"},
    "a4": {"env": "dev"},
    "a5": {"env": "staging", "tier": "cache"},
    "a6": {},
    "a7": {"tier": "web", "team": "x"},
    "a8": {"env": "prod", "canary": "false", "team": "y"},
    "a9": {"example.com/owner": "ops", "env": "qa"},
    "b0": {"env": "", "tier": "db"},
}
ALL = sorted(LABELS)

SELECTORS = [
    ("env=prod", "a1 a2 a8"),
    ("env==prod", "a1 a2 a8"),
    ("env!=prod", "a3 a4 a5 a6 a7 a9 b0"),
    ("env in (prod,dev)", "a1 a2 a3 a4 a8"),
    ("env in (prod, dev)", "a1 a2 a3 a4 a8"),
    ("env notin (prod,dev)", "a5 a6 a7 a9 b0"),
    ("tier", "a1 a2 a3 a5 a7 b0"),
    ("!tier", "a4 a6 a8 a9"),
    ("env=prod,tier=web", "a1"),
    ("env=prod, tier!=web", "a2 a8"),
    ("tier in (web), env notin (dev)", "a1 a7"),
    ("canary", "a3 a8"),
    ("!canary,!team", "a1 a2 a4 a5 a6 a9 b0"),
    ("env=", "b0"),
    ("env in ()", "b0"),
    ("env in (prod,,dev)", "a1 a2 a3 a4 a8 b0"),
    ("example.com/owner=ops", "a9"),
    ("example.com/owner", "a9"),
    ("", " ".join(ALL)),
    ("  env = prod  ,  tier = db ", "a2"),
    ("env\t=\tprod", "a1 a2 a8"),
    ("env=nope", ""),
    ("nokey", ""),
    ("!nokey", " ".join(ALL)),
    ("tier in (web,db,cache),!env", "a7"),
    ("env,!tier", "a4 a8 a9"),
    ("team notin (x)", "a1 a2 a3 a4 a5 a6 a8 a9 b0"),
    ("env in (prod,dev),tier in (web)", "a1 a3"),
    ("tier!=web,tier!=db", "a4 a5 a6 a8 a9"),
    ("env==dev,canary==true", "a3"),
    ("env=prod,env=dev", ""),
    ("env,env!=", "a1 a2 a3 a4 a5 a8 a9"),
]

BAD_SELECTORS = [
    "env=prod,", ",env", "env in prod", "env in (prod", "env notin", "!env=prod", "env<1", "env>1",
    "env=a b", "env=(prod)", "=prod", "Env_=x", "env=-prod", "env=" + "a" * 64, "a/b/c=x", "/x=1",
    "env in (a,,)", "!", "env=prod)", "env in (a b)", "env=prod env=dev", "(", "env!",
]


@pytest.fixture(scope="class")
def list_app(tmp_path_factory):
    app = fabrica.Fabrica(data_dir=str(tmp_path_factory.mktemp("list") / "data"), durable=False)
    app.register("Rack")
    with app:
        for name in reversed(ALL):      # creation order is not name order
            app.client.create("Rack", name, spec={"n": name}, labels=LABELS[name])
        yield app


class TestListOptions:

    @pytest.fixture
    def app(self, list_app):
        return list_app

    @staticmethod
    def get(app, **query):
        return call(app, "GET", "/racks?" + urllib.parse.urlencode(query))

    @pytest.mark.parametrize("selector, expected", SELECTORS)
    def test_selector(self, app, selector, expected):
        status, headers, items = self.get(app, labelSelector=selector)
        assert status == 200, items
        assert [o["metadata"]["name"] for o in items] == expected.split()
        assert headers["x-total-count"] == str(len(expected.split()))
        assert "x-continue" not in headers and "link" not in headers
        assert [o.name for o in app.client.list("Rack", selector=selector)] == expected.split()

    def test_percent_encoded_selector_characters(self, app):
        status, _, items = call(app, "GET", "/racks?labelSelector=env%20in%20%28prod%2Cdev%29%2C%21canary")
        assert status == 200 and [o["metadata"]["name"] for o in items] == ["a1", "a2", "a4"]
        status, _, items = call(app, "GET", "/racks?labelSelector=example.com%2Fowner%3D%3Dops")
        assert status == 200 and [o["metadata"]["name"] for o in items] == ["a9"]

    @pytest.mark.parametrize("selector", BAD_SELECTORS)
    def test_malformed_selector_is_400(self, app, selector):
        status, headers, body = self.get(app, labelSelector=selector)
        assert_error(status, body, 400)
        assert headers["content-type"].startswith("application/json")
        with pytest.raises(fabrica.BadRequestError):
            app.client.list("Rack", selector=selector)

    def test_no_options_lists_all_by_name(self, app):
        status, headers, items = call(app, "GET", "/racks")
        assert status == 200 and [o["metadata"]["name"] for o in items] == ALL
        assert headers["x-total-count"] == "10"
        assert items[0] == call(app, "GET", "/racks/a1")[2]

    @pytest.mark.parametrize("name, expected", [("a3", ["a3"]), ("a", []), ("A3", []), ("a3 ", []),
                                                ("zz", []), ("b0", ["b0"])])
    def test_name_is_an_exact_match(self, app, name, expected):
        status, headers, items = self.get(app, name=name)
        assert status == 200 and [o["metadata"]["name"] for o in items] == expected
        assert headers["x-total-count"] == str(len(expected))

    def test_name_and_selector_combine(self, app):
        assert [o["metadata"]["name"] for o in self.get(app, name="a3", labelSelector="env=dev")[2]] == ["a3"]
        status, headers, items = self.get(app, name="a3", labelSelector="env=prod")
        assert status == 200 and items == [] and headers["x-total-count"] == "0"

    @pytest.mark.parametrize("limit", ["0", "-1", "abc", str(2 ** 31 + 1), "1.5", " 1", "+1", "1e3",
                                       "٣", "0x10", str(10 ** 30)])
    def test_limit_out_of_bounds_is_400(self, app, limit):
        status, _, body = self.get(app, limit=limit)
        assert_error(status, body, 400)

    @pytest.mark.parametrize("limit, size", [("1", 1), ("3", 3), ("10", 10), ("11", 10), (str(2 ** 31), 10)])
    def test_limit_in_bounds(self, app, limit, size):
        status, headers, items = self.get(app, limit=limit)
        assert status == 200, items
        assert [o["metadata"]["name"] for o in items] == ALL[:size]
        assert headers["x-total-count"] == "10"
        assert ("x-continue" in headers) == (size < 10)

    def walk(self, app, first_url):
        """Follow Link rel=next from first_url; returns the list of pages (name lists) and headers seen."""
        pages, url, headers_seen = [], first_url, []
        for _ in range(100):
            status, headers, items = call(app, "GET", url)
            assert status == 200, items
            pages.append([o["metadata"]["name"] for o in items])
            headers_seen.append(headers)
            if "link" not in headers:
                assert "x-continue" not in headers
                return pages, headers_seen
            match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', headers["link"])
            assert match, headers["link"]
            url = match.group(1)
            token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["continue"][0]
            assert token == headers["x-continue"]
            assert re.fullmatch(r"[A-Za-z0-9_.~-]+", headers["x-continue"])     # URL-safe, opaque
        raise AssertionError("paging did not end")

    def test_paging_walks_everything_in_name_order(self, app):
        pages, headers = self.walk(app, "/racks?limit=3")
        assert pages == [ALL[0:3], ALL[3:6], ALL[6:9], ALL[9:]]
        assert all(h["x-total-count"] == "10" for h in headers)
        # The X-Continue token alone works too.
        token = headers[0]["x-continue"]
        _, _, items = self.get(app, limit=3, **{"continue": token})
        assert [o["metadata"]["name"] for o in items] == ALL[3:6]
        # An exact multiple of the limit has no empty last page.
        pages, _ = self.walk(app, "/racks?limit=5")
        assert pages == [ALL[:5], ALL[5:]]

    def test_selector_and_paging_together(self, app):
        matching = "a1 a2 a3 a4 a5 a8 a9 b0".split()                  # "env"
        pages, headers = self.walk(app, "/racks?" + urllib.parse.urlencode({"labelSelector": "env", "limit": 3}))
        assert pages == [matching[:3], matching[3:6], matching[6:]]
        assert all(h["x-total-count"] == "8" for h in headers)
        pages, headers = self.walk(app, "/racks?" + urllib.parse.urlencode({"labelSelector": "env!=prod", "limit": 2}))
        assert pages == [["a3", "a4"], ["a5", "a6"], ["a7", "a9"], ["b0"]]
        assert all(h["x-total-count"] == "7" for h in headers)
        pages, _ = self.walk(app, "/racks?" + urllib.parse.urlencode({"labelSelector": "env=prod", "limit": 3}))
        assert pages == [["a1", "a2", "a8"]]
        pages, headers = self.walk(app, "/racks?" + urllib.parse.urlencode(
            {"labelSelector": "env in (prod, dev), tier", "limit": 1}))
        assert pages == [["a1"], ["a2"], ["a3"]]
        assert all(h["x-total-count"] == "3" for h in headers)

    @pytest.mark.parametrize("token", ["!!!", "abc", "bjpBQkM", "eDpmb28", "bjo", "%%%", "bjpmb28gYmFy",
                                       "bjphLi5i" * 100])
    def test_malformed_continue_token_is_400(self, app, token):
        status, _, body = self.get(app, limit=3, **{"continue": token})
        assert_error(status, body, 400)


###############################################################################
# Paging under writes (SPEC §6.5) #############################################
###############################################################################

class TestPagingUnderWrites:

    @pytest.mark.parametrize("selector", [None, "grp=x", "grp!=y"])
    def test_objects_present_for_the_whole_walk_appear_exactly_once(self, make_app, selector):
        app = make_app(plain)
        initial = [f"obj-{i:02d}" for i in range(60)]
        for name in initial:
            app.client.create("Rack", name, labels={"grp": "x"})
        deleted, seen = set(), []
        url = "/racks?limit=7" + (f"&labelSelector={urllib.parse.quote(selector)}" if selector else "")
        step = 0
        while True:
            status, headers, items = call(app, "GET", url)
            assert status == 200, items
            seen += [o["metadata"]["name"] for o in items]
            if "link" not in headers:
                break
            url = re.fullmatch(r'<([^>]+)>; rel="next"', headers["link"]).group(1)
            # Writes between pages: new names before, at and after the cursor; deletes, and
            # deletes + re-creates of names already walked and not yet walked.
            cursor = seen[-1]
            for name in (f"new-{step}", f"obj-{step:02d}-late", f"zzz-{step}", f"obj-{(step * 11) % 60:02d}x",
                         cursor + "a"):
                app.client.create("Rack", name, labels={"grp": "x"})
            for victim in (f"obj-{(step * 7 + 3) % 60:02d}", f"obj-{(59 - step * 5) % 60:02d}"):
                if victim not in deleted:
                    app.client.delete("Rack", victim)
                    app.client.create("Rack", victim, labels={"grp": "x"})
                    deleted.add(victim)
            app.client.patch("Rack", initial[(step * 13) % 60], {"touched": step})      # an update moves nothing
            step += 1
            assert step < 60, "paging did not end"
        assert step >= 8
        assert len(seen) == len(set(seen)), sorted(n for n in seen if seen.count(n) > 1)
        assert seen == sorted(seen)
        stable = set(initial) - deleted
        assert stable <= set(seen), sorted(stable - set(seen))
        assert len(deleted) >= 8 and len(stable) >= 30


###############################################################################
# Spec history (SPEC §6.9) ####################################################
###############################################################################

SNAPSHOT_KEYS = {"versionId", "createdAt", "uid", "name", "labels", "annotations", "spec"}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def with_history(app):
    app.register("Rack", history=True)
    app.register("Pod", history=3)
    app.register("Box")


def version_ids(app, path="/racks/r1"):
    status, _, body = call(app, "GET", path + "/versions")
    assert status == 200, body
    return [v["versionId"] for v in body]


class TestHistory:

    def test_snapshot_on_create_and_on_every_spec_write_only(self, make_app):
        app = make_app(with_history)
        status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "r1", "labels": {"env": "dev"},
                                                                   "annotations": {"note": "n"}},
                                                      "spec": {"size": 1}})
        assert status == 201
        uid = obj["metadata"]["uid"]
        assert obj["status"] == {"version": "1"}
        _, _, versions = call(app, "GET", "/racks/r1/versions")
        assert len(versions) == 1
        snap = versions[0]
        assert set(snap) == SNAPSHOT_KEYS
        assert snap["versionId"] == "1" and snap["uid"] == uid and snap["name"] == "r1"
        assert snap["labels"] == {"env": "dev"} and snap["annotations"] == {"note": "n"}
        assert snap["spec"] == {"size": 1} and RFC3339.fullmatch(snap["createdAt"])

        spec_writes = [
            ("PUT", "/racks/r1", {"name": "r1", "size": 2}, "application/json", {"size": 2}),
            ("PUT", "/racks/r1", {"metadata": {"name": "r1", "labels": {"env": "prod"}}, "spec": {"size": 3}},
             "application/json", {"size": 3}),
            ("PATCH", "/racks/r1", {"extra": "e"}, MERGE, {"size": 3, "extra": "e"}),
            ("PATCH", "/racks/r1", [{"op": "replace", "path": "/size", "value": 4}], JSONP, {"size": 4, "extra": "e"}),
            ("PATCH", "/racks/r1", {"extra": None, "deep.x": 1}, SHORT, {"size": 4, "deep": {"x": 1}}),
        ]
        for gen, (method, path, body, ctype, spec) in enumerate(spec_writes, start=2):
            status, _, obj = call(app, method, path, body, ctype=ctype)
            assert status == 200, obj
            assert obj["spec"] == spec and obj["metadata"]["generation"] == gen
            assert obj["status"]["version"] == str(gen)
            assert version_ids(app) == [str(g) for g in range(1, gen + 1)]
            snap = call(app, "GET", f"/racks/r1/versions/{gen}")[2]
            assert set(snap) == SNAPSHOT_KEYS and snap["versionId"] == str(gen) and snap["spec"] == spec
            assert snap["labels"] == obj["metadata"]["labels"]
        # Not snapshotted: status writes, no-op writes, label/annotation-only writes.
        no_snapshot = [
            ("PUT", "/racks/r1/status", {"phase": "Ready"}, "application/json"),
            ("PATCH", "/racks/r1/status", {"phase": "Done", "version": None}, MERGE),
            ("PATCH", "/racks/r1/status", [{"op": "add", "path": "/n", "value": 1}], JSONP),
            ("PATCH", "/racks/r1/status", {"m.k": 1}, SHORT),
            ("PUT", "/racks/r1", {"name": "r1", "size": 4, "deep": {"x": 1}}, "application/json"),
            ("PATCH", "/racks/r1", {"size": 4}, MERGE),
            ("PATCH", "/racks/r1", [], JSONP),
            ("PATCH", "/racks/r1", {"nope": None}, SHORT),
            ("PUT", "/racks/r1", {"name": "r1", "labels": {"more": "x"}, "size": 4, "deep": {"x": 1}},
             "application/json"),
        ]
        for method, path, body, ctype in no_snapshot:
            status, _, obj = call(app, method, path, body, ctype=ctype)
            assert status == 200, obj
            assert obj["metadata"]["generation"] == 6, (method, path, body)
            assert obj["status"]["version"] == "6", (method, path, body, obj["status"])
            assert version_ids(app) == ["1", "2", "3", "4", "5", "6"], (method, path, body)
        assert obj["status"] == {"phase": "Done", "n": 1, "m": {"k": 1}, "version": "6"}
        assert obj["metadata"]["labels"] == {"env": "prod", "more": "x"}
        # Client writes snapshot alike.
        obj = app.client.patch("Rack", "r1", {"size": 7})
        assert obj.generation == 7 and obj.status["version"] == "7"
        obj = app.client.update_status("Rack", "r1", {"phase": "Again"})
        assert obj.status == {"phase": "Again", "version": "7"}
        obj = app.client.patch_status("Rack", "r1", {"version": "99"})
        assert obj.status["version"] == "7"
        assert [v["versionId"] for v in app.client.versions("Rack", "r1")] == [str(g) for g in range(1, 8)]

    def test_get_delete_and_missing_versions(self, make_app):
        app = make_app(with_history)
        new_rack(app, spec={"v": 1})
        for v in (2, 3):
            call(app, "PATCH", "/racks/r1", {"v": v}, ctype=MERGE)
        _, _, versions = call(app, "GET", "/racks/r1/versions")
        assert [s["spec"] for s in versions] == [{"v": 1}, {"v": 2}, {"v": 3}]
        uid = versions[0]["uid"]
        for ref in ("r1", uid):
            assert call(app, "GET", f"/racks/{ref}/versions/2")[2] == versions[1]
        status, _, body = call(app, "DELETE", "/racks/r1/versions/2")
        assert status == 200 and body == {"message": "version deleted", "uid": "2"}
        assert version_ids(app) == ["1", "3"]
        for method in ("GET", "DELETE"):
            status, _, body = call(app, method, "/racks/r1/versions/2")
            assert_error(status, body, 404)
        status, _, body = call(app, "POST", "/racks/r1/versions/2/restore")
        assert_error(status, body, 404)
        for vid in ("99", "0", "abc", "-1"):
            assert_error(*call(app, "GET", f"/racks/r1/versions/{vid}")[::2], 404)
        for path in ("/racks/nope/versions", "/racks/nope/versions/1", "/racks/nope/versions/1/restore"):
            method = "POST" if path.endswith("restore") else "GET"
            assert_error(*call(app, method, path)[::2], 404)
        # Deleting a version leaves the object alone.
        obj = call(app, "GET", "/racks/r1")[2]
        assert obj["spec"] == {"v": 3} and obj["status"]["version"] == "3"
        # Client methods.
        assert app.client.get_version("Rack", "r1", "3")["spec"] == {"v": 3}
        assert app.client.get_version("Rack", "r1", 1)["spec"] == {"v": 1}
        app.client.delete_version("Rack", "r1", "1")
        with pytest.raises(fabrica.NotFoundError):
            app.client.get_version("Rack", "r1", "1")
        with pytest.raises(fabrica.NotFoundError):
            app.client.delete_version("Rack", "r1", "1")
        assert [v["versionId"] for v in app.client.versions("Rack", uid)] == ["3"]

    def test_restore(self, make_app):
        app = make_app(with_history)
        new_rack(app, spec={"v": 1, "keep": True})
        call(app, "PUT", "/racks/r1", {"metadata": {"name": "r1"}, "spec": {"v": 2}})
        call(app, "PUT", "/racks/r1/status", {"phase": "Ready"})
        before = call(app, "GET", "/racks/r1")[2]
        status, headers, obj = call(app, "POST", "/racks/r1/versions/1/restore")
        assert status == 200, obj
        assert obj["spec"] == {"v": 1, "keep": True}
        assert obj["metadata"]["generation"] == 3 and obj["status"] == {"phase": "Ready", "version": "3"}
        assert int(obj["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
        assert headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        assert call(app, "GET", "/racks/r1")[2] == obj
        _, _, versions = call(app, "GET", "/racks/r1/versions")
        assert [v["versionId"] for v in versions] == ["1", "2", "3"]
        assert versions[2]["spec"] == versions[0]["spec"]
        # Restoring the current spec is a no-op write.
        status, _, same = call(app, "POST", "/racks/r1/versions/3/restore")
        assert status == 200 and same == obj and version_ids(app) == ["1", "2", "3"]
        # The client restores alike; If-Match guards it over REST.
        assert app.client.restore_version("Rack", "r1", "2").spec == {"v": 2}
        status, _, body = call(app, "POST", "/racks/r1/versions/1/restore", headers={"If-Match": '"1"'})
        assert_error(status, body, 412)
        assert version_ids(app) == ["1", "2", "3", "4"]

    def test_restore_of_a_spec_the_current_schema_refuses_is_422(self, tmp_path):
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", history=True)
        with app:
            app.client.create("Rack", "r1", spec={"size": 100, "old": True})
            app.client.update({**app.client.get("Rack", "r1"), "spec": {"size": 5}})
        strict = {"type": "object", "properties": {"size": {"type": "integer", "maximum": 10}},
                  "additionalProperties": False}
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", spec=strict, history=True)
        with app:
            before = call(app, "GET", "/racks/r1")[2]
            status, _, body = call(app, "POST", "/racks/r1/versions/1/restore")
            assert_error(status, body, 422)
            assert fields_of(body["details"]) == ["spec.old", "spec.size"]
            with pytest.raises(fabrica.ValidationError):
                app.client.restore_version("Rack", "r1", "1")
            assert call(app, "GET", "/racks/r1")[2] == before
            assert version_ids(app) == ["1", "2"]

    def test_restore_runs_the_validate_function(self, tmp_path):
        def no_big(obj):
            if obj.spec.get("size", 0) > 10:
                raise fabrica.ValidationError("too big", [{"field": "spec.size", "message": "too big"}])
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", history=True)
        with app:
            app.client.create("Rack", "r1", spec={"size": 100})
            app.client.patch("Rack", "r1", {"size": 5})
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", history=True, validate=no_big)
        with app:
            status, _, body = call(app, "POST", "/racks/r1/versions/1/restore")
            assert_error(status, body, 422)
            assert body["details"] == [{"field": "spec.size", "message": "too big"}]
            assert call(app, "GET", "/racks/r1")[2]["spec"] == {"size": 5}

    def test_retention_keeps_the_newest_n(self, make_app):
        app = make_app(with_history)
        new_rack(app, spec={"v": 1}, path="/pods")
        assert version_ids(app, "/pods/r1") == ["1"]
        for v in range(2, 8):
            call(app, "PATCH", "/pods/r1", {"v": v}, ctype=MERGE)
            assert version_ids(app, "/pods/r1") == [str(g) for g in range(max(1, v - 2), v + 1)], v
        _, _, versions = call(app, "GET", "/pods/r1/versions")
        assert [s["spec"] for s in versions] == [{"v": 5}, {"v": 6}, {"v": 7}]
        assert call(app, "GET", "/pods/r1")[2]["status"]["version"] == "7"

    def test_retention_never_keeps_more_than_n(self, make_app, tmp_path):
        app = make_app(with_history)
        obj = new_rack(app, spec={"v": 1}, path="/pods")
        for v in range(2, 12):
            call(app, "PATCH", "/pods/r1", {"v": v}, ctype=MERGE)
            ids = version_ids(app, "/pods/r1")
            assert 1 <= len(ids) <= 3 and ids[-1] == str(v)
        directory = tmp_path / "data" / ".fabrica" / "history" / "pods" / obj["metadata"]["uid"]
        assert 1 <= len(os.listdir(directory)) <= 3
        assert call(app, "GET", "/pods/r1/versions/1")[0] == 404

    def test_kind_without_history_has_no_versions(self, make_app):
        app = make_app(with_history)
        new_rack(app, spec={"v": 1}, path="/boxes")
        call(app, "PATCH", "/boxes/r1", {"v": 2}, ctype=MERGE)
        for method, path in (("GET", "/boxes/r1/versions"), ("GET", "/boxes/r1/versions/1"),
                             ("DELETE", "/boxes/r1/versions/1"), ("POST", "/boxes/r1/versions/1/restore")):
            assert_error(*call(app, method, path)[::2], 404)
        obj = call(app, "GET", "/boxes/r1")[2]
        assert obj["status"] == {} and obj["spec"] == {"v": 2}
        with pytest.raises(fabrica.NotFoundError):
            app.client.versions("Box", "r1")
        with pytest.raises(fabrica.NotFoundError):
            app.client.restore_version("Box", "r1", "1")

    def test_history_survives_a_restart_lives_in_the_data_dir_and_goes_with_the_object(self, tmp_path):
        data = tmp_path / "data"
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        with_history(app)
        with app:
            uid = new_rack(app, spec={"v": 1})["metadata"]["uid"]
            call(app, "PATCH", "/racks/r1", {"v": 2}, ctype=MERGE)
            call(app, "PUT", "/racks/r1/status", {"phase": "Ready"})
            before = call(app, "GET", "/racks/r1/versions")[2]
        directory = data / ".fabrica" / "history" / "racks" / uid
        assert sorted(os.listdir(directory)) == ["1.json", "2.json"]
        with open(directory / "2.json") as f:
            assert json.load(f) == before[1]
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        with_history(app)
        with app:
            assert call(app, "GET", "/racks/r1/versions")[2] == before
            obj = call(app, "GET", "/racks/r1")[2]
            assert obj["status"] == {"phase": "Ready", "version": "2"}
            _, _, obj = call(app, "POST", "/racks/r1/versions/1/restore")
            assert obj["spec"] == {"v": 1} and obj["status"]["version"] == "3"
            assert sorted(os.listdir(directory)) == ["1.json", "2.json", "3.json"]
            # Deleting the object deletes its history, on disk too.
            status, _, body = call(app, "DELETE", "/racks/r1")
            assert status == 200, body
            assert not os.path.isdir(directory) or os.listdir(directory) == []
            assert call(app, "GET", "/racks/r1/versions")[0] == 404
            # A new object with the same name starts a history of its own.
            uid2 = new_rack(app, spec={"v": 9})["metadata"]["uid"]
            assert uid2 != uid
            _, _, versions = call(app, "GET", "/racks/r1/versions")
            assert [(v["versionId"], v["uid"], v["spec"]) for v in versions] == [("1", uid2, {"v": 9})]
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        with_history(app)
        with app:
            assert version_ids(app) == ["1"]
            assert app.store.versions("Rack", uid) == []
        # Nothing about history was written outside the data dir.
        for root, _, files in os.walk(data):
            assert root.startswith(str(data))


###############################################################################
# Merge patch round trip through the API (property) ###########################
###############################################################################

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)
_numbers = st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1) | st.floats(allow_nan=False, allow_infinity=False)


def _json_values(scalars):
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                        max_leaves=10)


_specs_with_bools = st.dictionaries(_text, _json_values(st.booleans() | _numbers | _text), max_size=5)
_specs = st.dictionaries(_text, _json_values(_numbers | _text), max_size=5)


def _round_trip(a, b):
    with tempfile.TemporaryDirectory() as data:
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack")
        with app:
            status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "r1"}, "spec": a})
            assert status == 201, obj
            assert canon(obj["spec"]) == canon(a)
            patch = fabrica.merge_patch_diff(a, b)
            status, _, obj = call(app, "PATCH", "/racks/r1", patch, ctype=MERGE)
            assert status == 200, obj
            assert canon(obj["spec"]) == canon(b), (a, b, patch, obj["spec"])
            assert canon(call(app, "GET", "/racks/r1")[2]["spec"]) == canon(b)
            changed = canon(a) != canon(b)
            assert obj["metadata"]["generation"] == (2 if changed else 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_specs, b=_specs)
def test_merge_patch_diff_applied_over_http_yields_b(a, b):
    _round_trip(a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(a={"x": True}, b={"x": 1})
@given(a=_specs_with_bools, b=_specs_with_bools)
def test_merge_patch_diff_applied_over_http_yields_b_with_booleans(a, b):
    _round_trip(a, b)


###############################################################################
# Bounds: object size, event ring, caches and metric labels (SPEC §4, §6.4, §6.7)
###############################################################################

@pytest.fixture
def bounded_app(tmp_path):
    """bounded_app(register, **options) -> a started Fabrica built with ``options`` (max_body, ring_bytes...)."""
    apps = []

    def make(register, **options):
        options.setdefault("data_dir", str(tmp_path / f"data{len(apps)}"))
        options.setdefault("durable", False)
        app = fabrica.Fabrica(**options)
        register(app)
        app.start()
        apps.append(app)
        return app
    yield make
    for app in reversed(apps):
        app.stop()


def _unchanged(app, path, before):
    """The object at ``path`` is exactly ``before`` (same resourceVersion, same JSON)."""
    status, headers, now = call(app, "GET", path)
    assert status == 200 and now == before and headers["etag"] == f'"{before["metadata"]["resourceVersion"]}"'


def _copy_amplifier(copies):
    """A JSON Patch of ~50 bytes per op that doubles /a with every copy (CVE-2019-1002100)."""
    return [{"op": "add", "path": "/a", "value": [1]}] + [{"op": "copy", "from": "/a", "path": "/a/-"}] * copies


class TestObjectSizeLimit:
    LIMIT = 8192

    def test_copy_amplifying_json_patch_is_refused_before_it_grows(self, bounded_app):
        app = bounded_app(plain, max_body=self.LIMIT)
        before = new_rack(app)
        published = app.bus.published
        ops = _copy_amplifier(16)           # 16 doublings: about 256 KiB from an 800-byte body
        assert len(json.dumps(ops)) < 1000
        status, _, body = call(app, "PATCH", "/racks/r1", ops, ctype=JSONP)
        assert_error(status, body, 413)
        # the refusal names the first op whose result passes the limit: the document never got larger
        sizes, doc = [], {}
        for op in ops:
            doc = fabrica.apply_json_patch(doc, [op])
            sizes.append(fabrica.json_size(doc))
        first_over = next(i for i, size in enumerate(sizes) if size > self.LIMIT)
        assert body["details"] == [{"field": f"patch[{first_over}]", "message": body["details"][0]["message"]}]
        _unchanged(app, "/racks/r1", before)
        assert app.bus.published == published
        with pytest.raises(fabrica.PayloadTooLargeError):
            app.client.patch("Rack", "r1", ops, type="json")
        with pytest.raises(fabrica.PatchError) as caught:   # the pure function: a PatchError, status 413
            fabrica.apply_json_patch({}, _copy_amplifier(40), max_size=1 << 20)
        assert caught.value.status == 413
        # copies that only churn (copy, then remove) are bounded too: their copied bytes add up
        churn = [{"op": "add", "path": "/big", "value": "x" * 3000}] + [
            {"op": "copy", "from": "/big", "path": "/tmp"}, {"op": "remove", "path": "/tmp"}] * 3
        status, _, body = call(app, "PATCH", "/racks/r1", churn, ctype=JSONP)
        assert_error(status, body, 413)
        # a patch that stays under the limit still applies, and keeps its exact meaning
        status, _, obj = call(app, "PATCH", "/racks/r1", _copy_amplifier(4), ctype=JSONP)
        assert status == 200, obj
        assert obj["spec"]["a"] == fabrica.apply_json_patch({}, _copy_amplifier(4))["a"]

    def test_every_write_path_keeps_the_object_limit(self, bounded_app):
        pad = {"type": "string", "default": "x" * 200}
        schema = {"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"pad": pad}}},
            "a": {}, "b": {}}}

        def register(app):
            app.register("Rack")
            app.register("Shelf", spec=schema)
        app = bounded_app(register, max_body=self.LIMIT)
        before = new_rack(app, spec={"a": "y" * 5000})
        published = app.bus.published
        big = "z" * 4000             # each body is under the limit; what it makes is over it
        writes = [
            ("PATCH", "/racks/r1", {"b": big}, MERGE),
            ("PATCH", "/racks/r1", {"b.c": big}, SHORT),
            ("PATCH", "/racks/r1", [{"op": "add", "path": "/b", "value": big}], JSONP),
            ("PUT", "/racks/r1", {"a": "y" * (self.LIMIT - 150)}, "application/json"),
            ("PUT", "/racks/r1/status", {"note": big}, "application/json"),
            ("PATCH", "/racks/r1/status", {"note": big}, MERGE),
        ]
        for method, path, body, ctype in writes:
            assert len(json.dumps(body)) < self.LIMIT
            status, _, err = call(app, method, path, body, ctype=ctype)
            assert_error(status, err, 413)
            _unchanged(app, "/racks/r1", before)
        # a create whose object (body plus metadata) passes the limit stores nothing
        status, _, err = call(app, "POST", "/racks", {"name": "r2", "a": "y" * (self.LIMIT - 100)})
        assert_error(status, err, 413)
        # defaults the schema fills in: 60 empty items of a 200-byte default each
        status, _, err = call(app, "POST", "/shelfs", {"name": "s1", "items": [{}] * 60})
        assert_error(status, err, 413)
        # app.client takes the same path
        with pytest.raises(fabrica.PayloadTooLargeError):
            app.client.create("Rack", "r3", spec={"a": "y" * 2 * self.LIMIT})
        with pytest.raises(fabrica.PayloadTooLargeError):
            app.client.update_status("Rack", "r1", {"note": big})
        assert [r.name for r in app.client.list("Rack")] == ["r1"] and app.client.list("Shelf") == []
        assert app.bus.published == published
        _unchanged(app, "/racks/r1", before)

    def test_an_object_over_a_lowered_limit_can_still_shrink_and_go(self, bounded_app):
        app = bounded_app(plain, max_body=self.LIMIT)
        new_rack(app, spec={"a": "y" * 6000, "b": "short", "c": "short"})
        app.max_body = 4096
        status, _, err = call(app, "PATCH", "/racks/r1", {"d": 1}, ctype=MERGE)
        assert_error(status, err, 413)                      # growing it is refused
        status, _, obj = call(app, "PATCH", "/racks/r1", {"b": None}, ctype=MERGE)
        assert status == 200 and fabrica.json_size(obj) > 4096, obj     # shrinking it is not
        status, _, obj = call(app, "PATCH", "/racks/r1", [{"op": "remove", "path": "/c"}], ctype=JSONP)
        assert status == 200 and fabrica.json_size(obj) > 4096, obj
        status, _, obj = call(app, "DELETE", "/racks/r1")
        assert status == 200, obj


def get_text(app, path, headers=None):
    """GET a text endpoint (/metrics) in-process; its body as str."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING="")
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen = {}
    chunks = app.wsgi(environ, lambda status, response_headers, exc_info=None: seen.update(status=status))
    assert seen["status"].startswith("200"), seen
    return b"".join(chunks).decode()


def wait_for(predicate, timeout=30.0):
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = fabrica.time.monotonic() + timeout
    pause = fabrica.threading.Event()
    while not predicate() and fabrica.time.monotonic() < deadline:
        pause.wait(0.01)
    return predicate()


class TestEventRingBytes:
    def test_the_ring_is_bounded_in_bytes_and_resume_past_it_is_gone(self, bounded_app):
        assert fabrica.Fabrica().ring_bytes == fabrica.FileStore(".").feed_bytes == 64 << 20 == fabrica.RING_BYTES
        app = bounded_app(plain, ring_bytes=100_000)
        first = new_rack(app, spec={"a": "y" * 20_000})
        for n in range(20):        # 20 PUTs of one ~20 KB object: 400 KB of events
            status, _, obj = call(app, "PUT", "/racks/r1", {"a": "y" * 20_000, "n": n})
            assert status == 200, obj
        stats = app.bus.stats()
        assert 0 < stats["bufferedBytes"] <= 100_000
        assert 0 < stats["buffered"] < 10       # far below the count bound: bytes evicted them
        last = int(obj["metadata"]["resourceVersion"])
        kept = app.bus.since((last - stats["buffered"], 0))
        assert [pos for pos, _ in kept] == [(rv, 0) for rv in range(last - stats["buffered"] + 1, last + 1)]
        assert stats["bufferedBytes"] >= sum(fabrica.json_size(ev["data"]["resource"]) for _, ev in kept)
        status, _, err = call(app, "GET", f"/events?since={first['metadata']['resourceVersion']}")
        assert_error(status, err, 410)
        assert f"fabrica_event_ring_bytes {stats['bufferedBytes']}\n" in get_text(app, "/metrics")

    def test_subscriber_queues_are_bounded_in_bytes_and_share_the_events(self, bounded_app):
        assert fabrica.Controller.event_queue_bytes == fabrica.QUEUE_BYTES
        app = bounded_app(plain)
        release = fabrica.threading.Event()

        def stuck(event):
            release.wait(30)
        sub = app.subscribe("io.fabrica.rack.*", stuck, queue_bytes=50_000)
        taps = [app.bus.tap("**"), app.bus.tap("**")]
        try:
            for n in range(10):         # 10 events of ~20 KB: the queue takes 2 or 3 of them
                new_rack(app, name=f"r{n}", spec={"a": "y" * 20_000})
            assert 0 < sub.queued_bytes <= 50_000 and sub.dropped >= 7
            # the taps hold the very same event dicts: nothing is copied per subscriber; a resume
            # derives equal events from the store's change feed
            ring = [event for _, event in app.bus.since((0, 0))]
            first, second = ([event for event in iter(lambda t=tap: t.get(0), None)] for tap in taps)
            assert len(first) == len(second) == len(ring) == 10
            assert all(a is b and a == c for a, b, c in zip(first, second, ring))
        finally:
            release.set()
            for tap in taps:
                tap.close()
        assert wait_for(sub.idle)
        assert sub.gaps == 1 and sub.queued_bytes == 0


class TestBoundedCachesAndLabels:
    def test_unknown_methods_and_raw_paths_never_become_metric_labels(self, bounded_app):
        app = bounded_app(plain, token="s3cret")
        auth = {"Authorization": "Bearer s3cret"}
        for name in ("r1", "r2"):
            assert call(app, "POST", "/racks", {"name": name}, auth)[0] == 201
            assert call(app, "GET", f"/racks/{name}", headers=auth)[0] == 200
        assert call(app, "BREW0", "/racks")[0] == 401       # unauthenticated, as in the report
        get_text(app, "/metrics", auth)             # so that /metrics itself has its labels
        before = get_text(app, "/metrics", auth)
        for n in range(1, 300):
            assert call(app, f"BREW{n}", f"/racks/x{n}")[0] == 401
        after = get_text(app, "/metrics", auth)
        def label_sets(text):
            return [re.sub(r" \S+$", "", line) for line in text.splitlines()]
        assert label_sets(after) == label_sets(before)     # only sample values moved
        assert 'route="unmatched",method="other",code="401"} 300\n' in after
        assert 'route="/racks/<ref>",method="GET",code="200"} 2\n' in after
        assert "BREW" not in after and "/racks/x" not in after and "/racks/r1" not in after

    def test_condition_types_are_not_remembered_forever(self, bounded_app):
        app = bounded_app(plain)
        got = []
        sub = app.subscribe("io.fabrica.condition.*", got.append)
        new_rack(app)
        conditions = [{"type": f"Custom{n}", "status": "True"} for n in range(600)]
        app.client.update_status("Rack", "r1", {"conditions": conditions})
        assert wait_for(lambda: len(got) == 600)    # every distinct type still matched...
        assert len(sub._matches) <= 256             # ...but only a bounded number of verdicts is kept

    def test_owner_and_fsync_bookkeeping_leave_nothing_behind(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"))     # durable: directory fsyncs run
        app.register("Rack", history=True)
        app.register("Chassis")
        with app:
            for n in range(20):
                owner = app.client.create("Rack", f"r{n}")
                app.client.create("Chassis", f"c{n}", owner=owner)
                assert app.client.delete("Rack", owner.uid) is None       # and its chassis with it
            assert app.client.list("Chassis") == []
            assert app.store._owned == {}
            assert app.store._dirsync._dirs == {}

    def test_an_open_server_makes_a_bounded_number_of_kinds(self, bounded_app, monkeypatch):
        app = bounded_app(lambda app: None, open=True)
        status, _, err = call(app, "POST", "/widgets", {"name": "Not A Name"})
        assert_error(status, err, 422)
        assert call(app, "GET", "/apis")[2]["kinds"] == []     # a body that could not be stored made no kind
        monkeypatch.setattr(fabrica, "OPEN_KINDS", 3)
        for plural in ("widgets", "gadgets", "gizmos"):
            assert call(app, "POST", f"/{plural}", {"name": "one"})[0] == 201
        status, _, err = call(app, "POST", "/doodads", {"name": "one"})
        assert_error(status, err, 422)
        assert [k["plural"] for k in call(app, "GET", "/apis")[2]["kinds"]] == ["widgets", "gadgets", "gizmos"]

    def test_the_get_body_cache_is_bounded_in_bytes(self, bounded_app, monkeypatch):
        monkeypatch.setattr(fabrica, "_BODY_CACHE_BYTES", 50_000)
        app = bounded_app(plain)
        for n in range(6):
            new_rack(app, name=f"r{n}", spec={"a": "y" * 20_000})
            assert call(app, "GET", f"/racks/r{n}")[0] == 200
            cached = app.rest._bodies
            assert sum(len(body) for _, body in cached.values()) == app.rest._bodies_bytes <= 50_000
            assert 1 <= len(cached) <= 2
