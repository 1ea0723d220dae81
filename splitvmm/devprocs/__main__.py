"""`python -m splitvmm.devprocs < SPEC_JSON`: one device process, exec'd (tests, `policy audit`;
the launcher forks its devices from the zygote instead: sandbox/zygote.py).

Its stdin: the spec, one line of JSON; for a warm spare (spec.deferred) the rest of the
spec follows, up to EOF, when it takes over a crashed process (sandbox/spawn.py).
"""

import sys

from splitvmm.devprocs.runtime import run
from splitvmm.devprocs.spec_stdin import read_rest, read_spec

if __name__ == "__main__":
    if len(sys.argv) != 1 or sys.stdin.isatty():
        sys.exit("usage: python -m splitvmm.devprocs < SPEC_JSON (spawned by the monitor)")
    run(read_spec(), read_rest)
