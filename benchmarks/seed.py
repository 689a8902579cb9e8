"""Seed data without going through HTTP: fabrica's on-disk format and json-server's db.json.

fabrica's JSON file store keeps ``<data_dir>/<plural>/<uid>.json`` (pretty JSON,
the resourceVersion in metadata); writing those files directly and then
starting ``fabrica.py serve`` on the folder is what start-up recovery loads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fabrica  # noqa: E402  (the library under test: new_object and the file format)

COLORS = ("red", "green", "blue")
TIERS = ("web", "db", "cache")
GROUP_SIZE = 10          # every label group=gK holds exactly 10 objects, whatever N is


def make_object(kind: str, prefix: str, i: int, *, observed: bool = True) -> dict:
    """Object number ``i`` of a kind: deterministic uid/name, a small spec, two labels."""
    uid = f"{prefix}-{i:08x}"
    obj = fabrica.new_object(
        kind, f"{prefix}-n{i}", uid,
        spec={"color": COLORS[i % 3], "size": i, "replicas": 3, "owner": f"team-{i % 50}",
              "tags": ["bench", "fabrica"], "description": f"benchmark object number {i}"},
        labels={"group": f"g{i // GROUP_SIZE}", "tier": TIERS[i % 3]},
        now="2025-01-01T00:00:00.000000Z")
    obj["metadata"]["resourceVersion"] = str(i + 1)
    if observed:
        obj["status"] = {"observedGeneration": 1}      # a no-op reconcile then writes nothing
    return obj


def seed_fabrica(data_dir: Path, kind: str, plural: str, n: int, *, prefix: str | None = None,
                 start: int = 0, observed: bool = True) -> list[dict]:
    """Write ``n`` objects of ``kind`` into ``data_dir/plural``; returns them."""
    prefix = prefix or kind.lower()
    folder = Path(data_dir) / plural
    folder.mkdir(parents=True, exist_ok=True)
    objs = []
    for i in range(start, start + n):
        obj = make_object(kind, prefix, i, observed=observed)
        with open(folder / f"{obj['metadata']['uid']}.json", "wb") as f:
            f.write(fabrica._file_bytes(obj))
        objs.append(obj)
    return objs


def seed_sqlite(db_path: Path, kind: str, plural: str, n: int, *, chunk: int = 10000) -> None:
    """Objects 0..n-1 of ``kind`` (as seed_fabrica) in a SQLite database, written directly, as
    seed_fabrica writes files: fabrica's SQLiteStore makes the database (its schema), then the rows
    its writes would leave (object, label index rows, kind count, resourceVersion) go in by the
    thousand; the change feed starts empty (``pruned`` = n), as after a long-running server."""
    import sqlite3
    store = fabrica.SQLiteStore(str(db_path), durable=False)
    store.open({kind: plural})
    store.close()
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    for start in range(0, n, chunk):
        objs = [make_object(kind, kind.lower(), i) for i in range(start, min(n, start + chunk))]
        for obj in objs:
            obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]))
        rows = [(obj["metadata"]["resourceVersion"], kind, obj["metadata"]["uid"], obj["metadata"]["name"],
                 fabrica.dumps(obj["metadata"]["labels"]), fabrica.dumps(obj)) for obj in objs]
        conn.executemany("INSERT INTO objects (id, kind, uid, name, labels, doc) VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO labels VALUES (?, ?, ?, ?)",
                         [(kind, k, v, int(obj["metadata"]["resourceVersion"])) for obj in objs
                          for k, v in obj["metadata"]["labels"].items()])
    conn.execute("INSERT INTO kinds VALUES (?, ?, ?)", (kind, plural, n))
    conn.execute("UPDATE fabrica SET value = ? WHERE key IN ('resourceVersion', 'pruned')", (n,))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def seed_json_server(path: Path, collection: str, objs: list[dict]) -> None:
    """json-server's db.json holding the same objects (``id`` = fabrica's uid)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({collection: [{"id": o["metadata"]["uid"], **o} for o in objs]}, f, indent=2)
        f.write("\n")


def read_all(data_dir: Path) -> dict:
    """The baseline for start-up: read and json-parse every file, nothing else."""
    out = {}
    for plural in sorted(os.listdir(data_dir)):
        folder = os.path.join(data_dir, plural)
        if plural.startswith(".") or not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".json"):
                with open(os.path.join(folder, entry), "rb") as f:
                    obj = json.loads(f.read())
                out[obj["metadata"]["uid"]] = obj
    return out
