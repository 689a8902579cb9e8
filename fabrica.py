#!/usr/bin/env python3
"""Declarative resources and reconciliation in one file: REST API, crash-safe store, events, controllers.

fabrica.py gives a prototype Kubernetes-style resources (a Spec/Status split,
resourceVersion, conditions) behind a Bottle REST API, keeps them in one
pretty-printed JSON file per resource (atomic and durable writes), announces
every change as a CloudEvent on an in-process bus and runs your ``reconcile``
function in worker threads until each resource's status matches its spec.

Quick example (``examples/quickstart.py`` holds the same code)::

    import fabrica

    app = fabrica.Fabrica(data_dir="./quickstart-data")

    @app.register("Greeting")
    def reconcile(ctx, obj):
        obj.status["message"] = "Hello, " + obj.spec.get("to", "world")
        obj.set_condition("Ready", True, reason="Greeted")

    if __name__ == "__main__":
        app.serve(port=8080)

Run it with ``python quickstart.py`` or ``python fabrica.py serve quickstart.py``,
then ``python fabrica.py greeting create --spec '{"name": "hi", "to": "you"}'``.

License: MIT.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "Change",
    "Client",
    "ConfigurationError",
    "ConflictError",
    "Fabrica",
    "FabricaError",
    "FileStore",
    "GoneError",
    "LeaderElector",
    "MemoryStore",
    "NotFoundError",
    "PatchError",
    "PermanentError",
    "PreconditionFailedError",
    "Registry",
    "Resource",
    "Result",
    "SQLiteStore",
    "Schema",
    "Store",
    "TemporaryError",
    "ValidationError",
    "WorkQueue",
    "apply_json_patch",
    "apply_merge_patch",
    "apply_shorthand_patch",
    "merge_patch_diff",
    "parse_selector",
]

import argparse
import base64
import bisect
import collections
import contextlib
import copy
import dataclasses
import errno
import heapq
import itertools
import fcntl
import hmac
import importlib
import importlib.util
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
import types
import typing
import urllib.parse
import zlib
from datetime import datetime, timezone
from collections import deque
from collections.abc import Callable, Hashable
from http.server import BaseHTTPRequestHandler

import bottle

logger = logging.getLogger("fabrica")
store_log = logging.getLogger("fabrica.store")
bus_log = logging.getLogger("fabrica.bus")
ctl_log = logging.getLogger("fabrica.controller")
http_log = logging.getLogger("fabrica.http")

###############################################################################
# Errors #######################################################################
###############################################################################
#
# One FabricaError base carrying the HTTP status it maps to. The REST layer
# turns any of them into {"error", "code", "details"}; the HTTP Client turns
# such a body back into the same class, so both clients raise alike.


class FabricaError(Exception):
    """Base of every error fabrica raises on purpose; ``status`` is the HTTP code it maps to."""

    status = 500

    def __init__(self, message: str = "", details: list | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details or [])

    def to_json(self) -> dict:
        return {"error": self.message, "code": self.status, "details": self.details}


class BadRequestError(FabricaError):
    status = 400


class UnauthorizedError(FabricaError):
    status = 401


class ForbiddenError(FabricaError):
    status = 403


class NotFoundError(FabricaError):
    status = 404


class RequestTimeoutError(FabricaError):
    """The client did not send its request (head or body) in time."""

    status = 408


class ConflictError(FabricaError):
    status = 409


class StaleError(ConflictError):
    """The stored object moved on since it was read (a failed compare-and-swap)."""


class GoneError(FabricaError):
    status = 410


class PreconditionFailedError(ConflictError):
    """A stale ``If-Match`` (or ``If-None-Match: *`` on an existing object): re-read and retry."""

    status = 412


class PayloadTooLargeError(FabricaError):
    status = 413


class UnsupportedMediaTypeError(FabricaError):
    status = 415


class ValidationError(FabricaError):
    """The object, or a field of it, is invalid; ``details`` lists every failing field."""

    status = 422


class PatchError(ValidationError):
    """A patch document that cannot be applied (RFC 6902/7386 or shorthand)."""


class PatchTooLargeError(PatchError, PayloadTooLargeError):
    """A JSON Patch that would build a document past its size bound (413): refused before it grows."""

    status = 413


class InsufficientStorageError(FabricaError):
    status = 507


class StoreError(FabricaError):
    """The store could not complete a write; the previous version is intact."""

    status = 500


class ConfigurationError(FabricaError):
    """A wiring mistake in register()/Fabrica(): raised at once, never over HTTP."""


class StoreLockedError(ConfigurationError):
    """Another process holds the data dir (or database) lock."""


class PermanentError(Exception):
    """Raised by reconcile: recorded as ``Ready=False, reason=ReconcilePermanentError``, not retried
    until the object changes."""


class TemporaryError(Exception):
    """Raised by reconcile: recorded as ``Ready=False, reason=ReconcileTemporaryError``, retried after
    exactly ``delay`` seconds."""

    def __init__(self, message: str = "", delay: float = 60.0):
        super().__init__(message)
        self.delay = float(delay)


_ERRORS_BY_STATUS = {cls.status: cls for cls in (
    BadRequestError, UnauthorizedError, ForbiddenError, NotFoundError, RequestTimeoutError, ConflictError,
    GoneError, PreconditionFailedError, PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError,
    InsufficientStorageError)}


def error_for_status(status: int, message: str, details=None, reason: str | None = None) -> FabricaError:
    """The exception class for an error body (used by the HTTP Client): by ``reason``, else by status."""
    cls = _ERRORS_BY_STATUS.get(status, FabricaError)
    named = globals().get(reason) if isinstance(reason, str) and reason.endswith("Error") else None
    if isinstance(named, type) and issubclass(named, cls) and named.status == status:
        cls = named
    err = cls(message, details)
    err.status = status
    return err


###############################################################################
# Helpers ######################################################################
###############################################################################
#
# Names, times and the strict JSON reader. Every byte that comes from a client
# goes through read_json(); every name or uid goes through a fullmatch() below
# before it is used anywhere, a path included.

API_VERSION = "v1"
JSON_TYPE = "application/json"
SCHEMA_VERSION = "v1"
MAX_BODY = 1 << 20
MAX_HEAD = 64 << 10              # request line + headers; a longer head is refused with 431 (414 for the line)
MAX_DEPTH = 64                   # how deep containers nest in a request body, and in a spec or a status
MAX_OBJECT_DEPTH = MAX_DEPTH + 1  # a stored object: its spec or status one level down
# what start-up loads: more than writes store, so a file an older version stored deeper still loads
MAX_FILE_DEPTH = 2 * MAX_DEPTH
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
UID_RE = re.compile(r"([a-z0-9]+)-([0-9a-f]{8})")
PREFIX_RE = re.compile(r"[a-z0-9]+")
KIND_RE = re.compile(r"[A-Z][A-Za-z0-9]{0,62}")
PLURAL_RE = re.compile(r"[a-z][a-z0-9]{0,62}")
ROOT_ROUTE = "fabrica.root"      # the name of fabrica's own GET / route (an app may add its own page)
RESERVED_PATHS = {"health", "apis", "events", "openapi.json", "docs", "metrics"}
_UNCOUNTABLE = {"chassis", "series", "species", "fish", "sheep", "news", "data", "metadata"}
_IRREGULAR = {"child": "children", "person": "people", "man": "men", "woman": "women", "mouse": "mice",
              "goose": "geese", "foot": "feet", "tooth": "teeth"}


def valid_name(name) -> bool:
    """True for a Kubernetes DNS-1123 subdomain (also what every uid is)."""
    return isinstance(name, str) and len(name) <= 253 and NAME_RE.fullmatch(name) is not None


def pluralize(kind: str) -> str:
    """``Rack`` -> ``racks``, ``Policy`` -> ``policies``, ``Box`` -> ``boxes``, ``Chassis`` -> ``chassis``."""
    word = kind.lower()
    if word in _UNCOUNTABLE:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def singularize(plural: str) -> str:
    """The inverse of pluralize() for the open server: ``widgets`` -> ``Widget``."""
    word = plural
    irregular = {v: k for k, v in _IRREGULAR.items()}
    if word in _UNCOUNTABLE:
        pass
    elif word in irregular:
        word = irregular[word]
    elif word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "zes", "ches", "shes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word[:1].upper() + word[1:]


def utcnow() -> str:
    """The current time as RFC 3339 UTC with microseconds and ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_seconds() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.ASCII)


def _is_time(value) -> bool:
    """Whether ``value`` is an RFC 3339 date-time string (section 5.6) that names a real instant."""
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        return False
    try:        # the fraction is dropped: its digits are already checked, and 3.10 takes at most six
        parse_time(value[:19] + ("Z" if value.endswith("Z") else value[-6:]))
    except ValueError:
        return False
    return True


def parse_time(text: str) -> float:
    """Seconds since the epoch for an RFC 3339 UTC time such as utcnow() writes."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def _bounded_int(text):
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"integer {text[:40]} is outside the signed 64-bit range")
    return value


def _unique_pairs(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


_SURROGATE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_float=_finite_float,
                            parse_int=_bounded_int, parse_constant=_reject_constant)


def _check_tree(value, max_depth: int, depth: int = 0):
    """Depth cap (``depth`` containers hold this value) and lone surrogates, walked only when the
    prefilters say it may matter."""
    if isinstance(value, (dict, list)):
        if depth >= max_depth:
            raise ValueError(f"nesting deeper than {max_depth}")
        if isinstance(value, dict):
            for key in value:
                key.encode("utf-8")
            value = value.values()
        for item in value:
            _check_tree(item, max_depth, depth + 1)
    elif isinstance(value, str):
        value.encode("utf-8")


def json_depth(value) -> int:
    """How deep containers nest in a JSON value: 0 for a scalar, 1 for ``{}`` or ``[1]``, 2 for ``{"a": []}``.

    Level by level, not recursion, so any depth is measured.
    """
    depth = 0
    level = [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [item for node in level for item in (node.values() if isinstance(node, dict) else node)
                 if isinstance(item, (dict, list))]
    return depth


def read_json(raw: bytes, *, want_object: bool = True, max_depth: int = MAX_DEPTH):
    """Parse a request body strictly; raise BadRequestError for anything that is not plain JSON.

    Rejected: invalid UTF-8, a byte-order mark, syntax errors, NaN/Infinity,
    duplicate keys, containers nested deeper than ``max_depth`` (64), floats
    that overflow, integers outside signed 64-bit, lone surrogate escapes, raw
    control characters in strings, and (with ``want_object``) anything but an
    object at the top.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raise BadRequestError("malformed JSON: a byte-order mark is not allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"malformed JSON: invalid UTF-8 at byte {exc.start}") from None
    if not text.strip():
        raise BadRequestError("malformed JSON: the body is empty")
    try:
        value = _DECODER.decode(text)
        if (text.count("[") + text.count("{") > max_depth) or _SURROGATE_RE.search(text):
            _check_tree(value, max_depth)
    except RecursionError:
        raise BadRequestError(f"malformed JSON: nesting deeper than {max_depth}") from None
    except UnicodeEncodeError:
        raise BadRequestError("malformed JSON: lone surrogate in a string") from None
    except ValueError as exc:
        raise BadRequestError(f"malformed JSON: {exc}") from None
    if want_object and not isinstance(value, dict):
        raise BadRequestError(f"malformed JSON: expected an object, got {type(value).__name__ if value is not None else 'null'}")
    return value


def dumps(value) -> str:
    """Compact JSON for the wire."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def json_size(value) -> int:
    """The bytes of ``dumps(value)`` in UTF-8 (what the object limit measures); TypeError/ValueError if not JSON."""
    return _utf8_size(dumps(value))


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def deepcopy_json(value):
    """A fast deep copy for JSON-shaped values (dict, list, scalars)."""
    if isinstance(value, dict):
        return {k: deepcopy_json(v) if isinstance(v, (dict, list)) else v for k, v in value.items()}
    if isinstance(value, list):
        return [deepcopy_json(v) if isinstance(v, (dict, list)) else v for v in value]
    return value


# C0 and C1 controls (CR, LF, NUL, ESC... and NEL) and the Unicode line and paragraph separators
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """``text`` with every control character escaped as Python writes it (``\\n``, ``\\x1b``, ``\\u2028``).

    For what a client sent on its way into a line-oriented output (an SSE
    field, a log line): it stays on its one line and cannot forge the next.
    """
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


class Histogram:
    """A Prometheus histogram: cumulative buckets, sum and count (thread-safe enough under the GIL)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, buckets=BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        lines.append(f"{name}_sum{{{labels}}} {self.sum!r}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


###############################################################################
# Resources ####################################################################
###############################################################################
#
# A resource is a plain JSON dict in a fixed key order (apiVersion, kind,
# schemaVersion, metadata, spec, status). Resource adds attribute helpers and
# set_condition(); the store keeps plain dicts and never hands them out for
# mutation: callers get copies.

METADATA_KEYS = ("name", "uid", "labels", "annotations", "createdAt", "updatedAt", "generation",
                 "resourceVersion", "finalizers", "ownerReferences", "deletionTimestamp")
SERVER_MANAGED = ("uid", "createdAt", "updatedAt", "generation", "resourceVersion", "deletionTimestamp")
CONDITION_STATUSES = ("True", "False", "Unknown")
CONDITION_TYPE_RE = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                               r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
CONDITION_TYPE_MAX = 316


def new_object(kind: str, name: str, uid: str, *, spec=None, labels=None, annotations=None,
               finalizers=None, owner_references=None, now: str | None = None) -> dict:
    """A fresh envelope in wire key order, generation 1, not yet stored (no resourceVersion)."""
    now = now or utcnow()
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "schemaVersion": SCHEMA_VERSION,
        "metadata": {
            "name": name,
            "uid": uid,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
            "createdAt": now,
            "updatedAt": now,
            "generation": 1,
            "resourceVersion": "0",
            "finalizers": list(finalizers or []),
            "ownerReferences": list(owner_references or []),
            "deletionTimestamp": None,
        },
        "spec": spec if spec is not None else {},
        "status": {},
    }


def normalize_object(obj: dict) -> dict:
    """The same object with every envelope and metadata key present, in wire order."""
    meta = obj.get("metadata") or {}
    defaults = {"labels": {}, "annotations": {}, "finalizers": [], "ownerReferences": [],
                "deletionTimestamp": None, "generation": 1}
    metadata = {key: meta.get(key, defaults.get(key)) for key in METADATA_KEYS}
    return {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj.get("kind"),
            "schemaVersion": obj.get("schemaVersion", SCHEMA_VERSION), "metadata": metadata,
            "spec": obj.get("spec") if obj.get("spec") is not None else {},
            "status": obj.get("status") if obj.get("status") is not None else {}}


OWNER_REFERENCE_KEYS = ("kind", "uid", "name", "controller")


def owner_references_problem(refs) -> tuple[str, str] | None:
    """Why ``metadata.ownerReferences`` is not a valid list of owner references: (where, message), or None.

    Each reference is an object with ``kind`` (a kind name) and ``uid`` (a
    uid), optionally ``name`` (a string) and ``controller`` (a bool); no owner
    is named twice and at most one reference has ``controller: true``
    (Kubernetes). ``where`` is the path below ``metadata.ownerReferences``.
    """
    if not isinstance(refs, list):
        return "", "must be a list of {kind, uid, name, controller} objects"
    seen, controllers = set(), 0
    for i, ref in enumerate(refs):
        where = f"[{i}]"
        if not isinstance(ref, dict):
            return where, "must be an object {kind, uid, name, controller}"
        unknown = sorted(set(ref) - set(OWNER_REFERENCE_KEYS))
        if unknown:
            return where, f"has unknown field(s) {', '.join(map(repr, unknown))}; allowed: kind, uid, name, controller"
        if not isinstance(ref.get("kind"), str) or not KIND_RE.fullmatch(ref["kind"]):
            return f"{where}.kind", "must be a kind name, like 'Rack'"
        if not isinstance(ref.get("uid"), str) or not UID_RE.fullmatch(ref["uid"]):
            return f"{where}.uid", "must be the owner's uid, like 'rack-1a2b3c4d'"
        if not isinstance(ref.get("name", ""), str):
            return f"{where}.name", "must be a string"
        if not isinstance(ref.get("controller", False), bool):
            return f"{where}.controller", "must be true or false"
        if (ref["kind"], ref["uid"]) in seen:
            return where, f"names {ref['kind']} {ref['uid']!r} a second time"
        seen.add((ref["kind"], ref["uid"]))
        controllers += ref.get("controller", False)
    if controllers > 1:
        return "", "may have at most one reference with controller: true"
    return None


def condition_type_problem(value) -> str | None:
    """Why ``value`` is not a condition type, or None.

    Kubernetes' rule for ``metav1.Condition.type`` (k8s.io/apimachinery
    pkg/apis/meta/v1/types.go: ``+kubebuilder:validation:Pattern`` and
    ``MaxLength=316``): a qualified name, ``Ready`` or ``example.com/Ready``.
    A type names an event type (``io.fabrica.condition.<type>``), so it can
    hold no space, no control character and no line break.
    """
    if not isinstance(value, str) or len(value) > CONDITION_TYPE_MAX or not CONDITION_TYPE_RE.fullmatch(value):
        shown = f"{value[:60]!r}{'...' if len(value) > 60 else ''}" if isinstance(value, str) else repr(value)[:60]
        return (f"type {shown} must be a qualified name like 'Ready' or 'example.com/Ready': letters, "
                f"digits, '-', '_' and '.', starting and ending with a letter or digit, after an optional "
                f"DNS subdomain and '/'; at most {CONDITION_TYPE_MAX} characters")
    return None


def status_problems(status: dict, stored: dict | None = None) -> list[dict]:
    """What is wrong with the status fields fabrica itself reads (conditions, observedGeneration, version).

    Checked before every status write and on every load, so that deriving a
    write's events can never fail after the write committed. Each condition
    is an object with a ``type`` (condition_type_problem) and a ``status``
    (True, False or Unknown). A condition whose type and status ``stored``
    (the status being replaced) already holds is only checked for its shape,
    a non-empty string type and a string status: fabrica before these rules
    stored any such condition, and an object holding one can still be
    written (its other fields, its other conditions) and still loads; only a
    new condition or a status change, which publishes a condition event,
    must follow them (as Kubernetes ratchets validation of unchanged values).
    """
    errors = []
    conditions = status.get("conditions")
    if "conditions" in status and not (isinstance(conditions, list) and all(
            isinstance(c, dict) and isinstance(c.get("type"), str) and c["type"] and
            isinstance(c.get("status", ""), str) for c in conditions)):
        errors.append({"field": "status.conditions", "message": "must be a list of objects, each with a "
                       "non-empty string type and a string status"})
    elif conditions:
        kept = {(c.get("type"), c.get("status")) for c in (stored or {}).get("conditions") or ()
                if isinstance(c, dict)}
        for i, cond in enumerate(conditions):
            if (cond["type"], cond.get("status")) in kept:
                continue
            problem = condition_type_problem(cond["type"])
            if problem:
                errors.append({"field": f"status.conditions[{i}].type", "message": problem})
            if cond.get("status") not in CONDITION_STATUSES:
                shown = f", not {cond['status'][:40]!r}" if "status" in cond else " (it is missing)"
                errors.append({"field": f"status.conditions[{i}].status",
                               "message": f"must be True, False or Unknown{shown}"})
    generation = status.get("observedGeneration")
    if "observedGeneration" in status and (not isinstance(generation, int) or isinstance(generation, bool)):
        errors.append({"field": "status.observedGeneration", "message": "must be an integer"})
    if "version" in status and not isinstance(status["version"], str):
        errors.append({"field": "status.version", "message": "must be a string"})
    return errors


def _is_string_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _metadata_problem(meta: dict) -> str | None:
    """Which metadata field (beyond name, uid and resourceVersion) has the wrong type, or None."""
    generation = meta.get("generation", 1)
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        return "metadata.generation is not a positive integer"
    for key in ("labels", "annotations"):
        if not _is_string_map(meta.get(key, {})):
            return f"metadata.{key} is not an object of strings"
    for key in ("createdAt", "updatedAt"):
        if key in meta and not _is_time(meta[key]):
            return f"metadata.{key} is not an RFC 3339 time"
    if meta.get("deletionTimestamp") is not None and not _is_time(meta["deletionTimestamp"]):
        # a garbled one would otherwise start a deletion (and its cascade) at the next start-up
        return "metadata.deletionTimestamp is neither null nor an RFC 3339 time"
    finalizers = meta.get("finalizers", [])
    if not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers):
        return "metadata.finalizers is not a list of strings"
    problem = owner_references_problem(meta.get("ownerReferences", []))
    if problem is not None:
        return f"metadata.ownerReferences{problem[0]} {problem[1]}"
    return None


def envelope_problem(obj, kind: str | None = None, uid: str | None = None) -> str | None:
    """Why a stored document is not a valid resource (checked at start-up recovery), or None.

    Every metadata field and the status fields fabrica reads are type-checked:
    a file that loaded with a mistyped one would break the index or a later write.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return "not a resource envelope (no metadata object)"
    meta = obj["metadata"]
    if kind is not None and obj.get("kind") != kind:
        return f"kind {obj.get('kind')!r} does not match its directory ({kind})"
    if not isinstance(obj.get("kind"), str) or not KIND_RE.fullmatch(obj["kind"]):
        return "kind is missing or invalid"
    if not isinstance(meta.get("uid"), str) or not UID_RE.fullmatch(meta["uid"]):
        return "metadata.uid is missing or invalid"
    if uid is not None and meta["uid"] != uid:
        return f"file name does not match metadata.uid {meta['uid']!r}"
    if not valid_name(meta.get("name")):
        return "metadata.name is missing or not a DNS-1123 name"
    rv = meta.get("resourceVersion")
    if not isinstance(rv, str) or not rv.isdigit() or not rv.isascii():
        return "metadata.resourceVersion is missing or not an integer string"
    digits = rv.lstrip("0")
    if len(digits) > 19 or int(digits or "0") > INT64_MAX:    # the reservation file has room for 2^63-1
        return "metadata.resourceVersion is larger than 2^63-1"
    problem = _metadata_problem(meta)
    if problem:
        return problem
    for key in ("spec", "status"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            return f"{key} is not an object"
    # a file's own conditions are what is stored: only their shape is checked, so that conditions an
    # older fabrica wrote (any non-empty type, any status) never send a file to quarantine
    status = obj.get("status") or {}
    errors = status_problems(status, stored=status)
    return f"{errors[0]['field']} {errors[0]['message']}" if errors else None


class Resource(dict):
    """A resource envelope: a JSON dict with attribute helpers.

    ``obj.spec``/``obj.status``/``obj.labels`` are the live dicts inside the
    envelope, so ``obj.status["phase"] = "Ready"`` edits the object.
    """

    kind = property(lambda self: self["kind"])
    metadata = property(lambda self: self["metadata"])
    name = property(lambda self: self["metadata"]["name"])
    uid = property(lambda self: self["metadata"]["uid"])
    labels = property(lambda self: self["metadata"]["labels"])
    annotations = property(lambda self: self["metadata"]["annotations"])
    generation = property(lambda self: self["metadata"]["generation"])
    resource_version = property(lambda self: self["metadata"]["resourceVersion"])
    finalizers = property(lambda self: self["metadata"]["finalizers"])
    owner_references = property(lambda self: self["metadata"]["ownerReferences"])
    deleting = property(lambda self: self["metadata"].get("deletionTimestamp") is not None)

    @property
    def spec(self) -> dict:
        return self["spec"]

    @property
    def status(self) -> dict:
        return self["status"]

    def condition(self, type: str) -> dict | None:
        """The condition of that type, or None."""
        for cond in self["status"].get("conditions") or ():
            if isinstance(cond, dict) and cond.get("type") == type:
                return cond
        return None

    def set_condition(self, type: str, status, reason: str = "", message: str = "") -> bool:
        """Set a condition; ``lastTransitionTime`` moves only when ``status`` changes.

        ``type`` is a qualified name (``Ready``, ``example.com/Ready``) and
        ``status`` a bool or "True"/"False"/"Unknown"; ValueError otherwise.
        Also sets the condition's ``observedGeneration``. Returns whether
        anything changed.
        """
        if isinstance(status, bool):
            status = "True" if status else "False"
        if status not in CONDITION_STATUSES:
            raise ValueError(f"condition status must be True, False or Unknown, not {status!r}")
        problem = condition_type_problem(type)
        if problem:
            raise ValueError(f"condition {problem}")
        conditions = self["status"].setdefault("conditions", [])
        wanted = {"type": type, "status": status, "reason": reason, "message": message,
                  "lastTransitionTime": None, "observedGeneration": self.generation}
        current = self.condition(type)
        if current is None:
            wanted["lastTransitionTime"] = _utc_seconds()
            conditions.append(wanted)
            return True
        wanted["lastTransitionTime"] = (current.get("lastTransitionTime") if current.get("status") == status
                                        else _utc_seconds())
        if all(current.get(k) == v for k, v in wanted.items()):
            return False
        current.clear()
        current.update(wanted)
        return True

    def copy(self) -> Resource:
        return Resource(deepcopy_json(self))


class Result:
    """What reconcile may return: ``Result(requeue=True)`` (rate limited) or ``Result(requeue_after=s)``."""

    __slots__ = ("requeue", "requeue_after")

    def __init__(self, requeue: bool = False, requeue_after: float | None = None):
        if requeue_after is not None and requeue_after < 0:
            raise ValueError("requeue_after must be >= 0")
        self.requeue = requeue
        self.requeue_after = requeue_after

    def __repr__(self):
        return f"Result(requeue={self.requeue!r}, requeue_after={self.requeue_after!r})"


###############################################################################
# Patches #####################################################################
###############################################################################
# The three PATCH content types of SPEC §6.4 as pure functions: JSON Merge
# Patch (RFC 7386), JSON Patch (RFC 6902 over RFC 6901 pointers) and the
# dotted shorthand. None mutates its arguments, and no result shares an
# object with them: each works on a deep copy and copies every value it
# takes from a patch. Failures raise PatchError (422) naming op and path.
# JSON Patch alone can multiply a document (copy), so it takes a size bound
# that it checks before each operation grows the document.

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
SHORTHAND_PATCH = "application/shorthand-patch+json"
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_BAD_ESCAPE = re.compile(r"~(?![01])")
_JSON_PATCH_OPS = ("add", "remove", "replace", "move", "copy", "test")


def apply_merge_patch(doc, patch):
    """Return *doc* with the JSON Merge Patch (RFC 7386) *patch* applied.

    An object patch is merged member by member and a null member removes
    that key; any other patch, arrays included, replaces the target whole.
    Every JSON value is a valid merge patch, so this never raises. *doc*
    and *patch* are not mutated and share nothing with the result.
    """
    return _merge(copy.deepcopy(doc), patch)


def _merge(target, patch):
    # target is a private copy by now, so it is updated in place.
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target


def merge_patch_diff(a, b):
    """Return a merge patch *p* such that ``apply_merge_patch(a, p) == b``.

    Objects are diffed member by member, with null for each removed key;
    arrays and scalars that differ are replaced whole. true and 1 differ,
    1 and 1.0 do not (JSON equality).

    Merge patch cannot express a null value, since null means "remove":
    the round trip holds only if *b* has no null below its top level (a
    null member of *b* comes out absent, a null inside a new object is
    dropped). Neither argument is mutated.
    """
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return copy.deepcopy(b)
    patch = {key: None for key in a if key not in b}
    for key, value in b.items():
        if key not in a:
            patch[key] = copy.deepcopy(value)
        elif not _json_equal(a[key], value):
            patch[key] = merge_patch_diff(a[key], value)
    return patch


def apply_json_patch(doc, ops, *, max_size: int | None = None, max_depth: int | None = None):
    """Return *doc* with the JSON Patch (RFC 6902) *ops* applied.

    *ops* is a list of operation objects, each with a string "op" (add,
    remove, replace, move, copy or test) and an RFC 6901 "path"; members
    other than those the op uses are ignored. The patch is atomic: it
    applies to a deep copy, so *doc* and *ops* are never mutated and a
    failure leaves nothing half done.

    Raises PatchError naming the failing operation and path, e.g.
    "op 2 (remove): path '/a/b' does not exist", with the same message in
    ``details`` under the field "patch[2]".

    ``max_size`` bounds the result to that many bytes of compact JSON: a
    running estimate of the document's size is checked before each
    operation grows it, and the values ``copy`` operations duplicate may not
    add up to more than ``max_size`` either, so a small patch of many copies
    (CVE-2019-1002100) fails with PatchTooLargeError (a PatchError, status
    413) before the document grows, not after. ``max_depth`` bounds how deep
    an operation may nest what it writes (its path plus its value's depth),
    checked before each one, so stacked operations cannot build a document
    deeper than that (PatchError).
    """
    if not isinstance(ops, list):
        raise PatchError(f"a JSON Patch must be an array of operations, not {_json_kind(ops)}")
    budget = None if max_size is None else _PatchBudget(doc, max_size)
    result = copy.deepcopy(doc)
    for index, op in enumerate(ops):
        try:
            result = _apply_operation(result, op, budget, max_depth)
        except PatchError as exc:
            name = op.get("op") if isinstance(op, dict) else None
            label = f"op {index} ({name})" if isinstance(name, str) else f"op {index}"
            details = [{"field": f"patch[{index}]", "message": exc.message}]
            raise type(exc)(f"{label}: {exc.message}", details) from None
    return result


def _apply_operation(doc, op, budget=None, max_depth=None):
    """Apply one operation to *doc* in place; return the (maybe new) root."""
    if not isinstance(op, dict):
        raise PatchError(f"an operation must be an object, not {_json_kind(op)}")
    name = op.get("op")
    if name not in _JSON_PATCH_OPS:
        raise PatchError(f"'op' must be one of {', '.join(_JSON_PATCH_OPS)}, not {_brief(name)}")
    path = _pointer_member(op, "path")
    if name in ("add", "replace", "test") and "value" not in op:
        raise PatchError("missing 'value' member")

    if name in ("add", "replace"):
        _check_nesting(path, op["value"], max_depth)
    if name == "add":
        if budget is not None:
            budget.put(doc, path, _size(op["value"]))
        return _add(doc, path, copy.deepcopy(op["value"]))
    if name == "remove":
        if budget is not None:
            budget.take(doc, path)
        _remove(doc, path)
        return doc
    if name == "replace":
        if budget is not None:
            budget.put(doc, path, _size(op["value"]), replace=True)
        if not path:
            return copy.deepcopy(op["value"])
        parent, key = _locate(doc, path)
        parent[key] = copy.deepcopy(op["value"])
        return doc
    if name == "test":
        actual = _walk(doc, path)
        if not _json_equal(actual, op["value"]):
            raise PatchError(f"test failed: '{op['path']}' is {_brief(actual)}, "
                             f"not {_brief(op['value'])}")
        return doc

    source = _pointer_member(op, "from")
    if max_depth is not None and path[:len(source)] != source:     # a move into its own child fails below
        _check_nesting(path, _walk(doc, source), max_depth)
    if name == "copy":
        value = _walk(doc, source)
        if budget is not None:
            budget.put(doc, path, _size(value), copied=True)      # sized before anything is copied
        return _add(doc, path, copy.deepcopy(value))
    if source == path:
        _walk(doc, source)  # a no-op move still needs an existing "from"
        return doc
    if path[:len(source)] == source:
        raise PatchError(f"cannot move '{op['from']}' into its own child '{op['path']}'")
    if budget is None:
        return _add(doc, path, _remove(doc, source))
    budget.take(doc, source, value=False)
    value = _remove(doc, source)
    budget.land(doc, path, value)
    return _add(doc, path, value)


def _check_nesting(tokens, value, max_depth: int | None) -> None:
    # the containers above the value (the root included), then the value's own
    if max_depth is not None and len(tokens) + json_depth(value) > max_depth:
        raise PatchError(f"{_brief(_format_pointer(tokens))} would nest the document deeper than {max_depth} levels")


def _size(value) -> int:
    # json_size() that never raises: a value that is not JSON (app.client may pass one) is sized
    # by its str(), and the store refuses it later
    return _utf8_size(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


class _PatchBudget:
    """The running size of a JSON Patch's document, and the bytes its copies duplicated.

    Each method accounts for one operation before it changes the document,
    raising PatchTooLargeError if the estimate would pass the limit. A
    member costs its value plus its separators (a comma unless it is alone,
    and '"key":' in an object), so the estimate is the size of the compact
    JSON. A path that does not resolve is not charged: the operation fails
    on it anyway.
    """

    def __init__(self, doc, limit: int):
        self.limit = limit
        self.size = _size(doc)
        self.copied = 0

    def put(self, doc, tokens, size: int, *, replace: bool = False, copied: bool = False) -> None:
        """A value of ``size`` bytes is written at ``tokens`` (add and copy insert, replace replaces)."""
        old = self._old_size(doc, tokens, replace)
        if old is None:
            return
        if copied:
            if self.copied + size > self.limit:
                raise PatchTooLargeError(f"the copy operations would duplicate more than {self.limit} bytes")
            self.copied += size
        self._grow(size - old)

    def take(self, doc, tokens, *, value: bool = True) -> None:
        """The member at ``tokens`` goes away (remove), or only its separators (``value=False``: a move)."""
        if not tokens:
            return      # the root cannot be removed: the operation fails
        with contextlib.suppress(PatchError):
            parent, key = _locate(doc, tokens)
            self.size -= (_size(parent[key]) if value else 0) + self._separators(parent, key, 1)

    def land(self, doc, tokens, value) -> None:
        """A moved ``value``, already taken out of ``doc``, goes to ``tokens`` (nothing is copied)."""
        if tokens:
            self.put(doc, tokens, 0)        # only what it displaces there, or its separators, count
        else:
            self.size = _size(value)

    def _old_size(self, doc, tokens, replace: bool) -> int | None:
        # the bytes a write at tokens removes: the document at the root, a replaced value, or
        # (negative) the separators an inserted member adds; None if tokens does not resolve
        if not tokens:
            return self.size
        with contextlib.suppress(PatchError):     # an unresolvable path: the operation itself reports it
            parent = _walk(doc, tokens[:-1])
            key = tokens[-1]
            if isinstance(parent, dict):
                if key in parent:
                    return _size(parent[key])
                return None if replace else -self._separators(parent, key, 0)
            if isinstance(parent, list):
                index = _array_index(parent, key, tokens, insert=not replace)
                return _size(parent[index]) if replace else -self._separators(parent, key, 0)
        return None

    @staticmethod
    def _separators(parent, key, others: int) -> int:
        # '"key":' in an object, and a comma unless the member is alone (with ``others`` = the
        # members besides it: 0 when it is being inserted, 1 when it is still there)
        comma = 1 if len(parent) > others else 0
        return _size(key) + 1 + comma if isinstance(parent, dict) else comma

    def _grow(self, delta: int) -> None:
        if delta > 0 and self.size + delta > self.limit:
            raise PatchTooLargeError(f"the patched document would be larger than {self.limit} bytes of JSON "
                                     "(the object limit)")
        self.size += delta


def _pointer_member(op, member) -> list[str]:
    if member not in op:
        raise PatchError(f"missing '{member}' member")
    if not isinstance(op[member], str):
        raise PatchError(f"'{member}' must be a string, not {_json_kind(op[member])}")
    return _parse_pointer(op[member])


def _add(doc, tokens, value):
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    key = tokens[-1]
    if isinstance(parent, dict):
        parent[key] = value
    elif isinstance(parent, list):
        parent.insert(_array_index(parent, key, tokens, insert=True), value)
    else:
        raise PatchError(f"cannot add '{_format_pointer(tokens)}': "
                         f"its parent is {_json_kind(parent)}, not an object or array")
    return doc


def _remove(doc, tokens):
    """Remove and return the value at *tokens*."""
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent, key = _locate(doc, tokens)
    return parent.pop(key)


def _locate(doc, tokens):
    """Return (container, key or index) of the existing value at *tokens*."""
    parent = _walk(doc, tokens[:-1])
    key = tokens[-1]
    if isinstance(parent, list):
        return parent, _array_index(parent, key, tokens)
    if isinstance(parent, dict) and key in parent:
        return parent, key
    raise PatchError(f"path '{_format_pointer(tokens)}' does not exist")


def resolve_pointer(doc, pointer: str):
    """Return the value the JSON Pointer (RFC 6901) *pointer* designates.

    "" is the whole document; "~1" and "~0" unescape to "/" and "~". The
    value is returned as is, not copied. Raises PatchError if the pointer
    is malformed or designates nothing.
    """
    if not isinstance(pointer, str):
        raise PatchError(f"a JSON pointer must be a string, not {_json_kind(pointer)}")
    return _walk(doc, _parse_pointer(pointer))


def _parse_pointer(pointer: str) -> list[str]:
    if not pointer:
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"JSON pointer '{pointer}' must be empty or start with '/'")
    if _BAD_ESCAPE.search(pointer):
        raise PatchError(f"JSON pointer '{pointer}' has a '~' not followed by '0' or '1'")
    # "~01" is "~1", not "/": unescape ~1 before ~0 (RFC 6901 §4).
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _format_pointer(tokens) -> str:
    return "".join("/" + token.replace("~", "~0").replace("/", "~1") for token in tokens)


def _walk(doc, tokens):
    node = doc
    for depth, token in enumerate(tokens):
        if isinstance(node, list):
            node = node[_array_index(node, token, tokens[:depth + 1])]
        elif isinstance(node, dict) and token in node:
            node = node[token]
        else:
            raise PatchError(f"path '{_format_pointer(tokens[:depth + 1])}' does not exist")
    return node


def _array_index(array: list, token: str, tokens, *, insert: bool = False) -> int:
    """Return the index *token* designates in *array*.

    Only add may use "-" (past the end) or the index len(array).
    """
    if insert and token == "-":
        return len(array)
    where = _format_pointer(tokens)
    if token == "-":
        raise PatchError(f"path '{where}': '-' (past the end of the array) is only valid for add")
    if not _ARRAY_INDEX.fullmatch(token):
        raise PatchError(f"path '{where}': '{token}' is not an array index")
    index = int(token)
    if index < len(array) or (insert and index == len(array)):
        return index
    if insert:
        raise PatchError(f"path '{where}': index {index} is past the end of the array "
                         f"({len(array)} items)")
    raise PatchError(f"path '{where}' does not exist (the array has {len(array)} items)")


def _json_equal(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true != 1; object member order is ignored."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    return type(a) is type(b) and a == b


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _brief(value, limit: int = 60) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def apply_shorthand_patch(doc, patch, *, max_depth: int | None = None):
    """Return *doc* with a shorthand patch such as ``{"a.b": 1, "c": None}`` applied.

    Each key is a dot-separated path of object members. A non-null value
    sets the member, creating intermediate objects where they are missing
    or null; a null value removes the member, and removing a path that
    does not exist is not an error. Keys apply in sorted order, so
    ``{"a": None, "a.b": 1}`` always gives ``{"a": {"b": 1}}``. Member names
    that contain "." cannot be addressed.

    Raises PatchError if *doc* or *patch* is not an object, a key has an
    empty segment ("a..b", ".a"), a set passes through a value that is
    not an object, or (with ``max_depth``) a set would nest deeper than that:
    its segments plus its value's depth. *doc* and *patch* are never mutated.
    """
    if not isinstance(patch, dict):
        raise PatchError(f"a shorthand patch must be an object, not {_json_kind(patch)}")
    if not isinstance(doc, dict):
        raise PatchError(f"a shorthand patch applies to an object, not {_json_kind(doc)}")
    for path in patch:
        if not isinstance(path, str) or "" in path.split("."):
            raise PatchError(f"invalid shorthand path {_brief(path)}: expected names joined by '.'")
        if max_depth is not None and patch[path] is not None and \
                path.count(".") + 1 + json_depth(patch[path]) > max_depth:
            raise PatchError(f"cannot set {_brief(path)}: it would nest the document deeper than {max_depth} levels")
    result = copy.deepcopy(doc)
    for path in sorted(patch):
        *parents, leaf = path.split(".")
        if patch[path] is None:
            _shorthand_remove(result, parents, leaf)
            continue
        node = result
        for depth, name in enumerate(parents):
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                raise PatchError(f"cannot set '{path}': '{'.'.join(parents[:depth + 1])}' "
                                 f"is {_json_kind(child)}, not an object")
            node = child
        node[leaf] = copy.deepcopy(patch[path])
    return result


def _shorthand_remove(node, parents, leaf):
    for name in parents:
        node = node.get(name)
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


###############################################################################
# Label selectors #############################################################
###############################################################################
# Kubernetes label selectors (SPEC §6.5), parsed as apimachinery's
# labels.Parse parses them, quirks included, except that the integer
# comparisons "<" and ">" are rejected. A Selector is plain data: matching
# needs only the labels dict, and index_candidates tells a store which
# label-index lookups can narrow a search before matching.

# "==" and "!=" come before their one-character prefixes. Whitespace, the
# only text no alternative matches, is what findall() skips.
_SELECTOR_TOKEN = re.compile(r"==|!=|[=!(),<>]|[^ \t\r\n=!(),<>]+")
_SELECTOR_SYMBOLS = frozenset({"==", "!=", "=", "!", "(", ")", ",", "<", ">"})
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclasses.dataclass
class Selector:
    """A parsed label selector: the AND of its requirements.

    Each requirement is ``(key, op, values)`` with op one of "=", "!=",
    "in", "notin", "exists" and "!" ("==" is stored as "="); values is a
    frozenset, empty for "exists" and "!". "!=" and "notin" also match
    objects without the key. A selector with no requirements matches
    everything.
    """

    requirements: list[tuple[str, str, frozenset[str]]] = dataclasses.field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        """Return True if *labels* satisfy every requirement."""
        for key, op, values in self.requirements:
            if op == "exists":
                ok = key in labels
            elif op == "!":
                ok = key not in labels
            elif op in ("=", "in"):
                ok = key in labels and labels[key] in values
            else:  # "!=", "notin"
                ok = key not in labels or labels[key] not in values
            if not ok:
                return False
        return True

    def index_candidates(self) -> list[tuple[str, frozenset[str] | None]]:
        """Return the requirements a label index can answer.

        ``(key, values)`` for "=" and "in" (the label has one of values),
        ``(key, None)`` for "exists". Every matching object is in the
        intersection of these lookups, which must still be filtered with
        matches(); an empty list means the store has to scan.
        """
        return [(key, None if op == "exists" else values)
                for key, op, values in self.requirements if op in ("=", "in", "exists")]


def parse_selector(text: str) -> Selector:
    """Parse a Kubernetes label selector such as ``app=web,tier in (a,b),!canary``.

    Same language as apimachinery's labels.Parse: "," is AND; "k=v",
    "k==v", "k!=v", "k in (a,b)", "k notin (a)", "k" (exists) and "!k"
    (does not exist); spaces, tabs and newlines around tokens are ignored.
    As in Kubernetes, "" selects everything, "k=" and "k in ()" match the
    empty value, "(a,,b)" includes it, and "in"/"notin" are keywords only
    where an operator is expected ("in=x" is a key named "in"). Keys must
    be label keys ([prefix/]name) and values label values. Not supported:
    the integer operators "<" and ">".

    Raises BadRequestError("invalid label selector '<text>': <reason>").
    """
    if not isinstance(text, str):
        raise BadRequestError(f"invalid label selector: expected a string, "
                              f"not {type(text).__name__}")
    return _SelectorParser(text).parse()


class _SelectorParser:
    """Recursive descent over the selector's tokens; "" stands for the end."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _SELECTOR_TOKEN.findall(text)
        self.pos = 0

    def peek(self) -> str:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ""

    def take(self) -> str:
        token = self.peek()
        self.pos += 1
        return token

    def error(self, reason: str) -> BadRequestError:
        return BadRequestError(f"invalid label selector '{self.text}': {reason}",
                               [{"field": "labelSelector", "message": reason}])

    def parse(self) -> Selector:
        requirements = []
        if self.peek():
            requirements.append(self.requirement())
            while (token := self.take()) == ",":
                requirements.append(self.requirement())
            if token:
                raise self.error(f"found '{token}', expected ',' or end of string")
        return Selector(requirements)

    def requirement(self) -> tuple[str, str, frozenset[str]]:
        negated = self.peek() == "!"
        if negated:
            self.take()
        key = self.take()
        if not _is_word(key):
            raise self.error(f"found {_shown(key)}, expected a label key")
        self.check(_label_key_problem(key))
        if self.peek() in ("", ","):
            return key, "!" if negated else "exists", frozenset()
        if negated:
            raise self.error(f"found '{self.peek()}', expected ',' or end of string after '!{key}'")
        op = self.take()
        if op in ("in", "notin"):
            values = self.value_set()
        elif op in ("=", "==", "!="):
            values = frozenset({self.exact_value()})
        elif op in ("<", ">"):
            raise self.error(f"operator '{op}' is not supported; use =, ==, !=, in or notin")
        else:
            raise self.error(f"found {_shown(op)} after '{key}', expected =, ==, !=, in or notin")
        for value in sorted(values):
            self.check(_label_value_problem(value, "value"))
        return key, "=" if op == "==" else op, values

    def exact_value(self) -> str:
        if self.peek() in ("", ","):
            return ""
        value = self.take()
        if not _is_word(value):
            raise self.error(f"found '{value}', expected a value")
        return value

    def value_set(self) -> frozenset[str]:
        token = self.take()
        if token != "(":
            raise self.error(f"found {_shown(token)}, expected '('")
        if self.peek() == ")":
            self.take()
            return frozenset({""})
        # Mirrors apimachinery's parseIdentifiersList, quirks included: a
        # leading, doubled or trailing comma adds the empty value, yet
        # "(,,)" and "(a,,)" are errors there and so here.
        values = set()
        while True:
            token = self.take()
            if token == ",":
                if not values:
                    values.add("")
                if self.peek() == ")":
                    self.take()
                    values.add("")
                    return frozenset(values)
                if self.peek() == ",":
                    self.take()
                    values.add("")
            elif _is_word(token):
                values.add(token)
                if self.peek() == ")":
                    self.take()
                    return frozenset(values)
                if self.peek() != ",":
                    raise self.error(f"found {_shown(self.peek())}, expected ',' or ')'")
            else:
                raise self.error(f"found {_shown(token)}, expected a value, ',' or ')'")

    def check(self, problem: str | None):
        if problem:
            raise self.error(problem)


def _is_word(token: str) -> bool:
    return bool(token) and token not in _SELECTOR_SYMBOLS


def _shown(token: str) -> str:
    return f"'{token}'" if token else "end of string"


def _label_key_problem(key: str) -> str | None:
    """Why *key* is not a Kubernetes qualified name ([prefix/]name), or None."""
    prefix, slash, name = key.rpartition("/")
    if "/" in prefix:
        return f"key '{key}' has more than one '/'"
    if slash and not prefix:
        return f"key '{key}' has an empty prefix before '/'"
    if len(prefix) > 253 or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return (f"key prefix '{prefix}' must be a DNS subdomain: lowercase letters, "
                f"digits, '-' and '.', at most 253 characters")
    if not name:
        return f"key '{key}' has an empty name"
    return _label_value_problem(name, "key name")


def _label_value_problem(value: str, what: str) -> str | None:
    """Why *value* is not a label value (which may be empty), or None."""
    if len(value) > 63:
        return f"{what} '{value}' is longer than 63 characters"
    if value and not _LABEL_NAME.fullmatch(value):
        return (f"{what} '{value}' must be letters, digits, '-', '_' or '.', "
                f"and start and end with a letter or digit")
    return None


###############################################################################
# JSON Schema ##################################################################
###############################################################################
#
# The draft 2020-12 subset that spec and status schemas may use: checked once
# (_check_schema), defaults filled on a private copy (_with_defaults), then
# EVERY error listed as {"field": "spec.a[0].b", "message"}. Either engine,
# ours or the jsonschema package, decides what fails; _keyword_errors words
# the messages for both, so fields and words agree.

SCHEMA_TYPES = ("string", "integer", "number", "boolean", "object", "array", "null")
# Keywords that only annotate: accepted, kept for OpenAPI, never asserted.
# "format" is an annotation in 2020-12 (jsonschema asserts it only on request).
SCHEMA_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "format", "deprecated",
    "readOnly", "writeOnly", "$schema", "$id", "$comment",
})
SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "enum", "const",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
    "maxLength", "pattern", "items", "minItems", "maxItems", "anyOf",
}) | SCHEMA_ANNOTATIONS


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _error(field: str, message: str) -> dict:
    return {"field": field, "message": message}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_type(value, expected: str | list) -> bool:
    """JSON Schema's type test: bool is no number, 1.0 is an integer."""
    if isinstance(expected, list):
        return any(_is_type(value, name) for name in expected)
    if expected == "integer":
        return _is_number(value) and (isinstance(value, int) or value.is_integer())
    checks = {"string": str, "number": (int, float), "boolean": bool,
              "object": dict, "array": list, "null": type(None)}
    return isinstance(value, checks[expected]) and (expected != "number" or _is_number(value))


def _json_type(value) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name):
            return name
    return type(value).__name__


def _admits(schema, value) -> bool:
    if isinstance(schema, bool):
        return schema
    return "type" not in schema or _is_type(value, schema["type"])


def _anyof_branch(branches: list, value) -> int | None:
    """The one anyOf branch whose "type" admits value, or None (none or several).

    Its errors are the ones worth reporting: for `X | None` given a wrong
    object, the user wants the object's fields, not "matches no branch".
    """
    admitting = [i for i, branch in enumerate(branches) if _admits(branch, value)]
    return admitting[0] if len(admitting) == 1 else None


def _type_message(expected, value) -> str:
    names = expected if isinstance(expected, list) else [expected]
    return f"must be of type {' or '.join(names)}, not {_json_type(value)}"


def _schema_errors(schema, value, path: str) -> typing.Iterator[dict]:
    """The builtin engine: yield every error of value, in the schema's keyword order."""
    if schema is True:
        return
    if schema is False:
        yield _error(path, "is not allowed")
        return
    for keyword, expected in schema.items():
        yield from _keyword_errors(keyword, expected, value, path, schema)


def _keyword_errors(keyword, expected, value, path, schema) -> typing.Iterator[dict]:
    """Errors of one keyword of schema on value (its children included)."""
    number, string = _is_number(value), isinstance(value, str)
    array, obj = isinstance(value, list), isinstance(value, dict)
    match keyword:
        case "type" if not _is_type(value, expected):
            yield _error(path, _type_message(expected, value))
        case "enum" if not any(_json_equal(value, item) for item in expected):
            yield _error(path, f"must be one of {json.dumps(expected)}")
        case "const" if not _json_equal(value, expected):
            yield _error(path, f"must be equal to {json.dumps(expected)}")
        case "minimum" if number and value < expected:
            yield _error(path, f"must be >= {expected}")
        case "maximum" if number and value > expected:
            yield _error(path, f"must be <= {expected}")
        case "exclusiveMinimum" if number and value <= expected:
            yield _error(path, f"must be > {expected}")
        case "exclusiveMaximum" if number and value >= expected:
            yield _error(path, f"must be < {expected}")
        case "minLength" if string and len(value) < expected:
            yield _error(path, f"must be at least {expected} characters long")
        case "maxLength" if string and len(value) > expected:
            yield _error(path, f"must be at most {expected} characters long")
        case "pattern" if string and not re.search(expected, value):
            yield _error(path, f"must match the pattern {expected!r}")
        case "minItems" if array and len(value) < expected:
            yield _error(path, f"must have at least {expected} items")
        case "maxItems" if array and len(value) > expected:
            yield _error(path, f"must have at most {expected} items")
        case "required" if obj:
            for name in expected:
                if name not in value:
                    yield _error(_child(path, name), "is required")
        case "properties" if obj:
            for name, sub in expected.items():
                if name in value:
                    yield from _schema_errors(sub, value[name], _child(path, name))
        case "additionalProperties" if obj:
            known = schema.get("properties", {})
            for name in value:
                if name in known:
                    continue
                if expected is False:
                    hint = f"; known fields: {', '.join(known)}" if known else ""
                    yield _error(_child(path, name), "unknown field" + hint)
                else:
                    yield from _schema_errors(expected, value[name], _child(path, name))
        case "items" if array:
            if expected is False and value:
                yield _error(path, "must be an empty array")
            elif expected is not False:
                for index, item in enumerate(value):
                    yield from _schema_errors(expected, item, _child(path, index))
        case "anyOf":
            failures = []
            for branch in expected:
                failures.append(list(_schema_errors(branch, value, path)))
                if not failures[-1]:
                    return
            index = _anyof_branch(expected, value)
            if index is not None:
                yield from failures[index]
            else:
                # No branch admitting the value's type means each has a "type": name them.
                names = [] if any(_admits(b, value) for b in expected) else [
                    name for b in expected if isinstance(b, dict)
                    for name in (b["type"] if isinstance(b["type"], list) else [b["type"]])]
                yield _error(path, _type_message(names, value) if names
                             else "must match at least one of the allowed schemas")


def _jsonschema():
    """The jsonschema module when importable and new enough (draft 2020-12), else None."""
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema if hasattr(jsonschema, "Draft202012Validator") else None


def schema_engine() -> str:
    """Schema's default engine: "jsonschema" when that package (4.0+) imports, else "builtin"."""
    return "jsonschema" if _jsonschema() else "builtin"


def _converted_errors(error, root: str) -> typing.Iterator[dict]:
    """Turn one jsonschema ValidationError into ours (same fields and words as the builtin)."""
    path = root
    for key in error.absolute_path:
        path = _child(path, key)
    if error.validator == "anyOf":
        index = _anyof_branch(error.validator_value, error.instance)
        if index is not None:
            for sub in error.context:
                if sub.relative_schema_path[0] == index:
                    yield from _converted_errors(sub, root)
            return
    if error.validator in (None, "not"):    # a `false` schema, see _jsonschema_form()
        yield _error(path, "is not allowed")
        return
    ours = list(_keyword_errors(error.validator, error.validator_value,
                                error.instance, path, error.schema))
    yield from ours or [_error(path, error.message)]


def _jsonschema_form(schema):
    """Copy of schema for jsonschema, with {"not": {}} for each `false` property schema.

    jsonschema (4.x) reports a value under a `false` property schema without
    the property in its path; the equivalent "not" keeps it.
    """
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: {"not": {}} if sub is False else _jsonschema_form(sub)
                                for name, sub in schema["properties"].items()}
    for keyword in ("additionalProperties", "items"):
        if keyword in schema:
            schema[keyword] = _jsonschema_form(schema[keyword])
    if "anyOf" in schema:
        schema["anyOf"] = [_jsonschema_form(branch) for branch in schema["anyOf"]]
    return schema


def _with_defaults(schema, value, budget: _DefaultsBudget | None = None):
    """Fill missing properties that have a "default", in place in value (which the caller owns).

    Recurses into present objects, list items and additionalProperties values;
    a filled default is walked too. For anyOf the first branch that value
    satisfies once defaulted gives the defaults. Returns the (maybe new) value.
    ``budget`` is charged for each default before it is copied in.
    """
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            value[name] = _with_defaults(properties.get(name, extra), item, budget)
        for name, sub in properties.items():
            if name not in value and isinstance(sub, dict) and "default" in sub:
                if budget is not None:
                    budget.spend(sub["default"])
                value[name] = _with_defaults(sub, copy.deepcopy(sub["default"]), budget)
    elif isinstance(value, list):
        value[:] = [_with_defaults(schema.get("items"), item, budget) for item in value]
    for branch in schema.get("anyOf", ()):
        trial = _with_defaults(branch, copy.deepcopy(value), budget)
        if not any(_schema_errors(branch, trial, "")):
            return trial
    return value


class _DefaultsBudget:
    """The bytes of JSON the defaults filled into one value may add up to.

    A default is small, but the schema can give one to every item of a long
    list, so a small body could grow without it.
    """

    def __init__(self, limit: int):
        self.limit = self.left = limit
        self._sizes: dict[int, int] = {}      # id(default) -> its size; defaults live in the schema

    def spend(self, default) -> None:
        size = self._sizes.get(id(default))
        if size is None:
            size = self._sizes[id(default)] = _size(default)
        self.left -= size
        if self.left < 0:
            raise PayloadTooLargeError(f"the defaults the schema fills in would add more than {self.limit} "
                                       "bytes of JSON (the object limit)")


_EXPECTED = {
    "type": f"a type name or a list of distinct ones from {', '.join(SCHEMA_TYPES)}",
    "properties": "an object mapping field names to schemas",
    "required": "a list of field names",
    "enum": "a non-empty list",
    "anyOf": "a non-empty list of schemas",
    "pattern": "a valid regular expression",
    "title": "a string", "description": "a string", "examples": "a list",
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"), "a number"),
    **dict.fromkeys(("minLength", "maxLength", "minItems", "maxItems"), "a non-negative integer"),
}


def _check_schema(schema, where: str = "#") -> None:
    """Raise ConfigurationError unless schema is in the supported subset and its defaults validate.

    where names the spot in messages ("#/properties/size" for dicts,
    "Rack.size" for dataclass fields).
    """
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConfigurationError(f"invalid schema at {where}: a schema must be a dict or a "
                                 f"boolean, not {type(schema).__name__}")
    for keyword, value in schema.items():
        at = f"{where}/{keyword}"
        ok = True
        match keyword:
            case "type":
                names = [value] if isinstance(value, str) else value
                ok = (isinstance(names, list) and bool(names)
                      and all(isinstance(n, str) and n in SCHEMA_TYPES for n in names)
                      and len(set(names)) == len(names))
            case "properties":
                ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
                for name, sub in value.items() if ok else ():
                    _check_schema(sub, f"{at}/{name}")
            case "additionalProperties" | "items":
                _check_schema(value, at)
            case "required":
                ok = isinstance(value, list) and all(isinstance(n, str) for n in value)
            case "enum" | "anyOf":
                ok = isinstance(value, list) and bool(value)
                for index, sub in enumerate(value) if ok and keyword == "anyOf" else ():
                    _check_schema(sub, f"{at}/{index}")
            case "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum":
                ok = _is_number(value)
            case "minLength" | "maxLength" | "minItems" | "maxItems":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            case "pattern":
                try:
                    re.compile(value)
                except (TypeError, re.error):
                    ok = False
            case "title" | "description":
                ok = isinstance(value, str)
            case "examples":
                ok = isinstance(value, list)
            case _ if keyword in SCHEMA_KEYWORDS or str(keyword).startswith("x-"):
                pass
            case _:
                raise ConfigurationError(
                    f"invalid schema at {where}: unsupported keyword {keyword!r}; supported: "
                    f"{', '.join(sorted(SCHEMA_KEYWORDS))} and x-* extensions")
        if not ok:
            raise ConfigurationError(f"invalid schema at {at}: must be {_EXPECTED[keyword]}, "
                                     f"not {value!r}")
    if schema.get("additionalProperties") is False:
        unknown = [n for n in schema.get("required", []) if n not in schema.get("properties", {})]
        if unknown:
            raise ConfigurationError(f"invalid schema at {where}: required {unknown} are not in "
                                     f"properties, and additionalProperties is false")
    if "default" in schema:
        default = _with_defaults(schema, copy.deepcopy(schema["default"]))
        errors = list(_schema_errors(schema, default, "default"))
        if errors:
            raise ConfigurationError(
                f"invalid schema at {where}: the default {schema['default']!r} does not "
                f"validate ({errors[0]['field']}: {errors[0]['message']})", details=errors)


###############################################################################
# Schemas ######################################################################
###############################################################################
#
# Schema is what register() keeps per kind for spec and status: built from a
# dataclass (via schema_from_dataclass), a JSON-Schema dict or None, checked
# once, immutable afterwards. Dataclass types map to the subset above; what
# cannot be mapped is a ConfigurationError naming Class.field.

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_LITERALS = (str, int, float, bool, type(None))


def schema_from_dataclass(cls) -> dict:
    """Return the JSON Schema (draft 2020-12 subset) of a dataclass type.

    Annotations are resolved with typing.get_type_hints, so modules using
    ``from __future__ import annotations`` work (types must be importable
    from the dataclass's module, not local to a function). Mapping:
    str/int/float/bool, list[X], dict[str, X], X | None and Optional[X]
    (nullable), X | Y (anyOf), Literal[...] (enum), nested dataclasses
    (inline objects), typing.Any (anything). Fields without a default are
    "required"; a default or default_factory() (called once per call here)
    becomes "default"; unknown fields are refused (additionalProperties
    false). Schema keywords in field(metadata=...) ("minimum", "pattern",
    "description", ...) are merged into the field's schema; other metadata
    keys are left to their owners. Raises ConfigurationError naming the field
    for an unsupported annotation, a recursive dataclass, a default that is
    not JSON data or does not validate, or malformed metadata.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigurationError(f"{cls!r} is not a dataclass type")
    return _dataclass_schema(cls, ())


def _dataclass_schema(cls: type, seen: tuple) -> dict:
    if cls in seen:
        chain = " -> ".join(c.__qualname__ for c in (*seen, cls))
        raise ConfigurationError(f"dataclass {cls.__qualname__} contains itself ({chain}); "
                                 f"recursion is not supported (no $ref), use dict or Any there")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise ConfigurationError(f"cannot resolve the annotations of {cls.__qualname__}: {exc}; "
                                 f"define the types at module level") from exc
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        where = f"{cls.__qualname__}.{f.name}"
        prop = _annotation_schema(hints.get(f.name, typing.Any), where, (*seen, cls))
        prop.update({k: v for k, v in f.metadata.items() if k in SCHEMA_KEYWORDS})
        if f.default is not dataclasses.MISSING:
            prop["default"] = _json_data(f.default, where)
        elif f.default_factory is not dataclasses.MISSING:
            prop["default"] = _json_data(f.default_factory(), where)
        else:
            required.append(f.name)
        _check_schema(prop, where)
        properties[f.name] = prop
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _annotation_schema(tp, where: str, seen: tuple) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if tp is type(None):
        return {"type": "null"}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_schema(tp, seen)
    if tp is list or origin is list and len(args) <= 1:
        schema = {"type": "array"}
        if args:
            schema["items"] = _annotation_schema(args[0], where, seen)
        return schema
    if tp is dict or origin is dict and (not args or args[0] is str):
        schema = {"type": "object"}
        if args:
            schema["additionalProperties"] = _annotation_schema(args[1], where, seen)
        return schema
    if origin is typing.Literal and all(type(a) in _LITERALS for a in args):
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        subs = [_annotation_schema(a, where, seen) for a in members]
        schema = subs[0] if len(subs) == 1 else {"anyOf": subs}
        return _nullable(schema) if len(members) < len(args) else schema
    name = getattr(tp, "__qualname__", None) if isinstance(tp, type) else None
    raise ConfigurationError(
        f"{where}: unsupported annotation {name or tp!r}; use str, int, float, bool, list[X], "
        f"dict[str, X], X | None, Literal[...], typing.Any or a dataclass")


def _nullable(schema: dict) -> dict:
    """schema that also admits null, kept flat where JSON Schema allows it."""
    if not schema:
        return schema
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    if list(schema) == ["enum"]:
        return {"enum": [*schema["enum"], None]}
    if list(schema) == ["anyOf"]:
        return {"anyOf": [*schema["anyOf"], {"type": "null"}]}
    return {"anyOf": [schema, {"type": "null"}]}


def _json_data(value, where: str):
    """A dataclass field default as JSON data (dataclass instances as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_data(item, where) for item in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_data(v, where) for k, v in value.items()}
    raise ConfigurationError(f"{where}: the default {value!r} is not JSON data")


class Schema:
    """A compiled spec or status schema; immutable after construction, so thread-safe.

    ``Schema(definition, engine=None)``: definition is a dataclass type, a
    JSON-Schema dict (deep-copied, checked eagerly against the supported
    subset) or None (any object). engine is "builtin", "jsonschema" or None
    for schema_engine(). Raises ConfigurationError for a malformed schema, an
    unsupported dataclass annotation or an unavailable engine.

    ``.json`` is the JSON-Schema dict (fit for OpenAPI 3.1; treat it as
    read-only), ``.engine`` the engine in use.
    """

    def __init__(self, definition=None, engine: str | None = None):
        engine = engine or schema_engine()
        if engine not in ("builtin", "jsonschema"):
            raise ConfigurationError(f"unknown schema engine {engine!r}; "
                                     f"use 'builtin' or 'jsonschema'")
        if engine == "jsonschema" and not _jsonschema():
            raise ConfigurationError("the jsonschema engine needs the jsonschema package (4.0+): "
                                     "pip install jsonschema, or use engine='builtin'")
        if isinstance(definition, Schema):
            schema = definition.json
        elif definition is None:
            schema = {"type": "object"}
        elif isinstance(definition, type) and dataclasses.is_dataclass(definition):
            schema = schema_from_dataclass(definition)
        elif isinstance(definition, dict):
            schema = copy.deepcopy(definition)
            _check_schema(schema)
        else:
            raise ConfigurationError(f"a schema must be a dataclass type, a JSON-Schema dict or "
                                     f"None, not {type(definition).__name__}")
        self.json = schema
        self.engine = engine
        self._validator = None
        if engine == "jsonschema":
            self._validator = _jsonschema().Draft202012Validator(_jsonschema_form(schema))

    def __repr__(self) -> str:
        return f"Schema({self.json!r}, engine={self.engine!r})"

    def validate(self, value, path: str = "spec", *, max_size: int | None = None) -> tuple[object, list[dict]]:
        """Return (value with defaults filled in, errors); never raises for bad data.

        The result is a new object (value is deep-copied, never mutated; a
        dataclass instance is turned into a dict first). Defaults are filled
        before validation, deep-copied, into present objects and into missing
        properties that have a "default". errors lists every failure as
        {"field": "spec.items[2].name", "message": "..."}: a missing required
        field and an unknown field are reported at their own path.

        With ``max_size``, PayloadTooLargeError (413) is raised as soon as
        the defaults filled in add up to more than that many bytes of JSON.
        """
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        budget = None if max_size is None else _DefaultsBudget(max_size)
        value = _with_defaults(self.json, copy.deepcopy(value), budget)
        if self._validator is None:
            found = _schema_errors(self.json, value, path)
        else:
            found = (e for error in self._validator.iter_errors(value)
                     for e in _converted_errors(error, path))
        errors, seen = [], set()
        for error in found:             # jsonschema repeats "required" per missing name
            if (error["field"], error["message"]) not in seen:
                seen.add((error["field"], error["message"]))
                errors.append(error)
        return value, errors

    def check(self, value, path: str = "spec", *, max_size: int | None = None):
        """Return validate()'s defaulted value, or raise ValidationError (422; details: errors)."""
        value, errors = self.validate(value, path, max_size=max_size)
        if errors:
            shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
            more = "; ..." if len(errors) > 3 else ""
            count = f" ({len(errors)} errors)" if len(errors) > 1 else ""
            raise ValidationError(f"{path} is invalid: {shown}{more}{count}", details=errors)
        return value


###############################################################################
# Leader election #############################################################
###############################################################################
#
# Which process runs the controllers and the garbage collector's sweeps. A
# store gives the elector (Store.leader_elector): one that a single process
# opens always leads; one several processes share campaigns for a lease.
# Transitions run their callback one at a time, in order (self._transition).


class LeaderElector:
    """Whether this process is the leader, modelled on client-go's leaderelection.

    ``start(on_started_leading, on_stopped_leading)`` begins: the first
    callback runs when this process becomes the leader, the second when it
    stops being one (the lease is lost, or stop() gives it up). Both take no
    argument; they run one at a time, in the order of the transitions, in
    the thread that saw the transition (for this class: start()'s and
    stop()'s). ``is_leader()`` and ``leader`` (the holder's identity, as far
    as this process knows; None when unknown) are thread-safe.

    This class is the elector of a store only one process opens (the file
    store holds a lock on its directory): it leads from start() until
    stop(). A store that several processes share returns a subclass from
    Store.leader_elector that overrides start() to campaign for a lease in
    its own thread (Kubernetes Lease semantics: holder, renew deadline) and
    stop() to release it, and reports with ``_started_leading()`` and
    ``_stopped_leading(holder)``; a leader that cannot renew must call
    ``_stopped_leading`` before its lease can pass to another process.
    """

    def __init__(self, identity: str):
        self.identity = identity
        self._leading = False
        self._holder: str | None = None
        self._callbacks: tuple[Callable[[], None], Callable[[], None]] | None = None
        self._transition = threading.Lock()     # held while a transition runs its callback

    def start(self, on_started_leading: Callable[[], None], on_stopped_leading: Callable[[], None]) -> None:
        """Begin; this class leads at once, so ``on_started_leading()`` runs before start() returns."""
        self._callbacks = (on_started_leading, on_stopped_leading)
        self._started_leading()

    def stop(self) -> None:
        """Give leadership up: ``on_stopped_leading()`` runs if this process led; no callback runs after."""
        self._stopped_leading(None)
        self._callbacks = None

    def is_leader(self) -> bool:
        return self._leading

    @property
    def leader(self) -> str | None:
        """The identity of the leader (this process's ``identity`` while it leads), or None."""
        return self._holder

    # -- for subclasses: report a transition -------------------------------------
    def _started_leading(self) -> None:
        """This process has become the leader: run on_started_leading (once per transition)."""
        with self._transition:
            if self._leading or self._callbacks is None:
                return
            self._leading, self._holder = True, self.identity
            self._callbacks[0]()

    def _stopped_leading(self, holder: str | None = None) -> None:
        """This process no longer leads (``holder`` does, if known): run on_stopped_leading first."""
        with self._transition:
            self._holder = holder
            if not self._leading:
                return
            self._leading = False
            if self._callbacks is not None:
                self._callbacks[1]()


###############################################################################
# Stores #######################################################################
###############################################################################
#
# The seam (SPEC §3.0). A store is the source of truth for objects AND for
# the order of changes: it hands out resourceVersions and commits every write
# together with its Change. Everything above it (CloudEvents, GET /events
# resume, controllers) is derived from that ordered feed. Store is the
# contract; Store.make_change() is the one rule that turns a write into a
# Change, so every store records the same thing.

RING_BYTES = 64 << 20       # default byte bound of an in-memory change feed (it serves GET /events resume)
RING_SIZE = 10000           # default count bound of it
# metadata fields whose change triggers the object's own controller (SPEC §5.2) and makes a
# write's updateType "metadata"; a Change keeps their earlier values when they change
_TRIGGER_METADATA = ("labels", "annotations", "finalizers", "deletionTimestamp", "ownerReferences")


class Change(typing.NamedTuple):
    """One committed write: an entry of the store's change feed (SPEC §3.0).

    ``resource_version`` (int) orders the feed. ``action`` is ``"created"``,
    ``"updated"``, ``"patched"`` or ``"deleted"``. ``object`` is the object
    after the write; for ``deleted``, its last state carrying the delete's
    resourceVersion. ``previous`` is None for ``created``, otherwise what the
    events and controllers need of the object before the write::

        {"generation": 3,                              # its metadata.generation
         "metadata": {"labels": {...}},                # the trigger fields that changed, as they were
         "conditions": {"Ready": "False"}}             # status by condition type

    ``time`` is the RFC 3339 time of the change (the object's ``updatedAt``;
    for a delete, the time of the delete, recorded once). Every field is
    JSON, so a database keeps a Change as columns and rebuilds it with
    ``Change(*row)``. Treat a Change as read-only: it holds the stored object.
    """

    resource_version: int
    action: str
    object: dict
    previous: dict | None
    time: str

    @property
    def kind(self) -> str:
        return self.object["kind"]

    @property
    def uid(self) -> str:
        return self.object["metadata"]["uid"]

    @property
    def update_type(self) -> str:
        """``"spec"``, ``"metadata"`` or ``"status"``: what the write changed (SPEC §4).

        Creates, deletes and writes that moved the generation (a spec change)
        are ``spec``; a write that changed a trigger metadata field (labels,
        annotations, finalizers, deletionTimestamp, ownerReferences) is
        ``metadata``; any other committed write changed the status.
        """
        previous = self.previous
        if previous is None or self.action == "deleted" or \
                previous["generation"] != self.object["metadata"]["generation"]:
            return "spec"
        return "metadata" if previous["metadata"] else "status"


class ExpiredError(GoneError):
    """``Store.changes(since)`` was asked for changes the store no longer retains (Kubernetes'
    "too old resource version", HTTP 410): re-list, then follow from the current resourceVersion."""


class StoreWatch:
    """What ``Store.watch()`` returns: ``close()`` stops the calls (idempotent, thread-safe)."""

    __slots__ = ("_store", "listener")

    def __init__(self, store: Store, listener):
        self._store, self.listener = store, listener

    def close(self) -> None:
        self._store._unwatch(self)


class Store:
    """The storage interface: objects, spec history and the ordered change feed (SPEC §3.0).

    Override these methods to implement a store (``IndexedStore`` implements
    them over an in-memory index for MemoryStore and FileStore; a database
    store implements them directly and touches nothing else)::

        open(kinds, discover=)      lock, recover, load; kinds maps kind -> plural
        close()
        add_kind(kind, plural), drop_kind(kind)
        get(kind, uid), find(kind, name) -> dict | None
        query(kind, selector, name=, after=, limit=) -> (page, total, next name | None)
        count(kind) -> int
        resource_version            property: the newest committed resourceVersion (int)
        dependents(kind, uid) -> [(kind, uid)], gone(kind, uid) -> bool
        create(obj, snapshot, guard, wait_for, max_size=) -> obj
        replace(obj, expected_rv, action, snapshot, max_size=) -> obj
        delete(kind, uid, expected_rv, last) -> the object's last state
        versions(kind, uid), get_version(kind, uid, id), delete_version(...), prune_versions(...)
        changes(since) -> iterator of Change

    (open() sets ``self._opened``, close() clears it) and announce each commit: build its record with ``self.make_change(action,
    old, new)``, then call ``self._announce(change, size)``, once per commit,
    in resourceVersion order, never two at a time (``size``: the bytes of the
    object's JSON, which a store measures anyway to check or store it).

    What every implementation guarantees:

    * resourceVersions are store-wide integers, strictly increasing with
      every committed write, never reused (across deletes and restarts too);
      create/replace/delete write the object's new resourceVersion into it.
    * A write either commits (object, history snapshot and Change together)
      or changes nothing anyone can observe, and raises: ConflictError
      (``details[0]["field"]`` is ``metadata.uid`` for a taken uid) for a
      taken uid or name, NotFoundError, StaleError for a moved
      resourceVersion, PayloadTooLargeError, ValidationError (not JSON, too
      deep), StoreError/InsufficientStorageError for I/O (SPEC §3.0 recovery
      rules; the message says what is stored now).
    * Every method is thread-safe. Objects it returns are the stored ones
      (or equal copies): callers treat them as read-only.
    * ``gone()`` is True only for what the store positively knows does not
      exist (not loaded is not gone); ``unsure`` says which kinds may not be
      all loaded, ``health()`` what start-up could not load.

    Class attributes: ``durable`` (writes survive a crash) and ``shared``
    (several processes serve it: PostgreSQL). A shared store also overrides
    ``leader_elector(identity)``: the one provided always leads.
    """

    durable = True
    shared = False          # True for stores several processes share (PostgreSQL)

    def __init__(self):
        self.unsure: dict[str, str] = {}   # kind ("*": every kind) -> why not all its objects may be loaded
        self.discovered: dict[str, str] = {}               # kinds found in storage: kind -> plural
        self.writes = 0
        self.write_failures = 0
        self._listeners: tuple[StoreWatch, ...] = ()       # replaced whole under _watch_lock
        self._watch_lock = threading.Lock()
        self._opened = False        # open() sets it, close() clears it

    # -- override these ------------------------------------------------------
    def open(self, kinds: dict[str, str], *, discover: bool = False) -> None:
        """Lock, recover and load. ``kinds`` maps kind -> plural; ``discover`` takes on stored kinds too
        (an open server), listing them in ``discovered``. Raises StoreLockedError if another process
        holds the store, StoreError if it cannot be used."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def add_kind(self, kind: str, plural: str) -> None:
        raise NotImplementedError

    def drop_kind(self, kind: str) -> None:
        """Forget a kind that holds no object (an open server's new kind whose creates all failed)."""
        raise NotImplementedError

    @property
    def resource_version(self) -> int:
        """The newest committed resourceVersion."""
        raise NotImplementedError

    def get(self, kind: str, uid: str) -> dict | None:
        raise NotImplementedError

    def find(self, kind: str, name: str) -> dict | None:
        raise NotImplementedError

    def query(self, kind: str, selector: Selector | None = None, *, name: str | None = None,
              after: str | None = None, limit: int | None = None) -> tuple[list[dict], int, str | None]:
        """Objects of a kind by name: (page, total matching, name to continue after or None).

        ``after`` resumes after that name, so a walk through pages returns
        every object that existed for the whole walk exactly once.
        """
        raise NotImplementedError

    def count(self, kind: str) -> int:
        raise NotImplementedError

    def dependents(self, kind: str, uid: str) -> list[tuple[str, str]]:
        """(kind, uid) of every object whose ownerReferences name this one, sorted."""
        raise NotImplementedError

    def gone(self, kind: str, uid: str) -> bool:
        """Whether the store positively knows that no object ``(kind, uid)`` exists.

        Not loaded is not gone (SPEC §3.0): garbage collection deletes a
        dependent only when every owner is gone.
        """
        raise NotImplementedError

    def create(self, obj: dict, snapshot: dict | None = None, guard=None, wait_for=(), *,
               max_size: int | None = None) -> dict:
        """Store a new object with the next resourceVersion (and, with ``snapshot``, its history).

        ``guard()`` runs atomically with the commit once no write to the
        ``wait_for`` keys ((kind, uid) pairs) is in flight (fabrica's owner
        check), so what it checks cannot change before the commit. An object
        over ``max_size`` bytes of JSON raises PayloadTooLargeError.
        """
        raise NotImplementedError

    def replace(self, obj: dict, expected_rv: str, action: str = "updated", snapshot: dict | None = None, *,
                max_size: int | None = None) -> dict:
        """Replace an object if its stored resourceVersion is still ``expected_rv`` (a string).

        ``action`` (``updated`` or ``patched``) is what its Change records.
        A write that does not grow an object is never refused for its size.
        """
        raise NotImplementedError

    def delete(self, kind: str, uid: str, expected_rv: str | None = None, last: dict | None = None) -> dict:
        """Delete an object (guarded by ``expected_rv`` unless None); its last state carrying the
        delete's resourceVersion: the stored object, or ``last`` when the deleting write also
        changed it (it removed the last finalizer, SPEC §5.6)."""
        raise NotImplementedError

    def versions(self, kind: str, uid: str) -> list[dict]:
        """Spec snapshots of an object, oldest first."""
        raise NotImplementedError

    def get_version(self, kind: str, uid: str, version_id: str) -> dict | None:
        raise NotImplementedError

    def delete_version(self, kind: str, uid: str, version_id: str) -> bool:
        """Forget one snapshot; False if there was none. StoreError/InsufficientStorageError on I/O."""
        raise NotImplementedError

    def prune_versions(self, kind: str, uid: str, keep: int | None) -> bool:
        """Keep the newest ``keep`` snapshots (None: all, 0: none). Housekeeping after a committed
        write: never raises; returns whether every snapshot it was asked to drop is gone."""
        raise NotImplementedError

    def changes(self, since: int | None = None) -> typing.Iterator[Change]:
        """The retained changes with a resourceVersion after ``since``, in order (None: every one).

        Raises ExpiredError, when called, if a change after ``since`` is no
        longer retained (an in-memory feed is bounded, and starts empty:
        what was committed before this process started is not retained).
        """
        raise NotImplementedError

    # -- provided --------------------------------------------------------------
    @property
    def opened(self) -> bool:
        """Whether the store is open: between open() and close()."""
        return self._opened

    def resolve(self, kind: str, ref: str) -> dict | None:
        """A uid first, then a name (SPEC §1)."""
        obj = self.get(kind, ref)
        return obj if obj is not None else self.find(kind, ref)

    def list(self, kind: str) -> list[dict]:
        """Every object of a kind, sorted by name (a stable order for paging)."""
        return self.query(kind)[0]

    def orphan_candidates(self, kind: str) -> list[dict]:
        """Objects of ``kind`` with an ownerReference to an object the store does not hold (the start-up
        orphan sweep looks at these only). A store with an owner index answers without reading the rest."""
        return [obj for obj in self.list(kind) if any(self.get(ref["kind"], ref["uid"]) is None
                                                       for ref in obj["metadata"]["ownerReferences"])]

    def finalizer_candidates(self, kind: str, finalizer: str, *, present: bool) -> list[dict]:
        """Objects of ``kind`` whose finalizers hold ``finalizer`` (``present``) or do not (the start-up
        finalizer sweep looks at these only). A store with a finalizer index answers from it."""
        return [obj for obj in self.list(kind) if (finalizer in obj["metadata"]["finalizers"]) == present]

    def health(self) -> dict:
        """What start-up could not load: ``{"quarantined": [...], "ignored": [...]}``."""
        return {"quarantined": [], "ignored": []}

    def leader_elector(self, identity: str) -> LeaderElector:
        """The elector that decides whether the process ``identity`` leads (runs the controllers).

        A store that one process alone opens always leads: this returns
        LeaderElector(identity). A store several processes share overrides it.
        """
        return LeaderElector(identity)

    def retained(self) -> tuple[int, int]:
        """(changes, bytes) the store holds in memory to answer changes(); (0, 0) if it keeps none."""
        return 0, 0

    def watch(self, listener) -> StoreWatch:
        """Call ``listener(change, size)`` after every commit from now on; ``close()`` the handle to stop.

        Calls come in resourceVersion order, one at a time, from the
        committing thread (an embedded store holds its lock: the listener
        must be quick and must not write to the store; the Bus only queues).
        ``size`` is the bytes of ``change.object`` as JSON. A listener that
        raises is logged; the write it announces stays committed.
        """
        handle = StoreWatch(self, listener)
        with self._watch_lock:
            self._listeners = self._listeners + (handle,)
        return handle

    def _unwatch(self, handle: StoreWatch) -> None:
        with self._watch_lock:
            self._listeners = tuple(h for h in self._listeners if h is not handle)

    @staticmethod
    def make_change(action: str, old: dict | None, new: dict) -> Change:
        """The Change of a committed write: ``old`` is the object before (None for a create), ``new``
        the object after (for a delete, its last state), both carrying their resourceVersions."""
        meta = new["metadata"]
        previous = None
        if old is not None:
            before = old["metadata"]
            conditions = {}
            for cond in old["status"].get("conditions") or ():
                if isinstance(cond, dict) and isinstance(cond.get("type"), str):
                    conditions[cond["type"]] = cond.get("status")
            previous = {"generation": before["generation"],
                        "metadata": {k: before[k] for k in _TRIGGER_METADATA if before[k] != meta[k]},
                        "conditions": conditions}
        when = utcnow() if action == "deleted" else meta["updatedAt"]
        return Change(int(meta["resourceVersion"]), action, new, previous, when)

    def _announce(self, change: Change, size: int) -> None:
        # after the commit: a failure here must not turn a stored write into an error answer
        for handle in self._listeners:
            try:
                handle.listener(change, size)
            except Exception:
                store_log.exception("could not announce the change of %s %s at resourceVersion %s",
                                    change.kind, change.uid, change.resource_version)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


###############################################################################
# Memory store #################################################################
###############################################################################
#
# IndexedStore implements Store over an in-memory index, a commit pipeline
# and a bounded in-memory change feed; MemoryStore keeps nothing else and
# FileStore persists through its hooks. One condition (self._cond) guards the
# index, the resourceVersion counters, the in-flight sets and the feed. A
# write checks and takes its rv under it, persists WITHOUT it (so fsyncs of
# different objects overlap), then waits for its turn and commits in rv
# order: index update, feed append and the watchers (the bus, which only
# queues; never user code) happen in resourceVersion order. Reads take no
# lock: they read dicts and copy lists (atomic under the GIL).


class IndexedStore(Store):
    """A Store served from an in-memory index, with a bounded in-memory change feed.

    Subclasses persist through the hooks _load(), _reserve(), _persist(),
    _unpersist() and the history ones; reads never touch them. The feed
    keeps the newest ``feed_size`` changes and at most ``feed_bytes`` bytes
    of them (an object's JSON counts), whichever bound is reached first,
    plus the newest change it let go of (so a resume from that change's
    own events is still answered); it starts empty at open().
    """

    def __init__(self, *, feed_size: int = RING_SIZE, feed_bytes: int = RING_BYTES):
        super().__init__()
        self._cond = threading.Condition(threading.RLock())
        self._lock = self._cond
        self._inflight: set[tuple[str, str]] = set()       # (kind, uid) being written
        self._inflight_names: set[tuple[str, str]] = set() # (kind, name) being created
        self._pending: collections.deque = collections.deque()  # (rv, turn event) not yet committed, in order
        self._blocked = 0                                  # writers waiting for an in-flight key or name
        self._allocated = 0                                # the last rv handed to a write
        self._objects: dict[str, dict[str, dict]] = {}     # kind -> uid -> object
        self._names: dict[str, dict[str, str]] = {}        # kind -> name -> uid
        self._plurals: dict[str, str] = {}                 # kind -> plural
        self._sorted: dict[str, list[str]] = {}            # kind -> names, sorted (paging order)
        self._labels: dict[str, dict[str, dict[str, set[str]]]] = {}   # kind -> key -> value -> uids
        self._owned: dict[tuple[str, str], set[tuple[str, str]]] = {}    # owner (kind, uid) -> dependents
        # owners this process deleted while dependents still name them: known gone even in a kind
        # the store is unsure of; an entry leaves with the owner's last dependent (so it stays bounded)
        self._deleted_owners: set[tuple[str, str]] = set()
        self._rv = 0
        self.quarantined: list[dict] = []       # files this start-up quarantined
        self.still_quarantined: list[dict] = [] # files earlier start-ups quarantined that are still there
        self.ignored: list[dict] = []           # folders of the data dir start-up did not load
        self._history: dict[tuple[str, str], dict[str, dict]] = {}    # (kind, uid) -> versionId -> snapshot
        # the change feed: every change after _floor is in _feed or is _boundary (the newest one let go)
        self.feed_size = feed_size
        self.feed_bytes = feed_bytes
        self._feed: collections.deque = collections.deque()     # (Change, bytes), in rv order
        self._feed_held = 0                                     # those bytes, summed
        self._boundary: Change | None = None
        self._floor = 0

    # -- life cycle --------------------------------------------------------
    def open(self, kinds: dict[str, str], *, discover: bool = False) -> None:
        """Lock, recover and load. ``kinds`` maps kind -> plural; ``discover`` loads unknown kinds too."""
        for kind, plural in kinds.items():
            self.add_kind(kind, plural)
        self._load(discover)
        for names in self._sorted.values():
            names.sort()
        self._allocated = self._floor = self._rv
        self._feed.clear()
        self._feed_held, self._boundary = 0, None
        self._opened = True

    def close(self) -> None:
        self._opened = False

    def add_kind(self, kind: str, plural: str) -> None:
        with self._lock:
            self._objects.setdefault(kind, {})
            self._names.setdefault(kind, {})
            self._sorted.setdefault(kind, [])
            self._labels.setdefault(kind, {})
            self._plurals[kind] = plural

    def drop_kind(self, kind: str) -> None:
        """Forget a kind that holds no object (an open server's new kind whose creates all failed)."""
        with self._lock:
            if not self._objects.get(kind):
                for index in (self._objects, self._names, self._sorted, self._labels, self._plurals):
                    index.pop(kind, None)

    @property
    def resource_version(self) -> int:
        """The newest committed resourceVersion."""
        return self._rv

    def health(self) -> dict:
        """What start-up could not load: files in the quarantine (of any start-up) and ignored folders."""
        return {"quarantined": [*self.quarantined, *self.still_quarantined], "ignored": list(self.ignored)}

    # -- reads -------------------------------------------------------------
    def get(self, kind: str, uid: str) -> dict | None:
        return self._objects.get(kind, {}).get(uid)

    def find(self, kind: str, name: str) -> dict | None:
        uid = self._names.get(kind, {}).get(name)
        return None if uid is None else self._objects[kind].get(uid)

    def resolve(self, kind: str, ref: str) -> dict | None:
        """A uid first, then a name (SPEC §1)."""
        objs = self._objects.get(kind)
        if objs is None:
            return None
        obj = objs.get(ref)
        if obj is None:
            uid = self._names[kind].get(ref)
            obj = None if uid is None else objs.get(uid)
        return obj

    def query(self, kind: str, selector: Selector | None = None, *, name: str | None = None,
              after: str | None = None, limit: int | None = None) -> tuple[list[dict], int, str | None]:
        """Objects of a kind by name: (page, total matching, name to continue after or None).

        ``after`` resumes after that name, so a walk through pages returns every
        object that existed for the whole walk exactly once. A selector with an
        equality, ``in`` or exists requirement is answered from the label index.
        Reads take snapshots (list/set copies are atomic) instead of the lock.
        """
        objs = self._objects.get(kind)
        if objs is None:
            return [], 0, None
        if name is not None:
            obj = self.find(kind, name)
            items = [] if obj is None or (selector and not selector.matches(obj["metadata"]["labels"])) else [obj]
        elif selector is not None and selector.index_candidates():
            uids = None
            index = self._labels[kind]
            for key, values in selector.index_candidates():
                by_value = index.get(key, {})
                found = set()
                for value in (list(by_value) if values is None else values):
                    found |= set(by_value.get(value, ()))
                uids = found if uids is None else uids & found
            items = [o for o in map(objs.get, uids) if o is not None and selector.matches(o["metadata"]["labels"])]
            items.sort(key=lambda o: o["metadata"]["name"])
        elif selector is None and limit is not None:
            # a page by name: O(limit + log N), not O(N), so paging a big kind stays flat
            with self._cond:
                names, order = self._names[kind], self._sorted[kind]
                start = 0 if after is None else bisect.bisect_right(order, after)
                page = [objs[names[n]] for n in order[start:start + limit + 1]]
                total = len(order)
            more = page[limit - 1]["metadata"]["name"] if len(page) > limit else None
            return page[:limit], total, more
        else:
            names = self._names[kind]
            items = [o for o in (objs.get(names.get(n, "")) for n in list(self._sorted[kind])) if o is not None]
            if selector is not None:
                items = [o for o in items if selector.matches(o["metadata"]["labels"])]
        total = len(items)
        if after is not None:
            keys = [o["metadata"]["name"] for o in items]
            items = items[bisect.bisect_right(keys, after):]
        more = None
        if limit is not None and len(items) > limit:
            items = items[:limit]
            more = items[-1]["metadata"]["name"]
        return items, total, more

    def count(self, kind: str) -> int:
        return len(self._objects.get(kind, {}))

    # -- spec history ------------------------------------------------------
    def versions(self, kind: str, uid: str) -> list[dict]:
        """Spec snapshots of an object, oldest first."""
        found = dict(self._history.get((kind, uid), {}))
        return [found[v] for v in sorted(found, key=int)]

    def get_version(self, kind: str, uid: str, version_id: str) -> dict | None:
        return self._history.get((kind, uid), {}).get(version_id)

    def delete_version(self, kind: str, uid: str, version_id: str) -> bool:
        """Forget one snapshot; False if there was none.

        Raises StoreError/InsufficientStorageError if the disk fails; the index
        then holds what the disk shows (the error says which).
        """
        with self._lock:
            found = self._history.get((kind, uid), {})
            if version_id not in found:
                return False
            what = f"version {version_id} of {kind} {uid}"
            try:
                self._drop_version(kind, uid, version_id)
            except OSError as exc:
                self.write_failures += 1
                cls = InsufficientStorageError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
                if getattr(exc, "fabrica_visible", False):
                    raise cls(f"{what} is deleted, but the disk failed to confirm it ({exc.strerror or exc}): "
                              "it may come back after a crash; check the disk") from None
                raise cls(f"could not delete {what}: {exc.strerror or exc}; it is still stored") from None
            return True

    def prune_versions(self, kind: str, uid: str, keep: int | None) -> bool:
        """Keep the newest ``keep`` snapshots; None keeps all; 0 drops every one.

        Housekeeping after a committed write, so it never raises: a snapshot the
        disk refuses to remove is logged and left for the next prune. Returns
        whether every snapshot it was asked to drop is gone.
        """
        with self._lock:
            found = self._history.get((kind, uid), {})
            ids = sorted(found, key=int)
            drop = ids if keep == 0 else ids[:max(0, len(ids) - keep)] if keep else []
            done = True
            for version_id in drop:
                try:
                    self._drop_version(kind, uid, version_id)
                except OSError as exc:
                    done = False
                    store_log.warning("could not remove version %s of %s %s (%s); the next prune retries",
                                      version_id, kind, uid, exc.strerror or exc)
            if (kind, uid) not in self._history:
                self._forget_versions(kind, uid)
            return done

    def _drop_version(self, kind, uid, version_id):
        """Remove one snapshot from disk and index (lock held); the index follows what the disk shows."""
        error = None
        try:
            self._unpersist_version(kind, uid, version_id)
        except OSError as exc:
            if not getattr(exc, "fabrica_visible", False):
                raise
            error = exc         # gone from the disk but unconfirmed: a restart would not serve it either
        found = self._history[(kind, uid)]
        del found[version_id]
        if not found:
            del self._history[(kind, uid)]
        if error is not None:
            raise error

    def dependents(self, kind: str, uid: str) -> list[tuple[str, str]]:
        """(kind, uid) of every object whose ownerReferences name this one."""
        return sorted(self._owned.get((kind, uid), ()))

    def gone(self, kind: str, uid: str) -> bool:
        """Whether the store positively knows that no object ``(kind, uid)`` exists.

        Not loaded is not gone (SPEC §3.0): True only for a declared kind
        whose stored objects were all loaded (see ``unsure``) and that holds
        no such uid, or for an object this process deleted. Garbage
        collection deletes a dependent only when every owner is gone.
        """
        objs = self._objects.get(kind)
        if objs is None or uid in objs:
            return False
        if (kind, uid) in self._deleted_owners:
            return True
        return kind not in self.unsure and "*" not in self.unsure

    # -- writes ------------------------------------------------------------
    def create(self, obj: dict, snapshot: dict | None = None, guard=None, wait_for=(), *,
               max_size: int | None = None) -> dict:
        """Store a new object and give it the next resourceVersion.

        Raises ConflictError (``details[0]["field"]`` is ``metadata.uid`` for a
        uid collision) when the uid or the name is taken, and
        StoreError/InsufficientStorageError on I/O errors. ``guard()`` runs
        under the lock once no write to the ``wait_for`` keys is in flight
        (fabrica's owner check), so what it checks cannot change before the commit.
        An object over ``max_size`` bytes of JSON raises PayloadTooLargeError, one whose
        spec or status nests deeper than MAX_DEPTH ValidationError (both checked before
        anything is written).
        """
        kind, meta = obj["kind"], obj["metadata"]
        objs, names = self._objects[kind], self._names[kind]

        def check(old):
            if guard is not None:
                guard()
            if old is not None or meta["uid"] in names:
                raise ConflictError(f"uid {meta['uid']} is taken", [{"field": "metadata.uid", "message": "taken"}])
            if meta["name"] in names or (meta["name"] in objs and meta["name"] != meta["uid"]):
                raise ConflictError(f'{kind} "{meta["name"]}" already exists; choose another name',
                                    [{"field": "metadata.name", "message": "already exists"}])
        return self._write("created", obj, check, snapshot, name=(kind, meta["name"]), wait_for=wait_for,
                           max_size=max_size)

    def replace(self, obj: dict, expected_rv: str, action: str = "updated", snapshot: dict | None = None, *,
                max_size: int | None = None) -> dict:
        """Replace an object if its stored resourceVersion is still ``expected_rv``.

        Raises NotFoundError if it is gone and StaleError (a ConflictError) if it moved on;
        PayloadTooLargeError if the object is over ``max_size`` bytes of JSON and larger
        than the stored one (a write that does not grow an object is never refused), and
        ValidationError if its spec or status nests deeper than MAX_DEPTH and deeper than the
        stored one's.
        """
        kind = obj["kind"]
        return self._write(action, obj, lambda old: self._check_current(kind, old, obj["metadata"]["name"],
                                                                         expected_rv), snapshot, max_size=max_size)

    def delete(self, kind: str, uid: str, expected_rv: str | None = None, last: dict | None = None) -> dict:
        """Delete an object; returns its last state carrying the delete's resourceVersion.

        That last state is the stored object, or ``last`` (taken, not copied)
        when the write that deletes it also changed it: the one that removes
        its last finalizer (SPEC §5.6), whose answer and ``deleted`` event show
        the object without them.
        """
        def check(old):
            self._check_current(kind, old, uid, expected_rv)
            return last if last is not None else dict(old, metadata=dict(old["metadata"]))
        return self._write("deleted", None, check, key=(kind, uid))

    def _check_current(self, kind, old, ref, expected_rv):
        if old is None:
            raise NotFoundError(f'{kind} "{ref}" not found')
        if expected_rv is not None and old["metadata"]["resourceVersion"] != expected_rv:
            raise StaleError(
                f'{kind} "{old["metadata"]["name"]}" is at resourceVersion {old["metadata"]["resourceVersion"]}, '
                f"the request expected {expected_rv}; re-read and retry")

    def _write(self, action: str, new: dict | None, check, snapshot: dict | None = None, *,
               key: tuple[str, str] | None = None, name: tuple[str, str] | None = None, wait_for=(),
               max_size: int | None = None) -> dict:
        """The commit pipeline shared by create/replace/delete.

        1. Under the lock, once no other write to this key (or name) is in
           flight: check() against the index, allocate the next resourceVersion.
        2. Without the lock: persist (temp file, fsync, rename, directory fsync).
           Writes to different objects run in parallel, so their fsyncs overlap
           and the directory fsyncs are shared (group commit).
        3. Under the lock, strictly in resourceVersion order: update the index,
           append the Change to the feed and announce it. A failed write
           announces nothing, changes nothing, and leaves a hole in the
           numbering that nobody ever saw.

        The one exception: if the disk failed to confirm a change that is
        already visible and the store could not undo it (the OSError carries
        ``fabrica_visible``), the index follows the disk, so a GET serves what a
        restart would; the change is announced and the error says so.
        """
        key = key or (new["kind"], new["metadata"]["uid"])
        kind = key[0]
        size = 0
        if new is not None:
            # before a resourceVersion is taken: a value that is not JSON, or that nests deeper than
            # start-up loads, must never reach a file (what a GET serves, a restart serves)
            try:
                text = dumps(new)
            except RecursionError:      # hundreds of levels: far past any limit
                raise self._depth_error(new) from None
            except (TypeError, ValueError) as exc:
                raise ValidationError(f'{kind} "{new["metadata"]["name"]}" holds a value that is not JSON: {exc}',
                                      [{"field": "", "message": str(exc)}]) from None
            size = _utf8_size(text)
            if text.count("{") + text.count("[") > MAX_OBJECT_DEPTH:     # only then can it nest that deep
                self._check_depth(new)
            if max_size is not None and size > max_size:
                self._check_size(new, size, max_size)
        cond = self._cond
        with cond:
            while key in self._inflight or (name is not None and name in self._inflight_names) or any(
                    k in self._inflight for k in wait_for):
                self._blocked += 1
                try:
                    cond.wait()
                finally:
                    self._blocked -= 1
            old = self._objects[kind].get(key[1])
            tomb = check(old)
            if action == "deleted":
                new = tomb
            rv = self._allocated + 1
            if rv > INT64_MAX:      # start-up would refuse the object (a hand-edited file can get here)
                raise StoreError(f"resourceVersions are used up (2^63-1): nothing can be written to {kind}")
            try:
                self._reserve(rv)
            except OSError as exc:
                raise self._write_error(action, new, exc) from None
            self._allocated = rv
            self._inflight.add(key)
            if name is not None:
                self._inflight_names.add(name)
            turn = threading.Event()        # set when every earlier rv has committed or failed
            if not self._pending:
                turn.set()
            self._pending.append((rv, turn))
        new["metadata"]["resourceVersion"] = str(rv)
        error = None
        try:
            if action == "deleted":
                size = json_size(new)       # the delete's share of the feed's byte bound
            if snapshot is not None:        # first: the object's rename is the commit point of both
                self._persist_version(kind, key[1], snapshot)
            try:
                if action == "deleted":
                    self._unpersist(new, old)
                else:
                    self._persist(old, new)
            except OSError as exc:
                if snapshot is not None and not getattr(exc, "fabrica_visible", False):
                    # if this fails too, start-up drops the snapshot: it is newer than its object
                    with contextlib.suppress(OSError):
                        self._unpersist_version(kind, key[1], snapshot["versionId"])
                raise
        except BaseException as exc:    # whatever happens, this rv must leave the pipeline below
            error = exc
        visible = getattr(error, "fabrica_visible", False)
        turn.wait()         # one wake-up per write, not every waiter on every commit
        with cond:
            try:
                if error is None or visible:
                    self._apply(action, kind, key[1], old, new, snapshot)
                    self._rv = rv
                    self.writes += 1
                    self._record(self.make_change(action, old, new), size)
                if error is not None:
                    self.write_failures += 1
            finally:
                self._pending.popleft()
                if self._pending:
                    self._pending[0][1].set()
                self._inflight.discard(key)
                if name is not None:
                    self._inflight_names.discard(name)
                if self._blocked:
                    cond.notify_all()       # writers waiting for this key or name
        if isinstance(error, OSError):
            raise self._write_error(action, new, error) from None
        if error is not None:
            raise error
        return new

    def _apply(self, action, kind, uid, old, new, snapshot):
        """Put a committed write into the index (lock held)."""
        if action == "deleted":
            del self._objects[kind][uid]
            self._names[kind].pop(old["metadata"]["name"], None)
            self._indexes(kind, old, None)
            if self._owned.get((kind, uid)):
                self._deleted_owners.add((kind, uid))
            return
        self._objects[kind][uid] = new
        self._names[kind][new["metadata"]["name"]] = uid
        self._indexes(kind, old, new)
        if snapshot is not None:
            self._history.setdefault((kind, uid), {})[snapshot["versionId"]] = snapshot

    def _check_size(self, new: dict, size: int, max_size: int) -> None:
        # an object stored before the limit was lowered may still shrink or stay the same size
        old = self._objects[new["kind"]].get(new["metadata"]["uid"])
        if old is None or size > json_size(old):
            raise PayloadTooLargeError(
                f'{new["kind"]} "{new["metadata"]["name"]}" would be {size} bytes of JSON; the limit for an object '
                f"is {max_size} bytes", [{"field": "", "message": f"larger than {max_size} bytes"}])

    def _check_depth(self, new: dict) -> None:
        depth = json_depth(new)
        if depth <= MAX_OBJECT_DEPTH:
            return
        # as with the size, an object a former version stored deeper (start-up loads up to
        # MAX_FILE_DEPTH) may still be written as long as it gets no deeper
        old = self._objects[new["kind"]].get(new["metadata"]["uid"])
        if old is None or depth > min(json_depth(old), MAX_FILE_DEPTH):
            raise self._depth_error(new)

    @staticmethod
    def _depth_error(new: dict) -> ValidationError:
        depth, field = max((json_depth(new.get(part)), part) for part in ("spec", "status"))
        return ValidationError(
            f'{new["kind"]} "{new["metadata"]["name"]}" would nest its {field} {depth} levels deep; the limit is '
            f"{MAX_DEPTH} levels", [{"field": field, "message": f"nests deeper than {MAX_DEPTH} levels"}])

    @staticmethod
    def _write_error(action: str, obj: dict, exc: OSError) -> FabricaError:
        """The error a failed write answers, saying what the store holds now."""
        name = f'{obj["kind"]} "{obj["metadata"]["name"]}"'
        verb = {"created": "create", "deleted": "delete"}.get(action, "write")
        cls = InsufficientStorageError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StoreError
        if getattr(exc, "fabrica_visible", False):
            now = "it is deleted now" if action == "deleted" else \
                f'resourceVersion {obj["metadata"]["resourceVersion"]} is stored now'
            return cls(f"the disk failed to confirm the {verb} of {name} ({exc.strerror or exc}) and it could "
                       f"not be undone: {now}, but it may not survive a crash; check the disk")
        kept = {"created": "nothing was stored", "deleted": "it is still stored"}.get(
            action, "the previous version is intact")
        if cls is InsufficientStorageError:
            return cls(f"no space left to {verb} {name}; {kept}, free space and retry")
        return cls(f"could not {verb} {name}: {exc.strerror or exc}; {kept}")

    # -- the change feed -----------------------------------------------------
    def changes(self, since: int | None = None) -> typing.Iterator[Change]:
        with self._cond:
            floor, boundary, feed = self._floor, self._boundary, list(self._feed)
        if since is not None and since < floor:
            raise ExpiredError(f"changes after resourceVersion {since} are no longer retained (the oldest "
                               f"retained change follows {floor}); re-list and watch from now")
        found = ([] if boundary is None else [boundary]) + [change for change, _ in feed]
        if since is not None:
            found = found[bisect.bisect_right([c.resource_version for c in found], since):]
        return iter(found)

    def retained(self) -> tuple[int, int]:
        return len(self._feed), self._feed_held

    def _record(self, change: Change, size: int) -> None:
        """Append a committed Change to the feed, let go of the oldest past the bounds, announce it
        (lock held, in rv order). ``size`` is the object's JSON bytes, which the write measured."""
        held = size + (0 if change.previous is None else json_size(change.previous))
        feed = self._feed
        feed.append((change, held))
        self._feed_held += held
        while feed and (len(feed) > self.feed_size or self._feed_held > self.feed_bytes):
            self._boundary, gone = feed.popleft()
            self._feed_held -= gone
            self._floor = self._boundary.resource_version - 1
        self._announce(change, size)

    # -- subclass hooks ----------------------------------------------------
    def _load(self, discover: bool) -> None:
        """Fill the index from durable storage (start-up)."""

    def _reserve(self, rv: int) -> None:
        """Make sure ``rv`` can never be handed out again after a restart."""

    def _persist(self, old: dict | None, new: dict) -> None:
        """Durably write ``new`` (replacing ``old``); raise OSError and leave ``old`` intact on failure."""

    def _unpersist(self, tomb: dict, old: dict) -> None:
        """Durably remove the object ``tomb`` describes (``old`` is its stored state)."""

    def _persist_version(self, kind: str, uid: str, snapshot: dict) -> None:
        """Durably store one spec snapshot."""

    def _unpersist_version(self, kind: str, uid: str, version_id: str) -> None:
        """Durably remove one spec snapshot (one already gone is fine).

        An OSError with ``fabrica_visible`` set means it is gone but the disk
        did not confirm it.
        """

    def _forget_versions(self, kind: str, uid: str) -> None:
        """Tidy up once an object has no snapshot left (lock held; does nothing while the object
        exists; best effort, never raises)."""

    def _index(self, obj: dict) -> None:
        """Add a loaded object to the index (start-up, from _load(); no change is recorded).

        Its name goes to the end of the kind's names: open() sorts them once
        _load() returns (one sort instead of an insertion per object).
        """
        kind, meta = obj["kind"], obj["metadata"]
        self._objects[kind][meta["uid"]] = obj
        self._names[kind][meta["name"]] = meta["uid"]
        self._indexes(kind, None, obj, ordered=False)
        rv = int(meta["resourceVersion"])
        if rv > self._rv:
            self._rv = rv

    def _indexes(self, kind: str, old: dict | None, new: dict | None, *, ordered: bool = True) -> None:
        """Keep the sorted names (``ordered``), the owners and the label index in step (lock held)."""
        names, index = self._sorted[kind], self._labels[kind]
        if not ordered:
            names.append(new["metadata"]["name"])
        elif old is None or new is None:
            name = (new or old)["metadata"]["name"]
            at = bisect.bisect_left(names, name)
            if new is not None:
                names.insert(at, name)
            elif at < len(names) and names[at] == name:
                del names[at]
        uid = (new or old)["metadata"]["uid"]
        old_refs = old["metadata"]["ownerReferences"] if old else []
        new_refs = new["metadata"]["ownerReferences"] if new else []
        if old_refs != new_refs:
            for ref in old_refs:
                owner = (ref["kind"], ref["uid"])
                dependents = self._owned.get(owner)
                if dependents is not None:
                    dependents.discard((kind, uid))
                    if not dependents:
                        del self._owned[owner]      # owners come and go: keep no empty set behind
                        self._deleted_owners.discard(owner)
            for ref in new_refs:
                self._owned.setdefault((ref["kind"], ref["uid"]), set()).add((kind, uid))
        old_labels = old["metadata"]["labels"] if old else {}
        new_labels = new["metadata"]["labels"] if new else {}
        if old_labels == new_labels:
            return
        for key, value in old_labels.items():
            if new_labels.get(key) != value:
                uids = index.get(key, {}).get(value)
                if uids is not None:
                    uids.discard(uid)
                    if not uids:
                        del index[key][value]
                        if not index[key]:
                            del index[key]
        for key, value in new_labels.items():
            if old_labels.get(key) != value:
                index.setdefault(key, {}).setdefault(value, set()).add(uid)


class MemoryStore(IndexedStore):
    """Keeps everything in memory only, for tests and throwaway runs: nothing outlives the process."""

    durable = False


###############################################################################
# File store ##################################################################
###############################################################################
#
# FileStore: one pretty-printed JSON file per resource, written with the
# durable recipe (temp file, fsync, rename, directory fsync; the directory
# fsyncs of concurrent writes are shared), a flock per data dir, and start-up
# recovery that removes temp files and quarantines what it cannot load.

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NotAFile(OSError):
    """What _open_regular() found is not a regular file: ``what`` it is ("a FIFO"), and ``strerror``."""

    def __init__(self, code: int, what: str, path: str):
        super().__init__(code, f"{what} (not followed)" if code == errno.ELOOP else f"not a regular file ({what})",
                         path)
        self.what = what


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of the regular file at ``path``; _NotAFile for anything else, OSError if it cannot be opened.

    Every file the store reads under the data dir is opened here: a symbolic
    link is never followed (O_NOFOLLOW), a FIFO or a device never blocks the
    open (O_NONBLOCK), and fstat tells what was opened before a byte is read.
    """
    return _open_regular_stat(path, flags, mode)[0]


def _open_regular_stat(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> tuple[int, os.stat_result]:
    """_open_regular(), and what fstat said of the file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise _NotAFile(exc.errno, "a symbolic link" if exc.errno == errno.ELOOP else "a directory",
                            path) from None
        raise
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _NotAFile(errno.EINVAL, next((name for test, name in _FILE_TYPES if test(info.st_mode)), "unknown"),
                        path)
    return fd, info


def _real_dir(path: str) -> bool:
    """A directory, and not through a symbolic link (the store never follows one)."""
    return os.path.isdir(path) and not os.path.islink(path)


def _read_regular(path: str) -> bytes:
    """The bytes of the regular file at ``path`` (see _open_regular)."""
    fd, info = _open_regular_stat(path)
    try:
        # os.read with the size fstat gave: start-up reads every file, and a file object per read
        # costs as much as the read itself. A short read of a regular file is its end.
        data = os.read(fd, info.st_size + 1)
        if len(data) == info.st_size:
            return data
        chunks = [data]     # it changed since the fstat: read on to the end
        while data:
            data = os.read(fd, 1 << 16)
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


class DirSyncer:
    """Group commit for directory fsyncs: one fsync covers every rename done before it began.

    A writer calls sync(dir) after its rename. If a sync of that directory is
    running, it waits for the next one; otherwise it runs one for everybody.
    A failed fsync fails every writer whose rename it was meant to cover.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())  # guards _dirs
        # dir -> [renames, synced upto, running, failed upto, writers inside sync()]; an entry
        # lives only while a writer is inside sync(), as every object's history has its own dir
        self._dirs: dict[str, list] = {}

    def sync(self, directory: str) -> None:
        with self._cond:
            state = self._dirs.setdefault(directory, [0, 0, False, 0, 0])
            state[0] += 1
            state[4] += 1
            ticket = state[0]
            try:
                while state[1] < ticket:
                    if ticket <= state[3]:
                        raise OSError(errno.EIO, "directory fsync failed")
                    if state[2]:
                        self._cond.wait()
                        continue
                    state[2], target = True, state[0]
                    self._cond.release()
                    ok = False
                    try:
                        _fsync_dir(directory)
                        ok = True
                    finally:
                        self._cond.acquire()
                        state[2] = False
                        if ok:
                            state[1] = max(state[1], target)
                        else:
                            state[3] = max(state[3], target)
                        self._cond.notify_all()
            finally:
                state[4] -= 1
                if not state[4]:
                    del self._dirs[directory]


_TEMP_RE = re.compile(r"\.tmp-[0-9a-f]{12}\.part")
_RV_SLOT = 30       # b"<20 digits> <crc32 of the digits, 8 hex>\n"
_RV_SLOT_RE = re.compile(rb"(\d{20}) ([0-9a-f]{8})\n")


def _rv_slot_bytes(value: int) -> bytes:
    digits = f"{value:020d}"
    return f"{digits} {zlib.crc32(digits.encode()):08x}\n".encode()


def _rv_slot_value(raw: bytes) -> int:
    """The reservation a slot holds, -1 if it holds none (empty, torn or garbled)."""
    match = _RV_SLOT_RE.fullmatch(raw)
    if match is None or int(match.group(2), 16) != zlib.crc32(match.group(1)):
        return -1
    return int(match.group(1))


class FileStore(IndexedStore):
    """One pretty-printed JSON file per resource: ``<data_dir>/<plural>/<uid>.json``.

    Every write is a unique temp file in the same directory, write, flush,
    fsync, os.replace, fsync of the directory, and only then acknowledged
    (``durable=False`` skips both fsyncs). ``<data_dir>/.fabrica/`` holds the
    lock file (flock, held for the life of the store), the resourceVersion
    reservation, the spec history and the quarantine of files start-up
    recovery could not use. Start-up needs no free space: what it would like
    to write (a quarantine move, a tidy-up) is logged and skipped if it fails.
    """

    RV_BLOCK = 1000

    def __init__(self, data_dir: str, *, durable: bool = True, feed_size: int = RING_SIZE,
                 feed_bytes: int = RING_BYTES):
        super().__init__(feed_size=feed_size, feed_bytes=feed_bytes)
        self.data_dir = os.path.abspath(data_dir)
        self.state_dir = os.path.join(self.data_dir, ".fabrica")
        self.durable = durable
        self._lock_fd = None
        self._rv_fd = None              # the reservation file, open for in-place writes (None: rewrite it whole)
        self._rv_slots = [-1, -1]       # the reservation each slot holds (-1: none or unreadable)
        self._reserved = 0
        self._dirsync = DirSyncer()
        self._dirs_made: set[str] = set()
        self.temp_removed = 0

    # -- life cycle --------------------------------------------------------
    def open(self, kinds, *, discover=False):
        os.makedirs(self.state_dir, exist_ok=True)
        self._acquire_lock()
        try:
            super().open(kinds, discover=discover)
        except BaseException:
            self.close()
            raise

    def close(self):
        super().close()
        if self._rv_fd is not None:
            os.close(self._rv_fd)
            self._rv_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # releases the flock
            self._lock_fd = None

    def _acquire_lock(self):
        path = os.path.join(self.state_dir, "lock")
        try:
            fd = _open_regular(path, os.O_RDWR | os.O_CREAT)
        except _NotAFile as exc:
            raise StoreError(f"cannot lock the data dir: {path} is {exc.what}, not a regular file; remove it "
                             "and start again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"data dir {self.data_dir} is locked by pid {holder}: another fabrica "
                                   f"process is using it; stop it or use another data dir (serve --data-dir, FABRICA_DATA_DIR "
                                   f"or Fabrica(data_dir=...))") from None
        pid = f"{os.getpid()}\n".encode()
        try:        # over the old pid, then cut: no new block needed, so this works on a full disk
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)     # never name a stale holder
            store_log.warning("could not write the pid into %s: %s", path, exc.strerror or exc)
        self._lock_fd = fd

    # -- recovery ----------------------------------------------------------
    def _load(self, discover):
        self._rv = self._read_reservation()
        by_plural = {plural: kind for kind, plural in self._plurals.items()}
        dirs, found = [], []
        for entry in sorted(os.listdir(self.data_dir)):
            path = os.path.join(self.data_dir, entry)
            if entry.startswith(".") or not os.path.isdir(path):
                continue
            kind = by_plural.get(entry)
            if os.path.islink(path):
                self._ignore(entry, "a symbolic link (not followed)", kind)
            elif kind is not None:
                dirs.append((entry, kind))
            elif not discover:      # perhaps the folder of a kind whose plural= changed
                self._ignore(entry, "no registered kind has this plural")
            elif not PLURAL_RE.fullmatch(entry) or entry in RESERVED_PATHS:
                self._ignore(entry, "not a plural (lower-case letters and digits, not a reserved path)")
            else:
                found.append((entry, self._folder_kind(path)))
        dirs += self._adopt(found)
        self._remove_temp_files({entry for entry, _ in dirs})
        for entry, kind in dirs:
            if kind not in self._plurals:
                self.add_kind(kind, entry)
                self.discovered[kind] = entry
            self._load_dir(entry, kind)
        self._note_quarantine()
        self._load_history()
        self._list_quarantine()
        self._reserved = self._rv
        if self.quarantined:
            store_log.error("start-up recovery quarantined %d file(s) into %s", len(self.quarantined),
                            os.path.join(self.state_dir, "quarantine"))
        store_log.info("loaded %d object(s) from %s (resourceVersion %d, %d temp file(s) removed, %d quarantined)",
                       sum(len(o) for o in self._objects.values()), self.data_dir, self._rv,
                       self.temp_removed, len(self.quarantined))

    def _ignore(self, entry: str, reason: str, kind: str | None = None) -> None:
        """Leave a folder of the data dir unloaded, and say why.

        One that may hold resources (a link, or .json files) is listed in
        /health and makes the store unsure of ``kind`` (None: of every kind),
        so that no owner in it is taken for deleted (SPEC §3.0).
        """
        path = os.path.join(self.data_dir, entry)
        store_log.warning("ignoring %s/: %s", path, reason)
        try:
            holds = os.path.islink(path) or any(name.endswith(".json") for name in os.listdir(path))
        except OSError:
            holds = True
        if holds:
            self.unsure.setdefault(kind or "*", f"{entry}/ is not loaded: {reason}")
            self.ignored.append({"path": f"{entry}/", "reason": reason})

    def _folder_kind(self, path) -> str | None:
        """The kind of the first valid resource in a folder (by file name), None if it holds none."""
        for entry in sorted(os.listdir(path)):
            if entry.endswith(".json"):
                problem, obj = self._read_file(os.path.join(path, entry), entry[:-5], None)
                if problem is None:
                    return obj["kind"]
        return None

    def _adopt(self, found) -> list[tuple[str, str]]:
        """Which of the open server's folders to load, as (folder, kind); the others are ignored.

        ``found`` lists each candidate folder with the kind of its first valid
        resource. A folder holding none is not a kind's folder. A kind's
        folder is its registered plural or, failing that, ``pluralize(kind)``
        when that folder exists; any other folder of the kind (a copy, a
        backup) is ignored. With neither, the kind's one folder is adopted,
        and if it has several, none is: which one is right cannot be told.
        """
        names = {entry for entry, _ in found}
        folders: dict[str, list[str]] = {}
        for entry, kind in found:
            if kind is None:
                self._ignore(entry, "it holds no valid resource")
            else:
                folders.setdefault(kind, []).append(entry)
        adopted = []
        for kind, entries in folders.items():
            home = self._plurals.get(kind) or pluralize(kind)
            if kind in self._plurals or home in names:
                chosen = home if home in entries and kind not in self._plurals else None
                for entry in entries:
                    if entry != chosen:
                        self._ignore(entry, f"another folder of kind {kind}, whose folder is {home}/", kind)
            elif len(entries) == 1:
                chosen = entries[0]
            else:
                chosen = None
                for entry in entries:
                    self._ignore(entry, f"one of {len(entries)} folders of kind {kind} ({', '.join(entries)}), "
                                 f"none of them {home}/: rename the right one to {home}/", kind)
            if chosen is not None:
                adopted.append((chosen, kind))
        return adopted

    def _remove_temp_files(self, skip: set[str]) -> None:
        """Remove the temp files of writes that never committed (the rename is the commit point),
        anywhere under the data dir; the kind directories in ``skip`` are swept as they load."""
        for directory, subdirs, files in os.walk(self.data_dir):     # symbolic links are not followed
            if directory == self.data_dir:
                subdirs[:] = [d for d in subdirs if d not in skip]
            for entry in files:
                if _TEMP_RE.fullmatch(entry):
                    self._remove_temp(os.path.join(directory, entry))

    def _remove_temp(self, path):
        try:
            os.unlink(path)
            self.temp_removed += 1
        except OSError as exc:      # never committed, so it is never loaded: it can wait for the next start
            store_log.warning("could not remove the temp file %s: %s", path, exc.strerror or exc)

    def _load_dir(self, plural, kind):
        directory = os.path.join(self.data_dir, plural)
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if _TEMP_RE.fullmatch(entry):
                self._remove_temp(path)
                continue
            if not entry.endswith(".json"):
                continue
            reason, obj = self._read_file(path, entry[:-5], kind)
            if reason is None and obj["metadata"]["name"] in self._names[kind]:
                reason = f"duplicate name {obj['metadata']['name']!r}"
            if reason is None:
                self._index(obj)
            else:
                self._quarantine(path, plural, entry, reason)

    @staticmethod
    def _read_document(path):
        """(problem, parsed JSON): the store's files are hand-editable, so a UTF-8 byte-order mark
        (and CRLF line ends, which JSON takes as whitespace) are accepted, unlike in a request body."""
        try:
            raw = _read_regular(path)
        except _NotAFile as exc:
            return exc.strerror, None
        except OSError as exc:
            return f"unreadable: {exc.strerror}", None
        raw = raw.removeprefix(b"\xef\xbb\xbf")
        if not raw:
            return "empty file", None
        try:
            return None, read_json(raw, max_depth=MAX_FILE_DEPTH)
        except BadRequestError as exc:
            return exc.message.replace("malformed JSON", "does not parse"), None

    def _read_file(self, path, stem, kind):
        problem, obj = self._read_document(path)
        problem = problem or envelope_problem(obj, kind, stem)
        # normalize_object() also puts the shared key constants in place of each file's own key
        # strings: taking a file that already holds every key in order as it is costs 1 KB an object
        return problem, (None if problem else normalize_object(obj))

    def _note_quarantine(self):
        """Mark the kinds that quarantined files (of this or an earlier start-up) may belong to as unsure.

        A quarantined owner is not a deleted owner (SPEC §3.0): while its file
        sits in the quarantine, garbage collection must not take its absence
        for a deletion. A file counts for the kind of the folder it came from
        and, if it parses, for the kind it names; a folder no kind claims
        counts for every kind.
        """
        root = os.path.join(self.state_dir, "quarantine")
        by_plural = {plural: kind for kind, plural in self._plurals.items()}
        for plural in sorted(os.listdir(root)) if _real_dir(root) else ():
            directory = os.path.join(root, plural)
            if not PLURAL_RE.fullmatch(plural) or not _real_dir(directory):
                continue        # spec snapshots (history-<plural>) and the store's own files name no owner
            entries = os.listdir(directory)
            if not entries:
                continue
            why = f"quarantined files in .fabrica/quarantine/{plural}/"
            self.unsure.setdefault(by_plural.get(plural, "*"), why)
            for entry in entries:
                with contextlib.suppress(OSError, BadRequestError):     # a quarantined link is never followed
                    doc = read_json(_read_regular(os.path.join(directory, entry)), max_depth=MAX_FILE_DEPTH)
                    if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
                        self.unsure.setdefault(doc["kind"], why)

    def _quarantine(self, path, plural, entry, reason):
        root = os.path.join(self.state_dir, "quarantine")
        qdir = os.path.join(root, plural)
        item = {"path": os.path.relpath(path, self.data_dir), "reason": reason, "quarantinedTo": None}
        try:
            for directory in (root, qdir):      # a file is never moved out of the data dir
                if os.path.islink(directory):
                    raise OSError(errno.ELOOP, f"{os.path.relpath(directory, self.data_dir)} is a symbolic link")
            os.makedirs(qdir, exist_ok=True)
            target, n = os.path.join(qdir, entry), 1
            while os.path.lexists(target):
                target, n = os.path.join(qdir, f"{entry}.{n}"), n + 1
            os.replace(path, target)
            item["quarantinedTo"] = os.path.relpath(target, self.data_dir)
            if self.durable:
                _fsync_dir(qdir)
                _fsync_dir(os.path.dirname(path))
        except OSError as exc:
            # a full or failing disk must not stop the start: the file is not loaded, stays where it
            # is (the next start tries again) and is reported all the same
            if item["quarantinedTo"] is None:
                item["reason"] += f" (left in place: it could not be moved, {exc.strerror or exc})"
        self.quarantined.append(item)
        moved = f" (moved to {item['quarantinedTo']})" if item["quarantinedTo"] else ""
        store_log.error("quarantined %s: %s%s", item["path"], item["reason"], moved)

    def _list_quarantine(self) -> None:
        """Report every file in the quarantine, not only this start-up's (SPEC §3.1: never silently skipped).

        While one sits there, its kind's objects count as not all loaded
        (``unsure``), which holds garbage collection back: /health stays
        degraded until each is mended and moved back, or deleted.
        """
        root = os.path.join(self.state_dir, "quarantine")
        if os.path.lexists(root) and not _real_dir(root):
            store_log.error("%s is not a directory (it is not followed): nothing can be quarantined", root)
            self.still_quarantined.append({"path": os.path.relpath(root, self.data_dir), "quarantinedTo": None,
                                           "reason": "not a directory: files start-up cannot load stay in place"})
            return
        moved = {item["quarantinedTo"] for item in self.quarantined}
        for folder in sorted(os.listdir(root)) if _real_dir(root) else ():
            directory = os.path.join(root, folder)
            entries = [os.path.join(directory, e) for e in sorted(os.listdir(directory))] \
                if _real_dir(directory) else [directory]
            for path in entries:
                where = os.path.relpath(path, self.data_dir)
                if where not in moved:
                    self.still_quarantined.append({"path": where, "quarantinedTo": where,
                                                   "reason": "quarantined by an earlier start-up"})
        if self.still_quarantined:
            store_log.error("%d file(s) quarantined by earlier start-ups are still in %s (listed in /health): "
                            "mend each and move it back, or delete it, then restart", len(self.still_quarantined),
                            root)

    # -- the resourceVersion reservation ------------------------------------
    # resourceVersions are handed out from blocks reserved on disk first, so a
    # restart (or a delete of the newest object) can never reuse one. The file
    # holds two checksummed slots rewritten in place, the older one each time
    # (bbolt's two meta pages): no new block is needed, so the first write
    # after a start works on a full disk, and a torn slot fails its checksum
    # while the other one still holds a reservation no handed-out rv exceeds.

    def _read_reservation(self) -> int:
        path = os.path.join(self.state_dir, "resource-version")
        try:
            raw = _read_regular(path)
        except FileNotFoundError:
            raw = b""
        except _NotAFile as exc:    # moved aside, so that a real file can take its place
            self._quarantine(path, "fabrica-state", "resource-version", exc.strerror)
            raw = b""
        self._rv_slots = [_rv_slot_value(raw[i * _RV_SLOT:(i + 1) * _RV_SLOT]) for i in (0, 1)]
        if max(self._rv_slots) >= 0:
            self._rv_fd = _open_regular(path, os.O_RDWR)
            return max(self._rv_slots)
        legacy = raw.removeprefix(b"\xef\xbb\xbf").strip()     # one number, written by temp file and rename
        digits = legacy.lstrip(b"0") or b"0"
        valid = legacy.isdigit() and len(digits) <= 19 and int(digits) <= INT64_MAX      # as every rv
        if legacy and not valid:
            store_log.error("%s holds no valid reservation: resourceVersions go on after the newest object",
                            path)
        reserved = int(digits) if valid else 0
        try:    # into the two-slot form, while there is space (else the first write tries again)
            self._write_reservation(reserved)
        except OSError as exc:
            store_log.warning("could not rewrite %s: %s", path, exc.strerror or exc)
        return reserved

    def _write_reservation(self, block: int) -> None:
        """Reserve every resourceVersion up to ``block`` durably (raises OSError)."""
        if self._rv_fd is None:
            path = os.path.join(self.state_dir, "resource-version")
            self._atomic_write(self.state_dir, path, _rv_slot_bytes(block) * 2)
            self._rv_fd = _open_regular(path, os.O_RDWR)
            self._rv_slots = [block, block]
            return
        slot = 0 if self._rv_slots[0] <= self._rv_slots[1] else 1
        self._rv_slots[slot] = -1       # unknown until the write is confirmed: the next try reuses this slot
        os.pwrite(self._rv_fd, _rv_slot_bytes(block), slot * _RV_SLOT)
        if self.durable:
            os.fsync(self._rv_fd)
        self._rv_slots[slot] = block

    def _reserve(self, rv):
        if rv > self._reserved:
            block = rv + self.RV_BLOCK
            self._write_reservation(block)
            self._reserved = block

    # -- durable writes ----------------------------------------------------
    def _path(self, obj) -> tuple[str, str]:
        uid = obj["metadata"]["uid"]
        if not UID_RE.fullmatch(uid):       # belt and braces: nothing outside the data dir
            raise ValueError(f"refusing to build a path from uid {uid!r}")
        directory = os.path.join(self.data_dir, self._plurals[obj["kind"]])
        return directory, os.path.join(directory, uid + ".json")

    def _ensure_dir(self, directory):
        if directory not in self._dirs_made:
            if os.path.islink(directory):       # start-up does not load it, so nothing may be written there
                raise OSError(errno.ELOOP, f"{os.path.basename(directory)}/ is a symbolic link, which the store "
                              "does not follow")
            if not os.path.isdir(directory):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory)
                if self.durable:
                    _fsync_dir(self.data_dir)
            self._dirs_made.add(directory)

    def _replace_file(self, directory, path, payload: bytes, *, strict: bool = True):
        """Write ``payload`` to a unique temp file in ``directory``, fsync it, rename it to ``path``.

        With ``strict=False`` a failed fsync is ignored (an undo on a failing
        disk: the file must show the right content, durable or not).
        """
        fd, tmp = _mkstemp(directory)
        try:
            try:
                _write_all(fd, payload)
                if self.durable:
                    try:
                        os.fsync(fd)
                    except OSError:
                        if strict:
                            raise
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _atomic_write(self, directory, path, payload: bytes):
        self._replace_file(directory, path, payload)
        if self.durable:
            try:
                self._dirsync.sync(directory)
            except OSError as exc:
                exc.fabrica_renamed = True      # the new name is visible: the caller must undo it
                raise

    def _persist(self, old, new):
        directory, path = self._path(new)
        try:
            self._ensure_dir(directory)
        except FileNotFoundError:       # the kind directory vanished under us: make it again
            self._dirs_made.discard(directory)
            self._ensure_dir(directory)
        try:
            self._atomic_write(directory, path, _file_bytes(new))
        except OSError as exc:
            self._dirs_made.discard(directory)
            if getattr(exc, "fabrica_renamed", False) and not self._undo(path, old):
                exc.fabrica_visible = True
            raise

    def _unpersist(self, tomb, old):
        directory, path = self._path(tomb)
        with contextlib.suppress(FileNotFoundError):       # already gone: what the delete wants holds
            os.unlink(path)
        if self.durable:
            try:
                self._dirsync.sync(directory)
            except OSError as exc:
                if not self._undo(path, old):
                    exc.fabrica_visible = True
                raise

    def _undo(self, path, old) -> bool:
        """Put ``old`` (None: no file) back at ``path`` after the disk failed to confirm a change.

        True if the file shows ``old`` again. The disk is failing, so fsync
        errors are ignored here: what matters now is that the file shows what
        the index serves; whether either survives a crash is unknown anyway.
        """
        directory = os.path.dirname(path)
        try:
            if old is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                self._replace_file(directory, path, _file_bytes(old), strict=False)
        except OSError:
            store_log.exception("could not put back the previous state of %s after a failed write", path)
            return False
        if self.durable:
            with contextlib.suppress(OSError):
                _fsync_dir(directory)
        return True

    # -- spec history --------------------------------------------------------
    def _history_dir(self, kind: str, uid: str) -> str:
        if not UID_RE.fullmatch(uid):
            raise ValueError(f"refusing to build a path from uid {uid!r}")
        return os.path.join(self.state_dir, "history", self._plurals[kind], uid)

    def _persist_version(self, kind, uid, snapshot):
        directory = self._history_dir(kind, uid)
        path = os.path.join(directory, f"{int(snapshot['versionId'])}.json")
        os.makedirs(directory, exist_ok=True)
        try:
            self._atomic_write(directory, path, _file_bytes(snapshot))
        except OSError as exc:
            if getattr(exc, "fabrica_renamed", False):
                self._undo(path, None)      # if it stays, start-up drops it: it is newer than its object
            raise

    def _unpersist_version(self, kind, uid, version_id):
        directory = self._history_dir(kind, uid)
        try:
            os.unlink(os.path.join(directory, f"{int(version_id)}.json"))
        except FileNotFoundError:
            return
        if self.durable:
            try:
                _fsync_dir(directory)
            except OSError as exc:
                exc.fabrica_visible = True
                raise

    def _forget_versions(self, kind, uid):
        if uid not in self._objects[kind]:      # never under a live object: its next spec write needs the folder
            with contextlib.suppress(OSError):
                os.rmdir(self._history_dir(kind, uid))

    def _load_history(self):
        """Load the spec snapshots of every loaded object, dropping the ones no write committed.

        A snapshot is written before its object, so a crash in between leaves
        one newer than the object's generation (or one of an object that was
        never created); a crash between a delete and its history cleanup
        leaves the snapshots of an object that is gone. Neither was ever
        acknowledged: they are removed. The history of an object that is in
        the quarantine stays, for when the object is mended, and so does every
        history of a kind the store is unsure of (``unsure``): an object that
        was not read is not a deleted object (SPEC §3.0).
        """
        root = os.path.join(self.state_dir, "history")
        by_plural = {plural: kind for kind, plural in self._plurals.items()}
        self._not_a_folder(root, "fabrica-state", "history")
        for plural in sorted(os.listdir(root) if _real_dir(root) else ()):
            kind = by_plural.get(plural)
            if kind is None or self._not_a_folder(os.path.join(root, plural), "fabrica-state", f"history-{plural}"):
                continue        # a kind this app does not serve: leave its history alone
            held = self._quarantined_uids(plural)
            for uid in sorted(os.listdir(os.path.join(root, plural))):
                directory = os.path.join(root, plural, uid)
                obj = self._objects[kind].get(uid)
                if (obj is None and uid in held) or not UID_RE.fullmatch(uid) or \
                        self._not_a_folder(directory, f"history-{plural}", uid):
                    continue
                for entry in sorted(os.listdir(directory)):
                    if not entry.endswith(".json"):
                        continue
                    path = os.path.join(directory, entry)
                    reason, snap = self._read_snapshot(path, uid, entry[:-5])
                    if reason is not None:
                        self._quarantine(path, f"history-{plural}", f"{uid}-{entry}", reason)
                    elif obj is None and (kind in self.unsure or "*" in self.unsure):
                        self._history.setdefault((kind, uid), {})[snap["versionId"]] = snap    # not read: kept
                    elif obj is None:
                        store_log.warning("removing %s: its object does not exist", path)
                        self._remove_stale(path)
                    elif int(snap["versionId"]) > obj["metadata"]["generation"]:
                        store_log.warning("removing %s: newer than its object (a write that never committed)", path)
                        self._remove_stale(path)
                    else:
                        self._history.setdefault((kind, uid), {})[snap["versionId"]] = snap
                if (kind, uid) not in self._history:
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)

    def _not_a_folder(self, path, folder, entry) -> bool:
        """Quarantine what stands where the store keeps a folder of its own; True if something did.

        A file there would fail every write that needs the folder, and a
        symbolic link would take reads and writes out of the data dir.
        """
        if not os.path.lexists(path) or _real_dir(path):
            return False
        self._quarantine(path, folder, entry, "a symbolic link (not followed)" if os.path.islink(path) else
                         "not a folder, where the store keeps one")
        return True

    def _quarantined_uids(self, plural) -> set[str]:
        """The uids whose object file of this plural sits in the quarantine (from any start)."""
        held = {os.path.basename(item["path"]).split(".")[0] for item in self.quarantined
                if os.path.dirname(item["path"]) == plural}
        qdir = os.path.join(self.state_dir, "quarantine", plural)
        held.update(entry.split(".")[0] for entry in (os.listdir(qdir) if _real_dir(qdir) else ()))
        return held

    def _read_snapshot(self, path, uid, stem):
        problem, snap = self._read_document(path)
        if problem is None:
            version = snap.get("versionId")
            if not isinstance(version, str) or not version.isascii() or not version.isdigit() or \
                    version != stem or version != str(int(version)) or int(version) < 1:
                problem = "versionId is missing or does not match the file name"
            elif snap.get("uid", uid) != uid:
                problem = "uid does not match its folder"
            elif not isinstance(snap.get("spec"), dict):
                problem = "spec is not an object"
            elif not valid_name(snap.get("name", "x")) or ("createdAt" in snap and not _is_time(snap["createdAt"])):
                problem = "name or createdAt is invalid"
            elif not _is_string_map(snap.get("labels", {})) or not _is_string_map(snap.get("annotations", {})):
                problem = "labels or annotations is not an object of strings"
        return problem, snap

    def _remove_stale(self, path):
        try:
            os.unlink(path)
        except OSError as exc:      # not loaded either way: the next start tries again
            store_log.warning("could not remove %s: %s", path, exc.strerror or exc)


def _file_bytes(obj) -> bytes:
    """The file form: indented two levels deep (one line per field of metadata, spec and status), each
    deeper value on one line. As readable and diffable as indent=2 for resources, and it keeps the C
    encoder: json.dumps(indent=...) runs the pure-Python one, the biggest CPU cost of a write."""
    lines = ["{"]
    last = len(obj) - 1
    for i, (key, value) in enumerate(obj.items()):
        comma = "," if i < last else ""
        if isinstance(value, dict) and value:
            lines.append(f"  {_file_json(key)}: {{")
            inner = len(value) - 1
            lines.extend(f"    {_file_json(k)}: {_file_json(v)}{',' if j < inner else ''}"
                         for j, (k, v) in enumerate(value.items()))
            lines.append("  }" + comma)
        else:
            lines.append(f"  {_file_json(key)}: {_file_json(value)}{comma}")
    lines.append("}\n")
    return "\n".join(lines).encode("utf-8")


def _file_json(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def _mkstemp(directory):
    # tempfile.mkstemp() without its per-call overhead: a random name, O_EXCL.
    for _ in range(100):
        name = os.path.join(directory, f".tmp-{os.urandom(6).hex()}.part")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), name
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "could not create a unique temp file")


def _write_all(fd, payload):
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


###############################################################################
# SQLite store ################################################################
###############################################################################
#
# SQLiteStore keeps everything in one SQLite file (stdlib sqlite3, WAL): the
# objects, their label and owner index rows, spec history, the change feed and
# the resourceVersion counter. Nothing is loaded into memory but a count per
# kind. One writer thread owns the only writing connection: every write is a
# job on its queue, and each batch it drains is ONE transaction (a savepoint
# per job) and one COMMIT, acknowledged only after that COMMIT (group commit).
# Reads take a connection from a pool, so they never wait for a write.

SQLITE_APPLICATION_ID = 0x46616272     # "Fabr" in PRAGMA application_id: marks a fabrica database
SQLITE_SCHEMA_VERSION = 1              # PRAGMA user_version
SQLITE_BATCH = 256                     # writes in one transaction at most
SQLITE_QUICK_CHECK_BYTES = 64 << 20    # start-up runs PRAGMA quick_check on databases up to this size
CHANGE_RETENTION = RING_SIZE          # changes the feed keeps by default (as many as the file store's)
SQLITE_CACHE = 4096                    # parsed objects kept for reads of an unchanged row ...
SQLITE_CACHE_BYTES = 16 << 20          # ... and the characters of their documents, at most

_SQLITE_SCHEMA = """
CREATE TABLE fabrica (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE kinds (kind TEXT PRIMARY KEY, plural TEXT NOT NULL, objects INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE objects (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, uid TEXT NOT NULL, name TEXT NOT NULL,
    labels TEXT NOT NULL,           -- metadata.labels as JSON: what a selector matches
    doc TEXT NOT NULL,              -- the whole object as JSON
    UNIQUE (kind, uid), UNIQUE (kind, name));
CREATE TABLE labels (
    kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    id INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    PRIMARY KEY (kind, key, value, id)) WITHOUT ROWID;
CREATE INDEX labels_of_object ON labels (id);
CREATE TABLE owners (
    owner_kind TEXT NOT NULL, owner_uid TEXT NOT NULL,
    id INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    PRIMARY KEY (owner_kind, owner_uid, id)) WITHOUT ROWID;
CREATE INDEX owners_of_object ON owners (id);
CREATE TABLE finalizers (
    kind TEXT NOT NULL, finalizer TEXT NOT NULL,
    id INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    PRIMARY KEY (kind, finalizer, id)) WITHOUT ROWID;
CREATE INDEX finalizers_of_object ON finalizers (id);
CREATE TABLE history (
    kind TEXT NOT NULL, uid TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (kind, uid, version)) WITHOUT ROWID;
CREATE TABLE changes (
    resource_version INTEGER PRIMARY KEY, action TEXT NOT NULL, time TEXT NOT NULL,
    object TEXT NOT NULL, previous TEXT);
INSERT INTO fabrica VALUES ('resourceVersion', 0), ('pruned', 0);
"""
_SQLITE_TABLES = {"fabrica", "kinds", "objects", "labels", "owners", "finalizers", "history", "changes"}
# the query parameters a database URL may carry (Go Fabrica's go-sqlite3 DSN ones, and ours)
_SQLITE_PARAMS = {"_fk": "foreign keys are always on", "_foreign_keys": "foreign keys are always on",
                  "_busy_timeout": "the busy timeout in ms", "_timeout": "the busy timeout in ms",
                  "_journal_mode": "WAL only", "_journal": "WAL only", "cache": "ignored (one process)",
                  "mode": "rwc only", "change_retention": "changes the feed keeps"}


def parse_database_url(url: str) -> tuple[str, dict]:
    """(scheme, settings) of a ``database_url``; ConfigurationError if it is not one fabrica can open.

    ``sqlite:///relative/app.db``, ``sqlite:////absolute/app.db`` (SQLAlchemy's
    form) and Go Fabrica's ``file:path/app.db?_fk=1`` give scheme "sqlite" and
    settings ``path``, ``busy_timeout`` (seconds), ``change_retention`` (None unless given);
    ``postgresql://...`` gives "postgresql" and ``{"url": url}``.
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme in ("postgres", "postgresql"):
        return "postgresql", {"url": url}
    if not sep or scheme not in ("sqlite", "file"):
        raise ConfigurationError(f"database_url {url!r}: use sqlite:///path/app.db, file:path/app.db or "
                                 "postgresql://...")
    rest, _, query = rest.partition("?")
    if scheme == "sqlite":
        if not rest.startswith("//") or rest[2:3] not in ("/", ""):
            raise ConfigurationError(f"database_url {url!r}: a SQLite URL has no host; write sqlite:///relative/"
                                     "app.db or sqlite:////absolute/app.db")
        path = rest[3:]
    else:
        path = rest[len("//localhost"):] if rest.startswith("//localhost/") else \
            rest[2:] if rest.startswith("///") else rest
        if path.startswith("//"):
            raise ConfigurationError(f"database_url {url!r}: a file: URL names no host; write file:path/app.db")
    path = urllib.parse.unquote(path)
    if not path or path == ":memory:":
        raise ConfigurationError(f"database_url {url!r} names no file: the SQLite store keeps a file, "
                                 "e.g. sqlite:///data/app.db")
    settings = {"path": path, "busy_timeout": 5.0, "change_retention": None}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        low = value.lower()
        if key not in _SQLITE_PARAMS:
            raise ConfigurationError(f"database_url {url!r}: unknown parameter {key!r}; known: " +
                                     ", ".join(f"{k} ({v})" for k, v in _SQLITE_PARAMS.items()))
        if key in ("_busy_timeout", "_timeout", "change_retention"):
            if not value.isascii() or not value.isdigit() or (key == "change_retention" and int(value) < 1):
                raise ConfigurationError(f"database_url {url!r}: {key} must be a whole number"
                                         f"{' of at least 1' if key == 'change_retention' else ''}, not {value!r}")
            if key == "change_retention":
                settings["change_retention"] = int(value)
            else:
                settings["busy_timeout"] = int(value) / 1000
        elif (key in ("_journal_mode", "_journal") and low != "wal") or (key == "mode" and low != "rwc") or \
                (key in ("_fk", "_foreign_keys") and low not in ("1", "true", "on", "yes")):
            raise ConfigurationError(f"database_url {url!r}: {key}={value} is not available: "
                                     f"{_SQLITE_PARAMS[key]}")
    return "sqlite", settings


def _sqlite3():
    try:
        return importlib.import_module("sqlite3")
    except ImportError:
        raise ConfigurationError("this Python has no sqlite3 module (it is built without SQLite); "
                                 "use data_dir= (the JSON file store)") from None


def _sqlite_code(exc) -> str:
    """SQLite's name of an error ("SQLITE_FULL"...); read from the message where Python gives no name (3.10)."""
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        return name
    text = str(exc)
    return "SQLITE_FULL" if "full" in text else "SQLITE_CORRUPT" if "malformed" in text else \
        "SQLITE_NOTADB" if "not a database" in text else "SQLITE_ERROR"


class _Job:
    """One write waiting for the writer thread: ``apply(conn, rv)`` runs inside the batch's transaction."""

    __slots__ = ("apply", "done", "result", "error", "change", "what")

    def __init__(self, apply, what):
        self.apply = apply
        self.what = what            # (action, object) for the error message of a failed COMMIT
        self.done = threading.Event()
        self.result = None
        self.error = None
        self.change = None          # (Change, bytes of its object's JSON, that JSON) once it took a resourceVersion


class SQLiteStore(Store):
    """Objects, label index, owners, spec history and the change feed in one SQLite database file.

    ``SQLiteStore("data/app.db", durable=True, busy_timeout=5.0,
    change_retention=10000)`` (busy_timeout in seconds; change_retention:
    changes the feed keeps); ``from_url()`` takes a ``database_url``. WAL
    journal; ``synchronous=FULL`` when durable (every acknowledged write
    survives a power loss), NORMAL otherwise (it survives a crash of the
    process). A lock file ``<path>.lock`` (flock, holding the pid) keeps it
    to one process: open() raises StoreLockedError naming the holder, and
    StoreError for a file that is not a fabrica database or is corrupt.

    Thread-safety: every method is thread-safe. Reads take a connection from
    a pool (sqlite3 connections are not shared between threads while in
    use) and never wait for a write; writes are queued to one writer thread,
    the only user of the one writing connection, which commits what has
    queued up in one transaction, so concurrent writers share a COMMIT and
    its fsync, and announces the changes in resourceVersion order. Objects
    returned are shared while their row is unchanged: treat them as read-only.
    """

    def __init__(self, path: str, *, durable: bool = True, busy_timeout: float = 5.0,
                 change_retention: int = CHANGE_RETENTION):
        super().__init__()
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()   # guards _plurals, _counts, _stored_kinds, _rv and _pruned as writes change them
        self._plurals: dict[str, str] = {}     # kind -> plural, as declared
        self._rv = 0                    # the newest committed resourceVersion
        self.durable = durable
        self.busy_timeout = busy_timeout
        self.change_retention = max(1, int(change_retention))
        self._sql = None                # the sqlite3 module, imported by open()
        self._lock_fd = None
        self._wconn = None              # the writer connection: used by the writer thread only
        self._writer = None
        self._writer_ident = None
        self._wcond = threading.Condition(threading.Lock())    # guards _jobs and _closing
        self._jobs: collections.deque = collections.deque()
        self._closing = False
        self._idle: list = []           # reader connections not in use (list.pop/append are atomic)
        self._counts: dict[str, int] = {}      # kind -> objects, as committed
        self._stored_kinds: dict[str, str] = {}     # kind -> plural, as the kinds table holds them
        self._pruned = 0                # the feed holds every change after this resourceVersion
        self._cache: dict[tuple[str, str], tuple[str, dict]] = {}   # (kind, uid) -> (document, parsed), oldest first
        self._cache_bytes = 0           # the cached documents' characters, summed
        self._cache_lock = threading.Lock()     # guards writes to _cache and _cache_bytes (reads take none)

    @classmethod
    def from_url(cls, url: str, *, durable: bool = True, change_retention: int = CHANGE_RETENTION) -> SQLiteStore:
        """The store of a ``sqlite:`` or ``file:`` URL (see parse_database_url); its parameters win."""
        scheme, settings = parse_database_url(url)
        if scheme != "sqlite":
            raise ConfigurationError(f"{url!r} is not a SQLite URL")
        return cls(settings["path"], durable=durable, busy_timeout=settings["busy_timeout"],
                   change_retention=settings["change_retention"] or change_retention)

    # -- life cycle --------------------------------------------------------
    def open(self, kinds, *, discover=False):
        self._sql = _sqlite3()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._acquire_lock()
        try:
            self._check_file()
            try:
                self._wconn = self._connect()
                self._prepare(self._wconn)
                self._load_state(self._wconn)
            except self._sql.DatabaseError as exc:
                raise self._open_error(exc) from None
            for kind, plural in kinds.items():
                self.add_kind(kind, plural)
            if discover:
                for kind, plural in self._stored_kinds.items():
                    if kind not in self._plurals and self._counts.get(kind):
                        self.add_kind(kind, plural)
                        self.discovered[kind] = plural
            self._closing = False
            self._writer_ident = None
            self._writer = threading.Thread(target=self._write_loop, name="fabrica-sqlite-writer", daemon=True)
            self._writer.start()
            self._opened = True
        except BaseException:
            self.close()
            raise
        store_log.info("opened %s: %d object(s), resourceVersion %d, change feed after %d%s", self.path,
                       sum(self._counts.values()), self._rv, self._pruned,
                       "" if self.durable else " (synchronous=NORMAL: no fsync per write)")

    def close(self):
        """Finish the queued writes, stop the writer thread, close every connection, release the lock."""
        self._opened = False
        if self._writer is not None:
            with self._wcond:
                self._closing = True
                self._wcond.notify_all()
            if self._writer is not threading.current_thread():
                self._writer.join()
            self._writer = None
        while self._idle:
            with contextlib.suppress(Exception):
                self._idle.pop().close()
        if self._wconn is not None:
            with contextlib.suppress(Exception):
                self._wconn.close()
            self._wconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # releases the flock
            self._lock_fd = None

    def _acquire_lock(self):
        path = self.path + ".lock"
        try:
            fd = _open_regular(path, os.O_RDWR | os.O_CREAT)
        except _NotAFile as exc:
            raise StoreError(f"cannot lock the database: {path} is {exc.what}, not a regular file; remove it "
                             "and start again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(f"database {self.path} is locked by pid {holder}: another fabrica process is "
                                   "using it; stop it or use another database (serve --database-url, "
                                   "FABRICA_DATABASE_URL or Fabrica(database_url=...))") from None
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)     # never name a stale holder
            store_log.warning("could not write the pid into %s: %s", path, exc.strerror or exc)
        self._lock_fd = fd

    def _check_file(self):
        """StoreError unless the path is absent, empty, or starts as a SQLite database does.

        The file is read before SQLite opens it (which would take any file and
        fail later), and closed before any connection exists: closing a
        descriptor drops the process's POSIX locks, SQLite's included.
        """
        try:
            fd = _open_regular(self.path)
        except FileNotFoundError:
            return
        except _NotAFile as exc:
            raise StoreError(f"{self.path} is {exc.what}, not a SQLite database file") from None
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
        if head and head != b"SQLite format 3\x00":
            raise StoreError(f"{self.path} is not a fabrica database: it is not a SQLite file (it starts with "
                             f"{head[:8]!r}); give the path of a database fabrica made, or of a new file")

    def _connect(self, *, reader: bool = False):
        conn = self._sql.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                 check_same_thread=False, cached_statements=64)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if reader:
            conn.execute("PRAGMA query_only = ON")
        else:
            conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _prepare(self, conn):
        """Check what the file holds (a fabrica database, a new one, or something else) and set it up."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id == 0 and not tables:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # not executescript(): it commits first; the schema goes in statement by statement
                for statement in _SQLITE_SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {SQLITE_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            store_log.info("created the fabrica database %s", self.path)
        elif app_id != SQLITE_APPLICATION_ID:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise StoreError(f"{self.path} is not a fabrica database: it is a SQLite database of another "
                             f"application (tables: {shown or 'none'}); give another path")
        elif version > SQLITE_SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer fabrica (schema {version}, this one reads "
                             f"{SQLITE_SCHEMA_VERSION}); upgrade fabrica")
        elif not _SQLITE_TABLES <= tables:
            raise StoreError(f"{self.path} is a damaged fabrica database: table(s) "
                             f"{', '.join(sorted(_SQLITE_TABLES - tables))} missing; restore it from a backup")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite could not switch it to WAL mode (it is in {mode} mode)")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        if os.path.getsize(self.path) <= SQLITE_QUICK_CHECK_BYTES:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise self._sql.DatabaseError("; ".join(problems))

    def _open_error(self, exc) -> StoreError:
        code, text = _sqlite_code(exc), _one_line(str(exc))
        if code == "SQLITE_NOTADB":
            return StoreError(f"{self.path} is not a fabrica database (SQLite: {text}); give the path of a "
                              "database fabrica made, or of a new file")
        if code.startswith("SQLITE_CORRUPT") or code == "SQLITE_ERROR":
            return StoreError(f"{self.path} is corrupt (SQLite: {text}); restore it from a backup or recover it "
                              f"with: sqlite3 {self.path} .recover")
        return StoreError(f"cannot open {self.path} (SQLite: {text})")

    def _load_state(self, conn):
        meta = dict(conn.execute("SELECT key, value FROM fabrica"))
        self._rv = int(meta.get("resourceVersion", 0))
        self._pruned = int(meta.get("pruned", 0))
        for kind, plural, count in conn.execute("SELECT kind, plural, objects FROM kinds"):
            self._stored_kinds[kind] = plural
            self._counts[kind] = count

    @property
    def resource_version(self):
        return self._rv

    def add_kind(self, kind, plural):
        with self._lock:
            self._plurals[kind] = plural

    def drop_kind(self, kind):
        with self._lock:
            if not self._counts.get(kind):
                self._plurals.pop(kind, None)

    # -- reads -------------------------------------------------------------
    @contextlib.contextmanager
    def _reading(self):
        """A connection to read with: the writer's own on the writer thread (so that a guard sees
        the batch it runs in), else one from the pool, returned to it afterwards."""
        if threading.get_ident() == self._writer_ident:
            yield self._wconn
            return
        if not self._opened:
            raise StoreError(f"the database {self.path} is closed")
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._connect(reader=True)
        try:
            yield conn
        except self._sql.Error as exc:
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
            raise StoreError(f"could not read from {self.path} (SQLite: {_one_line(str(exc))})") from None
        finally:
            if conn is not None:
                if conn.in_transaction:
                    with contextlib.suppress(self._sql.Error):
                        conn.execute("ROLLBACK")
                if self._opened and len(self._idle) < 16:
                    self._idle.append(conn)
                else:
                    conn.close()

    def _parsed(self, kind: str, uid: str, doc: str, obj: dict | None = None) -> dict:
        """The object a stored document holds: the one parsed last time while the document is the same.

        Every read still reads the row; the cache only saves parsing it and
        hands out the same dict for the same version, as the in-memory
        stores do (so the REST layer's cache of encoded bodies works too).
        ``obj``, when given, is what ``doc`` encodes (a write's own object).
        """
        key = (kind, uid)
        hit = self._cache.get(key)
        if obj is None and hit is not None and hit[0] == doc:
            return hit[1]
        try:
            obj = json.loads(doc) if obj is None else obj
        except ValueError as exc:       # a row edited by hand: never a traceback, and say which
            raise StoreError(f"{kind} {uid} in {self.path} is not valid JSON ({exc}); mend or delete its row "
                             "(table objects)") from None
        with self._cache_lock:
            stale = self._cache.pop(key, None)
            if stale is not None:
                self._cache_bytes -= len(stale[0])
            self._cache[key] = (doc, obj)
            self._cache_bytes += len(doc)
            while len(self._cache) > SQLITE_CACHE or self._cache_bytes > SQLITE_CACHE_BYTES:
                self._cache_bytes -= len(self._cache.pop(next(iter(self._cache)))[0])     # the oldest
        return obj

    def _one(self, kind: str, sql: str, args) -> dict | None:
        with self._reading() as conn:
            row = conn.execute(sql, args).fetchone()
        return None if row is None else self._parsed(kind, row[0], row[1])

    def get(self, kind, uid):
        if kind not in self._plurals:
            return None
        return self._one(kind, "SELECT uid, doc FROM objects WHERE kind = ? AND uid = ?", (kind, uid))

    def find(self, kind, name):
        if kind not in self._plurals:
            return None
        return self._one(kind, "SELECT uid, doc FROM objects WHERE kind = ? AND name = ?", (kind, name))

    def resolve(self, kind, ref):
        if kind not in self._plurals:
            return None
        with self._reading() as conn:
            rows = conn.execute("SELECT uid = ?2, uid, doc FROM objects WHERE kind = ?1 AND (uid = ?2 OR "
                                "name = ?2)", (kind, ref)).fetchall()
        if not rows:
            return None
        _, uid, doc = max(rows)         # the uid match first (SPEC §1)
        return self._parsed(kind, uid, doc)

    def query(self, kind, selector=None, *, name=None, after=None, limit=None):
        """As Store.query. Without a selector a page is one index range. A selector's equality, ``in``
        and exists requirements pick rows through the label index (when it has no other kind, that
        is the answer); the others are matched on each candidate's labels. A page (``limit``) reads
        and parses only its own documents."""
        if kind not in self._plurals:
            return [], 0, None
        with self._reading() as conn:
            if selector is None and name is None:
                total = self._counts.get(kind, 0)
                sql = "SELECT uid, doc FROM objects WHERE kind = ? AND name > ? ORDER BY name"
                args = (kind, "" if after is None else after)
                if limit is not None:
                    sql += " LIMIT ?"
                    args += (limit + 1,)
                items = [self._parsed(kind, uid, doc) for uid, doc in conn.execute(sql, args).fetchall()]
                more = None
                if limit is not None and len(items) > limit:
                    items = items[:limit]
                    more = items[-1]["metadata"]["name"]
                return items, total, more
            with_docs = limit is None       # the whole answer in one statement; else ids first, then a page
            if not with_docs and not conn.in_transaction:
                conn.execute("BEGIN")       # one snapshot for both statements
            rows = self._candidates(conn, kind, selector, name, docs=with_docs)
            exact = name is None and all(op in ("=", "in", "exists") for _, op, _ in selector.requirements)
            if selector is not None and not exact:
                rows = [row for row in rows if selector.matches(json.loads(row[2]))]
            rows.sort(key=lambda row: row[0])
            total = len(rows)
            if after is not None:
                rows = rows[bisect.bisect_right([row[0] for row in rows], after):]
            more = None
            if limit is not None and len(rows) > limit:
                rows = rows[:limit]
                more = rows[-1][0]
            if with_docs:
                return [self._parsed(kind, row[3], row[4]) for row in rows], total, more
            docs = {}
            ids = [row[1] for row in rows]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                docs.update((oid, (uid, doc)) for oid, uid, doc in conn.execute(
                    f"SELECT id, uid, doc FROM objects WHERE id IN ({','.join('?' * len(chunk))})", chunk))
            if conn is not self._wconn:
                conn.execute("COMMIT")
        return [self._parsed(kind, *docs[i]) for i in ids if i in docs], total, more

    @staticmethod
    def _candidates(conn, kind, selector, name, *, docs: bool) -> list[tuple]:
        """(name, id, labels JSON[, uid, doc with ``docs``]) of the rows that may match: by name,
        through the label index, or all of the kind."""
        columns = "o.name, o.id, o.labels" + (", o.uid, o.doc" if docs else "")
        if name is not None:
            return conn.execute(f"SELECT {columns} FROM objects AS o WHERE o.kind = ? AND o.name = ?",
                                (kind, name)).fetchall()
        lookups, args = [], []
        for key, values in selector.index_candidates():
            if values is None:
                lookups.append("SELECT id FROM labels WHERE kind = ? AND key = ?")
                args += [kind, key]
            else:
                lookups.append(f"SELECT id FROM labels WHERE kind = ? AND key = ? AND value IN "
                               f"({','.join('?' * len(values))})")
                args += [kind, key, *sorted(values)]
        if not lookups:
            return conn.execute(f"SELECT {columns} FROM objects AS o WHERE o.kind = ?", (kind,)).fetchall()
        # CROSS JOIN keeps the index lookups outermost: SQLite never scans the kind to avoid a sort
        return conn.execute(f"SELECT {columns} FROM ({' INTERSECT '.join(lookups)}) AS c "
                            "CROSS JOIN objects AS o ON o.id = c.id", args).fetchall()

    def count(self, kind):
        return self._counts.get(kind, 0) if kind in self._plurals else 0

    def _rows(self, kind, sql, args) -> list[dict]:
        if kind not in self._plurals:
            return []
        with self._reading() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [self._parsed(kind, uid, doc) for uid, doc in sorted(rows)]

    def orphan_candidates(self, kind):
        """From the owner rows (all of them, not the kind's objects), in SQLite: only the objects with
        an owner not stored are read."""
        return self._rows(kind, "SELECT DISTINCT o.uid, o.doc FROM owners AS w CROSS JOIN objects AS o ON o.id = w.id "
                                "WHERE o.kind = ?1 AND NOT EXISTS (SELECT 1 FROM objects AS p WHERE "
                                "p.kind = w.owner_kind AND p.uid = w.owner_uid)", (kind,))

    def finalizer_candidates(self, kind, finalizer, *, present):
        """From the finalizer rows: a range of that index, or the kind's index entries without a row in it
        (in SQLite; only the objects returned are read)."""
        if present:
            return self._rows(kind, "SELECT o.uid, o.doc FROM finalizers AS f CROSS JOIN objects AS o ON "
                                    "o.id = f.id WHERE f.kind = ? AND f.finalizer = ?", (kind, finalizer))
        return self._rows(kind, "SELECT o.uid, o.doc FROM objects AS o WHERE o.kind = ?1 AND NOT EXISTS "
                                "(SELECT 1 FROM finalizers AS f WHERE f.kind = ?1 AND f.finalizer = ?2 AND "
                                "f.id = o.id)", (kind, finalizer))

    def dependents(self, kind, uid):
        with self._reading() as conn:
            return [tuple(row) for row in conn.execute(
                "SELECT o.kind, o.uid FROM owners AS w JOIN objects AS o ON o.id = w.id "
                "WHERE w.owner_kind = ? AND w.owner_uid = ? ORDER BY o.kind, o.uid", (kind, uid))]

    def gone(self, kind, uid):
        """True for a declared kind that holds no such uid: every object is in the database, none unloaded."""
        return kind in self._plurals and self.get(kind, uid) is None

    # -- spec history ------------------------------------------------------
    def versions(self, kind, uid):
        with self._reading() as conn:
            return [json.loads(doc) for doc, in conn.execute(
                "SELECT doc FROM history WHERE kind = ? AND uid = ? ORDER BY version", (kind, uid))]

    def get_version(self, kind, uid, version_id):
        if not isinstance(version_id, str) or not version_id.isascii() or not version_id.isdigit() or \
                version_id != str(int(version_id)) or int(version_id) > INT64_MAX:
            return None
        with self._reading() as conn:
            row = conn.execute("SELECT doc FROM history WHERE kind = ? AND uid = ? AND version = ?",
                               (kind, uid, int(version_id))).fetchone()
        return None if row is None else json.loads(row[0])

    def delete_version(self, kind, uid, version_id):
        if self.get_version(kind, uid, version_id) is None:
            return False

        def apply(conn, rv):
            return conn.execute("DELETE FROM history WHERE kind = ? AND uid = ? AND version = ?",
                                (kind, uid, int(version_id))).rowcount > 0
        return self._submit(_Job(apply, ("deleted", f"version {version_id} of {kind} {uid}")))

    def prune_versions(self, kind, uid, keep):
        if keep is None:
            return True

        def apply(conn, rv):
            conn.execute("DELETE FROM history WHERE kind = ?1 AND uid = ?2 AND version NOT IN (SELECT version "
                         "FROM history WHERE kind = ?1 AND uid = ?2 ORDER BY version DESC LIMIT ?3)",
                         (kind, uid, keep))
            return True
        try:
            return self._submit(_Job(apply, ("deleted", f"old versions of {kind} {uid}")))
        except FabricaError as exc:     # housekeeping after a committed write: never raises
            store_log.warning("could not prune the versions of %s %s (%s); the next prune retries", kind, uid,
                              exc.message)
            return False

    # -- writes ------------------------------------------------------------
    def create(self, obj, snapshot=None, guard=None, wait_for=(), *, max_size=None):
        self._checked(obj, max_size, stored=False)
        kind, meta = obj["kind"], obj["metadata"]
        uid, name = meta["uid"], meta["name"]

        def apply(conn, rv):
            if guard is not None:
                guard()     # in the batch's transaction: what it reads cannot change before the COMMIT
            hits = conn.execute("SELECT uid, name FROM objects WHERE kind = ?1 AND uid IN (?2, ?3) UNION ALL "
                                "SELECT uid, name FROM objects WHERE kind = ?1 AND name IN (?2, ?3)",
                                (kind, uid, name)).fetchall()     # two index lookups (an OR would scan)
            if any(uid in row for row in hits):
                raise ConflictError(f"uid {uid} is taken", [{"field": "metadata.uid", "message": "taken"}])
            if any(row[1] == name or row[0] == name for row in hits):
                raise self._name_taken(kind, name)
            meta["resourceVersion"] = str(rv)
            doc = dumps(obj)
            if self._stored_kinds.get(kind) != self._plurals[kind]:
                conn.execute("INSERT OR IGNORE INTO kinds VALUES (?, ?, 0)", (kind, self._plurals[kind]))
                conn.execute("UPDATE kinds SET plural = ? WHERE kind = ?", (self._plurals[kind], kind))
            try:
                oid = conn.execute("INSERT INTO objects (kind, uid, name, labels, doc) VALUES (?, ?, ?, ?, ?)",
                                   (kind, uid, name, dumps(meta["labels"]), doc)).lastrowid
            except self._sql.IntegrityError:
                raise self._name_taken(kind, name) from None
            self._index_rows(conn, oid, kind, None, obj)
            if snapshot is not None:
                self._put_version(conn, kind, uid, snapshot)
            conn.execute("UPDATE kinds SET objects = objects + 1 WHERE kind = ?", (kind,))
            return self._record(conn, "created", None, obj, doc)
        return self._submit(_Job(apply, ("created", obj)))

    def replace(self, obj, expected_rv, action="updated", snapshot=None, *, max_size=None):
        self._checked(obj, max_size, stored=True)
        kind, meta = obj["kind"], obj["metadata"]

        def apply(conn, rv):
            row = conn.execute("SELECT id, doc FROM objects WHERE kind = ? AND uid = ?",
                               (kind, meta["uid"])).fetchone()
            old = None if row is None else json.loads(row[1])
            self._check_current(kind, old, meta["name"], expected_rv)
            meta["resourceVersion"] = str(rv)
            doc = dumps(obj)
            conn.execute("UPDATE objects SET name = ?, labels = ?, doc = ? WHERE id = ?",
                         (meta["name"], dumps(meta["labels"]), doc, row[0]))
            self._index_rows(conn, row[0], kind, old, obj)
            if snapshot is not None:
                self._put_version(conn, kind, meta["uid"], snapshot)
            return self._record(conn, action, old, obj, doc)
        return self._submit(_Job(apply, (action, obj)))

    def delete(self, kind, uid, expected_rv=None, last=None):
        def apply(conn, rv):
            row = conn.execute("SELECT id, doc FROM objects WHERE kind = ? AND uid = ?", (kind, uid)).fetchone()
            old = None if row is None else json.loads(row[1])
            self._check_current(kind, old, uid, expected_rv)
            tomb = last if last is not None else dict(old, metadata=dict(old["metadata"]))
            tomb["metadata"]["resourceVersion"] = str(rv)
            doc = dumps(tomb)
            conn.execute("DELETE FROM objects WHERE id = ?", (row[0],))     # its label and owner rows cascade
            conn.execute("DELETE FROM history WHERE kind = ? AND uid = ?", (kind, uid))
            conn.execute("UPDATE kinds SET objects = objects - 1 WHERE kind = ?", (kind,))
            return self._record(conn, "deleted", old, tomb, doc)
        return self._submit(_Job(apply, ("deleted", {"kind": kind, "metadata": {"name": uid}})))

    def _checked(self, obj: dict, max_size, *, stored: bool) -> None:
        """What Store._write checks before a write is queued: JSON, then nesting and size.

        The stored object (``stored``: a replace) is read only when the new one
        is over a limit: one stored before a limit was lowered may still be
        written as long as it does not grow.
        """
        try:
            text = dumps(obj)
        except RecursionError:
            raise IndexedStore._depth_error(obj) from None
        except (TypeError, ValueError) as exc:
            raise ValidationError(f'{obj["kind"]} "{obj["metadata"]["name"]}" holds a value that is not JSON: '
                                  f'{exc}', [{"field": "", "message": str(exc)}]) from None
        size = _utf8_size(text)
        deep = text.count("{") + text.count("[") > MAX_OBJECT_DEPTH and json_depth(obj) > MAX_OBJECT_DEPTH
        big = max_size is not None and size > max_size
        if deep or big:
            old = self.get(obj["kind"], obj["metadata"]["uid"]) if stored else None
            if deep and (old is None or json_depth(obj) > min(json_depth(old), MAX_FILE_DEPTH)):
                raise IndexedStore._depth_error(obj)
            if big and (old is None or size > json_size(old)):
                raise PayloadTooLargeError(
                    f'{obj["kind"]} "{obj["metadata"]["name"]}" would be {size} bytes of JSON; the limit for an '
                    f"object is {max_size} bytes", [{"field": "", "message": f"larger than {max_size} bytes"}])

    @staticmethod
    def _name_taken(kind, name) -> ConflictError:
        return ConflictError(f'{kind} "{name}" already exists; choose another name',
                             [{"field": "metadata.name", "message": "already exists"}])

    @staticmethod
    def _index_rows(conn, oid, kind, old, new):
        """Keep the label and owner rows of one object in step with it (in the write's transaction)."""
        old_labels = old["metadata"]["labels"] if old else {}
        new_labels = new["metadata"]["labels"]
        if old_labels != new_labels:
            gone = [(k, v) for k, v in old_labels.items() if new_labels.get(k) != v]
            added = [(k, v) for k, v in new_labels.items() if old_labels.get(k) != v]
            conn.executemany("DELETE FROM labels WHERE kind = ? AND key = ? AND value = ? AND id = ?",
                             [(kind, k, v, oid) for k, v in gone])
            conn.executemany("INSERT INTO labels VALUES (?, ?, ?, ?)", [(kind, k, v, oid) for k, v in added])
        old_refs = old["metadata"]["ownerReferences"] if old else []
        new_refs = new["metadata"]["ownerReferences"]
        if old_refs != new_refs:
            conn.execute("DELETE FROM owners WHERE id = ?", (oid,))
            conn.executemany("INSERT OR IGNORE INTO owners VALUES (?, ?, ?)",
                             [(ref["kind"], ref["uid"], oid) for ref in new_refs])
        old_fins = old["metadata"]["finalizers"] if old else []
        new_fins = new["metadata"]["finalizers"]
        if old_fins != new_fins:
            conn.execute("DELETE FROM finalizers WHERE id = ?", (oid,))
            conn.executemany("INSERT OR IGNORE INTO finalizers VALUES (?, ?, ?)",
                             [(kind, name, oid) for name in new_fins])

    @staticmethod
    def _put_version(conn, kind, uid, snapshot):
        conn.execute("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?)",
                     (kind, uid, int(snapshot["versionId"]), dumps(snapshot)))

    def _record(self, conn, action, old, new, doc) -> tuple[Change, int, str]:
        """Insert the Change of a write in its transaction: (the change, the bytes of ``doc``, ``doc``)."""
        change = self.make_change(action, old, new)
        conn.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?)", (change.resource_version, action, change.time,
                     doc, None if change.previous is None else dumps(change.previous)))
        return change, _utf8_size(doc), doc

    @staticmethod
    def _check_current(kind, old, ref, expected_rv):
        if old is None:
            raise NotFoundError(f'{kind} "{ref}" not found')
        if expected_rv is not None and old["metadata"]["resourceVersion"] != expected_rv:
            raise StaleError(
                f'{kind} "{old["metadata"]["name"]}" is at resourceVersion {old["metadata"]["resourceVersion"]}, '
                f"the request expected {expected_rv}; re-read and retry")

    # -- the writer thread ---------------------------------------------------
    def _submit(self, job: _Job):
        """Queue a write for the writer thread and wait until its batch committed (or failed)."""
        if threading.get_ident() == self._writer_ident:
            raise StoreError("a store write from inside a write (a guard or on_commit) would wait for itself")
        with self._wcond:
            if self._closing or self._writer is None:
                raise StoreError(f"the database {self.path} is closed; nothing was written")
            self._jobs.append(job)
            self._wcond.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _write_loop(self):
        self._writer_ident = threading.get_ident()
        while True:
            with self._wcond:
                while not self._jobs and not self._closing:
                    self._wcond.wait()
                if not self._jobs:
                    return
                batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), SQLITE_BATCH))]
            try:
                self._run_batch(batch)
            except Exception:       # a bug, not a failed write (those are answered): the writer keeps going
                store_log.exception("the SQLite writer failed on a batch of %d write(s)", len(batch))

    def _run_batch(self, batch: list[_Job]) -> None:
        """One transaction for ``batch`` (the writer thread's one iteration; tests may call it by hand).

        Each job runs under its own savepoint: one that raises (a conflict, a
        stale resourceVersion) is rolled back alone and answers its error.
        The rest share the COMMIT; only after it are they published (in
        resourceVersion order) and acknowledged. If SQLite fails (a full disk,
        an I/O error), the whole transaction is rolled back: nothing of it is
        stored, published or counted, and every job answers the error.
        """
        conn, sql = self._wconn, self._sql
        rv, pruned = self._rv, self._pruned
        done: list[_Job] = []
        failure = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                if rv >= INT64_MAX:     # as the file store: a resourceVersion is an int64
                    job.error = StoreError("resourceVersions are used up (2^63-1): nothing can be written")
                    continue
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.apply(conn, rv + 1)
                except BaseException as exc:
                    if isinstance(exc, sql.Error) and not isinstance(exc, sql.IntegrityError):
                        raise       # the transaction may be gone: the whole batch fails
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    job.error = self._sqlite_write_error(job, exc) if isinstance(exc, sql.Error) else exc
                    continue
                conn.execute("RELEASE job")
                if isinstance(job.result, tuple):
                    rv += 1
                    job.change = job.result
                    job.result = job.change[0].object
                done.append(job)
            if rv != self._rv:
                conn.execute("UPDATE fabrica SET value = ? WHERE key = 'resourceVersion'", (rv,))
                if rv - pruned > self.change_retention + max(1, self.change_retention // 8):
                    pruned = rv - self.change_retention
                    conn.execute("DELETE FROM changes WHERE resource_version <= ?", (pruned,))
                    conn.execute("UPDATE fabrica SET value = ? WHERE key = 'pruned'", (pruned,))
            self._commit(conn)
        except BaseException as exc:      # nothing of this batch is stored
            failure = exc
            with contextlib.suppress(Exception):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        try:
            if failure is None:
                self._committed(done, rv, pruned)
            else:
                for job in batch:
                    if job.error is None:
                        job.error = self._sqlite_write_error(job, failure)
                        job.result = job.change = None
                        self.write_failures += 1
        finally:
            for job in batch:
                job.done.set()

    def _commit(self, conn):
        conn.execute("COMMIT")

    def _committed(self, done, rv, pruned):
        """After the COMMIT: counters, then the changes announced in resourceVersion order."""
        with self._lock:
            for job in done:
                if job.change is None:
                    continue
                change = job.change[0]
                if change.action == "created":
                    self._counts[change.kind] = self._counts.get(change.kind, 0) + 1
                    self._stored_kinds[change.kind] = self._plurals.get(change.kind, change.kind)
                elif change.action == "deleted":
                    self._counts[change.kind] -= 1
            self._rv = rv
            self._pruned = pruned
        for job in done:
            if job.change is not None:
                change, size, doc = job.change
                self.writes += 1
                if change.action == "deleted":
                    with self._cache_lock:
                        stale = self._cache.pop((change.kind, change.uid), None)
                        if stale is not None:
                            self._cache_bytes -= len(stale[0])
                else:       # reads return the very object the write returned, as long as it is current
                    self._parsed(change.kind, change.uid, doc, change.object)
                self._announce(change, size)

    def _sqlite_write_error(self, job, exc) -> FabricaError:
        if not isinstance(exc, self._sql.Error):
            store_log.error("a write batch failed: %r", exc, exc_info=exc)
            return StoreError(f"the database write failed ({type(exc).__name__}); nothing of it was stored")
        action, obj = job.what
        if isinstance(obj, str):
            what, verb, kept = obj, "delete", "it is still stored"
        else:
            what = f'{obj["kind"]} "{obj["metadata"]["name"]}"'
            verb = {"created": "create", "deleted": "delete"}.get(action, "write")
            kept = {"created": "nothing was stored", "deleted": "it is still stored"}.get(
                action, "the previous version is intact")
        text = _one_line(str(exc))
        if _sqlite_code(exc) == "SQLITE_FULL":
            return InsufficientStorageError(f"no space left to {verb} {what} (SQLite: {text}); {kept}, free "
                                            "space and retry")
        return StoreError(f"could not {verb} {what} (SQLite: {text}); {kept}")

    # -- the change feed -------------------------------------------------------
    def changes(self, since=None):
        """The retained changes after ``since`` (None: all), read from the database in pages of 500.

        ExpiredError (here, not when iterated) if some were pruned: the feed
        keeps the newest ``change_retention``, across restarts.
        """
        since = self._pruned if since is None else since
        self._check_retained(since)
        return self._changes(since)

    def _check_retained(self, since, conn=None):
        pruned = self._pruned if conn is None else conn.execute(
            "SELECT value FROM fabrica WHERE key = 'pruned'").fetchone()[0]
        if since < pruned:
            raise ExpiredError(f"changes after resourceVersion {since} are no longer retained (the database keeps "
                               f"the newest {self.change_retention}, after {pruned}); re-list and watch from now")

    def _changes(self, since):
        while True:
            with self._reading() as conn:
                conn.execute("BEGIN")
                self._check_retained(since, conn)    # pruned while the caller was iterating
                rows = conn.execute("SELECT resource_version, action, object, previous, time FROM changes "
                                    "WHERE resource_version > ? ORDER BY resource_version LIMIT 500",
                                    (since,)).fetchall()
                conn.execute("COMMIT")
            for rv, action, obj, previous, when in rows:
                yield Change(rv, action, json.loads(obj), None if previous is None else json.loads(previous), when)
            if len(rows) < 500:
                return
            since = rows[-1][0]


###############################################################################
# Events #######################################################################
###############################################################################
#
# CloudEvents are a pure function of a Change (SPEC §4): change_events()
# reads nothing but the change, so any process reading the same change (a
# live subscriber, a GET /events resume, another replica) yields the same
# events, ids and times included. Positions order them: <rv> for the
# resource event, <rv>.<n> for the n-th condition event of that write.

# about the bytes of a resource event around its object; they matter only for small objects,
# whose events the queues' count bounds limit first
_EVENT_ENVELOPE = 512


def change_events(change: Change, *, prefix: str = "io.fabrica", source: str = "") -> list[dict]:
    """The CloudEvents of one change: its resource event, then one per condition transition.

    The resource event (position ``(rv, 0)``) carries the object itself
    (``data.resource``, shared, not copied: treat it as read-only); the
    n-th condition event (position ``(rv, n)``) follows for each condition
    the write added or whose status it changed. ``prefix`` starts every
    type (``io.fabrica.rack.created``), ``source`` every source.
    """
    rv, action, new, previous, when = change
    kind, meta = new["kind"], new["metadata"]
    uid = meta["uid"]
    base = f"{source}/resources/{kind}/{uid}"
    events = [{
        "specversion": "1.0", "id": f"evt-{rv}", "type": f"{prefix}.{kind.lower()}.{action}",
        "source": base, "subject": uid, "time": when, "datacontenttype": "application/json",
        "resourcekind": kind, "resourceuid": uid, "action": action,
        "resourceversion": str(rv), "sequence": str(rv),
        "data": {"action": action, "resourceKind": kind, "resourceUID": uid,
                 "resourceName": meta["name"], "changeTime": when, "updateType": change.update_type,
                 "resource": new},
    }]
    if action == "deleted":
        return events
    before = previous["conditions"] if previous is not None else {}
    for cond in new["status"].get("conditions") or ():
        if not isinstance(cond, dict) or not isinstance(cond.get("type"), str):
            continue
        prev = before.get(cond["type"])
        if prev == cond.get("status"):
            continue
        n = len(events)
        ctype = cond["type"].lower()
        events.append({
            "specversion": "1.0", "id": f"evt-{rv}.{n}", "type": f"{prefix}.condition.{ctype}",
            "source": f"{base}/conditions/{ctype}", "subject": uid, "time": when,
            "datacontenttype": "application/json", "resourcekind": kind, "resourceuid": uid,
            "conditiontype": cond["type"], "conditionstatus": str(cond.get("status")),
            "resourceversion": str(rv), "sequence": f"{rv}.{n}",
            "data": {"conditionType": cond["type"], "status": cond.get("status"),
                     "previousStatus": prev or "Unknown", "reason": cond.get("reason", ""),
                     "message": cond.get("message", ""),
                     "transitionTime": cond.get("lastTransitionTime"), "resourceKind": kind,
                     "resourceUID": uid},
        })
    return events


def format_position(position: tuple[int, int]) -> str:
    rv, n = position
    return f"{rv}.{n}" if n else str(rv)


def parse_position(text: str) -> tuple[int, int]:
    """``"42"`` -> (42, 0), ``"42.1"`` -> (42, 1); BadRequestError otherwise."""
    rv, _, n = text.strip().partition(".")
    if not rv.isdigit() or not rv.isascii() or (n and (not n.isdigit() or not n.isascii())):
        raise BadRequestError(f"invalid event id {text[:40]!r}: expected <resourceVersion> or <resourceVersion>.<n>")
    return int(rv), int(n or 0)


###############################################################################
# Bus ##########################################################################
###############################################################################
#
# The bus fans the store's change feed out: attach() watches the store, whose
# commits call publish_change() in resourceVersion order (an embedded store
# holds its lock). It never blocks: each subscriber has its own bounded queue
# and thread; a full queue drops and marks a gap (the controller answers a
# gap with a full resync). Event subscribers get the change's CloudEvents,
# change subscribers (controllers) the Change itself. Handlers run in the
# subscriber's thread, never under a lock. The bus keeps no events of its
# own: since() (GET /events resume) derives them from store.changes(). Every
# queue is bounded in items AND in bytes (an object's JSON), and all the
# queues share one byte budget, so memory stays bounded however many slow
# subscribers (SSE clients) there are: past it, the subscriber holding the
# most bytes gets a gap, as on overflow. Queues share the dicts they hold.

QUEUE_BYTES = 64 << 20      # default byte bound of each subscriber's queue
QUEUES_BYTES = 256 << 20    # default byte budget all subscriber queues of a bus share
_MATCH_CACHE = 256          # event types whose pattern verdict a subscriber remembers


def compile_pattern(pattern: str) -> re.Pattern:
    """A regex for an event-type pattern: ``*`` is one segment, ``**`` zero or more, anywhere."""
    parts = []
    for seg in pattern.split("."):
        if seg == "**":
            parts.append(r"(?:\.[^.]+)*")
        elif seg == "*":
            parts.append(r"\.[^.]+")
        elif seg and "*" not in seg:
            parts.append(r"\." + re.escape(seg))
        else:
            raise ValueError(f"invalid event pattern {pattern!r}: segments are names, '*' or '**'")
    regex = re.compile("".join(parts))
    return regex


def pattern_matches(regex: re.Pattern, event_type: str) -> bool:
    return regex.fullmatch("." + event_type) is not None


def _full(queue, queued_bytes: int, size: int, max_count: int, max_bytes: int) -> bool:
    # an event larger than the whole byte bound is still taken by an empty queue
    return len(queue) >= max_count or (queued_bytes + size > max_bytes and len(queue) > 0)


class Subscription:
    """One subscriber: a bounded queue and a thread ``fabrica-bus-<name>`` calling ``handler(item)``.

    The items are the events whose type matches ``pattern`` or, with
    ``pattern=None``, the Changes themselves. They arrive in publish order.
    The queue holds at most ``queue_size`` items and ``queue_bytes`` bytes of
    them; past either, items are dropped and the next delivery is preceded
    by ``on_gap``. A handler that raises is logged with its traceback and
    the subscription keeps going. ``close()`` stops the thread after the
    item in hand. Events are copied for the handler unless ``copy_events``
    is False; Changes never are (treat them as read-only).
    """

    def __init__(self, bus: Bus, pattern: str | None, handler, *, queue_size: int = 10000,
                 queue_bytes: int = QUEUE_BYTES, name: str = "", on_gap=None, copy_events: bool = True):
        self.pattern = pattern
        self.handler = handler
        self.name = name or getattr(handler, "__name__", "handler")
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.on_gap = on_gap
        self.copy_events = copy_events
        self.delivered = self.dropped = self.gaps = self.errors = 0
        self._regex = None if pattern is None else compile_pattern(pattern)
        self._matches: dict[str, bool] = {}     # bounded: condition types, so event types, are client input
        self._queue: collections.deque = collections.deque()    # (event, size)
        self.queued_bytes = 0
        self._cond = threading.Condition(threading.Lock())  # guards _queue, queued_bytes, _gap, _closed
        self._gap = False
        self._busy = False
        self._closed = False
        self._drain = False
        self._bus = bus
        self._thread = threading.Thread(target=self._run, name=f"fabrica-bus-{self.name}", daemon=True)
        self._thread.start()

    def matches(self, event_type: str) -> bool:
        hit = self._matches.get(event_type)
        if hit is None:
            if self._regex is None:
                return False
            hit = pattern_matches(self._regex, event_type)
            if len(self._matches) < _MATCH_CACHE:
                self._matches[event_type] = hit
        return hit

    def offer(self, event: dict, size: int) -> None:
        """Queue an event of ``size`` bytes without blocking; on overflow drop it and mark a gap."""
        with self._cond:
            if self._closed:
                return
            if _full(self._queue, self.queued_bytes, size, self.queue_size, self.queue_bytes):
                self.dropped += 1
                self._gap = True
            else:
                self._queue.append((event, size))
                self.queued_bytes += size
            self._cond.notify()

    def shed(self) -> int:
        """Drop every queued event and mark a gap (the bus's shared budget ran out); the bytes freed."""
        with self._cond:
            freed = self.queued_bytes
            if self._queue:
                self.dropped += len(self._queue)
                self._gap = True
                self._queue.clear()
                self.queued_bytes = 0
                self._cond.notify()
        return freed

    def pending(self) -> int:
        return len(self._queue)

    def idle(self) -> bool:
        """Nothing queued and no handler running."""
        return not self._queue and not self._busy and not self._gap

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._gap and not self._closed:
                    self._cond.wait()
                if self._closed and (not self._queue or not self._drain):
                    return
                gap, self._gap = self._gap, False
                event = None
                if self._queue:
                    event, size = self._queue.popleft()
                    self.queued_bytes -= size
                self._busy = True
            if gap:
                self.gaps += 1
                bus_log.warning("subscriber %s fell behind and lost events (a gap)", self.name)
                if self.on_gap is not None:
                    self._call(self.on_gap)
            if event is not None:
                copy = self.copy_events and self.pattern is not None
                self._call(self.handler, deepcopy_json(event) if copy else event)
                self.delivered += 1
            self._busy = False

    def _call(self, fn, *args):
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            bus_log.exception("subscriber %s raised; it keeps receiving events", self.name)

    def close(self, timeout: float | None = None, *, drain: bool = False) -> None:
        """Stop receiving; the thread exits after the event in hand (or, with ``drain``, after the queue)."""
        with self._cond:
            self._closed = True
            self._drain = drain
            self._cond.notify()
        self._bus._remove(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Tap:
    """A subscription without a thread: the consumer pulls events with ``get(timeout)``.

    Used by ``GET /events`` and ``watch()``, whose consumer already has a
    thread. On overflow the tap stops taking events and ``overflowed`` is
    set: the consumer must end the stream (a client resumes from its last id).
    """

    def __init__(self, bus: Bus, pattern: str, *, queue_size: int = 10000, queue_bytes: int = QUEUE_BYTES,
                 kind: str | None = None):
        self._bus = bus
        self.name = f"tap {pattern}" + (f" of {kind}" if kind else "")
        self.pattern = pattern
        self._regex = compile_pattern(pattern)
        self._kind = kind
        self._queue: collections.deque = collections.deque()    # (event, size)
        self._cond = threading.Condition(threading.Lock())     # guards _queue, queued_bytes, overflowed, closed
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.queued_bytes = 0
        self.overflowed = False
        self.closed = False
        self.dropped = self.gaps = 0

    def matches(self, event_type: str) -> bool:
        return pattern_matches(self._regex, event_type)

    def offer(self, event: dict, size: int) -> None:
        if self._kind is not None and event.get("resourcekind") != self._kind:
            return
        with self._cond:
            if self.closed or self.overflowed:
                return
            if _full(self._queue, self.queued_bytes, size, self.queue_size, self.queue_bytes):
                self.overflowed = True
                self.dropped += 1
                self.gaps += 1
            else:
                self._queue.append((event, size))
                self.queued_bytes += size
            self._cond.notify()

    def shed(self) -> int:
        """Drop every queued event and overflow (the bus's shared budget ran out); the bytes freed."""
        with self._cond:
            freed = self.queued_bytes
            if self._queue:
                self.overflowed = True
                self.dropped += len(self._queue)
                self.gaps += 1
                self._queue.clear()
                self.queued_bytes = 0
                self._cond.notify_all()
        return freed

    def get(self, timeout: float | None = None) -> dict | None:
        """The next event, or None after ``timeout`` (or once closed/overflowed and drained)."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)
            if not self._queue:
                return None
            event, size = self._queue.popleft()
            self.queued_bytes -= size
            return event

    def idle(self) -> bool:
        return not self._queue

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._bus._remove(self)


class Bus:
    """In-process publish/subscribe of the store's changes and their CloudEvents.

    ``attach(store, prefix=, source=)`` follows a store: each commit is
    fanned out by ``publish_change`` (non-blocking, in resourceVersion
    order) to the event subscribers (``subscribe``, ``tap``), as the events
    ``change_events()`` derives, and to the change subscribers
    (``subscribe_changes``). ``since()`` and ``recent()`` derive past events
    from ``store.changes()``: the bus buffers nothing. The subscriber queues
    together hold at most ``queues_bytes`` (an item in several queues counts
    in each): past it, the subscriber holding the most bytes loses its queue
    to a gap (a Subscription calls ``on_gap``, a Tap overflows), until the
    rest fit. Thread-safe.
    """

    def __init__(self, queues_bytes: int = QUEUES_BYTES):
        self._lock = threading.Lock()       # guards _subs and published
        self._subs: tuple[Subscription | Tap, ...] = ()
        self.queues_bytes = queues_bytes
        self.shed = 0                        # queues dropped because the shared budget ran out
        self.published = 0                   # events fanned out
        self.prefix, self.source = "io.fabrica", ""
        self.start_rv = 0                    # the store's resourceVersion when the bus attached
        self._store: Store | None = None
        self._watch: StoreWatch | None = None

    def attach(self, store: Store, *, prefix: str = "io.fabrica", source: str = "") -> None:
        """Follow ``store``'s commits from now on; events get types ``<prefix>.<kind>.<action>``."""
        self.detach()
        self.prefix, self.source = prefix, source
        self._store = store
        self.start_rv = store.resource_version
        self._watch = store.watch(self.publish_change)

    def detach(self) -> None:
        """Stop following the store (subscribers stay)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def subscribe(self, pattern: str, handler, **options) -> Subscription:
        """Call ``handler(event)`` in a thread of its own for each event whose type matches ``pattern``."""
        return self._add(Subscription(self, pattern, handler, **options))

    def subscribe_changes(self, handler, **options) -> Subscription:
        """Call ``handler(change)`` in a thread of its own for each Change (a controller's intake)."""
        return self._add(Subscription(self, None, handler, **options))

    def tap(self, pattern: str, *, queue_size: int = 10000, queue_bytes: int = QUEUE_BYTES,
            kind: str | None = None) -> Tap:
        """A thread-less subscription (see Tap)."""
        return self._add(Tap(self, pattern, queue_size=queue_size, queue_bytes=queue_bytes, kind=kind))

    def _add(self, sub):
        with self._lock:
            self._subs = self._subs + (sub,)
        return sub

    def _remove(self, sub):
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def publish_change(self, change: Change, size: int) -> None:
        """Fan one committed change out (the store's watcher); ``size`` is its object's JSON bytes."""
        events = change_events(change, prefix=self.prefix, source=self.source)
        sized = [(events[0], size + _EVENT_ENVELOPE)] + [(event, json_size(event)) for event in events[1:]]
        self._fan_out(sized, change, size + _EVENT_ENVELOPE)

    def publish(self, event: dict, size: int | None = None) -> None:
        """Fan one event out to the event subscribers; ``size`` is its JSON's bytes (measured when None)."""
        self._fan_out([(event, json_size(event) if size is None else size)], None, 0)

    def _fan_out(self, events, change, change_size):
        with self._lock:
            subs = self._subs
            self.published += len(events)
        held = 0
        for sub in subs:
            if sub.pattern is None:
                if change is not None:
                    sub.offer(change, change_size)
            else:
                for event, size in events:
                    if sub.matches(event["type"]):
                        sub.offer(event, size)
            held += sub.queued_bytes
        if held > self.queues_bytes:
            self._shed(subs, held)

    def _shed(self, subs, held: int) -> None:
        # read without the queues' locks: consumers only ever lower the sum
        while held > self.queues_bytes:
            victim = max(subs, key=lambda sub: sub.queued_bytes)
            freed = victim.shed()
            if not freed:
                return
            held -= freed
            self.shed += 1
            bus_log.warning("subscriber %s held %d bytes of events, the most of all, when the subscribers "
                            "together passed their budget of %d; its queue is dropped (a gap)",
                            victim.name, freed, self.queues_bytes)

    def since(self, position: tuple[int, int], kind: str | None = None) -> list[tuple[tuple[int, int], dict]]:
        """Every event after ``position`` (of ``kind``'s objects only, if given), derived from the
        store's feed; GoneError if one of them is not available (no longer retained, or committed
        before this process started)."""
        rv, n = position
        store = self._store
        gone = GoneError(f"events after {format_position(position)} are no longer available; "
                         "re-list and watch from now")
        if store is None:
            raise gone
        try:
            found = store.changes(rv - 1)       # change rv too: its events after <rv>.<n>
        except ExpiredError:
            if rv != self.start_rv:
                raise gone from None
            try:    # what was committed before the bus attached is never replayed: <start_rv> is a start
                found = store.changes(rv)
            except ExpiredError:
                raise gone from None
        out = []
        for change in found:
            if kind is not None and change.kind != kind:
                continue
            events = change_events(change, prefix=self.prefix, source=self.source)
            out.extend(((change.resource_version, i), event) for i, event in enumerate(events)
                       if (change.resource_version, i) > position)
        return out

    def recent(self, kind: str, uid: str, limit: int = 50) -> list[dict]:
        """The newest ``limit`` events of one object the store's feed still retains, oldest first."""
        if self._store is None or not limit:
            return []
        found = [event for change in self._store.changes() if change.kind == kind and change.uid == uid
                 for event in change_events(change, prefix=self.prefix, source=self.source)]
        return found[-limit:]

    @property
    def subscriptions(self) -> tuple[Subscription | Tap, ...]:
        return self._subs

    def stats(self) -> dict:
        subs = self._subs
        changes, held = self._store.retained() if self._store is not None else (0, 0)
        return {"published": self.published, "subscribers": len(subs),
                "dropped": sum(s.dropped for s in subs), "gaps": sum(s.gaps for s in subs),
                "buffered": changes, "bufferedBytes": held,
                "queuedBytes": sum(s.queued_bytes for s in subs), "shed": self.shed}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following the store and close every subscription; queued items are delivered within
        ``timeout``."""
        self.detach()
        deadline = time.monotonic() + timeout
        for sub in self._subs:
            if isinstance(sub, Subscription):
                sub.close(max(0.0, deadline - time.monotonic()), drain=True)
            else:
                sub.close()


###############################################################################
# Work queue ##################################################################
###############################################################################
#
# WorkQueue: client-go's work queue built on the standard library's
# queue.Queue, as PriorityQueue is: _init/_qsize/_put/_get over Queue's own
# mutex and conditions. A key is queued once however often it is added, never
# handed to two workers, and re-queued once by done() when it was added while
# running; one timer thread serves add_after(); per-key exponential backoff
# under an overall token bucket.

_NO_KEY = object()  # task_done() called the stdlib way, without a key


class WorkQueue(queue.Queue):
    """A rate-limited, delaying, de-duplicating work queue (client-go semantics)
    that is a :class:`queue.Queue`.

    Keys are hashable ``(kind, uid)`` tuples.  The guarantees:

    * A key is queued at most once: ``add`` while it is queued only merges the reason.
    * A key is never handed to two workers at once: ``add`` while it is being
      processed marks it dirty, and ``done`` puts it back in the queue exactly once.
    * Reasons are coalesced per pending run (ordered, no duplicates) and returned
      by ``get`` together with the key.  Ready keys come out first in, first out.

    The ``queue.Queue`` methods, on those semantics:

    * ``put(key)`` and ``put_nowait(key)`` are ``add(key)``.  A WorkQueue is
      unbounded (``maxsize`` 0, ``full()`` always False), so they never block
      and ignore ``block``/``timeout``, as ``SimpleQueue.put`` does.
    * ``get(block=True, timeout=None)`` returns ``(key, reasons)`` and marks the
      key processing; on timeout and after shutdown it returns None rather than
      raising ``Empty`` (client-go's ``Get`` reports shutdown the same way).
      ``get_nowait()`` returns ``(key, reasons)`` or raises ``queue.Empty``.
    * ``task_done(key)`` is ``done(key)``: the queue tracks each key, not a
      count, so ``task_done()`` without the key raises TypeError.
    * ``unfinished_tasks`` counts the keys queued, owed a re-run or processing;
      ``join()`` blocks until it is 0.  A delayed key counts once it is due.
    * ``qsize()`` (and ``len(q)``) is the number of keys ready to hand out now,
      so ``empty()`` is true while every pending key is delayed or processing.
    * ``shutdown(drain=False)`` is client-go's ShutDown (or, with ``drain``,
      ShutDownWithDrain); ``is_shutdown`` tells.  Python 3.13's
      ``Queue.shutdown(immediate=False)`` makes the same choice the other way
      round and drains by default; this one does not.

    Every method is thread-safe.  Only ``get`` (until a key is ready), ``join``,
    ``wait_until`` and ``stop`` (joining the timer thread) block.  Due times are
    measured on the injected ``clock``; blocking timeouts are real seconds.
    """

    _HEARTBEAT = 1.0  # the timer thread re-checks at least this often (seconds)

    def __init__(self, name: str = "", *, clock: Callable[[], float] = time.monotonic,
                 base_delay: float = 0.005, max_delay: float = 300.0,
                 qps: float = 10.0, burst: int = 100) -> None:
        self.name = name
        self._clock = clock
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._qps = qps
        self._burst = max(1, burst)  # a bucket smaller than one token could never be reserved
        super().__init__()  # maxsize 0; calls _init, makes mutex and its conditions
        # Queue's conditions: getters wait on not_empty (one notify per key that
        # becomes ready, notify_all on shutdown), join() on all_tasks_done;
        # not_full is never waited on (unbounded).  Two more share the mutex:
        # the timer thread waits on _due_changed (an earlier due time, shutdown),
        # wait_until on _state_changed (every change, counted in _changes so a
        # change between its check and its wait is not lost).
        self._due_changed = threading.Condition(self.mutex)
        self._state_changed = threading.Condition(self.mutex)
        self._changes = 0
        self.is_shutdown = False  # Python 3.13's Queue has the same attribute
        self._drain = False
        self._timer: threading.Thread | None = None

    # -- queue.Queue's extension points; called with self.mutex held ----------------

    def _init(self, maxsize: int) -> None:
        # Invariant, guarded by self.mutex:
        #   every key is in at most one of: self.queue (=> also in _dirty), _processing;
        #   _dirty ∩ _processing = keys re-added while running (done() re-queues them);
        #   unfinished_tasks = len(_dirty ∪ _processing) = len(queue) + len(_processing);
        #   _reasons[key] = reasons for the key's next run (exists only while dirty);
        #   _waiting[key] = (due, seq) of the key's one live heap entry; heap
        #   entries that don't match it are stale and skipped (lazy deletion).
        self.queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._reasons: dict[Hashable, dict[str, None]] = {}  # dict = ordered set
        self._heap: list[tuple[float, int, Hashable]] = []
        self._waiting: dict[Hashable, tuple[float, int]] = {}
        self._waiting_reasons: dict[Hashable, dict[str, None]] = {}
        self._seq = itertools.count()  # heap tie-breaker: keys themselves are never compared
        self._failures: dict[Hashable, int] = {}
        self._tokens = float(self._burst)
        self._last_refill: float | None = None

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, key: Hashable) -> None:
        if key in self._dirty:
            return  # already queued, or will be re-queued by done()
        self._dirty.add(key)
        if key not in self._processing:
            self.queue.append(key)
            self.unfinished_tasks += 1
            self.not_empty.notify()
        self._changed()

    def _get(self) -> tuple[Hashable, list[str]]:
        key = self.queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        self._changed()
        return key, list(self._reasons.pop(key, ()))

    # -- internals; all called with the lock held -------------------------------

    def _changed(self) -> None:
        self._changes += 1
        self._state_changed.notify_all()

    def _add_locked(self, key: Hashable, reasons) -> None:
        if self.is_shutdown:
            return
        pending = self._reasons.setdefault(key, {})
        for r in reasons:
            if r is not None:
                pending[r] = None
        self._put(key)

    def _prune_locked(self) -> None:
        while self._heap:
            due, seq, key = self._heap[0]
            if self._waiting.get(key) == (due, seq):
                return
            heapq.heappop(self._heap)

    def _fire_due_locked(self) -> int:
        now = self._clock()
        fired = 0
        while True:
            self._prune_locked()
            if not self._heap or self._heap[0][0] > now:
                return fired
            _, _, key = heapq.heappop(self._heap)
            del self._waiting[key]
            self._add_locked(key, self._waiting_reasons.pop(key, ()))
            fired += 1

    def _add_after_locked(self, key: Hashable, delay: float, reason: str | None) -> None:
        if self.is_shutdown:
            return
        if delay <= 0:
            self._add_locked(key, (reason,))
            return
        if reason is not None:
            self._waiting_reasons.setdefault(key, {})[reason] = None
        due = self._clock() + delay
        current = self._waiting.get(key)
        if current is not None and current[0] <= due:
            return  # keep the earliest due time; the reason was still merged
        entry = (due, next(self._seq))
        self._waiting[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        self._due_changed.notify()  # the timer may need to wake earlier
        self._changed()

    def _reserve_locked(self) -> float:
        """Reserve one token like golang.org/x/time/rate Reserve: tokens may go
        negative, and the delay is how long until the reserved token exists."""
        if self._qps <= 0 or self._qps == float("inf"):
            return 0.0  # no overall limit
        now = self._clock()
        if self._last_refill is None:
            self._last_refill = now
        elapsed = max(0.0, now - self._last_refill)
        tokens = min(float(self._burst), self._tokens + elapsed * self._qps) - 1.0
        self._tokens, self._last_refill = tokens, now
        return 0.0 if tokens >= 0 else -tokens / self._qps

    # -- producers ---------------------------------------------------------------

    def add(self, key: Hashable, reason: str | None = None) -> None:
        """Queue ``key`` (or merge ``reason`` if already pending). Ignored after shutdown."""
        with self.mutex:
            self._add_locked(key, (reason,))

    def put(self, key: Hashable, block: bool = True, timeout: float | None = None) -> None:
        """``add(key)``: never blocks (unbounded); ``block`` and ``timeout`` are ignored."""
        with self.mutex:
            self._add_locked(key, ())

    def add_after(self, key: Hashable, delay: float, reason: str | None = None) -> None:
        """Add ``key`` once ``delay`` seconds (on the clock) have passed.

        Per key only the earliest due time is kept; reasons are merged either way.
        """
        with self.mutex:
            self._add_after_locked(key, delay, reason)

    def add_rate_limited(self, key: Hashable, reason: str | None = None) -> float:
        """Count a failure for ``key`` and add it after max(per-key backoff, token-bucket
        delay); return that delay in seconds.  The backoff is ``base_delay`` doubling per
        failure since the last ``forget``, capped at ``max_delay``."""
        with self.mutex:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            # 2.0 ** 1024 overflows a float; long before that we are at max_delay anyway.
            backoff = self._max_delay if failures >= 1024 else min(
                self._base_delay * 2.0 ** failures, self._max_delay)
            delay = max(backoff, self._reserve_locked())
            self._add_after_locked(key, delay, reason)
            return delay

    def forget(self, key: Hashable) -> None:
        """Reset ``key``'s failure count (call after a successful run)."""
        with self.mutex:
            self._failures.pop(key, None)

    def num_requeues(self, key: Hashable) -> int:
        """Failures counted for ``key`` by ``add_rate_limited`` since its last ``forget``."""
        with self.mutex:
            return self._failures.get(key, 0)

    # -- consumers ---------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> tuple[Hashable, list[str]] | None:
        """Block until a key is ready, mark it processing and return ``(key, reasons)``.

        Returns None after ``timeout`` real seconds (``timeout <= 0`` or
        ``block=False`` never blocks), or once shut down -- immediately without
        drain; with drain when nothing is queued and no running key is owed a
        re-run by ``done``.  The caller must call ``done(key)`` when finished.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.not_empty:
            while True:
                if self.is_shutdown and not self._drain:
                    return None
                if self._qsize():
                    return self._get()
                # a dirty key that is not queued is running and will be re-queued by done()
                if self.is_shutdown and not self._dirty:
                    return None
                if not block:
                    return None
                if deadline is None:
                    self.not_empty.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self.not_empty.wait(remaining)

    def get_nowait(self) -> tuple[Hashable, list[str]]:
        """``(key, reasons)`` of a ready key, now processing; raises ``queue.Empty`` if
        none is ready (or the queue is shut down)."""
        item = self.get(block=False)
        if item is None:
            raise queue.Empty
        return item

    def done(self, key: Hashable) -> None:
        """Mark ``key`` finished; if it was added meanwhile, queue it again (once).

        A key that is not processing is ignored (a stray or second ``done``)."""
        with self.mutex:
            if key not in self._processing:
                return  # a stray/double done() must not queue a pending key twice
            self._processing.discard(key)
            if key in self._dirty:
                self.queue.append(key)
                self.not_empty.notify()
            else:
                self.unfinished_tasks -= 1
                if not self.unfinished_tasks:
                    self.all_tasks_done.notify_all()
            if self.is_shutdown:
                self.not_empty.notify_all()  # draining getters may be done waiting
            self._changed()

    def task_done(self, key: Hashable = _NO_KEY) -> None:
        """``done(key)``.  Raises TypeError without the key ``get`` returned."""
        if key is _NO_KEY:
            raise TypeError("WorkQueue.task_done() needs the key that get() returned: "
                            "call done(key) (or task_done(key))")
        self.done(key)

    # -- introspection -----------------------------------------------------------

    def is_pending(self, key: Hashable) -> bool:
        """True if ``key`` is queued or owed a re-run (delayed-only keys don't count)."""
        with self.mutex:
            return key in self._dirty

    def is_processing(self, key: Hashable) -> bool:
        """True between the ``get`` that returned ``key`` and its ``done``."""
        with self.mutex:
            return key in self._processing

    def __len__(self) -> int:
        """Number of keys ready to hand out now: ``qsize()``."""
        with self.mutex:
            return len(self.queue)

    def delayed_count(self) -> int:
        """Number of keys waiting for their due time."""
        with self.mutex:
            return len(self._waiting)

    def next_due(self) -> float | None:
        """Earliest due time of a delayed key, on the injected clock, or None."""
        with self.mutex:
            self._prune_locked()
            return self._heap[0][0] if self._heap else None

    def idle(self, within: float = 0.0) -> bool:
        """True if nothing is queued or processing and nothing is due within ``within``."""
        with self.mutex:
            if self.queue or self._processing:
                return False
            self._prune_locked()
            return not self._heap or self._heap[0][0] > self._clock() + within

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``predicate()`` is true (return True) or ``timeout`` real
        seconds pass (return False).  The predicate runs without the lock held, so
        it may call this queue; it is re-checked after every state change and at
        least every 50 ms (it may depend on things outside the queue)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.mutex:
                seen = self._changes
            if predicate():
                return True
            with self.mutex:
                wait = 0.05
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                if self._changes == seen:  # otherwise re-check straight away
                    self._state_changed.wait(wait)

    # -- timer and lifecycle -----------------------------------------------------

    def fire_due(self) -> int:
        """One timer iteration: queue every delayed key that is due; return how many."""
        with self.mutex:
            return self._fire_due_locked()

    def _run_timer(self) -> None:
        with self.mutex:
            while not self.is_shutdown:
                self._fire_due_locked()
                wait = self._HEARTBEAT
                if self._heap:  # _fire_due_locked left a live entry on top
                    wait = min(wait, max(0.0, self._heap[0][0] - self._clock()))
                # Woken early by add_after (an earlier item) or shutdown.
                self._due_changed.wait(wait)

    def start(self) -> None:
        """Start the single timer thread (idempotent; no-op after shutdown)."""
        with self.mutex:
            if self._timer is not None or self.is_shutdown:
                return
            self._timer = threading.Thread(target=self._run_timer, daemon=True,
                                           name=f"fabrica-{self.name}-timer")
            self._timer.start()

    def shutdown(self, drain: bool = False) -> None:
        """Stop accepting adds and wake every waiter.  Delayed keys are dropped.

        Without ``drain`` the queued keys are dropped too (``get`` returns None,
        ``join`` waits only for the keys processing); with ``drain`` ``get`` keeps
        handing out queued keys, and those ``done`` re-queues, until none are left.
        Only the first call decides ``drain``.
        """
        with self.mutex:
            if self.is_shutdown:
                return
            self.is_shutdown = True
            self._drain = drain
            self._heap.clear()
            self._waiting.clear()
            self._waiting_reasons.clear()
            if not drain:
                self.unfinished_tasks -= len(self.queue)
                self.queue.clear()
                self._dirty.clear()
                self._reasons.clear()
            if not self.unfinished_tasks:
                self.all_tasks_done.notify_all()
            self.not_empty.notify_all()
            self._due_changed.notify_all()
            self._changed()

    def stop(self, timeout: float | None = None) -> None:
        """``shutdown()`` (keeping an earlier drain choice) and join the timer thread."""
        self.shutdown()
        with self.mutex:
            timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(timeout)

    def __enter__(self) -> WorkQueue:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


###############################################################################
# Kinds #######################################################################
###############################################################################
#
# What register() knows about a kind (KindInfo) and the rules every write of
# it keeps, whoever makes it: fabrica's own finalizer as the kind says,
# finalizers only removed once deletion began, no metadata written as spec.

FINALIZER = "fabrica.io/finalize"
_FLAT_RESERVED = {"name", "labels", "annotations", "apiVersion", "kind", "status"}   # never spec in a flat body


_FRAMEWORK_STATUS = {
    "conditions": {"type": "array", "items": {"type": "object"}},
    "observedGeneration": {"type": "integer"},
    "version": {"type": "string"},
}


def _with_framework_status(definition) -> dict:
    """A status schema that also admits the fields fabrica writes (conditions, observedGeneration, version)."""
    schema = deepcopy_json(Schema(definition).json)
    if isinstance(schema.get("properties"), dict):
        for key, sub in _FRAMEWORK_STATUS.items():
            schema["properties"].setdefault(key, sub)
    return schema


class KindInfo:
    """What register() knows about one kind."""

    def __init__(self, kind, plural, prefix, reconcile=None, **options):
        self.kind, self.plural, self.prefix = kind, plural, prefix
        self.reconcile = reconcile
        self.spec = None if options.get("spec") is None else Schema(options["spec"])
        self.status = None if options.get("status") is None else Schema(_with_framework_status(options["status"]))
        self.validate = options.get("validate")
        self.owns = list(options.get("owns") or ())
        self.watches = dict(options.get("watches") or {})
        self.finalize = options.get("finalize")
        self.workers = int(options.get("workers", 1))
        self.resync = options.get("resync", 600)
        self.timeout = options.get("timeout")
        history = options.get("history", False)
        self.history = 0 if not history else (None if history is True else int(history))
        self.history_on = bool(history)

    @property
    def has_controller(self) -> bool:
        """A controller runs this kind's reconcile or finalize (a finalizer alone needs one too)."""
        return self.reconcile is not None or self.finalize is not None

    def describe(self) -> dict:
        return {"kind": self.kind, "plural": self.plural, "prefix": self.prefix,
                "patchTypes": [MERGE_PATCH, JSON_PATCH, SHORTHAND_PATCH],
                "controller": self.has_controller, "history": self.history_on,
                "finalizer": self.finalize is not None}


def _with_own_finalizer(info: KindInfo, finalizers: list, deleting: bool) -> list:
    """``finalizers`` with fabrica's own kept true to the kind (SPEC §5.6).

    A kind with ``finalize=`` carries it on every object, but it is not added
    once deletion has begun (Kubernetes: no new finalizers then). A kind
    without one (every kind of the open server) never carries it: nothing
    would remove it, and the object would wait for its delete forever.
    """
    if info.finalize is None:
        return [f for f in finalizers if f != FINALIZER]
    if FINALIZER in finalizers or deleting:
        return list(finalizers)
    return [*finalizers, FINALIZER]


def _check_finalizers(info: KindInfo, old_meta: dict, meta: dict) -> None:
    """Kubernetes' finalizer rules for a write of ``old_meta`` to ``meta``; ValidationError if broken.

    Once deletionTimestamp is set (it is server-managed, so it is never
    cleared) finalizers may only be removed; fabrica's own is kept or added
    as the kind requires.
    """
    deleting = old_meta["deletionTimestamp"] is not None
    if deleting:
        added = [f for f in meta["finalizers"] if f not in old_meta["finalizers"]]
        if added:
            raise _validation("metadata.finalizers", f"cannot gain {', '.join(map(repr, added))}: "
                              f"{old_meta['name']!r} is being deleted, and then finalizers can only be removed")
    meta["finalizers"] = _with_own_finalizer(info, meta["finalizers"], deleting)


# The top-level keys a flat body reserves (_FLAT_RESERVED) and the envelope's markers are never spec
# fields there, nor in a spec patch, where writing one is the same mistake (SPEC §6.2, §6.4): why, and
# what to do instead. A spec field of such a name is written with the envelope form.
_NOT_SPEC = {
    "status": "write it through the object's /status route",
    "labels": "labels are metadata: PUT the envelope form ({\"metadata\": {\"labels\": ...}}, which replaces "
              "them) or the flat form ({\"labels\": ...}, which merges them)",
    "annotations": "annotations are metadata: PUT the envelope form ({\"metadata\": {\"annotations\": ...}}, "
                   "which replaces them) or the flat form ({\"annotations\": ...}, which merges them)",
    "name": "the name is given at create and never changes",
    "apiVersion": f"apiVersion is always {API_VERSION!r}",
    "kind": "kind is the one served at the URL",
    "metadata": "to change labels, annotations or finalizers, PUT the envelope form ({\"metadata\": {...}})",
    "spec": "a spec patch applies to the spec already: patch its fields directly ({\"x\": 1}, not "
            "{\"spec\": {\"x\": 1}})",
}


def _not_spec(key: str) -> ValidationError:
    """The 422 for a flat body or a spec patch that writes the top-level ``key`` of _NOT_SPEC."""
    where = "a flat body or a spec patch" if key in _FLAT_RESERVED else "a spec patch"
    return _validation(key, f"is not a spec field in {where}; {_NOT_SPEC[key]}. A spec field named {key} is "
                            f"written with the envelope form, {{\"spec\": {{\"{key}\": ...}}}}")


def _patch_writes_not_spec(patch, patch_type: str, before: dict, after: dict) -> str | None:
    """The first key of _NOT_SPEC a spec patch writes at the top level of the spec, or None.

    A patch writes a key when it names it as a target (a merge patch's key,
    a shorthand path, a JSON Patch path, or the source of a move) or when the
    key is created, changed or removed in ``after``; one that leaves such a
    key alone (a spec that has one from the envelope form) is fine.
    """
    if patch_type == "merge":
        targets = set(patch)
    elif patch_type == "shorthand":
        targets = {key.split(".", 1)[0] for key in patch}
    else:
        targets = {op[member].split("/", 2)[1] for op in patch if isinstance(op, dict)
                   for member in ("path", "from") if op.get("op") != "test" and
                   (member == "path" or op.get("op") == "move") and
                   isinstance(op.get(member), str) and op[member].startswith("/")}
    for key in _NOT_SPEC:
        # the result catches what no target names: a JSON Patch on the root ("") that brings one along
        if key in targets or (key in before) != (key in after) or not _json_equal(before.get(key), after.get(key)):
            return key
    return None


def _validation(field: str, message: str) -> ValidationError:
    return ValidationError(f"{field} {message}", [{"field": field, "message": message}])


def _check_string_map(value, field: str, *, label_values: bool) -> list[dict]:
    if not isinstance(value, dict):
        return [{"field": field, "message": "must be an object of strings"}]
    errors = []
    for key, item in value.items():
        problem = _label_key_problem(key)
        if problem:
            errors.append({"field": f"{field}.{key}", "message": problem})
        if not isinstance(item, str):
            errors.append({"field": f"{field}.{key}", "message": "value must be a string"})
        elif label_values:
            problem = _label_value_problem(item, "value")
            if problem:
                errors.append({"field": f"{field}.{key}", "message": problem})
    return errors


###############################################################################
# Registry ####################################################################
###############################################################################
#
# The write path (Kubernetes: the generic registry). Every write, REST,
# app.client or a controller's, goes through Registry.create/mutate/delete:
# validation, server-managed fields, generation, finalizers, history and
# compare-and-swap on resourceVersion. The GarbageCollector deletes a
# dependent once every owner is positively gone (Store.gone: never merely
# not loaded) and retries failed steps until done.

_CAS_RETRIES = 50
OPEN_KINDS = 1000           # kinds an open server makes at most (their names are client input)


class GarbageCollector:
    """Deletes the dependents whose owners are all gone (SPEC §5.5) and retries every step that failed.

    ``collect(keys)`` runs a cascade in the caller's thread (the owner's
    delete, the start-up sweep): each key is a dependent to look at; one
    that is deleted makes its own dependents the next keys. A step that
    fails (an I/O error, a full disk) is logged and queued here, and one
    thread retries it with per-key exponential backoff (5 ms doubling to
    ``max_delay``) until it succeeds, without a restart. ``process_next``
    is one iteration of that thread. Thread-safe; never raises from a step.
    """

    def __init__(self, registry: Registry, *, clock=time.monotonic, max_delay: float = 300.0):
        self.registry = registry
        self.queue = WorkQueue("gc", clock=clock, max_delay=max_delay)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.retries = 0

    def start(self) -> None:
        self.queue.start()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fabrica-gc")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop retrying (pending retries are dropped: the next start-up sweep finds them again)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self.queue.shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self.queue.stop(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.process_next(timeout=0.5)

    def process_next(self, timeout: float | None = 0.0) -> bool:
        """Retry one queued step (and the cascade below it); False if none was ready within ``timeout``."""
        item = self.queue.get(timeout=timeout)
        if item is None:
            return False
        key = item[0]
        try:
            self.retries += 1
            self.collect([key])
        finally:
            self.queue.done(key)
        return True

    def collect(self, keys) -> None:
        """Collect ``keys`` (``(kind, uid)`` of dependents) and, under each one deleted, its dependents.

        A work list, not recursion, so any depth of ownership is collected.
        """
        work = list(keys)
        while work:
            key = work.pop()
            try:
                gone = self.registry.collect(*key)
            except Exception as exc:    # one failed step never stops the others; it is retried
                delay = self.queue.add_rate_limited(key, "retry")
                ctl_log.error("garbage collection of %s %s failed (%s); retrying in %.3gs", key[0], key[1],
                              exc, delay, exc_info=not isinstance(exc, FabricaError))
                continue
            self.queue.forget(key)
            if gone:
                work.extend(self.registry.store.dependents(*key))

    def idle(self, within: float = 0.0) -> bool:
        return self.queue.idle(within)


def _versions_text(versions) -> str:
    """How an error message shows the resourceVersions a precondition named: ``"6", "7"``, ``*``."""
    return ", ".join("*" if v == "*" else f'"{v}"' for v in versions) or "no strong entity tag"


class Registry:
    """The write path between the store and every API (what Kubernetes' apiserver calls the generic registry).

    REST, ``app.client`` and the controllers all write through it, so a
    write is validated, defaulted and recorded the same way whoever makes
    it: schemas and ``validate=``, server-managed metadata, generation (it
    moves exactly when the spec changes, which is what makes an event's
    ``updateType``), owners, finalizers, spec history, compare-and-swap on
    resourceVersion (retried on a race) and garbage collection.

    It takes parsed values, never HTTP: a spec dict, label dicts, the
    resourceVersion a body carried (``resource_version``: stale -> 409
    ConflictError) and the resourceVersions an If-Match or If-None-Match
    names (``if_match``/``if_none_match``: a collection of resourceVersion
    strings, ``"*"`` for any; unmet -> 412 PreconditionFailedError). A write
    returns the stored object, which is shared: treat it as read-only.
    Writes raise NotFoundError, ValidationError (422, every failing field
    listed), PayloadTooLargeError (413, ``max_body`` bytes of compact JSON
    per object), ConflictError, PreconditionFailedError, StoreError, and
    ConfigurationError before start(). Thread-safe.

    ``kinds`` maps each declared kind to its KindInfo; ``store`` is the
    Store (opened by the app before start()); ``gc`` the GarbageCollector
    start() makes. ``open`` lets a create at an unknown plural make its kind
    (the open server, see open_kind).
    """

    def __init__(self, *, max_body: int = MAX_BODY, open: bool = False, clock=time.monotonic):
        self.max_body = max_body
        self.open = open
        self.clock = clock
        self.store: Store | None = None
        self.gc: GarbageCollector | None = None
        self.started = False
        self.kinds: dict[str, KindInfo] = {}
        self._by_plural: dict[str, KindInfo] = {}
        self._kind_lock = threading.Lock()          # guards open-server kind creation and _new_kinds
        self._new_kinds: dict[str, list] = {}       # plural -> [KindInfo, creates in flight] (not yet served)

    # -- kinds -----------------------------------------------------------------
    def declare(self, kind: str, reconcile=None, **options) -> KindInfo:
        """Add a kind (register()'s options); ConfigurationError when it is taken or an option is invalid."""
        unknown = set(options) - {"plural", "prefix", "spec", "status", "validate", "owns", "watches",
                                  "finalize", "workers", "resync", "timeout", "history"}
        if unknown:
            raise ConfigurationError(f"register({kind!r}): unknown option(s) {', '.join(sorted(unknown))}")
        if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
            raise ConfigurationError(f"kind {kind!r} must be CapWords letters and digits, like 'RackTemplate'")
        plural = options.get("plural") or pluralize(kind)
        prefix = options.get("prefix") or kind.lower()
        if not PLURAL_RE.fullmatch(plural) or plural in RESERVED_PATHS:
            raise ConfigurationError(f"plural {plural!r} for {kind} must be lower-case letters and digits, "
                                     f"and not one of {sorted(RESERVED_PATHS)}")
        if not PREFIX_RE.fullmatch(prefix):
            raise ConfigurationError(f"prefix {prefix!r} for {kind} must be lower-case letters and digits")
        if kind in self.kinds:
            raise ConfigurationError(f"kind {kind} is already registered")
        if plural in self._by_plural:
            raise ConfigurationError(f"plural {plural!r} is already used by {self._by_plural[plural].kind}")
        for name in ("validate", "finalize"):
            if options.get(name) is not None and not callable(options[name]):
                raise ConfigurationError(f"register({kind!r}): {name} must be callable")
        if reconcile is not None and not callable(reconcile):
            raise ConfigurationError(f"register({kind!r}): reconcile must be callable")
        if int(options.get("workers", 1)) < 1:
            raise ConfigurationError(f"register({kind!r}): workers must be >= 1")
        options = {k: v for k, v in options.items() if k not in ("plural", "prefix")}
        info = KindInfo(kind, plural, prefix, reconcile, **options)
        self.kinds[kind] = info
        self._by_plural[plural] = info
        if self.store is not None and self.store.opened:
            self.store.add_kind(kind, plural)
        return info

    def served(self, plural: str) -> KindInfo | None:
        """The kind served at /<plural>, or None."""
        return self._by_plural.get(plural)

    def resolve_kind(self, name: str) -> KindInfo:
        """A kind by name or plural, in any case (``rack``, ``Racks``, ``RACK``); NotFoundError if none."""
        info = self.kinds.get(name) or self._by_plural.get(name)
        if info is None:
            low = name.lower()
            for candidate in self.kinds.values():
                if low in (candidate.kind.lower(), candidate.plural):
                    return candidate
            raise NotFoundError(f"unknown kind {name!r}; known kinds: {', '.join(sorted(self.kinds)) or 'none'}")
        return info

    def check_wiring(self) -> None:
        """ConfigurationError for owns=/watches= that can never act: no reconcile, or a kind never registered."""
        for info in self.kinds.values():
            named = list(info.owns) + list(info.watches)
            if named and info.reconcile is None:
                raise ConfigurationError(f"register({info.kind!r}): owns=/watches= re-queue its reconcile, but it "
                                         f"has none; pass reconcile= or use @app.register({info.kind!r}, ...)")
            unknown = [k for k in named if k not in self.kinds]
            if unknown:
                raise ConfigurationError(f"register({info.kind!r}): {', '.join(map(repr, unknown))} is no registered "
                                         f"kind; register it too (kinds: {', '.join(self.kinds)})")

    def discovery(self) -> dict:
        """What GET /apis answers: the API version, whether the server is open, and every kind."""
        return {"apiVersion": API_VERSION, "open": self.open, "kinds": [i.describe() for i in self.kinds.values()]}

    @contextlib.contextmanager
    def open_kind(self, plural: str, kind: str | None = None):
        """The kind to create an object of at /<plural> on the open server; a new kind is made by its first object.

        A context manager around the create: ``with registry.open_kind(plural,
        body_kind) as info: registry.create(info, ...)``. ``kind`` names a
        new kind (default: the singular of ``plural``). Kinds are named by
        clients, so there are at most OPEN_KINDS of them, counting the new
        ones being created (ValidationError past that, or for a kind name
        taken or not CapWords). A new kind is provisional while its creates
        run: the store can take its objects, but the kind is declared
        (served, listed in /apis) only once one of them is stored, and
        forgotten if none is, so a failed create leaves no kind behind.
        Concurrent creates of one new kind share it.
        """
        self.require_started()
        with self._kind_lock:
            info = self._by_plural.get(plural)
            pending = None
            if info is None:
                pending = self._new_kinds.get(plural)
                if pending is None:
                    kind = kind or singularize(plural)
                    if not KIND_RE.fullmatch(kind) or kind in self.kinds or \
                            any(p[0].kind == kind for p in self._new_kinds.values()):
                        raise ValidationError(f"cannot create kind {kind!r} at /{plural}", [
                            {"field": "kind", "message": "must be CapWords and not already served"}])
                    if len(self.kinds) + len(self._new_kinds) >= OPEN_KINDS:
                        making = f" and is making {len(self._new_kinds)}" if self._new_kinds else ""
                        raise ValidationError(f"cannot create kind {kind!r} at /{plural}: this open server already "
                                              f"serves {len(self.kinds)} kinds{making}, its limit is {OPEN_KINDS}",
                                              [{"field": "kind", "message": f"at most {OPEN_KINDS} kinds"}])
                    pending = self._new_kinds[plural] = [KindInfo(kind, plural, kind.lower()), 0]
                    self.store.add_kind(kind, plural)
                info = pending[0]
                pending[1] += 1         # creates of the new kind in flight
        if pending is None:
            yield info
            return
        try:
            yield info
        finally:
            with self._kind_lock:
                pending[1] -= 1
                # stored, even by a create that failed afterwards (a disk that did not confirm it)
                if plural not in self._by_plural and self.store.count(info.kind):
                    self.declare(info.kind, None, plural=plural)
                if not pending[1]:
                    del self._new_kinds[plural]
                    if plural not in self._by_plural:
                        self.store.drop_kind(info.kind)

    # -- life cycle ------------------------------------------------------------
    def start(self) -> None:
        """Take writes (``store`` is open by now) and start the garbage collector's retries."""
        self.started = True
        self.gc = GarbageCollector(self, clock=self.clock)
        self.gc.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the garbage collector (pending retries wait for the next start-up sweep); writes then fail."""
        if self.gc is not None:
            self.gc.stop(timeout)
        self.started = False

    def require_started(self) -> None:
        """ConfigurationError unless start() has run: every read and write needs the open store."""
        if not self.started:
            raise ConfigurationError("the app is not started: call app.start() (or use 'with app:') first")

    # -- validation ------------------------------------------------------------
    def _check_fields(self, info: KindInfo, *, name=None, labels=None, annotations=None, finalizers=None,
                      owner_references=None, resource_version=None, spec=None) -> None:
        """ValidationError listing every invalid metadata field of a write (and then its spec's errors too)."""
        if spec is not None and not isinstance(spec, dict):
            raise BadRequestError("spec must be a JSON object")
        errors = []
        if name is not None and not valid_name(name):
            errors.append({"field": "metadata.name", "message": "must be a DNS-1123 subdomain: lower-case "
                           "letters, digits, '-' and '.', alphanumeric at both ends, at most 253 characters"})
        if labels is not None:
            errors += _check_string_map(labels, "metadata.labels", label_values=True)
        if annotations is not None:
            errors += _check_string_map(annotations, "metadata.annotations", label_values=False)
        problem = None if owner_references is None else owner_references_problem(owner_references)
        if problem is not None:
            errors.append({"field": f"metadata.ownerReferences{problem[0]}", "message": problem[1]})
        if finalizers is not None:
            if not isinstance(finalizers, list) or any(
                    not isinstance(f, str) or not f or _label_key_problem(f) for f in finalizers):
                errors.append({"field": "metadata.finalizers", "message": "must be a list of qualified names"})
        if resource_version is not None and not isinstance(resource_version, str):
            errors.append({"field": "metadata.resourceVersion", "message": "must be a string"})
        if errors and spec is not None and info.spec is not None:
            errors += info.spec.validate(spec, "spec")[1]      # list every failing field at once
        if errors:
            raise ValidationError("invalid " + ", ".join(e["field"] for e in errors), errors)

    def _check_spec(self, info: KindInfo, spec) -> dict:
        """The spec with defaults filled in; ValidationError (422) listing every failing field."""
        if not isinstance(spec, dict):
            raise BadRequestError("spec must be a JSON object")
        return spec if info.spec is None else info.spec.check(spec, "spec", max_size=self.max_body)

    def check_status(self, info: KindInfo, status, stored: dict) -> dict:
        """The status with defaults; the fields fabrica writes are checked apart from the user's schema.

        ``stored`` is the status it replaces (conditions kept from it are only
        shape-checked). BadRequestError unless a dict; ValidationError.
        """
        if not isinstance(status, dict):
            raise BadRequestError("status must be a JSON object")
        own = {k: status[k] for k in _FRAMEWORK_STATUS if k in status}
        errors = status_problems(own, stored)
        rest = {k: v for k, v in status.items() if k not in own}
        if info.status is not None:
            rest, more = info.status.validate(rest, "status", max_size=self.max_body)
            errors += more
        if errors:
            raise ValidationError("status is invalid: " + "; ".join(f"{e['field']}: {e['message']}"
                                                                    for e in errors[:3]), errors)
        rest.update(own)
        return rest

    def _run_validate(self, info: KindInfo, obj: dict) -> None:
        if info.validate is None:
            return
        try:
            info.validate(Resource(deepcopy_json(obj)))
        except ValidationError:
            raise
        except (ValueError, TypeError) as exc:
            raise ValidationError(str(exc)) from None

    # -- writes ----------------------------------------------------------------
    def get(self, info: KindInfo, ref: str) -> dict:
        """The stored object (a uid or a name); NotFoundError if missing."""
        self.require_started()
        obj = self.store.resolve(info.kind, ref)
        if obj is None:
            raise NotFoundError(f'{info.kind} "{ref}" not found')
        return obj

    def _owner_check(self, info: KindInfo, owner_keys) -> list[dict]:
        """The owners; ConflictError unless every one exists and is not being deleted."""
        owners = []
        for kind, uid in owner_keys:
            current = self.store.get(kind, uid)
            if current is None or current["metadata"]["deletionTimestamp"]:
                raise ConflictError(f"cannot create a {info.kind} owned by {kind} {uid!r}: the owner "
                                    f"{'does not exist' if current is None else 'is being deleted'}")
            owners.append(current)
        return owners

    def create(self, info: KindInfo, *, name: str | None = None, spec: dict | None = None,
               labels: dict | None = None, annotations: dict | None = None, finalizers: list | None = None,
               owner_references: list | None = None, resource_version: str | None = None) -> dict:
        """Create an object of ``info``'s kind; the uid is drawn here, the name defaults to it.

        ``owner_references`` are ``{"kind", "uid", "controller"?}`` dicts:
        every owner must exist and not be being deleted (ConflictError).
        ``resource_version`` (a GET answer sent back) is only checked to be
        a string. Raises as the class says; returns the stored object.
        """
        self._check_fields(info, name=name, labels=labels, annotations=annotations, finalizers=finalizers,
                           owner_references=owner_references, resource_version=resource_version, spec=spec)
        self.require_started()
        owner_references = owner_references or []
        spec = self._check_spec(info, deepcopy_json(spec or {}))
        finalizers = _with_own_finalizer(info, list(finalizers or []), deleting=False)
        owner_keys = [(ref["kind"], ref["uid"]) for ref in owner_references]
        # every reference is kept (SPEC §5.5), in one form; the name is the owner's own
        owner_refs = [{"kind": ref["kind"], "uid": ref["uid"], "name": owner["metadata"]["name"],
                       "controller": ref.get("controller", False)}
                      for ref, owner in zip(owner_references, self._owner_check(info, owner_keys))]

        def guard():
            # again under the store lock: a reconcile racing its owner's delete cannot leave an orphan
            self._owner_check(info, owner_keys)
        status = {}
        if info.status is not None:
            status, errors = info.status.validate({}, "status")    # the status schema's defaults, if complete
            status = {} if errors else status
        for _ in range(16):
            uid = f"{info.prefix}-{os.urandom(4).hex()}"
            obj = new_object(info.kind, name or uid, uid, spec=spec, labels=labels, annotations=annotations,
                             finalizers=finalizers, owner_references=owner_refs)
            obj["status"] = deepcopy_json(status)
            snapshot = None
            if info.history_on:
                obj["status"]["version"] = "1"
                snapshot = self._snapshot(obj)
            self._run_validate(info, obj)
            try:
                return self.store.create(obj, snapshot, guard if owner_keys else None, wait_for=owner_keys,
                                         max_size=self.max_body)
            except ConflictError as exc:
                if exc.details and exc.details[0]["field"] == "metadata.uid":
                    continue        # a uid collision: draw another one
                raise
        raise ConflictError(f"could not draw a free uid for {info.kind}; retry")

    def mutate(self, info: KindInfo, ref: str, change, *, action: str = "updated", if_match=None,
               if_none_match=None, resource_version: str | None = None) -> dict:
        """Read, apply ``change(new)`` to a copy, validate, and compare-and-swap; retried on races.

        ``change`` edits the copy in place (server-managed metadata and
        ownerReferences are put back after it). Returns the stored object:
        the current one, unwritten, when nothing changed. A race with another
        write retries, unless the caller named a resourceVersion
        (ConflictError) or an If-Match (PreconditionFailedError).
        """
        self.require_started()
        store, kind = self.store, info.kind
        for _ in range(_CAS_RETRIES):
            cur = store.resolve(kind, ref)
            if cur is None:
                raise NotFoundError(f'{kind} "{ref}" not found')
            name, rv = cur["metadata"]["name"], cur["metadata"]["resourceVersion"]
            if if_none_match is not None and ("*" in if_none_match or rv in if_none_match):
                raise PreconditionFailedError(f"{kind} {name!r} exists (If-None-Match: "
                                              f"{_versions_text(if_none_match)})")
            if if_match is not None and "*" not in if_match and rv not in if_match:
                raise PreconditionFailedError(f"{kind} {name!r} is at resourceVersion {rv}, the request expected "
                                              f"If-Match: {_versions_text(if_match)}; re-read and retry")
            if resource_version is not None and resource_version != rv:
                raise ConflictError(f"{kind} {name!r} is at resourceVersion {rv}, the request expected "
                                    f"{resource_version}; re-read and retry")
            new = deepcopy_json(cur)
            change(new)
            meta, old_meta = new["metadata"], cur["metadata"]
            for key in SERVER_MANAGED:
                meta[key] = old_meta[key]
            meta["ownerReferences"] = old_meta["ownerReferences"]
            _check_finalizers(info, old_meta, meta)
            snapshot = None
            if not _json_equal(new["spec"], cur["spec"]):      # JSON equality: true is not 1
                meta["generation"] = old_meta["generation"] + 1
                if info.history_on:
                    new["status"]["version"] = str(meta["generation"])
                    snapshot = self._snapshot(new)
            elif info.history_on and "version" in cur["status"]:
                new["status"]["version"] = cur["status"]["version"]    # status writes keep it (SPEC §6.9)
            if _json_equal(new, cur):
                return cur
            self._run_validate(info, new)
            meta["updatedAt"] = utcnow()
            try:
                if old_meta["deletionTimestamp"] and not meta["finalizers"]:
                    # Kubernetes: the answer and the deleted event show the object as this write left it
                    return self._remove(info, old_meta["uid"], rv, last=new)
                stored = store.replace(new, rv, action, snapshot, max_size=self.max_body)
                if snapshot is not None and info.history:      # after the commit: never raises
                    store.prune_versions(kind, old_meta["uid"], info.history)
                return stored
            except StaleError:
                if if_match is not None:
                    raise PreconditionFailedError(f"{kind} {name!r} changed while the request was applied "
                                                  f"(If-Match: {_versions_text(if_match)}); re-read and retry"
                                                  ) from None
                if resource_version is not None:
                    raise
        raise ConflictError(f"{kind} {ref!r} is changing too fast to update; retry")

    def update(self, info: KindInfo, ref: str, *, name: str | None = None, spec: dict | None = None,
               labels: dict | None = None, annotations: dict | None = None, finalizers: list | None = None,
               merge_metadata: bool = False, resource_version: str | None = None, if_match=None,
               if_none_match=None) -> dict:
        """Replace what is given (None: keep): the spec, labels, annotations and finalizers.

        ``merge_metadata`` merges labels and annotations into the current
        ones instead of replacing them (the flat body form). ``name`` must be
        the object's own (it is immutable).
        """
        self._check_fields(info, name=name, labels=labels, annotations=annotations, finalizers=finalizers,
                           resource_version=resource_version, spec=spec)
        spec = None if spec is None else self._check_spec(info, deepcopy_json(spec))

        def change(new):
            meta = new["metadata"]
            if name is not None and name != meta["name"]:
                raise _validation("metadata.name", f"is immutable (it is {meta['name']!r})")
            if spec is not None:
                new["spec"] = deepcopy_json(spec)
            for key, value in (("labels", labels), ("annotations", annotations)):
                if value is not None:
                    meta[key] = {**meta[key], **value} if merge_metadata else dict(value)
            if finalizers is not None:
                meta["finalizers"] = list(finalizers)
        return self.mutate(info, ref, change, resource_version=resource_version, if_match=if_match,
                           if_none_match=if_none_match)

    def patch(self, info: KindInfo, ref: str, patch, patch_type: str = "merge", *, status: bool = False,
              if_match=None, if_none_match=None) -> dict:
        """Patch the spec (or, with ``status``, the status): ``patch_type`` is merge, json or shorthand."""
        # a JSON Patch alone can multiply what it is given (copy): bounded as it runs; it and the
        # shorthand can nest deeper than their body (the store refuses that too, but a deeper
        # document would first meet recursion in validation and history)
        apply = {"merge": apply_merge_patch,
                 "shorthand": lambda doc, patch: apply_shorthand_patch(doc, patch, max_depth=MAX_DEPTH),
                 "json": lambda doc, ops: apply_json_patch(doc, ops, max_size=self.max_body, max_depth=MAX_DEPTH),
                 }.get(patch_type)
        if apply is None:
            raise UnsupportedMediaTypeError(f"unsupported patch type {patch_type!r}; use merge, json or shorthand")
        part = "status" if status else "spec"

        def change(new):
            result = apply(new[part], patch)
            if not isinstance(result, dict):
                raise PatchError(f"the patched {part} must be a JSON object",
                                 [{"field": part, "message": "must be an object"}])
            written = None if status else _patch_writes_not_spec(patch, patch_type, new["spec"], result)
            if written is not None:
                raise _not_spec(written)
            new[part] = self.check_status(info, result, new[part]) if status else self._check_spec(info, result)
        return self.mutate(info, ref, change, action="patched", if_match=if_match, if_none_match=if_none_match)

    def update_status(self, info: KindInfo, ref: str, status: dict, *, if_match=None, if_none_match=None) -> dict:
        """Replace the status (no generation bump); the fields fabrica writes are checked too."""
        if not isinstance(status, dict):
            raise BadRequestError("status must be a JSON object")

        def change(new):
            new["status"] = self.check_status(info, deepcopy_json(status), new["status"])
        return self.mutate(info, ref, change, if_match=if_match, if_none_match=if_none_match)

    @staticmethod
    def _snapshot(obj: dict) -> dict:
        meta = obj["metadata"]
        return {"versionId": str(meta["generation"]), "createdAt": utcnow(), "uid": meta["uid"],
                "name": meta["name"], "labels": dict(meta["labels"]), "annotations": dict(meta["annotations"]),
                "spec": deepcopy_json(obj["spec"])}

    def _remove(self, info: KindInfo, uid: str, rv: str, cascade: bool = True, last: dict | None = None) -> dict:
        """Delete an object now, then its spec history and (with ``cascade``) its dependents.

        ``last`` is its final state when the delete also changes it (Store.delete).
        """
        tomb = self.store.delete(info.kind, uid, rv, last)
        if info.history_on:
            if not self.store.prune_versions(info.kind, uid, 0):    # logged; retried until the disk lets it go
                self.gc.queue.add_rate_limited((info.kind, uid), "history")     # collect() finishes it
        if cascade:
            self.gc.collect(self.store.dependents(info.kind, uid))
        return tomb

    def restore(self, info: KindInfo, ref: str, version_id: str, *, if_match=None, if_none_match=None) -> dict:
        """Write a stored spec snapshot back as a new, validated spec write; NotFoundError if there is none."""
        obj = self.store.resolve(info.kind, ref)
        snap = None if obj is None else self.store.get_version(info.kind, obj["metadata"]["uid"], version_id)
        if snap is None:
            raise NotFoundError(f"{info.kind} {ref!r} has no version {version_id!r}")
        spec = self._check_spec(info, deepcopy_json(snap["spec"]))
        return self.mutate(info, ref, lambda new: new.__setitem__("spec", deepcopy_json(spec)), if_match=if_match,
                           if_none_match=if_none_match)

    def delete(self, info: KindInfo, ref: str, *, force: bool = False, if_match=None,
               cascade: bool = True) -> tuple[dict, bool]:
        """Delete now: ``(the object as it went, True)``; or, with finalizers pending, mark it
        deletionTimestamp: ``(the object, False)``. ``force`` skips the finalizers; ``cascade``
        collects the dependents whose owners are then all gone."""
        self.require_started()
        store, kind = self.store, info.kind
        for _ in range(_CAS_RETRIES):
            cur = store.resolve(kind, ref)
            if cur is None:
                raise NotFoundError(f'{kind} "{ref}" not found')
            meta = cur["metadata"]
            if if_match is not None and "*" not in if_match and meta["resourceVersion"] not in if_match:
                raise PreconditionFailedError(f"{kind} {meta['name']!r} is at resourceVersion "
                                              f"{meta['resourceVersion']}, the request expected If-Match: "
                                              f"{_versions_text(if_match)}; re-read and retry")
            # fabrica's own finalizer as the kind requires: added, so finalize runs even for an object
            # that missed it; dropped where nothing would ever remove it
            pending = _with_own_finalizer(info, meta["finalizers"], meta["deletionTimestamp"] is not None)
            try:
                if pending and not force:
                    if meta["deletionTimestamp"] and pending == meta["finalizers"]:
                        return cur, False       # a second DELETE changes nothing (Kubernetes)
                    new = deepcopy_json(cur)
                    new["metadata"]["finalizers"] = pending
                    new["metadata"]["updatedAt"] = utcnow()
                    new["metadata"]["deletionTimestamp"] = meta["deletionTimestamp"] or new["metadata"]["updatedAt"]
                    return store.replace(new, meta["resourceVersion"], "updated"), False
                last = None
                if not force and pending != meta["finalizers"]:
                    # the last finalizer was fabrica's own, taken off here: the deleted event shows it gone
                    last = deepcopy_json(cur)
                    last["metadata"]["finalizers"] = pending
                    last["metadata"]["updatedAt"] = utcnow()
                return self._remove(info, meta["uid"], meta["resourceVersion"], cascade, last), True
            except StaleError:
                if if_match is not None:
                    raise PreconditionFailedError(f"{kind} {meta['name']!r} changed during the delete") from None
        raise ConflictError(f"{kind} {ref!r} is changing too fast to delete; retry")

    # -- garbage collection ----------------------------------------------------
    def owners_gone(self, obj: dict) -> bool:
        """Whether ``obj`` has owners and every one is positively gone (Kubernetes: none exists any more).

        An owner that is quarantined, not loaded or of a kind this app does
        not serve is not gone (Store.gone): its dependents stay.
        """
        refs = obj["metadata"]["ownerReferences"]
        return bool(refs) and all(self.store.gone(ref["kind"], ref["uid"]) for ref in refs)

    def collect(self, kind: str, uid: str) -> bool:
        """One garbage-collection step: delete the object if its owners are all gone.

        Returns True when the object is gone (its dependents are next).
        Dependents with finalizers get deletionTimestamp and go when their
        finalizers are done. Raises FabricaError when the store fails.
        """
        info, obj = self.kinds.get(kind), self.store.get(kind, uid)
        if obj is None:
            if info is not None and info.history_on and self.store.versions(kind, uid) and \
                    not self.store.prune_versions(kind, uid, 0):    # the rest of a delete whose history removal failed
                raise StoreError(f"the spec history of the deleted {kind} {uid!r} is not removed yet")
            return True
        if info is None or not self.owners_gone(obj):
            return False
        try:
            return self.delete(info, uid, cascade=False)[1]
        except NotFoundError:
            return True

    def sweep_finalizers(self) -> int:
        """Put fabrica's finalizer on, or take it off, every object whose kind says so (SPEC §5.6).

        Runs when this process starts leading, before the controllers' start-up list: a kind that
        gained ``finalize=`` since its objects were written gets its cleanup
        when they are deleted, and one that lost it (or is now served by the
        open server) leaves no object waiting for a finalizer nothing handles:
        one being deleted that waited only for it is deleted now. Never raises.
        """
        count = 0
        for info in list(self.kinds.values()):
            # the objects the rule may change: a kind without finalize= never carries it, one with it always
            for obj in self.store.finalizer_candidates(info.kind, FINALIZER, present=info.finalize is None):
                meta = obj["metadata"]
                if _with_own_finalizer(info, meta["finalizers"], meta["deletionTimestamp"] is not None) == \
                        meta["finalizers"]:
                    continue
                try:
                    self.mutate(info, meta["uid"], lambda new: None)      # mutate applies _check_finalizers
                    count += 1
                except NotFoundError:
                    continue
                except FabricaError:
                    # not fatal: DELETE applies the same rule to the object again
                    store_log.exception("could not update the finalizers of %s %s", info.kind, meta["uid"])
        if count:
            logger.info("updated fabrica's finalizer on %d object(s) to match their kinds", count)
        return count

    def sweep_orphans(self) -> int:
        """Collect what a crash mid-cascade left: every object whose owners are all positively gone.

        Runs when this process starts leading and never raises: a delete that fails (a full disk)
        is retried by the garbage collector while the app serves. An owner
        the store could not load is not gone, so nothing is deleted because
        something else was not read (SPEC §3.0). Returns the orphans found.
        """
        orphans, kept = [], 0
        for info in list(self.kinds.values()):
            for obj in self.store.orphan_candidates(info.kind):     # an owner not held: not all present
                refs = obj["metadata"]["ownerReferences"]
                if self.owners_gone(obj):
                    orphans.append((info.kind, obj["metadata"]["uid"]))
                elif refs and all(self.store.get(r["kind"], r["uid"]) is None for r in refs):
                    kept += 1
        if kept:
            logger.warning("kept %d object(s) whose owners were not found but may exist (%s); they are collected "
                           "once their owners are known to be gone", kept,
                           "; ".join(f"{k}: {why}" for k, why in sorted(self.store.unsure.items())) or
                           "owner kinds this app does not serve")
        if orphans:
            logger.warning("deleting %d orphan(s) whose owners are gone", len(orphans))
            self.gc.collect(orphans)
        return len(orphans)


###############################################################################
# Controller ###################################################################
###############################################################################
#
# One Controller per kind with a reconcile function: a WorkQueue keyed by
# (kind, uid), `workers` threads, and a housekeeping thread for the periodic
# resync and the reconcile timeout watchdog. Events only enqueue keys; the
# worker reads the object fresh at dequeue time and calls reconcile with no
# lock held. Correctness never depends on events: the start-up list and the
# resync re-derive everything (level-based).

_ERROR_MESSAGE_MAX = 1024


class Context:
    """What reconcile gets besides the object: ``client``, ``log``, ``reasons``, ``stopping``, ``deleting``."""

    __slots__ = ("app", "client", "kind", "key", "reasons", "deleting", "stopping", "log")

    def __init__(self, client, kind: str, key, reasons, deleting: bool, log: logging.Logger | None = None,
                 app=None):
        self.app = app
        self.client = client
        self.kind = kind
        self.key = key
        self.reasons = reasons
        self.deleting = deleting
        self.stopping = threading.Event()
        self.log = log or logging.getLogger(f"fabrica.controller.{kind.lower()}")


class _Run:
    # recorded: set once the watchdog has written Stalled for this run (or given up), so the run's
    # own late write and its follow-up run come after that condition, never before it
    __slots__ = ("key", "ctx", "started", "stalled", "recorded")

    def __init__(self, key, ctx, started):
        self.key, self.ctx, self.started, self.stalled = key, ctx, started, False
        self.recorded = threading.Event()


# The reasons of the Ready=False conditions fabrica records for a failed run, one per retry policy, so
# status tells whether (and when) a retry comes; the message ends with that fact too.
_RETRIED_WITH_BACKOFF = "ReconcileError"            # any other exception: retried with backoff
_NOT_RETRIED = "ReconcilePermanentError"            # PermanentError: not retried until the object changes
_RETRIED_AFTER_DELAY = "ReconcileTemporaryError"    # TemporaryError: retried after exactly its delay
_FAILURE_REASONS = frozenset((_RETRIED_WITH_BACKOFF, _NOT_RETRIED, _RETRIED_AFTER_DELAY))


def _clear_framework_conditions(obj: Resource, stalled: bool = False) -> None:
    """Take back what fabrica recorded about earlier runs, after a run that succeeded (SPEC §5.3).

    Ready=False with one of fabrica's failure reasons (ReconcileError,
    ReconcilePermanentError, ReconcileTemporaryError) becomes
    Ready=True/ReconcileSuccess unless the function set Ready itself.
    Stalled/ReconcileTimeout is removed, as Flux and kstatus do (an absent
    Stalled means not stalled), unless this very run (``stalled``) overran its
    timeout; a conditions list left empty goes too.
    """
    ready = obj.condition("Ready")
    if ready is not None and ready.get("reason") in _FAILURE_REASONS:
        obj.set_condition("Ready", True, reason="ReconcileSuccess", message="Reconciliation successful")
    stall = obj.condition("Stalled")
    if not stalled and stall is not None and stall.get("reason") == "ReconcileTimeout":
        status = obj.status
        status["conditions"] = [c for c in status["conditions"] if c is not stall]
        if not status["conditions"]:
            del status["conditions"]


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _ERROR_MESSAGE_MAX else text[:_ERROR_MESSAGE_MAX - 1] + "…"


def _seconds_text(seconds: float) -> str:
    """A delay for a condition message: ``0.005s``, ``5.12s``, ``3600s``."""
    return f"{seconds:.0f}s" if seconds >= 100 else f"{seconds:.3g}s"


class Controller:
    """Reconciles one kind: work queue, workers, resync and timeouts (SPEC §5).

    It reads and writes through ``registry`` (the status it writes, the
    conditions it records, the finalizer it takes off), hears of the store's
    changes from ``bus`` and hands reconcile a Context with ``client`` (and
    ``app``, the application).
    ``process_next(timeout)`` is one iteration of a worker and ``housekeep()``
    one iteration of the housekeeping loop, so tests can drive them by hand.
    """

    event_queue_size = 1_000_000    # changes waiting for the controller's bus thread; overflow -> resync
    event_queue_bytes = QUEUE_BYTES  # and their bytes: changes hold whole objects

    def __init__(self, registry: Registry, info: KindInfo, *, bus: Bus, client=None, clock=time.monotonic,
                 max_delay: float = 300.0, app=None):
        self.registry = registry
        self.bus = bus
        self.client = client
        self.app = app
        self.info = info
        self.kind = info.kind
        self.clock = clock
        self.queue = WorkQueue(info.kind.lower(), clock=clock, max_delay=max_delay)
        self._lock = threading.Lock()           # guards _runs, _threads, _stalled
        self._runs: dict[object, _Run] = {}
        self._threads: list[threading.Thread] = []
        self._stalled = 0
        self._seq = 0
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._subscription: Subscription | None = None
        self._next_resync = None
        self.reconciles = self.errors = self.retries = self.resyncs = 0
        self.durations = Histogram()
        self.log = logging.getLogger(f"fabrica.controller.{info.kind.lower()}")

    # -- life cycle --------------------------------------------------------------
    def start(self) -> None:
        info = self.info
        self._kinds_of_interest = {info.kind} | set(info.owns) | set(info.watches)
        self._subscription = self.bus.subscribe_changes(
            self._on_change, queue_size=self.event_queue_size, queue_bytes=self.event_queue_bytes,
            name=f"{self.kind.lower()}-controller", on_gap=lambda: self.resync("gap"))
        self.resync("startup")
        self.queue.start()
        self._schedule_resync()
        for _ in range(info.workers):
            self._spawn_worker()
        self._housekeeper = threading.Thread(target=self._housekeep_loop, daemon=True,
                                             name=f"fabrica-{self.kind.lower()}-housekeeper")
        self._housekeeper.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work; running reconciles get ctx.stopping and ``timeout`` to finish."""
        self._stop.set()
        if self._subscription is not None:
            self._subscription.close(0)
        self.queue.shutdown()
        with self._lock:
            for run in self._runs.values():
                run.ctx.stopping.set()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads + [self._housekeeper]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.queue.stop(max(0.0, deadline - time.monotonic()))
        still = [t.name for t in threads if t.is_alive()]
        if still:
            ctl_log.warning("%s: %d reconcile(s) still running after %.1fs: %s", self.kind, len(still),
                            timeout, ", ".join(still))

    def _spawn_worker(self) -> None:
        with self._lock:
            self._seq += 1
            thread = threading.Thread(target=self._worker_loop, daemon=True,
                                      name=f"fabrica-{self.kind.lower()}-worker-{self._seq}")
            self._threads.append(thread)
        thread.start()

    def _worker_loop(self) -> None:
        me = threading.current_thread()
        try:
            while not self._stop.is_set():
                self.process_next(timeout=0.5)
                with self._lock:
                    # a replacement worker retires once the stalled run it stood in for has ended
                    if len(self._threads) > self.info.workers + self._stalled:
                        return
        finally:
            with self._lock:
                self._threads.remove(me)

    # -- triggers ------------------------------------------------------------------
    def _on_change(self, change: Change) -> None:
        """Queue what one committed change concerns (SPEC §5.2, triggers 2-4)."""
        obj = change.object
        kind = obj["kind"]
        if kind not in self._kinds_of_interest:
            return
        action, name, info = change.action, obj["metadata"]["name"], self.info
        if kind == info.kind and (action in ("created", "deleted") or change.update_type != "status"):
            self.queue.add((kind, obj["metadata"]["uid"]), f"{kind} {name} {action}")
        if kind in info.owns:       # every owner of this kind, controller or not (SPEC §5.5: several)
            for ref in obj["metadata"]["ownerReferences"]:
                if ref["kind"] == info.kind:
                    self.queue.add((info.kind, ref["uid"]), f"owned {kind} {name} {action}")
        mapper = info.watches.get(kind)
        if mapper is not None:
            try:
                refs = mapper(Resource(deepcopy_json(obj))) or ()
                for ref in refs:
                    self._add_ref(ref, f"watched {kind} {name} {action}")
            except Exception:
                ctl_log.exception("%s: watches[%r] raised for %s", self.kind, kind, name)

    def _add_ref(self, ref, reason):
        if isinstance(ref, dict):
            ref = ref.get("metadata", {}).get("uid") or ref.get("uid")
        obj = self.registry.store.resolve(self.kind, ref) if isinstance(ref, str) else None
        if obj is not None:
            self.queue.add((self.kind, obj["metadata"]["uid"]), reason)

    def resync(self, reason: str = "resync") -> int:
        """Queue every object of the kind (start-up list, periodic resync, bus gap)."""
        objs = self.registry.store.list(self.kind)
        for obj in objs:
            self.queue.add((self.kind, obj["metadata"]["uid"]), reason)
        if reason != "startup":
            self.resyncs += 1
        return len(objs)

    def _schedule_resync(self):
        period = self.info.resync
        if period:
            jitter = 1.0 + (int.from_bytes(os.urandom(2), "big") / 65535.0 - 0.5) * 0.2   # ±10 %
            self._next_resync = self.clock() + period * jitter

    def _housekeep_loop(self) -> None:
        while not self._stop.is_set():
            self.housekeep()
            self._stop.wait(self._housekeep_interval())

    def _housekeep_interval(self) -> float:
        waits = [1.0]
        if self.info.timeout:
            waits.append(max(0.01, self.info.timeout / 4))
        if self._next_resync is not None:
            waits.append(max(0.01, self._next_resync - self.clock()))
        return min(waits)

    def housekeep(self) -> None:
        """One iteration: a due resync, and the timeout watchdog."""
        now = self.clock()
        if self._next_resync is not None and now >= self._next_resync:
            self.resync("resync")
            self._schedule_resync()
        timeout = self.info.timeout
        if not timeout:
            return
        with self._lock:
            late = [run for run in self._runs.values() if not run.stalled and now - run.started > timeout]
            for run in late:
                run.stalled = True
                self._stalled += 1
        try:
            for run in late:
                run.ctx.stopping.set()
                ctl_log.error("%s %s: reconcile has run longer than %ss; ctx.stopping is set and the object is "
                              "marked Stalled (Python cannot stop the thread; other keys go on)",
                              self.kind, run.key[1], timeout)
                self._write_condition(run.key, "Stalled", "True", "ReconcileTimeout",
                                      f"reconcile ran longer than {timeout}s")
                run.recorded.set()
                with self._lock:
                    spawn = len(self._threads) < self.info.workers + self._stalled
                if spawn:
                    self._spawn_worker()
        finally:
            for run in late:
                run.recorded.set()      # also when a write raised: the worker waiting for it goes on

    # -- execution -----------------------------------------------------------------
    def process_next(self, timeout: float | None = 0.5) -> bool:
        """Take one key, reconcile it, and mark it done; False if nothing came within ``timeout``."""
        item = self.queue.get(timeout=timeout)
        if item is None:
            return False
        key, reasons = item
        try:
            self._process(key, reasons)
        except BaseException:           # even SystemExit from user code must not end a worker
            ctl_log.exception("%s %s: controller error (the key is retried)", self.kind, key[1])
            self.queue.add_rate_limited(key, "controller error")
        finally:
            self.queue.done(key)
        return True

    def _process(self, key, reasons) -> None:
        info = self.info
        stored = self.registry.store.get(*key)
        if stored is None:
            self.queue.forget(key)      # deleted: never reconcile what no longer exists
            return
        deleting = stored["metadata"]["deletionTimestamp"] is not None
        if deleting:
            if info.finalize is None or FINALIZER not in stored["metadata"]["finalizers"]:
                self.queue.forget(key)
                return
            fn = info.finalize
        elif info.reconcile is None:
            self.queue.forget(key)      # a kind with only a finalizer: nothing to do until deletion
            return
        else:
            fn = info.reconcile
        obj = Resource(deepcopy_json(stored))
        ctx = Context(self.client, self.kind, key, reasons, deleting, self.log, app=self.app)
        run = _Run(key, ctx, self.clock())
        with self._lock:
            self._runs[key] = run
        started = time.perf_counter()
        outcome, error = "ok", None
        try:
            result = fn(ctx, obj)
        except PermanentError as exc:
            outcome, error = "permanent", exc
        except TemporaryError as exc:
            outcome, error = "temporary", exc
        except Exception as exc:
            outcome, error = "error", exc
            # the first failure of a streak logs its traceback; the retries of the streak one line each
            if self.queue.num_requeues(key) == 0:
                ctl_log.exception("%s %s: %s raised (retried with backoff)", self.kind, obj.name,
                                  getattr(fn, "__name__", repr(fn)))
        finally:
            with self._lock:
                self._runs.pop(key, None)
                stalled = run.stalled
                if stalled:
                    self._stalled -= 1
            self._observe(time.perf_counter() - started)
            if stalled:
                run.recorded.wait()     # the watchdog is writing Stalled right now: write after it
        if outcome != "ok":
            self.errors += 1
            if outcome == "permanent":
                self.queue.forget(key)
                self._record_failure(key, error, _NOT_RETRIED, "not retried until the object changes")
            elif outcome == "temporary":
                self.queue.forget(key)
                self._record_failure(key, error, _RETRIED_AFTER_DELAY, f"retrying in {_seconds_text(error.delay)}")
                self.queue.add_after(key, error.delay, "TemporaryError")
            else:
                self.retries += 1
                attempt = self.queue.num_requeues(key) + 1
                delay = self._retry_with_backoff(key, error, "retry after error")
                if attempt > 1:
                    ctl_log.error("%s %s: %s raised again (attempt %d, next in %.3gs): %s", self.kind, obj.name,
                                  getattr(fn, "__name__", repr(fn)), attempt, delay, _error_text(error))
            return
        if deleting:
            self._finalized(key, stored)
            return
        try:
            wrote = self._write_status(key, stored, obj, stalled)
        except ValidationError as exc:
            self.errors += 1
            self.retries += 1
            self._retry_with_backoff(key, exc, "invalid status")
            return
        if wrote is False:
            return      # conflict: re-queued rate limited (or already pending)
        if stalled:
            # This run read the object before Stalled was written, so it could not clear it: a fresh
            # run does, when it completes in time (a write with nothing new would leave Stalled forever).
            self.queue.add(key, "stalled run ended")
            return
        if isinstance(result, (int, float)) and not isinstance(result, bool):
            result = Result(requeue_after=float(result))
        if isinstance(result, Result) and result.requeue and not result.requeue_after:
            self.queue.add_rate_limited(key, "requeue")
        elif isinstance(result, Result) and result.requeue_after is not None:
            self.queue.forget(key)
            self.queue.add_after(key, result.requeue_after, "requeue_after")
        else:
            self.queue.forget(key)

    def _observe(self, seconds: float) -> None:
        self.reconciles += 1
        self.durations.observe(seconds)

    def _write_status(self, key, stored, obj, stalled) -> bool | None:
        """Write reconcile's status edits as a status-only write guarded by the rv it read."""
        status = obj.status
        if not isinstance(status, dict):
            raise ValidationError(f"reconcile left status as {type(status).__name__}; it must stay a dict")
        generation = stored["metadata"]["generation"]
        status["observedGeneration"] = generation
        _clear_framework_conditions(obj, stalled)
        if _json_equal(status, stored["status"]):
            return None
        # a ValidationError is recorded like a failure
        status = self.registry.check_status(self.info, status, stored["status"])
        try:
            self.registry.mutate(self.info, key[1], lambda new: new.__setitem__("status", deepcopy_json(status)),
                                 resource_version=stored["metadata"]["resourceVersion"])
            return True
        except NotFoundError:
            return None     # deleted meanwhile: drop the write, never re-create
        except ConflictError:
            if not self.queue.is_pending(key):
                self.queue.add_rate_limited(key, "status conflict")
            return False

    def _retry_with_backoff(self, key, error, why: str) -> float:
        """Record ``error`` as Ready=False/ReconcileError with the coming delay, then schedule that retry."""
        delay = self.queue.add_rate_limited(key, why)
        self._record_failure(key, error, _RETRIED_WITH_BACKOFF, f"retrying in {_seconds_text(delay)}")
        return delay

    def _record_failure(self, key, error, reason: str, retry: str) -> None:
        """Ready=False with ``reason``; the message is the exception text, then what happens next."""
        self._write_condition(key, "Ready", "False", reason, f"{_error_text(error)}; {retry}")

    def _write_condition(self, key, type, status, reason, message) -> None:
        def change(new):
            res = Resource(new)
            res.set_condition(type, status, reason=reason, message=message)
        try:
            self.registry.mutate(self.info, key[1], change)
        except (NotFoundError, ConflictError):
            pass
        except FabricaError:
            ctl_log.exception("%s %s: could not record condition %s", self.kind, key[1], type)

    def _finalized(self, key, stored) -> None:
        def change(new):
            new["metadata"]["finalizers"] = [f for f in new["metadata"]["finalizers"] if f != FINALIZER]
            # finalize is done and will not run again: an object that other finalizers keep must not go
            # on showing its earlier failures (even Stalled from this run: nothing is left to stall)
            _clear_framework_conditions(Resource(new))
        try:
            self.registry.mutate(self.info, key[1], change)
            self.queue.forget(key)
        except NotFoundError:
            self.queue.forget(key)

    # -- introspection ----------------------------------------------------------
    def idle(self, within: float = 0.0) -> bool:
        sub = self._subscription
        return (sub is None or sub.idle()) and self.queue.idle(within) and not self._runs

    def stats(self) -> dict:
        return {"queued": len(self.queue), "delayed": self.queue.delayed_count(), "running": len(self._runs),
                "reconciles": self.reconciles, "errors": self.errors, "retries": self.retries,
                "resyncs": self.resyncs, "workers": len(self._threads)}


###############################################################################
# Dashboard ####################################################################
###############################################################################
#
# GET / for a browser (SPEC §11): DASHBOARD_HTML lists every kind through the
# REST API, follows GET /events with an EventSource and polls /metrics for the
# controllers. The page holds no data, so it is served without the token; an
# EventSource sends no headers, so the page trades its bearer token (POST
# /events/ticket) for a StreamTickets ticket: signed, scoped to GET /events,
# valid STREAM_TICKET_TTL seconds and redeemed once.

STREAM_TICKET_TTL = 30          # seconds a stream ticket stays redeemable
_TICKET_RE = re.compile(r"([0-9]{1,12})\.([0-9a-f]{32})\.([A-Za-z0-9_-]{43})", re.ASCII)


class _TicketsBusyError(FabricaError):
    status = 429


class StreamTickets:
    """The stream tickets of one server: ``issue()`` one, ``redeem()`` it once (thread-safe).

    A ticket is ``<expiry>.<nonce>.<mac>``: the expiry in whole Unix seconds of
    ``clock``, 128 random bits, and HMAC-SHA256 over both and the scope under a
    key drawn at construction (so a restart voids every ticket). Redeemed
    nonces are remembered until their expiry, at most ``capacity`` of them.
    """

    def __init__(self, ttl: float = STREAM_TICKET_TTL, clock: Callable[[], float] = time.time,
                 capacity: int = 10000):
        self.ttl, self.clock, self.capacity = ttl, clock, capacity
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}     # nonce -> expiry of every redeemed, unexpired ticket; under _lock

    def _mac(self, body: str) -> str:
        mac = hmac.new(self._key, b"GET /events\n" + body.encode(), "sha256").digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def issue(self) -> dict:
        """``{"ticket", "expiresAt"}``: a new ticket and its expiry (RFC 3339 UTC)."""
        expiry = math.ceil(self.clock() + self.ttl)
        body = f"{expiry}.{os.urandom(16).hex()}"
        return {"ticket": f"{body}.{self._mac(body)}",
                "expiresAt": datetime.fromtimestamp(expiry, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def redeem(self, ticket: str) -> None:
        """Accept ``ticket`` once; UnauthorizedError if it is malformed, forged, expired or used."""
        match = _TICKET_RE.fullmatch(ticket)
        if not match or not hmac.compare_digest(match[3], self._mac(f"{match[1]}.{match[2]}")):
            raise UnauthorizedError("invalid stream ticket; POST /events/ticket with the bearer token for one")
        expiry, nonce, now = int(match[1]), match[2], self.clock()
        if expiry <= now:
            raise UnauthorizedError("the stream ticket expired; POST /events/ticket for a new one")
        with self._lock:
            if nonce in self._used:
                raise UnauthorizedError("the stream ticket was used already; POST /events/ticket for a new one")
            if len(self._used) >= self.capacity:
                self._used = {n: e for n, e in self._used.items() if e > now}
                if len(self._used) >= self.capacity:     # forgetting one would let it be replayed
                    raise _TicketsBusyError(f"{self.capacity} stream tickets were redeemed in the last "
                                            f"{self.ttl:g} s; retry shortly")
            self._used[nonce] = expiry


def dashboard_admits(rest: RestAPI, environ: dict) -> bool:
    """Whether a request without the bearer token may pass: the page itself, or GET /events with a ticket.

    The page is the same for every server and carries no data. A ticket is
    redeemed here, so a bad one raises UnauthorizedError naming what is wrong.
    """
    if environ.get("REQUEST_METHOD") != "GET":
        return False
    if environ.get("PATH_INFO") == "/":
        return "text/html" in environ.get("HTTP_ACCEPT", "")
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")) if environ.get("PATH_INFO") == "/events" else {}
    ticket = query.get("ticket")
    if ticket:
        rest.tickets.redeem(ticket[-1])
    return bool(ticket)


def dashboard_page() -> bottle.HTTPResponse:
    """The page, with a policy that lets it fetch nothing but this server and be framed by no one."""
    return bottle.HTTPResponse(_DASHBOARD_BYTES, 200, {
        "Content-Type": "text/html; charset=utf-8", "Vary": "Accept", "Cache-Control": "no-cache",
        "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                   "connect-src 'self'; img-src data:; frame-ancestors 'none'"})


DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fabrica</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
:root{--bg:#0d1117;--pane:#161b22;--line:#30363d;--fg:#e6edf3;--dim:#8b949e;--ok:#3fb950;--wait:#d29922;--bad:#f85149;
--acc:#58a6ff}*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;height:100vh;font:13px/1.45 system-ui,sans-serif;color:var(--fg);background:var(--line);display:grid;
gap:1px;grid-template:44px minmax(0,1fr) minmax(0,34%)/220px minmax(0,1fr) minmax(0,38%)}
body>*{background:var(--bg);min-height:0;min-width:0}section{display:flex;flex-direction:column}
header{grid-column:1/-1;display:flex;align-items:center;gap:16px;padding:0 14px;background:var(--pane)}
header b{font-size:15px;letter-spacing:.02em}nav{grid-row:2/4;overflow:hidden auto;padding-bottom:10px}
#detail{grid-row:2/4;grid-column:3;overflow:auto;padding:6px 14px}h3{margin:8px 0;font-size:15px}
h2{font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.08em;color:var(--dim);margin:14px 14px 6px}
.kind{display:flex;gap:6px;padding:4px 14px;cursor:pointer}.kind span:first-child{flex:1}
.kind:hover,.row:hover{background:var(--pane)}.kind.on{background:#1f6feb26;box-shadow:inset 3px 0 var(--acc)}
.n{font-variant-numeric:tabular-nums;color:var(--dim)}.bar span:nth-child(3){flex:1}
.bar{display:flex;gap:10px;align-items:center;padding:6px 10px;border-bottom:1px solid var(--line)}
input{font:inherit;background:var(--pane);color:var(--fg);border:1px solid var(--line);border-radius:6px;padding:3px}
.grid,#table .row{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,5fr) 64px 56px;gap:12px;
align-items:center;padding:0 12px;height:26px;white-space:nowrap}.grid span{overflow:hidden;text-overflow:ellipsis}
.grid span:nth-child(n+3){text-align:right}
.th{color:var(--dim);font-size:11px;text-transform:uppercase;border-bottom:1px solid var(--line)}
.vl{flex:1;overflow:auto;position:relative;contain:strict}.vl>div:last-child{position:absolute;left:0;right:0;top:0}
.row{cursor:pointer;border-bottom:1px solid #21262d;font-variant-numeric:tabular-nums}.sel{background:#1f6feb33}
.dot::before{content:"";display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:7px;
background:var(--wait)}.ok::before{background:var(--ok)}.bad::before{background:var(--bad)}
.none::before{background:var(--line)}.dim{color:var(--dim)}.lag{color:var(--wait)}.red{color:var(--bad)}
.grn{color:var(--ok)}.acc,a{color:var(--acc);cursor:pointer}.links a{margin-right:10px;white-space:nowrap}
pre{font:12px/1.5 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;background:var(--pane);
padding:10px;border-radius:6px;margin:8px 0}#log{font:12px/20px ui-monospace,monospace}#log span{margin-right:8px}
#log .row{padding:0 10px;height:20px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;border:0}
table{border-collapse:collapse;margin:0 14px;font-variant-numeric:tabular-nums}th{font-weight:normal;font-size:11px}
td,th{text-align:right;padding:2px 0 2px 14px}td:first-child,th:first-child{text-align:left;padding-left:0}
dialog{background:var(--pane);color:var(--fg);border:1px solid var(--line);border-radius:8px}
</style></head>
<body>
<header><b>fabrica</b><span id="svc" class="dim"></span><span id="live" class="dot">connecting</span>
<span id="rv" class="n"></span><span style="flex:1"></span><span id="rate" class="n"></span></header>
<nav><h2>Kinds</h2><div id="kinds"></div><h2>Controllers</h2><table><thead class="dim"><tr><th>kind</th><th>queue</th>
<th>retries</th><th>errors</th></tr></thead><tbody id="ctl"></tbody></table></nav>
<section><div class="bar"><b id="title"></b><span id="shown" class="n"></span><span></span>
<input id="filter" type="search" placeholder="filter by name"></div>
<div class="grid th"><span>name</span><span>ready / phase</span><span>gen / obs</span><span>age</span></div>
<div id="table" class="vl"></div></section>
<aside id="detail"><h2>Resource</h2><p class="dim">Click a row for its JSON, owner and dependents.</p></aside>
<section><div class="bar"><b>Events</b><span id="logn" class="n"></span><span></span>
<input id="types" type="search" size="34" placeholder="type filter: rack, **.deleted, io.fabrica.node.*"></div>
<div id="log" class="vl"></div></section>
<dialog id="auth"><form method="dialog"><p>This server asks for its bearer token (serve --token).</p>
<input id="token" type="password" size="40" autocomplete="off"> <button>Connect</button></form></dialog>
<script>
"use strict";
const $ = (id) => document.getElementById(id), LOG_KEEP = 5000;
function el(tag, cls, text, ...kids) {
  const e = Object.assign(document.createElement(tag), {className: cls || ""});
  e.append(...(text === undefined ? [] : [String(text)]), ...kids);
  return e;
}
const set = (e, text, cls) => { e.textContent = text; if (cls !== undefined) e.className = cls; };
const kinds = new Map();    // kind -> {info, rows: Map uid -> row, view: rows sorted by name, sorted, el, notReady}
let log = [], logView = log, match = null;    // log: {time, type, kind, uid, name, text}, oldest first
let token = sessionStorage.getItem("fabrica-token") || "", current = "", filter = "", selected = null;
let pending = [], scheduled = false, es = null, lastId = "", tombs = null, attempt = 0, epoch = 0, seen = 0, was = 0;
let dirty = {counts: true, table: true, log: false, detail: false};

async function api(path, opts = {}) {
  const res = await fetch(path, {...opts, headers: token ? {Authorization: "Bearer " + token} : {}});
  if (res.status === 401 && !$("auth").open) { $("token").value = token; $("auth").showModal(); }
  if (!res.ok) throw new Error(path + " answered " + res.status);
  return res;
}
const json = async (path, opts) => (await api(path, opts)).json();
const hashKind = () => decodeURIComponent(location.hash.slice(1));

class VList {     // a virtualised list: only the rows in sight exist, reused as it scrolls
  constructor(box, height, cells, click) {
    Object.assign(this, {box, height, cells, click, pool: []});
    this.spacer = box.appendChild(el("div"));
    this.rows = box.appendChild(el("div"));
    box.onscroll = () => { this.dirty = true; schedule(); };
  }
  measure() {   // read before any write of the frame, so the frame lays out once
    this.first = Math.floor(this.box.scrollTop / this.height);
    this.n = Math.ceil(this.box.clientHeight / this.height) + 1;
  }
  render(count, item) {   // item(i): the i-th item; cells(item): [[text, class], ...], one per column
    this.spacer.style.height = count * this.height + "px";
    this.rows.style.transform = `translateY(${this.first * this.height}px)`;
    while (this.pool.length < this.n) {
      const e = this.rows.appendChild(Object.assign(el("div", "row"), {onclick: () => this.click(e.item)}));
      this.pool.push(e);
    }
    this.pool.forEach((e, i) => {
      if ((e.hidden = this.first + i >= count)) return;
      const x = e.item = item(this.first + i), cells = this.cells(x);
      while (e.children.length < cells.length) e.append(el("span"));
      cells.forEach(([text, cls], j) => set(e.children[j], text, cls || ""));
      e.classList.toggle("sel", !!selected && selected.uid === x.uid);
    });
    this.dirty = false;
  }
}
const table = new VList($("table"), 26, (r) => {
  const [cls, word] = status(r), lag = r.ogen !== undefined && r.ogen !== r.gen;
  return [[r.name], [word, "dot " + cls], [r.ogen === undefined ? r.gen : `${r.gen} / ${r.ogen}`, lag ? "lag" : ""],
    [age(r.created), "dim"]];
}, (r) => select(current, r.uid));
const events = new VList($("log"), 20, (x) => [[x.time, "dim"], [x.type, /created$/.test(x.type) ? "grn"
  : /deleted$/.test(x.type) ? "red" : ""], [`${x.kind}/${x.name}`, "acc"], [x.text, "dim"]], (x) => go(x.kind, x.uid));

function addKind(info) {
  const k = kinds.get(info.kind) || {rows: new Map(), view: [], sorted: false, el: null, notReady: 0};
  kinds.set(info.kind, Object.assign(k, {info}));
  return k;
}
function summary(kind, o) {
  const m = o.metadata, s = o.status || {}, c = (s.conditions || []).find((c) => c && c.type === "Ready") || {};
  return {kind, uid: m.uid, name: m.name, rv: +m.resourceVersion, gen: m.generation, ogen: s.observedGeneration,
    phase: typeof s.phase === "string" ? s.phase : "", ready: c.status || "", reason: c.reason || "",
    created: Date.parse(m.createdAt), deleting: !!m.deletionTimestamp,
    owners: (m.ownerReferences || []).map((r) => r.uid)};
}
const byName = (a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
function place(k, row, add) {   // keeps a sorted view sorted: a binary search, not a sort per change
  if (!k.sorted || (add && !row.name.includes(filter))) return;
  let lo = 0, hi = k.view.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (byName(k.view[mid], row) < 0) lo = mid + 1; else hi = mid; }
  if (add) k.view.splice(lo, 0, row); else if (k.view[lo] === row) k.view.splice(lo, 1);
}
function put(kind, o, deleted) {      // the newest resourceVersion wins, whether the list or the stream brings it
  if (!kinds.has(kind)) {   // a kind the open server made just now: its plural is in /apis
    json("apis").then((apis) => apis.kinds.forEach(addKind), () => {});
    if (!current) show(kind);
  }
  const k = kinds.get(kind) || addKind({kind, plural: "", controller: false});
  const uid = o.metadata.uid, rv = +o.metadata.resourceVersion, old = k.rows.get(uid);
  if ((old && old.rv >= rv) || (tombs && tombs.get(uid) >= rv)) return;
  const row = deleted ? old : summary(kind, o), mine = selected && row && row.owners.includes(selected.uid);
  k.notReady -= old && old.ready !== "True" ? 1 : 0;
  if (deleted && tombs) tombs.set(uid, rv);
  if (deleted && old) { k.rows.delete(uid); place(k, old, false); }
  if (!deleted && !old) { k.rows.set(uid, row); place(k, row, true); }
  if (!deleted && old) { k.sorted &&= old.name === row.name; Object.assign(old, row); }
  if (!deleted) k.notReady += row.ready !== "True" ? 1 : 0;
  dirty.counts = true;
  dirty.table ||= kind === current;
  dirty.detail ||= mine && (deleted || !old);
}

function onEvent(text) {
  const ev = JSON.parse(text), d = ev.data || {}, kind = ev.resourcekind || d.resourceKind, uid = d.resourceUID;
  const row = kinds.has(kind) && kinds.get(kind).rows.get(uid);
  seen++;
  if (d.resource) put(kind, d.resource, d.action === "deleted");
  if (d.resource && selected && selected.uid === uid) {
    Object.assign(selected, {obj: d.resource, gone: d.action === "deleted"});
    dirty.detail = true;
  }
  log.push({time: (ev.time || "").slice(11, 19), type: ev.type, kind, uid,
    name: d.resourceName || (row ? row.name : uid),
    text: d.resource ? d.action + (/updated|patched/.test(d.action) ? " " + d.updateType : "")
      : `${d.conditionType} ${d.previousStatus || "-"} \u2192 ${d.status} ${d.reason || ""}`});
  dirty.log = true;
}
function schedule() {   // one flush per animation frame (a timer while the tab is hidden: no frames then)
  if (!scheduled) (document.hidden ? (f) => setTimeout(f, 500) : requestAnimationFrame)(flush);
  scheduled = true;
}
const touch = (...parts) => { parts.forEach((p) => { dirty[p] = true; }); schedule(); };
function flush() {    // what arrived since the last frame, rendered once
  const batch = pending;
  [scheduled, pending] = [false, []];
  table.measure();
  events.measure();
  batch.forEach(onEvent);
  if (log.length > 2 * LOG_KEEP) log = log.slice(-LOG_KEEP);
  if (dirty.counts) renderKinds();
  if (dirty.table || table.dirty) renderTable();
  if (dirty.log) logView = match ? log.filter((x) => match(x.type)) : log;
  if (dirty.log || events.dirty) events.render(logView.length, (i) => logView[logView.length - 1 - i]);
  if (dirty.detail && selected) renderDetail();
  set($("logn"), seen.toLocaleString());
  dirty = {counts: false, table: false, log: false, detail: false};
}

function renderKinds() {   // in the order the app registered them
  for (const [name, k] of kinds) {
    k.el = k.el || $("kinds").appendChild(el("div", "kind", undefined, el("span", "", name), el("span"), el("span")));
    k.el.onclick = () => show(name);
    k.el.classList.toggle("on", name === current);
    set(k.el.children[1], k.info.controller && k.notReady ? k.notReady + " not ready" : "", "lag n");
    set(k.el.children[2], k.rows.size.toLocaleString(), "n");
  }
}
function view(k) {
  if (!k.sorted) k.view = [...k.rows.values()].filter((r) => r.name.includes(filter)).sort(byName);
  k.sorted = true;
  return k.view;
}
function age(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000), [n, unit] = s < 90 ? [s, "s"] : s < 5400 ? [s / 60, "m"]
    : s < 172800 ? [s / 3600, "h"] : [s / 86400, "d"];
  return Math.floor(n) + unit;
}
function status(r) {    // [dot class, "phase or Ready · reason"]
  const word = r.deleting ? "Deleting" : r.phase || (r.ready === "True" ? "Ready" : r.ready ? "NotReady" : "-");
  const cls = r.ready === "True" ? "ok" : /error|fail/i.test(r.phase + r.reason) ? "bad"
    : r.ready || r.phase ? "" : "none";
  return [cls, r.reason && r.reason !== word ? word + " \u00b7 " + r.reason : word];
}
function renderTable() {
  const k = kinds.get(current), rows = k ? view(k) : [];
  set($("title"), current);
  set($("shown"), k ? (filter ? rows.length.toLocaleString() + " of " : "") + k.rows.size.toLocaleString() : "");
  table.render(rows.length, (i) => rows[i]);
}
function show(kind, uid) {   // a kind's table, scrolled to uid when given
  current = kind;
  history.replaceState(null, "", "#" + encodeURIComponent(kind));
  const at = uid ? view(kinds.get(kind)).findIndex((r) => r.uid === uid) : -1;
  $("table").scrollTop = Math.max(0, (at - 3) * 26);
  touch("counts", "table");
}
function go(kind, uid) {    // to an object of any kind: its table, its row, its JSON
  if (!kinds.has(kind)) return;
  if (kind !== current) show(kind, uid);
  select(kind, uid);
}

async function select(kind, uid) {
  const s = selected = {kind, uid, obj: null, gone: false}, k = kinds.get(kind);
  touch("detail", "table", "log");
  if (!k || !k.info.plural) return;
  try {
    const o = await json(`${k.info.plural}/${encodeURIComponent(uid)}`);
    if (!s.obj || +s.obj.metadata.resourceVersion < +o.metadata.resourceVersion) s.obj = o;
  } catch (e) { s.gone = !s.obj; }
  touch("detail");
}
function renderDetail() {
  const s = selected, o = s.obj, row = (kinds.get(s.kind) || {rows: new Map()}).rows.get(s.uid), box = $("detail");
  const link = (r) => Object.assign(el("a", "", `${r.kind} ${r.name || r.uid}`), {onclick: () => go(r.kind, r.uid)});
  box.replaceChildren(el("h2", "", "Resource"), el("h3", "", `${s.kind} ${(o ? o.metadata : row || s).name || s.uid}`));
  if (s.gone || !o) return box.append(el("p", s.gone ? "red" : "dim", s.gone ? "deleted" : "loading\u2026"));
  const owners = el("div", "links", "owner: "), deps = el("div", "links", "dependents: "), found = [];
  for (const k of kinds.values()) for (const r of k.rows.values()) if (r.owners.includes(s.uid)) found.push(r);
  owners.append(...(o.metadata.ownerReferences || []).map(link));
  deps.append(...found.sort(byName).slice(0, 100).map(link));
  if (found.length > 100) deps.append(el("span", "dim", `and ${found.length - 100} more`));
  for (const e of [owners, deps]) if (!e.children.length) e.append(el("span", "dim", "none"));
  box.append(owners, deps, el("pre", "", JSON.stringify(o, null, 2)));
}

function matcher(pattern) {   // GET /events' type patterns (* one segment, ** any number), else a substring
  if (!pattern.includes("*")) return (t) => t.includes(pattern);
  const p = pattern.split(".");
  const m = (i, t, j) => i === p.length ? j === t.length
    : p[i] === "**" ? m(i + 1, t, j) || (j < t.length && m(i, t, j + 1))
    : j < t.length && (p[i] === "*" || p[i] === t[j]) && m(i + 1, t, j + 1);
  return (t) => m(0, t.split("."), 0);
}
async function pollControllers() {
  if (document.hidden || !kinds.size) return;
  const stats = {}, re = /^fabrica_(queue_depth|reconcile_retries_total|reconcile_errors_total)\{kind="(.*)"\} (\S+)$/;
  try {
    for (const line of (await (await api("metrics")).text()).split("\n")) {
      const m = re.exec(line);
      if (m) (stats[m[2]] = stats[m[2]] || {})[m[1]] = +m[3];
    }
  } catch (e) { return; }
  $("ctl").replaceChildren(...[...kinds.keys()].filter((kind) => stats[kind]).map((kind) => {
    const s = stats[kind], td = (n, cls) => el("td", n ? cls : "", n);
    return el("tr", "", undefined, el("td", "", kind), td(s.queue_depth, "lag"), td(s.reconcile_retries_total, "lag"),
      td(s.reconcile_errors_total, "red"));
  }));
}

const live = (state) => set($("live"), state, "dot " + (state === "live" ? "ok" : state === "offline" ? "bad" : ""));
async function connect(since) {   // resolves once the stream is open, or has failed
  live(since ? "reconnecting" : "connecting");
  const retry = () => setTimeout(() => since ? connect(since) : start(), Math.min(10000, 500 * 2 ** attempt++));
  let src, opened = false;
  try {
    const q = new URLSearchParams({ticket: (await json("events/ticket", {method: "POST"})).ticket, untyped: "true"});
    if (since) q.set("since", since);
    src = es = new EventSource("events?" + q);
  } catch (e) { return retry(); }
  await new Promise((done) => {
    src.onopen = () => { opened = true; attempt = 0; live("live"); done(); };
    src.onmessage = (m) => { lastId = m.lastEventId; pending.push(m.data); schedule(); };
    src.onerror = () => {   // the ticket is spent: a new one, from the last event seen (else relist)
      src.close();
      done();
      if (es !== src) return;
      live("offline");
      since = opened && lastId;
      retry();
    };
  });
}
async function start() {    // (re)list everything; the stream opens first, so no change falls in between
  const mine = ++epoch;
  if (es) es.close();
  [es, pending] = [null, []];
  const [apis, health] = await Promise.all([json("apis"), json("health")]).catch(() => []);
  if (!apis) return live("offline");
  set($("svc"), `${health.service} ${health.version}`);
  kinds.clear();
  $("kinds").replaceChildren();
  apis.kinds.forEach(addKind);
  const names = [...kinds.keys()], first = apis.kinds.find((k) => k.controller) || apis.kinds[0] || {};
  current = kinds.has(hashKind()) ? hashKind() : first.kind || "";
  if (current) show(current);
  [lastId, tombs] = ["", new Map()];
  await connect("");
  await Promise.all([current, ...names.filter((n) => n !== current)].map(async (name) => {
    for (let next = ""; ;) {
      const res = await api(`${kinds.get(name).info.plural}?limit=1000` + (next ? "&continue=" + next : ""));
      const items = await res.json();
      if (mine !== epoch) return;     // a newer start() lists afresh
      items.forEach((o) => put(name, o, false));
      schedule();
      if (!(next = encodeURIComponent(res.headers.get("X-Continue") || ""))) break;
    }
  })).catch(() => {});
  if (mine === epoch) tombs = null;
  pollControllers();
}

$("filter").oninput = () => {
  filter = $("filter").value.trim();
  kinds.forEach((k) => { k.sorted = false; });
  $("table").scrollTop = 0;
  touch("table");
};
$("types").oninput = () => { match = $("types").value.trim() && matcher($("types").value.trim()); touch("log"); };
$("auth").onclose = () => {     // the same sessionStorage key as /docs: one token per tab for both pages
  sessionStorage.setItem("fabrica-token", token = $("token").value.trim());
  start();
};
window.onresize = () => { table.dirty = events.dirty = true; schedule(); };
window.onhashchange = () => kinds.has(hashKind()) && show(hashKind());
document.onvisibilitychange = () => { scheduled = false; schedule(); };
setInterval(() => {     // the rate, and the ages
  set($("rate"), `${seen - was} events/s`);
  set($("rv"), lastId ? "last event " + lastId : "");
  was = seen;
  touch("table");
}, 1000);
setInterval(pollControllers, 2000);
start();
</script>
</body></html>
"""
_DASHBOARD_BYTES = DASHBOARD_HTML.encode()


###############################################################################
# OpenAPI #####################################################################
###############################################################################
#
# openapi_document(app) describes every route the app serves as an OpenAPI
# 3.1.0 document (JSON Schema 2020-12, so spec and status schemas go in as
# they are). It is rebuilt per request: cheap, and always true to app.kinds.
# DOCS_HTML is the offline /docs page: inline CSS and JS, nothing fetched
# but /openapi.json and the GETs a person tries.

_OA_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_OA_LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                 r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_OA_LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
_OA_ERRORS = {
    "304": "Not modified: If-None-Match matched the current ETag (no body)",
    "400": "Bad request: malformed JSON, an invalid reference, query parameter or continue token",
    "401": "Missing or wrong bearer token",
    "404": "No such object, kind or version",
    "409": "Conflict: the name is taken, metadata.resourceVersion is stale, an owner is gone or being deleted, "
           "or the object changes too fast",
    "410": "Gone: events after that position are no longer available",
    "412": "Precondition failed: If-Match does not match (or If-None-Match: * on an existing object)",
    "413": "The request body, or the object the write would store, is over the limit (1 MiB of JSON by default)",
    "415": "Unsupported Content-Type",
    "422": "Validation failed; details lists every failing field",
    "500": "The store could not complete the write; the previous version is intact",
    "507": "No space left for the write; the previous version is intact",
}


_OA_SUFFIXES = ("", "Spec", "Status", "Create", "Version", "Versions")


def _oa_ref(name: str, kind: str = "schemas") -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _oa_json(schema: dict) -> dict:
    return {JSON_TYPE: {"schema": schema}}


def _oa_responses(ok: dict, codes: str, token: bool) -> dict:
    """ok (status -> response object) plus the Error responses named in ``codes``."""
    out = dict(ok)
    for code in codes.split() + (["401"] if token else []):
        if code == "304":
            out[code] = {"description": _OA_ERRORS[code], "headers": {"ETag": _oa_ref("ETag", "headers")}}
        else:
            out[code] = {"description": _OA_ERRORS[code], "content": _oa_json(_oa_ref("Error"))}
    return dict(sorted(out.items()))


def _oa_ok(description: str, schema: dict | None = None, headers=(), media: str = JSON_TYPE) -> dict:
    res = {"description": description}
    if headers:
        res["headers"] = {h: _oa_ref(h.replace("-", ""), "headers") for h in headers}
    if schema is not None:
        res["content"] = {media: {"schema": schema}}
    return res


def _oa_schema(schema: Schema | None, what: str) -> dict:
    if schema is None:
        return {"type": "object", "description": f"any JSON object (the kind declares no {what} schema)"}
    out = deepcopy_json(schema.json)
    for key in ("$schema", "$id"):
        out.pop(key, None)
    return out


def _oa_flat(kind: str | None, spec: dict) -> dict:
    """The flat create/PUT form: name, labels, annotations beside the spec fields (SPEC §6.2)."""
    reserved = {"name": _oa_ref("Name"), "labels": _oa_ref("Labels"), "annotations": _oa_ref("Annotations"),
                "apiVersion": {"const": API_VERSION}, "kind": {"const": kind} if kind else {"type": "string"}}
    flat = {"title": "flat form", "type": "object"}
    simple = set(spec) <= {"type", "properties", "required", "additionalProperties", "title", "description"}
    if not simple or spec.get("type", "object") != "object":
        flat["properties"] = reserved
        flat["description"] = "name, labels and annotations beside the spec fields"
        return flat
    skip = set(_FLAT_RESERVED) | {"metadata", "spec"}
    flat["properties"] = {**{k: v for k, v in (spec.get("properties") or {}).items() if k not in skip}, **reserved}
    required = [r for r in spec.get("required", ()) if r not in skip]
    if required:
        flat["required"] = required
    if "additionalProperties" in spec:
        flat["additionalProperties"] = spec["additionalProperties"]
    return flat


def _oa_kind_schemas(info: KindInfo | None, name: str) -> dict:
    """Components <name>Spec, <name>Status, <name>, <name>Create (and <name>Version) of one kind.

    ``name`` is the kind's name unless that collides (see openapi_document); ``info=None`` gives
    the generic resource of an open server's other plurals.
    """
    spec = _oa_schema(info.spec if info else None, "spec")
    status = _oa_schema(info.status if info else None, "status")
    status.setdefault("description", "written by controllers; conditions: see Condition")
    kind_const = {"const": info.kind} if info is not None else {"type": "string"}
    envelope = {
        "title": "envelope form", "type": "object",
        "properties": {"apiVersion": {"const": API_VERSION}, "kind": kind_const,
                       "schemaVersion": {"type": "string"}, "metadata": _oa_ref("ObjectMetaWrite"),
                       "spec": _oa_ref(name + "Spec"),
                       "status": {"description": "ignored here: status is written only through /status"}},
        "additionalProperties": False,
        "anyOf": [{"required": ["metadata"]}, {"required": ["spec"]}],
    }
    schemas = {
        name + "Spec": spec,
        name + "Status": status,
        name: {
            "type": "object",
            "required": ["apiVersion", "kind", "schemaVersion", "metadata", "spec", "status"],
            "properties": {"apiVersion": {"const": API_VERSION}, "kind": kind_const,
                           "schemaVersion": {"type": "string"}, "metadata": _oa_ref("ObjectMeta"),
                           "spec": _oa_ref(name + "Spec"), "status": _oa_ref(name + "Status")},
        },
        name + "Create": {
            "description": "Create or PUT body: the flat form ({name, labels, annotations, <spec fields>}) "
                           "or the envelope form ({metadata, spec}); a top-level metadata or spec key "
                           "selects the envelope form.",
            "anyOf": [_oa_flat(info.kind if info else None, spec), envelope],
        },
    }
    if info is not None and info.history_on:
        schemas[name + "Version"] = {"allOf": [_oa_ref("Version"),
                                               {"properties": {"spec": _oa_ref(name + "Spec")}}]}
    return schemas


def _oa_patch_body(target: str) -> dict:
    merge = {"type": "object", "description": f"RFC 7386 merge patch of the {target}"}
    return {"required": True, "description": f"A patch of the {target}; the Content-Type picks the format",
            "content": {MERGE_PATCH: {"schema": merge}, JSON_TYPE: {"schema": merge},
                        JSON_PATCH: {"schema": _oa_ref("JSONPatch")},
                        SHORTHAND_PATCH: {"schema": {"type": "object", "description":
                                          "dotted paths to values; null removes the path"}}}}


def _oa_kind_paths(name: str, label: str, base: str, tag: str, history: bool, token: bool,
                   open_kind: bool = False) -> dict:
    """The path items of one kind: ``name`` names its components and operations, ``label`` is for
    people, ``base`` is "/<plural>" (or "/{plural}" for an open server's other plurals)."""
    ref, K = _oa_ref("Ref", "parameters"), _oa_ref(name)
    pre = [_oa_ref("IfMatch", "parameters"), _oa_ref("IfNoneMatch", "parameters")]
    lead = [_oa_ref("Plural", "parameters")] if open_kind else []

    def op(op_id, summary, responses, codes, params=(), body=None):
        verb, _, suffix = op_id.partition("*")
        o = {"tags": [tag], "summary": summary, "operationId": verb + name + suffix}
        if params:
            o["parameters"] = list(params)
        if body is not None:
            o["requestBody"] = body
        o["responses"] = _oa_responses(responses, codes, token)
        return o

    create_body = {"required": True, "content": _oa_json(_oa_ref(name + "Create"))}
    write = "400 404 409 412 413 415 422 500 507"
    nf = " 404" if open_kind else ""     # a plural that is reserved or not a plural
    obj_etag = _oa_ok(f"The {label}", K, ("ETag",))
    patched = _oa_ok(f"The patched {label}", K, ("ETag", "Accept-Patch"))
    paths = {
        base: {"parameters": lead, **{
            "get": op("list", f"List {label} objects (ordered by name)",
                      {"200": _oa_ok("The matching objects", {"type": "array", "items": K},
                                     ("X-Total-Count", "X-Continue", "Link"))}, "400" + nf,
                      [_oa_ref(p, "parameters") for p in ("LabelSelector", "Name", "Limit", "Continue")]),
            "post": op("create", f"Create a {label}",
                       {"201": _oa_ok(f"The new {label}", K, ("Location", "ETag"))},
                       "400 409 413 415 422 500 507" + nf, body=create_body)}},
        base + "/{ref}": {"parameters": lead + [ref], **{
            "get": op("get", f"Get a {label}", {"200": obj_etag}, "304 400 404",
                      [_oa_ref("IfNoneMatchGet", "parameters")]),
            "put": op("replace", f"Replace the spec (and labels) of a {label}; never creates",
                      {"200": obj_etag}, write, pre, create_body),
            "patch": op("patch", f"Patch the spec of a {label}", {"200": patched}, write,
                        [pre[0]], _oa_patch_body("spec")),
            "delete": op("delete", f"Delete a {label}",
                         {"200": _oa_ok("Deleted", _oa_ref("DeleteResponse")),
                          "202": _oa_ok("Finalizers are pending: marked for deletion", K, ("ETag",))},
                         "400 404 409 412 500 507", [pre[0], _oa_ref("Force", "parameters")])}},
        base + "/{ref}/status": {"parameters": lead + [ref], **{
            "get": op("get*Status", f"Get the status of a {label}",
                      {"200": _oa_ok("The status object", _oa_ref(name + "Status"), ("ETag",))}, "400 404"),
            "put": op("replace*Status", f"Replace the status of a {label} (the bare status object)",
                      {"200": obj_etag}, write, pre,
                      {"required": True, "content": _oa_json(_oa_ref(name + "Status"))}),
            "patch": op("patch*Status", f"Patch the status of a {label}", {"200": patched}, write, [pre[0]],
                        _oa_patch_body("status"))}},
    }
    paths[base + "/{ref}/events"] = {"parameters": lead + [ref], "get": op(
        "list*Events", f"The recent events of a {label} still in the event ring buffer, oldest first",
        {"200": _oa_ok("CloudEvents", {"type": "array", "items": {
            "type": "object", "required": ["specversion", "id", "type", "source"]}})}, "400 404",
        [_oa_ref("EventLimit", "parameters")])}
    if history:
        vid = _oa_ref("VersionId", "parameters")
        V = _oa_ref(name + "Version")
        paths[base + "/{ref}/versions"] = {"parameters": lead + [ref], "get": op(
            "list*Versions", f"List the spec versions of a {label}, oldest first",
            {"200": _oa_ok("The snapshots", {"type": "array", "items": V})}, "400 404")}
        paths[base + "/{ref}/versions/{versionId}"] = {"parameters": lead + [ref, vid], **{
            "get": op("get*Version", "Get one spec version", {"200": _oa_ok("The snapshot", V)}, "400 404"),
            "delete": op("delete*Version", "Delete one spec version",
                         {"200": _oa_ok("Deleted", _oa_ref("DeleteResponse"))}, "400 404 500 507")}}
        paths[base + "/{ref}/versions/{versionId}/restore"] = {"parameters": lead + [ref, vid], "post": op(
            "restore*Version", "Write that version's spec back as a new, validated spec write",
            {"200": obj_etag}, "400 404 409 412 422 500 507", pre)}
    for item in paths.values():
        if not item["parameters"]:
            del item["parameters"]
    return paths


def _oa_components() -> dict:
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    time = {"type": "string", "format": "date-time"}
    header = lambda description, schema, required=False: {  # noqa: E731
        "description": description, "required": required, "schema": schema}
    param = lambda name, where, description, schema, **extra: {  # noqa: E731
        "name": name, "in": where, "description": description, "schema": schema, **extra}
    return {
        "schemas": {
            "Error": {"type": "object", "required": ["error", "code", "details"], "properties": {
                "error": {"type": "string"}, "code": {"type": "integer"},
                "details": {"type": "array", "items": {"type": "object", "properties": {
                    "field": {"type": "string"}, "message": {"type": "string"}}}}}},
            "Name": {"type": "string", "maxLength": 253, "pattern": _OA_NAME,
                     "description": "a DNS-1123 subdomain, unique per kind"},
            "Labels": {"type": "object", "propertyNames": {"pattern": _OA_LABEL_KEY, "maxLength": 317},
                       "additionalProperties": {"type": "string", "maxLength": 63, "pattern": _OA_LABEL_VALUE}},
            "Annotations": {"type": "object", "propertyNames": {"pattern": _OA_LABEL_KEY, "maxLength": 317},
                            "additionalProperties": {"type": "string"}},
            "OwnerReference": {
                "type": "object", "required": ["kind", "uid"], "additionalProperties": False,
                "description": "an owner; at most one per object has controller: true (SPEC §5.5)",
                "properties": {"kind": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]{0,62}$"},
                               "uid": {"type": "string", "pattern": r"^[a-z0-9]+-[0-9a-f]{8}$"},
                               "name": {"type": "string"}, "controller": {"type": "boolean"}}},
            "ObjectMeta": {
                "type": "object",
                "required": ["name", "uid", "labels", "annotations", "createdAt", "updatedAt", "generation",
                             "resourceVersion", "finalizers", "ownerReferences", "deletionTimestamp"],
                "properties": {
                    "name": {"type": "string"}, "uid": {"type": "string", "pattern": r"^[a-z0-9]+-[0-9a-f]{8}$"},
                    "labels": string_map, "annotations": string_map, "createdAt": time, "updatedAt": time,
                    "generation": {"type": "integer", "minimum": 1},
                    "resourceVersion": {"type": "string", "pattern": "^[0-9]+$"},
                    "finalizers": {"type": "array", "items": {"type": "string"}},
                    "ownerReferences": {"type": "array", "items": _oa_ref("OwnerReference")},
                    "deletionTimestamp": {"type": ["string", "null"], "format": "date-time"}}},
            "ObjectMetaWrite": {
                "type": "object", "additionalProperties": False,
                "description": "metadata in an envelope body; server-managed fields are accepted and ignored",
                "properties": {
                    "name": _oa_ref("Name"), "labels": _oa_ref("Labels"), "annotations": _oa_ref("Annotations"),
                    "finalizers": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                              "pattern": _OA_LABEL_KEY}},
                    "resourceVersion": {"type": "string", "description": "if given and not current: 409"},
                    "ownerReferences": {"type": ["array", "null"], "items": _oa_ref("OwnerReference"),
                                        "description": "read at create (every owner must exist and not be "
                                                       "being deleted, else 409; the name is filled in), "
                                                       "ignored by PUT"},
                    **{k: {"description": "server-managed; ignored"} for k in
                       ("uid", "createdAt", "updatedAt", "generation", "deletionTimestamp")}}},
            "Condition": {"type": "object", "required": ["type", "status"], "properties": {
                "type": {"type": "string", "pattern": _OA_LABEL_KEY, "maxLength": CONDITION_TYPE_MAX},
                "status": {"enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string"}, "message": {"type": "string"}, "lastTransitionTime": time,
                "observedGeneration": {"type": "integer"}},
                "description": "what set_condition() and the controller write into status.conditions"},
            "DeleteResponse": {"type": "object", "required": ["message", "uid"], "properties": {
                "message": {"type": "string"}, "uid": {"type": "string"}}},
            "Version": {"type": "object",
                        "required": ["versionId", "createdAt", "uid", "name", "labels", "annotations", "spec"],
                        "properties": {"versionId": {"type": "string"}, "createdAt": time,
                                       "uid": {"type": "string"}, "name": {"type": "string"},
                                       "labels": string_map, "annotations": string_map,
                                       "spec": {"type": "object"}}},
            "JSONPatch": {"type": "array", "description": "RFC 6902 operations", "items": {
                "type": "object", "required": ["op", "path"], "properties": {
                    "op": {"enum": ["add", "remove", "replace", "move", "copy", "test"]},
                    "path": {"type": "string"}, "from": {"type": "string"}, "value": {}}}},
            "Health": {"type": "object", "required": ["status", "service"], "properties": {
                "status": {"enum": ["healthy", "degraded"]}, "service": {"type": "string"},
                "version": {"type": "string"}, "kinds": {"type": "array", "items": {"type": "string"}},
                "quarantined": {"type": "array"}, "ignored": {"type": "array"},
                "resourceVersion": {"type": "string"},
                "workers": {"type": "object", "additionalProperties": {"type": "integer"}},
                "leader": {"type": "boolean", "description": "this process leads: it runs the controllers"},
                "holderIdentity": {"type": ["string", "null"], "description": "who leads, if known"}}},
            "Discovery": {"type": "object", "required": ["apiVersion", "kinds"], "properties": {
                "apiVersion": {"type": "string"},
                "open": {"type": "boolean", "description": "any kind can be created (serve without an app)"},
                "kinds": {"type": "array", "items": {
                    "type": "object", "required": ["kind", "plural", "prefix"], "properties": {
                        "kind": {"type": "string"}, "plural": {"type": "string"}, "prefix": {"type": "string"},
                        "patchTypes": {"type": "array", "items": {"type": "string"}},
                        "controller": {"type": "boolean"}, "history": {"type": "boolean"},
                        "finalizer": {"type": "boolean"}}}}}},
        },
        "parameters": {
            "Ref": param("ref", "path", "a uid, else a name", {"type": "string"}, required=True),
            "Plural": param("plural", "path", "the plural of a kind made at first create (open server)",
                            {"type": "string", "pattern": "^[a-z][a-z0-9]{0,62}$"}, required=True),
            "VersionId": param("versionId", "path", "a spec version (the generation it produced)",
                               {"type": "string"}, required=True),
            "IfMatch": param("If-Match", "header", "strong ETags or *; no match: 412", {"type": "string"}),
            "IfNoneMatch": param("If-None-Match", "header", "*: fail with 412 if the object exists",
                                 {"type": "string"}),
            "IfNoneMatchGet": param("If-None-Match", "header", "a matching ETag answers 304",
                                    {"type": "string"}),
            "LabelSelector": param("labelSelector", "query", "Kubernetes syntax: k=v, k!=v, k in (a,b), "
                                   "k notin (a), k, !k; comma = AND", {"type": "string"}),
            "Name": param("name", "query", "only the object with this name", {"type": "string"}),
            "EventLimit": param("limit", "query", "at most this many, the newest (default 50)",
                                {"type": "integer", "minimum": 1, "maximum": 10000}),
            "Limit": param("limit", "query", "page size (empty: no limit)",
                           {"type": "integer", "minimum": 1, "maximum": 2 ** 31}),
            "Continue": param("continue", "query", "the X-Continue token of the previous page (empty: the "
                              "first page)", {"type": "string"}),
            "Force": param("force", "query", "delete now, even with finalizers pending",
                           {"type": "boolean"}),
            "EventType": param("type", "query", "CloudEvent type pattern (* wildcards)", {"type": "string"}),
            "EventKind": param("kind", "query", "only events of this kind", {"type": "string"}),
            "Since": param("since", "query", "replay events after this position (like Last-Event-ID)",
                           {"type": "string"}),
            "LastEventID": param("Last-Event-ID", "header", "replay events after this position",
                                 {"type": "string"}),
            "StreamTicket": param("ticket", "query", "with --token, what POST /events/ticket answered (instead of "
                                  "the Authorization header an EventSource cannot send)", {"type": "string"}),
            "Untyped": param("untyped", "query", "true: frames without the event: field, so EventSource.onmessage "
                             "receives every type", {"type": "string", "enum": ["true", "false"]}),
        },
        "headers": {
            "ETag": header('"<resourceVersion>" (strong)', {"type": "string"}, True),
            "XTotalCount": header("objects matching before paging", {"type": "string", "pattern": "^[0-9]+$"},
                                  True),
            "XContinue": header("token for the next page, when there is one", {"type": "string"}),
            "Link": header('<...>; rel="next" when there is a next page', {"type": "string"}),
            "Location": header("the new object's path", {"type": "string"}, True),
            "AcceptPatch": header("the patch media types", {"type": "string"}, True),
        },
    }


def openapi_document(app) -> dict:
    """The OpenAPI 3.1.0 document of every route ``app`` serves (what GET /openapi.json answers)."""
    token = bool(app.token)
    components = _oa_components()
    paths, tags = {}, []
    # A kind's components and operation ids are <name>, <name>Spec, <name>Status, ...; a kind whose
    # name would collide (a kind "Error", or "ServerStatus" beside "Server") becomes <kind>Kind[N].
    taken = set(components["schemas"]) | {"Health", "Apis", "Events", "OpenAPI", "Docs", "Metrics", "Dashboard"}

    def allocate(kind: str) -> str:
        name, n = kind, 1
        while any(name + suffix in taken for suffix in _OA_SUFFIXES):
            n += 1
            name = kind + "Kind" + (str(n - 1) if n > 2 else "")
        taken.update(name + suffix for suffix in _OA_SUFFIXES)
        return name
    for info in sorted(app.kinds.values(), key=lambda i: i.plural):
        name = allocate(info.kind)
        components["schemas"].update(_oa_kind_schemas(info, name))
        notes = [f"plural {info.plural}", f"uid prefix {info.prefix}"]
        notes += [note for flag, note in ((info.reconcile, "reconciled by a controller"),
                                          (info.finalize, "has a finalizer"),
                                          (info.history_on, "keeps spec history")) if flag]
        tags.append({"name": info.kind, "description": "; ".join(notes)})
        paths.update(_oa_kind_paths(name, info.kind, "/" + info.plural, info.kind, info.history_on, token))
    if app.open:
        name = allocate("Resource")
        components["schemas"].update(_oa_kind_schemas(None, name))
        tags.append({"name": "open", "description": "any other plural: its kind is made at first create"})
        paths.update(_oa_kind_paths(name, "resource", "/{plural}", "open", False, token, open_kind=True))

    def system(op_id, summary, responses, codes="", params=(), public=False):
        o = {"tags": ["system"], "summary": summary, "operationId": op_id}
        if params:
            o["parameters"] = list(params)
        o["responses"] = _oa_responses(responses, codes, token and not public)
        if token and public:
            o["security"] = []
        return {"get": o}
    text = {"type": "string"}
    # the schema of one event of the stream: id = position, event = CloudEvent type, data = the CloudEvent
    sse_event = {"type": "object", "properties": {
        "id": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}, "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object", "required": ["specversion", "id", "type", "source"]}},
        "retry": {"type": "integer"}}}
    paths.update({
        "/health": system("getHealth", "Liveness and store health (never needs a token)",
                          {"200": _oa_ok("Health", _oa_ref("Health"))}, public=True),
        "/apis": system("getApis", "Discovery: kinds, plurals, prefixes, patch types",
                        {"200": _oa_ok("The kinds", _oa_ref("Discovery"))}),
        "/events": system("watchEvents", "Server-Sent Events: one CloudEvent per change",
                          {"200": _oa_ok("An endless text/event-stream (id:, event:, data: lines)", sse_event,
                                         media="text/event-stream")}, "400 404 410",
                          [_oa_ref(p, "parameters") for p in ("EventType", "EventKind", "Since", "LastEventID",
                                                              "StreamTicket", "Untyped")]),
        "/openapi.json": system("getOpenAPI", "This document",
                                {"200": _oa_ok("OpenAPI 3.1.0", {"type": "object"})}),
        "/docs": system("getDocs", "An offline page that browses this document",
                        {"200": _oa_ok("HTML", text, media="text/html")}),
        "/metrics": system("getMetrics", "Prometheus text format",
                           {"200": _oa_ok("Metrics", text, media="text/plain")}),
    })
    roots = [r for r in app.wsgi.routes if r.rule == "/" and r.method == "GET"]
    if roots and roots[-1].name != ROOT_ROUTE:      # the app's own page replaced fabrica's (the last one wins)
        paths["/"] = system("getDashboard", "A small HTML dashboard",
                            {"200": _oa_ok("HTML", text, media="text/html")})
    elif roots:
        root = system("getRoot", "Discovery, as at /apis; a browser (Accept: text/html) gets the dashboard, "
                      "a page that needs no token", {"200": _oa_ok("The kinds", _oa_ref("Discovery"))})
        root["get"]["responses"]["200"]["content"]["text/html"] = {"schema": text}
        paths["/"] = root
    ticket = system("createEventTicket", f"A ticket for GET /events?ticket=: used once, within "
                    f"{STREAM_TICKET_TTL} s", {"200": _oa_ok("The ticket", {
                        "type": "object", "required": ["ticket", "expiresAt"],
                        "properties": {"ticket": text, "expiresAt": {"type": "string", "format": "date-time"}}})})
    paths["/events/ticket"] = {"post": ticket["get"]}
    tags.append({"name": "system", "description": "health, discovery, events, documentation, metrics"})
    doc = {
        "openapi": "3.1.0",
        "info": {"title": app.service, "version": __version__,
                 "description": "Declarative resources (spec written by users, status by controllers) "
                                "served by fabrica.py. Every error body is an Error."},
        "tags": tags,
        "paths": paths,
        "components": components,
    }
    if token:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearerAuth": []}]
    return doc


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>API docs</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#234;color:#fff;padding:10px 16px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0;flex:1}
main{display:grid;grid-template-columns:220px 1fr;gap:16px;padding:16px}
nav a{display:block;color:#246;text-decoration:none;padding:2px 0;cursor:pointer}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin-bottom:16px;padding:8px 12px}
h2{font-size:16px;margin:4px 0 8px}
.op{border-top:1px solid #eee;padding:6px 0}
.op summary{cursor:pointer}
.m{display:inline-block;width:58px;font:bold 12px monospace;text-align:center;border-radius:3px;color:#fff}
.GET{background:#2a7}.POST{background:#27c}.PUT{background:#c82}.PATCH{background:#a5c}.DELETE{background:#c33}
code,pre{font-family:ui-monospace,monospace;font-size:12px}
pre{background:#f4f4f4;padding:8px;overflow:auto;max-height:420px;margin:6px 0}
input{font:inherit;padding:2px 4px;margin:2px 6px 2px 0}
.muted{color:#777}
</style></head>
<body>
<header><h1 id="title">API</h1>
<label>Token <input id="token" type="password" placeholder="bearer token (optional)"></label></header>
<main><nav id="nav"></nav><div id="content"><p class="muted">Loading /openapi.json ...</p></div></main>
<script>
"use strict";
const $ = (tag, attrs, ...kids) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") el.onclick = v; else el.setAttribute(k, v);
  }
  for (const kid of kids) el.append(kid);
  return el;
};
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("fabrica-token") || "";
tokenInput.onchange = () => sessionStorage.setItem("fabrica-token", tokenInput.value);
const headers = () => tokenInput.value ? {Authorization: "Bearer " + tokenInput.value} : {};
const pretty = (text) => { try { return JSON.stringify(JSON.parse(text), null, 2); } catch (e) { return text; } };

function tryGet(doc, path, op, out) {
  const form = $("div");
  const inputs = {};
  for (const name of path.match(/[{][^}]+[}]/g) || []) {
    const key = name.slice(1, -1);
    inputs[key] = $("input", {placeholder: key, size: 20});
    form.append(key + " ", inputs[key]);
  }
  const query = $("input", {placeholder: "query, e.g. limit=10", size: 28});
  const resolve = (p) => p.$ref ? doc.components.parameters[p.$ref.split("/").pop()] : p;
  if ((op.parameters || []).some((p) => resolve(p).in === "query")) form.append("?", query);
  const button = $("button", {onclick: async () => {
    let url = path.replace(/[{]([^}]+)[}]/g, (_, k) => encodeURIComponent(inputs[k].value));
    if (query.value) url += "?" + query.value.replace(/^[?]/, "");
    out.textContent = "GET " + url + " ...";
    try {
      const res = await fetch(url, {headers: headers()});
      const body = await res.text();
      out.textContent = "GET " + url + "\\n" + res.status + " " + res.statusText + "\\n\\n" + pretty(body);
    } catch (e) { out.textContent = "GET " + url + " failed: " + e; }
  }}, "Try");
  form.append(button);
  return form;
}

function schemaName(s) {
  if (!s) return "";
  if (s.$ref) return s.$ref.split("/").pop();
  if (s.type === "array" && s.items) return "[" + schemaName(s.items) + "]";
  return s.type || "";
}

function render(doc) {
  document.title = doc.info.title + " API";
  document.getElementById("title").textContent =
    doc.info.title + " " + doc.info.version + " (OpenAPI " + doc.openapi + ")";
  const nav = document.getElementById("nav"), content = document.getElementById("content");
  content.textContent = "";
  const byTag = {};
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (method === "parameters") continue;
      for (const tag of op.tags || ["other"]) (byTag[tag] = byTag[tag] || []).push([path, method.toUpperCase(), op]);
    }
  }
  for (const tag of doc.tags || Object.keys(byTag).map((name) => ({name}))) {
    const ops = byTag[tag.name] || [];
    const sec = $("section", {id: "tag-" + tag.name}, $("h2", {}, tag.name),
                  $("div", {class: "muted"}, tag.description || ""));
    nav.append($("a", {href: "#tag-" + tag.name}, tag.name));
    for (const [path, method, op] of ops) {
      const body = op.requestBody ? Object.entries(op.requestBody.content)
        .map(([type, c]) => type + ": " + schemaName(c.schema)).join(", ") : "";
      const codes = Object.entries(op.responses).map(([code, r]) => {
        const c = r.content ? Object.values(r.content)[0] : null;
        return code + (c ? " " + schemaName(c.schema) : "");
      }).join(", ");
      const params = (op.parameters || []).concat(doc.paths[path].parameters || [])
        .map((p) => p.$ref ? p.$ref.split("/").pop() : p.name).join(", ");
      const details = $("details", {class: "op"},
        $("summary", {}, $("span", {class: "m " + method}, method), " ", $("code", {}, path), " ",
          $("span", {class: "muted"}, op.summary || "")),
        $("div", {}, "operationId: ", $("code", {}, op.operationId || "")),
        params ? $("div", {}, "parameters: ", $("code", {}, params)) : "",
        body ? $("div", {}, "body: ", $("code", {}, body)) : "",
        $("div", {}, "responses: ", $("code", {}, codes)));
      if (method === "GET" && path !== "/events") {   // an endless stream: no Try
        const out = $("pre", {}, "");
        details.append(tryGet(doc, path, op, out), out);
      }
      sec.append(details);
    }
    content.append(sec);
  }
  const schemas = $("section", {id: "schemas"}, $("h2", {}, "Schemas"));
  nav.append($("a", {href: "#schemas"}, "Schemas"));
  for (const [name, schema] of Object.entries((doc.components || {}).schemas || {})) {
    schemas.append($("details", {class: "op"}, $("summary", {}, $("code", {}, name)),
      $("pre", {}, JSON.stringify(schema, null, 2))));
  }
  content.append(schemas);
}

fetch("/openapi.json", {headers: headers()})
  .then((res) => res.ok ? res.json() : res.text().then((t) => { throw new Error(res.status + " " + t); }))
  .then(render)
  .catch((e) => { document.getElementById("content").textContent = "Could not load /openapi.json: " + e; });
</script>
</body></html>
"""


###############################################################################
# REST API #####################################################################
###############################################################################
#
# Bottle routes per kind over the Registry's writes; the HTTP forms (body
# forms, If-Match, ETags) are parsed here and handed on as values. Every error
# is a JSON body {"error", "code", "details"}, Bottle's own 404/405/500 included.
# Order of checks: auth and Host (before_request) -> route -> ref syntax ->
# body size, type and JSON -> existence -> preconditions -> validation -> write.

PATCH_TYPES = {MERGE_PATCH: "merge", JSON_TYPE: "merge", "": "merge", JSON_PATCH: "json", SHORTHAND_PATCH: "shorthand"}
ACCEPT_PATCH = ", ".join((MERGE_PATCH, JSON_PATCH, SHORTHAND_PATCH))
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _wsgi_text(value: str, what: str) -> str:
    """A WSGI string (PEP 3333: the raw bytes, decoded as latin-1) as the UTF-8 text the client sent.

    BadRequestError names ``what`` when the bytes are not UTF-8.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BadRequestError(f"{what} is not valid UTF-8") from None


def _host_name(value: str) -> str:
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def etag_of(obj: dict) -> str:
    return '"' + obj["metadata"]["resourceVersion"] + '"'


def _etag_list(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def if_match_ok(header: str | None, obj: dict) -> bool:
    """RFC 9110 If-Match with strong comparison (a weak tag never matches)."""
    if header is None:
        return True
    tags = _etag_list(header)
    return "*" in tags or etag_of(obj) in tags


def if_none_match_hit(header: str | None, obj: dict) -> bool:
    """RFC 9110 If-None-Match with weak comparison (for GET)."""
    if header is None:
        return False
    tags = [t[2:] if t.startswith("W/") else t for t in _etag_list(header)]
    return "*" in tags or etag_of(obj) in tags


def etag_versions(header: str | None) -> tuple[str, ...] | None:
    """The resourceVersions an If-Match or If-None-Match header names, for a write; None without one.

    ``"7"`` names resourceVersion 7 and ``*`` stays ``*`` (any). A weak tag
    (``W/"7"``) or a malformed one names none: a write compares entity tags
    strongly (RFC 9110 §13.1.1), so it can never match.
    """
    if header is None:
        return None
    return tuple(t if t == "*" else t[1:-1] for t in _etag_list(header)
                 if t == "*" or (len(t) >= 2 and t[0] == t[-1] == '"'))


# A body's two forms (SPEC §6.2): the envelope ({"metadata": ..., "spec": ...}, what GET answers) and
# the flat one (the spec's fields at the top, with name/labels/annotations beside them).
_ENVELOPE_KEYS = {"apiVersion", "kind", "schemaVersion", "metadata", "spec", "status"}
_META_WRITABLE = {"name", "labels", "annotations", "finalizers", "resourceVersion", "ownerReferences"}
_META_IGNORED = {"uid", "createdAt", "updatedAt", "generation", "deletionTimestamp"}


def parse_body(info: KindInfo, body: dict, *, update: bool = False) -> dict:
    """The Registry.create (or, with ``update``, Registry.update) arguments a flat or envelope body gives.

    Checks the body's form: unknown top-level or metadata fields,
    ``apiVersion`` and ``kind``, a status in a flat body (ValidationError),
    metadata or spec not an object (BadRequestError); the registry checks
    the fields' values. ``ownerReferences`` are taken at create only (they
    are immutable); an update merges a flat body's labels and annotations.
    """
    out = {"name": None, "labels": None, "annotations": None, "finalizers": None, "spec": None,
           "resource_version": None}
    envelope = "metadata" in body or "spec" in body
    if envelope:
        unknown = sorted(set(body) - _ENVELOPE_KEYS)
        if unknown:
            raise ValidationError(f"unknown top-level field(s) {', '.join(map(repr, unknown))} in an envelope "
                                  "body; allowed: apiVersion, kind, metadata, spec (status is ignored)",
                                  [{"field": k, "message": "unknown field"} for k in unknown])
        meta = body.get("metadata", {})
        if not isinstance(meta, dict):
            raise BadRequestError("metadata must be a JSON object")
        unknown = sorted(set(meta) - _META_WRITABLE - _META_IGNORED)
        if unknown:
            raise ValidationError(f"unknown metadata field(s) {', '.join(map(repr, unknown))}",
                                  [{"field": f"metadata.{k}", "message": "unknown field"} for k in unknown])
        if "spec" in body:
            if not isinstance(body["spec"], dict):
                raise BadRequestError("spec must be a JSON object")
            out["spec"] = body["spec"]
        for key in ("name", "labels", "annotations", "finalizers"):
            if key in meta:
                out[key] = meta[key]
        if not update:      # set at create, then immutable
            refs = meta.get("ownerReferences")
            out["owner_references"] = [] if refs is None else refs
        if "resourceVersion" in meta:
            out["resource_version"] = meta["resourceVersion"]
    else:
        out["spec"] = {k: v for k, v in body.items() if k not in _FLAT_RESERVED}
        for key in ("name", "labels", "annotations"):
            if key in body:
                out[key] = body[key]
    if update:
        out["merge_metadata"] = not envelope
    if "apiVersion" in body and body["apiVersion"] != API_VERSION:
        raise _validation("apiVersion", f"must be {API_VERSION!r}")
    if "kind" in body and body["kind"] != info.kind:
        raise _validation("kind", f"must be {info.kind!r} (the kind served at /{info.plural})")
    if not envelope and "status" in body:
        # a flat body is never the shape of a GET answer, so a status in it is a mistake, not a round trip
        raise _not_spec("status")
    return out


_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _ChunkedReader:
    """Decodes a chunked request body for servers that pass it through raw; read() only."""

    def __init__(self, raw):
        self.raw = raw
        self.left = 0
        self.done = False

    def read(self, size: int = -1) -> bytes:
        out = []
        while not self.done and (size < 0 or size > 0):
            if self.left == 0:
                line = self.raw.readline(1024)
                chunk = line.split(b";")[0].strip()
                if not _CHUNK_SIZE_RE.fullmatch(chunk) or not line.endswith(b"\n"):
                    raise BadRequestError("malformed chunked body (a chunk-size line ends within 1 KiB)")
                self.left = int(chunk, 16)
                if self.left == 0:
                    self._skip_trailers()
                    self.done = True
                    break
            n = self.left if size < 0 else min(self.left, size)
            data = self.raw.read(n)
            if not data:
                raise BadRequestError("the chunked body ended early")
            out.append(data)
            self.left -= len(data)
            if size > 0:
                size -= len(data)
            if self.left == 0 and self.raw.read(2) != b"\r\n":
                raise BadRequestError("malformed chunked body: a chunk must end with CRLF")
        return b"".join(out)

    def _skip_trailers(self):
        # trailer fields are dropped, but counted like a head: a client cannot stream them forever
        size = 0
        while (line := self.raw.readline(1024)).strip():
            size += len(line)
            if size > MAX_HEAD:
                raise BadRequestError(f"the chunked body's trailer fields are over {MAX_HEAD} bytes")


def read_body(environ: dict, limit: int = MAX_BODY) -> bytes:
    """The request body, at most ``limit`` bytes, never buffered beyond that (413 past it; 408 when
    the server's deadline for it passes)."""
    try:
        return _read_body(environ, limit)
    except TimeoutError:
        environ["fabrica.close"] = True
        raise RequestTimeoutError("the request body did not arrive in time") from None


def _read_body(environ: dict, limit: int) -> bytes:
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        stream = environ["wsgi.input"]
        if not environ.get("wsgi.input_terminated"):
            stream = _ChunkedReader(stream)
        data = stream.read(limit + 1)
        if len(data) > limit:
            environ["fabrica.close"] = True
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
        return data
    length = environ.get("CONTENT_LENGTH") or "0"
    if not length.isdigit() or not length.isascii():
        raise BadRequestError(f"invalid Content-Length {length[:20]!r}")
    length = int(length)
    if length > limit:
        environ["fabrica.close"] = True
        raise PayloadTooLargeError(f"the request body is {length} bytes; the limit is {limit}")
    data = environ["wsgi.input"].read(length) if length else b""
    if len(data) != length:
        raise BadRequestError("the request body is shorter than its Content-Length")
    return data


def encode_continue(name: str) -> str:
    """The opaque, URL-safe continue token for a page that ended at ``name``."""
    return base64.urlsafe_b64encode(b"n:" + name.encode()).rstrip(b"=").decode()


def decode_continue(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raw = ""
    if not raw.startswith("n:") or not valid_name(raw[2:]):
        raise BadRequestError(f"malformed continue token {token[:40]!r}; start the list again without it")
    return raw[2:]


def _media_type(environ) -> str:
    return environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()


def _sse_frame(position, event, typed: bool = True) -> bytes:
    """One Server-Sent Events frame: ``id``, ``event`` and ``data`` lines.

    A field ends at CR or LF (WHATWG HTML, server-sent events), so a line
    break inside one would start a field or an event of its sender's
    choosing: the id and event fields have their control characters escaped
    whatever reaches here, and the data is one line of JSON (json.dumps
    escapes every control character in a string). ``typed=False`` leaves the
    event field out (the type stays in the data).
    """
    head = f"event: {_one_line(str(event['type']))}\n" if typed else ""
    return f"id: {_one_line(format_position(position))}\n{head}data: {dumps(event)}\n\n".encode()


def _peer_closed(sock) -> bool:
    """True when the client hung up (readable with nothing to read)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# Label values of the HTTP metrics come from a fixed set, never from what a client sent: a
# method outside this set is "other", the route is the route's template, the code a status.
_METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_CACHE_COUNT = 10000           # GET bodies the JSON cache keeps...
_BODY_CACHE_BYTES = 64 << 20        # ...and their bytes (objects reach the 1 MiB object limit)


def _prom_escape(value: str) -> str:
    """A Prometheus label value: backslash, double quote and line feed escaped (the text format's rule).

    Every label value goes through it, those from a fixed set too: a value
    is never what ends a line or a sample.
    """
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class RestAPI:
    """Builds the Bottle routes of a Fabrica; one instance per app.

    Writes go to ``registry``, events come from ``bus``, /metrics reads
    ``controllers`` (kind -> Controller, kept up to date by the app); of
    ``app`` it reads settings only (token, cors, service, elector).
    ``host_check`` answers only loopback Host names (serve sets it).
    """

    def __init__(self, app, registry: Registry, bus: Bus, controllers: dict[str, Controller]):
        self.app = app
        self.registry = registry
        self.bus = bus
        self.controllers = controllers
        self.host_check = False
        self.wsgi = bottle.Bottle()
        self.wsgi.default_error_handler = self._bottle_error
        self.wsgi.add_hook("before_request", self._guard)
        self.wsgi.add_hook("after_request", self._after)
        self.requests = collections.Counter()   # (route template, method, code) -> count; see _METRIC_METHODS
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.keepalive = 15.0                   # seconds between SSE keep-alive comments
        self._hosts: dict[str, bool] = {}       # Host header -> allowed (the loopback check, cached)
        self._bodies: dict[tuple[str, str], tuple[dict, bytes]] = {}   # (kind, uid) -> (object, its JSON)
        self._bodies_bytes = 0                  # the cached JSON's bytes, summed
        self._bodies_lock = threading.Lock()    # guards writes to _bodies and _bodies_bytes (reads take none)
        self.tickets = StreamTickets()          # GET /events without a header: the dashboard's EventSource
        self.wsgi.route("/", "GET", self._endpoint(self.root), name=ROOT_ROUTE)
        self.wsgi.route("/health", "GET", self._endpoint(self.health))
        self.wsgi.route("/apis", "GET", self._endpoint(self.apis))
        self.wsgi.route("/openapi.json", "GET", self._endpoint(self.openapi))
        self.wsgi.route("/docs", "GET", self._endpoint(self.docs))
        self.wsgi.route("/events", "GET", self._endpoint(self.events))
        self.wsgi.route("/events/ticket", "POST", self._endpoint(self.event_ticket))
        self.wsgi.route("/metrics", "GET", self._endpoint(self.metrics))

    # -- plumbing ----------------------------------------------------------
    def _guard(self):
        app = self.app
        environ = bottle.request.environ
        environ["fabrica.t0"] = time.perf_counter()
        if self.host_check:
            header = environ.get("HTTP_HOST", "")
            ok = self._hosts.get(header)
            if ok is None:
                host = _host_name(header)
                ok = not host or is_loopback(host)
                if len(self._hosts) < 1024:        # bounded: Host is client input
                    self._hosts[header] = ok
            if not ok:
                host = _host_name(header).encode("latin-1", "replace").decode("utf-8", "replace")
                raise self._error_response(ForbiddenError(
                    f"Host {host[:80]!r} is not a loopback name; this server only answers loopback requests "
                    "(serve with --host to bind elsewhere)"))
        try:
            # Bottle routes on the path decoded as UTF-8 with the bad bytes dropped: /widgets/w%FF1 would be w1
            _wsgi_text(environ.get("bottle.raw_path", ""), "the path")
        except BadRequestError as err:
            raise self._error_response(err) from None
        if app.cors and environ["REQUEST_METHOD"] == "OPTIONS":
            raise self._preflight(app.cors, environ)       # browsers send no credentials on a preflight
        if app.token and environ.get("PATH_INFO") != "/health":
            got = environ.get("HTTP_AUTHORIZATION", "")
            if not hmac.compare_digest(got.encode("utf-8", "replace"), ("Bearer " + app.token).encode()):
                try:
                    admitted = dashboard_admits(self, environ)
                except FabricaError as err:     # a ticket, refused: the error says why
                    raise self._error_response(err) from None
                if not admitted:
                    raise self._error_response(UnauthorizedError(
                        "missing or wrong bearer token: send 'Authorization: Bearer <token>'"),
                        {"WWW-Authenticate": 'Bearer realm="fabrica"'})

    def _after(self):
        environ = bottle.request.environ
        route = environ.get("bottle.route")
        rule = route.rule if route is not None else "unmatched"
        method = environ.get("REQUEST_METHOD", "")
        if method not in _METRIC_METHODS:
            method = "other"
        code = bottle.response.status_code
        self.requests[(rule, method, code if 100 <= code <= 599 else 0)] += 1
        started = environ.get("fabrica.t0")
        if started is not None:
            hist = self.latency.get((rule, method))
            if hist is None:
                hist = self.latency.setdefault((rule, method), Histogram())
            hist.observe(time.perf_counter() - started)
        cors = self.app.cors
        if cors and environ.get("HTTP_ORIGIN") == cors:
            res = bottle.response
            res.set_header("Access-Control-Allow-Origin", cors)
            vary = res.get_header("Vary")       # GET / varies by Accept too
            res.set_header("Vary", f"{vary}, Origin" if vary else "Origin")
            res.set_header("Access-Control-Expose-Headers",
                           "ETag, Location, Link, X-Continue, X-Total-Count, Accept-Patch")

    @staticmethod
    def _preflight(cors: str, environ) -> bottle.HTTPResponse:
        """A CORS preflight answer (only with --cors; without it OPTIONS is routed like any method)."""
        headers = {}
        if environ.get("HTTP_ORIGIN") == cors:
            headers = {"Access-Control-Allow-Origin": cors, "Vary": "Origin",
                       "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
                       "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match, If-None-Match, "
                                                       "Last-Event-ID",
                       "Access-Control-Max-Age": "600"}
        return bottle.HTTPResponse(b"", 204, headers)

    def _error_response(self, err: FabricaError, headers=None) -> bottle.HTTPResponse:
        res = bottle.HTTPResponse(dumps(err.to_json()), err.status, headers)
        res.set_header("X-Error-Class", type(err).__name__)      # lets Client raise the very same class
        res.content_type = JSON_TYPE
        if err.status in (408, 413):         # the body is left unread: the connection cannot be reused
            res.set_header("Connection", "close")
        return res

    def _bottle_error(self, res: bottle.HTTPError) -> str:
        bottle.response.content_type = JSON_TYPE
        if res.status_code >= 500:
            message = "internal server error; the server log has the details"
            if res.traceback:
                http_log.error("unhandled error in %s %s:\n%s", _one_line(bottle.request.method),
                               _one_line(bottle.request.path), res.traceback)
        elif res.status_code == 404:
            message = f"no route for {bottle.request.path[:200]!r}; GET /apis lists the kinds"
        elif res.status_code == 405:
            message = f"method {bottle.request.method} is not allowed here; allowed: {res.headers.get('Allow', '')}"
        else:
            message = str(res.body) if isinstance(res.body, str) and res.body else res.status_line
        return dumps({"error": message, "code": res.status_code, "details": []})

    def _endpoint(self, fn):
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except FabricaError as err:
                extra = {"Accept-Patch": ACCEPT_PATCH} if err.status == 415 and bottle.request.method == "PATCH" else None
                return self._error_response(err, extra)
            except Exception:
                http_log.exception("unhandled error in %s %s", _one_line(bottle.request.method),
                                   _one_line(bottle.request.path))
                return self._error_response(FabricaError("internal server error; the server log has the details"))
        handler.__name__ = fn.__name__
        return handler

    @staticmethod
    def _send(obj, status: int = 200, etag: bool = True) -> bytes:
        res = bottle.response
        res.status = status
        res.content_type = JSON_TYPE
        if etag:
            res.set_header("ETag", etag_of(obj))
        return dumps(obj).encode()

    def _json_body(self, *, patch: bool = False) -> tuple[object, str]:
        environ = bottle.request.environ
        media = _media_type(environ)
        if patch:
            if media not in PATCH_TYPES:
                raise UnsupportedMediaTypeError(
                    f"unsupported patch type {media!r}; use one of {ACCEPT_PATCH}")
        elif media not in ("", JSON_TYPE):
            raise UnsupportedMediaTypeError(f"Content-Type must be {JSON_TYPE}, not {media!r}")
        raw = read_body(environ, self.registry.max_body)
        # a JSON Patch is an array; every other body (a spec/status merge or shorthand patch too) is an object
        kind = PATCH_TYPES[media] if patch else "body"
        return read_json(raw, want_object=kind != "json"), kind

    def _kind(self, plural: str):
        info = self.registry.served(plural)
        if info is None:
            raise NotFoundError(f"no kind is served at /{plural}; GET /apis lists the kinds")
        return info

    def _obj(self, info, ref: str) -> dict:
        obj = self.registry.store.resolve(info.kind, ref)
        if obj is None:
            if not valid_name(ref):
                raise BadRequestError(f"invalid reference {ref[:80]!r}: expected a uid or a DNS-1123 name")
            raise NotFoundError(f'{info.kind} "{ref}" not found')
        return obj

    # -- routes ------------------------------------------------------------
    def mount(self, plural: str | None, history: bool = False) -> None:
        """Mount the routes of one plural (``plural=None`` mounts the open server's catch-all)."""
        route, ep = self.wsgi.route, self._endpoint
        if plural is None:
            base, fixed = "/<plural:re:[a-z][a-z0-9]{0,62}>", {}
        else:
            base, fixed = "/" + plural, {"plural": plural}

        def bind(fn):
            return ep(lambda **kw: fn(**fixed, **kw)) if fixed else ep(fn)
        route(base, "GET", bind(self.list))
        route(base, "POST", bind(self.create))
        route(base + "/<ref>", "GET", bind(self.get))
        route(base + "/<ref>", "PUT", bind(self.update))
        route(base + "/<ref>", "PATCH", bind(self.patch))
        route(base + "/<ref>", "DELETE", bind(self.delete))
        route(base + "/<ref>/status", "GET", bind(self.get_status))
        route(base + "/<ref>/status", "PUT", bind(self.update_status))
        route(base + "/<ref>/status", "PATCH", bind(self.patch_status))
        route(base + "/<ref>/events", "GET", bind(self.object_events))
        if history:
            route(base + "/<ref>/versions", "GET", bind(self.versions))
            route(base + "/<ref>/versions/<vid>", "GET", bind(self.get_version))
            route(base + "/<ref>/versions/<vid>", "DELETE", bind(self.delete_version))
            route(base + "/<ref>/versions/<vid>/restore", "POST", bind(self.restore_version))

    def list(self, plural):
        info = self.registry.served(plural)
        if info is None and not (self.registry.open and plural not in RESERVED_PATHS):
            raise NotFoundError(f"no kind is served at /{plural}; GET /apis lists the kinds")
        query = self._query()
        # An empty option is an absent one, as in Kubernetes (its clients start paging with continue="").
        selector, name = query.get("labelSelector") or None, query.get("name") or None
        limit, token = query.get("limit") or None, query.get("continue") or None
        if limit is not None:
            if not limit.isdigit() or not limit.isascii() or not 1 <= int(limit) <= 2 ** 31:
                raise BadRequestError(f"limit must be an integer from 1 to 2^31, not {limit[:20]!r}")
            limit = int(limit)
        items, total, more = self.registry.store.query(
            info.kind if info else "", parse_selector(selector) if selector else None, name=name,
            after=decode_continue(token) if token is not None else None, limit=limit)
        res = bottle.response
        res.set_header("X-Total-Count", str(total))
        if more is not None:
            token = encode_continue(more)
            res.set_header("X-Continue", token)
            params = {"limit": str(limit), "continue": token}
            if selector:
                params["labelSelector"] = selector
            res.set_header("Link", f'</{info.plural}?{urllib.parse.urlencode(params)}>; rel="next"')
        return self._send(items, etag=False)

    def create(self, plural):
        if plural in RESERVED_PATHS:
            raise NotFoundError(f"/{plural} is reserved")
        body, _ = self._json_body()
        registry = self.registry
        if registry.open:
            with registry.open_kind(plural, body.get("kind") if isinstance(body.get("kind"), str) else None) as info:
                obj = registry.create(info, **parse_body(info, body))
        else:
            info = self._kind(plural)
            obj = registry.create(info, **parse_body(info, body))
        bottle.response.set_header("Location", f"/{info.plural}/{obj['metadata']['uid']}")
        return self._send(obj, 201)

    def get(self, plural, ref):
        info = self._kind(plural)
        obj = self._obj(info, ref)
        res = bottle.response
        if if_none_match_hit(self._header("HTTP_IF_NONE_MATCH"), obj):
            res.status = 304
            res.set_header("ETag", etag_of(obj))
            return b""
        # Stored objects are never mutated (a write stores a new dict), so the JSON of
        # the very same object can be reused; the cache holds it, so `is` is safe.
        key = (info.kind, obj["metadata"]["uid"])
        bodies = self._bodies
        cached = bodies.get(key)
        if cached is None or cached[0] is not obj:
            cached = (obj, dumps(obj).encode())
            with self._bodies_lock:
                stale = bodies.pop(key, None)
                if stale is not None:
                    self._bodies_bytes -= len(stale[1])
                if len(bodies) >= _BODY_CACHE_COUNT or self._bodies_bytes + len(cached[1]) > _BODY_CACHE_BYTES:
                    bodies.clear()
                    self._bodies_bytes = 0
                bodies[key] = cached
                self._bodies_bytes += len(cached[1])
        res.content_type = JSON_TYPE
        res.set_header("ETag", etag_of(obj))
        return cached[1]

    def _preconditions(self) -> dict:
        """The resourceVersions the request's If-Match and If-None-Match name (None: no such header)."""
        return {"if_match": etag_versions(self._header("HTTP_IF_MATCH")),
                "if_none_match": etag_versions(self._header("HTTP_IF_NONE_MATCH"))}

    @staticmethod
    def _query() -> bottle.FormsDict:
        """The query parameters as the UTF-8 text the client sent (Bottle decodes them as latin-1, PEP 3333)."""
        try:
            return bottle.request.query.decode()
        except UnicodeError:
            raise BadRequestError("the query string is not valid UTF-8") from None

    @staticmethod
    def _header(key: str) -> str | None:
        """A request header by its WSGI key (``HTTP_IF_MATCH``) as the UTF-8 text the client sent."""
        value = bottle.request.environ.get(key)
        return None if value is None else _wsgi_text(value, key[5:].replace("_", "-").title() + " header")

    def update(self, plural, ref):
        info = self._kind(plural)
        self._obj(info, ref)
        body, _ = self._json_body()
        obj = self.registry.update(info, ref, **parse_body(info, body, update=True), **self._preconditions())
        return self._send(obj)

    def patch(self, plural, ref):
        info = self._kind(plural)
        self._obj(info, ref)
        body, kind = self._json_body(patch=True)
        obj = self.registry.patch(info, ref, body, kind, **self._preconditions())
        bottle.response.set_header("Accept-Patch", ACCEPT_PATCH)
        return self._send(obj)

    def delete(self, plural, ref):
        info = self._kind(plural)
        self._obj(info, ref)
        force = self._query().get("force", "").lower() in ("true", "1", "yes")
        obj, gone = self.registry.delete(info, ref, force=force, if_match=self._preconditions()["if_match"])
        if not gone:
            return self._send(obj, 202)
        return self._send({"message": f"{info.kind} deleted successfully", "uid": obj["metadata"]["uid"]},
                          etag=False)

    def get_status(self, plural, ref):
        info = self._kind(plural)
        obj = self._obj(info, ref)
        bottle.response.set_header("ETag", etag_of(obj))
        return self._send(obj["status"], etag=False)

    def update_status(self, plural, ref):
        info = self._kind(plural)
        self._obj(info, ref)
        body, _ = self._json_body()
        obj = self.registry.update_status(info, ref, body, **self._preconditions())
        return self._send(obj)

    def patch_status(self, plural, ref):
        info = self._kind(plural)
        self._obj(info, ref)
        body, kind = self._json_body(patch=True)
        obj = self.registry.patch(info, ref, body, kind, status=True, **self._preconditions())
        bottle.response.set_header("Accept-Patch", ACCEPT_PATCH)
        return self._send(obj)

    def object_events(self, plural, ref):
        """The object's recent events the store's change feed still retains, oldest first (``?limit=``, default 50).

        Not a stream: ``describe`` shows them; GET /events?kind= follows them live.
        """
        info = self._kind(plural)
        obj = self._obj(info, ref)
        limit = self._query().get("limit") or "50"
        if not limit.isdigit() or not limit.isascii() or not 1 <= int(limit) <= 10000:
            raise BadRequestError(f"limit must be an integer from 1 to 10000, not {limit[:20]!r}")
        return self._send(self.bus.recent(info.kind, obj["metadata"]["uid"], int(limit)), etag=False)

    def _history(self, plural, ref):
        info = self._kind(plural)
        if not info.history_on:
            raise NotFoundError(f"{info.kind} keeps no spec history (register it with history=True)")
        return info, self._obj(info, ref)

    def versions(self, plural, ref):
        info, obj = self._history(plural, ref)
        return self._send(self.registry.store.versions(info.kind, obj["metadata"]["uid"]), etag=False)

    def get_version(self, plural, ref, vid):
        info, obj = self._history(plural, ref)
        snap = self.registry.store.get_version(info.kind, obj["metadata"]["uid"], vid)
        if snap is None:
            raise NotFoundError(f"{info.kind} {ref!r} has no version {vid[:40]!r}")
        return self._send(snap, etag=False)

    def delete_version(self, plural, ref, vid):
        info, obj = self._history(plural, ref)
        if not self.registry.store.delete_version(info.kind, obj["metadata"]["uid"], vid):
            raise NotFoundError(f"{info.kind} {ref!r} has no version {vid[:40]!r}")
        return self._send({"message": "version deleted", "uid": vid}, etag=False)

    def restore_version(self, plural, ref, vid):
        info, _ = self._history(plural, ref)
        return self._send(self.registry.restore(info, ref, vid, **self._preconditions()))

    # -- global routes -----------------------------------------------------
    def health(self):
        return self._send(self.health_document(), etag=False)

    def health_document(self) -> dict:
        """Liveness and store health: what start-up could not load, the kinds, workers, and who leads."""
        store, elector = self.registry.store, self.app.elector
        found = store.health() if store is not None else {"quarantined": [], "ignored": []}
        kinds = self.registry.kinds
        return {"status": "degraded" if found["quarantined"] or found["ignored"] else "healthy",
                "service": self.app.service, "version": __version__, "kinds": sorted(kinds),
                "quarantined": found["quarantined"], "ignored": found["ignored"],
                "resourceVersion": str(store.resource_version) if store is not None else "0",
                "workers": {k: i.workers for k, i in kinds.items() if i.has_controller},
                "leader": elector is not None and elector.is_leader(),
                "holderIdentity": None if elector is None else elector.leader}

    def apis(self):
        return self._send(self.registry.discovery(), etag=False)

    def root(self):
        """A browser (Accept names text/html) gets the dashboard (SPEC §11), a JSON client discovery."""
        if "text/html" in bottle.request.environ.get("HTTP_ACCEPT", ""):
            return dashboard_page()
        bottle.response.set_header("Vary", "Accept")
        return self.apis()

    def openapi(self):
        return self._send(openapi_document(self.app), etag=False)

    def docs(self):
        bottle.response.content_type = "text/html; charset=utf-8"
        # the page is self-contained: the policy makes sure it fetches nothing but this server's JSON
        bottle.response.set_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; connect-src 'self'")
        return DOCS_HTML

    def events(self):
        """Server-Sent Events (SPEC §6.8): id = position, event = type, data = the CloudEvent."""
        env = bottle.request.environ
        query = self._query()
        pattern = query.get("type") or "**"
        try:
            compile_pattern(pattern)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        kind = query.get("kind") or None
        if kind is not None:
            kind = self.registry.resolve_kind(kind).kind
        # untyped=true leaves out the event: field, so an EventSource's onmessage receives every type
        typed = query.get("untyped", "").lower() not in ("true", "1", "yes")
        since = self._header("HTTP_LAST_EVENT_ID") or query.get("since")
        position = parse_position(since) if since else None
        store = self.registry.store
        if position is not None and store is not None and position[0] > store.resource_version:
            # no event here ever had that position (a forged id, or one from another data dir): streaming
            # on from it would skip every event up to it without a word
            raise GoneError(f"event {format_position(position)} is newer than every event of this server "
                            f"(resourceVersion {store.resource_version}); re-list and watch from now")
        bus = self.bus
        tap = bus.tap(pattern, kind=kind)       # first, so nothing falls between backlog and live
        try:
            backlog = [] if position is None else [
                (pos, ev) for pos, ev in bus.since(position, kind) if tap.matches(ev["type"])]
        except FabricaError:
            tap.close()
            raise
        res = bottle.response
        res.content_type = "text/event-stream; charset=utf-8"
        res.set_header("Cache-Control", "no-cache")
        res.set_header("X-Accel-Buffering", "no")
        return self._stream(tap, backlog, position or (0, 0), env, typed)

    def event_ticket(self):
        """A stream ticket for GET /events?ticket= (EventSource sends no Authorization header)."""
        bottle.response.set_header("Cache-Control", "no-store")
        return self._send(self.tickets.issue(), etag=False)

    def _stream(self, tap: Tap, backlog, last, env, typed: bool = True):
        sock, server = env.get("fabrica.socket"), env.get("fabrica.server")
        keepalive = self.keepalive
        quiet_since = time.monotonic()
        try:
            yield b": stream open\n\n"
            for pos, event in backlog:
                yield _sse_frame(pos, event, typed)
                last = pos
            while self.app._started and not (server is not None and server.stopping):
                event = tap.get(timeout=min(1.0, keepalive))
                if event is None:
                    if tap.overflowed or tap.closed or _peer_closed(sock):
                        return      # a client resumes with Last-Event-ID
                    if time.monotonic() - quiet_since >= keepalive:
                        quiet_since = time.monotonic()
                        yield b": keep-alive\n\n"
                    continue
                pos = parse_position(event["sequence"])
                if pos <= last:
                    continue        # already sent from the backlog
                last = pos
                quiet_since = time.monotonic()
                yield _sse_frame(pos, event, typed)
        finally:
            tap.close()

    def metrics(self):
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return self.metrics_text().encode()

    def metrics_text(self) -> str:
        """Everything /metrics shows, in the Prometheus text exposition format."""
        out = []

        def family(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        rest, store, bus = self, self.registry.store, self.bus
        family("fabrica_http_requests_total", "counter", "HTTP requests by route, method and status code.",
               [f'fabrica_http_requests_total{{route="{_prom_escape(r)}",method="{_prom_escape(m)}",code="{c}"}} {n}'
                for (r, m, c), n in sorted(rest.requests.items())])
        family("fabrica_http_request_duration_seconds", "histogram", "HTTP request latency.",
               [line for (r, m), h in sorted(rest.latency.items())
                for line in h.render("fabrica_http_request_duration_seconds",
                                     f'route="{_prom_escape(r)}",method="{_prom_escape(m)}"')])
        family("fabrica_store_writes_total", "counter", "Committed store writes.",
               [f"fabrica_store_writes_total {store.writes if store else 0}"])
        family("fabrica_store_write_failures_total", "counter", "Store writes that failed (nothing committed).",
               [f"fabrica_store_write_failures_total {store.write_failures if store else 0}"])
        stats = bus.stats()
        family("fabrica_events_published_total", "counter", "Events published on the bus.",
               [f"fabrica_events_published_total {stats['published']}"])
        family("fabrica_events_dropped_total", "counter", "Events dropped by full subscriber queues.",
               [f"fabrica_events_dropped_total {stats['dropped']}"])
        family("fabrica_event_gaps_total", "counter", "Subscriber gaps (answered by a resync).",
               [f"fabrica_event_gaps_total {stats['gaps']}"])
        family("fabrica_event_ring_events", "gauge", "Events buffered for GET /events resume.",
               [f"fabrica_event_ring_events {stats['buffered']}"])
        family("fabrica_event_ring_bytes", "gauge", "Bytes of the events buffered for GET /events resume.",
               [f"fabrica_event_ring_bytes {stats['bufferedBytes']}"])
        family("fabrica_event_queue_bytes", "gauge", "Bytes of the events waiting in subscriber queues.",
               [f"fabrica_event_queue_bytes {stats['queuedBytes']}"])
        kinds = sorted(self.registry.kinds)
        ctls = self.controllers
        per_kind = {
            "fabrica_queue_depth": ("gauge", "Keys waiting in the work queue.", lambda c: len(c.queue)),
            "fabrica_reconcile_total": ("counter", "Reconcile calls.", lambda c: c.reconciles),
            "fabrica_reconcile_errors_total": ("counter", "Reconcile calls that raised.", lambda c: c.errors),
            "fabrica_reconcile_retries_total": ("counter", "Retries after errors.", lambda c: c.retries),
        }
        for name, (kind, help_text, get) in per_kind.items():
            family(name, kind, help_text, [f'{name}{{kind="{_prom_escape(k)}"}} {get(ctls[k])}'
                                           for k in kinds if k in ctls])
        family("fabrica_reconcile_duration_seconds", "histogram", "Reconcile duration.",
               [line for k in kinds if k in ctls
                for line in ctls[k].durations.render("fabrica_reconcile_duration_seconds",
                                                     f'kind="{_prom_escape(k)}"')])
        objects, not_ready = [], []
        for k in kinds:
            objects.append(f'fabrica_objects{{kind="{_prom_escape(k)}"}} {store.count(k) if store is not None else 0}')
            if not self.registry.kinds[k].has_controller:
                continue        # nothing ever makes these Ready: they would look stuck forever
            items = store.list(k) if store is not None else []
            pending = sum(1 for o in items if not any(
                isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in o["status"].get("conditions") or ()))
            not_ready.append(f'fabrica_objects_not_ready{{kind="{_prom_escape(k)}"}} {pending}')
        family("fabrica_objects", "gauge", "Objects stored, per kind.", objects)
        family("fabrica_objects_not_ready", "gauge", "Objects without condition Ready=True, per kind with a "
               "controller (reconcile or finalize); kinds without one are not listed.", not_ready)
        elector = self.app.elector
        family("fabrica_leader", "gauge", "1 while this process leads (runs the controllers and the garbage "
               "collector's sweeps), else 0; identity is this process's.",
               [f'fabrica_leader{{identity="{_prom_escape(self.app.identity)}"}} '
                f'{int(elector is not None and elector.is_leader())}'])
        return "\n".join(out) + "\n"


###############################################################################
# HTTP server ##################################################################
###############################################################################
#
# The default server: one thread per connection (bounded), HTTP/1.1
# keep-alive, a listen backlog of 1,024, JSON error pages. Bottle's default
# wsgiref server is single-threaded and speaks HTTP/1.0, so one slow client
# stalls everyone and every request reconnects. A connection slot is held
# only by a client that keeps up: the request head has a size cap (enforced
# while reading) and a whole-head deadline, a body a minimum rate, and an idle
# keep-alive connection gives its slot to a new client when all are taken.

MIN_BODY_RATE = 500              # a body has `timeout` s, plus 1 s per this many bytes received


class _DeadlineReader(io.RawIOBase):
    """The raw stream under a connection's rfile: no recv waits past ``deadline``.

    A per-recv socket timeout is no deadline: a client that drips one byte per
    timeout resets it forever (slowloris). Here every recv waits only for what
    is left of the deadline; with ``rate`` set, each byte received extends it
    by 1/rate s (a body must keep up a minimum rate, as Apache's mod_reqtimeout).
    While ``idle`` is set (between requests) the wait for the first byte is
    ``idle(seconds)``: False when the server closed the connection meanwhile.
    """

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout          # the socket's own timeout, which writes use
        self.deadline = math.inf
        self.rate = 0.0
        self.idle: Callable[[float], bool] | None = None

    def start(self, seconds: float, rate: float = 0.0) -> None:
        self.deadline, self.rate = time.monotonic() + seconds, rate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client did not send in time")
        if self.idle is not None and not self.idle(left):
            return 0
        self.sock.settimeout(min(left, self.timeout))
        try:
            n = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)
        if self.rate:
            self.deadline += n / self.rate
        return n


class _HeadTooLarge(Exception):
    """The request head passed MAX_HEAD; ``status`` is 414 (in the request line) or 431."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class _BodyStream:
    """What wsgi.input reads from: the connection's rfile, but the first read
    starts the body's clock and sends a deferred ``100 Continue``. The app
    reads the body only after its checks (token, declared size), so a client
    waiting for the 100 gets a refusal as its final status alone (SPEC §6.7)."""

    def __init__(self, handler: _WSGIRequestHandler):
        self.handler = handler
        self.started = False

    def read(self, size: int = -1) -> bytes:
        self._start()
        return self.handler.rfile.read(size)

    def readline(self, size: int = -1) -> bytes:
        self._start()
        return self.handler.rfile.readline(size)

    def _start(self):
        if not self.started:
            self.started = True
            self.handler.body_started()


class _LimitedReader:
    """wsgi.input for a Content-Length body: never reads past it."""

    def __init__(self, raw, length: int):
        self.raw = raw
        self.left = length

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        self.left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.readline(size)
        self.left -= len(data)
        return data


class _WSGIRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"fabrica/{__version__}"
    timeout = 30                 # seconds an idle connection or a write may take (a body: plus MIN_BODY_RATE)
    idle_since: float | None = None     # since when it waits for a next request; None while busy (server lock)
    evicted = False                     # the server closed it to admit a new client (server lock)
    linger = False                      # closing with client input unread: drain it first (finish)

    def setup(self):
        super().setup()
        self.reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)
        with self.server._conns_changed:
            self.server._conns[self.request] = self

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and not self.server.stopping:
            self.handle_one_request()

    def finish(self):
        super().finish()
        if self.linger:
            # Closing a socket with unread input resets the connection, and the client may lose the
            # error response just sent: stop writing, then drop what it still sends, for a moment.
            sink = bytearray(1 << 16)
            deadline = time.monotonic() + 2.0
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                while (left := deadline - time.monotonic()) > 0:
                    self.connection.settimeout(left)
                    if not self.connection.recv_into(sink):
                        break

    def handle_one_request(self):
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
        self.expect_continue = self.responded = False
        if not self.await_request():
            self.close_connection = True
            return
        try:
            lines = self.read_head()
        except _HeadTooLarge as exc:
            what = "line" if exc.status == 414 else "head"
            self.send_error(exc.status, f"the request {what} is over {MAX_HEAD} bytes")
            return
        except TimeoutError:
            self.send_error(408, f"the request head did not arrive within {self.server.head_timeout:g} s")
            self.linger = False                 # no grace for a client this slow: free its slot now
            return
        except (OSError, ValueError):
            lines = []
        if not lines:
            self.close_connection = True        # the client went away (or was evicted) mid-head
            return
        self.raw_requestline = lines[0]
        rfile, self.rfile = self.rfile, io.BytesIO(b"".join(lines[1:]) + b"\r\n")
        try:
            parsed = self.parse_request()       # the stdlib's parser, over the head already read
        finally:
            self.rfile = rfile
        if not parsed:
            return
        problem = self._framing_problem()
        if problem:
            self.send_error(400, problem)
            return
        try:
            self._run_wsgi()
        except (OSError, ValueError):
            self.close_connection = True

    def await_request(self) -> bool:
        """Wait for the first byte of the next request (at once if it is buffered already);
        False when the connection is done: closed, silent for ``timeout``, or evicted."""
        self.reader.start(self.timeout)
        self.reader.idle = self.wait_idle
        try:
            return bool(self.rfile.peek(1))
        except (OSError, ValueError):
            return False
        finally:
            self.reader.idle = None

    def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the client to send, as an idle connection the server
        may evict (then False). Nothing is read here: while the bytes stay in the socket,
        the server sees them and does not evict (_evict_idle), so no request is half-read."""
        with self.server._conns_changed:
            self.idle_since = time.monotonic()
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        ready = poller.poll(seconds * 1000)
        with self.server._conns_changed:
            self.idle_since = None
            if self.evicted:
                return False
        if not ready:
            raise TimeoutError("the connection was idle too long")
        return True

    def read_head(self) -> list[bytes]:
        """The request line and header lines, all within ``head_timeout`` of the first byte
        and at most MAX_HEAD bytes of them: the server never buffers more, whatever the
        client sends. [] when the client closed mid-head; raises _HeadTooLarge, TimeoutError."""
        self.reader.start(self.server.head_timeout)
        lines, size = [], 0
        while True:
            line = self.rfile.readline(MAX_HEAD + 1 - size)
            size += len(line)
            if size > MAX_HEAD:
                raise _HeadTooLarge(431 if lines else 414)
            if not line.endswith(b"\n"):
                return []
            if line in (b"\r\n", b"\n"):
                if lines:
                    return lines
                continue        # an empty line before the request line is ignored (RFC 9112 §2.2)
            lines.append(line)

    def handle_expect_100(self):
        # parse_request calls this on "Expect: 100-continue". The 100 waits for the app's first
        # body read (_BodyStream), which comes after its checks: a refusal is sent alone.
        self.expect_continue = True
        return True

    def body_started(self):
        """The app reads the body: start its clock, send the deferred 100 Continue."""
        self.reader.start(self.timeout, MIN_BODY_RATE)
        if self.expect_continue and not self.responded:
            self.expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _framing_problem(self) -> str | None:
        """Why the body's framing is ambiguous (a request-smuggling risk), or None."""
        lengths = [v.strip() for h in self.headers.get_all("Content-Length") or () for v in h.split(",")]
        codings = [v.strip().lower() for h in self.headers.get_all("Transfer-Encoding") or () for v in h.split(",")]
        if codings:
            if codings[-1] != "chunked" or codings.count("chunked") != 1:
                return "unsupported Transfer-Encoding: the last coding must be chunked"
            if lengths:
                self.close_connection = True        # RFC 9112: chunked wins; do not reuse the connection
            return None
        if lengths and (len(set(lengths)) != 1 or not all(v.isdigit() and v.isascii() for v in lengths)):
            return "invalid or conflicting Content-Length"
        return None

    def send_error(self, code, message=None, explain=None):
        # The stdlib writes an HTML page here; fabrica answers JSON everywhere.
        self.responded = self.linger = True
        body = dumps({"error": message or self.responses.get(code, ("error",))[0], "code": code,
                      "details": []}).encode()
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", JSON_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, format, *args):
        # the arguments hold the request line as the client sent it
        http_log.debug("%s - %s", self.address_string(), _one_line(format % args))

    def _environ(self):
        path, _, query = self.path.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        env = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"), "QUERY_STRING": query,
            "SERVER_NAME": self.server.server_name, "SERVER_PORT": str(self.server.server_port),
            "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "wsgi.input_terminated": True, "fabrica.socket": self.connection, "fabrica.server": self.server,
        }
        for key, value in self.headers.items():
            if "_" in key:
                continue        # X_Foo would alias X-Foo in the environ: drop it, as nginx does
            key = key.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            env[key] = env[key] + "," + value if key in env else value
        if "HTTP_TRANSFER_ENCODING" in env:            # checked by _framing_problem: ends in chunked
            env["wsgi.input"] = _ChunkedReader(_BodyStream(self))
            env.pop("CONTENT_LENGTH", None)
        else:
            length = env.get("CONTENT_LENGTH", "0").split(",")[0].strip()
            env["CONTENT_LENGTH"] = length
            env["wsgi.input"] = _LimitedReader(_BodyStream(self), int(length) if length.isdigit() else 0)
        return env

    def _run_wsgi(self):
        env = self._environ()
        state = {}

        def start_response(status, headers, exc_info=None):
            if exc_info and state.get("sent"):
                raise exc_info[1].with_traceback(exc_info[2])
            state["status"], state["headers"] = status, headers
            return lambda data: self._write(state, data)

        result = self.server.app(env, start_response)
        try:
            if isinstance(result, (list, tuple)):
                body = b"".join(result)
                self._write(state, body, length=len(body), last=True)
            else:
                for chunk in result:
                    if chunk:
                        self._write(state, chunk)
                self._write(state, b"", last=True)
        finally:
            if hasattr(result, "close"):
                result.close()
        reader = env["wsgi.input"]
        if env.get("fabrica.close") or not isinstance(reader, _LimitedReader) or reader.left > 0:
            # an unread body (or a chunked one) leaves the stream out of step: do not reuse it
            if not (isinstance(reader, _ChunkedReader) and reader.done):
                self.close_connection = self.linger = True

    def _write(self, state, data: bytes, *, length: int | None = None, last: bool = False):
        if not state.get("sent"):
            state["sent"] = self.responded = True
            code = int(state["status"][:3])
            headers = state["headers"]
            names = {k.lower() for k, _ in headers}
            lines = [f"HTTP/1.1 {state['status']}\r\n"]
            lines += [f"{k}: {v}\r\n" for k, v in headers]
            if "server" not in names:
                lines.append(f"Server: {self.server_version}\r\n")
            no_body = code in (204, 304) or code < 200 or self.command == "HEAD"
            state["chunked"] = False
            if "content-length" not in names and not no_body:
                if length is not None:
                    lines.append(f"Content-Length: {length}\r\n")
                else:
                    lines.append("Transfer-Encoding: chunked\r\n")
                    state["chunked"] = True
            if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers) or \
                    self.close_connection or self.server.stopping:
                self.close_connection = True
                if "connection" not in names:
                    lines.append("Connection: close\r\n")
            lines.append("\r\n")
            state["no_body"] = no_body
            head = "".join(lines).encode("latin-1")
            if no_body:
                self.wfile.write(head)
                return
            if not state["chunked"]:
                self.wfile.write(head + data)
                return
            self.wfile.write(head)
        if state["no_body"]:
            return
        if state["chunked"]:
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if last:
                self.wfile.write(b"0\r\n\r\n")
        elif data:
            self.wfile.write(data)


class ThreadedWSGIServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A bounded thread-per-connection WSGI server; ``stop()`` drains in-flight requests.

    At most ``max_threads`` connections: when all are taken, the one idle
    longest (waiting ``idle_grace`` seconds or more for its next request) is
    closed to admit a new client; only when none is idle is the new client
    answered 503 at once. A client must send its whole request head within ``head_timeout``
    seconds of its first byte; ``timeout`` bounds an idle keep-alive
    connection and a write, and a body has ``timeout`` seconds plus one per
    MIN_BODY_RATE bytes received.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False
    idle_grace = 1.0            # seconds without a request before a connection may be evicted

    def __init__(self, address, app, *, max_threads: int = 256, timeout: float = 30.0,
                 head_timeout: float = 10.0):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        self.stopping = False
        self.stop_requested = 0
        self.head_timeout = head_timeout
        self._slots = threading.BoundedSemaphore(max_threads)
        self._conns: dict[socket.socket, _WSGIRequestHandler] = {}
        # guards _conns and its handlers' idle_since and evicted
        self._conns_changed = threading.Condition(threading.Lock())
        handler = type("WSGIRequestHandler", (_WSGIRequestHandler,), {"timeout": timeout})
        super().__init__(address, handler)
        self.server_name = host
        self.server_port = self.server_address[1]

    def process_request(self, request, client_address):
        # all slots taken: an idle keep-alive connection gives way (its thread exits at once)
        if not (self._slots.acquire(blocking=False) or (self._evict_idle() and self._slots.acquire(timeout=2.0))):
            with contextlib.suppress(OSError):
                body = dumps({"error": "server busy: too many open connections; retry", "code": 503,
                              "details": []}).encode()
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _evict_idle(self) -> bool:
        """Close the connection idle longest whose next request has not begun; False if none is idle.

        A connection with bytes to read is not idle: its request has come. One
        that arrives between that check and the close is lost as when an idle
        timeout closes a connection (RFC 9112 §9.6), and clients retry it; the
        grace spares the clients that send requests back to back that race.
        """
        idle_before = time.monotonic() - self.idle_grace
        with self._conns_changed:
            idle = sorted((h.idle_since, n, sock, h) for n, (sock, h) in enumerate(self._conns.items())
                          if h.idle_since is not None and h.idle_since <= idle_before)
            for _, _, sock, handler in idle:
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if poller.poll(0):
                    continue
                handler.evicted = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return True
        return False

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conns_changed:
                self._conns.pop(request, None)
                self._conns_changed.notify_all()
            self._slots.release()

    def open_connections(self) -> int:
        return len(self._conns)

    def service_actions(self):
        # called by serve_forever between polls: a signal handler only sets stop_requested
        if self.stop_requested:
            self._BaseServer__shutdown_request = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close idle connections."""
        if self.stopping:
            return
        self.stopping = True
        self.shutdown()
        self.server_close()
        deadline = time.monotonic() + timeout
        with self._conns_changed:
            while self._conns and time.monotonic() < deadline:
                for sock, handler in list(self._conns.items()):
                    if handler.idle_since is not None:      # waiting for a next request that will not come
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                self._conns_changed.wait(0.05)


def _env(name: str, default=None):
    return os.environ.get("FABRICA_" + name, default)


# serve's settings that FABRICA_* variables give: name -> (variable, type); `serve --help` lists them
_SERVE_ENV = {"data_dir": ("DATA_DIR", str), "database_url": ("DATABASE_URL", str), "host": ("HOST", str),
              "port": ("PORT", int), "token": ("TOKEN", str), "workers": ("WORKERS", int),
              "no_fsync": ("NO_FSYNC", bool), "wsgi_server": ("WSGI_SERVER", str),
              "max_threads": ("MAX_THREADS", int), "head_timeout": ("HEAD_TIMEOUT", float),
              "cors": ("CORS", str), "log_level": ("LOG_LEVEL", str)}


def _env_settings() -> dict:
    """The serve settings the environment sets (only those), typed; ConfigurationError names a bad one."""
    found = {}
    for key, (name, kind) in _SERVE_ENV.items():
        value = _env(name)
        if value in (None, ""):
            continue
        if kind is bool:
            found[key] = value.lower() not in ("0", "false", "no", "off")
            continue
        try:
            found[key] = kind(value)
        except ValueError:
            raise ConfigurationError(f"FABRICA_{name}={value!r} is not a valid {kind.__name__}") from None
    return found


def serve_wsgi(wsgi, host: str, port: int, *, server: str | None = None, max_threads: int = 256,
               head_timeout: float = 10.0, max_body: int = MAX_BODY, ready: Callable[[str], str] = str) -> None:
    """Serve ``wsgi`` on ``host``:``port`` until SIGINT/SIGTERM (in the main thread), then drain.

    ``server`` names the WSGI server: None/"fabrica" for ThreadedWSGIServer,
    "granian" (in this process), or a Bottle adapter ("waitress",
    "cheroot", "gunicorn") when installed. ``max_threads`` bounds the
    connections (or the app threads), ``head_timeout`` the seconds a client
    has to send a request head, ``max_body`` the body bytes waitress takes,
    on the servers that have such a setting. ``ready(url)`` is the line
    logged once the server answers. Raises ConfigurationError for an
    unknown or missing server and OSError when the address cannot be bound.
    """
    if server in (None, "", "fabrica", "auto"):
        _serve_builtin(wsgi, host, port, max_threads, head_timeout, ready)
    elif server == "granian":
        _serve_granian(wsgi, host, port, max_threads, head_timeout, ready)
    elif server == "waitress":
        # waitress reads a whole request (spooling a body to disk) before the app sees it, so
        # its own limits guard memory and disk; channel_timeout closes a connection silent that
        # long with no request running (idle, or a stalled head or body), checked every second
        _serve_adapter(wsgi, server, host, port, ready, connection_limit=max_threads,
                       channel_timeout=max(1, math.ceil(head_timeout)), cleanup_interval=1,
                       max_request_header_size=MAX_HEAD, max_request_body_size=max_body + 1)
    else:
        _serve_adapter(wsgi, server, host, port, ready)


def _serve_builtin(wsgi, host, port, max_threads, head_timeout, ready):
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    try:
        httpd = ThreadedWSGIServer((host.strip("[]"), port), wsgi, max_threads=max_threads,
                                   head_timeout=head_timeout)
    except OSError as exc:
        hint = ("another process has it; choose another port (--port, FABRICA_PORT)"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        raise OSError(exc.errno, f"cannot listen on http://{shown}:{port}: {exc.strerror}; {hint}") from None
    def on_signal(signum, frame):
        # only a plain assignment here: a handler that takes locks can deadlock when a second
        # signal interrupts the first; serve_forever's loop notices the flag (service_actions)
        httpd.stop_requested = signum
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    http_log.info("%s", ready(f"http://{shown}:{httpd.server_port}"))
    try:
        httpd.serve_forever(poll_interval=0.2)
        if httpd.stop_requested:
            http_log.info("signal %d: stopping (finishing in-flight requests)", httpd.stop_requested)
    finally:
        httpd.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_granian(wsgi, host, port, max_threads, head_timeout, ready):
    """Serve with granian (a Rust HTTP server) in THIS process, so the store lock and controllers stay here.

    granian normally runs WSGI apps in worker processes; its thread-worker
    server is made for free-threaded Pythons and refuses a GIL build, a
    check we skip: the worker is a thread that calls into this process's
    app like any other WSGI server thread.
    """
    try:
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings
        from granian.server.mt import MTServer
    except ImportError:
        raise ConfigurationError("--server granian needs granian: pip install granian") from None

    class InProcessGranian(MTServer):
        def _check_gil(self):
            pass
    # hyper's header_read_timeout is a whole-head deadline; its read buffer caps the head (431 past it)
    http1 = HTTP1Settings(header_read_timeout=max(1, round(head_timeout * 1000)), max_buffer_size=MAX_HEAD)
    server = InProcessGranian("fabrica:app", address=host.strip("[]"), port=port, interface=Interfaces.WSGI,
                              workers=1, blocking_threads=max(1, min(max_threads, 64)), http1_settings=http1,
                              log_enabled=False)
    # logged from granian's start-up hook: by then its signal handlers and socket are in place
    server.on_startup(lambda: http_log.info("%s via granian", ready(f"http://{host}:{port}")))
    server.serve(target_loader=lambda *args, **kwargs: wsgi, wrap_loader=False)


def _serve_adapter(wsgi, name, host, port, ready, **options):
    adapter = bottle.server_names.get(name)
    if adapter is None:
        raise ConfigurationError(f"unknown WSGI server {name!r}; try one of: fabrica, waitress, cheroot, gunicorn")

    def on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)     # once: a second one must not cut the shutdown short
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
    try:
        # inside the try: a SIGTERM right after this line (a supervisor's, a test's) is a clean stop
        http_log.info("%s via %s", ready(f"http://{host}:{port}"), name)
        bottle.run(wsgi, server=adapter, host=host, port=port, quiet=True, **options)
    except ImportError as exc:
        raise ConfigurationError(f"--server {name}: {exc}; install it (pip install {name})") from None
    except KeyboardInterrupt:
        pass


###############################################################################
# Clients ######################################################################
###############################################################################
#
# app.client (in process) and Client (HTTP) have the same methods and raise
# the same exceptions. Both hand out Resource copies: editing one never
# touches the store until it is written back.


def _controller_ref(owner: dict) -> dict:
    """The ownerReference that makes ``owner`` (an object) the controller of a new object."""
    return {"kind": owner["kind"], "uid": owner["metadata"]["uid"], "controller": True}


def _owner_object(client, owner, creating: str | None = None) -> dict:
    """The object an ``owner=`` argument names: a Resource as it is, or a ``(kind, ref)`` tuple (a uid
    or a name) read with ``client.get``.

    A missing ``(kind, ref)`` owner raises NotFoundError, or, when ``creating`` (the new object's kind),
    ConflictError as the server answers for a gone owner. Anything else is a TypeError.
    """
    if isinstance(owner, dict):
        meta = owner.get("metadata")
        if isinstance(owner.get("kind"), str) and isinstance(meta, dict) and isinstance(meta.get("uid"), str):
            return owner
    elif isinstance(owner, tuple) and len(owner) == 2 and all(isinstance(part, str) for part in owner):
        try:
            return client.get(*owner)
        except NotFoundError:
            if creating is None:
                raise
            raise ConflictError(f"cannot create a {creating} owned by {owner[0]} {owner[1]!r}: "
                                "the owner does not exist") from None
    raise TypeError(f"owner must be an object (a Resource, as get() returns) or a (kind, ref) tuple "
                    f"like ('Rack', 'rack-a'), not {type(owner).__name__} {_one_line(repr(owner))[:60]}")


class LocalClient:
    """The in-process client: every write takes exactly the REST path (the Registry: validation, events, rv)."""

    def __init__(self, registry: Registry):
        self._registry = registry

    def _info(self, kind: str) -> KindInfo:
        return self._registry.resolve_kind(kind)

    def _out(self, obj) -> Resource:
        return Resource(deepcopy_json(obj))

    def get(self, kind: str, ref: str) -> Resource:
        """The object (uid or name); NotFoundError if missing."""
        return self._out(self._registry.get(self._info(kind), ref))

    def list(self, kind: str, selector: str | None = None, limit: int | None = None,
             owner: dict | tuple | None = None) -> list[Resource]:
        """Every object of a kind, by name; ``selector`` is a label selector; ``owner`` (an object, or a
        ``(kind, ref)`` tuple) keeps the ones whose ownerReferences name it (one of their owners)."""
        info = self._info(kind)
        self._registry.require_started()
        store, sel = self._registry.store, parse_selector(selector) if selector else None
        if owner is not None:
            owner = _owner_object(self, owner)
        if owner is None:
            items = store.query(info.kind, sel, limit=limit)[0]
        else:       # from the owner index: O(dependents), not O(objects of the kind)
            found = (store.get(k, uid) for k, uid in store.dependents(owner["kind"], owner["metadata"]["uid"])
                     if k == info.kind)
            items = sorted((o for o in found if o is not None and (sel is None or
                                                                    sel.matches(o["metadata"]["labels"]))),
                           key=lambda o: o["metadata"]["name"])[:limit]
        return [self._out(o) for o in items]

    def create(self, kind: str, name: str | None = None, spec: dict | None = None, labels: dict | None = None,
               annotations: dict | None = None, owner: dict | tuple | None = None,
               finalizers: list | None = None) -> Resource:
        """Create an object; ``owner`` (an object, or a ``(kind, ref)`` tuple) makes it the controller
        owner (409 if it is gone or being deleted)."""
        info = self._info(kind)
        owners = None if owner is None else [_controller_ref(_owner_object(self, owner, info.kind))]
        return self._out(self._registry.create(info, name=name, spec=spec or {}, labels=labels,
                                               annotations=annotations, finalizers=finalizers,
                                               owner_references=owners))

    def update(self, obj: dict) -> Resource:
        """PUT the envelope (spec, labels, annotations, finalizers) guarded by its resourceVersion.

        A stale one raises PreconditionFailedError.
        """
        info = self._info(obj["kind"])
        meta = obj["metadata"]
        rv = meta.get("resourceVersion")
        return self._out(self._registry.update(
            info, meta["uid"] if meta.get("uid") else meta["name"], name=meta.get("name"),
            spec=obj.get("spec", {}), labels=meta.get("labels"), annotations=meta.get("annotations"),
            finalizers=meta.get("finalizers"), if_match=(rv,) if rv else None))

    def patch(self, kind: str, ref: str, patch, type: str = "merge") -> Resource:
        """Patch the spec with a merge patch, a JSON Patch (``type="json"``) or a shorthand patch."""
        return self._out(self._registry.patch(self._info(kind), ref, patch, type))

    def update_status(self, kind: str, ref: str, status: dict) -> Resource:
        """Replace the status (no generation bump)."""
        return self._out(self._registry.update_status(self._info(kind), ref, status))

    def patch_status(self, kind: str, ref: str, patch, type: str = "merge") -> Resource:
        return self._out(self._registry.patch(self._info(kind), ref, patch, type, status=True))

    def delete(self, kind: str, ref: str, force: bool = False) -> Resource | None:
        """Delete; returns None when gone, or the object when finalizers are pending (a 202)."""
        obj, gone = self._registry.delete(self._info(kind), ref, force=force)
        return None if gone else self._out(obj)

    def _history(self, kind, ref):
        info = self._info(kind)
        if not info.history_on:
            raise NotFoundError(f"{info.kind} keeps no spec history (register it with history=True)")
        return info, self.get(info.kind, ref).uid

    def versions(self, kind: str, ref: str) -> list[dict]:
        """The spec snapshots of an object (``history=`` kinds), oldest first."""
        info, uid = self._history(kind, ref)
        return deepcopy_json(self._registry.store.versions(info.kind, uid))

    def get_version(self, kind: str, ref: str, version_id: str) -> dict:
        info, uid = self._history(kind, ref)
        snap = self._registry.store.get_version(info.kind, uid, str(version_id))
        if snap is None:
            raise NotFoundError(f"{info.kind} {ref!r} has no version {version_id!r}")
        return deepcopy_json(snap)

    def delete_version(self, kind: str, ref: str, version_id: str) -> None:
        info, uid = self._history(kind, ref)
        if not self._registry.store.delete_version(info.kind, uid, str(version_id)):
            raise NotFoundError(f"{info.kind} {ref!r} has no version {version_id!r}")

    def restore_version(self, kind: str, ref: str, version_id: str) -> Resource:
        """Write that version's spec back as a new spec write."""
        info, _ = self._history(kind, ref)
        return self._out(self._registry.restore(info, ref, str(version_id)))


class ConnectionFailedError(FabricaError):
    """The HTTP Client could not reach the server (no HTTP status)."""

    status = 0


_PATCH_MEDIA = {"merge": MERGE_PATCH, "json": JSON_PATCH, "shorthand": SHORTHAND_PATCH}


class Client:
    """The HTTP client: the same methods and exceptions as ``app.client``, stdlib only.

    One keep-alive connection per thread. Errors raise the FabricaError
    subclass of the HTTP status, carrying the server's message and details;
    an unreachable server raises ConnectionFailedError.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(base_url if "://" in base_url else "http://" + base_url)
        if parts.scheme not in ("http", "https"):
            raise ConfigurationError(f"unsupported URL scheme in {base_url!r}")
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self._scheme, self._netloc, self._prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._local = threading.local()
        self._plurals: dict[str, str] = {}

    # -- transport ---------------------------------------------------------------
    def _connection(self, fresh: bool = False, timeout: float | None = None):
        import http.client
        conn = None if fresh else getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._netloc, timeout=timeout or self.timeout)
            if timeout is None:
                self._local.conn = conn
        return conn

    def _headers(self, extra=None) -> dict:
        headers = {"Accept": JSON_TYPE}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                content_type: str = JSON_TYPE):
        """One request; returns (status, headers, decoded JSON or None). Raises on 4xx/5xx."""
        import http.client
        payload = None if body is None else dumps(body).encode()
        hdrs = self._headers(headers)
        if payload is not None:
            hdrs["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = self._connection()
            reused = getattr(conn, "sock", None) is not None
            try:
                conn.request(method, self._prefix + path, payload, hdrs)
                res = conn.getresponse()
                data = res.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                self._local.conn = None
                if reused and attempt == 1:
                    continue        # the server closed an idle keep-alive connection: once more
                raise ConnectionFailedError(f"cannot connect to {self.base_url}: {exc}") from None
            except OSError as exc:
                conn.close()
                self._local.conn = None
                raise ConnectionFailedError(f"cannot connect to {self.base_url}: {exc.strerror or exc}") from None
        if res.getheader("Connection", "").lower() == "close":
            conn.close()
            self._local.conn = None
        value = None
        if data and "json" in (res.getheader("Content-Type") or ""):
            value = json.loads(data)
        if res.status >= 400:
            if isinstance(value, dict) and "error" in value:
                raise error_for_status(res.status, value["error"], value.get("details"),
                                       res.getheader("X-Error-Class"))
            raise error_for_status(res.status, f"HTTP {res.status} {res.reason}")
        return res.status, res, value

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- kinds -------------------------------------------------------------------
    def kinds(self) -> list[dict]:
        """The server's discovery document (GET /apis): kind, plural, prefix, ..."""
        return self.request("GET", "/apis")[2]["kinds"]

    def _plural(self, kind: str) -> str:
        low = kind.lower()
        plural = self._plurals.get(low)
        if plural is None:
            for info in self.kinds():
                self._plurals[info["kind"].lower()] = self._plurals[info["plural"]] = info["plural"]
            plural = self._plurals.get(low)
            if plural is None:
                raise NotFoundError(f"the server has no kind {kind!r}; `kinds` lists them")
        return plural

    def _ref(self, kind, ref) -> str:
        return f"/{self._plural(kind)}/{urllib.parse.quote(str(ref), safe='')}"

    # -- the app.client methods --------------------------------------------------
    def get(self, kind: str, ref: str) -> Resource:
        return Resource(self.request("GET", self._ref(kind, ref))[2])

    def list(self, kind: str, selector: str | None = None, limit: int | None = None,
             owner: dict | tuple | None = None) -> list[Resource]:
        """Objects by name; without ``limit`` every page is fetched (following ``continue``).

        ``owner`` (an object, or a ``(kind, ref)`` tuple) keeps the ones whose ownerReferences name
        it; the REST API has no such filter, so every page is read and filtered here.
        """
        if owner is not None:
            owner = _owner_object(self, owner)
            key = (owner["kind"], owner["metadata"]["uid"])
            items = [o for o in self.list(kind, selector)
                     if any((r.get("kind"), r.get("uid")) == key for r in o["metadata"]["ownerReferences"])]
            return items if limit is None else items[:limit]
        params = {}
        if selector:
            params["labelSelector"] = selector
        params["limit"] = str(limit or 500)
        out = []
        while True:
            _, res, items = self.request("GET", f"/{self._plural(kind)}?{urllib.parse.urlencode(params)}")
            out.extend(Resource(i) for i in items)
            token = res.getheader("X-Continue")
            if limit is not None or not token:
                return out
            params["continue"] = token

    def create(self, kind: str, name: str | None = None, spec: dict | None = None, labels: dict | None = None,
               annotations: dict | None = None, owner: dict | tuple | None = None,
               finalizers: list | None = None) -> Resource:
        meta = {k: v for k, v in (("name", name), ("labels", labels), ("annotations", annotations),
                                  ("finalizers", finalizers)) if v is not None}
        if owner is not None:
            meta["ownerReferences"] = [_controller_ref(_owner_object(self, owner, kind))]
        return Resource(self.request("POST", f"/{self._plural(kind)}", {"metadata": meta, "spec": spec or {}})[2])

    def update(self, obj: dict) -> Resource:
        meta = obj["metadata"]
        body = {"metadata": {k: meta[k] for k in ("name", "labels", "annotations", "finalizers") if k in meta},
                "spec": obj.get("spec", {})}
        headers = {"If-Match": f'"{meta["resourceVersion"]}"'} if meta.get("resourceVersion") else {}
        return Resource(self.request("PUT", self._ref(obj["kind"], meta.get("uid") or meta["name"]), body,
                                     headers)[2])

    def patch(self, kind: str, ref: str, patch, type: str = "merge") -> Resource:
        return Resource(self.request("PATCH", self._ref(kind, ref), patch, content_type=self._media(type))[2])

    def update_status(self, kind: str, ref: str, status: dict) -> Resource:
        return Resource(self.request("PUT", self._ref(kind, ref) + "/status", status)[2])

    def patch_status(self, kind: str, ref: str, patch, type: str = "merge") -> Resource:
        return Resource(self.request("PATCH", self._ref(kind, ref) + "/status", patch,
                                     content_type=self._media(type))[2])

    def delete(self, kind: str, ref: str, force: bool = False) -> Resource | None:
        status, _, body = self.request("DELETE", self._ref(kind, ref) + ("?force=true" if force else ""))
        return Resource(body) if status == 202 else None

    def versions(self, kind: str, ref: str) -> list[dict]:
        return self.request("GET", self._ref(kind, ref) + "/versions")[2]

    def get_version(self, kind: str, ref: str, version_id: str) -> dict:
        return self.request("GET", self._ref(kind, ref) + f"/versions/{urllib.parse.quote(str(version_id))}")[2]

    def delete_version(self, kind: str, ref: str, version_id: str) -> None:
        self.request("DELETE", self._ref(kind, ref) + f"/versions/{urllib.parse.quote(str(version_id))}")

    def restore_version(self, kind: str, ref: str, version_id: str) -> Resource:
        path = self._ref(kind, ref) + f"/versions/{urllib.parse.quote(str(version_id))}/restore"
        return Resource(self.request("POST", path)[2])

    @staticmethod
    def _media(type: str) -> str:
        if type not in _PATCH_MEDIA:
            raise ValueError(f"patch type must be merge, json or shorthand, not {type!r}")
        return _PATCH_MEDIA[type]

    def watch(self, pattern: str = "**", since: str | None = None, kind: str | None = None,
              *, reconnect: bool = True, idle_timeout: float = 60.0):
        """Iterate CloudEvents from GET /events; after a dropped connection it reconnects with Last-Event-ID.

        Raises GoneError when the server no longer has the events after ``since``.
        """
        import http.client
        last = since
        params = {"type": pattern}
        if kind:
            params["kind"] = kind
        while True:
            conn = self._connection(fresh=True, timeout=idle_timeout)
            headers = self._headers({"Accept": "text/event-stream"})
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                conn.request("GET", f"{self._prefix}/events?{urllib.parse.urlencode(params)}", headers=headers)
                res = conn.getresponse()
                if res.status >= 400:
                    body = json.loads(res.read() or b"{}")
                    raise error_for_status(res.status, body.get("error", f"HTTP {res.status}"), body.get("details"))
                event_id, data = None, []
                while True:
                    line = res.fp.readline()
                    if not line:
                        break           # the server closed the stream
                    line = line.decode("utf-8").rstrip("\r\n")
                    if not line:
                        if data:
                            event = json.loads("\n".join(data))
                            last = event_id or last
                            yield event
                        event_id, data = None, []
                    elif line.startswith("id:"):
                        event_id = line[3:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
            except (OSError, http.client.HTTPException) as exc:
                if not reconnect:
                    raise ConnectionFailedError(f"event stream from {self.base_url} broke: {exc}") from None
            finally:
                conn.close()
            if not reconnect:
                return
            time.sleep(0.2)     # reconnect pause (client side; no busy loop against a down server)


###############################################################################
# Fabrica ######################################################################
###############################################################################
#
# The facade: register() wires a kind into the registry, the REST routes,
# the bus and (with a reconcile function) a controller; start() and stop()
# run them. The controllers and the garbage collector's sweeps run while
# the store's LeaderElector says this process leads.


class Fabrica:
    """One application: kinds, a store, a bus, controllers, a REST API and clients.

    ``Fabrica(data_dir="./data")`` keeps resources as JSON files (the default);
    ``durable=False`` skips fsync; ``store=`` takes any Store. The store is
    opened by start() (or serve()), not here, so serve's flags can override it.
    ``max_body`` (1 MiB) caps a request body and also every object a write
    stores, measured as compact JSON, whatever produced it (SPEC §6.4).
    ``ring_size`` and ``ring_bytes``, when given, bound the in-memory change
    feed of a MemoryStore or FileStore (otherwise its own bounds: 10,000
    changes, 64 MiB), which serves ``GET /events`` resume. Every write goes through ``registry``, the
    Registry; the controllers run while the store's LeaderElector
    (``elector``, made by start()) says this process leads.
    """

    def __init__(self, data_dir: str = "./data", *, durable: bool = True, store: Store | None = None,
                 database_url: str | None = None, token: str | None = None, event_prefix: str = "io.fabrica",
                 event_source: str = "", ring_size: int | None = None, ring_bytes: int | None = None,
                 max_body: int = MAX_BODY, service: str = "fabrica", open: bool = False, clock=time.monotonic,
                 cors: str | None = None):
        self.clock = clock
        self.data_dir = data_dir
        self.durable = durable
        self.database_url = database_url
        self.token = token or None
        self.cors = cors or None
        self.event_prefix = event_prefix
        self.event_source = event_source
        self.service = service
        self.open = open
        self.registry = Registry(max_body=max_body, open=open, clock=clock)
        self.registry.store = store
        self.kinds = self.registry.kinds            # kind -> KindInfo (the registry's own dict)
        self.ring_size, self.ring_bytes = ring_size, ring_bytes
        self.bus = Bus()
        self.identity = f"{socket.gethostname()}-{os.getpid()}"    # this process, to leader election
        self.elector: LeaderElector | None = None   # the store's, made by start()
        self._started = False
        self._stopping = False
        self._leading = threading.Lock()            # leadership transitions one at a time; stop() takes it too
        self._app_name = "app"                      # what serve()'s ready line calls this app
        self._controllers: dict[str, Controller] = {}   # changed in place: the REST API reads it for /metrics
        self.rest = RestAPI(self, self.registry, self.bus, self._controllers)
        self.wsgi = self.rest.wsgi
        self.client = LocalClient(self.registry)
        if open:
            self.rest.mount(None)

    @property
    def store(self) -> Store | None:
        """The Store (the registry's); None until start() makes the default one."""
        return self.registry.store

    @store.setter
    def store(self, store: Store | None) -> None:
        self.registry.store = store

    @property
    def max_body(self) -> int:
        """The bytes a request body, and every object a write stores, may have (the registry's limit)."""
        return self.registry.max_body

    @max_body.setter
    def max_body(self, value: int) -> None:
        self.registry.max_body = value

    @property
    def gc(self) -> GarbageCollector | None:
        """The registry's GarbageCollector, made by start()."""
        return self.registry.gc

    # -- wiring --------------------------------------------------------------
    def register(self, kind: str, reconcile=None, **options):
        """Declare a kind: store, REST routes, events and, with ``reconcile``, a controller.

        Works as a plain call and as a decorator (``@app.register("Rack")``).
        Options: plural, prefix, spec, status, validate, owns, watches,
        finalize, workers, resync, timeout, history. Raises
        ConfigurationError when the kind exists, the app has started, or an
        option is invalid.
        """
        if self._started:
            raise ConfigurationError(f"register({kind!r}) after start(): register every kind before starting")
        info = self._declare(kind, reconcile, options)

        def decorator(fn):
            if info.reconcile is not None:
                raise ConfigurationError(f"{kind} already has a reconcile function")
            info.reconcile = fn
            return fn
        return reconcile if reconcile is not None else decorator

    def _declare(self, kind, reconcile, options, *, mount=True) -> KindInfo:
        info = self.registry.declare(kind, reconcile, **options)
        if mount:
            self.rest.mount(info.plural, info.history_on)
        return info

    def resolve_kind(self, name: str) -> KindInfo:
        """A kind by name or plural, in any case (``rack``, ``Racks``, ``RACK``)."""
        return self.registry.resolve_kind(name)

    # -- life cycle ------------------------------------------------------------
    def configure_store(self, *, data_dir: str | None = None, durable: bool | None = None,
                        database_url: str | None = None) -> None:
        """Override the store settings before start() (what ``serve``'s flags do)."""
        if self._started:
            raise ConfigurationError("configure_store() after start()")
        if data_dir is not None:
            self.data_dir, self.store, self.database_url = data_dir, None, None
        if database_url is not None:
            self.database_url, self.store = database_url, None
        if durable is not None:
            self.durable = durable
            if self.store is not None:
                self.store.durable = durable

    def _make_store(self) -> Store:
        if self.database_url:
            if parse_database_url(self.database_url)[0] != "sqlite":
                raise ConfigurationError(
                    f"database_url {self.database_url!r}: the PostgreSQL store is not available in "
                    f"fabrica {__version__}; use sqlite:///path/app.db or data_dir= (the JSON file store)")
            return SQLiteStore.from_url(self.database_url, durable=self.durable)
        return FileStore(self.data_dir, durable=self.durable)

    def start(self) -> Fabrica:
        """Open the store (lock, recovery, load), start the bus, the registry and leader election; no HTTP.

        The controllers (and the garbage collector's start-up sweeps) start
        when the store's elector says this process leads: at once for a store
        one process opens.
        """
        if self._started:
            return self
        self.registry.check_wiring()
        if self.store is None:
            self.store = self._make_store()
        if isinstance(self.store, IndexedStore):     # a database store keeps its feed as it is configured to
            if self.ring_size is not None:
                self.store.feed_size = self.ring_size
            if self.ring_bytes is not None:
                self.store.feed_bytes = self.ring_bytes
        self.store.open({k.kind: k.plural for k in self.kinds.values()}, discover=self.open)
        strangers = [kind for kind in self.store.discovered if kind not in self.kinds]
        for kind in strangers:
            self._declare(kind, None, {"plural": self.store.discovered[kind]}, mount=not self.open)
        if strangers:
            logger.warning("the store holds kinds this app does not register: %s; they are served without a schema "
                           "or a controller (serve the app that registers them to validate and reconcile them)",
                           ", ".join(sorted(strangers)))
        self.bus.attach(self.store, prefix=self.event_prefix, source=self.event_source)
        self._started = True
        self.registry.start()
        self.elector = self.store.leader_elector(self.identity)
        self.elector.start(self._started_leading, self._stopped_leading)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop controllers (running reconciles get ctx.stopping), give leadership up, stop the garbage
        collector and the bus, then close the store."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        with self._leading:
            self._stopping = True       # no leadership gained from now on starts a controller
            self._stop_controllers(timeout)
        if self.elector is not None:
            self.elector.stop()
        self.registry.stop(max(0.0, deadline - time.monotonic()))
        self.bus.stop(max(0.1, deadline - time.monotonic()))
        self.store.close()
        self._started = self._stopping = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _started_leading(self) -> None:
        """OnStartedLeading: the garbage collector's sweeps, then the controllers (their start-up list)."""
        with self._leading:
            if self._stopping:
                return
            self.registry.sweep_finalizers()
            self.registry.sweep_orphans()
            self._start_controllers()

    def _stopped_leading(self) -> None:
        """OnStoppedLeading: another process may lead now, so the controllers stop before anything else."""
        with self._leading:
            self._stop_controllers(10.0)

    def _start_controllers(self):
        for info in self.kinds.values():
            if info.has_controller:
                controller = Controller(self.registry, info, bus=self.bus, client=self.client, clock=self.clock,
                                        app=self)
                self._controllers[info.kind] = controller
                controller.start()

    def _stop_controllers(self, timeout):
        deadline = time.monotonic() + timeout
        controllers = list(self._controllers.values())
        self._controllers.clear()
        for controller in controllers:
            controller._stop.set()
            controller.queue.shutdown()
        for controller in controllers:
            controller.stop(max(0.0, deadline - time.monotonic()))

    @property
    def controllers(self) -> dict[str, Controller]:
        return dict(self._controllers)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queue is empty, no reconcile runs and nothing is due within ``timeout``.

        Returns False if that did not happen within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        quiet = 0
        wake = threading.Event()
        while True:
            left = deadline - time.monotonic()
            if all(c.idle(max(0.0, left)) for c in list(self._controllers.values())) and \
                    (self.gc is None or self.gc.idle(max(0.0, left))):
                quiet += 1          # twice in a row: an event in flight between checks would show
                if quiet >= 2 or left <= 0:
                    return True
            else:
                quiet = 0
            if left <= 0:
                return False
            wake.wait(min(0.005 * (1 + quiet), max(0.0, left)))

    def subscribe(self, pattern: str, handler, *, queue_size: int = 10000, queue_bytes: int = QUEUE_BYTES):
        """Call ``handler(event)`` in its own thread for every event whose type matches ``pattern``.

        Events wait in a queue of at most ``queue_size`` events and ``queue_bytes`` bytes;
        past either, events are dropped and the subscription counts a gap.
        """
        return self.bus.subscribe(pattern, handler, queue_size=queue_size, queue_bytes=queue_bytes)

    def health(self) -> dict:
        """What GET /health answers: status, store problems, kinds, workers and who leads."""
        return self.rest.health_document()

    def metrics_text(self) -> str:
        """Everything /metrics shows, in the Prometheus text exposition format."""
        return self.rest.metrics_text()

    def discovery(self) -> dict:
        """What GET /apis answers."""
        return self.registry.discovery()


    # -- serving -----------------------------------------------------------------
    def serve(self, host: str = "127.0.0.1", port: int = 8080, *, server: str | None = None,
              token: str | None = None, max_threads: int = 256, head_timeout: float = 10.0) -> None:
        """Start everything and serve HTTP until SIGINT/SIGTERM, then drain and stop (exit cleanly).

        The arguments are the app's defaults: the ``FABRICA_*`` variables that
        ``python fabrica.py serve`` reads override them (12-factor), so
        ``FABRICA_PORT=8081 python app.py`` moves the server without an edit;
        ``FABRICA_DATA_DIR``/``FABRICA_DATABASE_URL`` override the store and
        ``FABRICA_NO_FSYNC``, ``FABRICA_WORKERS``, ``FABRICA_CORS`` likewise.
        ``server`` names a WSGI server: None/"fabrica" for the built-in threaded
        one, "granian", or a Bottle adapter ("waitress", "cheroot", "gunicorn")
        when installed. ``max_threads`` bounds the connections (or the app
        threads) and ``head_timeout`` the seconds a client has to send a request
        head, on the servers that have such a setting (README: Serving).

        This is a program's main loop: it sets up logging (``FABRICA_LOG_LEVEL``,
        default info) unless the program already did, logs one ready line, and
        ends the program with a one-line message (SystemExit, no traceback)
        when the store is locked or the port is taken.
        """
        env = _env_settings()
        logging.basicConfig(level=getattr(logging, str(env.get("log_level", "info")).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if env.get("data_dir") or env.get("database_url"):
            self.configure_store(data_dir=env.get("data_dir"), database_url=env.get("database_url"))
        if env.get("no_fsync"):
            self.configure_store(durable=False)
        if env.get("workers"):
            for info in self.kinds.values():
                info.workers = env["workers"]
        self.cors = env.get("cors") or self.cors
        main = sys.modules.get("__main__")
        name = os.path.basename(getattr(main, "__file__", None) or "") or "app"
        try:
            self._serve(env.get("host", host), env.get("port", port), server=env.get("wsgi_server", server),
                        token=env.get("token", token), max_threads=env.get("max_threads", max_threads),
                        head_timeout=env.get("head_timeout", head_timeout), name=name)
        except (ConfigurationError, OSError) as exc:
            raise SystemExit(f"fabrica: {exc.message if isinstance(exc, FabricaError) else exc.strerror or exc}"
                             ) from None

    def _serve(self, host: str, port: int, *, server: str | None, token: str | None, max_threads: int,
               head_timeout: float, name: str) -> None:
        """serve() with the settings decided (the CLI's flags, or serve()'s arguments and environment)."""
        if token:
            self.token = token
        self.rest.host_check = is_loopback(_host_name(host) if host.startswith("[") else host)
        self._app_name = name
        self.start()
        try:
            serve_wsgi(self.wsgi, host, port, server=server, max_threads=max_threads, head_timeout=head_timeout,
                       max_body=self.max_body, ready=self._ready_line)
        finally:
            self.stop()

    def _ready_line(self, url: str) -> str:
        """The one line serve logs when it answers: version, app, URL, store, kinds."""
        store = self.database_url or getattr(self.store, "data_dir", None) or type(self.store).__name__
        kinds = ", ".join(self.kinds) or "none yet"
        return (f"fabrica {__version__} serving {self._app_name}: listening on {url} "
                f"(store: {store}; kinds: {kinds})")


###############################################################################
# CLI ##########################################################################
###############################################################################
#
# python fabrica.py serve [APP] ...; the library logs, only main() prints.


def load_app(spec: str) -> Fabrica:
    """Load a Fabrica from ``module:attr`` or ``path/to/file.py[:attr]`` with importlib (no eval)."""
    target, _, attr = spec.partition(":")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ConfigurationError(f"app file {target!r} not found")
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(target)
    if attr:
        app = getattr(module, attr, None)
    else:
        app = getattr(module, "app", None)
        if not isinstance(app, Fabrica):
            app = next((v for v in vars(module).values() if isinstance(v, Fabrica)), None)
    if not isinstance(app, Fabrica):
        raise ConfigurationError(f"{spec!r} holds no Fabrica instance" + (f" named {attr!r}" if attr else ""))
    return app


def _serve_parser(sub):
    epilog = ("Every flag also reads a FABRICA_* variable (the flag wins): " +
              ", ".join(f"FABRICA_{name}" for name, _ in _SERVE_ENV.values()) +
              ". app.serve() in a script reads the same variables, which override its arguments.")
    p = sub.add_parser("serve", help="run the REST API, the bus and the controllers", epilog=epilog,
                       formatter_class=_ServeHelpFormatter)
    env = _env_settings()
    p.add_argument("app", nargs="?", help="module:attr or path/to/file.py[:attr] holding a Fabrica "
                                          "(default: an open server where any kind can be created)")
    p.add_argument("--data-dir", default=env.get("data_dir"),
                   help="JSON file store directory (default: the app's, ./data)")
    p.add_argument("--database-url", default=env.get("database_url"), help="a database instead of --data-dir")
    p.add_argument("--host", default=env.get("host", "127.0.0.1"),
                   help="address to bind; a non-loopback one also answers other Host names")
    p.add_argument("--port", type=int, default=env.get("port", 8080), help="TCP port (0: any free one)")
    p.add_argument("--token", default=env.get("token"), help="require 'Authorization: Bearer TOKEN'")
    p.add_argument("--workers", type=int, default=env.get("workers"),
                   help="reconcile workers per kind (default: the app's, 1)")
    p.add_argument("--no-fsync", action="store_true", default=env.get("no_fsync", False),
                   help="skip fsync: faster, but a power loss can lose acknowledged writes")
    p.add_argument("--wsgi-server", "--server", dest="wsgi_server", default=env.get("wsgi_server"),
                   help="WSGI server: fabrica (built in, the default), granian, waitress, cheroot, gunicorn "
                        "(--server is the old, deprecated spelling)")
    p.add_argument("--max-threads", type=int, default=env.get("max_threads", 256),
                   help="connection slots of the built-in server (waitress: connections; granian: threads)")
    p.add_argument("--head-timeout", type=float, default=env.get("head_timeout", 10.0),
                   help="seconds a client has to send its whole request head (slowloris)")
    p.add_argument("--cors", default=env.get("cors"), help="allow this browser origin (CORS is off by default)")
    p.add_argument("--log-level", default=env.get("log_level", "info"), help="debug, info, warning or error")
    return p


def _cmd_serve(args) -> int:
    app = load_app(args.app) if args.app else Fabrica(open=True)
    if args.data_dir or args.database_url:
        app.configure_store(data_dir=args.data_dir, database_url=args.database_url)
    if args.no_fsync:
        app.configure_store(durable=False)
    if args.workers:
        for info in app.kinds.values():
            info.workers = args.workers
    if args.cors:
        app.cors = args.cors
    app._serve(args.host, args.port, server=args.wsgi_server, token=args.token, max_threads=args.max_threads,
               head_timeout=args.head_timeout, name=args.app or "an open server")
    return 0


_GLOBAL_FLAGS = {"--server": "server", "--token": "token", "-o": "output", "--output": "output"}
_FORMATS = ("table", "wide", "json", "yaml", "name")
_COMMANDS = {
    "serve": "run the REST API, the bus and the controllers",
    "init": "write a new project folder (app.py, test_app.py, a vendored fabrica.py)",
    "version": "print the version",
    "kinds": "list the server's kinds",
    "events": "follow the server's events",
    "apply": "create or update the objects of a file (-f FILE|DIR|-)",
    "get": "get KIND [REF...]: list, or show some objects",
    "describe": "describe KIND REF: one object with its conditions, dependents and recent events",
    "delete": "delete KIND REF... or delete -f FILE",
    "wait": "wait KIND/REF --for=condition=Ready|delete [--timeout=30s]",
    "KIND": "a kind's own verbs: list, get, create, update, patch, delete, status, versions, watch",
}


def _prog() -> str:
    """How fabrica was started, for hints: ``fabrica`` (console script), else ``python fabrica.py``."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if base in ("fabrica", "fabrica.exe"):
        return "fabrica"
    if base == "fabrica.py" and os.path.dirname(os.path.abspath(sys.argv[0])) != os.getcwd():
        return "python -m fabrica"
    return "python fabrica.py"


def _unknown_command(word: str, why: str = "") -> _UsageError:
    names = ", ".join(c for c in _COMMANDS if c != "KIND")
    return _UsageError(f"unknown command {word!r}{why}; commands: {names}, or a kind followed by a verb "
                       f"(`{_prog()} kinds` lists the kinds; `{_prog()} --help` shows them all)")


def _split_globals(argv: list[str]) -> tuple[dict, list[str]]:
    """Take the client's global flags (--server URL, --token T, -o FORMAT, -oFORMAT) from anywhere in argv."""
    found, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg.startswith("-o") and not eq and len(arg) > 2:
            name, eq, value = "-o", "=", arg[2:]        # -oname, as kubectl takes it
        if name in _GLOBAL_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise _UsageError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            found[_GLOBAL_FLAGS[name]] = value
        else:
            rest.append(arg)
        i += 1
    return found, rest


class _ServeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once, and only a real one: a help text naming its own default, or a
    flag that is off unless given (default None), is left as it is."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


def _age(created: str | None) -> str:
    if not created:
        return "-"
    seconds = max(0, int(time.time() - parse_time(created)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(rows: list[list[str]]) -> str:
    """Aligned columns; every cell on one line (a newline or ESC from the server cannot forge rows)."""
    rows = [[_one_line(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _labels_text(labels: dict | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (labels or {}).items()) or "<none>"


# what json.dumps leaves raw inside strings but a terminal acts on (CSI is \x9b) or breaks lines at
_RAW_IN_JSON_RE = re.compile(r"[\x7f-\x9f\u2028\u2029]")


def _json_text(value) -> str:
    """``value`` as indented JSON for a terminal: the same JSON, with those characters as \\u escapes."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _RAW_IN_JSON_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _render(value, fmt: str) -> str:
    """Objects, lists of objects or plain JSON in table/wide/json/yaml/name form ("" when there is nothing)."""
    if fmt == "json":
        return _json_text(value)
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise _UsageError("-o yaml needs PyYAML: pip install PyYAML (or use -o json)") from None
        return yaml.safe_dump(json.loads(dumps(value)), sort_keys=False, allow_unicode=True).rstrip()
    items = value if isinstance(value, list) else [value]
    is_obj = all(isinstance(i, dict) and isinstance(i.get("metadata"), dict) for i in items)
    if fmt == "name":
        if not is_obj:
            return "\n".join(_one_line(str(next((i[k] for k in ("name", "kind", "versionId") if k in i), i))
                                        if isinstance(i, dict) else str(i)) for i in items)
        return "\n".join(_one_line(f"{i['kind'].lower()}/{i['metadata']['name']}") for i in items)
    if not is_obj or not items:
        if not items:
            return "No resources found."
        return _json_text(value)
    phase = any("phase" in (i.get("status") or {}) for i in items)
    rows = [["NAME", "UID", "PHASE" if phase else "READY", "AGE"]]
    if fmt == "wide":
        rows[0] += ["GENERATION", "OBSERVED", "LABELS"]
    for i in items:
        status, meta = i.get("status") or {}, i["metadata"]
        if phase:
            state = status.get("phase", "-")
        else:
            ready = next((c for c in status.get("conditions") or () if isinstance(c, dict) and c.get("type") == "Ready"),
                         None)
            state = ready.get("status", "-") if ready else "-"
        row = [meta["name"], meta["uid"], state, _age(meta.get("createdAt"))]
        if fmt == "wide":
            row += [str(meta.get("generation", "-")), str(status.get("observedGeneration", "-")),
                    _labels_text(meta.get("labels"))]
        rows.append(row)
    return _table(rows)


def _json_arg(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"{what} is not valid JSON: {exc}") from None


def _body_arg(args, required: bool = True):
    if getattr(args, "stdin", None) == "-":
        return _json_arg(sys.stdin.read(), "standard input")
    if getattr(args, "spec", None) is not None:
        return _json_arg(args.spec, "--spec")
    if getattr(args, "file", None):
        if args.file == "-":
            return _json_arg(sys.stdin.read(), "standard input")
        try:
            with open(args.file, encoding="utf-8") as f:
                return _json_arg(f.read(), args.file)
        except OSError as exc:
            raise _UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    if not required:
        return None
    if sys.stdin.isatty():
        raise _UsageError("give the body with --spec JSON, -f FILE or on standard input")
    return _json_arg(sys.stdin.read(), "standard input")


def _shorthand(sets: list[str], unsets: list[str]) -> dict:
    patch = {}
    for item in sets or ():
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise _UsageError(f"--set wants key.path=value, not {item!r}")
        try:
            patch[key] = json.loads(value)
        except ValueError:
            patch[key] = value      # not JSON: a plain string
    for key in unsets or ():
        patch[key] = None
    return patch


def _duration(text: str) -> float:
    """``60s``, ``2m``, ``1h``, ``500ms`` or a plain number of seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise _UsageError(f"--timeout wants a duration like 60s, 2m or 1h, not {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def _documents(path: str) -> list[tuple[str, object]]:
    """The objects of ``apply -f``/``delete -f``: (where, object) from a file, a folder's files, or stdin.

    A file holds one object, a JSON array, a ``{"kind": "List", "items": [...]}``,
    or YAML documents separated by ``---`` (YAML needs PyYAML; JSON never does).
    """
    if path == "-":
        sources = [("standard input", sys.stdin.read())]
    else:
        names = ([os.path.join(path, n) for n in sorted(os.listdir(path))
                  if n.endswith((".json", ".yaml", ".yml"))] if os.path.isdir(path) else [path])
        sources = []
        for name in names:
            try:
                with open(name, encoding="utf-8") as f:
                    sources.append((name, f.read()))
            except OSError as exc:
                raise _UsageError(f"cannot read {name}: {exc.strerror}") from None
    found = []
    for where, text in sources:
        if text.lstrip()[:1] in ("{", "["):
            docs = [_json_arg(text, where)]
        else:
            try:
                import yaml
            except ImportError:
                raise _UsageError(f"{where} is not JSON, and reading YAML needs PyYAML: pip install PyYAML") from None
            try:
                docs = [d for d in yaml.safe_load_all(text) if d is not None]
            except yaml.YAMLError as exc:
                raise _UsageError(f"{where} is not valid YAML: {exc}") from None
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                doc = doc["items"]
            found.extend((where, d) for d in (doc if isinstance(doc, list) else [doc]))
    return found


def _applied(doc, where: str) -> tuple[str, str, dict]:
    """(kind, name, envelope body) of one object of a file, flat or envelope form; status is ignored."""
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise _UsageError(f"{where}: every object needs a \"kind\"")
    if "metadata" in doc or "spec" in doc:
        meta = doc.get("metadata") or {}
        body = {"metadata": {k: meta[k] for k in ("name", "labels", "annotations") if k in meta}}
        if "spec" in doc:
            body["spec"] = doc["spec"]
    else:
        flat = {k: v for k, v in doc.items() if k not in ("kind", "apiVersion", "schemaVersion", "status")}
        body = {"metadata": {k: flat.pop(k) for k in ("name", "labels", "annotations") if k in flat}, "spec": flat}
    name = body["metadata"].get("name")
    if not isinstance(name, str) or not name:
        raise _UsageError(f"{where}: a {doc['kind']} without a name; apply needs one to find it again")
    return doc["kind"], name, body


def _kind_parser(kind: str) -> argparse.ArgumentParser:
    p = _ArgumentParser(prog=f"fabrica {kind}", description=f"Client verbs for {kind}.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    v = verbs.add_parser("list", help="list objects")
    v.add_argument("-l", "--selector", help="label selector, e.g. env=prod,tier!=db")
    v.add_argument("--limit", type=int)
    v = verbs.add_parser("get", help="show objects (no REF: list them)")
    v.add_argument("refs", nargs="*", metavar="REF")
    v.add_argument("-l", "--selector", help="label selector, e.g. env=prod,tier!=db")
    v.add_argument("--limit", type=int)
    for name in ("create", "update"):
        v = verbs.add_parser(name, help=f"{name} from --spec JSON, -f FILE or stdin")
        if name == "update":
            v.add_argument("ref")
        v.add_argument("stdin", nargs="?", choices=["-"], help="'-' reads the body from standard input")
        v.add_argument("--spec", help="the body: flat ({\"name\": ..., <spec fields>}) or an envelope")
        v.add_argument("-f", "--file", help="read the body from FILE ('-' = stdin)")
    v = verbs.add_parser("patch", help="patch the spec")
    v.add_argument("ref")
    v.add_argument("--spec", help="a JSON merge patch")
    v.add_argument("--json-patch", help="RFC 6902 operations (a JSON array)")
    v.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    v.add_argument("--unset", action="append", metavar="KEY.PATH")
    v = verbs.add_parser("delete", help="delete (202 while finalizers are pending)")
    v.add_argument("refs", nargs="+", metavar="REF")
    v.add_argument("--force", action="store_true", help="delete now, skipping finalizers")
    v = verbs.add_parser("describe", help="one object with its conditions, dependents and recent events")
    v.add_argument("ref")
    v = verbs.add_parser("status", help="show, replace (--spec) or patch (--set/--unset) the status")
    v.add_argument("ref")
    v.add_argument("--spec")
    v.add_argument("--set", action="append", metavar="KEY.PATH=VALUE")
    v.add_argument("--unset", action="append", metavar="KEY.PATH")
    v = verbs.add_parser("versions", help="spec history: list, or get|delete|restore ID")
    v.add_argument("ref")
    v.add_argument("action", nargs="?", choices=("list", "get", "delete", "restore"), default="list")
    v.add_argument("id", nargs="?")
    v = verbs.add_parser("watch", help="follow this kind's events")
    v.add_argument("ref", nargs="?")
    return p


class _CLI:
    """The client commands of one invocation: a Client, the output format and the server's kinds."""

    def __init__(self, client: Client, fmt: str, explicit: bool):
        self.client, self.fmt, self.explicit = client, fmt, explicit
        self._discovery = None

    def out(self, value, text: str | None = "", stream: bool = False) -> None:
        """Print ``value`` in the chosen format; ``text`` is the table form (None: the JSON)."""
        table = self.fmt in ("table", "wide")
        if table and text:
            print(text)
        elif table and text is None:
            print(_json_text(value))
        else:
            rendered = _render(value, "json" if stream and table else self.fmt)
            if rendered:
                print(rendered)
        sys.stdout.flush()

    def say(self, value, line: str) -> None:
        """A one-line report (apply, delete, wait): the line, or the objects with an explicit -o json|yaml."""
        if self.explicit and self.fmt in ("json", "yaml"):
            self.out(value)
        else:
            print(line)
            sys.stdout.flush()

    def kind(self, word: str) -> dict:
        """The server's kind for a word (singular or plural, any case), or _UsageError "unknown command".

        On an open server an unknown word that could be a kind is one: its first create makes it.
        """
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,62}", word):
            raise _unknown_command(word)        # no kind is spelled so: no need to ask the server
        if self._discovery is None:
            self._discovery = self.client.request("GET", "/apis")[2]
        low = word.lower()
        info = next((k for k in self._discovery["kinds"] if low in (k["kind"].lower(), k["plural"])), None)
        if info is not None:
            return info
        if self._discovery.get("open") and re.fullmatch(r"[a-z][a-z0-9]{0,61}", low):
            kind = singularize(low) if low.endswith("s") else low
            kind = kind[:1].upper() + kind[1:]
            return {"kind": kind, "plural": pluralize(kind)}
        kinds = ", ".join(k["kind"].lower() for k in self._discovery["kinds"]) or "none yet"
        raise _unknown_command(word, f" (the server's kinds: {kinds})")

    def target(self, words: list[str], verb: str) -> tuple[dict, list[str]]:
        """(kind, refs) from ``KIND REF...`` or ``KIND/REF...`` (kubectl's two spellings)."""
        if not words:
            raise _UsageError(f"{verb} needs a kind: {_prog()} {verb} KIND [REF...]")
        if "/" in words[0]:
            pairs = [w.partition("/") for w in words]
            kinds = {p[0].lower() for p in pairs}
            if len(kinds) != 1 or any(not p[2] for p in pairs):
                raise _UsageError(f"{verb}: give KIND REF... or KIND/REF... of one kind, not {' '.join(words)}")
            return self.kind(pairs[0][0]), [p[2] for p in pairs]
        return self.kind(words[0]), words[1:]

    @staticmethod
    def _path(info: dict, ref: str | None = None) -> str:
        return f"/{info['plural']}" + (f"/{urllib.parse.quote(ref, safe='')}" if ref else "")

    def _list(self, info: dict, selector=None, limit=None) -> list:
        return self.client.list(info["kind"], selector=selector, limit=limit) if "controller" in info else (
            self.client.request("GET", self._path(info))[2])     # an open kind not made yet: none

    # -- kubectl word order --------------------------------------------------
    def get(self, info: dict, refs: list[str], selector=None, limit=None) -> int:
        if not refs:
            self.out(self._list(info, selector, limit))
        elif len(refs) == 1:
            self.out(self.client.request("GET", self._path(info, refs[0]))[2])
        else:
            self.out([self.client.request("GET", self._path(info, ref))[2] for ref in refs])
        return 0

    def delete(self, info: dict, refs: list[str], force: bool = False, report=None) -> int:
        """Delete each ref; ``report(body, line)`` tells (default: say, the kubectl one-liner)."""
        report = report or self.say
        for ref in refs:
            status, _, body = self.client.request("DELETE", self._path(info, ref) + ("?force=true" if force else ""))
            name = f"{info['kind'].lower()}/{ref}"
            if status == 202:
                report(body, f"{name} is being deleted; waiting for finalizers: "
                             f"{', '.join(body['metadata']['finalizers'])}")
            else:
                report(body, f"{name} deleted")
        return 0

    def describe(self, info: dict, ref: str) -> int:
        obj = self.client.request("GET", self._path(info, ref))[2]
        if self.fmt not in ("table", "wide") and self.explicit:
            self.out(obj)
            return 0
        meta, status = obj["metadata"], dict(obj.get("status") or {})
        conditions = status.pop("conditions", None) or []

        def block(value) -> str:
            return "\n".join("  " + ln for ln in _json_text(value).split("\n"))
        owners = ", ".join(f"{r.get('kind')}/{r.get('name') or r.get('uid')}" + (" (controller)" if r.get("controller")
                           else "") for r in meta.get("ownerReferences") or ()) or "<none>"
        lines = [f"Name:         {meta['name']}", f"Kind:         {obj['kind']}", f"UID:          {meta['uid']}",
                 f"Labels:       {_labels_text(meta.get('labels'))}",
                 f"Annotations:  {_labels_text(meta.get('annotations'))}",
                 f"Created:      {meta.get('createdAt')} ({_age(meta.get('createdAt'))} ago)",
                 f"Generation:   {meta.get('generation')} (observed {status.get('observedGeneration', '-')})",
                 f"Version:      {meta.get('resourceVersion')}", f"Owners:       {owners}",
                 f"Finalizers:   {', '.join(meta.get('finalizers') or ()) or '<none>'}"]
        if meta.get("deletionTimestamp"):
            lines.append(f"Deleting:     since {meta['deletionTimestamp']}")
        lines = [_one_line(line) for line in lines]     # the server's fields, each on its own line
        lines += ["Spec:", block(obj.get("spec") or {}), "Status:", block(status), "Conditions:"]
        if conditions:
            lines.append(_table([["  TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]] + [
                ["  " + str(c.get("type")), str(c.get("status")), c.get("reason") or "-",
                 _age(c.get("lastTransitionTime")), c.get("message") or ""] for c in conditions]))
        else:
            lines.append("  <none>")
        dependents = [_one_line(f"  {o['kind'].lower()}/{o['metadata']['name']}")
                      for k in self._discovery["kinds"] if "controller" in k
                      for o in self.client.list(k["kind"], owner=obj)]
        lines += ["Dependents:"] + (dependents or ["  <none>"]) + ["Events:"]
        events = self.client.request("GET", self._path(info, meta["uid"]) + "/events")[2]
        if events:
            rows = [["  AGE", "TYPE", "VERSION", "DETAIL"]]
            for ev in events:
                data = ev.get("data") or {}
                if "conditionType" in data:
                    what = f"condition {data['conditionType']}={data.get('status')}"
                    detail = ": ".join(x for x in (data.get("reason"), data.get("message")) if x)
                else:
                    what, detail = ev.get("action", ev["type"]), data.get("updateType", "")
                rows.append(["  " + _age(ev.get("time")), what, ev.get("sequence", ""), detail])
            lines.append(_table(rows))
        else:
            lines.append("  <none in the server's event buffer>")
        print("\n".join(lines))
        return 0

    def apply(self, argv: list[str]) -> int:
        p = _ArgumentParser(prog="fabrica apply", description="Create what is absent, update what differs.")
        p.add_argument("-f", "--filename", required=True, help="a JSON or YAML file, a folder of them, or '-'")
        args = p.parse_args(argv)
        failed = 0
        for where, doc in _documents(args.filename):
            kind, name, body = _applied(doc, where)
            label = f"{kind.lower()}/{name}"
            try:
                info = self.kind(kind)
                label = f"{info['kind'].lower()}/{name}"
                try:
                    current = self.client.request("GET", self._path(info, name))[2]
                except NotFoundError:
                    current = None
                if current is None:
                    obj, result = self.client.request("POST", self._path(info), body)[2], "created"
                    self._discovery = None        # an open server may have just made the kind
                else:
                    obj = self.client.request("PUT", self._path(info, current["metadata"]["uid"]), body)[2]
                    same = all(obj["metadata"].get(k) == current["metadata"].get(k)
                               for k in ("generation", "labels", "annotations"))
                    result = "unchanged" if same else "configured"
                self.say(obj, f"{label} {result}")
            except (FabricaError, _UsageError) as exc:
                if isinstance(exc, ConnectionFailedError):
                    raise
                failed = 1
                print(f"fabrica: {label}: {_cli_error_line(exc)}", file=sys.stderr)
        return failed

    def delete_files(self, argv: list[str], force: bool) -> int:
        p = _ArgumentParser(prog="fabrica delete", description="Delete what a file names.")
        p.add_argument("-f", "--filename", required=True)
        args = p.parse_args(argv)
        failed = 0
        for where, doc in _documents(args.filename):
            kind, name, _ = _applied(doc, where)
            try:
                self.delete(self.kind(kind), [name], force)
            except NotFoundError as exc:
                failed = 1
                print(f"fabrica: {kind.lower()}/{name}: {exc.message}", file=sys.stderr)
        return failed

    def wait(self, argv: list[str]) -> int:
        p = _ArgumentParser(prog="fabrica wait", description="Wait for a condition or a deletion.")
        p.add_argument("target", nargs="+", metavar="KIND/REF")
        p.add_argument("--for", dest="until", required=True, help="condition=TYPE[=STATUS] or delete")
        p.add_argument("--timeout", default="30s", help="60s, 2m, 1h (default 30s)")
        args = p.parse_args(argv)
        timeout = _duration(args.timeout)
        if args.until == "delete":
            want = None
        else:
            m = re.fullmatch(r"condition=([A-Za-z0-9_.-]+)(?:=(True|False|Unknown|true|false|unknown))?", args.until)
            if not m:
                raise _UsageError(f"--for wants condition=TYPE[=STATUS] or delete, not {args.until!r}")
            want = (m.group(1), (m.group(2) or "True").capitalize())
        info, refs = self.target(args.target, "wait")
        if not refs:
            raise _UsageError("wait needs KIND/REF (or KIND REF)")
        deadline = time.monotonic() + timeout
        for ref in refs:
            name = f"{info['kind'].lower()}/{ref}"
            while True:
                try:
                    obj = self.client.request("GET", self._path(info, ref))[2]
                except NotFoundError:
                    if want is None:
                        self.say({"kind": info["kind"], "name": ref}, f"{name} deleted")
                        break
                    raise
                if want is not None:
                    cond = Resource(obj).condition(want[0])
                    if cond is not None and cond.get("status") == want[1]:
                        self.say(obj, f"{name} condition met")
                        break
                if time.monotonic() >= deadline:
                    cond = Resource(obj).condition(want[0]) if want else None
                    if want is None:
                        state = "it still exists"
                    elif cond is None:
                        state = f"it has no {want[0]} condition"
                    else:
                        why = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
                        state = f"{want[0]} is {cond.get('status')}" + (f" ({why})" if why else "")
                    print(f"fabrica: timed out after {args.timeout} waiting for {name}: {state}", file=sys.stderr)
                    return 1
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))   # a CLI poll: nothing else runs here
        return 0

    # -- Fabrica word order: KIND VERB ...
    def kind_verb(self, word: str, argv: list[str]) -> int:
        if not argv:
            self.kind(word)             # a word that is no kind: "unknown command", not a missing verb
        args = _kind_parser(word).parse_args(argv)
        info = self.kind(word)
        kind, verb, client = info["kind"], args.verb, self.client
        ref = getattr(args, "ref", None)
        path = self._path(info, ref)
        if verb == "list":
            return self.get(info, [], args.selector, args.limit)
        if verb == "get":
            return self.get(info, args.refs, args.selector, args.limit)
        if verb == "describe":
            return self.describe(info, ref)
        if verb == "delete":     # the Fabrica order prints the server's answer (JSON when piped)
            return self.delete(info, args.refs, args.force, report=lambda body, line: self.out(body, text=line))
        if verb == "create":
            self.out(client.request("POST", path, _body_arg(args))[2])
        elif verb == "update":
            self.out(client.request("PUT", path, _body_arg(args))[2])
        elif verb == "patch":
            given = [x for x in (args.spec, args.json_patch, args.set or args.unset) if x]
            if len(given) != 1:
                raise _UsageError("patch wants exactly one of --spec, --json-patch, or --set/--unset")
            if args.spec:
                self.out(client.patch(kind, ref, _json_arg(args.spec, "--spec")))
            elif args.json_patch:
                self.out(client.patch(kind, ref, _json_arg(args.json_patch, "--json-patch"), type="json"))
            else:
                self.out(client.patch(kind, ref, _shorthand(args.set, args.unset), type="shorthand"))
        elif verb == "status":
            if args.spec:
                self.out(client.update_status(kind, ref, _json_arg(args.spec, "--spec")))
            elif args.set or args.unset:
                self.out(client.patch_status(kind, ref, _shorthand(args.set, args.unset), type="shorthand"))
            else:
                self.out(client.request("GET", path + "/status")[2], text=None)
        elif verb == "versions":
            if args.action != "list" and not args.id:
                raise _UsageError(f"versions {args.action} needs a version id")
            if args.action == "list":
                versions = client.versions(kind, ref)
                self.out(versions, text=_table([["VERSION", "CREATED", "NAME"]] + [
                    [v["versionId"], v["createdAt"], v["name"]] for v in versions]))
            elif args.action == "get":
                self.out(client.get_version(kind, ref, args.id), text=None)
            elif args.action == "delete":
                client.delete_version(kind, ref, args.id)
                self.out({"message": "version deleted", "uid": args.id}, text=f"version {args.id} deleted")
            else:
                self.out(client.restore_version(kind, ref, args.id))
        elif verb == "watch":
            for event in client.watch("**", kind=kind):
                data = event.get("data", {})
                if ref and ref not in (data.get("resourceUID"), data.get("resourceName")):
                    continue
                self.out(event, text=f"{event['type']}  {data.get('resourceName', '')}  "
                                     f"rv={event.get('resourceversion')}", stream=True)
        return 0

    def run(self, command: str, rest: list[str]) -> int:
        client = self.client
        if command == "kinds":
            kinds = client.kinds()
            self.out(kinds, text=_table([["KIND", "PLURAL", "PREFIX", "CONTROLLER", "HISTORY"]] + [
                [k["kind"], k["plural"], k["prefix"], str(k["controller"]).lower(), str(k["history"]).lower()]
                for k in kinds]))
            return 0
        if command == "events":
            p = _ArgumentParser(prog="fabrica events", description="Follow the server's events (SSE).")
            p.add_argument("--type", default="**", help="event type pattern (* one segment, ** any)")
            p.add_argument("--kind")
            p.add_argument("--since", help="resume after this event id")
            args = p.parse_args(rest)
            for event in client.watch(args.type, since=args.since, kind=args.kind):
                self.out(event, text=f"{event['type']}  {event.get('data', {}).get('resourceName', '')}  "
                                     f"rv={event.get('resourceversion')}", stream=True)
            return 0
        if command == "apply":
            return self.apply(rest)
        if command in ("get", "describe", "delete"):
            p = _ArgumentParser(prog=f"fabrica {command}")
            p.add_argument("words", nargs="*", metavar="KIND [REF...]")
            p.add_argument("-f", "--filename", help="delete what this file names" if command == "delete"
                           else argparse.SUPPRESS)
            if command == "get":
                p.add_argument("-l", "--selector", help="label selector, e.g. env=prod,tier!=db")
                p.add_argument("--limit", type=int)
            if command == "delete":
                p.add_argument("--force", action="store_true", help="delete now, skipping finalizers")
            args = p.parse_args(rest)
            if args.filename is not None:
                if command != "delete" or args.words:
                    raise _UsageError(f"{command}: -f FILE goes alone (delete -f FILE)")
                return self.delete_files(["-f", args.filename], args.force)
            info, refs = self.target(args.words, command)
            if command == "get":
                return self.get(info, refs, args.selector, args.limit)
            if len(refs) != 1 and command == "describe":
                raise _UsageError(f"describe wants one object: {_prog()} describe KIND REF")
            if not refs:
                raise _UsageError(f"delete wants objects: {_prog()} delete KIND REF... or delete -f FILE")
            return self.describe(info, refs[0]) if command == "describe" else self.delete(info, refs, args.force)
        if command == "wait":
            return self.wait(rest)
        if command in ("add", "generate", "create"):
            hint = ("fabrica has no code generation: add a kind with `register` in app.py "
                    f"(or start a project with `{_prog()} init DIR --kind Rack`)" if command != "create"
                    else f"create goes after the kind: {_prog()} KIND create --spec JSON")
            raise _unknown_command(command, f": {hint}")
        if command.startswith("-"):
            raise _UsageError(f"unknown option {command!r}; `{_prog()} --help` lists the commands")
        return self.kind_verb(command, rest)


def _cli_error_line(exc) -> str:
    """One line for an error: its message, plus the details it does not already say."""
    if not isinstance(exc, FabricaError):
        return str(exc)
    details = [f"{d.get('field')}: {d.get('message')}" for d in exc.details
               if isinstance(d, dict) and str(d.get("message")) not in exc.message]
    return exc.message + (f" ({'; '.join(details)})" if details else "")


_INIT_APP = '''"""{project}: a fabrica app. Serve it with `python app.py`; test it with `python -m pytest -q`."""

import fabrica

app = fabrica.Fabrica(data_dir="./data")
{kinds}

if __name__ == "__main__":
    app.serve()         # FABRICA_PORT, FABRICA_HOST, FABRICA_DATA_DIR... override these defaults
'''

_INIT_KIND = '''

@app.register("{kind}")
def reconcile_{snake}(ctx, obj):
    """Make the world match obj.spec; what is left in obj.status is written back (a status-only write).

    Raise an exception to retry with backoff, fabrica.TemporaryError(message, delay=seconds) to retry after
    a delay, fabrica.PermanentError to wait for the next change. ctx.client reads and writes other objects.
    """
    obj.status["phase"] = "Ready"
    obj.set_condition("Ready", True, reason="Reconciled", message="spec has %d field(s)" % len(obj.spec))
'''

_INIT_TEST = '''"""Tests of app.py, run by `python -m pytest -q`: the app runs embedded on a temporary data dir."""

import pytest

from app import app


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    app.configure_store(data_dir=str(tmp_path_factory.mktemp("data")))
    with app:
        yield app
{tests}'''

_INIT_TEST_KIND = '''

def test_{snake}_becomes_ready(running):
    running.client.create("{kind}", name="{name}-1", spec={{}})
    assert running.wait_idle(10)
    obj = running.client.get("{kind}", "{name}-1")
    assert obj.status["phase"] == "Ready"
    assert obj.condition("Ready")["status"] == "True"
'''

_INIT_README = '''# {project}

A [fabrica](https://pypi.org/project/fabrica/) app: `app.py` registers {kind_list}; `fabrica.py`
is a vendored copy of fabrica {version} (its one dependency: `pip install bottle`).

```sh
python app.py                 # serve http://127.0.0.1:8080 (FABRICA_PORT=8081 python app.py moves it)
python -m pytest -q           # run test_app.py
```

With the server running, in another terminal:

```sh
python fabrica.py {first} create --spec '{{"name": "{first}-1"}}'
python fabrica.py get {plural}
python fabrica.py describe {first} {first}-1
```

Add a kind with another `app.register(...)` in `app.py`: there is no code to generate.
'''


def _cmd_init(argv: list[str]) -> int:
    """``init DIR [--kind K ...]``: a new project folder that runs and tests as written."""
    p = _ArgumentParser(prog="fabrica init", description="Write a new project: app.py, test_app.py, README.md "
                                                         "and a vendored fabrica.py.")
    p.add_argument("dir", help="the project folder (absent or empty)")
    p.add_argument("--kind", action="append", default=[], help="a kind to register, CapWords (repeatable; "
                                                               "default Example)")
    args = p.parse_args(argv)
    kinds = args.kind or ["Example"]
    for kind in kinds:
        if not KIND_RE.fullmatch(kind):
            raise _UsageError(f"--kind {kind!r} must be CapWords letters and digits, like 'RackTemplate'")
    if len(set(kinds)) != len(kinds):
        raise _UsageError("each --kind once")
    if os.path.exists(args.dir) and (not os.path.isdir(args.dir) or os.listdir(args.dir)):
        raise _UsageError(f"{args.dir} exists and is not an empty folder; init writes a new project")
    project = os.path.basename(os.path.abspath(args.dir))
    snake = {k: re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower() for k in kinds}
    files = {
        "app.py": _INIT_APP.format(project=project, kinds="".join(
            _INIT_KIND.format(kind=k, snake=snake[k]) for k in kinds)),
        "test_app.py": _INIT_TEST.format(tests="".join(
            _INIT_TEST_KIND.format(kind=k, snake=snake[k], name=k.lower()) for k in kinds)),
        "README.md": _INIT_README.format(project=project, version=__version__, first=kinds[0].lower(),
                                         plural=pluralize(kinds[0]), kind_list=", ".join(kinds)),
        ".gitignore": "data/\n__pycache__/\n",
    }
    os.makedirs(args.dir, exist_ok=True)
    shutil.copyfile(os.path.abspath(__file__), os.path.join(args.dir, "fabrica.py"))
    for name, text in files.items():
        with open(os.path.join(args.dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    print(f"wrote {args.dir}: app.py ({', '.join(kinds)}), test_app.py, README.md, fabrica.py {__version__}\n"
          f"next: cd {shlex.quote(args.dir)} && python -m pytest -q && python app.py")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: ``serve``, ``init``, ``version``, the kubectl verbs and ``KIND VERB``; the exit code.

    Exit codes: 0 success, 1 the server answered 4xx/5xx (or ``wait`` timed out),
    2 usage, 3 cannot connect.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        parser = _ArgumentParser(prog="fabrica")
        try:
            _serve_parser(parser.add_subparsers(dest="command"))
            args = parser.parse_args(argv)
        except (_UsageError, ConfigurationError) as exc:
            print(exc if isinstance(exc, _UsageError) else f"fabrica: {exc.message}", file=sys.stderr)
            return 2
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if any(a == "--server" or a.startswith("--server=") for a in argv):
            logger.warning("serve --server is deprecated: it is --wsgi-server now (the client's --server is a URL)")
        try:
            return _cmd_serve(args)
        except StoreLockedError as exc:
            print(f"fabrica: {exc}", file=sys.stderr)
            return 1
        except FabricaError as exc:
            print(f"fabrica: {exc.message}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"fabrica: cannot serve: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    if argv[0] in ("--version", "version"):
        print(f"fabrica {__version__}")
        return 0
    server = _env("SERVER", "http://127.0.0.1:8080")
    try:
        if argv[0] == "init":
            return _cmd_init(argv[1:])
        flags, argv = _split_globals(argv)
        server = flags.get("server") or server
        fmt = flags.get("output") or ("table" if sys.stdout.isatty() else "json")
        if fmt not in _FORMATS:
            raise _UsageError(f"-o must be one of {', '.join(_FORMATS)}, not {fmt!r}")
        if not argv:
            raise _UsageError("a command is missing\n" + _usage())
        cli = _CLI(Client(server, token=flags.get("token") or _env("TOKEN")), fmt, "output" in flags)
        return cli.run(argv[0], argv[1:])
    except _UsageError as exc:
        text = str(exc)
        print(text if text.startswith("fabrica") else f"fabrica: {text}", file=sys.stderr)
        return 2
    except ConnectionFailedError:
        print(f"fabrica: cannot connect to {server}: is the server running? ({_prog()} serve; "
              "FABRICA_SERVER or --server URL points elsewhere)", file=sys.stderr)
        return 3
    except FabricaError as exc:
        print(f"fabrica: {_cli_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _usage() -> str:
    prog = _prog()
    lines = [f"{prog} serve [APP] [--data-dir DIR] [--host H] [--port P] [--token T] ... (serve --help)",
             f"{prog} init DIR [--kind KIND ...]",
             f"{prog} version | kinds | events [--type PATTERN] [--kind KIND] [--since ID]",
             f"{prog} apply -f FILE|DIR|-",
             f"{prog} get KIND [REF...] [-l SELECTOR]        (KIND REF or KIND/REF, singular or plural)",
             f"{prog} describe KIND REF",
             f"{prog} delete KIND REF... [--force] | delete -f FILE",
             f"{prog} wait KIND/REF --for=condition=Ready|--for=delete [--timeout=30s]",
             f"{prog} KIND list [-l SELECTOR] [--limit N]",
             f"{prog} KIND get REF...",
             f"{prog} KIND create [--spec JSON | -f FILE | -]",
             f"{prog} KIND update REF [--spec JSON | -f FILE]",
             f"{prog} KIND patch REF (--spec JSON | --json-patch OPS | --set k.a=v ... | --unset k ...)",
             f"{prog} KIND delete REF... [--force]",
             f"{prog} KIND describe REF",
             f"{prog} KIND status REF [--set k=v ... | --spec JSON]",
             f"{prog} KIND versions REF [get ID | delete ID | restore ID]",
             f"{prog} KIND watch [REF]"]
    return ("usage: " + "\n       ".join(lines) +
            "\nglobal flags: --server URL (env FABRICA_SERVER, default http://127.0.0.1:8080), "
            "--token T (env FABRICA_TOKEN),\n              -o table|wide|json|yaml|name (default: table on a "
            "terminal, json when piped; yaml needs PyYAML)"
            "\nexit codes: 0 ok, 1 the server said no (4xx/5xx) or wait timed out, 2 usage, 3 cannot connect")


if __name__ == "__main__":
    sys.modules.setdefault("fabrica", sys.modules[__name__])   # APP files import this same module
    sys.exit(main())
