"""The allow-list from inside: allowed calls (and allowed argument forms) return; other
argument forms of the same calls, and calls left out, kill (STYLE section 8)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import cloudpickle  # type: ignore[import-untyped]
import pytest

from splitvmm.native.confine import FUTEX_OPS, PRCTL_OPTIONS
from tests.sandbox import escapes
from tests.sandbox.harness import SandboxedDevice

pytestmark = pytest.mark.sandbox

ALLOWED = [
    "mmap_read_write",
    "madvise_dontneed",
    "clock_gettime_syscall",
    "getpid",
    "poll_nothing",
    "realloc_mmapped",  # glibc falls back to malloc, copy and free when mremap is refused
]
# Refused with an errno, not killed: glibc's realloc tries mremap and copies when it fails.
REFUSED = {"mremap_maymove": "ENOMEM", "mremap_fixed": "ENOMEM"}
# A device process has one thread (devprocs/channel.py): what only threads call (a futex, a
# new thread's signal mask, scheduling policy and name, as libzmq's threads did when a device
# held them) kills it, as do the argument forms no policy ever allowed.
KILLED = [
    "madvise_free",
    "mmap_shared_anonymous",
    "futex_wake_private",
    "futex_requeue",
    "getppid",
    "sigmask_block_nothing",
    "sched_getscheduler",
    "sched_setscheduler_other",
    "sched_setscheduler_fifo",
    "prctl_set_name",
    "prctl_set_dumpable",
]


@pytest.fixture(scope="module", autouse=True)
def _escapes_by_value() -> Iterator[None]:
    cloudpickle.register_pickle_by_value(escapes)
    yield
    cloudpickle.unregister_pickle_by_value(escapes)


def _probe(spawn: Callable[..., SandboxedDevice], name: str, seccomp: str = "kill") -> str:
    ctx = {**FUTEX_OPS, **PRCTL_OPTIONS}
    dev = spawn(hook=functools.partial(escapes.run_probe, name, ctx), seccomp=seccomp)
    result = dev.hook_result()
    return "killed" if result is None else str(result["outcome"])


@pytest.mark.parametrize("name", ALLOWED)
def test_serial_policy_when_call_is_allowed_returns(
    name: str, spawn: Callable[..., SandboxedDevice]
) -> None:
    assert _probe(spawn, name) == "succeeded"


@pytest.mark.parametrize("name", KILLED)
def test_serial_policy_when_call_or_argument_is_not_allowed_kills(
    name: str, spawn: Callable[..., SandboxedDevice]
) -> None:
    assert _probe(spawn, name) == "killed"


@pytest.mark.parametrize(("name", "errno_name"), sorted(REFUSED.items()))
def test_serial_policy_when_call_is_refused_returns_its_errno(
    name: str, errno_name: str, spawn: Callable[..., SandboxedDevice]
) -> None:
    assert _probe(spawn, name) == errno_name


def test_serial_policy_in_log_mode_lets_a_forbidden_call_run(
    spawn: Callable[..., SandboxedDevice],
) -> None:
    assert _probe(spawn, "getppid", seccomp="log") == "succeeded"  # logged to kmsg instead
