"""client: calls a URL by its mesh name, again and again, and prints who answered.

For: the examples' clients and the tests. ``python client.py URL [--count N]
[--every SECONDS]`` prints one JSON line per call (``{"status": 200, "body": ...}`` or
``{"error": ...}``) and, with ``--count``, a last line ``{"summary": {version/replica:
calls}}``. Each call is a new connection, as a simple client makes them.
It serves nothing: injected, its sidecar is outbound only.
Must never: run unbounded when ``--count`` is given; it stops after N calls.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import urllib.error
import urllib.request


def call(url: str, timeout: float) -> dict[str, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace")}
    except (OSError, urllib.error.URLError) as e:
        return {"error": str(e)}
    try:
        return {"status": status, "body": json.loads(body)}
    except ValueError:
        return {"status": status, "body": body}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--count", type=int, default=0, help="calls to make (0: forever)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between calls")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    seen: collections.Counter[str] = collections.Counter()
    n = 0
    while args.count == 0 or n < args.count:
        result = call(args.url, args.timeout)
        body = result.get("body")
        if isinstance(body, dict):
            seen[f"{body.get('version', '')}/{body.get('replica', '?')}"] += 1
        print(json.dumps(result), flush=True)
        n += 1
        if args.count == 0 or n < args.count:
            time.sleep(args.every)
    if args.count:
        print(json.dumps({"summary": dict(seen)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
