"""The monitor's decoder of launcher messages (sandbox/launcher.py): anything else is a
ValueError, which marks the launcher broken, never another exception."""

import pytest

from splitvmm.sandbox.launcher import _decode_reply


@pytest.mark.parametrize(
    "data",
    [b'{"op": []}', b'{"op": {}}', b'{"op": 1}', b"{}", b"[]"],
    ids=["list-op", "object-op", "int-op", "no-op", "not-an-object"],
)
def test_decode_reply_op_not_a_known_name_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="unknown message"):
        _decode_reply(data, [])
