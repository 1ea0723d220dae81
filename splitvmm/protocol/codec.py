"""Device state documents: `{model, version, fields}`, the fields a State record (schema.py).

A device process writes one when it saves (state_document) and reads one back when it is
restored (state_from_document): an older version is migrated first (the State's UPGRADES),
then every field is checked against the State's types. The monitor keeps the fields opaque:
it only checks the document's shape (control.py).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from splitvmm.errors import StateError, shown
from splitvmm.protocol import schema
from splitvmm.record import Struct

S = TypeVar("S")
MAX_STATE_VERSION = (1 << 16) - 1
# How deep a document's fields may nest (the fields object itself is 1): a spawn spec holds
# the document two levels down (spec -> state -> fields), and the spec is JSON of at most
# schema.MAX_DEPTH levels. Fields the channel allowed (one level less deep) made a snapshot
# the monitor wrote as sound, and that no process could ever be started from.
MAX_FIELDS_DEPTH = schema.MAX_DEPTH - 2


class StateDocument(Struct, frozen=True):
    model: Annotated[str, schema.MaxLen(64)]
    version: Annotated[int, schema.Range(1, MAX_STATE_VERSION)]
    fields: dict[str, Any]  # the State's, checked by the model's side only


def check_fields_depth(fields: object, where: str, error: type[Exception]) -> None:
    """`error` if `fields` nests deeper than MAX_FIELDS_DEPTH (an iterative walk)."""
    stack = [(fields, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_FIELDS_DEPTH:
            raise error(f"{where}: fields nest deeper than {MAX_FIELDS_DEPTH} levels")
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def state_document(model: str, state: Any) -> dict[str, object]:
    return {"model": model, "version": type(state).VERSION, "fields": schema.encode(state)}


def state_from_document(model: str, cls: type[S], doc: object) -> S:
    """The State of a `{model, version, fields}` document, migrated from older versions."""
    where = f"{model} state"
    document = schema.decode(StateDocument, doc, where=where, error=StateError)
    if document.model != model:
        raise StateError(
            f"{where}: the document is for model {shown(document.model)}, not for model {model!r}"
        )
    # DeviceState.migrate walks the State's UPGRADES (schema.upgrade); a model may override it.
    fields = cls.migrate(document.version, document.fields)  # type: ignore[attr-defined]
    return schema.decode(cls, fields, where=where, error=StateError)
