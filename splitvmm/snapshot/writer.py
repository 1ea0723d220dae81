"""SnapshotWriter: writes a snapshot directory so that a half-written one never looks valid.

Everything goes into a private temporary directory next to the target (`.<name>.tmp-<pid>`,
same file system, so the final rename is atomic). Every file is fsynced, the manifest is
written last and fsynced, then the directory, then it is renamed into place and the parent is
fsynced. The chunk files are fsynced together, by commit(): add_ram() and add_json_chunk()
only copy the data (into the page cache), and commit() reads nothing of the VM, so a caller
may let the VM run again before commit() (the coordinator does, for `ctl snapshot`): the
pause is the copy, the disk's flush comes after. Any error inside the writer removes the
temporary directory. A writer killed before the rename (SIGKILL, OOM, power) leaves only that
hidden directory, never a snapshot; it holds a copy of guest RAM, so the next writer into the
same directory removes it (remove_stale_staging): a writer holds a flock on its directory
while it writes, and one nobody holds is stale. The files hold guest memory, so the directory
is 0700 and files 0600 (created through hostpath, O_EXCL: nothing already there is ever
written into).

    with SnapshotWriter(path, vm_config, cpuid, mem) as w:
        w.add_ram(mem, progress=cb)  # or, the VM running: w.add_ram_precopy(mem, stop)
        w.add_json_chunk("vcpu", "vcpu0", 1, regs)
        w.add_json_chunk("device", "serial0", 1, state, model="serial")
        w.commit(sign_key=None)  # or a key: manifest.sig holds the manifest's MAC
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from splitvmm import __version__
from splitvmm.config import MAX_VCPUS
from splitvmm.hostpath import Access, HostFileError, open_host_file
from splitvmm.native import files
from splitvmm.protocol.spec import MAX_DEVICES, NAME_RE, NAME_RULE
from splitvmm.snapshot import digest, ram, signing, state
from splitvmm.snapshot.format import (
    MANIFEST,
    ChunkEntry,
    Digest,
    Kind,
    Manifest,
    MemoryEntry,
    RamEncoding,
    RegionEntry,
    SnapshotError,
    dump_json,
    parse_manifest,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

T = TypeVar("T")
RAM_NAME, RAM_FILE = "ram", "ram.bin"
JSON_KINDS = ("vcpu", "vm", "device")
WRITE_BUFFER = 1 << 20
# A RAM file written back as it is written (add_ram's writeback) starts its disk writes every
# this many bytes: one RAM piece (ram.PIECE)
WRITEBACK_STEP = ram.PIECE
# A temporary directory younger than this is left alone even when no writer holds it: its
# writer may be between its mkdir and its flock.
STALE_AFTER_S = 2.0
# A sweep looks at this many look-alike names at most, and gives up on a directory holding
# more entries than a writer makes: guest RAM, the manifest and its MAC, and a chunk per
# vCPU, per device and for the VM's own state (a few).
STALE_CANDIDATES = 16
WRITER_FILES_MAX = 3 + MAX_VCPUS + MAX_DEVICES + 8
# Whose a writer's directories are: taken at import, since the monitor's filter allows no
# geteuid (policies/x86_64/monitor.policy), and its user never changes.
EUID = os.geteuid()

log = logging.getLogger("splitvmm.snapshot")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_existing(target: Path) -> None:
    if os.path.lexists(target):
        raise SnapshotError(f"snapshot target {target} already exists")


def staging_name_problem(target: Path) -> str | None:
    """Why `target` cannot be a snapshot's name, or None: one named as staging_path() names
    a temporary directory would be removed, once published, by the next writer's sweep."""
    if STAGING_NAME.fullmatch(target.name):
        return "the name of a writer's temporary directory (.NAME.tmp-PID)"
    return None


def _layout(memory: ram.MemoryLayoutLike) -> MemoryEntry:
    regions = tuple(RegionEntry(r.gpa, r.size, r.offset) for r in memory.regions)
    return MemoryEntry(memory.size, regions)


def staging_path(target: Path) -> Path:
    """Where a snapshot for `target` is written before its rename: a private temporary
    directory beside it (the module docstring)."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


# What staging_path() names, for any target (DOTALL: a name may hold a newline).
STAGING_NAME = re.compile(r"\..+\.tmp-[0-9]+", re.DOTALL)


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove, in `directory`, the temporary directories of writers that died before their
    rename: named as staging_path() names them, ours (a writer runs as we do), holding only
    files a writer makes, no flock held, older than STALE_AFTER_S. The paths removed.
    Anything else is left as it is: a directory we cannot open, list or lock, another user's,
    or one that holds what no writer makes, is not ours to judge. What is opened and listed
    is bounded (STALE_CANDIDATES of ours, WRITER_FILES_MAX entries each): in a snapshot
    directory others may write to, their look-alikes must not make every snapshot slow, nor
    keep ours. (Each look-alike directory costs one lstat, before the pause.)"""
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if STAGING_NAME.fullmatch(e.name) and _ours(e)]
    except OSError:
        return []  # the directory's own problem is reported by the writer's mkdir
    removed = []
    # Only our own count: another user's look-alikes, however many, take no one's place.
    for name in names[:STALE_CANDIDATES]:  # the rest, the next snapshot's
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not _judgeable(os.fstat(fd)):  # what the path names now: checked again
                continue
            if not _writers_files(fd):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the close below
        except OSError:  # BlockingIOError: a live writer holds it
            continue
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):  # (rmtree's errors ignored: what it could not remove)
            log.warning("could not remove %s, left by a snapshot writer that died", path)
            continue
        log.warning("removed %s, left by a snapshot writer that died before it finished", path)
        removed.append(path)
    return removed


def _ours(entry: os.DirEntry[str]) -> bool:
    """Whether a look-alike is a directory of ours (not a symlink), old enough to judge: its
    kind from the listing (no syscall where the file system gives it), then one lstat."""
    try:
        if not entry.is_dir(follow_symlinks=False):
            return False
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _judgeable(st)


def _judgeable(st: os.stat_result) -> bool:
    """Whether a directory is ours (a writer runs as we do) and older than STALE_AFTER_S."""
    return st.st_uid == EUID and time.time() - st.st_ctime >= STALE_AFTER_S


def _writers_files(dirfd: int) -> bool:
    """Whether the directory holds nothing but regular files a writer makes, and no more of
    them than a writer makes (WRITER_FILES_MAX)."""
    with os.scandir(dirfd) as entries:
        for count, entry in enumerate(entries):
            name = entry.name
            chunk = name.endswith(".json") and NAME_RE.fullmatch(name.removesuffix(".json"))
            if count >= WRITER_FILES_MAX or not (
                chunk or name in (RAM_FILE, MANIFEST, signing.SIG_FILE)
            ):
                return False
            if not entry.is_file(follow_symlinks=False):
                return False
    return True


class _WritingBack(io.BufferedWriter):
    """A buffered file that starts the disk writes of what it was given every WRITEBACK_STEP
    bytes (files.start_writeback), as the file grows: by its fsync most of it is on the disk
    already, where a file written whole and then fsynced waits for all of its writes then.

    A start that fails stops the starts, and nothing else: it is a hint. The kernel does not
    retry a write it could not start without waiting (no memory for it, say), as fsync's does,
    and whatever the disk got wrong fsync reports at the commit."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__(raw, WRITE_BUFFER)
        self._fd: int | None = raw.fileno()  # None once a start failed
        self._unstarted = 0  # bytes given since the last start

    def write(self, data: ReadableBuffer, /) -> int:
        written = super().write(data)
        self._unstarted += written
        if self._unstarted >= WRITEBACK_STEP and self._fd is not None:
            self._unstarted = 0
            try:
                files.start_writeback(self._fd)  # what reached the file; the buffer's follows
            except OSError as e:
                log.debug("snapshot RAM file: no more writeback as it is written: %s", e)
                self._fd = None
        return written


class SnapshotWriter:
    """Collects chunks into a temporary directory; commit() publishes them as one snapshot."""

    def __init__(
        self,
        target: str | os.PathLike[str],
        vm_config: Mapping[str, Any],
        cpuid: object,
        memory: ram.MemoryLayoutLike,
        *,
        created: datetime | None = None,
        sweep: bool = True,
    ) -> None:
        """`sweep`: remove what dead writers left in the target's directory first
        (remove_stale_staging); False where the caller did so already, before a pause."""
        self.target = Path(target)
        if not isinstance(vm_config, Mapping):
            raise SnapshotError("vm_config must be a dict (the VM's config as written)")
        dump_json(vm_config, "vm_config")  # fail before creating anything
        dump_json(cpuid, "cpuid")
        self._vm_config, self._cpuid = dict(vm_config), cpuid
        self._memory = _layout(memory)
        stamp = (created or datetime.now(UTC)).astimezone(UTC)
        self._created = stamp.isoformat(timespec="seconds")
        self._chunks: list[ChunkEntry] = []
        self._unsynced: list[int] = []  # fds of the files written, until they are fsynced
        self._state = "open"  # -> "committed" | "aborted"
        _refuse_existing(self.target)
        if problem := staging_name_problem(self.target):
            raise SnapshotError(f"snapshot target {self.target}: {problem}")
        if sweep:
            remove_stale_staging(self.target.parent)
        self.tmp = staging_path(self.target)
        try:
            os.mkdir(self.tmp, 0o700)
        except FileExistsError:
            raise SnapshotError(
                f"temporary directory {self.tmp} already exists (left by a crashed writer?)"
            ) from None
        except OSError as e:
            raise SnapshotError(f"cannot create {self.tmp}: {e.strerror}") from None
        self._dirfd = -1
        try:
            self._dirfd = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # Held until the directory is renamed or removed: it marks the directory as being
            # written (remove_stale_staging). Never contended: the directory is new, and no
            # sweep takes a directory this young.
            fcntl.flock(self._dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._close_dir()
            with contextlib.suppress(OSError):
                os.rmdir(self.tmp)
            raise SnapshotError(f"cannot open and lock {self.tmp}: {e.strerror or e}") from None

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a no-op after commit(); otherwise nothing was published

    @contextlib.contextmanager
    def _guarded(self, what: str) -> Iterator[None]:
        """Any failure inside the writer removes the temporary directory, then propagates."""
        if self._state != "open":
            raise SnapshotError(f"snapshot {self.target}: the writer is already {self._state}")
        try:
            yield
        except OSError as e:
            self.abort()
            raise SnapshotError(f"snapshot {self.target}: {what}: {e.strerror or e}") from None
        except BaseException:
            self.abort()
            raise

    def _write_file(
        self,
        name: str,
        fill: Callable[[BinaryIO], T],
        sync: bool = False,
        writeback: bool = False,
    ) -> T:
        """Create `name` and fill it; fsync it now, or (a chunk) leave it open for commit().
        `writeback`: its disk writes start as it is filled (_WritingBack)."""
        try:
            fd = open_host_file(name, f"snapshot file {name}", Access.CREATE, self._dirfd)
        except HostFileError as e:
            raise SnapshotError(f"snapshot {self.target}: {name}: {e.reason}") from None
        self._unsynced.append(fd)  # closed by _sync_files() or abort(), whatever happens
        raw = io.FileIO(fd, "wb", closefd=False)
        with _WritingBack(raw) if writeback else io.BufferedWriter(raw, WRITE_BUFFER) as f:
            result = fill(f)
        if sync:
            self._sync_files()
        return result

    def _sync_files(self) -> None:
        """fsync and close every file written and not yet synced."""
        while self._unsynced:
            os.fsync(self._unsynced[-1])
            os.close(self._unsynced.pop())

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == "manifest":
            raise SnapshotError(f"chunk name {name!r} must be {NAME_RULE}")
        if any(c.name == name for c in self._chunks):
            raise SnapshotError(f"chunk {name}: the name is used twice")

    def add_json_chunk(
        self, kind: Kind, name: str, state_version: int, payload: Any, model: str | None = None
    ) -> ChunkEntry:
        """Add a vCPU, VM or device state; `model` is the device model (kind "device" only)."""
        with self._guarded(f"chunk {name}"):
            self._check_name(name)
            if kind not in JSON_KINDS:
                raise SnapshotError(f"chunk {name}: kind {kind!r} is not one of {JSON_KINDS}")
            if type(state_version) is not int or state_version < 1:
                raise SnapshotError(f"chunk {name}: state_version must be an int >= 1")
            if (kind == "device") != (isinstance(model, str) and bool(NAME_RE.fullmatch(model))):
                raise SnapshotError(
                    f"chunk {name}: kind device needs a model name; others take none"
                )
            data = state.encode(kind, state_version, payload, model, f"chunk {name}")
            file = f"{name}.json"
            self._write_file(file, lambda f: f.write(data))
            checksum = Digest(digest.WRITE_ALGORITHM, digest.of(digest.WRITE_ALGORITHM, data))
            entry = ChunkEntry(kind, name, state_version, file, len(data), checksum, model)
            self._chunks.append(entry)
            return entry

    def add_ram(
        self, mem: ram.RamLike, progress: ram.Progress | None = None, *, writeback: bool = False
    ) -> ChunkEntry:
        """Write guest RAM (the VM paused, devices quiesced); progress(done, total) in bytes.

        `writeback`: the file's disk writes start as it is written, so that commit()'s fsync
        waits for the last piece only, not the whole file (bench/snapshot.py: a file of 64
        MiB written in 8 MiB pieces and fsynced, 56 -> 40 ms here; 256 MiB, 186 -> 119). For
        a VM that stays stopped until the commit (a suspend's): the copy itself takes longer
        so (the pieces go to the disk as it goes on: 66 -> 115 ms for the 256 MiB), which a
        pause that ends with the copy, a live snapshot's, would pay."""
        return self._add_ram(
            mem, lambda f: ram.write_ram(f, mem, progress), ram.ENCODING, writeback
        )

    def _add_ram(
        self,
        mem: ram.RamLike,
        fill: Callable[[BinaryIO], ram.RamStats],
        encoding: RamEncoding,
        writeback: bool = False,
    ) -> ChunkEntry:
        with self._guarded("chunk ram"):
            self._check_name(RAM_NAME)
            if _layout(mem) != self._memory:
                raise SnapshotError("chunk ram: the memory differs from the one given at start")
            stats = self._write_file(RAM_FILE, fill, writeback=writeback)
            entry = ChunkEntry(
                kind="ram",
                name=RAM_NAME,
                state_version=ram.VERSIONS[encoding],
                file=RAM_FILE,
                size=stats.file_bytes,
                digest=Digest(digest.WRITE_ALGORITHM, stats.digest),
                encoding=encoding,
            )
            self._chunks.append(entry)
            return entry

    def add_ram_precopy(
        self,
        mem: ram.RamLike,
        stop: Callable[[], ram.Written],
        progress: ram.Progress | None = None,
        again: Callable[[int], ram.Written | None] | None = None,
    ) -> ChunkEntry:
        """Write guest RAM while its VM runs, and what it wrote meanwhile as long as again()
        says so, then call stop(), which stops it and says what was written since, then that
        (ram.write_ram_precopy): sparse-v2."""
        return self._add_ram(
            mem,
            lambda f: ram.write_ram_precopy(f, mem, stop, progress, again),
            ram.PRECOPY_ENCODING,
        )

    def set_cpuid(self, cpuid: object) -> None:
        """The vCPUs' CPUID, for a writer made before they were stopped (a live snapshot's,
        which copies RAM first): the manifest records what the saved vCPUs hold."""
        with self._guarded("cpuid"):
            dump_json(cpuid, "cpuid")
            self._cpuid = cpuid

    def commit(self, sign_key: bytes | None = None) -> Path:
        """Write the manifest (and with sign_key, its MAC in manifest.sig: signing.py), then
        publish the directory at the target path."""
        with self._guarded("commit"):
            if not any(c.kind == "ram" for c in self._chunks):
                raise SnapshotError("snapshot has no RAM chunk: call add_ram() before commit()")
            manifest = Manifest(
                producer=f"splitvmm {__version__}",
                created=self._created,
                vm_config=self._vm_config,
                cpuid=self._cpuid,
                memory=self._memory,
                chunks=tuple(self._chunks),
            )
            data = manifest.encode()
            parse_manifest(data)  # a writer bug must not publish a snapshot we cannot read
            self._sync_files()  # every chunk is on disk before the manifest that names it
            self._write_file(MANIFEST, lambda f: f.write(data), sync=True)
            if sign_key is not None:
                sig = signing.mac(data, sign_key)
                self._write_file(signing.SIG_FILE, lambda f: f.write(sig), sync=True)
            os.fsync(self._dirfd)
            # os.rename would replace an empty directory at the target; check right before.
            # (Two writers racing for one path is the only way past this; renameat2's
            # RENAME_NOREPLACE would close it, but os has no binding for it.)
            _refuse_existing(self.target)
            os.rename(self.tmp, self.target)
            try:
                _fsync_dir(self.target.parent)
            except OSError as e:
                # Not durable, and the caller is told the snapshot failed (a suspend then
                # resumes the VM, which goes on writing its disk): take the rename back, so
                # that nothing is left looking valid at the target; abort() removes the rest.
                try:
                    os.rename(self.target, self.tmp)
                except OSError as back:  # (a file system gone read-only on that EIO: EROFS)
                    raise SnapshotError(
                        f"snapshot {self.target}: commit: {e.strerror or e}; the directory was "
                        f"left there ({back.strerror or back}), not durable and no longer the "
                        "VM's state: remove it, do not restore it"
                    ) from None
                raise
            # The flock goes only now: released before the rename, another writer's sweep
            # could take the directory for a dead writer's and remove it as it is published.
            self._close_dir()
            self._state = "committed"
        return self.target

    def _close_dir(self) -> None:
        # -1 once closed: closing a number twice could close an fd someone else opened since.
        fd, self._dirfd = self._dirfd, -1
        if fd >= 0:
            os.close(fd)

    def abort(self) -> None:
        """Drop everything written so far; nothing is published. Safe to call twice."""
        if self._state != "open":
            return
        self._state = "aborted"
        while self._unsynced:
            os.close(self._unsynced.pop())
        self._close_dir()
        # ignore_errors: this runs while another error propagates, which is the one to report;
        # a leftover is a hidden temp directory without the target name, never a snapshot.
        shutil.rmtree(self.tmp, ignore_errors=True)
