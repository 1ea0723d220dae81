"""Pieces of sandbox/device.py and native/landlock.py that run without confining anything."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource

import pytest

from splitvmm.devprocs import runtime
from splitvmm.devprocs.base import load_model
from splitvmm.native import confine, landlock
from splitvmm.native.seccomp import pyseccomp as seccomp
from splitvmm.sandbox import device as sandbox
from splitvmm.sandbox import policy
from splitvmm.sandbox.device import SandboxError, SeccompMode
from tests.sandbox.forked import in_a_child


@pytest.mark.parametrize(
    ("audit", "mode"),
    [(False, SeccompMode.KILL), (True, SeccompMode.LOG), ("trace", SeccompMode.TRACE)],
)
def test_sandbox_mode_when_given_audit_value_maps_to_seccomp_mode(
    audit: bool | str, mode: SeccompMode
) -> None:
    assert sandbox._mode(audit) is mode


def test_sandbox_mode_when_unknown_raises() -> None:
    with pytest.raises(ValueError):
        sandbox._mode("allow")


@pytest.mark.parametrize(
    "channel", ["tcp://127.0.0.1:5555", "ipc://relative.sock", "ipc:///x.sock"]
)
def test_sandbox_channel_path_when_not_ipc_in_a_directory_raises(channel: str) -> None:
    with pytest.raises(SandboxError, match="is not ipc://"):
        sandbox._channel_path(channel)


def test_landlock_fs_rights_when_abi_grows_only_add_rights() -> None:
    rights = [landlock.fs_rights(abi) for abi in range(1, 8)]

    assert all(a & b == a for a, b in zip(rights, rights[1:], strict=False))
    assert rights[0].bit_count() == 13 and rights[-1].bit_count() == 16


def test_restrict_landlock_when_kernel_has_none_warns_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable() -> int:
        raise landlock.LandlockUnavailable(errno.EOPNOTSUPP, "Landlock is not enabled")

    monkeypatch.setattr(landlock, "restrict_self_deny_all", unavailable)

    with caplog.at_level(logging.WARNING, logger="splitvmm.dev.sandbox"):
        sandbox._restrict_landlock()

    assert "Landlock is not available" in caplog.text


def test_file_size_limit_is_the_largest_file_that_must_not_grow(tmp_path) -> None:
    """A disk image and a page written in place: the limit is the larger, so no write grows
    the image; read-only files, pipes and sealed memfds (guest RAM, only mapped) set none."""
    disk, page, ro = tmp_path / "disk.img", tmp_path / "page", tmp_path / "ro"
    disk.write_bytes(bytes(1 << 20))
    page.write_bytes(bytes(4096))
    ro.write_bytes(bytes(8 << 20))
    ram = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(ram, 16 << 20)
    fcntl.fcntl(ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    r, w = os.pipe()
    fixed = [os.open(disk, os.O_RDWR), os.open(page, os.O_RDWR)]
    others = [os.open(ro, os.O_RDONLY), ram, r, w]
    try:
        assert sandbox._file_size_limit({*fixed, *others}, frozenset(fixed)) == 1 << 20
        assert sandbox._file_size_limit(set(others), frozenset()) == 0
    finally:
        for fd in (*fixed, *others):
            os.close(fd)


@pytest.mark.parametrize("append", [True, False], ids=["log", "stdout-redirected"])
def test_file_size_limit_is_none_with_a_file_that_grows(tmp_path, append: bool) -> None:
    """A device's output or log file grows, whether opened O_APPEND (an output file) or not
    (the operator's `> console.log`, handed to a stdio output): no limit then, or its
    writes would fail with EFBIG and the guest's output be lost."""
    disk, log = tmp_path / "disk.img", tmp_path / "console.log"
    disk.write_bytes(bytes(4096))
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fds = [os.open(disk, os.O_RDWR), os.open(log, mode)]
    try:
        assert sandbox._file_size_limit(set(fds), frozenset(fds[:1])) == resource.RLIM_INFINITY
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES, errno.ENOENT])
def test_no_nested_user_namespace_where_proc_sys_refuses_warns_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: int
) -> None:
    """A read-only /proc/sys (a container, systemd's ProtectKernelTunables), or none with a
    user table: the device starts, its filter alone refusing nested user namespaces."""
    written = []

    def refuse(path: str, text: str) -> None:
        written.append(path)
        raise OSError(error, os.strerror(error), path)

    monkeypatch.setattr(sandbox, "_write_proc", refuse)
    with caplog.at_level(logging.WARNING, logger="splitvmm.dev.sandbox"):
        sandbox._no_nested_user_namespace()

    assert written == ["/proc/sys/user/max_user_namespaces"]
    assert "seccomp alone refuses them" in caplog.text


@pytest.mark.parametrize(
    ("mode", "action"),
    [(SeccompMode.KILL, seccomp.KILL_PROCESS), (SeccompMode.LOG, seccomp.LOG)],
    ids=["kill", "log"],
)
def test_seccomp_filter_when_enforcing_kills_the_whole_process(
    monkeypatch: pytest.MonkeyPatch, mode: SeccompMode, action: int
) -> None:
    """DESIGN.md: anything outside the policy kills the process (SECCOMP_RET_KILL_PROCESS),
    not only the thread that made the call: a device left running without that thread is
    an oracle for which syscalls its filter allows. A device runs one thread today, so no
    escape attempt tells the two apart: the filter's default action is checked here."""
    compiled: list[int] = []

    class Loaded:
        def load(self) -> None:
            pass

    def compile_filter(device_policy: policy.Policy, default_action: int) -> Loaded:
        compiled.append(default_action)
        return Loaded()

    monkeypatch.setattr(policy, "compile_filter", compile_filter)
    monkeypatch.setattr(sandbox, "_PRELOADED", {})

    sandbox._seccomp_filter("serial", policy.Policy({}, []), mode)
    if mode is SeccompMode.KILL:  # what a zygote compiles for its devices, the same
        sandbox.preload_policy("serial")

    assert compiled == ([action, action] if mode is SeccompMode.KILL else [action])


def test_device_policy_preloaded_by_a_zygote_is_not_read_again(monkeypatch) -> None:
    """A zygote's prepare_model parses each model's policy once; the devices it forks load
    that, and read no policy file at start."""
    monkeypatch.setattr(sandbox, "_PRELOADED", {})
    runtime.prepare_model("serial")
    from_file = policy.load_model_policy("serial")

    def no_file(model: str, policy_dir: object = None) -> policy.Policy:
        raise AssertionError(f"{model}'s policy read from its file again")

    monkeypatch.setattr(policy, "load_model_policy", no_file)
    assert sandbox._device_policy("serial") == from_file


def test_a_zygote_prepares_a_model_once_for_all_its_forks(monkeypatch) -> None:
    """The zygote calls prepare_model at a `load` and again at each `fork` of the model
    (sandbox/zygote.py _loaded): the policy is read and compiled at the first alone."""
    monkeypatch.setattr(sandbox, "_PRELOADED", {})
    reads: list[str] = []
    load_model_policy = policy.load_model_policy

    def counting(model: str, policy_dir: object = None) -> policy.Policy:
        reads.append(model)
        return load_model_policy(model)

    monkeypatch.setattr(policy, "load_model_policy", counting)
    for _ in range(3):  # load serial, fork serial, fork serial (its spare)
        runtime.prepare_model("serial")
    assert reads == ["serial"]


def test_device_filter_preloaded_by_a_zygote_is_the_enforcing_one_alone(monkeypatch) -> None:
    """The zygote compiles the enforcing filter of each model once; a device loads that one,
    and builds a logging one itself (a device that logs is exec'd, never forked by one)."""
    monkeypatch.setattr(sandbox, "_PRELOADED", {})
    sandbox.preload_policy("serial")
    preloaded_policy, preloaded_filter = sandbox._PRELOADED["serial"]
    built: list[int] = []
    monkeypatch.setattr(
        policy, "compile_filter", lambda device_policy, action: built.append(action)
    )

    enforcing = sandbox._seccomp_filter("serial", preloaded_policy, SeccompMode.KILL)
    sandbox._seccomp_filter("serial", preloaded_policy, SeccompMode.LOG)
    sandbox._seccomp_filter("serial", policy.Policy({}, []), SeccompMode.KILL)  # not that one

    assert enforcing is preloaded_filter
    assert built == [seccomp.LOG, seccomp.KILL_PROCESS]


def test_prepare_model_leaves_a_policy_it_cannot_read_to_the_device(monkeypatch) -> None:
    """The preload only saves work: a policy the zygote cannot read fails each device at
    start, in the device's own words, as an exec'd device fails."""
    monkeypatch.setattr(sandbox, "_PRELOADED", {})

    def unreadable(model: str, policy_dir: object = None) -> policy.Policy:
        raise policy.PolicyError(f"{model}_device.policy: cannot be read")

    monkeypatch.setattr(policy, "load_model_policy", unreadable)
    assert runtime.prepare_model("serial") is load_model("serial")
    with pytest.raises(policy.PolicyError, match="serial_device.policy: cannot be read"):
        sandbox._device_policy("serial")


NOBODY = (65534, 65534)
PR_GET_DUMPABLE = 3  # <linux/prctl.h>
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root becomes another user")


@needs_root
@pytest.mark.parametrize(("restricted", "kept"), [(False, 0), (True, 1 << confine.CAP_SYS_ADMIN)])
def test_become_another_user_keeps_only_what_its_user_namespace_needs(
    monkeypatch: pytest.MonkeyPatch, restricted: bool, kept: int
) -> None:
    """Every id switched, no group, no capability of the host's -- but CAP_SYS_ADMIN where
    only it makes a user namespace (launcher_start.py USERNS_RESTRICTED) -- and the user
    namespace made as that user, with root in it mapped to the user."""
    monkeypatch.setattr(sandbox, "userns_needs_sys_admin", lambda: restricted)
    made_dumpable = []
    set_dumpable = confine.set_dumpable
    monkeypatch.setattr(
        confine, "set_dumpable", lambda on: (made_dumpable.append(on), set_dumpable(on))[1]
    )

    def become() -> object:
        sandbox._become(*NOBODY)
        effective, permitted, inheritable = confine.capabilities()
        ids = [*os.getresuid(), *os.getresgid(), os.getgroups()]
        dumpable = [confine.prctl(PR_GET_DUMPABLE)]
        sandbox._unshare_namespaces()
        dumpable.append(confine.prctl(PR_GET_DUMPABLE))
        sandbox._settle_ids()
        dumpable.append(confine.prctl(PR_GET_DUMPABLE))
        dumpable.append(True in made_dumpable)  # not even for a moment
        uid_map = open("/proc/self/uid_map").read().split()
        status = open("/proc/self/status").read().splitlines()
        uids = next(line.split()[1:] for line in status if line.startswith("Uid:"))
        return [effective, permitted, inheritable, ids, uid_map, uids, dumpable]

    result = in_a_child(become)
    effective, permitted, inheritable, ids, uid_map, uids, dumpable = result  # type: ignore[misc]

    assert (effective, permitted, inheritable) == (kept, kept, 0)
    # root the saved uid, for a file-system uid that opens its maps (_become), until ...
    assert ids == [65534, 65534, 0] + [65534] * 3 + [[]]
    assert uid_map == ["0", "65534", "1"]
    # ... every uid is the namespace's root, the user (65534 would be the overflow uid: the
    # host's root, unmapped)
    assert uids == ["0"] * 4
    # Never dumpable: any host process of that user may reach a dumpable process in a user
    # namespace the user owns (/proc/PID/mem, ptrace).
    assert dumpable == [0, 0, 0, False]


def test_become_as_a_user_without_cap_setuid_says_only_root_may() -> None:
    def become() -> object:
        confine.drop_capabilities(bounding=False)
        sandbox._become(*NOBODY)
        return "became"

    assert in_a_child(become) == {
        "error": "SandboxError: cannot run as uid 65534, gid 65534: Operation not permitted "
        "(only a launcher run as root may)"
    }


@needs_root
def test_become_another_user_where_suid_dumpable_is_1_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fs.suid_dumpable=1 makes the warden's exec (of a program its user may not read)
    dumpable to that user until warden.c turns it off: a window no code of ours can close."""
    monkeypatch.setattr(sandbox, "_suid_dumpable", lambda: 1)

    def become() -> object:
        sandbox._become(*NOBODY)
        return os.getresuid()

    assert in_a_child(become) == {
        "error": "SandboxError: fs.suid_dumpable is 1: a device run as another user would be "
        "open to that user's processes (sysctl fs.suid_dumpable=0 or 2)"
    }
