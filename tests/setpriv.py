"""A probe run by this interpreter under setpriv(1): root starting it with other ids,
capabilities or securebits, as a hardened service, a container or a user given a capability
would (tests/integration/test_confinement.py: the monitor confining itself;
tests/sandbox/test_launcher.py: the launcher, its zygote and a device)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running a probe under setpriv with other ids or capabilities needs root",
)


def under_setpriv(setpriv: list[str], probe: str, uid: int, rundir: str) -> Any:
    """What `probe` prints (JSON), run under `setpriv` with one argument: a runtime directory
    at `rundir` (relative: each of its directories `uid`'s, mode 0700) in a fresh directory
    that anyone may search."""
    work = Path(tempfile.mkdtemp(prefix="splitvmm-setpriv-"))
    try:
        os.chmod(work, 0o755)
        run = work / rundir
        run.mkdir(parents=True)
        for d in (run, *run.parents[: len(Path(rundir).parts) - 1]):  # each one below `work`
            os.chown(d, uid, uid)
            d.chmod(0o700)
        result = subprocess.run(
            ["setpriv", *setpriv, sys.executable, "-c", probe, str(run)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    finally:
        shutil.rmtree(work)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
