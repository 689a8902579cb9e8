"""Drive a server on loopback with wrk (preferred) or the Python keep-alive client, pinned to CLIENT_CPU."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from common import BENCH, CLIENT_CPU, PY, Unavailable, pinned

WRK_SCRIPT = BENCH / "wrk_bench.lua"


class LoadGen:
    def __init__(self, wrk: str | None, workdir: Path, why_not_wrk: str = ""):
        self.wrk = wrk
        self.workdir = workdir
        self.tool = "wrk" if wrk else "python keep-alive client"
        self.why_not_wrk = why_not_wrk
        self._files: dict[tuple, str] = {}

    def _paths_file(self, paths: list[str]) -> str:
        key = tuple(paths)
        if key not in self._files:
            fd, name = tempfile.mkstemp(prefix="paths-", suffix=".txt", dir=self.workdir)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(paths) + "\n")
            self._files[key] = name
        return self._files[key]

    def run(self, port: int, method: str, paths: list[str], *, conns: int, duration: float,
            body: str | None = None, random: bool = False, timeout: float = 10.0) -> dict:
        """One load run; returns rps (successful responses/s), p50_ms, p99_ms, errors, requests."""
        pfile = self._paths_file(paths)
        limit = duration + timeout + 30
        if self.wrk:
            env = dict(os.environ, BENCH_METHOD=method, BENCH_PATHS=pfile, BENCH_RANDOM="1" if random else "0")
            env.pop("BENCH_BODY", None)
            if body is not None:
                env["BENCH_BODY"] = body
            cmd = [self.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", f"--timeout={int(timeout)}s",
                   "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}"]
        else:
            env = dict(os.environ)
            cmd = [PY, str(BENCH / "pyload.py"), "--port", str(port), "--method", method, "--paths", pfile,
                   "--conns", str(conns), "--duration", str(duration), "--timeout", str(timeout)]
            if body is not None:
                cmd += ["--body", body]
            if random:
                cmd.append("--random")
        try:
            out = subprocess.run(pinned(cmd, CLIENT_CPU), capture_output=True, timeout=limit, env=env,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"load generator timed out after {limit:.0f}s") from None
        text = out.stdout.decode("utf-8", "replace")
        line = next((ln for ln in text.splitlines()[::-1] if ln.startswith(("BENCHJSON ", "{"))), None)
        if out.returncode != 0 or line is None:
            raise Unavailable(f"load generator failed ({out.returncode}): {out.stderr.decode()[-200:]} {text[-200:]}")
        raw = json.loads(line.removeprefix("BENCHJSON "))
        seconds = max(raw["duration_us"] / 1e6, 1e-9)
        errors = raw["status_errors"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
        ok = max(0, raw["requests"] - raw["status_errors"])
        return {"rps": ok / seconds, "requests": raw["requests"], "errors": errors,
                "p50_ms": raw["p50_us"] / 1000.0, "p99_ms": raw["p99_us"] / 1000.0,
                "mean_ms": raw["mean_us"] / 1000.0, "seconds": seconds}
