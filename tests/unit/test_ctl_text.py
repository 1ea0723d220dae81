"""What `ctl status` and `ctl devices` print without --json (cli/ctl/state.py)."""

from __future__ import annotations

from splitvmm.cli.ctl.state import _device_lines


def device(**fields: object) -> dict[str, object]:
    return {"name": "blk0", "model": "virtio-blk", "pid": 42, "state": "running", **fields}


def test_ctl_device_line_says_why_the_device_stalled():
    """A VM paused for a full disk said nothing of it in plain text: only --json had it."""
    line = _device_lines([device(stalled="the disk's file system is full (No space left)")])

    assert line.endswith("running, stalled: the disk's file system is full (No space left)")


def test_ctl_device_line_of_a_device_that_did_not_stall_says_nothing_of_it():
    assert "stalled" not in _device_lines([device(stalled="")])


def test_ctl_device_line_of_a_device_without_a_process_shows_no_pid():
    """A device no process serves (away, or failed: its process is dead) has no pid."""
    line = _device_lines([device(pid=None, state="failed", reason="process exited")])

    assert line == "  blk0         virtio-blk pid -        failed (process exited)"
