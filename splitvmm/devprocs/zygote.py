"""`python -m splitvmm.devprocs.zygote FD`: the launcher's zygote (sandbox/zygote.py).

Imports what every device process imports, then forks one per request on the socket FD;
each child runs what `python -m splitvmm.devprocs` runs, from the spec on its stdin.
"""

import os
import sys

from splitvmm.devprocs.base import load_all_models
from splitvmm.devprocs.runtime import run
from splitvmm.devprocs.spec_stdin import read_rest, read_spec
from splitvmm.native import confine
from splitvmm.sandbox import zygote


def device_main(launcher: int) -> None:
    spec = read_spec()
    confine.set_name(f"sv-{spec.name}")  # not "python": which device this process is
    run(spec, read_rest, parent=launcher)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m splitvmm.devprocs.zygote FD (started by the launcher)")
    load_all_models()
    code = zygote.serve(int(sys.argv[1]), device_main)
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: the launcher waits for us to end
