"""Smoke test of benchmarks/run.py: it runs, prints the table and writes results JSON that parses.

Nothing here is timing-based: the numbers are whatever this machine gives;
only the harness (a real ``fabrica.py serve`` subprocess, the raw Bottle
baseline, the load generator, an in-process controller run) is exercised.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def test_quick_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-install",
         "--only", "overhead.get,controller.storm", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("measurement"))
    assert [c.strip() for c in header.split("|")] == ["measurement", "fabrica", "baseline", "ratio", "target", "met?"]
    assert "GET one resource [builtin" in proc.stdout
    assert "reconciles per 100 updates of one key" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick"
    assert doc["machine"]["python"] and doc["machine"]["cores"]
    rows = {row["id"]: row for row in doc["rows"]}
    get, storm = rows["overhead.builtin.get"], rows["controller.storm"]
    assert get["na"] is None, get["na"]
    assert get["fabrica"] > 0 and get["baseline"] > 0 and get["ratio"] > 0
    assert storm["na"] is None, storm["na"]
    assert storm["raw"]["fabrica_converged"] is True
    assert doc["table"] in proc.stdout
