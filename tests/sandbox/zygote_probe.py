"""A zygote whose 'device' reports what it was born with (tests/sandbox/test_zygote.py):
`python -m tests.sandbox.zygote_probe FD`. It runs sandbox/zygote.py serve() as the real
zygote does; its device main writes one JSON line to its fd 3 and ends. Its models: any
name but "no-such-model", each noted in `loaded` (which the device reports) on its load.
Its collector is off, as the real zygote's is."""

import gc
import json
import os
import sys

from splitvmm.sandbox import zygote

loaded: list[str] = []  # the models load() was asked for, in order, as the zygote holds them


def load(model: str) -> None:
    if model == "no-such-model":
        raise ValueError("no such model")
    if model not in loaded:  # once, as load_model's registry has it
        loaded.append(model)


def report(launcher: int) -> None:
    line = sys.stdin.buffer.readline()  # what the launcher wrote down the pipe
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue  # the listing's own fd, closed by now
        fds[name] = [st.st_dev, st.st_ino]
    facts = {
        "stdin": line.decode(),
        "fds": fds,
        "ppid": os.getppid(),
        "launcher": launcher,
        "sid": os.getsid(0),
        "pid": os.getpid(),
        "loaded": loaded,
        "collector": gc.isenabled(),
    }
    os.write(3, json.dumps(facts).encode() + b"\n")
    words = line.split()
    if words[:1] == [b"exit"]:  # "exit" alone: SystemExit(None)
        sys.exit(int(words[1]) if len(words) > 1 else None)
    if words == [b"interrupt"]:
        raise KeyboardInterrupt
    if words == [b"raise-filtered"]:  # a device's bug, under a device's filter
        import logging  # noqa: F401 (a real device has it: exit_now() shuts it down)

        from splitvmm.native import confine
        from splitvmm.sandbox import policy

        confine.set_no_new_privs()
        policy.compile_filter(policy.load_model_policy("serial")).load()
        raise ValueError("a bug in the device")


if __name__ == "__main__":
    gc.disable()  # as the real zygote holds it (devprocs/zygote.py)
    os._exit(zygote.serve(int(sys.argv[1]), report, os.getppid(), load))
