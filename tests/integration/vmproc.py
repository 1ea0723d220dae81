"""A VM running in the background through `splitvmm up`, steered with `splitvmm ctl`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import vm_toml

REPO = Path(__file__).resolve().parents[2]


def env_for(tmp_path: Path) -> dict[str, str]:
    return {
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def splitvmm(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitvmm", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env_for(tmp_path),
    )


class VmProcess:
    """`splitvmm up` (or restore) in the background, its serial output in a file."""

    def __init__(
        self,
        tmp_path: Path,
        args: list[str],
        serial: Path,
        stdin: bytes = b"",
        stdio: bool = False,
        argv: list[str] | None = None,
    ) -> None:
        """stdio=True: the serial device's output is `stdio` and our stdout goes to `serial`.
        argv: how splitvmm is run (default: this interpreter; `ip netns exec NS ...` too)."""
        self.tmp_path = tmp_path
        self.serial = serial
        stdout = open(serial, "ab") if stdio else subprocess.DEVNULL  # noqa: SIM115
        self._stdout = stdout
        self.proc = subprocess.Popen(
            [*(argv or [sys.executable, "-m", "splitvmm"]), *args],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env_for(tmp_path),
        )
        if stdin:
            self.send(stdin)

    def send(self, data: bytes) -> None:
        """Type into the VM's console (our stdin is its serial input when output is stdio)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_for(self, pattern: str, timeout: float = 30, after: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the serial output past offset `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern, re.M).search(self.text(), after)
            if m:
                return m
            if self.proc.poll() is not None:
                status, err = self.finish()
                raise AssertionError(f"VM ended ({status}) before {pattern!r}: {err[-800:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in serial output: {self.text()[-500:]!r}")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return splitvmm(self.tmp_path, "ctl", "--vm", "test", *args)

    def device(self, name: str) -> dict[str, object]:
        """The device as `ctl devices --json` shows it (its counters included)."""
        devices = json.loads(self.ctl("devices", "--json").stdout)["devices"]
        (found,) = (d for d in devices if d["name"] == name)
        return dict(found)

    def counters(self, name: str, timeout: float = 30) -> dict[str, object]:
        """The device's counters from `ctl devices --json`. A device busy with a long queue
        (O_DIRECT writes on a loaded host) may not answer its stats within the monitor's
        STATS_TIMEOUT_MS, and the entry then has none (monitor/channel.py): asked again."""
        deadline = time.monotonic() + timeout
        while "counters" not in (dev := self.device(name)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} gave no counters within {timeout} s: {dev}")
            time.sleep(0.1)
        counters = dev["counters"]
        assert isinstance(counters, dict)
        return counters

    def wait_running(self, name: str, generation: int, timeout: float = 30) -> dict[str, object]:
        """The device once its process number `generation` serves (a restart is done);
        AssertionError if it is not by `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            dev = self.device(name)
            if dev["state"] == "running" and dev["generation"] == generation:
                return dev
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is not back as process {generation}: {dev}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM, as an operator ends a VM, then finish()."""
        self.proc.send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def kill_if_running(self) -> None:
        """Whatever a test left running (it failed before stop()), killed and reaped."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.finish()

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """(exit status, stderr) once it ends; kills it if it does not end in time."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self._stdout is not subprocess.DEVNULL:
            self._stdout.close()
        return self.proc.returncode, err.decode(errors="replace")


def boot_guest(
    tmp_path: Path, kernel: Path, cmdline: str = "", options: tuple[str, ...] = ()
) -> VmProcess:
    """`splitvmm [options] up` of one test guest (64 MiB, one vCPU); its serial output in
    serial.log."""
    serial = tmp_path / "serial.log"
    config = tmp_path / "vm.toml"
    config.write_text(vm_toml(f'kernel = "{kernel}"\ncmdline = "{cmdline}"', "64M", 1, serial))
    return VmProcess(tmp_path, [*options, "up", str(config)], serial)


def comm(pid: int) -> str:
    """A process's name (proc(5) comm: a device's is sv-<name>); "" once it has ended."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
