"""SnapshotWriter: round trips through a real memfd, publishes atomically, cleans up on failure."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
from collections.abc import Iterator

import pytest

from splitvmm.monitor.memory import GuestMemory
from splitvmm.snapshot import Snapshot, SnapshotError, SnapshotWriter
from splitvmm.snapshot import writer as writer_module
from tests.unit.snapshot_support import (
    CPUID,
    MIB,
    PAGE,
    SERIAL,
    VCPU,
    VM,
    VM_CONFIG,
    memory,
    write_snapshot,
)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = memory()
    yield m
    m.close()


@pytest.fixture
def fresh() -> Iterator[GuestMemory]:
    m = memory(pages={})
    yield m
    m.close()


def test_writer_roundtrip_restores_identical_memory(tmp_path, mem, fresh):
    snap = Snapshot.open(write_snapshot(tmp_path / "s", mem))

    snap.load_ram(fresh)

    assert fresh.map[:] == mem.map[:]


def test_writer_ram_written_back_as_it_goes_starts_the_disk_every_step_same_bytes(
    tmp_path, monkeypatch
):
    """add_ram(writeback=True), a suspend's: the RAM file's disk writes start every
    WRITEBACK_STEP bytes as it is written, on that file; the bytes are the same as without."""
    monkeypatch.setattr(writer_module, "WRITEBACK_STEP", 2 * PAGE)
    monkeypatch.setattr(writer_module, "WRITE_BUFFER", PAGE)  # the file grows as it is given
    started: list[tuple[int, int]] = []  # (fd, the file's size then)
    start_writeback = writer_module.files.start_writeback

    def start(fd: int) -> None:
        started.append((fd, os.fstat(fd).st_size))
        start_writeback(fd)  # the real call: a regular file in a snapshot directory takes it

    monkeypatch.setattr(writer_module.files, "start_writeback", start)
    pages = {2 * n * PAGE: bytes([n + 1]) for n in range(8)}  # 8 extents of a data page
    mem = memory(pages=pages)
    files = {}
    try:
        for name, writeback in (("back", True), ("plain", False)):
            with SnapshotWriter(tmp_path / name, VM_CONFIG, CPUID, mem) as w:
                w.add_ram(mem, writeback=writeback)
                files[name] = (tmp_path / name, w.commit())
    finally:
        mem.close()
    back, plain = ((path / "ram.bin").read_bytes() for path, _ in files.values())
    assert back == plain
    assert len({fd for fd, _ in started}) == 1  # one file's: the RAM's, not the manifest's
    sizes = [size for _, size in started]
    assert sizes == sorted(set(sizes)) and sizes[0] > 0 and len(sizes) >= 3  # as it grew


def test_writer_ram_writeback_that_cannot_start_is_a_hint_the_snapshot_is_written(
    tmp_path, monkeypatch, mem
):
    """A start of the writeback that fails (the kernel could not start the writes without
    waiting) stops the starts and fails nothing: the commit's fsync reports what the disk got
    wrong."""
    monkeypatch.setattr(writer_module, "WRITEBACK_STEP", PAGE)
    monkeypatch.setattr(writer_module, "WRITE_BUFFER", PAGE)
    tries: list[int] = []

    def refuse(fd: int) -> None:
        tries.append(fd)
        raise OSError(errno.ENOMEM, "sync_file_range: Cannot allocate memory")

    monkeypatch.setattr(writer_module.files, "start_writeback", refuse)
    with SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem) as w:
        w.add_ram(mem, writeback=True)
        snap = Snapshot.open(w.commit())
    fresh = memory(pages={})
    try:
        snap.load_ram(fresh)
        assert (fresh.map[:] == mem.map[:], len(tries)) == (True, 1)
    finally:
        fresh.close()


def test_writer_ram_chunk_size_is_the_data_not_the_memory(tmp_path):
    big = memory(64 * MIB, {0x1000: b"\x01", 0x2000000: b"\x02", 0x3FFF000: b"\x03"})

    entry = Snapshot.open(write_snapshot(tmp_path / "s", big)).ram_chunk
    big.close()

    assert 3 * PAGE < entry.size < 3 * PAGE + 128  # three pages plus header and records


def test_writer_zero_pages_among_data_are_skipped(tmp_path):
    touched = memory(pages={0x1000: b"\x00", 0x2000: b"\x07"})  # both are memfd data

    entry = Snapshot.open(write_snapshot(tmp_path / "s", touched)).ram_chunk
    touched.close()

    assert entry.size == 32 + 16 + PAGE + 16  # header, one record, one page, end record


def test_writer_restore_makes_absent_pages_zero(tmp_path, mem):
    dirty = memory(pages={0x9000: b"\xee", 0x5000: b"\xee"})
    snap = Snapshot.open(write_snapshot(tmp_path / "s", mem))

    snap.load_ram(dirty)

    assert (dirty.map[0x9000 : 0x9000 + PAGE], dirty.map[0x5000]) == (bytes(PAGE), 0x22)
    dirty.close()


def test_writer_two_regions_roundtrip(tmp_path):
    size = 3 * 1024 * MIB + 2 * MIB  # RAM above the PCI hole makes a second region
    high = memory(size, {0x1000: b"\x01", size - PAGE: b"\x02"})
    target = memory(size, {})
    snap = Snapshot.open(write_snapshot(tmp_path / "s", high))

    snap.load_ram(target)

    assert (len(snap.manifest.memory.regions), target.map[size - 1], target.map[0x1000]) == (
        2,
        2,
        1,
    )
    high.close()
    target.close()


def test_writer_json_chunks_read_back_as_given(tmp_path, mem):
    snap = Snapshot.open(write_snapshot(tmp_path / "s", mem))

    got = (snap.read_json("vcpu0"), snap.read_json("vm"), snap.read_json("serial0"))

    assert got == (VCPU, VM, SERIAL)


def test_writer_manifest_records_config_cpuid_and_layout(tmp_path, mem):
    manifest = Snapshot.open(write_snapshot(tmp_path / "s", mem)).manifest

    assert (manifest.vm_config, manifest.cpuid, manifest.memory.size, manifest.producer) == (
        VM_CONFIG,
        CPUID,
        mem.size,
        "splitvmm 0.1.0",
    )


def test_writer_progress_reaches_the_total(tmp_path, mem):
    calls: list[tuple[int, int]] = []
    with SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem) as w:
        w.add_ram(mem, progress=lambda done, total: calls.append((done, total)))
        w.commit()

    assert calls[-1] == (4 * PAGE, 4 * PAGE)


def test_writer_before_commit_target_absent_and_no_manifest(tmp_path, mem):
    with SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem) as w:
        w.add_ram(mem)

        seen = (sorted(os.listdir(w.tmp)), (tmp_path / "s").exists())

    assert seen == (["ram.bin"], False)


def test_writer_exception_in_with_block_leaves_nothing(tmp_path, mem):
    with pytest.raises(RuntimeError), SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem) as w:
        w.add_ram(mem)
        w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
        raise RuntimeError("coordinator failed")

    assert os.listdir(tmp_path) == []


def test_writer_failure_inside_add_ram_removes_temp_dir(tmp_path, mem):
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        w.add_ram(mem, progress=interrupt)

    assert os.listdir(tmp_path) == []


def test_writer_use_after_failure_refused(tmp_path, mem):
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)
    with pytest.raises(SnapshotError):
        w.add_json_chunk("vcpu", "vcpu0", 1, b"not json")

    with pytest.raises(SnapshotError, match="already aborted"):
        w.commit()


def test_writer_existing_target_refused(tmp_path, mem):
    (tmp_path / "s").mkdir()

    with pytest.raises(SnapshotError, match=r"snapshot target .*/s already exists"):
        SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)


def test_writer_target_appearing_before_commit_refused(tmp_path, mem):
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)
    w.add_ram(mem)
    (tmp_path / "s").mkdir()  # an empty directory: os.rename alone would replace it

    with pytest.raises(SnapshotError, match="already exists"):
        w.commit()

    assert os.listdir(tmp_path) == ["s"] and os.listdir(tmp_path / "s") == []


def test_writer_commit_without_ram_refused_and_cleaned_up(tmp_path, mem):
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)
    w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)

    with pytest.raises(SnapshotError, match="no RAM chunk"):
        w.commit()

    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kind,name,version,payload,model,message",
    [
        ("vcpu", "vcpu0", 1, {"x": b"raw"}, None, "chunk vcpu0: not JSON-able"),
        ("vcpu", "vcpu0", 1, {"x": float("nan")}, None, "chunk vcpu0: not JSON-able"),
        ("vcpu", "vcpu0", 1, [1, 2], None, "chunk vcpu0: a vcpu state must be a JSON object"),
        ("vcpu", "../x", 1, {}, None, "chunk name '../x'"),
        ("vcpu", "manifest", 1, {}, None, "chunk name 'manifest'"),
        ("ram", "ram2", 1, {}, None, "chunk ram2: kind 'ram'"),
        ("vcpu", "vcpu0", 0, {}, None, "chunk vcpu0: state_version"),
        ("vcpu", "vcpu0", True, {}, None, "chunk vcpu0: state_version"),
        ("device", "serial0", 1, {}, None, "chunk serial0: kind device needs a model"),
        ("vm", "vm", 1, {}, "serial", "chunk vm: kind device needs a model"),
    ],
)
def test_writer_bad_json_chunk_refused(tmp_path, mem, kind, name, version, payload, model, message):
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)

    with pytest.raises(SnapshotError, match=message.replace("(", r"\(")):
        w.add_json_chunk(kind, name, version, payload, model=model)

    assert os.listdir(tmp_path) == []


def test_writer_duplicate_chunk_name_refused(tmp_path, mem):
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)
    w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)

    with pytest.raises(SnapshotError, match="chunk vcpu0: the name is used twice"):
        w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)


def test_writer_ram_of_another_memory_refused(tmp_path, mem):
    other = memory(2 * MIB, {})
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)

    with pytest.raises(SnapshotError, match="chunk ram: the memory differs"):
        w.add_ram(other)
    other.close()


def test_writer_oversized_manifest_refused_at_commit(tmp_path, mem):
    w = SnapshotWriter(tmp_path / "s", {"blob": "x" * (1 << 20)}, CPUID, mem)
    w.add_ram(mem)

    with pytest.raises(SnapshotError, match="manifest.json: .* over the 1048576 byte cap"):
        w.commit()

    assert os.listdir(tmp_path) == []


def test_writer_files_are_private(tmp_path, mem):
    snap = write_snapshot(tmp_path / "s", mem)

    modes = {stat.S_IMODE(p.stat().st_mode) for p in snap.iterdir()}

    assert (modes, stat.S_IMODE(snap.stat().st_mode)) == ({0o600}, 0o700)


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The name of every file or directory the writer fsyncs, in order."""
    names: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        names.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(writer_module.os, "fsync", record)
    return names


def _chunks_written(target, mem) -> SnapshotWriter:
    w = SnapshotWriter(target, VM_CONFIG, CPUID, mem)
    w.add_ram(mem)
    w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
    w.add_json_chunk("device", "serial0", 1, SERIAL, model="serial")
    return w


def test_writer_chunks_wait_for_commit_to_be_fsynced(tmp_path, mem, fsynced):
    w = _chunks_written(tmp_path / "s", mem)  # what a VM pauses for: no disk flush in it

    synced_before_commit = list(fsynced)
    w.commit()

    assert synced_before_commit == []


def test_writer_commit_fsyncs_every_chunk_before_the_manifest(tmp_path, mem, fsynced):
    w = _chunks_written(tmp_path / "s", mem)

    w.commit()

    chunks, rest = set(fsynced[:3]), fsynced[3:]
    assert (chunks, rest[:2]) == (
        {"ram.bin", "vcpu0.json", "serial0.json"},
        ["manifest.json", w.tmp.name],
    )


def test_writer_abort_closes_the_unsynced_chunk_files(tmp_path, mem):
    before = len(os.listdir("/proc/self/fd"))
    w = _chunks_written(tmp_path / "s", mem)

    w.abort()

    assert (len(os.listdir("/proc/self/fd")), os.path.exists(w.tmp)) == (before, False)


def _killed_writer(target, mem) -> str:
    """The temporary directory's name of a writer SIGKILLed in a child after its RAM chunk."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            w = SnapshotWriter(target, VM_CONFIG, CPUID, mem)
            w.add_ram(mem)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return f".{target.name}.tmp-{pid}"


def test_writer_removes_what_a_killed_writer_left(tmp_path, mem, monkeypatch, caplog):
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    left = _killed_writer(tmp_path / "s", mem)
    assert sorted(os.listdir(tmp_path / left)) == ["ram.bin"]  # a copy of guest RAM

    write_snapshot(tmp_path / "s", mem)

    assert os.listdir(tmp_path) == ["s"]
    assert f"removed {tmp_path / left}, left by a snapshot writer that died" in caplog.text


def test_writer_leaves_a_live_writers_directory(tmp_path, mem, monkeypatch):
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    live = tmp_path / ".s.tmp-1"  # as a writer in another process holds it
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        write_snapshot(tmp_path / "s", mem)
    finally:
        os.close(fd)

    assert sorted(os.listdir(tmp_path)) == [".s.tmp-1", "s"]


def test_writer_leaves_a_young_directory_nobody_holds(tmp_path, mem):
    (tmp_path / ".s.tmp-1").mkdir()  # its writer may be between its mkdir and its flock

    write_snapshot(tmp_path / "s", mem)

    assert sorted(os.listdir(tmp_path)) == [".s.tmp-1", "s"]


def test_writer_removes_another_targets_leftover_in_its_directory(tmp_path, mem, monkeypatch):
    """Snapshots are mostly named anew each time: the leftover of a killed writer for another
    name is removed by the next writer into the same directory."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    _killed_writer(tmp_path / "other", mem)

    write_snapshot(tmp_path / "s", mem)

    assert os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize(
    "content", ["notes.txt", "link.json", "sub.json"], ids=["foreign file", "symlink", "directory"]
)
def test_writer_leaves_a_directory_holding_what_no_writer_makes(
    tmp_path, mem, monkeypatch, content
):
    """Named like a writer's, unlocked and old, but not a writer's: left alone."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    foreign = tmp_path / ".backup.tmp-7"
    foreign.mkdir()
    (foreign / "ram.bin").write_bytes(b"?")
    if content == "link.json":
        (foreign / content).symlink_to("/etc/hostname")
    elif content == "sub.json":
        (foreign / content).mkdir()
    else:
        (foreign / content).write_text("someone else's")

    write_snapshot(tmp_path / "s", mem)

    assert sorted(os.listdir(tmp_path)) == [".backup.tmp-7", "s"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_writer_leaves_a_look_alike_of_another_users_alone(tmp_path, mem, monkeypatch, caplog):
    """A snapshot directory others may write to (the README's /tmp): another user's
    `.x.tmp-1` full of chunk-named files was opened, listed whole and tried at every
    snapshot, its removal failing and logged as done."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    theirs = tmp_path / ".x.tmp-1"
    theirs.mkdir()
    (theirs / "ram.bin").write_bytes(b"?")
    os.chown(theirs, 65534, 65534)
    listed = []
    monkeypatch.setattr(writer_module, "_writers_files", lambda fd: listed.append(fd) or True)

    assert writer_module.remove_stale_staging(tmp_path) == []
    assert (listed, os.listdir(theirs), "removed" in caplog.text) == ([], ["ram.bin"], False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_writer_sweep_is_not_held_off_by_more_look_alikes_of_others_than_it_looks_at(
    tmp_path, mem, monkeypatch
):
    """The bound counts our own only: another user's look-alikes, listed before ours in
    whatever order the file system keeps, left a killed writer's copy of RAM for ever."""
    left = _killed_writer(tmp_path / "s", mem)
    for n in range(writer_module.STALE_CANDIDATES + 4):
        theirs = tmp_path / f".x{n}.tmp-1"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    real_scandir = os.scandir

    @contextlib.contextmanager
    def theirs_first(path):  # the order that hid ours, whatever this file system's is
        with real_scandir(path) as entries:
            yield iter(sorted(entries, key=lambda e: e.name == left))

    monkeypatch.setattr(writer_module.os, "scandir", theirs_first)

    assert writer_module.remove_stale_staging(tmp_path) == [tmp_path / left]


def test_writer_gives_up_on_a_look_alike_holding_more_files_than_a_writer_makes(
    tmp_path, mem, monkeypatch
):
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    left = tmp_path / _killed_writer(tmp_path / "s", mem)
    for n in range(writer_module.WRITER_FILES_MAX):  # every one a name a writer may make
        (left / f"c{n}.json").write_text("{}")

    assert writer_module.remove_stale_staging(tmp_path) == []
    assert len(os.listdir(left)) == writer_module.WRITER_FILES_MAX + 1


def test_writer_sweep_looks_at_a_bounded_number_of_look_alikes(tmp_path, mem, monkeypatch):
    lefts = [_killed_writer(tmp_path / f"s{n}", mem) for n in range(3)]  # young: none swept
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    monkeypatch.setattr(writer_module, "STALE_CANDIDATES", 2)

    assert len(writer_module.remove_stale_staging(tmp_path)) == 2
    assert len(writer_module.remove_stale_staging(tmp_path)) == 1  # the next sweep's
    assert not any((tmp_path / left).exists() for left in lefts)


def test_writer_removal_that_fails_is_not_logged_as_done(tmp_path, mem, monkeypatch, caplog):
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    left = _killed_writer(tmp_path / "s", mem)
    monkeypatch.setattr(writer_module.shutil, "rmtree", lambda path, ignore_errors: None)

    assert writer_module.remove_stale_staging(tmp_path) == []
    assert f"could not remove {tmp_path / left}" in caplog.text
    assert "removed" not in caplog.text


def test_writer_told_the_directory_was_swept_sweeps_it_not_again(tmp_path, mem, monkeypatch):
    """The coordinator sweeps before the pause: the writer it makes in the pause must not
    take that time again."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    left = _killed_writer(tmp_path / "s", mem)

    SnapshotWriter(tmp_path / "t", VM_CONFIG, CPUID, mem, sweep=False).abort()

    assert os.listdir(tmp_path) == [left]


def test_writer_holds_its_flock_until_the_rename(tmp_path, mem, monkeypatch):
    """The flock marks a directory as being written until it is renamed: released before
    the rename, another monitor's sweep into the same directory (its commit's fsyncs took
    longer than STALE_AFTER_S since the manifest was made) found it unlocked and removed it,
    files and all, while it was published."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    rename, swept = os.rename, []

    def rename_after_another_sweep(src, dst):  # another writer's sweep, just before ours
        swept.extend(writer_module.remove_stale_staging(tmp_path))
        rename(src, dst)

    monkeypatch.setattr(writer_module.os, "rename", rename_after_another_sweep)

    Snapshot.open(write_snapshot(tmp_path / "s", mem))

    assert swept == []


def test_writer_refuses_a_target_named_like_a_temporary_directory(tmp_path, mem):
    """A snapshot published as `.NAME.tmp-PID` holds only a writer's files and no flock: the
    next writer into its directory took it for a dead writer's leftover and removed it."""
    with pytest.raises(SnapshotError, match=r"\.keep\.tmp-1: the name of a writer's temporary"):
        write_snapshot(tmp_path / ".keep.tmp-1", mem)

    assert os.listdir(tmp_path) == []


def test_writer_commit_whose_parent_fsync_fails_publishes_nothing(tmp_path, mem, monkeypatch):
    real = writer_module._fsync_dir

    def fsync_dir(path):
        if path == tmp_path:  # the parent, after the rename: the storage reports EIO
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(path)

    monkeypatch.setattr(writer_module, "_fsync_dir", fsync_dir)
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)
    w.add_ram(mem)
    w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
    w.add_json_chunk("device", "serial0", 1, SERIAL, model="serial")

    with pytest.raises(SnapshotError, match="Input/output error"):
        w.commit()

    # The caller is told the snapshot failed (a suspend then resumes the VM, whose disk moves
    # on): nothing that verifies may be left at the target
    published = (tmp_path / "s").exists()
    verifies = published and _verifies(tmp_path / "s")
    assert (published, verifies, os.listdir(tmp_path)) == (False, False, [])


def _verifies(path) -> bool:
    try:
        Snapshot.open(path).verify()
    except SnapshotError:
        return False
    return True


def test_writer_commit_that_cannot_take_its_rename_back_says_what_it_left(
    tmp_path, mem, monkeypatch
):
    """The parent's fsync fails (EIO) and the file system went read-only with it (ext4's
    errors=remount-ro): the rename cannot be taken back, and the error says what is left."""
    real_fsync_dir, real_rename = writer_module._fsync_dir, os.rename

    def fsync_dir(path):
        if path == tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync_dir(path)

    def rename(src, dst):
        if src == tmp_path / "s":  # the rename back: the file system went read-only
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_rename(src, dst)

    monkeypatch.setattr(writer_module, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(writer_module.os, "rename", rename)
    w = SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)
    w.add_ram(mem)
    w.add_json_chunk("vcpu", "vcpu0", 1, VCPU)
    w.add_json_chunk("device", "serial0", 1, SERIAL, model="serial")

    with pytest.raises(SnapshotError) as failed:
        w.commit()

    Snapshot.open(tmp_path / "s").verify()  # left, and it verifies (nothing can remove it)...
    # ...so the error must say so: the operator must not restore it after the VM ran on
    assert f"{tmp_path / 's'}" in str(failed.value) and "left" in str(failed.value), failed.value


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("fails", ["open", "flock"])
def test_writer_start_that_cannot_open_or_lock_its_directory_is_a_snapshot_error(
    tmp_path, monkeypatch, fails
):
    """Between its mkdir and its flock: no fd left (EMFILE), or no lock record (ENOLCK)."""
    mem = memory()
    real_open = os.open

    def no_fd_left(path, flags, *args, **kwargs):
        if fails == "open" and flags & os.O_DIRECTORY and ".s.tmp-" in str(path):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args, **kwargs)

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(writer_module.os, "open", no_fd_left)
    if fails == "flock":
        monkeypatch.setattr(writer_module.fcntl, "flock", no_locks)
    before = open_fds()

    with pytest.raises(SnapshotError, match="Too many open files|No locks available"):
        SnapshotWriter(tmp_path / "s", VM_CONFIG, CPUID, mem)

    leaked = open_fds() - before
    monkeypatch.undo()
    mem.close()
    assert (os.listdir(tmp_path), leaked) == ([], set())


def test_writer_removes_a_killed_writers_leftover_whose_name_holds_a_newline(
    tmp_path, mem, monkeypatch
):
    """A snapshot's name may hold any byte but '/' and NUL (`ctl snapshot $'/s/a\\nb'`): the
    copy of guest RAM its killed writer left is a leftover like any other."""
    monkeypatch.setattr(writer_module, "STALE_AFTER_S", 0.0)
    left = _killed_writer(tmp_path / "a\nb", mem)
    assert sorted(os.listdir(tmp_path / left)) == ["ram.bin"]  # a copy of guest RAM

    removed = writer_module.remove_stale_staging(tmp_path)

    assert (removed, os.listdir(tmp_path)) == ([tmp_path / left], [])
