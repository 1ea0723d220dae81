"""`splitvmm up` loads only what a boot uses: its start-up pays for every import."""

import json
import subprocess
import sys

from splitvmm.protocol.models import MODELS, module_name


def imported(code: str, names: tuple[str, ...], *flags: str) -> list[str]:
    """Which of `names` a fresh interpreter (with `flags`) has imported after running `code`."""
    probe = (  # which ones, taken before json is imported to print them
        f"{code}; import sys; found = sorted(set(sys.modules) & {set(names)!r}); "
        "import json; print(json.dumps(found))"
    )
    result = subprocess.run(
        [sys.executable, *flags, "-c", probe], capture_output=True, text=True, check=True
    )
    found: list[str] = json.loads(result.stdout)
    return found


# What `up` reaches before the VM runs: the CLI, the command, the monitor.
UP_IMPORTS = "import splitvmm.cli, splitvmm.cli.up, splitvmm.monitor.machine"
NOT_FOR_A_BOOT = (
    "rich",
    "splitvmm.cli.snapshot",
    "splitvmm.monitor.restore",
    "splitvmm.snapshot.reader",
)


def test_up_imports_no_restore_code_nor_rich():
    assert imported(UP_IMPORTS, NOT_FOR_A_BOOT) == []


# What the monitor holds for the VM's life: `up`'s imports and what it loads before it
# confines itself (monitor/confinement.py PRELOAD). OpenSSL's libcrypto, which hashlib and
# hmac load, would be ~3.5 MiB of its resident memory: the snapshot it writes is BLAKE3 throughout
# (snapshot/digest.py, snapshot/signing.py); a sha256 is taken by readers only.
MONITOR_IMPORTS = (
    f"{UP_IMPORTS}; import importlib; "
    "from splitvmm.monitor.confinement import PRELOAD; "
    "[importlib.import_module(name) for name in PRELOAD]"
)


def test_the_monitor_of_a_boot_loads_no_openssl():
    assert imported(MONITOR_IMPORTS, ("hashlib", "_hashlib", "hmac")) == []


def test_the_monitor_loads_no_zeromq():
    """Its end of each device channel speaks ZMTP itself over a plain socket (monitor/zmtp.py):
    pyzmq, its libzmq and their I/O thread were ~15-20 ms of its start-up and ~2 MiB of its
    memory (bench/startup.py, bench/memory.py), for a socket's bytes it already parsed."""
    assert imported(MONITOR_IMPORTS, ("zmq",)) == []


# What runs before the launcher's fork (cli/early.py) and in the launcher before its zygote's
# exec (sandbox/launcher_start.py): each import there delays the zygote, whose own imports
# are the longest path to a VM's first device (bench/startup.py).
BEFORE_THE_ZYGOTE = (
    "import splitvmm.cli, splitvmm.cli.early, splitvmm.sandbox.launcher_start, "
    "splitvmm.native.confine, splitvmm.sandbox.zygote"
)
NOT_BEFORE_THE_ZYGOTE = (
    "click",
    "msgspec",
    "pyseccomp",
    "zmq",
    "splitvmm.protocol.models",
    "splitvmm.protocol.spec",
    "splitvmm.sandbox.launcher",
    "splitvmm.sandbox.launcher_server",
)


def test_up_imports_nothing_heavy_before_the_zygote_execs():
    assert imported(BEFORE_THE_ZYGOTE, NOT_BEFORE_THE_ZYGOTE) == []


# What the zygote imports (devprocs/zygote.py main(): the device runtime before it forks
# devices, a model's module at its first device: here every model's) and what the launcher
# serves requests with: msgspec is imported without typing_extensions, which would
# bring inspect, ast and dis (~12 ms of each interpreter's start: splitvmm/record.py),
# pyseccomp without ctypes.util, which would bring shutil, bz2 and lzma (~4 ms:
# native/seccomp.py), no pathlib, which would bring urllib.parse and ipaddress (~4 ms:
# sandbox/policy.py), and nothing loads OpenSSL (hashlib: only the monitor derives MACs,
# protocol/models.py).
ZYGOTE_AND_LAUNCHER = (
    "from splitvmm.devprocs import runtime, spec_stdin; "
    "from splitvmm.devprocs.base import load_all_models; load_all_models(); "
    "import splitvmm.sandbox.zygote, splitvmm.sandbox.launcher_server"
)
NOT_IN_THE_ZYGOTE = (
    "typing_extensions",
    "inspect",
    "ctypes.util",
    "shutil",
    "pathlib",
    "urllib.parse",
    "hashlib",
    "_hashlib",
)


def test_the_zygote_and_the_launcher_import_no_typing_extensions_ctypes_util_pathlib_nor_openssl():
    assert imported(ZYGOTE_AND_LAUNCHER, NOT_IN_THE_ZYGOTE, "-I") == []


# The real zygote up to its loop (devprocs/zygote.py main(), serve() stubbed to print what
# it imported): the device runtime, and no model's own module.
ZYGOTE_READY = (
    "import sys; sys.argv = ['zygote', '99']; "
    "import splitvmm.sandbox.zygote as z; z.serve = lambda *args: 0; "
    "import splitvmm.devprocs.zygote as m; m.exit_now = lambda code: None; m.main()"
)
MODEL_MODULES = tuple(f"splitvmm.devprocs.{module_name(model)}" for model in MODELS) + (
    "splitvmm.devprocs.virtio.pci",
    "splitvmm.devprocs.virtio.queue",
)


def test_the_zygote_imports_no_model_before_a_device_of_it_is_asked_for():
    """A serial VM's zygote imported every model (virtio's PCI transport and queues among
    them) before its first fork: ~1-3 ms on the way to the first device and ~0.7 MiB that
    stayed resident in every device (sandbox/zygote.py)."""
    assert imported(ZYGOTE_READY, MODEL_MODULES, "-I") == []


def test_device_processes_load_no_zeromq():
    """A device's end of its channel speaks ZMTP itself (devprocs/channel.py): pyzmq was ~25
    ms of the zygote's imports, on the path to every VM's first device (bench/startup.py), and
    libzmq's two threads were in every device process (bench/memory.py, its seccomp policy)."""
    assert imported(ZYGOTE_AND_LAUNCHER, ("zmq",), "-I") == []
