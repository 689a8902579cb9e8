"""The WSGI servers `serve --server NAME` can use: the app stays one process (store lock, controllers),
and what a slow or greedy client can hold on each (SPEC §6.7; raw sockets, the built-in server in-process)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import fabrica

ROOT = Path(__file__).resolve().parent
APP = '''
import fabrica
app = fabrica.Fabrica(data_dir="./data")

@app.register("Greeting")
def reconcile(ctx, obj):
    obj.status["message"] = "Hello, " + obj.spec.get("to", "world")
    obj.set_condition("Ready", True, reason="Greeted")
'''


def serve(tmp_path, server, port, *args):
    proc = subprocess.Popen([sys.executable, str(ROOT / "fabrica.py"), "serve", "app.py", "--port", str(port),
                             "--no-fsync", "--server", server, *args], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True)
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


###############################################################################
# HTTP server: slow and greedy clients (SPEC §6.6, §6.7)
###############################################################################

HEADER_LINE = b"X-Filler: " + b"a" * 4000 + b"\r\n"


def read_head(sock) -> bytes:
    """One response head from a raw socket (a 100 Continue included, which http.client would skip)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, read from a raw socket."""
    res = http.client.HTTPResponse(sock, method="GET")
    res.begin()
    return res.status, res.read()


def closed_by_server(sock, timeout: float = 10.0) -> bool:
    """True when the server closes ``sock`` (whatever it sent first) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionError:
        pass
    except socket.timeout:
        return False
    return True


class Dripper:
    """A client that sends its request head one byte at a time and never finishes it (slowloris)."""

    def __init__(self, port: int, interval: float = 0.05):
        self.sock = connect(port)
        self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drip, args=(interval,), daemon=True)
        self.thread.start()

    def _drip(self, interval):
        while not self.stop.wait(interval):
            try:
                self.sock.sendall(b"a")
            except OSError:
                return          # the server hung up: what the tests wait for

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def small_server(tmp_path):
    """``small_server(max_threads=, head_timeout=, timeout=, token=)``: a Fabrica served in-process
    by the built-in server on port 0; returns the port. Stopped at teardown."""
    started = []

    def start(*, max_threads=2, head_timeout=10.0, timeout=30.0, token=None):
        app = fabrica.Fabrica(data_dir=str(tmp_path / f"data{len(started)}"), durable=False, token=token)
        app.register("Widget")
        app.start()
        httpd = fabrica.ThreadedWSGIServer(("127.0.0.1", 0), app.wsgi, max_threads=max_threads,
                                           head_timeout=head_timeout, timeout=timeout)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((app, httpd, thread))
        return httpd.server_port
    yield start
    for app, httpd, thread in started:
        httpd.stop(5)
        thread.join(5)
        app.stop()


def connect(port) -> socket.socket:
    """A socket to the server, retrying while an adapter that logged "listening" binds its socket."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def fresh_get(port, path="/health") -> int:
    """GET on a new connection that closes after the answer: the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock)[0]


def poll_status(port, want: int, timeout: float = 15.0) -> list[int]:
    """Fresh GETs until one answers ``want`` or ``timeout`` passes: every status seen."""
    seen, pause = [], threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(fresh_get(port))
        if seen[-1] == want:
            break
        pause.wait(0.1)
    return seen


class TestSlowAndIdleClients:
    """The built-in server: no client holds a connection slot by being slow or idle (SPEC §6.7)."""

    def test_idle_keepalive_connections_give_way_and_requests_in_flight_are_kept(self, small_server):
        port = small_server(max_threads=2)
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")        # mid-head: not idle
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idle.request("GET", "/health")
        assert idle.getresponse().read() and idle.sock is not None       # kept alive, now idle
        # polled: a connection may give way once it has waited a second (idle_grace) for a request
        seen = poll_status(port, 200)
        assert seen[-1] == 200, f"an idle keep-alive connection kept its slot: {len(seen)} x {seen[-1]}"
        assert closed_by_server(idle.sock), "the idle connection was not the one closed"
        busy.sendall(b"\r\n")                                           # the request in flight is whole
        assert read_response(busy)[0] == 200
        busy.close()

    def test_every_slot_mid_request_answers_503_and_cuts_no_one_off(self, small_server):
        port = small_server(max_threads=2)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for sock in clients:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert fresh_get(port) == 503
        for sock in clients:
            sock.sendall(b"\r\n")
            assert read_response(sock)[0] == 200
            sock.close()

    def test_header_drippers_are_dropped_at_the_head_deadline(self, small_server):
        port = small_server(max_threads=2, head_timeout=0.5, timeout=30.0)
        drippers = [Dripper(port) for _ in range(2)]
        try:
            seen = poll_status(port, 200)
            assert seen[-1] == 200, f"drippers held the slots past the head deadline: {len(seen)} x {seen[-1]}"
            for dripper in drippers:
                dripper.sock.settimeout(10)
                head = read_head(dripper.sock)
                assert head.startswith(b"HTTP/1.1 408") or not head, head
                assert closed_by_server(dripper.sock)
        finally:
            for dripper in drippers:
                dripper.close()

    def test_a_body_slower_than_the_minimum_rate_is_dropped(self, small_server):
        port = small_server(max_threads=2, timeout=0.5)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        stop = threading.Event()

        def drip():
            while not stop.wait(0.05):
                try:
                    sock.sendall(b" ")
                except OSError:
                    return
        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        try:
            status, body = read_response(sock)
            assert status == 408 and json.loads(body)["code"] == 408, body
            assert closed_by_server(sock)
        finally:
            stop.set()
            thread.join(5)
            sock.close()
        assert fresh_get(port) == 200

    def test_a_head_over_64_kib_is_refused_before_the_client_sends_the_rest(self, small_server):
        port = small_server(max_threads=2)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + HEADER_LINE * 18      # 72 KB, no end
        assert len(head) > fabrica.MAX_HEAD
        sock.sendall(head)
        status, body = read_response(sock)          # the client sends nothing more
        assert status == 431 and json.loads(body)["code"] == 431, body
        assert closed_by_server(sock)
        sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /" + b"a" * fabrica.MAX_HEAD)               # a request line alone
            assert read_response(sock)[0] == 414
        assert fresh_get(port) == 200

    def test_chunked_trailer_fields_are_capped_like_a_head(self, small_server):
        port = small_server(max_threads=2)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nd\r\n{\"name\": \"t\"}\r\n0\r\n" + HEADER_LINE * 18)
        status, body = read_response(sock)          # no end of the trailers: the server must not wait for it
        assert status == 400 and "trailer" in json.loads(body)["error"], body
        assert closed_by_server(sock)
        sock.close()

    @pytest.mark.parametrize("case", ["no-token", "wrong-token", "too-large"])
    def test_expect_100_continue_is_refused_without_a_100(self, small_server, case):
        port = small_server(token="s3cret")
        auth = {"no-token": "", "wrong-token": "Authorization: Bearer nope\r\n",
                "too-large": "Authorization: Bearer s3cret\r\n"}[case]
        length = 2 << 20 if case == "too-large" else 20
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"{auth}Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n".encode())
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 413" if case == "too-large" else b"HTTP/1.1 401"), head

    def test_expect_100_continue_is_answered_when_the_checks_pass(self, small_server):
        port = small_server(token="s3cret")
        body = b'{"name": "w1"}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer s3cret\r\nExpect: 100-continue\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            assert read_response(sock)[0] == 201


@pytest.mark.parametrize("server", ["fabrica", "waitress", "granian"])
def test_every_server_refuses_a_head_over_64_kib_as_it_arrives(tmp_path, server):
    pytest.importorskip(server if server != "fabrica" else "bottle")
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    proc = serve(tmp_path, server, port)
    try:
        with connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + HEADER_LINE * 18)
            head = read_head(sock)
            assert head.split(b" ", 2)[1] == b"431", head                # waitress answers as HTTP/1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            proc.kill()


@pytest.mark.parametrize("server", ["fabrica", "granian"])     # waitress has no head deadline (README)
def test_every_server_cuts_a_dripper_off_at_the_head_deadline(tmp_path, server):
    pytest.importorskip(server if server != "fabrica" else "bottle")
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    proc = serve(tmp_path, server, port, "--head-timeout", "1", "--max-threads", "2")
    dripper = Dripper(port)
    try:
        assert closed_by_server(dripper.sock, 15), "the dripper kept its connection past the head deadline"
        assert request(port, "GET", "/health")[0] == 200
    finally:
        dripper.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            proc.kill()


@pytest.mark.parametrize("server", ["fabrica", "granian"])     # waitress sends the 100 on the head (README)
def test_every_server_sends_100_continue_only_after_the_token_check(tmp_path, server):
    pytest.importorskip(server if server != "fabrica" else "bottle")
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    proc = serve(tmp_path, server, port, "--token", "s3cret")
    head = b"POST /greetings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
           b"Expect: 100-continue\r\nContent-Length: 14\r\n"
    try:
        with connect(port) as sock:
            sock.sendall(head + b"\r\n")
            assert read_head(sock).startswith(b"HTTP/1.1 401")
        with connect(port) as sock:
            sock.sendall(head + b"Authorization: Bearer s3cret\r\n\r\n")
            assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b'{"name": "g1"}')
            assert read_head(sock).startswith(b"HTTP/1.1 201")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            proc.kill()
