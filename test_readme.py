"""README tests: the walkthrough's CLI lines run as written, and the two set-up commands work in a fresh venv."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
README = (ROOT / "README.md").read_text()


def start_server(args, cwd, env=None, timeout=20.0):
    proc = subprocess.Popen([sys.executable, str(ROOT / "fabrica.py"), "serve", *args], cwd=cwd, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def code_block_after(heading: str) -> list[str]:
    section = README[README.index(heading):]
    block = section[section.index("```sh") + 5:]
    return block[:block.index("```")].strip().splitlines()


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as res:
        return json.loads(res.read())


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_readme_starts_with_the_two_commands():
    first = README[README.index("```sh") + 5:]
    lines = first[:first.index("```")].strip().splitlines()
    assert lines == ["python -m pip install . && python fabrica.py serve examples/rack_reconciliation.py",
                     "python -m pip install -q '.[test]' && python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1] in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_rack_walkthrough_runs_as_written(tmp_path):
    proc, port = start_server([str(ROOT / "examples" / "rack_reconciliation.py"), "--data-dir",
                               str(tmp_path / "data"), "--port", "0", "--no-fsync"], cwd=tmp_path)
    env = dict(os.environ, FABRICA_SERVER=f"http://127.0.0.1:{port}")
    try:
        lines = [ln for ln in code_block_after("## The rack example, step by step")
                 if ln.startswith("python fabrica.py") and "serve" not in ln]
        assert len(lines) >= 8
        for line in lines:
            argv = shlex.split(line)
            res = subprocess.run([sys.executable, str(ROOT / "fabrica.py"), *argv[2:]], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"{line}\n{res.stderr}"
            assert "Traceback" not in res.stderr
            if "rack create" in line:
                wait_for(lambda: get(port, "/racks/rack-01")["status"].get("phase") == "Ready")
            if "patch standard" in line:
                wait_for(lambda: get(port, "/racks/rack-01")["status"].get("totalChassis") == 3)
            if "rack delete" in line:
                wait_for(lambda: get(port, "/nodes") == [])
        assert get(port, "/chassis") == []
    finally:
        stop_server(proc)


VENV_TEST = pytest.mark.skipif(not os.environ.get("CI") and not os.environ.get("FABRICA_VENV_TEST"),
                               reason="installs into a fresh venv (network); runs in CI (.ci/run sets "
                                      "FABRICA_VENV_TEST=1) or with FABRICA_VENV_TEST=1")


def fresh_venv(path, *requirements):
    """A new venv at `path` with `requirements` installed the way the README does it; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    python = str(path / "bin" / "python")
    res = subprocess.run([python, "-m", "pip", "install", "-q", *requirements], cwd=ROOT, timeout=900,
                         capture_output=True, text=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    return python


@VENV_TEST
def test_first_readme_command_in_a_fresh_venv(tmp_path):
    python = fresh_venv(tmp_path / "venv", str(ROOT))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([python, str(ROOT / "fabrica.py"), "serve", str(ROOT / "examples" /
                             "rack_reconciliation.py"), "--port", "0"], cwd=work, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", proc.stderr.readline())
            port = int(m.group(1)) if m else None
        assert port, "the server did not start"
        assert get(port, "/health")["status"] == "healthy"
        assert "Rack" in get(port, "/health")["kinds"]
        assert (work / "data" / ".fabrica" / "lock").exists(), "the rack example serves ./data"
        res = subprocess.run([python, "-c", "import fabrica, bottle; print(fabrica.__version__)"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert res.returncode == 0 and res.stdout.strip()
    finally:
        stop_server(proc)


@VENV_TEST
def test_test_extra_resolves_to_a_working_set_in_a_fresh_venv(tmp_path):
    """The second README command's install, resolved afresh (newest versions within the test extra's bounds):
    the resolved set is consistent, and the plugin-sensitive tests pass on it with deprecations as errors."""
    python = fresh_venv(tmp_path / "venv", ".[test]")
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    res = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "test_openapi.py", "test_readme.py::test_readme_starts_with_the_two_commands"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
