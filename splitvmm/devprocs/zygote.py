"""`python -I -m splitvmm.devprocs.zygote FD`: the launcher's zygote (sandbox/zygote.py).

Imports what every device process imports, then forks one per request on the socket FD,
each request's model imported first (once); each child runs what `python -m
splitvmm.devprocs` runs, from the spec on its stdin.
"""

import gc
import os
import signal
import sys

from splitvmm.errors import exit_now
from splitvmm.native import confine


def device_main(launcher: int) -> None:
    from splitvmm.devprocs.runtime import run  # imported by main() before any fork
    from splitvmm.devprocs.spec_stdin import read_rest, read_spec

    spec = read_spec()
    confine.set_name(f"sv-{spec.name}")  # not "python": which device this process is
    run(spec, read_rest, parent=launcher)


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m splitvmm.devprocs.zygote FD (started by the launcher)")
    # Before the imports (~100 ms): a zygote whose launcher died meanwhile must not go on.
    launcher = os.getppid()
    confine.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != launcher:
        os._exit(1)
    # The collector stays off in the zygote: what it imports and prepares (~2.5 ms less of
    # collections on the way to its first fork) lives as long as it does, frozen before each
    # fork, and a request makes no cycles. Each device turns it on (sandbox/zygote.py).
    gc.disable()
    from splitvmm.devprocs import runtime, spec_stdin  # noqa: F401 (what device_main runs)
    from splitvmm.sandbox import zygote

    exit_now(zygote.serve(int(sys.argv[1]), device_main, launcher, runtime.prepare_model))


if __name__ == "__main__":
    main()
