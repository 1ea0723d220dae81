"""The launcher's decoder of request headers (sandbox/launcher_server.py): what a request
may say, and the refusal of anything else."""

import json

import pytest

from splitvmm.protocol.spec import MAX_SPEC
from splitvmm.sandbox import launcher_server
from splitvmm.sandbox.launcher_server import Refused, _decode_header, _decode_spec, _device_user


def header(**msg: object) -> bytes:
    return json.dumps(msg).encode()


def test_rest_request_carries_nothing():
    assert _decode_header(header(op="rest", id=3, size=0)) == ("rest", 3, 0, None, [], None)


def test_configure_request_names_the_vms_models_each_once():
    data = header(
        op="configure", id=1, size=9, models=["serial", "virtio-blk", "serial"], device_user=None
    )

    assert _decode_header(data) == ("configure", 1, 9, None, ["serial", "virtio-blk"], None)


@pytest.mark.parametrize(
    "models", [["serial", "no-such-model"], "serial", [["serial"]], None], ids=repr
)
def test_configure_request_with_models_the_launcher_has_not_is_refused(models):
    """The names go to the zygote, which imports each: only models the launcher starts."""
    with pytest.raises(Refused, match="a configure request's models must be among"):
        _decode_header(header(op="configure", id=1, size=9, models=models, device_user=None))


@pytest.mark.parametrize(
    "user", [[0, 1], [1, 0], [1, 2**32 - 1], [1], [1, 2, 3], ["1", "2"], [1.0, 2], "1:2", 5]
)
def test_configure_request_device_user_that_is_no_user_pair_is_refused(user):
    """The [uid, gid] every device of the VM runs as (config.py vm.device_uid): never root,
    nor -1 (setresuid's "unchanged")."""
    with pytest.raises(Refused, match=r"device_user is not \[uid, gid\], neither 0"):
        _device_user(user)


def test_configure_request_device_user_of_ours_or_none_is_taken(monkeypatch):
    monkeypatch.setattr(launcher_server.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(launcher_server.os, "getegid", lambda: 1000)

    assert _device_user(None) is None
    assert _device_user([1000, 1000]) == (1000, 1000)
    with pytest.raises(Refused, match="only a launcher run as root starts devices as another"):
        _device_user([65534, 65534])


@pytest.mark.parametrize("size", [1, MAX_SPEC])
def test_rest_request_with_a_payload_is_refused(size):
    with pytest.raises(Refused, match="a rest request carries nothing"):
        _decode_header(header(op="rest", id=3, size=size))


@pytest.mark.parametrize("op", ["spawn", "configure"])
@pytest.mark.parametrize("size", [0, MAX_SPEC + 1])
def test_a_request_with_a_spec_outside_its_bounds_is_refused(op, size):
    models = {"models": [], "device_user": None} if op == "configure" else {}
    with pytest.raises(Refused, match=f"spec must be 1 to {MAX_SPEC} bytes"):
        _decode_header(header(op=op, id=1, size=size, **models))


@pytest.mark.parametrize(
    "data",
    [
        header(op="fork", id=1, size=1),
        header(op="rest", id=1),
        header(op="rest", id=1, size=0, pid=5),
        header(op="spawn", id="1", size=1),
        header(op="spawn", id=1, size="1"),
        header(op="resume", id=1, size=1, pid=[5]),
        b"[]",
    ],
    ids=[
        "unknown-op",
        "no-size",
        "extra-key",
        "id-not-int",
        "size-not-int",
        "pid-not-int",
        "not-an-object",
    ],  # fmt: skip
)
def test_a_malformed_request_is_refused(data):
    with pytest.raises(Refused):
        _decode_header(data)


def test_a_request_nested_deeper_than_the_parser_goes_is_refused():
    """json.loads raises RecursionError, no ValueError: it ended the launcher (and with it
    every device) with a traceback."""
    with pytest.raises(Refused, match="a request is not JSON"):
        _decode_header(b"[" * 100_000)


def test_a_spec_nested_deeper_than_the_parser_goes_is_refused():
    with pytest.raises(Refused, match="the request holds no device spec"):
        _decode_spec(b'{"name": ' + b"[" * 100_000)


@pytest.mark.parametrize(
    "data",
    [b"[]", b'{"name": "serial0"}', b'{"name": "serial0\xff"}'],
    ids=["not-an-object", "keys-missing", "not-utf-8"],
)
def test_a_spec_that_is_no_device_spec_is_refused(data):
    """from_json's ValueError and TypeError, which no refusal of the server's loop catches:
    the launcher would end, and every device with it."""
    with pytest.raises(Refused, match="the request holds no device spec"):
        _decode_spec(data)
