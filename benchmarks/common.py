"""Shared helpers for benchmarks/run.py: processes, ports, pinning, installs, statistics.

Everything here is bounded: every subprocess has a timeout, every wait a
deadline, and every server we start is stopped by its own process id (its
own session, so a granian worker goes with it).
"""

from __future__ import annotations

import contextlib
import datetime
from http.client import HTTPConnection
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FABRICA = ROOT / "fabrica.py"
PY = sys.executable
CACHE = Path(tempfile.gettempdir()) / "fabrica-bench-cache"     # npm installs survive between runs


class Unavailable(Exception):
    """A tool or peer could not be had; the row says n/a (reason)."""


_T0 = time.monotonic()


def log(*parts) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s]", *parts, file=sys.stderr, flush=True)


# -- CPU pinning -----------------------------------------------------------------

def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


CPUS = _cpus()
TASKSET = shutil.which("taskset")
PINNING = TASKSET is not None and len(CPUS) >= 2
SERVER_CPU = CPUS[-1] if PINNING else None      # the server (or the in-process benchmark) runs here
CLIENT_CPU = CPUS[0] if PINNING else None       # the load generator runs here


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    """``cmd`` under ``taskset -c cpu`` when pinning is possible."""
    return [TASKSET, "-c", str(cpu)] + list(cmd) if PINNING and cpu is not None else list(cmd)


def pinning_note() -> str:
    if PINNING:
        return f"server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU} (taskset)"
    return "not pinned (taskset missing or a single CPU)"


# -- statistics ------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, p: float):
    """Nearest-rank percentile of a list (None when empty)."""
    values = sorted(values)
    if not values:
        return None
    k = max(0, min(len(values) - 1, int(round(p / 100.0 * len(values) + 0.5)) - 1))
    return values[k]


# -- ports and HTTP --------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url_or_port, path: str = "/", body=None, timeout: float = 30.0,
         headers: dict | None = None):
    """One request on a fresh connection: (status, headers dict, body bytes)."""
    port = url_or_port
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), res.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Poll until ``path`` answers 2xx; returns the seconds waited. Raises Unavailable on timeout or exit."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"server exited with code {proc.returncode}")
        try:
            status, _, _ = http("GET", port, path, timeout=2.0)
            if 200 <= status < 300:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.01)
    raise Unavailable(f"no answer on :{port}{path} within {timeout:.0f}s")


# -- servers ---------------------------------------------------------------------

class Server:
    """A server subprocess in its own session, pinned to SERVER_CPU; stopped by its own pid/pgid."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, *, workdir: Path,
                 cwd: Path | None = None, ready_timeout: float = 120.0, env: dict | None = None):
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.env = env
        self.log_path = workdir / f"{name}-{port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = None

    def start(self) -> Server:
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(pinned(self.cmd, SERVER_CPU), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.cwd, env=env, start_new_session=True)
        try:
            wait_http(self.port, self.ready_path, self.ready_timeout, self.proc)
        except Unavailable as exc:
            self.stop()
            raise Unavailable(f"{self.name} did not start: {exc} ({self.tail()})") from None
        self.startup_seconds = time.perf_counter() - self.t0
        return self

    def tail(self, n: int = 300) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace").replace("\n", " | ").strip()
        return ""

    def pids(self) -> list[int]:
        """The server's pid and its descendants' (granian's worker process)."""
        if self.proc is None:
            return []
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        return sorted(set(found))

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)      # our own session: the server and its workers
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        else:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)      # leftovers of an exited leader
        self.proc = None
        with contextlib.suppress(Exception):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def run_json(cmd: list[str], timeout: float, cpu: int | None = None, cwd: Path | None = None) -> dict:
    """Run a helper that prints one JSON object as its last stdout line."""
    try:
        out = subprocess.run(pinned(cmd, cpu), capture_output=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"timed out after {timeout:.0f}s") from None
    if out.returncode != 0:
        raise Unavailable(f"exit {out.returncode}: {out.stderr.decode('utf-8', 'replace')[-400:]}")
    lines = [ln for ln in out.stdout.decode().splitlines() if ln.startswith("{")]
    if not lines:
        raise Unavailable(f"no JSON output: {out.stdout.decode()[-200:]} {out.stderr.decode()[-200:]}")
    return json.loads(lines[-1])


# -- installs (each bounded; failure means "n/a (reason)") -------------------------

def _run_install(cmd, timeout, cwd=None) -> None:
    log("install:", " ".join(cmd))
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{cmd[0]} timed out after {timeout}s") from None
    except OSError as exc:
        raise Unavailable(f"{cmd[0]}: {exc.strerror}") from None
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise Unavailable(f"{' '.join(cmd[:3])} failed: {tail[0][:160]}")


def ensure_wrk(allow_install: bool) -> str:
    """The path of wrk; installs Debian's package when missing (root, apt-get update first)."""
    path = shutil.which("wrk")
    if path:
        return path
    if not allow_install:
        raise Unavailable("wrk not installed (--no-install)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("wrk missing and apt-get needs root")
    env_ok = {"DEBIAN_FRONTEND": "noninteractive"}
    os.environ.update(env_ok)
    _run_install(["apt-get", "update", "-qq"], 240)
    _run_install(["apt-get", "install", "-y", "-qq", "wrk"], 240)
    path = shutil.which("wrk")
    if not path:
        raise Unavailable("apt-get install wrk did not provide wrk")
    return path


def ensure_pip(module: str, requirement: str, allow_install: bool) -> None:
    """Make ``import module`` work (pip install requirement when allowed)."""
    check = [PY, "-c", f"import {module}"]
    if subprocess.run(check, capture_output=True, timeout=60).returncode == 0:
        return
    if not allow_install:
        raise Unavailable(f"{module} not installed (--no-install)")
    _run_install([PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement], 300)
    if subprocess.run(check, capture_output=True, timeout=60).returncode != 0:
        raise Unavailable(f"pip install {requirement} did not make {module} importable")


def ensure_json_server(spec: str, allow_install: bool) -> tuple[str, str]:
    """(node, json-server's bin script) for ``json-server@spec``, installed into a cache folder under /tmp."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise Unavailable("node/npm not installed")
    folder = CACHE / ("json-server-" + spec.replace("/", "_"))
    script = folder / "node_modules" / "json-server" / "lib" / "bin.js"
    pkg = folder / "node_modules" / "json-server" / "package.json"
    if not pkg.exists():
        if not allow_install:
            raise Unavailable(f"json-server@{spec} not installed (--no-install)")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "fabrica-bench-peer", "private": true}\n')
        _run_install([npm, "install", "--no-audit", "--no-fund", "--silent", "--no-save",
                      f"json-server@{spec}"], 300, cwd=folder)
    meta = json.loads(pkg.read_text())
    bin_entry = meta.get("bin")
    if isinstance(bin_entry, dict):
        bin_entry = next(iter(bin_entry.values()))
    script = folder / "node_modules" / "json-server" / bin_entry
    if not script.exists():
        raise Unavailable(f"json-server@{spec}: no bin script {bin_entry}")
    return node, str(script)


def json_server_version(script: str) -> str:
    pkg = Path(script)
    while pkg.name != "json-server" and pkg != pkg.parent:
        pkg = pkg.parent
    with contextlib.suppress(OSError, ValueError):
        return json.loads((pkg / "package.json").read_text())["version"]
    return "?"


# -- machine ---------------------------------------------------------------------

def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    fs = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True,
                            timeout=10).stdout.splitlines()[-1].split()[1]
    versions = {}
    for mod in ("bottle", "waitress", "granian"):
        with contextlib.suppress(Exception):
            out = subprocess.run([PY, "-c", f"import {mod}; print({mod}.__version__)"], capture_output=True,
                                 text=True, timeout=30)
            if out.returncode == 0:
                versions[mod] = out.stdout.strip()
    node = shutil.which("node")
    if node:
        with contextlib.suppress(Exception):
            versions["node"] = subprocess.run([node, "--version"], capture_output=True, text=True,
                                              timeout=10).stdout.strip()
    wrk = shutil.which("wrk")
    if wrk:
        with contextlib.suppress(Exception):
            versions["wrk"] = subprocess.run([wrk, "--version"], capture_output=True, text=True,
                                             timeout=10).stdout.split("[")[0].strip()
    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "cpus_usable": CPUS,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "temp_filesystem": fs,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pinning": pinning_note(),
        "versions": versions,
    }
