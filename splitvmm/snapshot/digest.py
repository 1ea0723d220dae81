"""Chunk checksums: the algorithms a manifest may name, and hashing that overlaps the I/O.

Each chunk's entry in the manifest says which algorithm its checksum uses: "blake3" (what this
release writes) or "sha256" (what format v1 wrote; still read, and still valid in v2).

Why BLAKE3, from the `blake3` package (bindings to the reference Rust implementation): it is a
cryptographic hash like sha256, so signing.py's promise holds (a MAC over the manifest covers
every chunk only if no one can make another chunk with the same checksum), and it is fast.
Measured here, hashing 256 MiB already in memory from Python, best of 3 (/tmp bench, 1, 8 and
64 MiB pieces alike): sha256 (hashlib, OpenSSL) 1.66 GiB/s, BLAKE3 4.3 GiB/s on one thread
(7.5-8.4 GiB/s with max_threads on this machine's two cores), XXH3-128 (`xxhash`) 24 GiB/s.
XXH3 is faster still but not collision resistant: anyone could forge a chunk for a signed
manifest. BLAKE3 runs on one thread here: Overlapped below already hides it behind the copy,
and the cores left over are the copy's and the guest's.

Overlapped hashes each piece on a helper thread while the caller goes on with its I/O (a save
writes that piece meanwhile, a restore copies the next): blake3 and hashlib both release the
GIL on large buffers. Restoring 256 MiB (sendfile into the memfd in 8 MiB pieces, then hashing
each where it landed) took 190 ms with BLAKE3 after each copy and 112 ms overlapped, which is
the copy alone (sha256: 310 and 180 ms).
"""

from __future__ import annotations

import queue
import threading
from typing import Final, Literal, Protocol

# Imported with the module, not on first use: a confined monitor (monitor/confinement.py) can
# no longer open or map a shared library when its first snapshot is taken.
import blake3

Algorithm = Literal["blake3", "sha256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("blake3", "sha256")
WRITE_ALGORITHM: Final[Algorithm] = "blake3"  # what this release writes
Data = bytes | bytearray | memoryview
THREAD_MIN = 1 << 20  # smaller pieces are hashed at once: a hand-off costs more than they do


class Hash(Protocol):
    def update(self, data: Data, /) -> object: ...
    def hexdigest(self) -> str: ...


def new(algorithm: Algorithm) -> Hash:
    if algorithm == "blake3":
        return blake3.blake3()  # 32 bytes of output: 64 hex digits, like sha256
    # Only a reader asks for sha256 (a v1 snapshot's chunks), never the confined monitor,
    # which writes BLAKE3: imported here, hashlib's OpenSSL (~3.5 MiB resident, ~3 ms to
    # load) stays out of a monitor that never reads a v1 snapshot.
    import hashlib

    return hashlib.sha256()


def of(algorithm: Algorithm, data: Data) -> str:
    """The hex checksum of data."""
    h = new(algorithm)
    h.update(data)
    return h.hexdigest()


class Overlapped:
    """A checksum fed piece by piece, each large piece hashed on a helper thread while the
    caller goes on with its I/O; order is kept (a piece starts once the one before is done).

    One helper serves every piece, started with the first large one. A thread started per
    piece (32 for 256 MiB in 8 MiB pieces) cost ~0.6 ms each here: ram.write_ram of 256 MiB
    of data, 14 alternating runs in fresh processes, each after an untimed write of the same
    size, took 90.6 ms (median) with a thread per piece and 74.9 with one helper, paired
    difference -15.8 ms [-20.4, 0.1] (bootstrap 95%); a bare write of the same bytes takes
    52-65. Its load_ram: 136.1 against 130.9 ms, -6.3 [-15.4, 6.5], not resolved.

    A piece must stay unchanged until the next update() or hexdigest() returns. Use it as a
    context manager, or end with hexdigest(): either joins the helper, so none outlives the
    hash (a monitor that confines itself next refuses to while a thread exists)."""

    def __init__(self, algorithm: Algorithm) -> None:
        self._hash = new(algorithm)
        self._pieces: queue.SimpleQueue[Data | None] = queue.SimpleQueue()  # None: end
        self._hashed = threading.Semaphore(0)  # released once per piece the helper is done with
        self._thread: threading.Thread | None = None
        self._busy = False  # a piece is with the helper
        self._error: BaseException | None = None

    def __enter__(self) -> Overlapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self._join()

    def update(self, piece: Data) -> None:
        self.wait()
        if memoryview(piece).nbytes < THREAD_MIN:
            self._hash.update(piece)
            return
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="snapshot-hash", daemon=True)
            thread.start()  # (kept only once started: a failed start is what gets raised)
            self._thread = thread
        self._busy = True
        self._pieces.put(piece)

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            try:
                if self._error is None:  # after an error, pieces are only acknowledged
                    self._hash.update(piece)
            except BaseException as e:  # re-raised in the caller's thread by wait()
                self._error = e
            finally:
                self._hashed.release()

    def _join(self) -> None:
        """Until the piece with the helper is hashed, then end the helper."""
        self._settle()
        if self._thread is not None:
            self._pieces.put(None)
            self._thread.join()
            self._thread = None

    def _settle(self) -> None:
        if self._busy:
            self._hashed.acquire()
            self._busy = False

    def wait(self) -> None:
        """Until every piece given so far is hashed; a helper's error is raised here (the
        helper has ended then: nothing more is hashed)."""
        self._settle()
        if self._error is not None:
            self._join()
            raise self._error

    def hexdigest(self) -> str:
        """The checksum of every piece; the helper has ended when this returns."""
        try:
            self.wait()
        finally:
            self._join()
        return self._hash.hexdigest()
