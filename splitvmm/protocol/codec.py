"""Device state <-> JSON, strict: walks the State dataclass's fields and types.

ints, bools and str go as themselves, bytes as base64, tuples as lists. On the
way back every field must be present with exactly its type; unknown keys are
refused. This runs in the device process (restore) and in tests; the monitor
keeps device states opaque.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import typing
from typing import Any

from splitvmm.errors import StateError

SCALARS = {"int": int, "bool": bool, "str": str}


def _encode_value(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    return value


def encode_fields(state: Any) -> dict[str, object]:
    return {f.name: _encode_value(getattr(state, f.name)) for f in dataclasses.fields(state)}


def _decode_value(name: str, kind: object, value: object) -> object:
    if kind is bytes:
        if not isinstance(value, str):
            raise StateError(f"field {name}: expected base64 text, got {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise StateError(f"field {name}: not valid base64") from None
    expected = kind if isinstance(kind, type) else None
    if expected in (int, bool, str):
        # bool is an int subclass: an int field must not take True, nor a bool field 1.
        if type(value) is not expected:
            raise StateError(f"field {name}: expected {expected.__name__}, got {value!r}")
        return value
    raise StateError(f"field {name}: unsupported type {kind!r}")


def decode_fields(cls: type, fields: object) -> dict[str, object]:
    """Checked keyword arguments for `cls` from a JSON object."""
    if not isinstance(fields, dict):
        raise StateError(f"{cls.__name__}: fields are not an object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = set(fields) - names, names - set(fields)
    if unknown or missing:
        raise StateError(
            f"{cls.__name__}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}"
        )
    return {name: _decode_value(name, hints[name], fields[name]) for name in sorted(names)}


def state_document(model: str, state: Any) -> dict[str, object]:
    return {"model": model, "version": type(state).VERSION, "fields": encode_fields(state)}


def state_from_document(model: str, cls: type, doc: object) -> Any:
    """The State of a `{model, version, fields}` document, migrated from older versions."""
    if not isinstance(doc, dict) or doc.get("model") != model:
        raise StateError(f"state document is not for model {model!r}")
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= cls.VERSION:
        raise StateError(f"{model}: state version {version!r} is not one this release reads")
    fields = doc.get("fields")
    if not isinstance(fields, dict):
        raise StateError(f"{model}: state fields are not an object")
    return cls(**decode_fields(cls, cls.migrate(version, dict(fields))))
