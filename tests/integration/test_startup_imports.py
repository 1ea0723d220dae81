"""`splitvmm up` loads only what a boot uses: its start-up pays for every import."""

import subprocess
import sys

# What `up` reaches before the VM runs: the CLI, the command, the monitor.
UP_IMPORTS = "import splitvmm.cli, splitvmm.cli.up, splitvmm.monitor.machine"
NOT_FOR_A_BOOT = (
    "rich",
    "splitvmm.cli.snapshot",
    "splitvmm.monitor.restore",
    "splitvmm.snapshot.reader",
)


def test_up_imports_no_restore_code_nor_rich():
    probe = f"{UP_IMPORTS}; import sys; print(sorted(set(sys.modules) & set({NOT_FOR_A_BOOT!r})))"

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
