"""Snapshot: open a snapshot directory, verify its chunks, read states and load guest RAM.

A snapshot is untrusted input. open() validates the manifest strictly (format.py); chunk files
and the manifest are opened relative to the snapshot directory through hostpath (no symlinks,
and a FIFO planted as a chunk cannot hang us), must be regular files of the manifest's size,
and are hashed as they are read, so what is used is what was checked: load_ram() checks guest
RAM's checksum in the same pass as it copies it, so a restore reads RAM once (verify(ram=False)
before it checks everything else). (The directory itself is
the operator's path and may be reached through a symlink.) Every error is a SnapshotError
naming the chunk: "chunk vcpu0 (vcpu0.json): checksum mismatch". Messages leave out the
snapshot's path; callers say which snapshot ("snapshot DIR: ...").
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from splitvmm.hostpath import HostFileError, open_host_file
from splitvmm.snapshot import digest, ram, signing, state
from splitvmm.snapshot.format import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    ChunkEntry,
    Manifest,
    SnapshotError,
    parse_manifest,
)

READ_PIECE = 1 << 20
HASH_PIECE = 8 << 20  # verify's reads: big enough to hash on the helper thread


def format_size(n: int) -> str:
    """'128 MiB' for round sizes, else a decimal figure: sizes in messages users compare."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if n % (1 << shift) == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def _open_in(directory: Path, name: str, label: str) -> tuple[io.BufferedReader, int]:
    """(buffered file, size) of a regular file directly inside `directory` (hostpath: not a
    symlink, FIFO, device or directory)."""
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot open the directory: {e.strerror}") from None
    try:
        fd = open_host_file(name, label, dir_fd=dirfd)
    except HostFileError as e:
        raise SnapshotError(f"{label}: {e.reason}") from None
    finally:
        os.close(dirfd)
    return io.BufferedReader(io.FileIO(fd, "rb"), READ_PIECE), os.fstat(fd).st_size


def _read_capped(directory: Path, name: str, cap: int) -> bytes:
    f, size = _open_in(directory, name, name)
    with f, _reading(name):
        if size > cap:
            raise SnapshotError(f"{name}: {size} bytes, over the {cap} cap")
        return f.read(cap + 1)  # the file may have grown since fstat; the parser caps again


@contextmanager
def _reading(label: str) -> Iterator[None]:
    """An I/O error while a snapshot's file is read (EIO or ESTALE from its storage; for
    RAM, ENOMEM or EFBIG writing guest memory) is the snapshot's error, naming the file:
    never a traceback."""
    try:
        yield
    except OSError as e:
        raise SnapshotError(f"{label}: {e.strerror or e}") from None


class Snapshot:
    """An opened snapshot directory whose manifest has been validated."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: bytes | None = None) -> Snapshot:
        """The snapshot at path; with a key, only if manifest.sig is its manifest's MAC under
        that key (checked before the manifest is parsed: see signing.py)."""
        path = Path(path)
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise SnapshotError("does not exist") from None
        except OSError as e:  # EACCES on a parent, ENAMETOOLONG...
            raise SnapshotError(f"cannot open the directory: {e.strerror}") from None
        if not is_dir:
            raise SnapshotError("not a directory")
        data = _read_capped(path, MANIFEST, MAX_MANIFEST_BYTES)
        if key is not None:
            signed = os.path.lexists(path / signing.SIG_FILE)
            sig = _read_capped(path, signing.SIG_FILE, signing.MAX_SIG_BYTES) if signed else None
            signing.check(data, sig, key)
        return cls(path, parse_manifest(data))

    @property
    def signed(self) -> bool:
        """Whether a manifest.sig is present (says nothing about whether it is good)."""
        return os.path.lexists(self.path / signing.SIG_FILE)

    # --- what the manifest says ----------------------------------------------------------------

    @property
    def chunks(self) -> tuple[ChunkEntry, ...]:
        return self.manifest.chunks

    @property
    def vcpu_count(self) -> int:
        return sum(c.kind == "vcpu" for c in self.chunks)

    @property
    def total_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def chunk(self, name: str) -> ChunkEntry:
        for c in self.chunks:
            if c.name == name:
                return c
        raise SnapshotError(f"chunk {name}: not in this snapshot")

    @property
    def ram_chunk(self) -> ChunkEntry:
        return next(c for c in self.chunks if c.kind == "ram")  # format.py ensures exactly one

    def summary(self) -> dict[str, Any]:
        """The manifest for `inspect --json`: everything but the CPUID table, plus totals."""
        doc = self.manifest.to_json()
        del doc["cpuid"]
        doc["format_version"] = self.manifest.read_version
        totals = {"vcpus": self.vcpu_count, "bytes": self.total_bytes, "signed": self.signed}
        return {"path": str(self.path), **doc, **totals}

    # --- reading chunks ------------------------------------------------------------------------

    @contextmanager
    def _open_chunk(self, entry: ChunkEntry) -> Iterator[io.BufferedReader]:
        f, size = _open_in(self.path, entry.file, entry.label)
        with f, _reading(entry.label):
            _check_size(entry, size)
            yield f

    def _read_json_entry(self, entry: ChunkEntry) -> Any:
        with self._open_chunk(entry) as f:
            data = f.read(entry.size + 1)
        _check_size(entry, len(data))
        _check_digest(entry, digest.of(entry.digest.alg, data))
        return state.decode(entry, data)

    def read_json(self, name: str) -> Any:
        """A vCPU, VM or device state, as given to SnapshotWriter.add_json_chunk (checked)."""
        entry = self.chunk(name)
        if entry.kind == "ram":
            raise SnapshotError(f"{entry.label}: guest RAM, not JSON: use load_ram()")
        return self._read_json_entry(entry)

    def verify(self, progress: ram.Progress | None = None, *, ram_data: bool = True) -> None:
        """Check every chunk's size, checksum and structure; progress(done, total) in bytes.
        With ram_data=False, the RAM chunk's size only: for a restore, whose load_ram()
        checks RAM's structure and checksum as it copies, before any vCPU runs."""
        total, done = self.total_bytes, 0
        for entry in self.chunks:
            if entry.kind == "ram" and not ram_data:
                with self._open_chunk(entry):
                    pass  # a regular file of the manifest's size
            elif entry.kind == "ram":
                self._verify_ram(entry, progress, done, total)
            else:
                self._read_json_entry(entry)
            done += entry.size
            if progress:
                progress(done, total)

    def _verify_ram(
        self, entry: ChunkEntry, progress: ram.Progress | None, done: int, total: int
    ) -> None:
        with self._open_chunk(entry) as f:
            # The structure first: a walk of the extents' headers, reading no data, refuses
            # a chunk whose layout is wrong before hours of hashing a sparse file's zeros.
            ram.check_ram(
                f.fileno(), entry.size, self.manifest.memory.size, entry.label, _encoding(entry)
            )
            hexdigest, size = _hash_file(f, entry.digest.alg, progress, (done, total), entry.size)
            _check_size(entry, size)
            _check_digest(entry, hexdigest)

    def load_ram(self, mem: ram.RamLike, progress: ram.Progress | None = None) -> None:
        """Load guest RAM into `mem` (a fresh or stopped VM's). On error, do not run the VM:
        its memory holds a partial image."""
        layout = self.manifest.memory
        if mem.size != layout.size:
            raise SnapshotError(
                f"snapshot has {format_size(layout.size)} of RAM, "
                f"the VM has {format_size(mem.size)}"
            )
        regions = [(r.gpa, r.size, r.offset) for r in mem.regions]
        saved = [(r.gpa, r.size, r.offset) for r in layout.regions]
        if regions != saved:  # (guest address, size, offset in RAM) each
            raise SnapshotError(
                f"snapshot's RAM regions {_shown_regions(saved)} differ from the VM's "
                f"{_shown_regions(regions)} (guest address, size, offset)"
            )
        entry = self.ram_chunk
        with self._open_chunk(entry) as f:
            hexdigest = ram.load_ram(
                f.fileno(),
                entry.size,
                mem,
                entry.label,
                entry.digest.alg,
                progress,
                _encoding(entry),
            )
        _check_digest(entry, hexdigest)


def _encoding(entry: ChunkEntry) -> str:
    assert entry.encoding is not None  # ChunkEntry.validate: a RAM chunk names its encoding
    return entry.encoding


def _check_size(entry: ChunkEntry, size: int) -> None:
    if size < entry.size:
        raise SnapshotError(f"{entry.label}: truncated: {size} bytes, manifest says {entry.size}")
    if size > entry.size:
        raise SnapshotError(f"{entry.label}: {size} bytes, manifest says {entry.size}")


def _check_digest(entry: ChunkEntry, hexdigest: str) -> None:
    if hexdigest != entry.digest.hex:
        raise SnapshotError(f"{entry.label}: checksum mismatch ({entry.digest.alg})")


def _hash_file(
    f: io.BufferedReader,
    algorithm: digest.Algorithm,
    progress: ram.Progress | None,
    done_total: tuple[int, int],
    expected: int,
) -> tuple[str, int]:
    """(checksum, size) of the file's contents, up to one byte past the `expected` size (a
    file that grows meanwhile is found too long, not read for ever): one buffer is hashed on
    the helper thread while the other is read into (digest.Overlapped waits for a piece
    before the next)."""
    done, total = done_total
    buffers = (memoryview(bytearray(HASH_PIECE)), memoryview(bytearray(HASH_PIECE)))
    size, which = 0, 0
    with digest.Overlapped(algorithm) as checksum:
        while n := f.readinto(buffers[which][: min(HASH_PIECE, expected + 1 - size)]):
            checksum.update(buffers[which][:n])
            size, which = size + n, 1 - which
            if progress:
                progress(done + size, total)
        return checksum.hexdigest(), size


def _shown_regions(regions: list[tuple[int, int, int]], most: int = 4) -> str:
    """Regions in hex, the first `most` of them: a hostile manifest may list thousands."""
    text = ", ".join(f"({g:#x}, {s:#x}, {o:#x})" for g, s, o in regions[:most])
    return f"[{text}{', ...' if len(regions) > most else ''}]"
