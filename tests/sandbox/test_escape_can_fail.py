"""The escape suite's own check: would it notice a loosened policy or a missing layer?

Each escape attempt (escapes.py) must be able to succeed: with the syscall it tries let
through by the filter, or run with no sandbox at all, it gets through; and run without
seccomp, it is stopped by the layer it stands for (the PID namespace, no capabilities), with
that layer's errno. Otherwise test_escape.py's "fails or kills" could not fail: the socket
attempts once aimed at fd 3 (a memfd) with a too-short address, and three others failed on
their own arguments even run by root.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from splitvmm.cli.policy import STAND_IN_RAM
from splitvmm.sandbox import policy
from tests.sandbox import escapes
from tests.sandbox.test_escape import _attempt, attempt_context, handed_fds  # noqa: F401

pytestmark = pytest.mark.sandbox
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setns and bpf need root here")


def _loosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *rules: str) -> None:
    """The shipped policies, with `rules` added to what every device allows."""
    loose = tmp_path / "policies"
    shutil.copytree(policy.default_policy_dir(), loose)
    with open(loose / "common_device.policy", "a") as f:
        f.write("".join(f"{rule}\n" for rule in rules))
    monkeypatch.setenv("SPLITVMM_POLICY_DIR", str(loose))  # the device inherits it


@pytest.mark.parametrize(
    ("attempt", "syscall"),
    [
        ("connect_held_fd_to_loopback", "connect"),
        ("connect_held_fd_to_unix_path", "connect"),
        ("connect_held_fd_to_abstract_address", "connect"),
        ("bind_held_fd", "bind"),
    ],
)
def test_socket_attempt_gets_through_once_the_filter_lets_its_call_through(
    attempt,
    syscall,
    tmp_path,
    monkeypatch,
    spawn,
    sleeper,
    handed_fds,  # noqa: F811
) -> None:
    """Only seccomp keeps a device from a socket made outside its namespaces."""
    _loosen(tmp_path, monkeypatch, f"{syscall}: 1")

    outcome = _attempt(spawn, "serial", attempt, attempt_context(sleeper), extra_fds=handed_fds)

    assert outcome == "succeeded"


@pytest.mark.parametrize("model", ["serial", "virtio-console"])
@pytest.mark.parametrize(
    ("attempt", "syscall"),
    [("truncate_output_file", "ftruncate"), ("allocate_past_end_of_output", "fallocate")],
)
def test_output_attempt_gets_through_once_the_filter_lets_its_call_through(
    attempt, syscall, model, tmp_path, monkeypatch, spawn, sleeper
) -> None:
    """Only seccomp keeps a device from its log's length: O_APPEND bounds its writes only."""
    _loosen(tmp_path, monkeypatch, f"{syscall}: 1")

    outcome = _attempt(spawn, model, attempt, attempt_context(sleeper))

    assert outcome == "succeeded"


def test_ram_attempt_gets_through_once_the_filter_and_the_seals_let_it(
    tmp_path, monkeypatch, spawn, sleeper
) -> None:
    """Beneath seccomp, the monitor's seals keep guest RAM its size: the attempt's own call
    shrinks an unsealed one."""
    _loosen(tmp_path, monkeypatch, "ftruncate: 1")
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, STAND_IN_RAM)
    try:
        ctx = attempt_context(sleeper)
        outcome = _attempt(spawn, "virtio-rng", "ftruncate_sealed_memfd", ctx, {"ram": ram})
    finally:
        os.close(ram)

    assert outcome == "succeeded"


@needs_root
@pytest.mark.parametrize("attempt", ["process_vm_readv_monitor", "setns_any", "bpf_prog_load"])
def test_attempt_run_with_no_sandbox_at_all_gets_through(attempt, sleeper) -> None:
    """Run here, by root, unconfined: nothing stands in the way, so it must succeed."""
    irq = os.eventfd(0, os.EFD_CLOEXEC)
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = escapes.ATTEMPTS[attempt]({"irq": irq, "netns": netns}, attempt_context(sleeper))
    except OSError as e:
        got = f"failed: {errno.errorcode.get(e.errno or 0)}"
    finally:
        os.close(irq)
        os.close(netns)

    assert not str(got).startswith("failed"), got


def test_reopen_attempt_run_with_no_sandbox_at_all_gets_through(tmp_path) -> None:
    """A read-only fd is no barrier of its own: its file's owner reopens it for writing."""
    victim = tmp_path / "readonly.txt"
    victim.write_bytes(b"original")
    readonly = os.open(victim, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = escapes.ATTEMPTS["reopen_readonly_fd_for_writing"]({"readonly": readonly}, {})
    finally:
        os.close(readonly)

    assert (got, victim.read_bytes()) == (5, b"pwnednal")


@pytest.mark.parametrize(
    ("attempt", "layer_says"),
    [
        ("process_vm_readv_monitor", "ESRCH"),  # the PID namespace: no such process there
        ("setns_any", "EPERM"),  # no capability over the host's network namespace
    ],
)
def test_attempt_without_seccomp_is_stopped_by_the_layer_it_stands_for(
    attempt,
    layer_says,
    spawn,
    sleeper,
    handed_fds,  # noqa: F811
) -> None:
    outcome = _attempt(
        spawn, "serial", attempt, attempt_context(sleeper), extra_fds=handed_fds, seccomp="trace"
    )

    assert outcome == layer_says
