"""`splitvmm ctl` against monitors that are gone, hung, or answer garbage: one line, exit 1.

A fake monitor (a UNIX socket served by a thread) plays each part; no /dev/kvm needed.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner, Result

from splitvmm.cli import cli
from splitvmm.cli.ctl.snapshot import target
from splitvmm.monitor import control

SNAPSHOT_REPLY = b'{"ok": true, "path": "/x", "pause_ms": 1.0, "write_ms": 1.0, "bytes": 0}\n'


class FakeMonitor:
    """Serves one connection: reads the request line, then sends `reply` (None: closes at
    once; b"": says nothing until the test ends)."""

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.reply = reply
        self.request = b""
        self.done = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:  # closed before any client came (ctl failed before it connected)
            return
        with conn, conn.makefile("rb") as f:
            self.request = f.readline()
            if self.reply:
                conn.sendall(self.reply)
            elif self.reply is not None:
                self.done.wait(30)

    def close(self) -> None:
        self.done.set()
        if self.thread.is_alive():  # (not closed yet) an accept() still waiting wakes
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join()
        self.sock.close()


@pytest.fixture
def monitor(request, tmp_path) -> Iterator[FakeMonitor]:
    m = FakeMonitor(tmp_path / "control.sock", request.param)
    yield m
    m.close()


def ctl(path: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["ctl", "--socket", str(path), *args])


def assert_one_line_error(result: Result, words: str) -> None:
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert words in result.output


@pytest.mark.parametrize(
    "monitor,words",
    [
        (b"garbage\n", "replied with something that is not a JSON object"),
        (b"[1, 2]\n", "replied with something that is not a JSON object"),
        (None, "closed the connection without a reply"),
        (b'{"ok": true}\n', "the VM's reply lacks what this command shows (KeyError('name'))"),
        (b'{"ok": true, "devices": 7}\n', "the VM's reply lacks what this command shows"),
        (b'{"ok": false, "error": "the monitor is busy with snapshot"}\n', "busy with snapshot"),
    ],
    indirect=["monitor"],
)
def test_ctl_status_bad_reply_is_one_line_error(monitor, words):
    assert_one_line_error(ctl(monitor.sock.getsockname(), "status"), words)


@pytest.mark.parametrize(
    "monitor",
    [
        b'{"ok": true, "state": NaN}\n',
        b'{"ok": true, "devices": [{"pid": -Infinity}]}\n',
        b'{"ok": true, "state": 1e999}\n',
    ],
    indirect=True,
)
def test_ctl_reply_with_a_number_json_has_not_is_one_line_error(monitor):
    """NaN, Infinity and 1e999 (past a float: infinity) are no JSON (RFC 8259). Python's
    parser took them, and --json printed them back, exit 0, to a script whose parser
    refuses them."""
    result = ctl(monitor.sock.getsockname(), "pause", "--json")
    assert_one_line_error(result, "replied with something that is not a JSON object")


@pytest.mark.parametrize(
    "monitor", [b'{"ok": false, "error": "\\u001b]0;pwned\\u0007 failed\\nfake"}\n'], indirect=True
)
def test_ctl_error_text_reaches_the_terminal_escaped(monitor):
    """An error may quote a device's words: an escape sequence in it stays an escape, and
    a newline cannot start a line of its own."""
    result = ctl(monitor.sock.getsockname(), "status")
    assert_one_line_error(result, r"\x1b]0;pwned\x07 failed\nfake")
    assert "\x1b" not in result.output and "\x07" not in result.output


@pytest.mark.parametrize(
    "monitor",
    [
        b'{"ok": true, "name": "vm\\u001b[2J", "state": "running", "vcpus": 1, '
        b'"memory": 1048576, "uptime_s": 1, "pid": 7, "devices": []}\n'
    ],
    indirect=True,
)
def test_ctl_reply_text_reaches_the_terminal_escaped(monitor):
    result = ctl(monitor.sock.getsockname(), "status")
    assert result.exit_code == 0 and "vm\\x1b[2J" in result.output, result.output
    assert "\x1b" not in result.output


@pytest.mark.parametrize(
    "monitor",
    [b'{"ok": true, "devices": [1]}\n', b'{"ok": true, "devices": "ab"}\n'],
    indirect=True,
)
def test_ctl_devices_reply_devices_not_objects_is_one_line_error(monitor):
    result = ctl(monitor.sock.getsockname(), "devices")
    assert_one_line_error(result, "lacks what this command shows (TypeError('devices is not")


@pytest.mark.parametrize(
    "monitor", [SNAPSHOT_REPLY.replace(b'"bytes": 0', b'"bytes": 1' + b"0" * 400)], indirect=True
)
def test_ctl_snapshot_reply_of_more_bytes_than_a_float_holds_is_one_line_error(monitor):
    """JSON's integers have no bound: the size in MiB (bytes / 2**20) of one past a float's
    range raised OverflowError, a traceback."""
    result = ctl(monitor.sock.getsockname(), "snapshot", "snap1")
    assert_one_line_error(result, "lacks what this command shows (OverflowError(")


@pytest.mark.parametrize("monitor", [b""], indirect=True)
def test_ctl_status_hung_monitor_is_one_line_error(monitor, monkeypatch):
    monkeypatch.setattr(control, "READ_ONLY_TIMEOUT_S", 0.2)
    assert_one_line_error(ctl(monitor.sock.getsockname(), "status"), "did not answer within 0.2 s")


@pytest.mark.parametrize("monitor", [SNAPSHOT_REPLY], indirect=True)
def test_ctl_suspend_waits_for_a_monitor_that_works_longer_than_ten_minutes(monitor, monkeypatch):
    """A suspend of a large VM to slow storage may take longer than any fixed limit: ctl
    gave up after 600 s and said it failed while the monitor went on and suspended the VM.
    It waits for as long as the monitor works on it (its death closes the socket). The
    clock here says each look at it comes ten minutes after the last."""
    clock = itertools.count(step=600.0)
    monkeypatch.setattr(
        control, "time", SimpleNamespace(monotonic=lambda: next(clock), sleep=time.sleep)
    )
    result = ctl(monitor.sock.getsockname(), "suspend", "snap1")
    assert (result.exit_code, result.output) == (0, "suspended to /x: 0.0 MiB, VM paused 1.0 ms\n")


@pytest.mark.parametrize("monitor", [b""], indirect=True)
def test_ctl_timeout_option_bounds_a_pause_that_hangs(monitor):
    """--timeout: a script's own limit on any request (the monitor may still carry it out)."""
    result = ctl(monitor.sock.getsockname(), "--timeout", "0.3", "pause")
    assert_one_line_error(result, "did not answer within 0.3 s")


@pytest.mark.parametrize("monitor", [b""], indirect=True)
@pytest.mark.parametrize("seconds", ["nan", "inf", "1e300"])
def test_ctl_timeout_option_past_what_a_socket_waits_is_a_usage_error(monitor, seconds):
    """NaN passes a range check (every comparison with it is false), and a socket's timeout
    holds no more than ~292 years: each reached settimeout() and ended ctl in a traceback."""
    result = ctl(monitor.sock.getsockname(), "--timeout", seconds, "pause")
    assert result.exit_code == 2, result.output  # click's usage error, not a traceback
    assert "Invalid value for '--timeout'" in result.output


@pytest.mark.parametrize("monitor", [b""], indirect=True)
def test_ctl_timeout_option_past_what_poll_waits_is_a_usage_error(monitor):
    """A socket's timeout is waited out in poll(2), in an int of milliseconds (~24.8 days):
    past it the count wrapped, and 2**32 ms + 0.3 s gave up after 0.3 s, saying it had
    waited ~50 days."""
    result = ctl(monitor.sock.getsockname(), "--timeout", "4294967.6", "pause")
    assert result.exit_code == 2, result.output  # click's usage error, not a wrong wait
    assert "Invalid value for '--timeout'" in result.output


@pytest.mark.parametrize("monitor", [b""], indirect=True)
def test_ctl_timeout_option_overrides_status_default(monitor, monkeypatch):
    monkeypatch.setattr(control, "READ_ONLY_TIMEOUT_S", 600)
    result = ctl(monitor.sock.getsockname(), "--timeout", "0.2", "status")
    assert_one_line_error(result, "did not answer within 0.2 s")


def test_ctl_reply_trickled_a_byte_at_a_time_gets_one_deadline(tmp_path, monkeypatch):
    """The timeout was per recv: a peer sending a byte every so often held ctl for ever."""
    monkeypatch.setattr(control, "READ_ONLY_TIMEOUT_S", 0.5)
    path = tmp_path / "control.sock"
    stop = threading.Event()

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            listener.listen(1)
            ready.set()
            conn, _ = listener.accept()
            with conn:
                while not stop.wait(0.05):
                    try:
                        conn.send(b" ")
                    except (BrokenPipeError, ConnectionResetError):
                        return  # ctl gave up and closed (before the test's stop, now and then)

    ready = threading.Event()
    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        ready.wait(5)
        start = time.monotonic()
        assert_one_line_error(ctl(path, "status"), "did not answer within 0.5 s")
        assert time.monotonic() - start < 5
    finally:
        stop.set()
        thread.join()


def test_ctl_status_missing_socket_is_one_line_error(tmp_path):
    result = ctl(tmp_path / "control.sock", "status")
    assert_one_line_error(result, "no VM is listening at")


def test_ctl_status_stale_socket_is_one_line_error(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "control.sock"))  # bound, never listening: a monitor that died
    result = ctl(tmp_path / "control.sock", "status")
    assert_one_line_error(result, "is not running (stale socket)")


@pytest.mark.parametrize("monitor", [SNAPSHOT_REPLY], indirect=True)
def test_ctl_snapshot_relative_dir_is_sent_absolute(monitor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ctl(monitor.sock.getsockname(), "snapshot", "snaps/one", "--json")
    monitor.close()
    assert result.exit_code == 0, result.output
    assert (
        monitor.request
        == b'{"op": "snapshot", "path": "%s"}\n'
        % str((tmp_path / "snaps" / "one").resolve()).encode()
    )


@pytest.mark.parametrize("link", ["dangling", "loop", "to-a-snapshot"])
def test_ctl_snapshot_sends_a_symlinked_target_as_named(tmp_path, link):
    """The last component is the monitor's to judge (it refuses a symlink there, dangling or
    not): resolved here, a dangling link sent the snapshot where it pointed and an existing
    one was named by its target in the error, and a loop of links was a traceback."""
    snaps = tmp_path / "snaps"
    (snaps / "s1").mkdir(parents=True)
    path = snaps / "link"
    destination = {"dangling": snaps / "elsewhere", "loop": path, "to-a-snapshot": snaps / "s1"}
    path.symlink_to(destination[link])
    assert target(path) == str(snaps.resolve() / "link")


def test_ctl_snapshot_target_follows_links_and_dotdot_above_its_last_component(tmp_path):
    (tmp_path / "real" / "snaps").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    named = tmp_path / "alias" / "snaps" / ".." / "snaps" / "new"
    assert target(named) == str((tmp_path / "real" / "snaps").resolve() / "new")


def test_ctl_snapshot_relative_target_in_a_removed_working_directory_is_one_line(
    tmp_path, monkeypatch
):
    """realpath() of a relative path asks getcwd(), which fails once the working directory
    is removed: that was a traceback."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(click.ClickException, match="snapshot target snap1: cannot make it abs"):
        target(Path("snap1"))


@pytest.mark.parametrize("planted", ["writable-root", "foreign-vm-dir"])
def test_ctl_refuses_a_socket_another_user_could_have_planted(tmp_path, monkeypatch, planted):
    """The runtime root may lie in the shared temp dir: a socket another local user put
    there first was sent our requests (a snapshot's signing key among them) and its
    answers believed. ctl checks the directories as `up` makes them: ours, private."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    vm_dir = tmp_path / "splitvmm" / "vm"
    vm_dir.mkdir(parents=True, mode=0o700)
    (tmp_path / "splitvmm").chmod(0o777 if planted == "writable-root" else 0o700)
    if planted == "foreign-vm-dir":
        os.chown(vm_dir, 65534, 65534)  # the tests run as root (README): nobody's now
    fake = FakeMonitor(vm_dir / "control.sock", None)
    try:
        result = CliRunner().invoke(cli, ["ctl", "--vm", "vm", "status"])
        words = "may be written by other users" if planted == "writable-root" else "not a dir"
        assert_one_line_error(result, words)
    finally:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unblock:
            unblock.connect(str(vm_dir / "control.sock"))  # its accept() returns; it closes
        fake.close()
    assert fake.request == b""  # nothing was sent to it


def ctl_against_nobodys_socket(path: Path, args: list[str]) -> tuple[Result, bool]:
    """ctl `args` against a socket at `path` that uid 65534 listens on (listen() records the
    credentials a client's SO_PEERCRED reads) and closes once it got a request or none:
    ctl's result, and whether a request reached it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listening_r, listening_w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            listener.listen(1)
            os.write(listening_w, b"!")
            listener.settimeout(30)  # a ctl that never connects fails the test, not hangs it
            conn, _ = listener.accept()
            conn.settimeout(10)
            code = 3 if conn.recv(4096) else 0  # 3: a request reached us
        finally:
            os._exit(code)
    listener.close()
    os.close(listening_w)
    try:
        assert os.read(listening_r, 1) == b"!"
        result = CliRunner().invoke(cli, ["ctl", *args])
    finally:
        os.close(listening_r)
        _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 3), code
    return result, code == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to serve a socket as another user")
@pytest.mark.parametrize("how", ["--socket", "--vm"])
def test_ctl_sends_nothing_to_a_socket_another_user_serves(tmp_path, monkeypatch, how):
    """Whatever path led there (a --socket given; a directory another user swapped between
    ctl's checks and its connect), a socket served by another user is theirs: no request,
    a snapshot's signing key among them, goes to it (SO_PEERCRED)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    vm_dir = tmp_path / "splitvmm" / "vm"
    vm_dir.mkdir(parents=True, mode=0o700)
    path = vm_dir / "control.sock"
    args = ["--socket", str(path)] if how == "--socket" else ["--vm", "vm"]

    result, reached = ctl_against_nobodys_socket(path, [*args, "snapshot", str(tmp_path / "s")])

    assert_one_line_error(result, f"{path} is served by uid 65534, not by this user (uid 0)")
    assert not reached


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to serve a socket as another user")
@pytest.mark.parametrize(("uid", "reaches"), [(65534, True), (1000, False)])
def test_ctl_monitor_uid_names_whose_vm_root_may_steer(tmp_path, uid, reaches):
    """Root steering a VM a service account runs: --monitor-uid says whose it is, and no
    other user's socket is sent anything either."""
    path = tmp_path / "control.sock"

    result, reached = ctl_against_nobodys_socket(
        path, ["--socket", str(path), "--monitor-uid", str(uid), "status"]
    )

    assert reached == reaches
    words = "closed the connection without a reply" if reaches else "not by --monitor-uid"
    assert_one_line_error(result, words)


@pytest.mark.parametrize("monitor", [None], indirect=True)  # None: it closes, sends nothing
def test_ctl_monitor_uid_of_another_user_refuses_our_own_socket(monitor, tmp_path):
    """--monitor-uid says whose VM it is: a socket served by anyone else, us included, is sent
    nothing."""
    other = 65534 if os.geteuid() != 65534 else 65533
    result = ctl(tmp_path / "control.sock", "--monitor-uid", str(other), "status")
    assert_one_line_error(result, f"not by --monitor-uid (uid {other})")
    assert monitor.request == b""


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_ctl_socket_that_is_no_socket_says_so(tmp_path, kind):
    """A file or a FIFO refuses a connect as a stale socket does: named for what it is."""
    path = tmp_path / "control.sock"
    if kind == "file":
        path.write_bytes(b"")
    else:
        os.mkfifo(path)
    assert_one_line_error(ctl(path, "status"), f"{path} is not a socket")


def test_ctl_without_vm_skips_stale_sockets(tmp_path, monkeypatch):
    """A monitor killed outright leaves its socket: `ctl` without --vm must not count it as
    a running VM (two were "running", so it asked for --vm)."""
    from splitvmm.cli.ctl.common import socket_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    for vm in ("dead", "live"):
        (tmp_path / "splitvmm" / vm).mkdir(parents=True)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live,
    ):
        dead.bind(str(tmp_path / "splitvmm" / "dead" / "control.sock"))  # never listens
        live.bind(str(tmp_path / "splitvmm" / "live" / "control.sock"))
        live.listen()
        assert socket_path(None, None) == tmp_path / "splitvmm" / "live" / "control.sock"


def test_ctl_without_vm_when_none_runs_says_so_in_a_sentence(tmp_path, monkeypatch):
    """It said "name the VM with --vm (running VMs: none)": no VM to name is no VM running."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "splitvmm").mkdir(mode=0o700)
    result = CliRunner().invoke(cli, ["ctl", "status"])
    assert_one_line_error(result, f"Error: no VM is running (none listens in {tmp_path}/splitvmm)")


@pytest.mark.parametrize(
    "monitor",
    [b'{"ok": false, "error": "the monitor is busy with snapshot; try again", "retry": true}\n'],
    indirect=True,
)
def test_ctl_refused_as_busy_exits_75_to_say_try_again(monitor):
    """A script can tell "busy, retry" from a failure without parsing the words."""
    result = ctl(monitor.sock.getsockname(), "pause")
    assert (result.exit_code, result.output.strip()) == (
        75,
        "Error: the monitor is busy with snapshot; try again",
    )


@pytest.mark.parametrize("monitor", [SNAPSHOT_REPLY], indirect=True)
@pytest.mark.parametrize("verb", ["snapshot", "suspend"])
def test_ctl_snapshot_signing_key_that_is_a_directory_is_one_line_error(monitor, tmp_path, verb):
    """As `up --require-signature`: the signing code says what is wrong (exit 1), not click's
    usage error (exit 2)."""
    result = ctl(tmp_path / "control.sock", verb, str(tmp_path / "snap"), "--sign", str(tmp_path))

    assert_one_line_error(result, str(tmp_path))
    assert monitor.request == b""  # nothing was asked of the VM


@pytest.mark.parametrize("verb", ["snapshot", "suspend"])
def test_ctl_snapshot_target_this_user_cannot_read_is_not_clicks_usage_error(
    tmp_path, monkeypatch, verb
):
    """A name already taken by a directory this user may not read (another user's, 0700) is
    the monitor's "already exists" (exit 1), as a file there is: click's readable check would
    refuse it first with a usage error (exit 2). Tests run as root, whom access() never
    refuses: it is made to refuse here."""
    taken = tmp_path / "taken"
    taken.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: False if str(p) == str(taken) else real_access(p, mode, **kw),
    )

    result = CliRunner().invoke(
        cli, ["ctl", "--socket", str(tmp_path / "absent.sock"), verb, str(taken)]
    )

    assert result.exit_code == 1, result.output
    assert "not readable" not in result.output


LINK_CHANGED = b'{"ok": true, "name": "net0", "link": "down", "changed": true}\n'
LINK_AS_IT_WAS = b'{"ok": true, "name": "net0", "link": "down", "changed": false}\n'


@pytest.mark.parametrize(
    ("monitor", "args", "asked", "printed"),
    [
        (LINK_CHANGED, ["down"], {"state": "down"}, "net0: link down\n"),
        (LINK_AS_IT_WAS, [], {}, "net0: link down (unchanged)\n"),
    ],
    indirect=["monitor"],
    ids=["down", "told"],
)
def test_ctl_link_sends_the_state_given_and_says_whether_it_changed(monitor, args, asked, printed):
    result = ctl(monitor.sock.getsockname(), "link", "net0", *args)
    monitor.close()

    assert (result.exit_code, result.output) == (0, printed)
    assert json.loads(monitor.request) == {"op": "link", "name": "net0", **asked}


@pytest.mark.parametrize(
    "monitor", [b'{"ok": true, "name": "blk0", "pid": 7, "kind": "io-error"}\n'], indirect=True
)
@pytest.mark.parametrize(
    ("options", "sent"),
    [
        (["--on", "write", "--count", "3"], {"on": "write", "count": 3}),
        ([], {"on": "any", "count": 1}),
    ],
    ids=["given", "defaults"],
)
def test_ctl_inject_fault_io_error_sends_which_requests_fail_and_how_many(monitor, options, sent):
    """`--on` and `--count` reach the monitor; left out, an io-error fails one request of
    any kind (protocol/faults.py DEFAULTS)."""
    result = ctl(monitor.sock.getsockname(), "inject-fault", "blk0", "io-error", *options)
    monitor.close()

    assert (result.exit_code, result.output) == (0, "armed io-error in blk0 (pid 7)\n")
    assert json.loads(monitor.request) == {
        "op": "inject-fault", "name": "blk0", "kind": "io-error", "after": 1, "delay_ms": 0,
        "signal": "SEGV", **sent,
    }  # fmt: skip


@pytest.mark.parametrize("vm", ["..", "a/b", "", "-x"])
def test_ctl_vm_that_is_no_vm_name_says_so(tmp_path, monkeypatch, vm):
    """--vm took any string: ".." or "a/b" looked for a socket in another directory and
    said that no VM listened there."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "splitvmm").mkdir(mode=0o700)
    result = CliRunner().invoke(cli, ["ctl", "--vm", vm, "status"])
    assert_one_line_error(result, f"Error: --vm: '{vm}' is not a VM name (1-63 letters")


def test_ctl_runtime_root_that_cannot_be_a_directory_says_why_in_a_sentence(tmp_path, monkeypatch):
    """XDG_RUNTIME_DIR naming a file: Python's "[Errno 20] Not a directory: '...'"."""
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "file"))
    result = CliRunner().invoke(cli, ["ctl", "--vm", "vm", "status"])
    assert_one_line_error(result, f"Error: cannot use {tmp_path}/file/splitvmm: Not a directory")


@pytest.mark.parametrize(
    "monitor", [SNAPSHOT_REPLY.replace(b'"/x"', b'"/x\\n\\u001b[31my"')], indirect=True
)
def test_ctl_snapshot_path_with_a_newline_is_printed_on_one_line(monitor):
    """The success line quoted the path as it came: a directory named with a newline (or an
    escape sequence) split the line, as emit() keeps the newlines of multi-line output."""
    result = ctl(monitor.sock.getsockname(), "snapshot", "snap1")
    assert result.exit_code == 0, result.output
    assert result.output == "snapshot /x\\n\\x1b[31my: 0.0 MiB, VM paused 1.0 ms\n"
