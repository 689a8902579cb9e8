"""The fallback load generator when wrk is missing: keep-alive HTTP/1.1 clients in threads.

    python benchmarks/pyload.py --port P --method GET --paths FILE --conns 4 --duration 3 [--body B] [--random]

Prints one JSON line with the same fields as wrk_bench.lua's done(). One
Python process is slower than wrk (a GIL-bound client tops out at a few
thousand requests/s), so rows measured with it say so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--paths", required=True)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--body")
    p.add_argument("--random", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    with open(args.paths) as f:
        paths = [line.strip() for line in f if line.strip()]
    latencies: list[list[float]] = [[] for _ in range(args.conns)]
    errors = {"status": 0, "connect": 0, "read": 0}
    lock = threading.Lock()
    start_at = time.perf_counter() + 0.05
    stop_at = start_at + args.duration

    def worker(i: int) -> None:
        rnd = random.Random(i)
        counter = rnd.randrange(1, 1000000) * 1000
        conn = None
        mine = latencies[i]
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while time.perf_counter() < stop_at:
            counter += 1
            path = rnd.choice(paths) if args.random else paths[counter % len(paths)]
            body = None if args.body is None else args.body.replace("__N__", str((i + 1) * 1000000000 + counter)).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=args.timeout)
                conn.request(args.method, path, body=body, headers=headers)
                res = conn.getresponse()
                res.read()
                if res.status >= 400:
                    with lock:
                        errors["status"] += 1
                if res.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with lock:
                    errors["read"] += 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            mine.append(time.perf_counter() - t0)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.timeout + 5)
    elapsed = time.perf_counter() - start_at
    lat = sorted(x for per in latencies for x in per)

    def pct(q):
        return int(lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1e6) if lat else 0
    print(json.dumps({"requests": len(lat) + errors["status"], "duration_us": int(elapsed * 1e6),
                      "status_errors": errors["status"], "connect": errors["connect"], "read": errors["read"],
                      "write": 0, "timeout": 0, "p50_us": pct(50), "p99_us": pct(99),
                      "mean_us": (sum(lat) / len(lat) * 1e6) if lat else 0, "max_us": int(lat[-1] * 1e6) if lat else 0}))


if __name__ == "__main__":
    main()
