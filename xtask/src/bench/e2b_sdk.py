"""Bench: E2B's Python SDK, unchanged: N times Sandbox.create() + commands.run("echo hi") +
kill(), each trio timed. Prints one JSON line: {"samples": [ms, ...]}.

Usage: e2b_sdk.py BASE_URL N
"""

import json
import os
import sys
import time

base, n = sys.argv[1], int(sys.argv[2])
os.environ["E2B_API_URL"] = base
os.environ["E2B_SANDBOX_URL"] = base
os.environ.setdefault("E2B_API_KEY", "bench")
from e2b import Sandbox  # noqa: E402

samples = []
for _ in range(n):
    t = time.monotonic()
    sbx = Sandbox.create()
    r = sbx.commands.run("echo hi")
    assert r.stdout == "hi\n", r
    assert sbx.kill() is True
    samples.append(round((time.monotonic() - t) * 1000, 1))
print(json.dumps({"samples": samples}))
