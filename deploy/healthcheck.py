"""Container HEALTHCHECK: exit 0 when GET /healthz on this container answers 200, 1 otherwise.

Standard library only (the image has no curl). Port from FEATUREWATCH_PORT (default 8000); the check always
goes to the loopback address, whatever FEATUREWATCH_HOST binds.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("FEATUREWATCH_PORT", "8000")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as e:  # URLError, HTTPError (non-2xx), timeouts
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
