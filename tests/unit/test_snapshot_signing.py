"""Signed snapshots: a MAC of manifest.json's bytes in manifest.sig (keyed BLAKE3; earlier
releases' HMAC-SHA256 still checked); a reader that asks for a signature refuses an unsigned,
re-signed, edited or wrongly keyed snapshot."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from click.testing import CliRunner, Result

from splitvmm.cli import cli
from splitvmm.snapshot import Snapshot, SnapshotError, signing
from tests.unit.snapshot_support import (
    edit_manifest,
    key_file,
    make_snapshot,
    memory,
    write_snapshot,
)

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def signed(tmp_path):
    return make_snapshot(tmp_path / "s", sign_key=KEY)


@pytest.fixture
def unsigned(tmp_path):
    return make_snapshot(tmp_path / "u")


def test_signing_signed_snapshot_opens_with_its_key(signed):
    snap = Snapshot.open(signed, KEY)

    assert (snap.signed, (signed / "manifest.sig").read_bytes()[:13]) == (True, b"blake3-keyed:")


def test_signing_signature_is_blake3_keyed_under_the_derived_key(signed):
    """The construction, spelled out with the blake3 package alone: a reader in another
    language can check it from the docstring."""
    derived = blake3.blake3(KEY, derive_key_context=signing.KEY_CONTEXT).digest()
    manifest = (signed / "manifest.json").read_bytes()
    want = blake3.blake3(manifest, key=derived).hexdigest()

    assert (signed / "manifest.sig").read_bytes() == f"blake3-keyed:{want}\n".encode()


def hmac_sha256_sig(snapshot: Path, key: bytes) -> bytes:
    """manifest.sig as earlier releases wrote it."""
    manifest = (snapshot / "manifest.json").read_bytes()
    return b"hmac-sha256:" + hmac.new(key, manifest, hashlib.sha256).hexdigest().encode() + b"\n"


def test_signing_checking_a_blake3_signature_loads_no_openssl(signed):
    """A restore's monitor checks the signature itself (cli/up.py), and keeps what it loaded
    for the VM's life: OpenSSL (hashlib, hmac) only for an earlier release's signature."""
    probe = (
        "import json, sys; from splitvmm.snapshot import Snapshot; "
        f"Snapshot.open({str(signed)!r}, {KEY!r}); "
        "print(json.dumps(sorted({'hashlib', '_hashlib', 'hmac'} & set(sys.modules))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_signing_earlier_releases_hmac_sha256_signature_still_opens(signed):
    (signed / "manifest.sig").write_bytes(hmac_sha256_sig(signed, KEY))

    assert Snapshot.open(signed, KEY).signed is True


def test_signing_earlier_releases_signature_with_another_key_refused(signed):
    (signed / "manifest.sig").write_bytes(hmac_sha256_sig(signed, b"y" * 32))

    with pytest.raises(SnapshotError, match="manifest.sig: the signature does not match"):
        Snapshot.open(signed, KEY)


def test_signing_one_kind_of_signature_does_not_pass_as_the_other(signed):
    """A blake3-keyed value relabelled hmac-sha256 (and back) is checked as what it says."""
    sig = (signed / "manifest.sig").read_bytes()
    (signed / "manifest.sig").write_bytes(sig.replace(b"blake3-keyed:", b"hmac-sha256:"))
    with pytest.raises(SnapshotError, match="the signature does not match"):
        Snapshot.open(signed, KEY)

    legacy = hmac_sha256_sig(signed, KEY)
    (signed / "manifest.sig").write_bytes(legacy.replace(b"hmac-sha256:", b"blake3-keyed:"))
    with pytest.raises(SnapshotError, match="the signature does not match"):
        Snapshot.open(signed, KEY)


def test_signing_unsigned_snapshot_refused(unsigned):
    with pytest.raises(SnapshotError, match=r"^manifest.sig: missing: the snapshot is not signed$"):
        Snapshot.open(unsigned, KEY)


def test_signing_unsigned_snapshot_opens_without_a_key(unsigned):
    assert Snapshot.open(unsigned).signed is False


def test_signing_other_key_refused(signed):
    with pytest.raises(SnapshotError, match="manifest.sig: the signature does not match"):
        Snapshot.open(signed, b"x" * 32)


@pytest.mark.parametrize("where", [0, 63], ids=["first-digit", "last-digit"])
def test_signing_signature_with_one_digit_changed_refused(signed, where):
    """Every digit of the signature counts: a compare that looked at a prefix passed a
    forgery that differed only at its end."""
    sig = signed / "manifest.sig"
    text = sig.read_text()
    i = len(text.rstrip("\n")) - 64 + where  # in the 64 hex digits after the kind's prefix
    sig.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1 :])

    with pytest.raises(SnapshotError, match="manifest.sig: the signature does not match"):
        Snapshot.open(signed, KEY)


def test_signing_edited_manifest_refused(signed):
    edit_manifest(signed, lambda m: m["vm_config"]["vm"].update(name="evil"))

    with pytest.raises(SnapshotError, match="the signature does not match"):
        Snapshot.open(signed, KEY)


def test_signing_checked_before_manifest_is_parsed(unsigned):
    (unsigned / "manifest.json").write_text("{not json")

    with pytest.raises(SnapshotError, match="not signed"):
        Snapshot.open(unsigned, KEY)


@pytest.mark.parametrize(
    "sig",
    [
        b"",
        b"hmac-sha256:XYZ\n",
        b"sha1:" + b"0" * 40,
        b"hmac-sha256:" + b"A" * 64,
        b"blake3-keyed:" + b"0" * 63,
        b"blake3:" + b"0" * 64,
    ],
)
def test_signing_malformed_signature_file_refused(signed, sig):
    (signed / "manifest.sig").write_bytes(sig)

    with pytest.raises(
        SnapshotError, match="manifest.sig: not a blake3-keyed or hmac-sha256 signature"
    ):
        Snapshot.open(signed, KEY)


def test_signing_huge_signature_file_refused(signed):
    (signed / "manifest.sig").write_bytes(b"0" * (1 << 20))

    with pytest.raises(SnapshotError, match="manifest.sig: 1048576 bytes, over the 128 cap"):
        Snapshot.open(signed, KEY)


def test_signing_symlinked_signature_refused(signed, tmp_path):
    (tmp_path / "elsewhere").write_bytes((signed / "manifest.sig").read_bytes())
    (signed / "manifest.sig").unlink()
    (signed / "manifest.sig").symlink_to(tmp_path / "elsewhere")

    with pytest.raises(SnapshotError, match="manifest.sig: is a symlink"):
        Snapshot.open(signed, KEY)


def test_signing_short_key_refused_by_writer_before_publishing(tmp_path):
    mem = memory()

    with pytest.raises(SnapshotError, match="a key of 4 bytes; it must be 16..4096 bytes"):
        write_snapshot(tmp_path / "s", mem, sign_key=b"abcd")
    mem.close()

    assert list(tmp_path.iterdir()) == []


def test_signing_load_key_reads_private_file(tmp_path):
    assert signing.load_key(key_file(tmp_path / "key", KEY)) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_signing_load_key_group_or_world_access_refused(tmp_path, mode):
    path = key_file(tmp_path / "key", KEY, mode)

    with pytest.raises(SnapshotError, match=f"mode {mode:04o} lets group or others"):
        signing.load_key(path)


def test_signing_load_key_short_key_refused(tmp_path):
    with pytest.raises(SnapshotError, match="a key of 15 bytes"):
        signing.load_key(key_file(tmp_path / "key", b"k" * 15))


def test_signing_load_key_too_long_says_more_than_the_limit_not_the_bytes_read(tmp_path):
    """Only MAX_KEY_BYTES + 1 bytes are read: a 10000-byte file was "a key of 4097 bytes"."""
    with pytest.raises(SnapshotError, match="a key of more than 4096 bytes; it must be 16..4096"):
        signing.load_key(key_file(tmp_path / "key", b"k" * 10000))


def test_signing_load_key_symlink_refused(tmp_path):
    key_file(tmp_path / "real", KEY)
    (tmp_path / "key").symlink_to(tmp_path / "real")

    with pytest.raises(SnapshotError, match="signing key: .* is a symlink"):
        signing.load_key(tmp_path / "key")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected the key as lowercase hex"),
        ("zz" * 16, "expected the key as lowercase hex"),
        ("AB" * 16, "expected the key as lowercase hex"),
        ("0" * 33, "expected the key as lowercase hex"),
        (1234, "expected the key as lowercase hex"),
        ("ab" * 15, "a key of 15 bytes"),
    ],
)
def test_signing_key_from_hex_refuses_bad_keys(text, message):
    with pytest.raises(SnapshotError, match=message):
        signing.key_from_hex(text)


def test_signing_key_from_hex_error_never_quotes_the_key():
    with pytest.raises(SnapshotError) as e:
        signing.key_from_hex("ab" * 15)

    assert "abab" not in str(e.value)


def test_signing_key_from_hex_roundtrip():
    assert signing.key_from_hex(KEY.hex()) == KEY


def verify_with_key(snap: Path, tmp_path: Path) -> Result:
    key = key_file(tmp_path / "k", KEY)
    return CliRunner().invoke(
        cli, ["snapshot", "verify", str(snap), "--require-signature", str(key)]
    )


def test_cli_verify_require_signature_good_key_says_so(signed, tmp_path):
    result = verify_with_key(signed, tmp_path)

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("MiB, signature good)\n")


def test_cli_verify_require_signature_unsigned_exits_1_in_one_line(unsigned, tmp_path):
    result = verify_with_key(unsigned, tmp_path)

    assert (result.exit_code, result.stderr) == (
        1,
        f"splitvmm: error: snapshot {unsigned}: manifest.sig: missing: the snapshot is not signed\n",
    )


def test_cli_inspect_json_says_whether_signed(signed):
    result = CliRunner().invoke(cli, ["snapshot", "inspect", str(signed), "--json"])

    assert json.loads(result.stdout)["signed"] is True


def test_cli_up_require_signature_without_restore_is_a_usage_error(tmp_path):
    key = key_file(tmp_path / "k", KEY)

    result = CliRunner().invoke(cli, ["up", "vm.toml", "--require-signature", str(key)])

    assert result.exit_code == 2
    assert "--require-signature goes with --restore" in result.output


def test_cli_ctl_sign_with_readable_key_refused_before_connecting(tmp_path):
    key = key_file(tmp_path / "k", KEY, 0o644)
    sock = tmp_path / "absent.sock"

    result = CliRunner().invoke(
        cli, ["ctl", "--socket", str(sock), "snapshot", str(tmp_path / "s"), "--sign", str(key)]
    )

    assert result.exit_code == 1
    assert "mode 0644 lets group or others read or change it; chmod 600 it" in result.output
