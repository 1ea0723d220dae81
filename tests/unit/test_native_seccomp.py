"""native/seccomp.py: pyseccomp imported without running ldconfig, ldconfig kept as fallback."""

import ctypes.util
import subprocess
import sys

from splitvmm.native import seccomp

NO_SUBPROCESS = (
    "import subprocess\n"
    "def refuse(*a, **k):\n"
    "    raise AssertionError(f'a process was started: {a!r}')\n"
    "subprocess.Popen = refuse\n"
)


def test_pyseccomp_imports_without_starting_ldconfig():
    code = NO_SUBPROCESS + "from splitvmm.native.seccomp import pyseccomp; print('ok')"

    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_find_library_is_ctypes_own_again_after_the_import():
    assert ctypes.util.find_library is seccomp._ldconfig_find_library


def test_a_library_that_does_not_load_by_its_soname_is_asked_of_ldconfig(monkeypatch):
    asked: list[str] = []
    monkeypatch.setitem(seccomp.SONAMES, "seccomp", "libseccomp.so.999")
    monkeypatch.setattr(seccomp, "_ldconfig_find_library", lambda name: asked.append(name) or "x")

    assert seccomp._find_library("seccomp") == "x"
    assert asked == ["seccomp"]


def test_a_library_that_loads_by_its_soname_is_that_soname():
    assert seccomp._find_library("seccomp") == "libseccomp.so.2"


def test_the_pyseccomp_it_gives_compiles_a_filter():
    filt = seccomp.pyseccomp.SyscallFilter(defaction=seccomp.pyseccomp.ALLOW)
    filt.add_rule(seccomp.pyseccomp.ERRNO(1), "ptrace")

    with open("/dev/null", "wb") as sink:
        filt.export_bpf(sink)
