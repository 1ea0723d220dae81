import os
import sys

# `python -m splitvmm` puts the working directory first on sys.path, where a json.py or a
# copy.py would stand in for the standard library's in the monitor (and, by fork, in the
# launcher). Python 3.11's -P leaves it out; here it is taken out before anything else is
# imported (splitvmm itself is, already: its modules are found through its __path__).
if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from splitvmm import timings  # noqa: E402

timings.mark("start")  # the interpreter is up: what follows is ours (up --timings)

from splitvmm.cli import main  # noqa: E402

main()
