"""Control messages on a device channel: quiesce, save, resume (JSON, never pickle).

A control frame is one byte CONTROL_TAG then a JSON object; access frames are
fixed-size binary (wire.py) and never start with that byte. Requests carry a
sequence number the reply must echo. Everything a device sends is capped and
checked here before the monitor looks at it.
"""

from __future__ import annotations

import json
from typing import Any

from splitvmm.errors import ProtocolError

CONTROL_TAG = 0x10
MAX_CONTROL = 1 << 20  # Firecracker caps snapshot state loads too: a device can't make us eat RAM
REQUESTS = ("quiesce", "save", "resume")
REPLY_TO = {"quiesce": "quiesced", "save": "state", "resume": "resumed"}
MAX_ERROR_TEXT = 200


def is_control(buf: bytes) -> bool:
    return bool(buf) and buf[0] == CONTROL_TAG


def encode(msg: dict[str, Any]) -> bytes:
    return bytes([CONTROL_TAG]) + json.dumps(msg, separators=(",", ":")).encode()


def decode(buf: bytes) -> dict[str, Any]:
    if not is_control(buf):
        raise ProtocolError("not a control frame")
    if len(buf) > MAX_CONTROL:
        raise ProtocolError(f"control frame of {len(buf)} bytes exceeds {MAX_CONTROL}")
    try:
        msg = json.loads(buf[1:])
    except (ValueError, UnicodeDecodeError, RecursionError):  # nesting bombs included
        raise ProtocolError("control frame is not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("control frame is not an object with an op")
    if not isinstance(msg.get("seq"), int) or isinstance(msg.get("seq"), bool):
        raise ProtocolError("control frame has no integer seq")
    return msg


def check_reply(msg: dict[str, Any], request: str, seq: int, model: str) -> dict[str, Any]:
    """Monitor side: the reply to `request` #seq from a device of `model`, or ProtocolError."""
    if msg["seq"] != seq:
        raise ProtocolError(f"reply seq {msg['seq']} to {request} #{seq}")
    if msg["op"] == "error":
        text = str(msg.get("message", ""))[:MAX_ERROR_TEXT]
        raise ProtocolError(f"{request} failed in the device: {text!r}")
    if msg["op"] != REPLY_TO[request]:
        raise ProtocolError(f"reply {msg['op']!r} to {request}")
    if request != "save":
        if set(msg) != {"op", "seq"}:
            raise ProtocolError(f"{msg['op']} reply has extra keys")
        return msg
    return check_state(msg, model)


def check_state(msg: dict[str, Any], model: str) -> dict[str, Any]:
    """A device state document: {model, version, fields}; the fields stay opaque to the monitor."""
    extra = set(msg) - {"op", "seq", "model", "version", "fields"}
    if extra:
        raise ProtocolError(f"state has unknown keys {sorted(extra)}")
    if msg.get("model") != model:
        raise ProtocolError(f"state is for model {msg.get('model')!r}, expected {model!r}")
    version = msg.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 1 << 16:
        raise ProtocolError(f"state version {version!r} is not a small positive integer")
    if not isinstance(msg.get("fields"), dict):
        raise ProtocolError("state fields are not an object")
    return {"model": model, "version": version, "fields": msg["fields"]}
