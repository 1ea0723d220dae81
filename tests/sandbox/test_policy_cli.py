"""`splitvmm policy check` and `splitvmm policy audit MODEL` (cli/policy.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitvmm.cli import cli
from splitvmm.cli import policy as policy_cli
from splitvmm.sandbox import policy


def test_policy_check_when_shipped_policies_exits_0() -> None:
    result = CliRunner().invoke(cli, ["policy", "check"])

    assert result.exit_code == 0, result.output
    assert "serial_device.policy:" in result.output and "warden.policy:" in result.output


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("ioctl: arg1 == KVM_RUN\n", "unknown constant 'KVM_RUN'"),
        # a failed @include names the line that includes, not only the file
        ("@include serial_extra.policy\n", "cannot read"),
    ],
    ids=["monitor-constant", "missing-include"],
)
def test_policy_check_when_a_rule_is_bad_exits_1_naming_file_and_line(
    tmp_path: Path, line: str, error: str
) -> None:
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    with (tmp_path / "serial.policy").open("a") as f:
        f.write(line)
    lines = (tmp_path / "serial.policy").read_text().count("\n")

    result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(tmp_path)])

    assert result.exit_code == 1
    assert f"{tmp_path / 'serial.policy'}:{lines}: {error}" in result.output


def test_policy_check_says_a_fault_in_a_file_that_many_include_once(tmp_path: Path) -> None:
    """common_device.policy is included by every device's policy: a bad rule in it was
    printed once for each of them, and once for itself (seven identical lines)."""
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    with (tmp_path / "common_device.policy").open("a") as f:
        f.write("no_such_call: 1\n")

    result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(tmp_path)])

    assert result.exit_code == 1
    assert result.output.count("'no_such_call' is not a") == 1, result.output


def test_policy_check_when_a_model_has_no_policy_exits_1(tmp_path: Path) -> None:
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    (tmp_path / "serial_device.policy").unlink()

    result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(tmp_path)])

    assert result.exit_code == 1
    assert "serial_device.policy: missing" in result.output


def test_policy_audit_when_the_models_policy_is_bad_exits_1_naming_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy an audit compares with is read before any device starts: an error in it
    is the operator's to fix, told as `check` tells it, not a traceback."""
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    with (tmp_path / "serial_device.policy").open("a") as f:
        f.write("not a rule\n")
    lines = (tmp_path / "serial_device.policy").read_text().count("\n")
    monkeypatch.setenv("SPLITVMM_POLICY_DIR", str(tmp_path))

    result = CliRunner().invoke(cli, ["policy", "audit", "serial"])

    assert (result.exit_code, type(result.exception)) == (1, SystemExit)
    assert f"policy error: {tmp_path / 'serial_device.policy'}:{lines}: expected" in result.output


@pytest.mark.parametrize("accesses", ["-5", "0", "3", "4294967296"])
def test_policy_audit_when_accesses_is_out_of_range_exits_2_naming_the_option(
    accesses: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer than 4 leave out a kind of access (the workload cycles read, write, input,
    sync); 0 or a negative count skipped that part and the burst of writes, and the audit
    went on without them. Past 2**32 - 1 its sequence numbers (u32) could run out. Refused
    before any device starts, naming the option."""
    traced: list[str] = []
    monkeypatch.setattr(policy_cli, "trace_device", lambda model, *_: traced.append(model))

    result = CliRunner().invoke(cli, ["policy", "audit", "serial", "--accesses", accesses])

    assert (result.exit_code, traced) == (2, [])
    assert "Invalid value for '--accesses'" in result.output


@pytest.mark.sandbox
def test_policy_audit_when_serial_prints_sorted_syscalls_all_in_policy() -> None:
    result = CliRunner().invoke(cli, ["policy", "audit", "serial", "--accesses", "200"])

    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()[:-1]]
    assert names == sorted(names)
    assert {"recvfrom", "sendto", "write"} <= set(names)
    assert "serial: " in result.output.splitlines()[-1]


@pytest.mark.sandbox
def test_policy_audit_when_rtc_traces_its_timed_interrupts_all_in_policy() -> None:
    result = CliRunner().invoke(cli, ["policy", "audit", "rtc", "--accesses", "200"])

    assert result.exit_code == 0, result.output
    names = {line.split()[0] for line in result.output.splitlines()[:-1]}
    assert {"poll", "write", "recvfrom"} <= names  # deadline waits, irq eventfd, channel
    assert "rtc: " in result.output.splitlines()[-1]


@pytest.mark.sandbox
@pytest.mark.parametrize(
    ("model", "own"),
    [
        ("virtio-blk", {"preadv2", "pwritev2", "fdatasync", "fallocate"}),
        ("virtio-rng", {"getrandom"}),
        ("virtio-console", {"write", "poll"}),  # its output, stalled on a full pipe
    ],
)
def test_policy_audit_when_virtio_serves_its_queue_all_in_policy(model: str, own: set[str]) -> None:
    result = CliRunner().invoke(cli, ["policy", "audit", model, "--accesses", "200"])

    assert result.exit_code == 0, result.output
    names = {line.split()[0] for line in result.output.splitlines()[:-1]}
    assert own <= names  # its requests were served, each through its own calls


@pytest.mark.sandbox
def test_policy_audit_when_a_call_fails_its_rules_argument_check_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serial.policy narrows `write` to stderr (overriding common_device.policy's `write: 1`):
    the device's first write to its output or irq eventfd fails that rule, so the enforcing
    filter kills it (SIGSYS). The audit saw those very calls and must say so, not pass."""
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    with (tmp_path / "serial.policy").open("a") as f:
        f.write("write: arg0 == STDERR_FILENO\n")
    lines = (tmp_path / "serial.policy").read_text().count("\n")
    monkeypatch.setenv("SPLITVMM_POLICY_DIR", str(tmp_path))

    result = CliRunner().invoke(cli, ["policy", "audit", "serial", "--accesses", "200"])

    assert result.exit_code == 1, result.output
    assert f"serial.policy:{lines}" in result.output and "refused" in result.output


def test_policy_check_when_a_device_policy_names_self_pid_exits_1(tmp_path: Path) -> None:
    """SELF_PID is the warden's and the monitor's run-time constant: a device loads its policy
    without it (policy.load_model_policy), so every serial device would fail to start."""
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    with (tmp_path / "serial.policy").open("a") as f:
        f.write("kill: arg0 == SELF_PID\n")
    lines = (tmp_path / "serial.policy").read_text().count("\n")
    with pytest.raises(policy.PolicyError, match="unknown constant 'SELF_PID'"):
        policy.load_model_policy("serial", tmp_path)  # what the device does at start

    result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'serial.policy'}:{lines}: unknown constant 'SELF_PID'" in result.output


def test_policy_check_when_warden_policy_includes_a_file_naming_self_pid_exits_0(
    tmp_path: Path,
) -> None:
    """warden.policy may @include a file beside it (policy.py: "another file of the same
    directory"); the warden parses both with SELF_PID (load_warden_policy), so the policy
    loads. check parsed every file but the four top-level ones with policy.CONSTANTS alone,
    and reported the included file's SELF_PID as an unknown constant (before 6c43f4d it
    passed)."""
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    warden = (tmp_path / "warden.policy").read_text()
    assert "kill: arg0 == SELF_PID\n" in warden
    (tmp_path / "warden.policy").write_text(
        warden.replace("kill: arg0 == SELF_PID\n", "@include warden_signals.policy\n")
    )
    (tmp_path / "warden_signals.policy").write_text("kill: arg0 == SELF_PID\n")
    assert "kill" in policy.load_warden_policy(os.getpid(), tmp_path).rules  # what it loads

    result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(tmp_path)])

    assert result.exit_code == 0, result.output


def test_policy_check_when_a_file_name_holds_control_characters_prints_it_escaped(
    tmp_path: Path,
) -> None:
    """A name in the policy directory is data: its newline split the error's line, and an
    escape sequence in it reached the terminal raw (color=True: click strips one only off
    a terminal)."""
    shutil.copytree(policy.default_policy_dir(), tmp_path, dirs_exist_ok=True)
    (tmp_path / "x\n\x1b[31m.policy").write_text("nonsense\n")

    result = CliRunner().invoke(cli, ["policy", "check", "--dir", str(tmp_path)], color=True)

    assert (result.exit_code, result.output.count("\n")) == (1, 1), result.output
    assert "x\\n\\x1b[31m.policy:1: expected" in result.output
