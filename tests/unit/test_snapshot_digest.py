"""Chunk checksums: Overlapped gives the one-shot checksum whatever the pieces, keeps their
order, hands a helper's error to the caller and leaves no thread behind."""

from __future__ import annotations

import hashlib
import threading

import blake3
import pytest

from splitvmm.snapshot import digest

BIG = digest.THREAD_MIN  # hashed on the helper thread
DATA = bytes(range(256)) * (3 * BIG // 256) + b"tail"


def pieces(data: bytes, sizes: list[int]) -> list[memoryview]:
    view, out, pos = memoryview(data), [], 0
    for size in sizes:
        out.append(view[pos : pos + size])
        pos += size
    return [*out, view[pos:]]


@pytest.mark.parametrize("algorithm", digest.ALGORITHMS)
def test_digest_of_matches_the_library(algorithm):
    want = {"blake3": blake3.blake3(DATA), "sha256": hashlib.sha256(DATA)}[algorithm]

    assert digest.of(algorithm, DATA) == want.hexdigest()


@pytest.mark.parametrize("algorithm", digest.ALGORITHMS)
@pytest.mark.parametrize(
    "sizes", [[], [10], [BIG], [10, BIG, 3, BIG + 1]], ids=["whole", "small", "big", "mixed"]
)
def test_digest_overlapped_equals_one_shot_in_any_pieces(algorithm, sizes):
    with digest.Overlapped(algorithm) as checksum:
        for piece in pieces(DATA, sizes):
            checksum.update(piece)
        got = checksum.hexdigest()

    assert got == digest.of(algorithm, DATA)


def test_digest_overlapped_order_matters():
    swapped = DATA[BIG:] + DATA[:BIG]
    with digest.Overlapped("blake3") as checksum:
        checksum.update(swapped[: len(DATA) - BIG])
        checksum.update(swapped[len(DATA) - BIG :])
        got = checksum.hexdigest()

    assert got != digest.of("blake3", DATA)


class _Broken:
    def update(self, data: object) -> None:
        raise ValueError("the buffer went away")

    def hexdigest(self) -> str:
        return ""


def test_digest_overlapped_helper_error_raised_in_caller(monkeypatch):
    monkeypatch.setattr(digest, "new", lambda algorithm: _Broken())
    checksum = digest.Overlapped("blake3")
    checksum.update(DATA)

    with pytest.raises(ValueError, match="the buffer went away"):
        checksum.hexdigest()


def test_digest_overlapped_leaves_no_thread_when_the_caller_fails():
    before = threading.active_count()

    with pytest.raises(OSError), digest.Overlapped("blake3") as checksum:
        checksum.update(DATA)
        raise OSError("the copy failed")

    assert threading.active_count() == before


def test_digest_overlapped_one_helper_hashes_every_large_piece(monkeypatch):
    hashers: list[int] = []

    class Recording:
        def update(self, data: object) -> None:
            hashers.append(threading.get_ident())

        def hexdigest(self) -> str:
            return ""

    monkeypatch.setattr(digest, "new", lambda algorithm: Recording())
    with digest.Overlapped("blake3") as checksum:
        for piece in pieces(DATA, [BIG, BIG, BIG]):
            checksum.update(piece)
        checksum.wait()

    assert len(hashers) == 4  # three large pieces on the helper, the 4-byte tail at once
    assert len(set(hashers[:3])) == 1
    assert hashers[0] != threading.get_ident()
    assert hashers[3] == threading.get_ident()


def test_digest_overlapped_hexdigest_ends_the_helper():
    before = threading.active_count()
    checksum = digest.Overlapped("blake3")
    checksum.update(DATA)
    assert threading.active_count() == before + 1

    assert checksum.hexdigest() == digest.of("blake3", DATA)
    assert threading.active_count() == before


def test_digest_overlapped_helper_error_leaves_no_thread(monkeypatch):
    before = threading.active_count()
    monkeypatch.setattr(digest, "new", lambda algorithm: _Broken())
    checksum = digest.Overlapped("blake3")
    checksum.update(DATA)

    with pytest.raises(ValueError, match="the buffer went away"):
        checksum.update(DATA)  # the next piece waits for the first, and meets its error
    assert threading.active_count() == before
