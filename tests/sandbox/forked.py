"""A test's body run in a forked child of the test process: what it changes of its process
(capabilities, ids, namespaces, a subreaper) is the child's, never the suite's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def in_a_child(body: Callable[[], object], before: Callable[[], None] | None = None) -> object:
    """`body`'s JSON result, run in a forked child after `before` ({"error": "Type: message"}
    if either raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if before is not None:
                before()
            result = body()
        except Exception as e:  # reported to the test, which asserts on it
            result = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)
