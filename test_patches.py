"""fabrica.py tests, Patches and Label selectors sections: merge/JSON/shorthand patches and selectors.

The official JSON Patch suite runs when ../shared/conformance/json-patch (or $FABRICA_JSON_PATCH_SUITE) exists.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fabrica


def canon(value):
    """JSON value -> comparable form: true != 1, 1 == 1.0, member order ignored."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, list):
        return ("array", [canon(v) for v in value])
    if isinstance(value, dict):
        return ("object", {k: canon(v) for k, v in value.items()})
    return (type(value).__name__, value)


def json_eq(a, b) -> bool:
    return canon(a) == canon(b)


def snapshot(value) -> str:
    """Exact serialisation (member order and int/float kept) to detect mutation."""
    return json.dumps(value)


def test_canon_distinguishes_bool_from_number():
    assert json_eq(1, 1.0) and json_eq({"a": [1]}, {"a": [1.0]})
    assert not json_eq(1, True) and not json_eq([0], [False]) and not json_eq("1", 1)


###############################################################################
# Merge patch (RFC 7386) ######################################################
###############################################################################

RFC7386_EXAMPLES = [  # RFC 7386, Appendix A
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize("doc, patch, expected", RFC7386_EXAMPLES)
def test_merge_patch_rfc_examples(doc, patch, expected):
    before = snapshot((doc, patch))
    assert json_eq(fabrica.apply_merge_patch(doc, patch), expected)
    assert snapshot((doc, patch)) == before


def test_merge_patch_result_shares_nothing_with_inputs():
    doc = {"keep": {"x": [1]}, "b": 1}
    patch = {"new": {"y": [2]}, "list": [None, {"z": None}]}
    result = fabrica.apply_merge_patch(doc, patch)
    assert result["list"] == [None, {"z": None}]  # nulls inside arrays are values
    result["keep"]["x"].append(9)
    result["new"]["y"].append(9)
    assert doc == {"keep": {"x": [1]}, "b": 1}
    assert patch == {"new": {"y": [2]}, "list": [None, {"z": None}]}


def test_merge_patch_diff_examples():
    a = {"keep": 1, "gone": 2, "nested": {"x": 1, "y": 2}, "flag": 1, "list": [1, 2]}
    b = {"keep": 1, "nested": {"x": 1, "y": 3}, "flag": True, "list": [1], "new": {"z": 1}}
    assert fabrica.merge_patch_diff(a, b) == {
        "gone": None, "nested": {"y": 3}, "flag": True, "list": [1], "new": {"z": 1}}
    assert fabrica.merge_patch_diff(a, a) == {}
    assert fabrica.merge_patch_diff({"n": 1}, {"n": 1.0}) == {}  # same JSON number


def test_merge_patch_diff_cannot_express_null_values():
    patch = fabrica.merge_patch_diff({"a": 1}, {"a": None})
    assert fabrica.apply_merge_patch({"a": 1}, patch) == {}  # documented limitation


json_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
json_keys = st.one_of(st.sampled_from(["a", "b", "c", "d"]), st.text(max_size=3))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(a=json_objects, b=json_objects)
def test_merge_patch_diff_round_trips(a, b):
    before = snapshot((a, b))
    patch = fabrica.merge_patch_diff(a, b)
    assert json_eq(fabrica.apply_merge_patch(a, patch), b)
    assert snapshot((a, b)) == before


@settings(max_examples=100, deadline=None)
@given(a=json_objects)
def test_merge_patch_diff_of_related_documents_round_trips(a):
    # Independent documents rarely share nested structure; derive b from a.
    b = copy.deepcopy(a)
    b.pop(next(iter(b), None), None)
    b.setdefault("d", {})
    if isinstance(b["d"], dict):
        b["d"]["x"] = [True, 0]
    patch = fabrica.merge_patch_diff(a, b)
    assert json_eq(fabrica.apply_merge_patch(a, patch), b)


###############################################################################
# JSON Patch (RFC 6902) conformance suite #####################################
###############################################################################


def _suite_dir() -> Path | None:
    default = Path(__file__).parent.parent / "shared/conformance/json-patch"
    if default.is_dir():
        return default
    override = os.environ.get("FABRICA_JSON_PATCH_SUITE")
    if override and Path(override).is_dir():
        return Path(override)
    return None


def _suite_cases():
    folder = _suite_dir()
    if folder is None:
        reason = ("JSON Patch suite not found: expected ../shared/conformance/json-patch "
                  "or $FABRICA_JSON_PATCH_SUITE")
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="suite-absent")]
    cases = []
    for name in ("tests.json", "spec_tests.json"):
        for index, case in enumerate(json.loads((folder / name).read_text())):
            if case.get("disabled") or "patch" not in case:
                continue
            label = f"{name}:{index}:{case.get('comment', '')[:40]}"
            cases.append(pytest.param(case, id=label))
    return cases


SUITE_CASES = _suite_cases()


@pytest.mark.parametrize("case", SUITE_CASES)
def test_json_patch_conformance(case):
    doc_before, patch_before = snapshot(case["doc"]), snapshot(case["patch"])
    if "error" in case:
        with pytest.raises(fabrica.PatchError):
            fabrica.apply_json_patch(case["doc"], case["patch"])
    else:
        result = fabrica.apply_json_patch(case["doc"], case["patch"])
        if "expected" in case:
            assert json_eq(result, case["expected"]), case.get("comment")
    assert snapshot(case["doc"]) == doc_before, "input document was mutated"
    assert snapshot(case["patch"]) == patch_before, "patch was mutated"


def test_conformance_suite_was_loaded():
    if _suite_dir() is None:
        pytest.skip("JSON Patch suite not found")
    # Both files, every enabled record: 92 from tests.json + 16 from spec_tests.json
    # at the pinned commit. A lower count means the loader lost cases.
    assert len(SUITE_CASES) >= 108
    print(f"JSON Patch conformance cases run: {len(SUITE_CASES)}")


###############################################################################
# JSON Patch: messages, purity and edge cases #################################
###############################################################################


def patch_error(doc, ops) -> fabrica.PatchError:
    with pytest.raises(fabrica.PatchError) as info:
        fabrica.apply_json_patch(doc, ops)
    assert info.value.status == 422
    return info.value


def test_error_names_op_index_and_path():
    ops = [{"op": "test", "path": "/a", "value": {}},
           {"op": "add", "path": "/x", "value": 1},
           {"op": "remove", "path": "/a/b"}]
    error = patch_error({"a": {}}, ops)
    assert error.message == "op 2 (remove): path '/a/b' does not exist"
    assert error.details == [{"field": "patch[2]", "message": "path '/a/b' does not exist"}]


def test_error_names_the_first_missing_parent():
    error = patch_error({}, [{"op": "add", "path": "/a/b", "value": 1}])
    assert error.message == "op 0 (add): path '/a' does not exist"


@pytest.mark.parametrize("ops, fragment", [
    ({"op": "add"}, "must be an array"),
    ([["add", "/a"]], "op 0: an operation must be an object"),
    ([{"path": "/a", "value": 1}], "'op' must be one of"),
    ([{"op": 1, "path": "/a"}], "'op' must be one of"),
    ([{"op": "add", "value": 1}], "missing 'path'"),
    ([{"op": "add", "path": 1, "value": 1}], "'path' must be a string, not a number"),
    ([{"op": "add", "path": ["a"], "value": 1}], "'path' must be a string, not an array"),
    ([{"op": "copy", "path": "/b", "from": 1}], "'from' must be a string"),
    ([{"op": "move", "path": "/b"}], "missing 'from'"),
    ([{"op": "add", "path": "/~2", "value": 1}], "'~' not followed"),
    ([{"op": "add", "path": "/a~", "value": 1}], "'~' not followed"),
    ([{"op": "replace", "path": "a", "value": 1}], "must be empty or start with '/'"),
    ([{"op": "remove", "path": ""}], "whole document"),
    ([{"op": "move", "from": "/a", "path": "/a/b"}], "into its own child"),
    ([{"op": "move", "from": "", "path": "/a"}], "into its own child"),
    ([{"op": "add", "path": "/a/b", "value": 1}], "parent is a number"),
    ([{"op": "test", "path": "/a", "value": True}], "test failed: '/a' is 1, not true"),
])
def test_malformed_or_failing_operations(ops, fragment):
    assert fragment in patch_error({"a": 1}, ops).message


@pytest.mark.parametrize("op", [
    {"op": "remove", "path": "/l/-"},
    {"op": "replace", "path": "/l/-", "value": 0},
    {"op": "test", "path": "/l/-", "value": 0},
    {"op": "replace", "path": "/l/2", "value": 0},
    {"op": "add", "path": "/l/3", "value": 0},
    {"op": "add", "path": "/l/01", "value": 0},
    {"op": "add", "path": "/l/+1", "value": 0},
    {"op": "add", "path": "/l/ 1", "value": 0},
    {"op": "add", "path": "/l/\u0661", "value": 0},  # ARABIC-INDIC DIGIT ONE
    {"op": "copy", "from": "/l/2", "path": "/x"},
])
def test_array_index_rules(op):
    patch_error({"l": [1, 2]}, [op])


def test_array_index_rules_accept_valid_forms():
    doc = {"l": [1, 2], "o": {}}
    result = fabrica.apply_json_patch(doc, [
        {"op": "add", "path": "/l/2", "value": 3},       # index == len appends
        {"op": "add", "path": "/l/-", "value": 4},
        {"op": "add", "path": "/l/0", "value": 0},
        {"op": "add", "path": "/o/-", "value": "dash"},  # "-" is a plain key in objects
        {"op": "add", "path": "/o/01", "value": "zero-one"},
    ])
    assert result == {"l": [0, 1, 2, 3, 4], "o": {"-": "dash", "01": "zero-one"}}


def test_test_op_uses_json_equality():
    doc = {"i": 1, "f": 1.0, "t": True, "l": [1, {"a": False}]}
    ok = [{"op": "test", "path": "/i", "value": 1.0},
          {"op": "test", "path": "/f", "value": 1},
          {"op": "test", "path": "/t", "value": True},
          {"op": "test", "path": "/l", "value": [1.0, {"a": False}]}]
    assert fabrica.apply_json_patch(doc, ok) == doc
    for path, value in [("/i", True), ("/t", 1), ("/l", [True, {"a": 0}]), ("/i", "1"),
                        ("/l", [1]), ("/f", None)]:
        patch_error(doc, [{"op": "test", "path": path, "value": value}])


def test_move_and_copy():
    doc = {"a": {"b": [1, 2]}, "ab": 0}
    assert fabrica.apply_json_patch(doc, [{"op": "move", "from": "/a", "path": "/ab"}]) == \
        {"ab": {"b": [1, 2]}}  # "/ab" shares a string prefix, not a token prefix
    assert fabrica.apply_json_patch(doc, [{"op": "move", "from": "/a/b", "path": ""}]) == [1, 2]
    assert fabrica.apply_json_patch(doc, [{"op": "move", "from": "", "path": ""}]) == doc
    patch_error(doc, [{"op": "move", "from": "/zz", "path": "/zz"}])
    result = fabrica.apply_json_patch(doc, [{"op": "copy", "from": "/a", "path": "/c"}])
    result["c"]["b"].append(3)
    assert result["a"] == {"b": [1, 2]}


def test_json_patch_is_pure_and_does_not_alias_patch_values():
    doc = {"spec": {"x": 1}}
    ops = [{"op": "add", "path": "/new", "value": {}},
           {"op": "add", "path": "/new/inner", "value": [1]},
           {"op": "add", "path": "/new/inner/-", "value": 2},
           {"op": "replace", "path": "/spec", "value": {"y": []}},
           {"op": "add", "path": "/spec/y/0", "value": "z"}]
    before = snapshot((doc, ops))
    result = fabrica.apply_json_patch(doc, ops)
    assert result == {"spec": {"y": ["z"]}, "new": {"inner": [1, 2]}}
    assert snapshot((doc, ops)) == before
    assert fabrica.apply_json_patch(doc, []) is not doc


def test_json_patch_is_atomic():
    doc = {"a": 1}
    patch_error(doc, [{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/c"}])
    assert doc == {"a": 1}


def test_replace_keeps_member_order():
    result = fabrica.apply_json_patch({"a": 1, "b": 2, "c": 3},
                                      [{"op": "replace", "path": "/a", "value": 9}])
    assert list(result) == ["a", "b", "c"]


def test_resolve_pointer():
    doc = {"a/b": {"~": [10, {"": "empty"}]}, "~1": "tilde-one", "/": "slash"}
    assert fabrica.resolve_pointer(doc, "") is doc
    assert fabrica.resolve_pointer(doc, "/~01") == "tilde-one"  # ~1 unescaped before ~0
    assert fabrica.resolve_pointer(doc, "/~1") == "slash"
    assert fabrica.resolve_pointer(doc, "/a~1b/~0/1/") == "empty"
    for bad in ["/a~1b/~0/2", "/a~1b/~0/-", "/nope", "x", "/a~2b"]:
        with pytest.raises(fabrica.PatchError):
            fabrica.resolve_pointer(doc, bad)
    with pytest.raises(fabrica.PatchError):
        fabrica.resolve_pointer(doc, None)


###############################################################################
# Shorthand patch #############################################################
###############################################################################


def test_shorthand_sets_removes_and_creates():
    doc = {"a": {"b": 1, "keep": True}, "c": 2, "n": None}
    patch = {"a.b": 5, "c": None, "x.y.z": [1], "n.m": "v", "gone": None, "a.q.r": None}
    before = snapshot((doc, patch))
    result = fabrica.apply_shorthand_patch(doc, patch)
    assert result == {"a": {"b": 5, "keep": True}, "x": {"y": {"z": [1]}}, "n": {"m": "v"}}
    assert snapshot((doc, patch)) == before
    result["x"]["y"]["z"].append(2)
    assert patch["x.y.z"] == [1]


def test_shorthand_applies_keys_in_sorted_order():
    assert fabrica.apply_shorthand_patch({"a": 1}, {"a.b": 1, "a": None}) == {"a": {"b": 1}}
    with pytest.raises(fabrica.PatchError, match="'a' is a number"):
        fabrica.apply_shorthand_patch({}, {"a.b": 2, "a": 1})


def test_shorthand_remove_of_missing_path_is_not_an_error():
    doc = {"a": [1], "s": "x"}
    patch = {"a.0": None, "s.t": None, "missing.deep": None, "zz": None}
    assert fabrica.apply_shorthand_patch(doc, patch) == doc


@pytest.mark.parametrize("doc, patch, fragment", [
    ({"a": [1]}, {"a.0": 2}, "'a' is an array"),
    ({"a": {"b": "s"}}, {"a.b.c": 1}, "'a.b' is a string"),
    ({}, {"a..b": 1}, "invalid shorthand path"),
    ({}, {".a": 1}, "invalid shorthand path"),
    ({}, {"a.": None}, "invalid shorthand path"),
    ({}, {"": 1}, "invalid shorthand path"),
    ({}, [("a", 1)], "must be an object"),
    ([], {"a": 1}, "applies to an object"),
])
def test_shorthand_errors(doc, patch, fragment):
    with pytest.raises(fabrica.PatchError) as info:
        fabrica.apply_shorthand_patch(doc, patch)
    assert fragment in info.value.message


###############################################################################
# Label selectors #############################################################
###############################################################################

LABELS = {
    "web-prod": {"app": "web", "env": "prod", "tier": "frontend"},
    "web-dev": {"app": "web", "env": "dev", "canary": "true"},
    "db-prod": {"app": "db", "env": "prod", "tier": "backend", "example.com/owner": "ops"},
    "db-stage": {"app": "db", "env": "staging", "example.com/owner": "team-a"},
    "cache": {"app": "cache", "tier": "backend"},
    "blank": {"app": "", "env": "prod"},
    "keywords": {"in": "notin", "env": "dev"},
    "bare": {},
}
ALL = set(LABELS)

SELECTOR_TABLE = [
    ("", ALL),
    (" \t ", ALL),
    ("app=web", {"web-prod", "web-dev"}),
    ("app==web", {"web-prod", "web-dev"}),
    ("app!=web", ALL - {"web-prod", "web-dev"}),
    ("app", ALL - {"keywords", "bare"}),
    ("!app", {"keywords", "bare"}),
    ("app in (web,db)", {"web-prod", "web-dev", "db-prod", "db-stage"}),
    ("app notin (web,db)", {"cache", "blank", "keywords", "bare"}),
    ("env=prod,tier=backend", {"db-prod"}),
    ("env in (prod),tier", {"web-prod", "db-prod"}),
    ("  app  =  web  ,  env  !=  dev  ", {"web-prod"}),
    ("env=prod\t,\napp", {"web-prod", "db-prod", "blank"}),
    ("app=", {"blank"}),
    ("app==", {"blank"}),
    ("app!=", ALL - {"blank"}),
    ("app in ()", {"blank"}),
    ("app notin ()", ALL - {"blank"}),
    ("app in (web,,db)", {"web-prod", "web-dev", "db-prod", "db-stage", "blank"}),
    ("app in (,)", {"blank"}),
    ("app in (db,)", {"db-prod", "db-stage", "blank"}),
    ("example.com/owner", {"db-prod", "db-stage"}),
    ("example.com/owner=ops", {"db-prod"}),
    ("!example.com/owner,app=db", set()),
    ("app in (db),example.com/owner notin (ops)", {"db-stage"}),
    ("in", {"keywords"}),
    ("in=notin", {"keywords"}),
    ("in in (notin,in)", {"keywords"}),
    ("notin notin (in)", ALL),
    ("canary,!tier", {"web-dev"}),
    ("tier!=frontend,tier", {"db-prod", "cache"}),
    ("env notin (prod,dev),app", {"db-stage", "cache"}),
    ("nosuchlabel", set()),
    ("!nosuchlabel", ALL),
    ("app=web,app=db", set()),
    ("A.b_c-9=X.y_z-0", set()),
]


@pytest.mark.parametrize("text, expected", SELECTOR_TABLE,
                         ids=[text or "<empty>" for text, _ in SELECTOR_TABLE])
def test_selector_matches(text, expected):
    selector = fabrica.parse_selector(text)
    assert {name for name, labels in LABELS.items() if selector.matches(labels)} == expected


def test_selector_table_is_large_enough():
    assert len(SELECTOR_TABLE) >= 25 and len(MALFORMED_SELECTORS) >= 12


@pytest.mark.parametrize("text, _", SELECTOR_TABLE)
def test_index_candidates_never_exclude_a_match(text, _):
    selector = fabrica.parse_selector(text)
    for labels in LABELS.values():
        if selector.matches(labels):
            for key, values in selector.index_candidates():
                assert key in labels and (values is None or labels[key] in values)


def test_selector_requirements_and_index_candidates():
    selector = fabrica.parse_selector("a==b, c in (x,y), !d, e, f notin (z), g!=h, i=j")
    assert selector.requirements == [
        ("a", "=", frozenset({"b"})),
        ("c", "in", frozenset({"x", "y"})),
        ("d", "!", frozenset()),
        ("e", "exists", frozenset()),
        ("f", "notin", frozenset({"z"})),
        ("g", "!=", frozenset({"h"})),
        ("i", "=", frozenset({"j"})),
    ]
    assert selector.index_candidates() == [
        ("a", frozenset({"b"})), ("c", frozenset({"x", "y"})), ("e", None), ("i", frozenset({"j"}))]
    assert fabrica.parse_selector("!a,b!=c,d notin (e)").index_candidates() == []
    assert fabrica.parse_selector("").requirements == []


LONG_PREFIX = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters


def test_label_key_and_value_limits():
    for text in ["a" * 63, f"{LONG_PREFIX}/{'n' * 63}", "k=" + "v" * 63, "a-b.c/d_e",
                 "x.io/A_b-c.D=Z_y-x.W", "k in (" + ",".join(["v" * 63] * 3) + ")"]:
        fabrica.parse_selector(text)
    for text in ["a" * 64, f"{LONG_PREFIX}x/n", f"{LONG_PREFIX}/{'n' * 64}",
                 "k=" + "v" * 64, "k in (ok," + "v" * 64 + ")"]:
        with pytest.raises(fabrica.BadRequestError):
            fabrica.parse_selector(text)


MALFORMED_SELECTORS = [
    "=", "=b", "!", "!!a", "a!", "a b", ",a", "a,", "a,,b", "a=b,",
    "!a=b", "!a in (b)", "a=b=c", "a=(b)", "a=b c", "a!!=b", "a===b",
    "a in b", "a in (b", "a in (b c)", "a in (b))", "a in (,,)", "a in (b,,)",
    "a in (b,=)", "a notin", "a in", "a=b!", "a>1", "a<1",
    "a" * 64, "a/b/c", "/a", "Example.com/a", "-a", "a-", "a.", "a=-b", "a=b_",
    "ü=1", "a in (ü)", "c_d/e=1", "a.B/c", "a=b,(c)", "in in", "a notin (b) c",
]


@pytest.mark.parametrize("text", MALFORMED_SELECTORS)
def test_malformed_selectors_raise(text):
    with pytest.raises(fabrica.BadRequestError) as info:
        fabrica.parse_selector(text)
    assert info.value.status == 400
    assert info.value.message.startswith(f"invalid label selector '{text}': ")
    assert info.value.details and info.value.details[0]["field"] == "labelSelector"


def test_selector_error_messages_say_what_was_expected():
    cases = {
        "x!": "found '!' after 'x', expected =, ==, !=, in or notin",
        "a,": "found end of string, expected a label key",
        "a in b": "found 'b', expected '('",
        "a>1": "operator '>' is not supported",
        "a" * 64: "longer than 63 characters",
    }
    for text, reason in cases.items():
        with pytest.raises(fabrica.BadRequestError) as info:
            fabrica.parse_selector(text)
        assert reason in info.value.message, info.value.message
    with pytest.raises(fabrica.BadRequestError):
        fabrica.parse_selector(None)
