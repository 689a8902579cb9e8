"""The WSGI servers `serve --server NAME` can use: the app stays one process (store lock, controllers)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
APP = '''
import fabrica
app = fabrica.Fabrica(data_dir="./data")

@app.register("Greeting")
def reconcile(ctx, obj):
    obj.status["message"] = "Hello, " + obj.spec.get("to", "world")
    obj.set_condition("Ready", True, reason="Greeted")
'''


def serve(tmp_path, server, port):
    proc = subprocess.Popen([sys.executable, str(ROOT / "fabrica.py"), "serve", "app.py", "--port", str(port),
                             "--no-fsync", "--server", server], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"--server {server} did not start: {proc.stderr.read()}")


def request(port, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)            # the adapter may log before its socket listens


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("server", ["fabrica", "waitress", "granian"])
def test_server_keeps_store_and_controllers_in_one_process(tmp_path, server):
    pytest.importorskip(server if server != "fabrica" else "bottle")
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    proc = serve(tmp_path, server, port)
    try:
        assert request(port, "POST", "/greetings", {"name": "hi", "to": "you"})[0] == 201
        deadline = time.monotonic() + 10
        while request(port, "GET", "/greetings/hi")[1]["status"].get("message") != "Hello, you":
            assert time.monotonic() < deadline, "the controller did not run in the serving process"
            time.sleep(0.05)
        lock = (tmp_path / "data" / ".fabrica" / "lock").read_text().strip()
        assert lock == str(proc.pid), "the store lock belongs to the serving process"
        status, errors = None, None
        try:
            request(port, "GET", "/greetings/nope")
        except urllib.error.HTTPError as exc:
            status, errors = exc.code, json.loads(exc.read())
        assert status == 404 and errors["code"] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0
        finally:
            proc.kill()
    second = serve(tmp_path, server, free_port())       # the lock was released
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
