"""Two ways to run a WSGI callable on granian 2.x, for the benchmarks.

* ``serve_in_process(wsgi, ...)``: granian's thread-worker server (MTServer)
  in THIS process, the way ``fabrica.py serve --server granian`` does it: the
  app object (its store lock, its controller threads) is the one the requests
  reach. MTServer is meant for free-threaded builds and refuses a GIL build;
  the subclass skips that check.
* ``serve_worker_process(loader, ...)``: granian's usual process-worker server
  (MPServer) with workers=1. ``loader()`` runs in the worker process (after
  fork), so that worker would have to be the one process that opens the
  store and runs the controllers; the supervisor process only holds the
  socket and restarts the worker.

Both leave granian's own signal handling in place (SIGINT/SIGTERM stop it).
"""

from __future__ import annotations


def _interfaces():
    from granian.constants import Interfaces
    return Interfaces


def serve_in_process(wsgi, host: str, port: int, threads: int = 64) -> None:
    from granian.server.mt import MTServer

    class InProcessGranian(MTServer):
        def _check_gil(self):
            pass
    server = InProcessGranian("bench:app", address=host, port=port, interface=_interfaces().WSGI, workers=1,
                              blocking_threads=max(1, threads), log_enabled=False)
    server.serve(target_loader=lambda *args, **kwargs: wsgi, wrap_loader=False)


def serve_worker_process(loader, host: str, port: int, threads: int = 64) -> None:
    from granian.server.mp import MPServer
    server = MPServer("bench:app", address=host, port=port, interface=_interfaces().WSGI, workers=1,
                      blocking_threads=max(1, threads), log_enabled=False)
    server.serve(target_loader=lambda *args, **kwargs: loader(), wrap_loader=False)
