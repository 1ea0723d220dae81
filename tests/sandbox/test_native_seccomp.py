"""native/seccomp.py: pyseccomp imported without running ldconfig nor importing ctypes.util,
ldconfig kept as fallback."""

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


def fresh(code: str) -> str:
    """What `code` prints in a fresh interpreter (which has imported no ctypes.util)."""
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pyseccomp_imports_without_importing_ctypes_util():
    code = (
        "import sys\n"
        "from splitvmm.native.seccomp import pyseccomp\n"
        "print(sorted(m for m in ('ctypes.util', 'shutil', 'bz2', 'lzma') if m in sys.modules))\n"
        "import ctypes\n"
        "print(hasattr(ctypes, 'util'))\n"
    )
    assert fresh(code).splitlines() == ["[]", "False"]


def test_ctypes_util_imported_afterwards_is_the_real_module():
    code = (
        "from splitvmm.native.seccomp import pyseccomp\n"
        "import ctypes, ctypes.util\n"
        "print(ctypes.util.__file__ is not None, ctypes.util.find_library.__module__)\n"
        "from ctypes.util import find_library\n"
        "print(find_library is ctypes.util.find_library)\n"
    )
    assert fresh(code).splitlines() == ["True ctypes.util", "True"]


def test_where_ctypes_util_was_imported_its_find_library_is_its_own_again():
    code = (
        "import ctypes.util\n"
        "own = ctypes.util.find_library\n"
        "from splitvmm.native.seccomp import pyseccomp\n"
        "print(ctypes.util.find_library is own)\n"
    )
    assert fresh(code) == "True"


# ctypes.CDLL refusing libseccomp's soname to native/seccomp.py's own try (and loading it for
# pyseccomp): the import takes ldconfig's way for it.
REFUSE_SONAME = (
    "import ctypes, sys\n"
    "real, refused = ctypes.CDLL, []\n"
    "class CDLL(real):\n"
    "    def __init__(self, name, *args, **kwargs):\n"
    "        caller = sys._getframe(1).f_globals['__name__']\n"
    "        if name == 'libseccomp.so.2' and caller == 'splitvmm.native.seccomp':\n"
    "            refused.append(name)\n"
    "            raise OSError('refused')\n"
    "        super().__init__(name, *args, **kwargs)\n"
    "ctypes.CDLL = CDLL\n"
)


def test_the_ldconfig_fallback_imports_the_real_ctypes_util_over_the_stand_in():
    code = REFUSE_SONAME + (
        "from splitvmm.native.seccomp import pyseccomp\n"
        "import sys, ctypes.util\n"
        "print(refused, sys.modules['ctypes.util'] is ctypes.util, ctypes.util.__file__ is not None)\n"
    )
    assert fresh(code) == "['libseccomp.so.2'] True True"


def test_the_ldconfig_fallback_where_ctypes_util_was_imported_first_uses_its_own_function():
    code = REFUSE_SONAME + (
        "import ctypes.util\n"
        "own = ctypes.util.find_library\n"
        "from splitvmm.native.seccomp import pyseccomp\n"
        "print(refused, ctypes.util.find_library is own)\n"
    )
    assert fresh(code) == "['libseccomp.so.2'] True"


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
