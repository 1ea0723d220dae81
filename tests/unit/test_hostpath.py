"""hostpath: only regular files are opened, never through a symlink, never hanging on a FIFO;
`unix:` outputs connect only to sockets, within a deadline."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitvmm import hostpath
from splitvmm.hostpath import Access, HostFileError, connect_unix, open_host_file


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "out.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(0)
    yield sock, path
    sock.close()


def test_open_host_file_regular_file_gives_blocking_fd(tmp_path):
    (tmp_path / "fw.bin").write_bytes(b"rom")

    fd = open_host_file(tmp_path / "fw.bin", "boot.firmware")

    with open(fd, "rb") as f:
        flags = os.get_blocking(fd), os.get_inheritable(fd)
        assert (f.read(), flags) == (b"rom", (True, False))


def test_open_host_file_symlink_refused_naming_key_and_path(tmp_path):
    (tmp_path / "secret").write_bytes(b"key")
    os.symlink(tmp_path / "secret", tmp_path / "fw.bin")

    with pytest.raises(HostFileError) as e:
        open_host_file(tmp_path / "fw.bin", "boot.firmware")

    assert str(e.value) == f"boot.firmware: {tmp_path}/fw.bin is a symlink, not a regular file"


def test_open_host_file_symlink_not_followed_when_creating(tmp_path):
    os.symlink(tmp_path / "etc-passwd", tmp_path / "serial.log")

    with pytest.raises(HostFileError, match="is a symlink"):
        open_host_file(tmp_path / "serial.log", "device 'serial0'.output", Access.APPEND)

    assert not (tmp_path / "etc-passwd").exists()


def test_open_output_file_says_whether_its_open_made_the_file(tmp_path):
    path = str(tmp_path / "serial.log")
    made = hostpath.open_output_file(path, "device 'serial0'.output")
    found = hostpath.open_output_file(path, "device 'serial0'.output")
    for fd, _ in (made, found):
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
        os.close(fd)
    assert (made[1], found[1]) == (True, False)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_open_output_file_made_by_another_just_before_our_open_is_not_ours(tmp_path, monkeypatch):
    """Another VM makes the file after we found none and before our open: a look before the
    open (lexists) took it for ours too, and both VMs' failed starts would remove it. The
    open itself decides."""
    path = str(tmp_path / "serial.log")
    real_open = os.open
    made_by_another: list[int] = []

    def another_vm_first(name, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if os.fspath(name) == path and not made_by_another:
            made_by_another.append(real_open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return real_open(name, flags, *args, **kw)

    monkeypatch.setattr(hostpath.os, "open", another_vm_first)
    fd, made = hostpath.open_output_file(path, "device 'serial0'.output")
    os.close(fd)
    os.close(made_by_another[0])
    assert made is False


def test_open_output_file_removed_between_its_two_opens_is_made_and_ours(tmp_path, monkeypatch):
    """The file was there for the open that makes one (EEXIST) and gone by the next: that one
    made it anew (O_CREAT) and called it found, and a failed start left it behind empty."""
    path = tmp_path / "serial.log"
    path.write_bytes(b"")
    real_open = os.open
    removed: list[bool] = []

    def removed_after_the_first(name, flags, *args, **kw):  # type: ignore[no-untyped-def]
        if os.fspath(name) == str(path) and not flags & os.O_EXCL and not removed:
            removed.append(True)
            path.unlink()
        return real_open(name, flags, *args, **kw)

    monkeypatch.setattr(hostpath.os, "open", removed_after_the_first)
    fd, made = hostpath.open_output_file(str(path), "device 'serial0'.output")
    os.close(fd)
    assert removed and made is True and path.exists()


def test_open_output_file_neither_follows_a_symlink_nor_hangs_on_a_fifo(tmp_path):
    """The first open (O_EXCL) finds whatever is there; the second checks it, as any output."""
    os.symlink(tmp_path / "etc-passwd", tmp_path / "serial.log")
    with pytest.raises(HostFileError, match="is a symlink"):
        hostpath.open_output_file(str(tmp_path / "serial.log"), "device 'serial0'.output")
    assert not (tmp_path / "etc-passwd").exists()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(HostFileError, match="is a FIFO that nobody reads"):
        hostpath.open_output_file(str(tmp_path / "fifo"), "device 'serial0'.output")


def test_open_host_file_fifo_refused_for_reading_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")

    with pytest.raises(HostFileError, match="fifo is a FIFO, not a regular file"):
        open_host_file(tmp_path / "fifo", "boot.kernel")


def test_open_host_file_output_fifo_without_reader_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")

    with pytest.raises(HostFileError, match="fifo is a FIFO that nobody reads"):
        open_host_file(tmp_path / "fifo", "device 'serial0'.output", Access.APPEND)


def test_open_host_file_output_fifo_with_reader_is_a_blocking_stream(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    reader = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_host_file(tmp_path / "fifo", "device 'serial0'.output", Access.APPEND)
        assert os.get_blocking(fd)
        os.write(fd, b"x")
        assert os.read(reader, 1) == b"x"
        os.close(fd)
    finally:
        os.close(reader)


def test_open_host_file_output_character_device_accepted():
    fd = open_host_file("/dev/null", "device 'serial0'.output", Access.APPEND)
    try:
        assert os.write(fd, b"x") == 1
    finally:
        os.close(fd)


def test_open_host_file_fifo_swapped_in_after_lstat_refused_by_fstat(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setattr(hostpath, "_precheck", lambda *args: None)  # lose the race

    with pytest.raises(HostFileError, match="is a FIFO, not a regular file"):
        open_host_file(tmp_path / "fifo", "boot.initrd")


@pytest.mark.parametrize("access", [Access.READ, Access.APPEND])
def test_open_host_file_symlink_swapped_in_after_lstat_refused(tmp_path, monkeypatch, access):
    """A link planted between the lstat and the open (/tmp/serial.log -> /etc/shadow): the
    open itself refuses to follow it (O_NOFOLLOW)."""
    (tmp_path / "secret").write_bytes(b"key")
    os.symlink(tmp_path / "secret", tmp_path / "serial.log")
    monkeypatch.setattr(hostpath, "_precheck", lambda *args: None)  # lose the race

    with pytest.raises(HostFileError, match="is a symlink, not a regular file"):
        open_host_file(tmp_path / "serial.log", "device 'serial0'.output", access)
    assert (tmp_path / "secret").read_bytes() == b"key"


def test_open_host_file_fifo_swapped_in_for_append_refused(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "fifo")  # no reader: a blocking open would wait for ever
    monkeypatch.setattr(hostpath, "_precheck", lambda *args: None)

    with pytest.raises(HostFileError, match="is a FIFO that nobody reads, or not a regular file"):
        open_host_file(tmp_path / "fifo", "device 'serial0'.output", Access.APPEND)


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/dev/null", "a character device"), ("/", "a directory")],
)
def test_open_host_file_special_files_refused(path, kind):
    with pytest.raises(HostFileError, match=f"is {kind}, not a regular file"):
        open_host_file(path, "boot.firmware")


def test_open_host_file_socket_refused(listener):
    _, path = listener

    with pytest.raises(HostFileError, match="is a socket, not a regular file"):
        open_host_file(path, "device 'serial0'.output", Access.APPEND)


def test_open_host_file_missing_refused_for_reading(tmp_path):
    with pytest.raises(HostFileError, match=r"^boot\.kernel: .*/absent does not exist$"):
        open_host_file(tmp_path / "absent", "boot.kernel")


def test_open_host_file_create_in_a_missing_directory_says_so(tmp_path):
    """Not "does not exist": the file would be created; its directory is what is missing."""
    with pytest.raises(HostFileError, match="cannot be created: its directory does not exist$"):
        open_host_file(tmp_path / "nodir" / "serial.log", "device 'serial0'.output", Access.APPEND)


def test_open_host_file_append_creates_private_file(tmp_path):
    fd = open_host_file(tmp_path / "serial.log", "device 'serial0'.output", Access.APPEND)
    os.close(fd)

    assert stat.S_IMODE(os.stat(tmp_path / "serial.log").st_mode) == 0o600


def test_open_host_file_append_keeps_existing_content(tmp_path):
    (tmp_path / "serial.log").write_bytes(b"old\n")

    fd = open_host_file(tmp_path / "serial.log", "device 'serial0'.output", Access.APPEND)
    os.write(fd, b"new\n")
    os.close(fd)

    assert (tmp_path / "serial.log").read_bytes() == b"old\nnew\n"


def test_open_host_file_create_refuses_existing_file(tmp_path):
    (tmp_path / "ram.bin").write_bytes(b"")

    with pytest.raises(HostFileError, match="already exists"):
        open_host_file(tmp_path / "ram.bin", "chunk ram", Access.CREATE)


def test_open_host_file_relative_to_dir_fd(tmp_path):
    (tmp_path / "vm.json").write_bytes(b"{}")
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_host_file("vm.json", "chunk vm", dir_fd=dirfd)
    finally:
        os.close(dirfd)

    with open(fd, "rb") as f:
        assert f.read() == b"{}"


def test_host_file_error_escapes_control_characters_in_path(tmp_path):
    with pytest.raises(HostFileError) as e:
        open_host_file(tmp_path / "a\x1b[2Jb", "boot.kernel")

    assert "\x1b" not in str(e.value) and "\\x1b[2Jb" in str(e.value)


def test_connect_unix_listening_socket_gives_blocking_socket(listener):
    server, path = listener

    sock = connect_unix(path, "device 'serial0'.output")
    conn, _ = server.accept()
    sock.sendall(b"hi")

    assert (conn.recv(2), sock.getblocking()) == (b"hi", True)
    sock.close()
    conn.close()


def test_connect_unix_regular_file_refused(tmp_path):
    (tmp_path / "shadow").write_bytes(b"")

    with pytest.raises(HostFileError, match="shadow is a regular file, not a UNIX socket"):
        connect_unix(tmp_path / "shadow", "device 'serial0'.output")


def test_connect_unix_symlink_to_socket_refused(listener, tmp_path):
    _, path = listener
    os.symlink(path, tmp_path / "link.sock")

    with pytest.raises(HostFileError, match="is a symlink, not a UNIX socket"):
        connect_unix(tmp_path / "link.sock", "device 'serial0'.output")


def test_connect_unix_no_listener_refused(listener):
    server, path = listener
    server.close()

    with pytest.raises(HostFileError, match="refused the connection: Connection refused"):
        connect_unix(path, "device 'serial0'.output")


def test_connect_unix_full_backlog_refused_without_hanging(listener):
    _, path = listener
    first = connect_unix(path, "device 'serial0'.output")  # fills the backlog of one

    with pytest.raises(HostFileError, match="is not accepting connections"):
        connect_unix(path, "device 'serial0'.output")
    first.close()


def test_connect_unix_missing_path_refused(tmp_path):
    with pytest.raises(HostFileError, match="nowhere.sock does not exist"):
        connect_unix(tmp_path / "nowhere.sock", "device 'serial0'.output")


@pytest.mark.parametrize("access", [Access.READ, Access.READ_WRITE])
def test_open_host_file_terminal_swapped_in_does_not_become_the_controlling_one(
    monkeypatch, access
):
    """A terminal swapped in between the lstat and the open (a disk image path, say) is
    refused by fstat, but a monitor leading its own session (setsid, as under a service
    manager) that opened it readable without O_NOCTTY would have taken it as its
    controlling terminal by then, and kept it after the close: that terminal's hang-up and
    job control signals would reach the VM. Run in a child that leads a session and has no
    terminal yet. (An output is opened write-only, which Linux never makes controlling.)"""
    monkeypatch.setattr(hostpath, "_precheck", lambda *args: None)  # lose the race
    leader, follower = os.openpty()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover (the child's status is the result)
            code = 1
            try:
                os.setsid()
                try:
                    os.close(open_host_file(os.ttyname(follower), "disk", access))
                    code = 2  # a terminal accepted as a regular file
                except HostFileError:
                    try:
                        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
                        code = 3  # /dev/tty opened: the refused file became our terminal
                    except OSError:
                        code = 0  # ENXIO: no controlling terminal
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(leader)
        os.close(follower)
    assert os.waitstatus_to_exitcode(status) == 0
