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


class StateDocument(Struct, frozen=True):
    model: Annotated[str, schema.MaxLen(64)]
    version: Annotated[int, schema.Range(1, MAX_STATE_VERSION)]
    fields: dict[str, Any]  # the State's, checked by the model's side only


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
