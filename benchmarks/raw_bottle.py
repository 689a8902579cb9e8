"""The baseline: a minimal raw Bottle app doing the same JSON work as fabrica's REST path.

    python benchmarks/raw_bottle.py --data-dir D --port P [--server builtin|waitress|granian|granian-mp] [--no-fsync]

Same data (it loads fabrica's ``<plural>/<uid>.json`` files into a dict),
same responses (compact JSON, ETag, 201 + Location), and the same durable
write recipe as fabrica's FileStore (unique temp file, write, fsync,
os.replace, fsync of the directory; pretty JSON) -- but none of fabrica's
framework work: no validation, no store lock, no index, no events, no
metrics, no compare-and-swap. Like a minimal hand-written app, it writes
without a global lock (each write is its own file).

The servers are the ones fabrica uses: ``builtin`` is fabrica's own
ThreadedWSGIServer (imported from fabrica.py: the server, not the framework),
``waitress`` is Bottle's adapter exactly as ``serve --server waitress`` runs
it, ``granian`` is granian in this process (like ``serve --server granian``),
``granian-mp`` is granian's usual worker process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import bottle

ROOT = Path(__file__).resolve().parent.parent

DATA: dict[str, dict[str, dict]] = {}       # plural -> uid -> object
NAMES: dict[str, dict[str, str]] = {}       # plural -> name -> uid
KINDS = {"items": "Item", "widgets": "Widget"}
DATA_DIR = "."
DURABLE = True
RV = itertools.count(1)

app = bottle.Bottle()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _send(obj, status: int = 200, etag: bool = True) -> bytes:
    res = bottle.response
    res.status = status
    res.content_type = "application/json"
    if etag:
        res.set_header("ETag", '"' + obj["metadata"]["resourceVersion"] + '"')
    return _dumps(obj)


def _not_found(what: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(_dumps({"error": f"{what} not found", "code": 404, "details": []}), 404,
                               {"Content-Type": "application/json"})


def _durable_write(directory: str, uid: str, obj: dict) -> None:
    """fabrica's recipe: temp file, write, fsync, replace, fsync the directory."""
    payload = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    tmp = os.path.join(directory, f".tmp-{os.urandom(6).hex()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        if DURABLE:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, uid + ".json"))
    if DURABLE:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _resolve(plural: str, ref: str):
    objs = DATA.get(plural)
    if objs is None:
        return None
    obj = objs.get(ref)
    if obj is None:
        uid = NAMES[plural].get(ref)
        obj = None if uid is None else objs.get(uid)
    return obj


@app.get("/health")
def health():
    bottle.response.content_type = "application/json"
    return _dumps({"status": "healthy", "objects": sum(len(v) for v in DATA.values())})


@app.get("/<plural>/<ref>")
def get(plural, ref):
    obj = _resolve(plural, ref)
    if obj is None:
        return _not_found(ref)
    return _send(obj)


@app.get("/<plural>")
def list_(plural):
    objs = DATA.get(plural)
    if objs is None:
        return _not_found(plural)
    items = list(objs.values())
    limit = bottle.request.query.get("limit")
    if limit:
        items = items[:int(limit)]
    bottle.response.set_header("X-Total-Count", str(len(objs)))
    bottle.response.content_type = "application/json"
    return _dumps(items)


@app.post("/<plural>")
def create(plural):
    if plural not in DATA:
        return _not_found(plural)
    body = json.loads(bottle.request.body.read())
    name = body.pop("name", None)
    uid = f"{KINDS[plural].lower()}-{os.urandom(4).hex()}"
    now = _now()
    obj = {"apiVersion": "v1", "kind": KINDS[plural], "schemaVersion": "v1",
           "metadata": {"name": name or uid, "uid": uid, "labels": body.pop("labels", {}), "annotations": {},
                        "createdAt": now, "updatedAt": now, "generation": 1, "resourceVersion": str(next(RV)),
                        "finalizers": [], "ownerReferences": [], "deletionTimestamp": None},
           "spec": body, "status": {}}
    _durable_write(os.path.join(DATA_DIR, plural), uid, obj)
    DATA[plural][uid] = obj
    NAMES[plural][obj["metadata"]["name"]] = uid
    bottle.response.set_header("Location", f"/{plural}/{uid}")
    return _send(obj, 201)


@app.put("/<plural>/<ref>")
def update(plural, ref):
    cur = _resolve(plural, ref)
    if cur is None:
        return _not_found(ref)
    body = json.loads(bottle.request.body.read())
    body.pop("name", None)
    meta = dict(cur["metadata"], generation=cur["metadata"]["generation"] + 1, resourceVersion=str(next(RV)),
                updatedAt=_now())
    new = dict(cur, metadata=meta, spec=body)
    _durable_write(os.path.join(DATA_DIR, plural), meta["uid"], new)
    DATA[plural][meta["uid"]] = new
    return _send(new)


def load(data_dir: str) -> int:
    """Read fabrica's files into the dict (what start-up recovery does, minus the checks)."""
    top = 0
    for plural in KINDS:
        folder = os.path.join(data_dir, plural)
        os.makedirs(folder, exist_ok=True)
        DATA[plural], NAMES[plural] = {}, {}
        for entry in os.listdir(folder):
            if entry.endswith(".json"):
                with open(os.path.join(folder, entry), "rb") as f:
                    obj = json.loads(f.read())
                DATA[plural][obj["metadata"]["uid"]] = obj
                NAMES[plural][obj["metadata"]["name"]] = obj["metadata"]["uid"]
                top = max(top, int(obj["metadata"]["resourceVersion"]))
    return top


def main() -> None:
    global DATA_DIR, DURABLE, RV
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server", default="builtin", choices=("builtin", "waitress", "granian", "granian-mp"))
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--threads", type=int, default=64, help="granian blocking threads")
    args = p.parse_args()
    DATA_DIR, DURABLE = os.path.abspath(args.data_dir), not args.no_fsync
    RV = itertools.count(load(DATA_DIR) + 1)
    if args.server == "builtin":
        sys.path.insert(0, str(ROOT))
        from fabrica import ThreadedWSGIServer     # fabrica's server, not its framework
        httpd = ThreadedWSGIServer((args.host, args.port), app, max_threads=256)
        try:
            httpd.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
    elif args.server == "waitress":
        bottle.run(app, server="waitress", host=args.host, port=args.port, quiet=True)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import granian_serve
        if args.server == "granian":
            granian_serve.serve_in_process(app, args.host, args.port, args.threads)
        else:
            granian_serve.serve_worker_process(lambda: app, args.host, args.port, args.threads)


if __name__ == "__main__":
    main()
