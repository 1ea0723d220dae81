"""The VM's runtime directory: private, and held by one running VM at a time."""

import fcntl
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from splitvmm.errors import SplitvmmError
from splitvmm.monitor import rundir
from splitvmm.monitor.rundir import MAX_SOCKET_PATH, RuntimeDir, check_socket_path, runtime_root


def test_rundir_is_private_to_the_user(tmp_path):
    rundir = RuntimeDir("vm1", tmp_path)
    mode = stat.S_IMODE(rundir.path.stat().st_mode)
    rundir.close()
    assert mode == 0o700


def test_rundir_for_devices_of_another_user_may_be_searched_under_a_private_root(tmp_path):
    """vm.device_uid: each device enters it as root before it becomes that user, and looks
    its channel up in it then (sandbox/device.py); its root stays ours alone."""
    root = tmp_path / "splitvmm"
    rundir = RuntimeDir("vm1", root, enterable=True)
    modes = [stat.S_IMODE(p.stat().st_mode) for p in (rundir.path, root)]
    rundir.close()

    assert modes == [0o711, 0o700]


def test_rundir_left_searchable_by_an_earlier_vm_is_private_again(tmp_path):
    (tmp_path / "vm1").mkdir(mode=0o711)

    rundir = RuntimeDir("vm1", tmp_path)
    mode = stat.S_IMODE(rundir.path.stat().st_mode)
    rundir.close()

    assert mode == 0o700


def test_rundir_second_vm_with_same_name_is_refused(tmp_path):
    first = RuntimeDir("vm1", tmp_path)
    with pytest.raises(SplitvmmError, match="a VM named 'vm1' is already running"):
        RuntimeDir("vm1", tmp_path)
    first.close()


def test_rundir_close_removes_it_and_frees_the_name(tmp_path):
    RuntimeDir("vm1", tmp_path).close()
    again = RuntimeDir("vm1", tmp_path)
    again.close()
    assert not (tmp_path / "vm1").exists()


def test_rundir_left_by_a_killed_vm_has_its_channels_and_spare_sockets_removed(tmp_path):
    """A VM killed by SIGKILL leaves its sockets; a warm spare's (NAME.sock.spare) that
    stayed made every spare of the next run of that name fail to bind, for its whole life."""
    left = tmp_path / "vm1"
    left.mkdir(mode=0o700)
    for name in ("serial0.sock", "disk0.sock.spare", "control.sock"):
        (left / name).touch()
    rundir = RuntimeDir("vm1", tmp_path)
    remaining = sorted(p.name for p in rundir.path.iterdir())
    rundir.close()
    assert remaining == ["lock"]


def test_rundir_where_a_file_is_in_the_way_is_an_error_naming_it(tmp_path):
    """Was a FileExistsError, which `up` printed as a traceback."""
    (tmp_path / "vm1").touch()
    with pytest.raises(
        SplitvmmError, match=f"{tmp_path / 'vm1'}: something that is not a directory"
    ):
        RuntimeDir("vm1", tmp_path)


def test_rundir_whose_root_cannot_be_made_is_an_error_naming_it(tmp_path):
    """Any OSError of mkdir (EROFS, EACCES; ENOTDIR here, which root can provoke too)."""
    (tmp_path / "file").touch()
    root = tmp_path / "file" / "splitvmm"
    with pytest.raises(SplitvmmError, match=f"runtime directory {root}: Not a directory"):
        RuntimeDir("vm1", root)


def test_rundir_that_exists_but_cannot_be_used_is_an_error_naming_it(tmp_path):
    """Past the mkdirs (a directory already there on a file system that turned read-only:
    its lock file cannot be made; here a directory in the lock file's place, which root
    cannot get past either): one error naming the path, not an OSError's traceback."""
    (tmp_path / "vm1" / "lock").mkdir(parents=True, mode=0o700)
    (tmp_path / "vm1").chmod(0o700)
    with pytest.raises(
        SplitvmmError, match=f"runtime directory {tmp_path / 'vm1' / 'lock'}: Is a directory"
    ):
        RuntimeDir("vm1", tmp_path)


def test_runtime_root_relative_xdg_runtime_dir_is_ignored_with_a_warning(monkeypatch, caplog):
    """The XDG Base Directory spec: a relative path is invalid and must be ignored. It used to
    make relative/dir/splitvmm/ in the cwd before the launcher refused the path."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    unset = runtime_root()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert runtime_root() == unset
    assert "XDG_RUNTIME_DIR='relative/dir' is not an absolute path" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
@pytest.mark.parametrize("whose", ["another user's", "group-writable", "world-writable"])
def test_runtime_root_in_an_xdg_runtime_dir_others_may_change_is_ignored(
    tmp_path, monkeypatch, caplog, whose
):
    """Root under `sudo -E` or `su` keeps the user's XDG_RUNTIME_DIR: its owner could swap
    splitvmm/ beneath it for a symlink between our checks and our use (a root `up`'s
    removal of its runtime dir made elsewhere, root's ctl sending a signing key to their
    socket). The XDG spec: the user's own, written by no one else."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    if whose == "another user's":
        os.chown(xdg, 65534, 65534)
    else:
        xdg.chmod(0o770 if whose == "group-writable" else 0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    unset = runtime_root()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))

    assert runtime_root() == unset
    words = "belongs to uid 65534" if whose == "another user's" else "may be written by other"
    assert f"XDG_RUNTIME_DIR={str(xdg)!r} {words}" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
@pytest.mark.parametrize("exists", [True, False], ids=["ours", "to make"])
def test_runtime_root_in_an_xdg_runtime_dir_under_another_users_directory_is_ignored(
    tmp_path, monkeypatch, caplog, exists
):
    """Its owner may rename ours away and put theirs in its place, or make it theirs first."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    xdg = theirs / "xdg"
    if exists:
        xdg.mkdir(mode=0o700)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    unset = runtime_root()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))

    assert runtime_root() == unset
    assert f"lies in {theirs}, which belongs to uid 65534: ignored" in caplog.text


def test_runtime_root_through_a_symlink_is_where_it_pointed_when_looked_at(tmp_path, monkeypatch):
    """Whoever may change the link does not decide later where the runtime dir is: its
    target, checked, is used."""
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "link"))
    assert runtime_root() == tmp_path / "real" / "splitvmm"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_rundir_whose_root_another_user_made_first_is_refused(tmp_path):
    """XDG_RUNTIME_DIR not there when runtime_root() looked, in a sticky directory others may
    write to: made by another user since, it is theirs, and so would be what we made in it."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / "xdg"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(SplitvmmError, match=f"lies in {theirs}, which belongs to uid 65534"):
        RuntimeDir("vm1", theirs / "splitvmm")
    assert os.listdir(theirs) == []  # nothing of ours made in it


def test_rundir_whose_root_another_user_made_a_symlink_first_is_refused(tmp_path):
    """XDG_RUNTIME_DIR not there when runtime_root() looked: another user makes it a symlink
    to a directory of ours, which passes every check of what it points to, and re-points
    it later, with our sockets and our removal beneath it."""
    (tmp_path / "ours").mkdir(mode=0o700)
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "xdg").symlink_to(tmp_path / "ours")
    with pytest.raises(SplitvmmError, match=f"lies under {sticky / 'xdg'}, a symlink put there"):
        RuntimeDir("vm1", sticky / "xdg" / "splitvmm")
    assert os.listdir(tmp_path / "ours") == []


def test_rundir_under_a_directory_its_group_may_write_to_is_refused(tmp_path):
    """Whoever is in its group may rename what is in it (a user-private group's directory
    too: an ACL shows as its group bits, and gid 0 has members by primary group alone)."""
    shared = tmp_path / "home"
    shared.mkdir()
    shared.chmod(0o775)
    with pytest.raises(SplitvmmError, match="other users may write to \\(mode 0775\\)"):
        RuntimeDir("vm1", shared / "splitvmm")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_rundir_inside_a_user_namespace_takes_its_unmapped_users_directories_on_trust(
    tmp_path, monkeypatch
):
    """`unshare -r`: the host's root reads as the overflow uid there, / included. (Not under
    tmp_path: /tmp, which anyone may write to, lies above it.)"""
    above = Path(tempfile.mkdtemp(dir="/run"))
    theirs = above / "host"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    monkeypatch.setattr(rundir, "_unmapped_uid", lambda: 65534)
    try:
        RuntimeDir("vm1", theirs / "splitvmm").close()
        monkeypatch.setattr(rundir, "_unmapped_uid", lambda: None)
        with pytest.raises(SplitvmmError, match="belongs to uid 65534"):
            RuntimeDir("vm1", theirs / "splitvmm")
    finally:
        shutil.rmtree(above)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_rundir_inside_a_user_namespace_takes_the_hosts_tmp_on_trust(monkeypatch):
    """The fallback root's /tmp, seen from `unshare -r`: the host root's, read as the overflow
    uid, and sticky for all to write to. It is the shared directory, not below one."""
    above = Path(tempfile.mkdtemp(dir="/run"))
    host_tmp = above / "tmp"
    host_tmp.mkdir()
    host_tmp.chmod(0o1777)
    os.chown(host_tmp, 65534, 65534)
    monkeypatch.setattr(rundir, "_unmapped_uid", lambda: 65534)
    try:
        RuntimeDir("vm1", host_tmp / "splitvmm-0").close()
    finally:
        shutil.rmtree(above)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_rundir_inside_a_user_namespace_trusts_no_unmapped_owner_below_a_shared_directory(
    tmp_path, monkeypatch
):
    """Below a sticky directory anyone may write to (/tmp), an unmapped owner may be any host
    user, who as its owner may rename what we make in it."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / "x"
    theirs.mkdir()
    theirs.chmod(0o1777)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setattr(rundir, "_unmapped_uid", lambda: 65534)
    with pytest.raises(SplitvmmError, match=f"lies in {theirs}, which belongs to uid 65534"):
        RuntimeDir("vm1", theirs / "splitvmm")


@pytest.mark.parametrize(
    ("uid_map", "unmapped"),
    [
        ("         0          0 4294967295\n", None),  # no user namespace
        ("         0       1000          1\n", 65534),  # unshare -r
        ("0 1000 1\n1 100000 65536\n", None),  # rootless podman: its own nobody is mapped
    ],
)
def test_unmapped_uid_is_the_overflow_uid_where_no_range_maps_it(uid_map, unmapped):
    assert rundir.unmapped_uid(uid_map, 65534) == unmapped


def test_runtime_root_of_a_user_under_a_symlinked_temp_dir_is_its_real_path(tmp_path, monkeypatch):
    """/tmp or TMPDIR through a symlink (Silverblue's /home -> var/home): the runtime root is
    checked with no symlink allowed on its way, so it must be the real path."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(rundir.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(rundir.tempfile, "tempdir", str(tmp_path / "link"))
    assert runtime_root() == tmp_path / "real" / "splitvmm-1000"


@pytest.mark.parametrize("exists", [True, False])
def test_runtime_root_in_an_xdg_runtime_dir_of_ours_or_still_to_make_is_used(
    tmp_path, monkeypatch, exists
):
    xdg = tmp_path / "xdg"
    if exists:
        xdg.mkdir(mode=0o755)  # writable by us alone, as the directories tests make
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_root() == xdg / "splitvmm"


def test_socket_path_of_sun_path_size_is_accepted(tmp_path):
    path = tmp_path / ("s" * (MAX_SOCKET_PATH - len(str(tmp_path)) - 1))
    check_socket_path(path, "control socket")


def test_socket_path_a_byte_too_long_is_refused_naming_it_and_what_to_shorten(tmp_path):
    path = tmp_path / ("s" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    with pytest.raises(
        SplitvmmError, match=f"control socket {path} is longer than a UNIX socket allows"
    ) as e:
        check_socket_path(path, "control socket")
    assert str(e.value).endswith("use a shorter vm.name or XDG_RUNTIME_DIR")


def test_rundir_whose_path_is_not_utf8_is_an_error_naming_it(tmp_path):
    """A non-UTF-8 XDG_RUNTIME_DIR (or TMPDIR) ended `up` in a UnicodeEncodeError traceback from
    Launcher.configure, after the runtime dir was made: the launcher takes it as UTF-8."""
    root = tmp_path / os.fsdecode(b"run-\xe9")
    with pytest.raises(SplitvmmError, match="is not UTF-8"):
        RuntimeDir("vm1", root)


def test_rundir_taken_as_the_previous_vm_of_that_name_ends_is_held_by_one_vm(tmp_path, monkeypatch):
    """The second `up` opens the lock file, the first VM ends (its close removes the directory,
    lock file included, then lets the lock go), the second's flock then succeeds -- on a file
    no longer in any directory. A third `up` of that name then makes the directory and a lock
    file again, and runs beside the second: two live VMs with one name, one runtime dir."""
    first = RuntimeDir("vm1", tmp_path)
    real_flock = fcntl.flock

    def first_ends_meanwhile(fd, op):
        monkeypatch.setattr(rundir.fcntl, "flock", real_flock)
        first.close()
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", first_ends_meanwhile)
    second = RuntimeDir("vm1", tmp_path)
    try:
        assert (second.path / "lock").exists()  # it holds the lock file that is there
        with pytest.raises(SplitvmmError, match="a VM named 'vm1' is already running"):
            RuntimeDir("vm1", tmp_path).close()
    finally:
        second.close()


class Expired(BaseException):
    """Not an OSError (RuntimeDir turns those into SplitvmmError)."""


@pytest.fixture
def hang_guard():
    """A loop that never ends fails the test instead of hanging the suite."""

    def expired(signum, frame):
        raise Expired("still looping after 10 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("target", ["elsewhere", "dangling"])
def test_rundir_whose_lock_is_a_symlink_is_refused_naming_it(tmp_path, hang_guard, target):
    """The lock opened through a symlink is never "the file at its path" (same_file looks at
    the link): the check that the lock is still there made `up` retry for ever at full CPU."""
    vm = tmp_path / "root" / "vm1"
    vm.mkdir(parents=True, mode=0o700)
    (tmp_path / "root").chmod(0o700)
    real = tmp_path / "real-lock"
    if target == "elsewhere":
        real.touch()
    (vm / "lock").symlink_to(real)
    with pytest.raises(SplitvmmError, match=str(vm / "lock")):
        RuntimeDir("vm1", tmp_path / "root")
