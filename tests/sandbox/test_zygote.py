"""The zygote (sandbox/zygote.py): what a forked device is born with, whose child it is, and
how a failed zygote is reported. The probe zygote (tests/sandbox/zygote_probe.py) runs the
real serve() loop with a device main that reports its fds and parent.

Each test runs its 'launcher' in a forked process of its own that is a child subreaper, as
the real launcher is, so that the test process itself never inherits orphans."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable

import pytest

from splitvmm.native import confine
from splitvmm.sandbox.zygote import Zygote
from tests.sandbox.forked import in_a_child

PROBE = (sys.executable, "-m", "tests.sandbox.zygote_probe")


def as_launcher(body: Callable[[], object]) -> object:
    """`body`'s JSON result, run in a forked subreaper process (repr of its error if it
    raised)."""
    return in_a_child(body, before=confine.set_child_subreaper)


def fork_and_report(line: bytes) -> dict[str, object]:
    """Fork a probe device with a pipe (its fd 3) and an eventfd (its fd 4); write `line` to
    its stdin; its report, plus what we passed and our own pid."""
    zygote = Zygote.start({}, PROBE)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    event = os.eventfd(0, os.EFD_CLOEXEC)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)  # the launcher's relay pipe
    try:
        pid = zygote.fork("serial", stdin_r, stderr_w, [report_w, event])
        os.close(stderr_w)
        os.close(stdin_r)
        os.close(report_w)
        os.write(stdin_w, line)
        os.close(stdin_w)
        with os.fdopen(report_r, "rb") as f:
            facts = json.loads(f.readline())
        _, status = os.waitpid(pid, 0)  # ours to reap: reparented to us
        os.set_blocking(stderr_r, False)
        try:
            stderr_text = os.read(stderr_r, 65536).decode(errors="replace")
        except BlockingIOError:
            stderr_text = ""
        return {
            "stderr_text": stderr_text,
            **facts,
            "event": [os.fstat(event).st_dev, os.fstat(event).st_ino],
            "stderr": [os.fstat(stderr_r).st_dev, os.fstat(stderr_r).st_ino],
            "status": os.waitstatus_to_exitcode(status),
            "me": os.getpid(),
            "forked": pid,
        }
    finally:
        os.close(event)
        os.close(stderr_r)
        zygote.close()


def test_zygote_device_has_stdin_then_its_fds_from_3_and_nothing_else():
    facts = as_launcher(lambda: fork_and_report(b"spec line\n"))
    assert isinstance(facts, dict), facts
    assert facts["stdin"] == "spec line\n"
    # 0-2 (stdin the pipe, 1 the zygote's, 2 the stderr pipe sent), 3 the report pipe, 4 the
    # eventfd; no more
    assert sorted(facts["fds"], key=int) == ["0", "1", "2", "3", "4"]
    assert facts["fds"]["4"] == facts["event"]
    assert facts["fds"]["2"] == facts["stderr"]


def test_zygote_device_runs_with_the_collector_on_though_its_zygote_held_it_off():
    facts = as_launcher(lambda: fork_and_report(b"x\n"))
    assert isinstance(facts, dict), facts
    assert facts["collector"] is True


def test_zygote_device_is_reparented_to_the_launcher_in_a_session_of_its_own():
    facts = as_launcher(lambda: fork_and_report(b"x\n"))
    assert isinstance(facts, dict), facts
    assert facts["pid"] == facts["forked"]
    assert facts["ppid"] == facts["launcher"] == facts["me"]  # reaped by us, above
    assert facts["sid"] == facts["pid"]


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"exit 7\n", 7), (b"exit\n", 0), (b"interrupt\n", -signal.SIGINT), (b"x\n", 0)],
)
def test_zygote_device_ends_with_the_status_an_interpreter_would_give(line, status):
    """SystemExit(7), SystemExit(None), KeyboardInterrupt, a normal return: as if exec'd."""
    facts = as_launcher(lambda: fork_and_report(line))
    assert isinstance(facts, dict), facts
    assert facts["status"] == status


def test_zygote_device_that_raises_under_its_filter_prints_its_traceback_and_exits_1():
    """As an exec'd device would; the traceback module's printing stat()s source files, which
    a device's filter kills: the device died of SIGSYS with nothing said."""
    facts = as_launcher(lambda: fork_and_report(b"raise-filtered\n"))
    assert isinstance(facts, dict), facts
    assert facts["status"] == 1
    assert "ValueError: a bug in the device" in facts["stderr_text"]


def test_zygote_loads_each_model_before_it_forks_a_device_of_it():
    """The zygote imports a model's module at the first request for it, not before (a VM
    pays for the models it has); the device, forked after, finds it imported."""

    def body() -> object:
        zygote = Zygote.start({}, PROBE)
        seen = []
        try:
            for model in ("serial", "rtc"):
                report_r, report_w = os.pipe2(os.O_CLOEXEC)
                stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
                pid = zygote.fork(model, stdin_r, 2, [report_w])
                for fd in (stdin_r, report_w, stdin_w):
                    os.close(fd)  # an empty line: the probe reports and exits 0
                with os.fdopen(report_r, "rb") as f:
                    seen.append(json.loads(f.readline())["loaded"])
                os.waitpid(pid, 0)
        finally:
            zygote.close()
        return seen

    assert as_launcher(body) == [["serial"], ["serial", "rtc"]]


def test_zygote_loads_the_vms_models_before_its_first_fork():
    """The launcher tells a zygote the VM's models (its configure request): imported before
    the first fork, so that every device of the VM shares the same pages; one it cannot
    import is the error of a fork of it, not of the others."""

    def body() -> object:
        zygote = Zygote.start({}, PROBE)
        try:
            zygote.load(["serial", "no-such-model", "virtio-blk"])
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            pid = zygote.fork("serial", stdin_r, 2, [report_w])
            for fd in (stdin_r, report_w, stdin_w):
                os.close(fd)
            with os.fdopen(report_r, "rb") as f:
                loaded = json.loads(f.readline())["loaded"]
            os.waitpid(pid, 0)
        finally:
            zygote.close()
        return loaded

    assert as_launcher(body) == ["serial", "virtio-blk"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a root zygote's capabilities need root")
def test_zygote_told_its_devices_are_of_its_own_user_gives_up_what_another_needs():
    """A root launcher's first zygote is started before the VM's config says whether its
    devices run as another user (vm.device_uid), so it held CAP_SETUID, CAP_SETGID and
    CAP_KILL until it rested. Told they do not, it gives them up before its next fork, and
    keeps the rest."""

    def body() -> object:
        zygote = Zygote.start({}, PROBE)
        try:
            zygote.own_user()
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            pid = zygote.fork("serial", stdin_r, 2, [report_w])  # after the request: read
            for fd in (stdin_r, report_w, stdin_w):
                os.close(fd)
            os.close(report_r)
            os.waitpid(pid, 0)
            with open(f"/proc/{zygote.process.pid}/status") as f:
                held = {k: int(v, 16) for k, v in (line.split(":") for line in f) if k == "CapPrm"}
        finally:
            zygote.close()
        return held["CapPrm"]

    held = as_launcher(body)
    assert isinstance(held, int)
    assert held & sum(1 << cap for cap in confine.FOR_ANOTHER_USER) == 0
    assert held & (1 << confine.CAP_SETFCAP)


def test_zygote_refuses_a_model_it_cannot_load_naming_it():
    def body() -> object:
        zygote = Zygote.start({}, PROBE)
        stdin_r, stdin_w = os.pipe()
        try:
            zygote.fork("no-such-model", stdin_r, 2, [])
        finally:
            zygote.close()
        return "forked"

    assert as_launcher(body) == {
        "error": "ZygoteError: the zygote could not fork: model 'no-such-model': no such model"
    }


def test_zygote_that_exited_raises_zygote_error_naming_its_status():
    def body() -> object:
        zygote = Zygote.start({}, (sys.executable, "-c", "import sys; sys.exit(3)"))
        stdin_r, stdin_w = os.pipe()
        try:
            zygote.fork("serial", stdin_r, 2, [])
        finally:
            zygote.close()
        return "forked"

    assert as_launcher(body) == {"error": "ZygoteError: the zygote exited (status 3)"}


def test_zygote_that_failed_a_fork_is_seen_ended_so_the_launcher_starts_another():
    """fork() reaps a zygote that failed it; ended() must say so from then on, or the
    launcher's retry (launcher_server.py _spawn) gives the device up instead."""

    def body() -> object:
        zygote = Zygote.start({}, (sys.executable, "-c", "import sys; sys.exit(3)"))
        stdin_r, stdin_w = os.pipe()
        try:
            zygote.fork("serial", stdin_r, 2, [])
        except OSError:
            return [zygote.ended(), zygote.process.returncode, zygote.process.poll()]
        finally:
            zygote.close()
        return "forked"

    assert as_launcher(body) == [True, 3, 3]


# A zygote that reports, as its first message, which fds below 64 it has and whether its
# stdin and stdout are /dev/null.
FD_PROBE = (
    sys.executable,
    "-c",
    "import json, os, sys\n"
    "def is_open(fd):\n"
    "    try:\n"
    "        os.fstat(fd)\n"
    "    except OSError:\n"
    "        return False\n"
    "    return True\n"
    "null = os.stat(os.devnull).st_rdev\n"
    "top = max(64, int(sys.argv[1]) + 1)\n"
    "facts = {'fds': [fd for fd in range(top) if is_open(fd)], 'socket': int(sys.argv[1]),\n"
    "         'null': [os.fstat(fd).st_rdev == null for fd in (0, 1)]}\n"
    "os.write(int(sys.argv[1]), json.dumps(facts).encode())\n",
)


def test_zygote_gets_stdio_and_its_socket_and_no_other_fd_of_the_launcher():
    """Every fd of the launcher but stderr stays behind, inheritable or not (close_fds)."""

    def body() -> object:
        leaked_r, leaked_w = os.pipe()
        os.set_inheritable(leaked_r, True)  # an fd someone forgot to make close-on-exec
        zygote = Zygote.start({}, FD_PROBE)
        try:
            facts: dict[str, object] = json.loads(os.read(zygote.fileno(), 4096))
            return {**facts, "leaked": leaked_r}
        finally:
            zygote.close()
            os.close(leaked_r)
            os.close(leaked_w)

    facts = as_launcher(body)
    assert isinstance(facts, dict), facts
    assert facts["fds"] == [0, 1, 2, facts["socket"]], facts
    assert facts["null"] == [True, True]


def test_zygote_that_was_killed_is_seen_ended_with_the_signal_as_status():
    def body() -> object:
        zygote = Zygote.start({}, (sys.executable, "-c", "import time; time.sleep(60)"))
        ended_before = zygote.ended()
        os.kill(zygote.process.pid, signal.SIGTERM)
        os.waitid(os.P_PID, zygote.process.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped
        result = [ended_before, zygote.ended(), zygote.process.returncode]
        zygote.close()  # reaped already: nothing to kill
        return result

    assert as_launcher(body) == [False, True, -signal.SIGTERM]
