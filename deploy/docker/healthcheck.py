"""Container health check: succeed only if this process answers /healthz on its metrics port.

Docker's HEALTHCHECK runs this inside the container (the image has no curl or wget). It uses
http.client rather than urllib so that proxy variables set for the application never reroute a
request meant for 127.0.0.1. Exit status 0 means healthy, 1 unhealthy, as Docker expects.
"""

from __future__ import annotations

import http.client
import os
import sys

DEFAULT_PORT = 9100
TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    raw_port = os.environ.get("SLUICEGATE_METRICS_PORT", "") or str(DEFAULT_PORT)
    try:
        port = int(raw_port)
    except ValueError:
        print(f"healthcheck: SLUICEGATE_METRICS_PORT is not a port number: {raw_port!r}", file=sys.stderr)
        return 1
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        status = conn.getresponse().status
    except OSError as exc:
        print(f"healthcheck: GET {path} on port {port} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if 200 <= status < 300:
        return 0
    print(f"healthcheck: GET {path} on port {port} answered {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
