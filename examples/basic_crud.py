"""Basic CRUD: one kind, the in-process client, then the same verbs over REST.

    python examples/basic_crud.py [--data-dir DIR]

Without --data-dir the objects live in a fresh temporary directory. The REST
half serves ``app.wsgi`` with the standard library's WSGI server on a free
port and talks to it with ``fabrica.Client`` (the HTTP twin of ``app.client``)
and once with plain urllib, to show the JSON on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

try:
    import fabrica
except ImportError:     # run from a checkout: python examples/basic_crud.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fabrica


@dataclass
class DeviceSpec:
    model: str
    rack: str = ""
    ports: int = field(default=24, metadata={"minimum": 1, "maximum": 128})


def build_app(data_dir: str) -> fabrica.Fabrica:
    app = fabrica.Fabrica(data_dir=data_dir, durable=False)     # a throwaway demo: skip fsync
    app.register("Device", spec=DeviceSpec, prefix="dev")       # a kind with no controller
    return app


def show(label: str, obj) -> None:
    if obj is None:
        print(f"{label}: gone")
        return
    meta = obj["metadata"]
    print(f"{label}: {obj['kind']} {meta['name']} uid={meta['uid']} rv={meta['resourceVersion']} "
          f"gen={meta['generation']} labels={meta['labels']} spec={json.dumps(obj['spec'], sort_keys=True)} "
          f"status={json.dumps(obj['status'], sort_keys=True)}")


def in_process(app: fabrica.Fabrica) -> None:
    print("== in-process client (app.client)")
    client = app.client
    sw = client.create("Device", name="switch-01", spec={"model": "sx-48", "ports": 48}, labels={"role": "tor"})
    show("create", sw)
    show("get", client.get("Device", "switch-01"))                  # by name ...
    show("get", client.get("Device", sw.uid))                       # ... or by uid
    client.create("Device", name="switch-02", spec={"model": "sx-24"})
    print("list:", [d.name for d in client.list("Device")])
    print("list role=tor:", [d.name for d in client.list("Device", selector="role=tor")])
    show("patch", client.patch("Device", "switch-01", {"rack": "r1"}))          # merge patch of the spec
    show("update_status", client.update_status("Device", "switch-01", {"phase": "Racked"}))
    current = client.get("Device", "switch-01")
    current.spec["ports"] = 32
    show("update", client.update(current))                          # PUT guarded by resourceVersion
    try:
        client.update(current)                                      # same resourceVersion again: stale
    except fabrica.PreconditionFailedError as exc:
        print(f"stale update: {exc.status} {exc}")
    try:
        client.create("Device", name="bad", spec={"model": "x", "ports": 0})
    except fabrica.ValidationError as exc:
        print(f"invalid create: {exc.status} {exc}")
    show("delete", client.delete("Device", "switch-02"))
    try:
        client.get("Device", "switch-02")
    except fabrica.NotFoundError as exc:
        print(f"get after delete: {exc.status} {exc}")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def over_rest(app: fabrica.Fabrica) -> None:
    httpd = make_server("127.0.0.1", 0, app.wsgi, server_class=WSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="basic-crud-http", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        print(f"== REST ({url}) with fabrica.Client")
        client = fabrica.Client(url)
        show("POST", client.create("Device", name="router-01", spec={"model": "rx-8", "ports": 8}))
        show("GET", client.get("Device", "router-01"))
        print("GET list:", [d.name for d in client.list("Device")])
        show("PATCH", client.patch("Device", "router-01", {"rack": "r2"}))
        show("PUT status", client.update_status("Device", "router-01", {"phase": "Racked"}))
        try:
            client.create("Device", name="router-01", spec={"model": "rx-8"})
        except fabrica.ConflictError as exc:
            print(f"duplicate POST: {exc.status} {exc}")
        show("DELETE", client.delete("Device", "router-01"))
        client.close()
        print("== plain urllib: GET /devices/switch-01")
        with urllib.request.urlopen(f"{url}/devices/switch-01", timeout=5) as res:
            print(res.status, res.headers["ETag"], res.read().decode()[:200], "...")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="where the JSON files go (default: a new temporary directory)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="fabrica-crud-")
    print(f"data dir: {data_dir}")
    with build_app(data_dir) as app:
        in_process(app)
        over_rest(app)
        print("files:", sorted(os.listdir(os.path.join(data_dir, "devices"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
