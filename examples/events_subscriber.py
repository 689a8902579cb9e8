"""Follow a running fabrica server's event stream (GET /events) from another process.

    python fabrica.py serve examples/rack_reconciliation.py &
    python examples/events_subscriber.py --type 'io.fabrica.rack.*' --count 10

Prints one line per CloudEvent: ``<type> <resourceName> rv=<resourceversion>``
(condition events carry no name, so their resource uid is shown). The client
reconnects with Last-Event-ID when the connection drops, so nothing is missed
while the server still holds the changes in its feed; ``--since ID`` resumes
from an event id printed by an earlier run (410 if it is too old).
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import fabrica
except ImportError:     # run from a checkout: python examples/events_subscriber.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fabrica


def describe(event: dict) -> str:
    data = event.get("data") or {}
    name = data.get("resourceName") or data.get("resourceUID") or event.get("subject", "-")
    return f"{event['type']} {name} rv={event.get('resourceversion', '-')}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("FABRICA_SERVER", "http://127.0.0.1:8080"),
                        help="server URL (env FABRICA_SERVER; default http://127.0.0.1:8080)")
    parser.add_argument("--type", default="**", help="event type pattern, e.g. 'io.fabrica.rack.*' (default **)")
    parser.add_argument("--count", type=int, default=None, help="stop after N events (default: run until ^C)")
    parser.add_argument("--since", default=None, help="resume after this event id")
    parser.add_argument("--token", default=os.environ.get("FABRICA_TOKEN"), help="bearer token (env FABRICA_TOKEN)")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")

    client = fabrica.Client(args.server, token=args.token)
    seen = 0
    try:
        for event in client.watch(args.type, since=args.since):
            print(describe(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    except fabrica.FabricaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
