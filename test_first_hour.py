"""The first hour of a new user (issue 14): kubectl habits, ``init``, starting up, the open server.

Every CLI test runs ``fabrica.py`` as a subprocess against a real ``fabrica.py serve`` on port 0
(the port is read from the server's ready line on stderr).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
FABRICA_PY = ROOT / "fabrica.py"
RACKS = ROOT / "examples" / "rack_reconciliation.py"
READY = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def read_line(proc, timeout: float) -> str:
    """One stderr line of ``proc``, or "" at EOF or after ``timeout`` (a server that logs nothing never hangs us)."""
    box = queue.Queue()
    threading.Thread(target=lambda: box.put(proc.stderr.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        return ""


def read_ready(proc, timeout=30.0) -> tuple[int, str]:
    """The port of the ready line a starting server writes to stderr, and that line."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = read_line(proc, max(0.1, deadline - time.monotonic()))
        if not line:
            break
        lines.append(line)
        m = READY.search(line)
        if m:
            return int(m.group(1)), line
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def start(argv, cwd, env=None):
    """A server process (``argv`` after the python executable) and its port."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    port, line = read_ready(proc)
    return proc, port, line


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.stderr.close()


def cli(url, *args, input=None, env=None, timeout=90):
    """``python fabrica.py ARGS`` against ``url`` (FABRICA_SERVER), stdout piped; never a traceback."""
    res = subprocess.run([sys.executable, str(FABRICA_PY), *args], capture_output=True, text=True, input=input,
                         timeout=timeout, env=dict(os.environ, FABRICA_SERVER=url, **(env or {})), cwd=ROOT)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def http(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as res:
        return json.loads(res.read())


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def racks(tmp_path_factory):
    """The rack example served on a fresh data dir; its URL."""
    tmp = tmp_path_factory.mktemp("racks")
    proc, port, _ = start([FABRICA_PY, "serve", RACKS, "--data-dir", tmp / "data", "--port", "0", "--no-fsync"],
                          cwd=tmp)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


TEMPLATE = {"kind": "RackTemplate", "metadata": {"name": "small", "labels": {"size": "s"}},
            "spec": {"chassisCount": 1, "chassisConfig": {"bladeCount": 1, "bladeConfig": {"nodeCount": 1}}}}
RACKS_YAML = """\
kind: RackTemplate
metadata: {name: small-y}
spec:
  chassisCount: 1
  chassisConfig: {bladeCount: 1, bladeConfig: {nodeCount: 1}}
---
kind: Rack
name: rack-y
templateUID: small-y
"""


###############################################################################
# kubectl habits (SPEC §7) #####################################################
###############################################################################

class TestApply:
    def test_apply_twice_is_created_then_unchanged_without_a_new_resource_version(self, racks, tmp_path):
        doc = tmp_path / "objects.json"
        doc.write_text(json.dumps([TEMPLATE, {"kind": "rack", "name": "rack-a", "templateUID": "small"}]))
        first = cli(racks, "apply", "-f", str(doc))
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == ["racktemplate/small created", "rack/rack-a created"]
        before = http(racks, "/racktemplates/small")["metadata"]["resourceVersion"]
        second = cli(racks, "apply", "-f", str(doc))
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines() == ["racktemplate/small unchanged", "rack/rack-a unchanged"]
        assert http(racks, "/racktemplates/small")["metadata"]["resourceVersion"] == before

    def test_apply_configures_what_differs(self, racks, tmp_path):
        doc = tmp_path / "one.json"
        changed = json.loads(json.dumps(TEMPLATE))
        changed["metadata"]["name"] = "small-c"
        doc.write_text(json.dumps(changed))
        assert cli(racks, "apply", "-f", str(doc)).stdout == "racktemplate/small-c created\n"
        changed["spec"]["chassisCount"] = 2
        doc.write_text(json.dumps(changed))
        assert cli(racks, "apply", "-f", str(doc)).stdout == "racktemplate/small-c configured\n"
        assert http(racks, "/racktemplates/small-c")["spec"]["chassisCount"] == 2
        changed["metadata"]["labels"] = {"size": "m"}
        doc.write_text(json.dumps(changed))
        assert cli(racks, "apply", "-f", str(doc)).stdout == "racktemplate/small-c configured\n"
        assert http(racks, "/racktemplates/small-c")["metadata"]["labels"] == {"size": "m"}

    def test_yaml_documents_from_stdin_and_a_folder_then_delete_f(self, racks, tmp_path):
        pytest.importorskip("yaml")
        res = cli(racks, "apply", "-f", "-", input=RACKS_YAML)
        assert res.returncode == 0 and res.stdout.splitlines() == ["racktemplate/small-y created",
                                                                   "rack/rack-y created"], res.stderr
        folder = tmp_path / "dir"
        folder.mkdir()
        (folder / "a.yaml").write_text(RACKS_YAML)
        (folder / "notes.txt").write_text("not an object")
        assert cli(racks, "apply", "-f", str(folder)).stdout.splitlines() == [
            "racktemplate/small-y unchanged", "rack/rack-y unchanged"]
        gone = cli(racks, "delete", "-f", str(folder / "a.yaml"))
        assert gone.returncode == 0 and gone.stdout.splitlines() == ["racktemplate/small-y deleted",
                                                                     "rack/rack-y deleted"], gone.stderr
        assert cli(racks, "get", "rack", "rack-y").returncode == 1

    def test_an_object_without_kind_or_name_is_a_usage_error(self, racks, tmp_path):
        doc = tmp_path / "bad.json"
        doc.write_text(json.dumps({"kind": "Rack", "templateUID": "small"}))
        res = cli(racks, "apply", "-f", str(doc))
        assert res.returncode == 2 and "without a name" in res.stderr and res.stderr.count("\n") == 1
        doc.write_text(json.dumps({"name": "x"}))
        assert cli(racks, "apply", "-f", str(doc)).returncode == 2


@pytest.fixture(scope="module")
def two(racks):
    """The rack server with two templates labelled set=two."""
    for name in ("w1", "w2"):
        res = cli(racks, "racktemplate", "create", "--spec", json.dumps(
            {"name": name, "labels": {"set": "two"}, **TEMPLATE["spec"]}))
        assert res.returncode == 0, res.stderr
    return racks


class TestKubectlWordOrder:
    def test_get_plural_and_several_refs(self, two):
        listed = cli(two, "-oname", "get", "racktemplates", "-l", "set=two")
        assert listed.returncode == 0 and listed.stdout == "racktemplate/w1\nracktemplate/w2\n", listed.stderr
        both = json.loads(cli(two, "get", "racktemplate", "w1", "w2").stdout)
        assert [o["metadata"]["name"] for o in both] == ["w1", "w2"]
        slashed = cli(two, "-o", "name", "get", "racktemplate/w2")
        assert slashed.stdout == "racktemplate/w2\n"
        # the Fabrica order takes several refs, and none (= list), too
        assert cli(two, "-o", "name", "racktemplate", "get", "w1", "w2").stdout == "racktemplate/w1\nracktemplate/w2\n"
        assert "racktemplate/w1" in cli(two, "-oname", "racktemplate", "get").stdout

    def test_wide_adds_generation_observed_and_labels(self, two):
        res = cli(two, "-o", "wide", "get", "racktemplates", "-l", "set=two")
        header, *rows = res.stdout.splitlines()
        assert header.split()[-3:] == ["GENERATION", "OBSERVED", "LABELS"]
        assert rows[0].split()[0] == "w1" and rows[0].split()[-1] == "set=two"

    def test_name_output_with_no_match_prints_nothing(self, two):
        res = cli(two, "-o", "name", "get", "racks", "-l", "no=such")
        assert res.returncode == 0 and res.stdout == ""

    def test_delete_several(self, two):
        for name in ("d1", "d2"):
            cli(two, "racktemplate", "create", "--spec", json.dumps({"name": name, **TEMPLATE["spec"]}))
        res = cli(two, "delete", "racktemplate", "d1", "d2")
        assert res.returncode == 0 and res.stdout.splitlines() == ["racktemplate/d1 deleted",
                                                                   "racktemplate/d2 deleted"], res.stderr
        assert cli(two, "racktemplate", "get", "d1").returncode == 1

    def test_describe_shows_conditions_dependents_and_events(self, racks):
        cli(racks, "racktemplate", "create", "--spec", json.dumps({"name": "dt", **TEMPLATE["spec"]}))
        cli(racks, "rack", "create", "--spec", json.dumps({"name": "rack-d", "templateUID": "dt"}))
        assert cli(racks, "wait", "rack/rack-d", "--for=condition=Ready", "--timeout=60s").returncode == 0
        res = cli(racks, "describe", "rack", "rack-d")
        assert res.returncode == 0, res.stderr
        text = res.stdout
        assert "Name:         rack-d" in text and "Kind:         Rack" in text
        conditions = text[text.index("Conditions:"):text.index("Dependents:")]
        assert re.search(r"Ready\s+True\s+Provisioned", conditions), text
        dependents = text[text.index("Dependents:"):text.index("Events:")]
        assert "chassis/" in dependents, text
        events = text[text.index("Events:"):]
        assert re.search(r"\bcreated\b", events) and "condition Ready=True" in events, text
        # the route describe reads: one object's recent events, oldest first, nobody else's
        uid = http(racks, "/racks/rack-d")["metadata"]["uid"]
        evs = http(racks, "/racks/rack-d/events")
        assert evs and {e["resourceuid"] for e in evs} == {uid} and evs[0]["action"] == "created"
        assert len(http(racks, "/racks/rack-d/events?limit=1")) == 1
        assert "/racks/{ref}/events" in http(racks, "/openapi.json")["paths"]


class TestWait:
    def test_condition_met_exits_0_timeout_exits_1(self, racks):
        cli(racks, "racktemplate", "create", "--spec", json.dumps({"name": "wt", **TEMPLATE["spec"]}))
        cli(racks, "rack", "create", "--spec", json.dumps({"name": "rack-w", "templateUID": "wt"}))
        met = cli(racks, "wait", "rack/rack-w", "--for=condition=Ready", "--timeout=60s")
        assert met.returncode == 0 and met.stdout == "rack/rack-w condition met\n", met.stderr
        never = cli(racks, "wait", "rack", "rack-w", "--for", "condition=Ready=False", "--timeout", "300ms")
        assert never.returncode == 1 and never.stdout == ""
        assert "timed out" in never.stderr and "Ready is True" in never.stderr and never.stderr.count("\n") == 1

    def test_for_delete(self, racks):
        cli(racks, "racktemplate", "create", "--spec", json.dumps({"name": "wd", **TEMPLATE["spec"]}))
        still = cli(racks, "wait", "racktemplate/wd", "--for=delete", "--timeout=200ms")
        assert still.returncode == 1 and "still exists" in still.stderr
        assert cli(racks, "racktemplate", "delete", "wd").returncode == 0
        gone = cli(racks, "wait", "racktemplate/wd", "--for=delete", "--timeout=30s")
        assert gone.returncode == 0 and gone.stdout == "racktemplate/wd deleted\n"

    def test_bad_for_and_timeout_are_usage_errors(self, racks):
        bad_for = cli(racks, "wait", "rack/x", "--for=ready")
        assert bad_for.returncode == 2 and "--for wants condition=TYPE[=STATUS] or delete" in bad_for.stderr
        bad_timeout = cli(racks, "wait", "rack/x", "--for=delete", "--timeout=soon")
        assert bad_timeout.returncode == 2 and "--timeout wants a duration" in bad_timeout.stderr


###############################################################################
# init and unknown commands ###################################################
###############################################################################

class TestInit:
    def test_init_writes_a_project_whose_tests_pass(self, tmp_path):
        res = subprocess.run([sys.executable, str(FABRICA_PY), "init", "rack-svc", "--kind", "Rack",
                              "--kind", "RackTemplate"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        project = tmp_path / "rack-svc"
        assert sorted(p.name for p in project.iterdir()) == [".gitignore", "README.md", "app.py", "fabrica.py",
                                                             "test_app.py"]
        assert (project / "fabrica.py").read_bytes() == FABRICA_PY.read_bytes()
        assert 'app.register("Rack")' in (project / "app.py").read_text()
        readme = (project / "README.md").read_text()
        assert "python app.py" in readme and "python -m pytest -q" in readme
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                               capture_output=True, text=True, timeout=300,
                               env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
        assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout + tests.stderr

    def test_the_new_app_serves_with_python_app_py(self, tmp_path):
        subprocess.run([sys.executable, str(FABRICA_PY), "init", "svc"], cwd=tmp_path, check=True,
                       capture_output=True, timeout=60)
        proc, port, line = start(["app.py"], cwd=tmp_path / "svc", env=dict(os.environ, FABRICA_PORT="0"))
        try:
            assert "kinds: Example" in line
            url = f"http://127.0.0.1:{port}"
            assert cli(url, "example", "create", "--spec", '{"name": "e1"}').returncode == 0
            assert cli(url, "wait", "example/e1", "--for=condition=Ready", "--timeout=30s").returncode == 0
        finally:
            stop(proc)

    def test_init_refuses_a_non_empty_folder_and_a_bad_kind(self, tmp_path):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("mine")
        res = subprocess.run([sys.executable, str(FABRICA_PY), "init", "full"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "not an empty folder" in res.stderr
        assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
        bad = subprocess.run([sys.executable, str(FABRICA_PY), "init", "x", "--kind", "rack"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "CapWords" in bad.stderr and not (tmp_path / "x").exists()


class TestUnknownCommands:
    @pytest.mark.parametrize("argv", [["rack-svc"], ["add", "resource", "Rack"], ["generate"], ["typo", "list"],
                                      ["typo"]])
    def test_unknown_command_lists_the_commands(self, racks, argv):
        res = cli(racks, *argv)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.startswith(f"fabrica: unknown command {argv[0]!r}") and res.stderr.count("\n") == 1
        for command in ("serve", "init", "apply", "get", "describe", "wait"):
            assert command in res.stderr
        assert "invalid choice" not in res.stderr and "VERB" not in res.stderr

    def test_add_and_generate_say_what_to_do_instead(self, racks):
        assert "add a kind with `register` in app.py" in cli(racks, "generate").stderr

    def test_a_word_no_kind_is_spelled_like_needs_no_server(self):
        res = cli("http://127.0.0.1:1", "rack-svc")
        assert res.returncode == 2 and "unknown command 'rack-svc'" in res.stderr

    def test_version(self):
        res = cli("http://127.0.0.1:1", "version")
        assert res.returncode == 0 and re.fullmatch(r"fabrica \d+\.\d+\.\d+\S*\n", res.stdout)


###############################################################################
# Starting up ##################################################################
###############################################################################

def quickstart_dir(tmp_path) -> Path:
    """A folder holding quickstart.py next to fabrica.py, as the README's Quick start has it."""
    shutil.copy(ROOT / "examples" / "quickstart.py", tmp_path / "quickstart.py")
    shutil.copy(FABRICA_PY, tmp_path / "fabrica.py")
    return tmp_path


def script_env(**variables):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICA_")}
    env.update(variables)
    return env


class TestStartingUp:
    def test_python_quickstart_prints_one_ready_line_and_honours_fabrica_port(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        proc, port, line = start(["quickstart.py"], cwd=folder, env=script_env(FABRICA_PORT="0"))
        try:
            assert port != 8080
            assert re.search(r"fabrica \S+ serving quickstart\.py: listening on http://127\.0\.0\.1:\d+ "
                             r"\(store: .*quickstart-data; kinds: Greeting\)", line), line
            assert http(f"http://127.0.0.1:{port}", "/health")["status"] == "healthy"
        finally:
            stop(proc)

    def test_the_environment_overrides_the_data_dir_of_the_code(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        proc, port, line = start(["quickstart.py"], cwd=folder,
                                 env=script_env(FABRICA_PORT="0", FABRICA_DATA_DIR=str(tmp_path / "elsewhere")))
        try:
            assert "elsewhere" in line
        finally:
            stop(proc)
        assert (tmp_path / "elsewhere").is_dir() and not (folder / "quickstart-data").exists()

    def test_a_taken_port_is_one_line_naming_the_address(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            res = subprocess.run([sys.executable, "quickstart.py"], cwd=folder, capture_output=True, text=True,
                                 timeout=60, env=script_env(FABRICA_PORT=str(port)))
            served = subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--port", str(port), "--data-dir",
                                     str(tmp_path / "d2")], cwd=folder, capture_output=True, text=True, timeout=60)
        for out in (res, served):
            assert out.returncode == 1 and "Traceback" not in out.stderr
            assert f"127.0.0.1:{port}" in out.stderr and "FABRICA_PORT" in out.stderr
            assert out.stderr.strip().splitlines()[-1].startswith("fabrica:")

    def test_a_locked_data_dir_is_one_line_that_a_script_user_can_act_on(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        proc, _, _ = start(["quickstart.py"], cwd=folder, env=script_env(FABRICA_PORT="0"))
        try:
            res = subprocess.run([sys.executable, "quickstart.py"], cwd=folder, capture_output=True, text=True,
                                 timeout=60, env=script_env(FABRICA_PORT="0"))
        finally:
            stop(proc)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert "is locked by pid" in last and "FABRICA_DATA_DIR" in last and "Fabrica(data_dir=" in last

    def test_the_quickstart_and_the_rack_example_use_different_data_dirs(self):
        quick = (ROOT / "examples" / "quickstart.py").read_text()
        racks = RACKS.read_text()
        quick_dir = re.search(r'data_dir="([^"]+)"', quick).group(1)
        assert quick_dir not in racks and quick_dir.rstrip("/") != "./data"

    def test_serve_wsgi_server_flag_and_the_deprecated_alias(self, tmp_path):
        proc, port, line = start([FABRICA_PY, "serve", "--wsgi-server", "fabrica", "--port", "0", "--data-dir",
                                  tmp_path / "a"], cwd=tmp_path)
        stop(proc)
        proc = subprocess.Popen([sys.executable, str(FABRICA_PY), "serve", "--server", "fabrica", "--port", "0",
                                 "--data-dir", str(tmp_path / "b")], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                                stdout=subprocess.DEVNULL)
        deprecated = read_line(proc, 30)
        read_ready(proc)
        stop(proc)
        assert "deprecated" in deprecated and "--wsgi-server" in deprecated

    def test_serve_help_has_defaults_and_the_environment(self):
        res = subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--help"], capture_output=True, text=True,
                             timeout=60)
        text = " ".join(res.stdout.split())
        assert res.returncode == 0
        assert "FABRICA_PORT" in text and "FABRICA_WSGI_SERVER" in text and "(default: 8080)" in text
        assert "--wsgi-server" in text


###############################################################################
# The open server ##############################################################
###############################################################################

class TestOpenServer:
    def test_the_cli_creates_a_kind_the_open_server_does_not_have_yet(self, tmp_path):
        proc, port, _ = start([FABRICA_PY, "serve", "--port", "0", "--data-dir", tmp_path / "d"], cwd=tmp_path)
        url = f"http://127.0.0.1:{port}"
        try:
            assert cli(url, "-o", "name", "get", "widgets").stdout == ""
            made = cli(url, "widget", "create", "--spec", '{"name": "w1", "size": 3}')
            assert made.returncode == 0, made.stderr
            assert json.loads(made.stdout)["kind"] == "Widget"
            assert cli(url, "-o", "name", "get", "widgets").stdout == "widget/w1\n"
        finally:
            stop(proc)

    def test_start_up_names_the_stored_kinds_the_app_does_not_register(self, tmp_path):
        """`serve --data-dir ./data` without the app serves the rack data without schema: it says so."""
        proc, port, _ = start([FABRICA_PY, "serve", RACKS, "--port", "0", "--data-dir", tmp_path / "d"],
                              cwd=tmp_path)
        made = cli(f"http://127.0.0.1:{port}", "racktemplate", "create", "--spec",
                   json.dumps({"name": "t1", **TEMPLATE["spec"]}))
        stop(proc)
        assert made.returncode == 0, made.stderr
        proc = subprocess.Popen([sys.executable, str(FABRICA_PY), "serve", "--port", "0", "--data-dir",
                                 str(tmp_path / "d")], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                                stdout=subprocess.DEVNULL)
        lines = []
        while not READY.search(lines[-1] if lines else ""):
            lines.append(read_line(proc, 30))
            if not lines[-1]:
                proc.kill()
                raise AssertionError("no ready line:\n" + "".join(lines))
        stop(proc)
        warning = next((ln for ln in lines if "does not register" in ln), "")
        assert "WARNING" in warning and "RackTemplate" in warning, "".join(lines)


###############################################################################
# Small things #################################################################
###############################################################################

class TestSmallThings:
    def test_kinds_name_output_is_the_kind_names(self, racks):
        names = cli(racks, "kinds", "-o", "name").stdout.splitlines()
        assert "Rack" in names and not any("{" in n for n in names)

    def test_an_error_prints_its_message_once(self, racks):
        res = cli(racks, "racktemplate", "create", "--spec", '{"name": "s1", "status": {"phase": "x"}}')
        assert res.returncode == 1 and res.stderr.count("\n") == 1
        assert res.stderr.count("is not a spec field") == 1, res.stderr

    def test_cannot_connect_names_fabrica_server(self):
        res = cli("http://127.0.0.1:1", "get", "racks")
        assert res.returncode == 3 and "FABRICA_SERVER" in res.stderr


###############################################################################
# README ######################################################################
###############################################################################

def test_readme_kubectl_walkthrough_runs_as_written(tmp_path):
    pytest.importorskip("yaml")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The same walkthrough in kubectl's word order"):]
    block = section[section.index("```sh") + 5:]
    block = block[:block.index("```")].strip()
    heredoc = re.search(r"cat > racks\.yaml <<'EOF'\n(.*?)\nEOF\n", block, re.S)
    (tmp_path / "racks.yaml").write_text(heredoc.group(1) + "\n")
    proc, port, _ = start([FABRICA_PY, "serve", RACKS, "--data-dir", tmp_path / "data", "--port", "0",
                           "--no-fsync"], cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        outputs = []
        for line in block[heredoc.end():].splitlines():
            argv = line.split("#")[0].split()
            assert argv[:2] == ["python", "fabrica.py"], line
            res = subprocess.run([sys.executable, str(FABRICA_PY), *argv[2:]], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=90, env=dict(os.environ, FABRICA_SERVER=url))
            assert res.returncode == 0 and "Traceback" not in res.stderr, f"{line}\n{res.stderr}"
            outputs.append(res.stdout)
        assert outputs[0].splitlines() == ["racktemplate/standard created", "rack/rack-01 created"]
        assert outputs[4].splitlines() == ["racktemplate/standard unchanged", "rack/rack-01 unchanged"]
        assert "Dependents:" in outputs[3] and "chassis/" in outputs[3]
        wait_for(lambda: http(url, "/nodes") == [])
    finally:
        stop(proc)


###############################################################################
# Writing an app ##############################################################
###############################################################################

class TestRetryLogging:
    def test_one_traceback_per_failure_streak_then_one_line_per_retry(self, tmp_path, caplog):
        sys.path.insert(0, str(ROOT))
        try:
            import fabrica
        finally:
            sys.path.remove(str(ROOT))
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            raise ValueError("disk 'd1' is missing")

        caplog.set_level("ERROR", logger="fabrica.controller")
        with app:
            uid = app.client.create("Widget", name="w1").uid
            queue = app.controllers["Widget"].queue
            wait_for(lambda: queue.num_requeues(("Widget", uid)) >= 4)
        failures = [r for r in caplog.records if "w1" in r.getMessage() and "raised" in r.getMessage()]
        assert len(failures) >= 3
        assert failures[0].exc_info is not None
        assert all(r.exc_info is None for r in failures[1:])
        assert re.search(r"raised again \(attempt 2, next in [0-9.e-]+s\): disk 'd1' is missing",
                         failures[1].getMessage()), failures[1].getMessage()


class TestWiringMistakes:
    @staticmethod
    def fabrica():
        sys.path.insert(0, str(ROOT))
        try:
            import fabrica
        finally:
            sys.path.remove(str(ROOT))
        return fabrica

    def test_owns_a_kind_never_registered(self, tmp_path):
        fabrica = self.fabrica()
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"))
        app.register("Cluster", lambda ctx, obj: None, owns=["Nope"])
        with pytest.raises(fabrica.ConfigurationError, match="'Nope' is no registered kind"):
            app.start()

    def test_owns_without_a_reconcile(self, tmp_path):
        fabrica = self.fabrica()
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"))
        app.register("Disk")
        app.register("VM", owns=["Disk"])
        with pytest.raises(fabrica.ConfigurationError, match="has none"):
            app.start()


###############################################################################
# Issue 14, the rest: status, discovery, metrics, the clients, the table ######
###############################################################################

def import_fabrica():
    sys.path.insert(0, str(ROOT))
    try:
        import fabrica
    finally:
        sys.path.remove(str(ROOT))
    return fabrica


def wsgi(app, path, headers=None, method="GET"):
    """One in-process request to ``app.wsgi``: (status, headers, body bytes); ``path`` may carry a query."""
    import io
    import urllib.parse
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": urllib.parse.unquote(path, "latin-1"), "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "HTTP_HOST": "127.0.0.1", "wsgi.input": io.BytesIO(b""), "CONTENT_LENGTH": "0",
               "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(), "SERVER_PROTOCOL": "HTTP/1.1"}
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    got = {}

    def start_response(status, response_headers, exc_info=None):
        got["status"], got["headers"] = int(status.split()[0]), dict(response_headers)
    chunks = app.wsgi(environ, start_response)
    body = b"".join(chunks)
    getattr(chunks, "close", lambda: None)()
    return got["status"], got["headers"], body


class TestFailureReasons:
    """Ready=False tells by its reason and message whether a retry comes, and when (SPEC §5.3)."""

    @staticmethod
    def app(tmp_path):
        fabrica = import_fabrica()
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            mode = obj.spec.get("mode")
            if mode == "permanent":
                raise fabrica.PermanentError("spec.size must be even")
            if mode == "temporary":
                raise fabrica.TemporaryError("controller busy", delay=3600)
            if mode == "error":
                raise ValueError("disk 'd1' is missing")
            obj.status["phase"] = "Done"
        return app

    @pytest.mark.parametrize("mode, reason, message", [
        ("permanent", "ReconcilePermanentError", r"spec\.size must be even; not retried until the object changes"),
        ("temporary", "ReconcileTemporaryError", r"controller busy; retrying in 3600s"),
        ("error", "ReconcileError", r"disk 'd1' is missing; retrying in [0-9.]+s"),
    ])
    def test_each_failure_has_its_reason_and_says_what_comes_next(self, tmp_path, mode, reason, message):
        app = self.app(tmp_path)
        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"mode": mode})
            ready = wait_for(lambda: c.get("Widget", "w1").condition("Ready"))
            assert (ready["status"], ready["reason"]) == ("False", reason)
            assert re.fullmatch(message, ready["message"]), ready["message"]

    @pytest.mark.parametrize("mode", ["permanent", "temporary", "error"])
    def test_the_first_successful_run_clears_each_of_them(self, tmp_path, mode):
        app = self.app(tmp_path)
        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"mode": mode})
            wait_for(lambda: c.get("Widget", "w1").condition("Ready"))
            c.patch("Widget", "w1", {"mode": "ok"})
            wait_for(lambda: c.get("Widget", "w1").status.get("phase") == "Done")
            ready = c.get("Widget", "w1").condition("Ready")
            assert (ready["status"], ready["reason"]) == ("True", "ReconcileSuccess")

    def test_a_finalizer_that_fails_for_good_says_so(self, tmp_path):
        fabrica = import_fabrica()
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        def refuse(ctx, obj):
            raise fabrica.PermanentError("cannot release")
        app.register("Lease", finalize=refuse)
        with app:
            app.client.create("Lease", name="l1")
            app.client.delete("Lease", "l1")
            ready = wait_for(lambda: app.client.get("Lease", "l1").condition("Ready"))
            assert ready["reason"] == "ReconcilePermanentError"
            assert ready["message"] == "cannot release; not retried until the object changes"


class TestRoot:
    """GET /: a browser gets the dashboard, a JSON client gets discovery (SPEC §6.1, §11)."""

    BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

    @pytest.fixture
    def app(self, tmp_path):
        app = import_fabrica().Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget")
        return app

    def test_a_browser_gets_the_dashboard(self, app):
        status, headers, body = wsgi(app, "/", {"Accept": self.BROWSER})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"EventSource" in body and "Accept" in headers["Vary"]
        status, headers, _ = wsgi(app, "/docs", {"Accept": self.BROWSER})
        assert status == 200 and headers["Content-Type"].startswith("text/html")

    @pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
    def test_a_json_client_gets_the_discovery_document(self, app, accept):
        status, headers, body = wsgi(app, "/", {"Accept": accept} if accept else None)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == json.loads(wsgi(app, "/apis")[2])
        assert [k["kind"] for k in json.loads(body)["kinds"]] == ["Widget"]

    def test_the_openapi_document_describes_both_answers(self, app):
        get = json.loads(wsgi(app, "/openapi.json")[2])["paths"]["/"]["get"]
        assert set(get["responses"]["200"]["content"]) == {"application/json", "text/html"}


class TestWhatHasAController:
    """A kind with a reconcile or a finalize has a controller: discovery, /health and /metrics agree."""

    @pytest.fixture
    def app(self, tmp_path):
        app = import_fabrica().Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Plain")
        app.register("Tag", finalize=lambda ctx, obj: None)
        app.register("Rack", lambda ctx, obj: obj.set_condition("Ready", False, reason="Waiting"))
        return app

    def test_discovery_and_health_name_a_finalize_only_kind(self, app):
        with app:
            kinds = {k["kind"]: k["controller"] for k in json.loads(wsgi(app, "/apis")[2])["kinds"]}
            assert kinds == {"Plain": False, "Tag": True, "Rack": True}
            assert set(json.loads(wsgi(app, "/health")[2])["workers"]) == {"Tag", "Rack"}

    def test_objects_not_ready_counts_only_kinds_with_a_controller(self, app):
        with app:
            for kind in ("Plain", "Tag", "Rack"):
                app.client.create(kind, name="x1")
            assert app.wait_idle(30)
            text = wsgi(app, "/metrics")[2].decode()
        samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                       if line.startswith("fabrica_objects_not_ready{"))
        assert samples == {'fabrica_objects_not_ready{kind="Rack"}': "1", 'fabrica_objects_not_ready{kind="Tag"}': "1"}
        help_line = next(line for line in text.splitlines() if line.startswith("# HELP fabrica_objects_not_ready "))
        assert "with a controller" in help_line
        assert 'fabrica_objects{kind="Plain"} 1' in text


class TestUtf8Requests:
    """Query parameters and headers are the UTF-8 text the client sent; bytes that are not UTF-8 are a 400."""

    @pytest.fixture
    def app(self, tmp_path):
        app = import_fabrica().Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget", history=True)
        with app:
            app.client.create("Widget", name="w1")
            yield app

    @pytest.mark.parametrize("path, value", [
        ("/events?kind=%C3%BC", "'ü'"),                       # no such kind
        ("/events?since=%C3%BC", "'ü'"),                      # no such event id
        ("/widgets?labelSelector=%C3%BC%3D1", "ü"),           # no such label key
        ("/widgets?limit=%C3%BC", "'ü'"),
        ("/widgets/w1/events?limit=%C3%BC", "'ü'"),
    ])
    def test_a_non_ascii_parameter_comes_back_as_sent(self, app, path, value):
        status, _, body = wsgi(app, path)
        message = json.loads(body)["error"]
        assert status in (400, 404), body
        assert value in message and "Ã" not in message, message

    def test_a_non_ascii_header_comes_back_as_sent(self, app):
        status, _, body = wsgi(app, "/widgets/w1", {"If-Match": '"ü"'.encode().decode("latin-1")}, method="DELETE")
        message = json.loads(body)["error"]
        assert status == 412 and "ü" in message and "Ã" not in message, message

    @pytest.mark.parametrize("path, headers", [
        ("/events?kind=%FF", None),
        ("/widgets?name=%FF", None),
        ("/widgets/w1?force=%FF", None),
        ("/widgets/w%FF1", None),                             # Bottle would drop the byte and find w1
        ("/events", {"Last-Event-ID": "\xff"}),
    ])
    def test_bytes_that_are_not_utf8_are_a_bad_request(self, app, path, headers):
        method = "DELETE" if "force" in path else "GET"
        status, _, body = wsgi(app, path, headers, method=method)
        assert status == 400, body
        assert "not valid UTF-8" in json.loads(body)["error"]
        assert app.client.get("Widget", "w1").name == "w1"


@pytest.fixture(scope="module")
def owners_url(tmp_path_factory):
    """A server of kinds Owner and Part on a fresh data dir; its URL."""
    tmp = tmp_path_factory.mktemp("owners")
    (tmp / "owners.py").write_text('import fabrica\napp = fabrica.Fabrica()\napp.register("Owner")\n'
                                   'app.register("Part")\n')
    proc, port, _ = start([FABRICA_PY, "serve", tmp / "owners.py", "--data-dir", tmp / "data", "--port", "0",
                           "--no-fsync"], cwd=tmp)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


class TestOwnerArgument:
    """``owner=`` takes the object or a ``(kind, ref)`` tuple on both clients; anything else is a clear TypeError."""

    @pytest.fixture(params=["app.client", "Client"])
    def client(self, request, tmp_path):
        fabrica = import_fabrica()
        if request.param == "Client":
            with fabrica.Client(request.getfixturevalue("owners_url")) as client:
                yield client
            return
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Owner")
        app.register("Part")
        with app:
            yield app.client

    def test_a_kind_and_ref_tuple_names_the_owner(self, client, request):
        suffix = request.node.callspec.id.replace(".", "").lower()
        owner = client.create("Owner", name=f"own-{suffix}")
        by_name = client.create("Part", name=f"p1-{suffix}", owner=("Owner", owner.name))
        by_uid = client.create("Part", name=f"p2-{suffix}", owner=("Owner", owner.uid))
        client.create("Part", name=f"p3-{suffix}")
        for part in (by_name, by_uid):
            assert part.owner_references[0]["uid"] == owner.uid and part.owner_references[0]["controller"]
        expected = [f"p1-{suffix}", f"p2-{suffix}"]
        assert [p.name for p in client.list("Part", owner=("Owner", owner.name))] == expected
        assert [p.name for p in client.list("Part", owner=owner)] == expected

    def test_a_missing_owner_is_a_conflict_on_create_and_not_found_on_list(self, client):
        fabrica = import_fabrica()
        with pytest.raises(fabrica.ConflictError, match="does not exist"):
            client.create("Part", name="orphan", owner=("Owner", "nobody"))
        with pytest.raises(fabrica.NotFoundError):
            client.list("Part", owner=("Owner", "nobody"))

    @pytest.mark.parametrize("owner", ["own1", ("Owner",), ["Owner", "own1"], {"name": "own1"}, 42])
    def test_anything_else_is_a_type_error_that_says_what_to_pass(self, client, owner):
        with pytest.raises(TypeError, match=r"owner must be an object .* or a \(kind, ref\) tuple"):
            client.create("Part", name="bad", owner=owner)
        with pytest.raises(TypeError, match=r"owner must be an object .* or a \(kind, ref\) tuple"):
            client.list("Part", owner=owner)


class TestTerminalOutput:
    """What the server holds reaches the terminal one field per line, without control characters."""

    FORGED = "Ok\nforged-row   fake-1a2b3c4d   Ready   1s\x1b[31m\x9b2J\u2028"

    @pytest.fixture
    def url(self, owners_url, request):
        fabrica = import_fabrica()
        with fabrica.Client(owners_url) as client:
            name = "term-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.split("_", 1)[1])[:40].strip("-")
            obj = client.create("Part", name=name, annotations={"note": "a\nName:         forged"},
                                spec={"text": "x\x9b2J\u2028y"})
            client.update_status("Part", obj.uid, {"phase": self.FORGED, "conditions": [
                {"type": "Ready", "status": "False", "reason": "Broken", "message": "m\x1b]0;title\x07\nREADY"}]})
        return owners_url, name

    @staticmethod
    def assert_clean(text):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), repr(text)
        assert "forged-row" not in [line.split(" ")[0] for line in text.splitlines()]

    @pytest.mark.parametrize("wide", [[], ["-o", "wide"]])
    def test_get_prints_one_row_per_object(self, url, wide):
        base, name = url
        res = cli(base, "get", "part", name, "-o", "table", *wide)
        assert res.returncode == 0, res.stderr
        self.assert_clean(res.stdout)
        rows = res.stdout.splitlines()
        assert len(rows) == 2 and rows[1].startswith(name) and "\\n" in rows[1] and "\\x1b" in rows[1], rows

    def test_json_output_escapes_what_a_terminal_acts_on(self, url):
        base, name = url
        res = cli(base, "get", "part", name, "-o", "json")
        assert res.returncode == 0, res.stderr
        self.assert_clean(res.stdout)
        assert json.loads(res.stdout)["status"]["phase"] == self.FORGED

    def test_describe_keeps_each_field_on_its_line(self, url):
        base, name = url
        res = cli(base, "describe", "part", name)
        assert res.returncode == 0, res.stderr
        self.assert_clean(res.stdout)
        assert [line for line in res.stdout.splitlines() if line.startswith("Name:")] == [f"Name:         {name}"]
        assert not any(line.startswith("READY") for line in res.stdout.splitlines())
