"""The VM's runtime directory: private, and held by one running VM at a time."""

import stat

import pytest

from splitvmm.errors import SplitvmmError
from splitvmm.monitor.rundir import RuntimeDir


def test_rundir_is_private_to_the_user(tmp_path):
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
