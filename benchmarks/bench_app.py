"""The fabrica app the HTTP benchmarks serve: ``python fabrica.py serve benchmarks/bench_app.py``.

Two kinds and no reconcilers, so the HTTP rows measure the REST path and
the store only: Item (GET one, POST, PUT, the scale rows) and Widget (the
100-object list).
"""

import fabrica

app = fabrica.Fabrica()
app.register("Item")
app.register("Widget")
