#!/usr/bin/env python3
"""fabrica's benchmarks: the project side by side with baselines measured in the same run.

    python benchmarks/run.py [--quick] [--only SECTION[.ITEM],...] [--sizes N,...] [--out FILE] [--no-install]

Prints one table (measurement | fabrica | baseline | ratio | target | met?)
and writes it, with the machine's description, to benchmarks/results.json
(or --out). Every number is a median of several runs; every ratio is
against a baseline measured in this same run on this same machine.

Sections (``--only`` takes these names, or finer ids such as overhead.get,
durability.c16, scale.get, controller.noop):

  overhead    fabrica serve vs a raw Bottle app on the same WSGI server: GET, POST, PUT, list 100
  durability  durable creates/s at 1, 4, 16 clients vs a bare temp+fsync+replace+dir-fsync loop
  peer        json-server 1.x and 0.17 (npm, installed into a temp folder): GET, list page, POST
  scale       1k/10k/100k objects: start-up, memory, GET p50/p99, selector and page lists, resync
  controller  no-op reconciles/s (1, 2, 4 workers), create->Ready latency, update storm

--quick: N = 1,000 only, short runs, fewer repetitions, the built-in server
only; finishes in about two minutes. Full mode takes 20-35 minutes.
Installs (each bounded in time; a failure makes the rows "n/a (reason)"):
wrk (apt-get), json-server (npm, into a folder under /tmp), granian (pip).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import (BENCH, FABRICA, PY, SERVER_CPU, Server, Unavailable, free_port, http, log,  # noqa: E402
                    median, run_json)
from loadgen import LoadGen  # noqa: E402

RESULTS = BENCH / "results.json"
SECTIONS = ("overhead", "durability", "peer", "scale", "controller")

QUICK = {"duration": 2.0, "short": 1.0, "runs": 2, "scale_runs": 1, "sizes": [1000], "servers": ["builtin"],
         "durability_runs": 1, "diagnostics": False, "peer_runs": 1, "startup_runs": 2, "controller_passes": 10,
         "ready_count": 30, "conc": [1, 4, 16], "server_survey": False}
FULL = {"duration": 3.0, "short": 3.0, "runs": 4, "scale_runs": 3, "sizes": [1000, 10000, 100000],
        "servers": ["builtin", "waitress", "granian", "granian-t4"], "durability_runs": 5, "diagnostics": True,
        "peer_runs": 3, "startup_runs": 3, "controller_passes": 20, "ready_count": 100, "conc": [1, 4, 16],
        "server_survey": True}
CONNS = 4                       # connections for the throughput rows
OBJECTS = 1000                  # objects behind the overhead and controller rows
LIST_SIZE = 100                 # the "list 100 resources" collection


# -- rows and the table ------------------------------------------------------------

class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, id, measurement, fabrica=None, baseline=None, *, unit="", better="higher", target=None,
            ratio=None, note="", na=None, baseline_name="", raw=None):
        """One row. ``target`` is (op, value) applied to the ratio; ``better`` says which way is good."""
        if ratio is None and fabrica is not None and baseline:
            ratio = fabrica / baseline
        met = None
        if target is not None and ratio is not None and na is None:
            op, value = target
            met = ratio >= value if op == ">=" else ratio <= value
        row = {"id": id, "measurement": measurement, "fabrica": fabrica, "baseline": baseline,
               "baseline_name": baseline_name, "unit": unit, "better": better, "ratio": ratio,
               "target": None if target is None else f"{target[0]} {target[1]}x", "met": met, "note": note,
               "na": na, "raw": raw}
        self.rows.append(row)
        shown = "n/a (" + na + ")" if na else f"{_fmt(fabrica, unit)} vs {_fmt(baseline, unit)} ratio {_fmt_ratio(ratio)}"
        log(f"  {measurement}: {shown}")
        return row

    def na(self, id, measurement, reason, target=None):
        return self.add(id, measurement, na=reason, target=target)

    def render(self) -> str:
        head = ["measurement", "fabrica", "baseline", "ratio", "target", "met?"]
        lines = [head]
        for r in self.rows:
            if r["na"]:
                lines.append([r["measurement"], f"n/a ({r['na']})", "", "", r["target"] or "", ""])
                continue
            base = _fmt(r["baseline"], r["unit"])
            if r["baseline_name"]:
                base = f"{base} ({r['baseline_name']})" if r["baseline"] is not None else r["baseline_name"]
            met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
            lines.append([r["measurement"], _fmt(r["fabrica"], r["unit"]), base, _fmt_ratio(r["ratio"]),
                          r["target"] or "", met])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        widths[0] = min(widths[0], 70)
        out = []
        for n, line in enumerate(lines):
            out.append(" | ".join(str(c)[:widths[i]].ljust(widths[i]) if i == 0 else str(c).ljust(widths[i])
                                  for i, c in enumerate(line)).rstrip())
            if n == 0:
                out.append("-+-".join("-" * w for w in widths))
        return "\n".join(out)


def _fmt(value, unit) -> str:
    if value is None:
        return "-"
    if unit == "req/s" or unit == "writes/s" or unit == "reconciles/s":
        return f"{value:,.0f} {unit}"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:.3g} {unit}".strip()


def _fmt_ratio(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


# -- the benchmark ---------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(QUICK if args.quick else FULL)
        if args.duration:
            self.cfg["duration"] = args.duration
        if args.runs:
            self.cfg["runs"] = args.runs
        if args.servers:
            self.cfg["servers"] = args.servers.split(",")
        if args.sizes:
            self.cfg["sizes"] = [int(n) for n in args.sizes.split(",")]
        self.only = [t.strip() for t in (args.only or "").split(",") if t.strip()]
        self.table = Table()
        self.root = Path(tempfile.mkdtemp(prefix="fabrica-bench-"))
        self.notes: list[str] = []
        self.best_get_server = None         # fabrica's fastest supported server for GET (overhead section)
        self._get_by_server: dict[str, float] = {}
        try:
            self.wrk = common.ensure_wrk(not args.no_install)
            self.load = LoadGen(self.wrk, self.root)
        except Unavailable as exc:
            self.wrk = None
            self.load = LoadGen(None, self.root, str(exc))
            self.notes.append(f"load generator: Python keep-alive client (wrk unavailable: {exc}); "
                              "it tops out at a few thousand requests/s, so fast servers are under-measured")
        log(f"load generator: {self.load.tool}; {common.pinning_note()}; scratch: {self.root}")

    def want(self, id: str) -> bool:
        if not self.only:
            return True
        return any(id == t or id.startswith(t + ".") or t.startswith(id + ".") for t in self.only)

    def step(self, id, label, fn, *args, **kwargs):
        """Run one measurement; an exception becomes an n/a row and the rest goes on."""
        if not self.want(id.split(".")[0]):
            return None
        log(f"{label} ...")
        try:
            return fn(*args, **kwargs)
        except Unavailable as exc:
            self.table.na(id, label, str(exc)[:160])
        except Exception as exc:       # a benchmark bug must not hide the other rows
            traceback.print_exc()
            self.table.na(id, label, f"{type(exc).__name__}: {str(exc)[:140]}")
        return None

    # -- servers ---------------------------------------------------------------
    def fabrica_server(self, data_dir, *, server="builtin", threads=None, durable=True, name="fabrica") -> Server:
        port = free_port()
        cmd = [PY, str(FABRICA), "serve", str(BENCH / "bench_app.py"), "--data-dir", str(data_dir),
               "--port", str(port), "--log-level", "warning"]
        if server != "builtin":
            cmd += ["--server", server]
        if threads:
            cmd += ["--max-threads", str(threads)]
        if not durable:
            cmd.append("--no-fsync")
        return Server(f"{name}-{server}", cmd, port, "/health", workdir=self.root, cwd=self.root)

    def raw_server(self, data_dir, *, server="builtin", threads=None) -> Server:
        port = free_port()
        cmd = [PY, str(BENCH / "raw_bottle.py"), "--data-dir", str(data_dir), "--port", str(port),
               "--server", server]
        if threads:
            cmd += ["--threads", str(threads)]
        return Server(f"raw-{server}", cmd, port, "/health", workdir=self.root)

    def seed(self, name, n_items, n_widgets=0) -> Path:
        import seed
        folder = self.root / name
        if folder.exists():
            shutil.rmtree(folder)
        seed.seed_fabrica(folder, "Item", "items", n_items)
        if n_widgets:
            seed.seed_fabrica(folder, "Widget", "widgets", n_widgets)
        return folder

    def server_ready(self, server_name: str) -> None:
        if server_name == "waitress":
            common.ensure_pip("waitress", "waitress>=3", not self.args.no_install)
        elif server_name.startswith("granian"):
            common.ensure_pip("granian", "granian>=2,<3", not self.args.no_install)

    # -- 1. framework overhead ---------------------------------------------------
    OPS = {
        # op: (method, paths(kind data), body, label)
        "get": ("GET one resource", "req/s", (">=", 0.85)),
        "post": ("POST create (durable)", "req/s", (">=", 0.8)),
        "put": ("PUT spec (durable)", "req/s", (">=", 0.8)),
        "list": (f"list {LIST_SIZE} resources", "req/s", None),
    }

    def _op_request(self, op):
        import seed
        objs = [seed.make_object("Item", "item", i) for i in range(OBJECTS)]
        if op == "get":
            return "GET", [f"/items/{objs[5]['metadata']['uid']}"], None
        if op == "post":
            return "POST", ["/items"], '{"color":"red","size":__N__,"replicas":3,"owner":"team-1"}'
        if op == "put":
            return "PUT", [f"/items/{o['metadata']['name']}" for o in objs[:100]], \
                '{"color":"blue","size":__N__,"replicas":3,"owner":"team-2"}'
        return "GET", ["/widgets"], None

    def overhead(self):
        for server in self.cfg["servers"]:
            if not self.want(f"overhead.{server}") and not any(self.want(f"overhead.{op}") for op in self.OPS):
                continue
            ops = [op for op in self.OPS if self.want(f"overhead.{op}") or self.want(f"overhead.{server}.{op}")]
            if not ops:
                continue
            self.step(f"overhead.{server}", f"overhead on {server}", self._overhead_server, server, ops)
        if self.cfg["server_survey"] and self.want("overhead.survey"):
            self.step("overhead.survey", "raw Bottle GET on each WSGI server", self._survey)

    SURVEY = [("builtin", None), ("waitress", None), ("granian", 64), ("granian", 4), ("granian", 1),
              ("granian-mp", 64), ("granian-mp", 4)]

    def _survey(self):
        """Which server is fastest for a plain Bottle app here (the issue quotes ~3.3k / 7.2k / 16k)."""
        import seed
        rdir = self.seed("survey", OBJECTS, LIST_SIZE)
        path = f"/items/{seed.make_object('Item', 'item', 5)['metadata']['uid']}"
        results = {}
        for server, threads in self.SURVEY:
            label = server + (f" ({threads} threads)" if threads else "")
            try:
                self.server_ready(server)
                with self.raw_server(rdir, server=server, threads=threads) as raw:
                    res = [self.load.run(raw.port, "GET", [path], conns=CONNS, duration=self.cfg["duration"])
                           for _ in range(3)]
                results[label] = (median([x["rps"] for x in res]), res)
            except Unavailable as exc:
                self.table.na(f"overhead.survey.{label}", f"raw Bottle GET on {label}", str(exc)[:160])
        base = results.get("builtin", (None,))[0]
        for label, (rps, res) in results.items():
            self.table.add(f"overhead.survey.{label}", f"raw Bottle GET on {label} [{CONNS} conns]", rps, base,
                           unit="req/s", baseline_name="raw on builtin", raw=res)

    def _overhead_server(self, server, ops):
        try:
            self.server_ready(server)
        except Unavailable as exc:
            for op in ops:
                self.table.na(f"overhead.{server}.{op}", f"{self.OPS[op][0]} [{server}]", str(exc), self.OPS[op][2])
            return
        threads = 4 if server == "granian-t4" else None
        srv_name = "granian" if server.startswith("granian") else server
        fdir = self.seed(f"overhead-{server}-fabrica", OBJECTS, LIST_SIZE)
        rdir = self.seed(f"overhead-{server}-raw", OBJECTS, LIST_SIZE)
        with self.fabrica_server(fdir, server=srv_name, threads=threads) as fab, \
                self.raw_server(rdir, server=srv_name, threads=threads or (64 if srv_name == "granian" else None)) as raw:
            for op in ops:
                label, unit, target = self.OPS[op]
                method, paths, body = self._op_request(op)
                f_runs, r_runs = [], []
                for r in range(self.cfg["runs"]):
                    order = [(fab, f_runs), (raw, r_runs)] if r % 2 == 0 else [(raw, r_runs), (fab, f_runs)]
                    for srv, sink in order:
                        sink.append(self.load.run(srv.port, method, paths, conns=CONNS,
                                                  duration=self.cfg["duration"], body=body))
                f_rps = median([x["rps"] for x in f_runs])
                r_rps = median([x["rps"] for x in r_runs])
                errs = sum(x["errors"] for x in f_runs + r_runs)
                note = f"{errs} errors" if errs else ""
                self.table.add(f"overhead.{server}.{op}", f"{label} [{server}, {CONNS} conns]", f_rps, r_rps,
                               unit="req/s", target=target, baseline_name="raw Bottle", note=note,
                               raw={"fabrica": f_runs, "baseline": r_runs})
                if op == "get":
                    self._get_by_server[server] = f_rps

    # -- 2. durability -------------------------------------------------------------
    def durability(self):
        self.step("durability", "durable creates/s vs a bare fsync loop", self._durability)

    def _durability(self):
        fdir = self.seed("durability-fabrica", 0)
        concs = [c for c in self.cfg["conc"] if self.want(f"durability.c{c}")]
        body = '{"color":"red","size":__N__,"replicas":3,"owner":"team-1"}'
        runs, dur = self.cfg["durability_runs"], self.cfg["short"]
        with self.fabrica_server(fdir) as fab:
            for c in concs:
                f_runs, b_runs = [], []
                for r in range(runs):
                    f_runs.append(self.load.run(fab.port, "POST", ["/items"], conns=c, duration=dur, body=body)["rps"])
                    bdir = self.root / f"bare-{c}-{r}"
                    b_runs.append(run_json([PY, str(BENCH / "inproc.py"), "bare-writes", "--dir", str(bdir),
                                            "--conc", str(c), "--duration", str(dur), "--variant", "per_write"],
                                           dur + 60, SERVER_CPU)["writes_per_s"])
                    shutil.rmtree(bdir, ignore_errors=True)
                self.table.add(f"durability.c{c}", f"durable creates/s, {c} client(s) [HTTP POST, builtin]",
                               median(f_runs), median(b_runs), unit="writes/s", target=(">=", 0.8),
                               baseline_name="bare loop", raw={"fabrica": f_runs, "baseline": b_runs})
        # diagnostics: the same engine without HTTP, and grouped directory fsyncs in the bare loop
        top = max(self.cfg["conc"])
        if self.want("durability.store") and (self.cfg["diagnostics"] or self.only):
            s_runs, b_runs = [], []
            for r in range(runs):
                sdir = self.root / f"store-{r}"
                s_runs.append(run_json([PY, str(BENCH / "inproc.py"), "store-writes", "--dir", str(sdir),
                                        "--conc", str(top), "--duration", str(dur)], dur + 60,
                                       SERVER_CPU)["writes_per_s"])
                bdir = self.root / f"bare-store-{r}"
                b_runs.append(run_json([PY, str(BENCH / "inproc.py"), "bare-writes", "--dir", str(bdir),
                                        "--conc", str(top), "--duration", str(dur)], dur + 60,
                                       SERVER_CPU)["writes_per_s"])
                shutil.rmtree(sdir, ignore_errors=True)
                shutil.rmtree(bdir, ignore_errors=True)
            self.table.add("durability.store", f"durable creates/s, {top} threads [in process, no HTTP]",
                           median(s_runs), median(b_runs), unit="writes/s", baseline_name="bare loop",
                           raw={"fabrica": s_runs, "baseline": b_runs})
        if self.want("durability.group") and (self.cfg["diagnostics"] or self.only):
            g_runs, b_runs, l_runs = [], [], []
            for r in range(runs):
                for variant, sink in (("group", g_runs), ("per_write", b_runs), ("locked", l_runs)):
                    bdir = self.root / f"bare-{variant}-{r}"
                    sink.append(run_json([PY, str(BENCH / "inproc.py"), "bare-writes", "--dir", str(bdir),
                                          "--conc", str(top), "--duration", str(dur), "--variant", variant],
                                         dur + 60, SERVER_CPU)["writes_per_s"])
                    shutil.rmtree(bdir, ignore_errors=True)
            self.table.add("durability.group", f"bare loop, grouped dir fsync vs one per write, {top} threads",
                           median(g_runs), median(b_runs), unit="writes/s", baseline_name="one fsync/write",
                           raw={"group": g_runs, "per_write": b_runs})
            self.table.add("durability.locked", f"bare loop, one lock across fsyncs (old store), {top} threads",
                           median(l_runs), median(b_runs), unit="writes/s", baseline_name="one fsync/write",
                           raw={"locked": l_runs, "per_write": b_runs})

    # -- 3 + 4. peer and scale, per collection size ----------------------------------
    def sizes(self):
        sizes = self.cfg["sizes"]
        want_peer, want_scale = self.want("peer"), self.want("scale")
        if not want_peer and not want_scale:
            return
        self._scale_ref = {}
        self._post_by_size = {}
        self._empty_rss = None
        if want_scale and self.want("scale.rss"):
            self.step("scale.rss", "resident memory of an empty server", self._empty_server_rss)
        peers = {}
        if want_peer:
            for version, spec in (("1.x", "1.0.0-beta.15"), ("0.17", "0.17.4")):
                try:
                    peers[version] = common.ensure_json_server(spec, not self.args.no_install)
                except Unavailable as exc:
                    peers[version] = exc
        for n in sizes:
            log(f"seeding {n:,} objects ...")
            fdir = self.seed(f"size-{n}", n)
            if want_scale:
                self.step("scale", f"scale at {n:,} objects", self._scale, n, fdir)
            if want_peer:
                self.step("peer", f"peer at {n:,} objects", self._peer, n, fdir, peers)
            shutil.rmtree(fdir, ignore_errors=True)
        if want_peer and len(self._post_by_size) > 1:
            first, last = min(self._post_by_size), max(self._post_by_size)
            if first != last:
                self.table.add("peer.post.flat", f"fabrica POST at {last:,} vs at {first:,} objects",
                               self._post_by_size[last], self._post_by_size[first], unit="req/s",
                               target=(">=", 0.8), baseline_name=f"fabrica at {first:,}")

    def _empty_server_rss(self):
        edir = self.seed("empty", 0)
        with self.fabrica_server(edir) as fab:
            http("GET", fab.port, "/items")
            self._empty_rss = fab.rss_bytes()

    def _scale(self, n, fdir):
        import seed as seedmod
        sample = [seedmod.make_object("Item", "item", i) for i in range(0, n, max(1, n // 1000))]
        runs, dur = self.cfg["scale_runs"], self.cfg["short"]
        # start-up: the real serve subprocess until /health answers, vs a process that only reads and parses
        if self.want("scale.startup"):
            f_t, b_t = [], []
            for _ in range(self.cfg["startup_runs"]):
                t0 = time.perf_counter()
                run_json([PY, str(BENCH / "inproc.py"), "parse", "--dir", str(fdir)], 600, SERVER_CPU)
                b_t.append(time.perf_counter() - t0)
                srv = self.fabrica_server(fdir)
                srv.ready_timeout = 600
                with srv:
                    f_t.append(srv.startup_seconds)
            self.table.add(f"scale.{n}.startup", f"start-up to first answer, {n:,} objects", median(f_t),
                           median(b_t), unit="s", better="lower", baseline_name="read+parse",
                           raw={"fabrica": f_t, "baseline": b_t})
        with self.fabrica_server(fdir) as fab:
            if self.want("scale.rss"):
                http("GET", fab.port, "/items?limit=1")
                parsed = run_json([PY, str(BENCH / "inproc.py"), "parse", "--dir", str(fdir)], 600, SERVER_CPU)
                if self._empty_rss is not None:
                    per = (fab.rss_bytes() - self._empty_rss) / n
                    self.table.add(f"scale.{n}.rss", f"resident memory per object, {n:,} objects", per,
                                   parsed["rss_delta_bytes"] / n, unit="B", better="lower",
                                   baseline_name="parsed dicts")
            if self.want("scale.get"):
                paths = [f"/items/{o['metadata']['uid']}" for o in sample]
                res = [self.load.run(fab.port, "GET", paths, conns=1, duration=dur, random=True) for _ in range(runs)]
                p50, p99 = median([x["p50_ms"] for x in res]), median([x["p99_ms"] for x in res])
                ref = self._scale_ref.setdefault("get", (n, p50, p99))
                self.table.add(f"scale.{n}.get_p50", f"GET p50, 1 client, {n:,} objects", p50, ref[1], unit="ms",
                               better="lower", target=("<=", 1.2) if n != ref[0] else None,
                               baseline_name=f"at {ref[0]:,}", raw=res)
                self.table.add(f"scale.{n}.get_p99", f"GET p99, 1 client, {n:,} objects", p99, ref[2], unit="ms",
                               better="lower", baseline_name=f"at {ref[0]:,}")
            if self.want("scale.selector"):
                groups = sorted({o["metadata"]["labels"]["group"] for o in sample})
                paths = [f"/items?labelSelector=group%3D{g}" for g in groups]
                res = [self.load.run(fab.port, "GET", paths, conns=1, duration=dur, random=True) for _ in range(runs)]
                p50 = median([x["p50_ms"] for x in res])
                ref = self._scale_ref.setdefault("selector", (n, p50))
                self.table.add(f"scale.{n}.selector", f"list with selector (10 matches) p50, {n:,} objects", p50,
                               ref[1], unit="ms", better="lower", target=("<=", 1.2) if n != ref[0] else None,
                               baseline_name=f"at {ref[0]:,}", raw=res)
            if self.want("scale.page"):
                res = [self.load.run(fab.port, "GET", ["/items?limit=100"], conns=1, duration=dur) for _ in range(runs)]
                p50 = median([x["p50_ms"] for x in res])
                ref = self._scale_ref.setdefault("page", (n, p50))
                self.table.add(f"scale.{n}.page", f"list first page (limit=100) p50, {n:,} objects", p50, ref[1],
                               unit="ms", better="lower", baseline_name=f"at {ref[0]:,}", raw=res)
        if self.want("scale.resync"):
            cdir = self.root / f"resync-{n}"
            shutil.copytree(fdir, cdir)
            out = run_json([PY, str(BENCH / "inproc.py"), "controller", "--dir", str(cdir), "--workers", "1",
                            "--passes", "3"], 900, SERVER_CPU)
            shutil.rmtree(cdir, ignore_errors=True)
            self.table.add(f"scale.{n}.resync", f"resync all objects (no-op reconcile, 1 worker), {n:,} objects",
                           median(out["fabrica_pass_s"]), median(out["baseline_pass_s"]), unit="s", better="lower",
                           baseline_name="bare queue.Queue", raw=out)

    def _peer(self, n, fdir, peers):
        quick = self.args.quick
        runs, dur = self.cfg["peer_runs"], self.cfg["short"]
        import seed as seedmod
        sample = [seedmod.make_object("Item", "item", i) for i in range(0, n, max(1, n // 1000))]
        get_paths = [f"/items/{o['metadata']['uid']}" for o in sample]
        body = '{"color":"red","size":__N__,"replicas":3,"owner":"team-1"}'
        ops = {"get": ("GET", get_paths, None), "page": ("GET", ["/items?limit=100"], None),
               "post": ("POST", ["/items"], body)}
        best = self._best_server()
        results = {}
        # fabrica: GET and list on its best supported server; durable POST on the built-in one
        for op, (method, paths, b) in ops.items():
            if not self.want(f"peer.{op}"):
                continue
            server = "builtin" if op == "post" else best
            try:
                self.server_ready(server)
            except Unavailable:
                server = "builtin"
            srv = self.fabrica_server(fdir, server=server if not server.startswith("granian") else "granian",
                                      threads=4 if server == "granian-t4" else None)
            srv.ready_timeout = 600
            with srv:
                results[("fabrica", op)] = (median([self.load.run(srv.port, method, paths, conns=CONNS, duration=dur,
                                                                  body=b, random=op == "get")["rps"]
                                                    for _ in range(runs)]), server)
        if ("fabrica", "post") in results:
            self._post_by_size[n] = results[("fabrica", "post")][0]
        for version, found in peers.items():
            if isinstance(found, Exception):
                for op in ops:
                    if self.want(f"peer.{op}"):
                        self.table.na(f"peer.{n}.{version}.{op}", f"peer {op} vs json-server {version}, {n:,}",
                                      str(found))
                continue
            if quick and n > 1000:
                continue
            node, script = found
            jdir = self.root / f"json-server-{version}-{n}"
            jdir.mkdir(exist_ok=True)
            db = jdir / "db.json"
            import seed
            seed.seed_json_server(db, "items", [seed.make_object("Item", "item", i) for i in range(n)])
            port = free_port()
            page = "/items?_page=1&_per_page=100" if version == "1.x" else "/items?_limit=100"
            host_flag = ["-h", "127.0.0.1"] if version == "1.x" else ["-H", "127.0.0.1", "-q"]
            srv = Server(f"json-server-{version}", [node, script, str(db), "-p", str(port)] + host_flag, port,
                         "/items/" + sample[0]["metadata"]["uid"], workdir=self.root, cwd=jdir, ready_timeout=300)
            jver = common.json_server_version(script)
            peer_ops = {"get": ops["get"], "page": ("GET", [page], None), "post": ops["post"]}
            try:
                with srv:
                    for op, (method, paths, b) in peer_ops.items():
                        if not self.want(f"peer.{op}") or ("fabrica", op) not in results:
                            continue
                        res = [self.load.run(port, method, paths, conns=CONNS, duration=dur, body=b,
                                             random=op == "get", timeout=30) for _ in range(runs)]
                        rps = median([x["rps"] for x in res])
                        f_rps, f_server = results[("fabrica", op)]
                        label = {"get": "GET one", "page": "list first 100", "post": "POST create"}[op]
                        target = None
                        if op == "get":
                            target = (">=", 1.0)
                        elif op == "post" and n == 10000:
                            target = (">=", 5.0)
                        extra = " (durable)" if op == "post" else ""
                        self.table.add(f"peer.{n}.{version}.{op}",
                                       f"{label}{extra} [{f_server}] vs json-server {version}, {n:,} objects",
                                       f_rps, rps, unit="req/s", target=target, baseline_name=f"json-server {jver}",
                                       note="json-server does not fsync" if op == "post" else "", raw=res)
            except Unavailable as exc:
                self.table.na(f"peer.{n}.{version}", f"json-server {version}, {n:,} objects", str(exc)[:160])
            finally:
                shutil.rmtree(jdir, ignore_errors=True)

    def _best_server(self) -> str:
        supported = {k: v for k, v in self._get_by_server.items() if v}
        return max(supported, key=supported.get) if supported else "builtin"

    # -- 5. controller -----------------------------------------------------------------
    def controller(self):
        if self.want("controller.noop"):
            self.step("controller.noop", "no-op reconciles/s", self._noop)
        if self.want("controller.ready"):
            self.step("controller.ready", "create->Ready latency", self._ready)
        if self.want("controller.storm"):
            self.step("controller.storm", "update storm", self._storm)

    def _noop(self):
        cdir = self.seed("controller", OBJECTS)
        for w in (1, 2, 4):
            out = run_json([PY, str(BENCH / "inproc.py"), "controller", "--dir", str(cdir), "--workers", str(w),
                            "--passes", str(self.cfg["controller_passes"])], 300, SERVER_CPU)
            self.table.add(f"controller.noop.w{w}", f"no-op reconciles/s, {w} worker(s), {OBJECTS:,} objects",
                           out["fabrica_per_s"], out["baseline_per_s"], unit="reconciles/s",
                           baseline_name="bare queue.Queue", raw=out)

    def _ready(self):
        rdir = self.root / "ready"
        out = run_json([PY, str(BENCH / "inproc.py"), "ready", "--dir", str(rdir), "--count",
                        str(self.cfg["ready_count"])], 300, SERVER_CPU)
        load = out.get("fabrica_background_writes_per_s") or 0
        self.table.add("controller.ready.p50", "create->Ready p50 (background writer running)", out["fabrica_p50_ms"],
                       out["baseline_p50_ms"], unit="ms", better="lower", baseline_name="bare queue.Queue",
                       note=f"background writes/s: fabrica {load:.0f}, "
                            f"baseline {out.get('baseline_background_writes_per_s') or 0:.0f}", raw=out)
        self.table.add("controller.ready.p99", "create->Ready p99 (background writer running)", out["fabrica_p99_ms"],
                       out["baseline_p99_ms"], unit="ms", better="lower", baseline_name="bare queue.Queue")

    def _storm(self):
        out = run_json([PY, str(BENCH / "inproc.py"), "storm", "--dir", str(self.root / "storm")], 300, SERVER_CPU)
        self.table.add("controller.storm", f"reconciles per {out['updates']} updates of one key",
                       out["fabrica_reconciles"], out["baseline_reconciles"], unit="count", better="lower",
                       target=("<=", 1.0), baseline_name="queue.Queue, no de-dup",
                       note="converged" if out.get("fabrica_converged") else "DID NOT CONVERGE", raw=out)
        if not out.get("fabrica_converged"):
            self.table.rows[-1]["met"] = False

    # -- driver ------------------------------------------------------------------------
    def run(self) -> int:
        started = time.perf_counter()
        try:
            if self.want("overhead"):
                self.overhead()
            if self.want("durability"):
                self.durability()
            if self.want("peer") or self.want("scale"):
                self.sizes()
            if self.want("controller"):
                self.controller()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        elapsed = time.perf_counter() - started
        table = self.table.render()
        print()
        print(table)
        print()
        met = [r for r in self.table.rows if r["met"] is not None]
        print(f"targets met: {sum(r['met'] for r in met)}/{len(met)}; load generator: {self.load.tool}; "
              f"{common.pinning_note()}; medians of {self.cfg['runs']} run(s) of {self.cfg['duration']:g}s; "
              f"{elapsed:.0f}s in all")
        for note in self.notes:
            print("note:", note)
        out = Path(self.args.out) if self.args.out else RESULTS
        doc = {"mode": "quick" if self.args.quick else "full", "only": self.only, "seconds": round(elapsed, 1),
               "machine": common.machine_info(), "load_generator": self.load.tool, "config": self.cfg,
               "connections": CONNS, "notes": self.notes, "rows": self.table.rows, "table": table}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, out)
        print(f"results: {out}")
        return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=1,000 only, short runs (about 2 minutes)")
    p.add_argument("--only", help="comma-separated sections or ids: " + ", ".join(SECTIONS))
    p.add_argument("--out", help=f"results JSON (default {RESULTS})")
    p.add_argument("--no-install", action="store_true", help="install nothing; missing tools make n/a rows")
    p.add_argument("--duration", type=float, help="seconds per load run (overrides the mode)")
    p.add_argument("--runs", type=int, help="runs per measurement (overrides the mode)")
    p.add_argument("--servers", help="WSGI servers for the overhead rows, e.g. builtin,waitress,granian")
    p.add_argument("--sizes", help="object counts for the scale and peer rows (overrides the mode), e.g. 20000")
    args = p.parse_args(argv)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
