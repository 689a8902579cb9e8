#!/usr/bin/env python3
"""The dashboard (GET /) in headless Chromium: its size, first render at N objects, JS heap after N events.

    python benchmarks/dashboard.py [--n 10000] [--runs 3]

Needs Debian's chromium and chromium-driver (or FABRICA_CHROMIUM and
FABRICA_CHROMEDRIVER) and selenium. Every figure has a baseline measured in
the same run, in the same browser:

  first rows   navigation start -> the first table rows painted, N objects stored
  all loaded   navigation start -> the page counts all N (every list page fetched and rendered);
               baseline: a blank page of the same origin fetching and parsing the same pages
  heap         used JS heap (CDP, after a forced GC) of a page that received N create events;
               baseline: the same page before the first event
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import seed  # noqa: E402

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

FABRICA = HERE.parent / "fabrica.py"
# Injected before the page's own scripts: records when rows first show and when the count reaches N.
PROBE = """
window.probe = {};
(function tick() {
  const row = document.querySelector('#table .row:not([hidden])'), n = document.querySelector('.kind.on .n:last-child');
  if (row && !probe.firstRows) probe.firstRows = performance.now();
  if (n && +n.textContent.replace(/[^0-9]/g, '') === probe.want) { probe.all = performance.now(); return; }
  requestAnimationFrame(tick);
})();
"""
FETCH_ALL = """
const done = arguments[arguments.length - 1];
(async () => {
  const t0 = performance.now();
  let n = 0;
  for (let next = ""; ;) {
    const res = await fetch("items?limit=1000" + (next ? "&continue=" + next : ""));
    n += (await res.json()).length;
    if (!(next = encodeURIComponent(res.headers.get("X-Continue") || ""))) break;
  }
  done([performance.now() - t0, n]);
})();
"""


def serve(data_dir: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(FABRICA), "serve", str(HERE / "bench_app.py"), "--data-dir",
                             str(data_dir), "--port", "0", "--no-fsync"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit("serve did not start")


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("FABRICA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1440,900"):
        options.add_argument(arg)
    driver_path = os.environ.get("FABRICA_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(120)
    return driver


def heap(driver) -> int:
    driver.execute_cdp_cmd("HeapProfiler.collectGarbage", {})
    return int(driver.execute_cdp_cmd("Runtime.getHeapUsage", {})["usedSize"])


def wait(predicate, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        threading.Event().wait(0.05)


def first_render(driver, port: int, n: int) -> tuple[float, float, float]:
    url = f"http://127.0.0.1:{port}"
    driver.get("about:blank")
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                    {"source": PROBE.replace("probe.want", str(n))})
    driver.get(url + "/#Item")
    wait(lambda: driver.execute_script("return window.probe.all"))
    first, loaded = driver.execute_script("return [probe.firstRows, probe.all]")
    driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
    driver.get(url + "/health")
    took, got = driver.execute_async_script(FETCH_ALL)
    assert got == n, got
    return first, loaded, took


def events_heap(driver, n: int, work: Path) -> tuple[int, int]:
    proc, port = serve(work / "empty")
    try:
        driver.get("about:blank")
        driver.get(f"http://127.0.0.1:{port}/#Item")
        wait(lambda: driver.execute_script("return document.getElementById('live').textContent") == "live")
        before = heap(driver)
        local = threading.local()

        def create(i):
            conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port)
            local.conn = conn
            conn.request("POST", "/items", json.dumps({"name": f"e{i:06d}", "size": i}),
                         {"Content-Type": "application/json"})
            res = conn.getresponse()
            res.read()
            assert res.status == 201, res.status
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        wait(lambda: driver.execute_script(
            "return +document.querySelector('.kind.on .n:last-child').textContent.replace(/[^0-9]/g, '')") == n)
        return heap(driver), before
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(FABRICA.parent))
    import fabrica
    rows = [("page size (bytes, UTF-8)", len(fabrica.DASHBOARD_HTML.encode()), None)]
    with tempfile.TemporaryDirectory(prefix="fabrica-dashboard-") as tmp:
        work = Path(tmp)
        seed.seed_fabrica(work / "seeded", "Item", "items", args.n)
        proc, port = serve(work / "seeded")
        driver = chromium()
        try:
            runs = [first_render(driver, port, args.n) for _ in range(args.runs)]
            first, loaded, fetched = (sorted(r[i] for r in runs)[len(runs) // 2] for i in range(3))
            rows += [(f"first rows, {args.n:,} objects (ms)", round(first), None),
                     (f"all {args.n:,} loaded (ms) vs fetch+parse only", round(loaded), round(fetched))]
            proc.kill()
            after, before = events_heap(driver, args.n, work)
            rows.append((f"JS heap after {args.n:,} events (MB) vs before any", round(after / 2**20, 1),
                         round(before / 2**20, 1)))
        finally:
            driver.quit()
            proc.kill()
    print(f"{'measurement':52} {'dashboard':>10} {'baseline':>10} {'ratio':>7}")
    for name, value, base in rows:
        ratio = f"{value / base:.2f}x" if base else ""
        print(f"{name:52} {value:>10} {'' if base is None else base:>10} {ratio:>7}")


if __name__ == "__main__":
    main()
