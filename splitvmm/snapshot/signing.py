"""Optional authenticity: a MAC of manifest.json's exact bytes, in manifest.sig.

Why the manifest alone: it holds every chunk's size and checksum (BLAKE3, or sha256 in a v1
snapshot: both collision resistant, see digest.py), and the reader hashes each chunk as it uses
it (reader.py), so a good MAC over the manifest's bytes covers the whole snapshot. It is checked before the manifest is parsed, so a signed-only restore never feeds
an unauthenticated manifest to the parser.

Why a separate file and not a field in the manifest: the MAC is over bytes exactly as stored,
with no canonical JSON to agree on and nothing to strip before checking; a signed snapshot's
manifest is byte for byte the one an unsigned snapshot would have, and a reader that does
not ask for a signature ignores the file. The writer puts it in place before the directory
is renamed, so a snapshot is published signed or not at all.

Why a MAC (a shared secret) and not a public-key signature: whoever saves and whoever
restores is the operator, who holds the key on both ends, and the key travels only over the
monitor's 0600 control socket (`ctl snapshot --sign`).

Which MAC. The file names it: `blake3-keyed:HEX` is what this release writes, BLAKE3 in its
keyed-hash mode (a MAC by design) under a 32-byte key that BLAKE3's key-derivation mode makes
from the operator's key (of any length) and this use's own context string. The monitor that
signs is confined by then and hashes its chunks with BLAKE3 already (digest.py); HMAC-SHA256,
what earlier releases wrote, needs hashlib, which loads OpenSSL's libcrypto: ~3.5 MiB of the
monitor's resident memory for the life of every VM (2 MiB of its PSS here, bench/memory.py),
and ~3 ms of its start-up, for one MAC a snapshot.
`hmac-sha256:HEX` is still checked (HMAC-SHA256, RFC 2104), by readers only.

The key file is the key's bytes as they are (`head -c 32 /dev/urandom > key`): at least
MIN_KEY_BYTES, and refused (not merely warned about) when group or others may read or write
it, as ssh refuses a private key: a key others can read signs nothing.
"""

from __future__ import annotations

import os
import re
import stat

# Constant-time comparison. hmac.compare_digest is this very function where hmac runs
# without OpenSSL, and importing hmac loads OpenSSL (the module docstring).
from _operator import _compare_digest

import blake3

from splitvmm.errors import shown
from splitvmm.hostpath import HostFileError, open_host_file
from splitvmm.snapshot.format import MANIFEST_SIG, SnapshotError

SIG_FILE = MANIFEST_SIG  # the signature's file name, for the reader and the writer
SIG_PREFIX = b"blake3-keyed:"  # what this release writes
LEGACY_PREFIX = b"hmac-sha256:"  # what earlier releases wrote: still checked
SIG_RE = re.compile(
    rb"(%s|%s)([0-9a-f]{64})\n?" % (re.escape(SIG_PREFIX), re.escape(LEGACY_PREFIX))
)
# BLAKE3's key derivation takes a context string unique to one use in one application, fixed
# for good: a new one would make every key sign differently.
KEY_CONTEXT = "splitvmm 2026-12-02 snapshot manifest.sig MAC key"
MAX_SIG_BYTES = 128
MIN_KEY_BYTES = 16  # 128 bits: below that a key can be guessed
MAX_KEY_BYTES = 4096  # a key file, not a disk image (its derivation takes any length)


def _check_length(size: int, what: str) -> None:
    """`size` is what was read, at most MAX_KEY_BYTES + 1: past that, the key's own size is
    not known, only that it is too long."""
    if not MIN_KEY_BYTES <= size <= MAX_KEY_BYTES:
        shown_size = f"more than {MAX_KEY_BYTES}" if size > MAX_KEY_BYTES else str(size)
        raise SnapshotError(
            f"{what}: a key of {shown_size} bytes; it must be {MIN_KEY_BYTES}..{MAX_KEY_BYTES} "
            "bytes"
        )


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The key in the file at path: a private regular file (no group/other bits), 16+ bytes."""
    what = f"signing key {shown(os.fspath(path))}"
    try:
        fd = open_host_file(path, "signing key")
    except HostFileError as e:
        raise SnapshotError(str(e)) from None
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise SnapshotError(
                f"{what}: mode {stat.S_IMODE(mode):04o} lets group or others read or change "
                "it; chmod 600 it"
            )
        key = f.read(MAX_KEY_BYTES + 1)
    _check_length(len(key), what)
    return key


def key_from_hex(text: object) -> bytes:
    """A key sent over the control socket (hex); the message never quotes the key."""
    if not isinstance(text, str) or not re.fullmatch(r"(?:[0-9a-f]{2})+", text):
        raise SnapshotError("sign_key: expected the key as lowercase hex")
    key = bytes.fromhex(text)
    _check_length(len(key), "sign_key")
    return key


def mac(manifest: bytes, key: bytes) -> bytes:
    """manifest.sig's contents for these manifest bytes."""
    _check_length(len(key), "signing key")
    return SIG_PREFIX + _blake3_keyed(manifest, key) + b"\n"


def _blake3_keyed(manifest: bytes, key: bytes) -> bytes:
    derived = blake3.blake3(key, derive_key_context=KEY_CONTEXT).digest()
    return blake3.blake3(manifest, key=derived).hexdigest().encode()


def check(manifest: bytes, sig: bytes | None, key: bytes) -> None:
    """SnapshotError unless sig is manifest.sig for exactly these manifest bytes and key."""
    if sig is None:
        raise SnapshotError(f"{SIG_FILE}: missing: the snapshot is not signed")
    m = SIG_RE.fullmatch(sig) if len(sig) <= MAX_SIG_BYTES else None
    if m is None:
        raise SnapshotError(f"{SIG_FILE}: not a blake3-keyed or hmac-sha256 signature")
    prefix, got = m.groups()
    if prefix == LEGACY_PREFIX:
        # Here, not with the module: OpenSSL only where an old signature is checked (a
        # restore's monitor checks the signature too: cli/up.py).
        import hashlib
        import hmac

        want = hmac.new(key, manifest, hashlib.sha256).hexdigest().encode()
    else:
        want = _blake3_keyed(manifest, key)
    if not _compare_digest(got, want):
        raise SnapshotError(
            f"{SIG_FILE}: the signature does not match (another key, or the manifest was changed)"
        )
