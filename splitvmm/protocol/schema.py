"""One strict codec for every document that crosses a trust boundary: device and vCPU/VM
states, the snapshot manifest, control messages.

A record is a frozen msgspec.Struct (or a TypedDict, decoded to a plain dict) whose field types
say everything the codec checks, through typing.Annotated:

    class Region(Struct, frozen=True):
        gpa: Annotated[int, Range(0, 1 << 52), Multiple(4096)]
        data: Annotated[bytes, Size(512)]            # base64 of exactly 512 bytes
        name: Annotated[str, Pattern(r"[a-z]{1,8}", "a short name")]
        parts: Annotated[tuple[Part, ...], MaxLen(256)]
        regs: Annotated[dict[Annotated[int, U32], Annotated[int, U64]], MaxLen(1024)]
        note: str | None                             # the key must be there; null is None

Types: bool, int, str, bytes (base64 text), Literal[...], X | None, tuple[X, ...],
tuple[X, Y], list[X], dict[str | int, X] (int keys as canonical "0x1f" text), records, and
Any (opaque JSON data, nested at most MAX_DEPTH deep). encode(record) gives plain JSON-able
data; decode(cls, data, where=..., error=...) gives the record back, or raises `error` (the
caller's: StateError, SnapshotError, ProtocolError) with one line naming the place:
"VcpuState: lapic: expected 1024 bytes, got 12". Unknown and missing keys, a bool for an int,
a value out of range, a collection over its bound, nesting deeper than the type: all refused.
encode trusts its record (our own state); decode is the checkpoint.

What a record class may declare:
- VERSION and UPGRADES {from_version: step(dict) -> dict of from_version + 1}:
  decode(..., version=N) upgrades an older document before checking it.
- LABEL = "name": in error messages, an item of a tuple of these records is named by that
  field ("chunks['vcpu0'].size") rather than by its index, when the field is valid.
- validate(self): cross-field invariants, raising Invalid; decode calls it on every record
  it builds (code that builds records itself is trusted).
- A field typed Annotated[X, LOCAL] is not part of the document (never written, never read:
  it keeps its default). Annotated[X | None, OPTIONAL_KEY]: the key may be absent, which means
  None, and None is written by leaving the key out.

Plans (one encoder and one decoder per type) are built once per class and cached: snapshot
pause and restore go through here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union

from splitvmm.errors import SplitvmmError, clip, shown
from splitvmm.record import Struct

MAX_DEPTH = 32  # of an Any value: ours nest at most 4 deep (vm_config.device[i].option)
NONE = type(None)
R = TypeVar("R")
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


# --- constraints ---------------------------------------------------------------------------------


class Range(Struct, frozen=True):
    """An int from lo to hi, both included."""

    lo: int
    hi: int


U8, U16 = Range(0, (1 << 8) - 1), Range(0, (1 << 16) - 1)
U32, U64 = Range(0, (1 << 32) - 1), Range(0, (1 << 64) - 1)


class Multiple(Struct, frozen=True):
    """An int that is a multiple of n (an aligned address)."""

    n: int


class Size(Struct, frozen=True):
    """Exactly n bytes (of bytes), characters (of str) or items (of a collection)."""

    n: int


class MaxLen(Struct, frozen=True):
    """At most n bytes, characters, items or entries."""

    n: int


class Len(Struct, frozen=True):
    """From lo to hi bytes, characters, items or entries, in whole multiples of `multiple`."""

    lo: int
    hi: int
    multiple: int = 1


class Pattern(Struct, frozen=True):
    """A str that re.fullmatch()es `regex`; `description` says what it must be, for the
    message: "'a/b' is not a chunk name (1-63 letters, digits, '_', '.' or '-')"."""

    regex: str
    description: str


class FieldTypes(Struct, frozen=True):
    """On a record from a layer that cannot import this module (native/): the types to read
    its fields as, e.g. Annotated[CpuidEntry, FieldTypes({"eax": Annotated[int, U32], ...})]."""

    types: Mapping[str, Any]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


OPTIONAL_KEY = _Marker("OPTIONAL_KEY")
LOCAL = _Marker("LOCAL")


class Invalid(Exception):
    """A value the schema refuses. decode() turns it into the caller's error, prefixed with
    where it is; a record's validate() and an upgrade step raise it to refuse data."""

    def __init__(self, problem: str, at: str = "") -> None:
        """`at`: where in the record that raises it ("size", "chunks['vm']"), if not all of it."""
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = [f".{at}"] if at else []  # innermost first: ".size", "[3]"


# --- entry points --------------------------------------------------------------------------------


def encode(record: object) -> Any:
    """Plain JSON-able data for a record: objects, lists, ints, str (bytes as base64)."""
    return _plan(type(record)).encode(record)


def decode(
    cls: type[R],
    data: object,
    *,
    where: str,
    error: type[SplitvmmError],
    version: int | None = None,
) -> R:
    """The record of untrusted `data` (as json.loads gives it), upgraded first from `version`
    when given (cls.UPGRADES), or `error` with one line: "{where}: {path}: {problem}"."""
    plan = _plan(cls)
    try:
        if version is not None:
            data = _upgrade(cls, version, data, where)
        return typing.cast(R, plan.decode(data))
    except Invalid as e:
        raise error(_message(where, e)) from None


def prepare(*classes: type) -> None:
    """Build the decoding plans of `classes` now, for the processes this one forks (a zygote:
    devprocs/runtime.py prepare_model), which then start with them instead of building each
    at its first decode."""
    for cls in classes:
        _plan(cls)


def upgrade(
    cls: type, version: object, data: object, *, what: str, error: type[SplitvmmError]
) -> dict[str, Any]:
    """`data` of `version` brought to cls.VERSION through cls.UPGRADES, one step at a time;
    `error` if the version is not one this release reads."""
    try:
        return _upgrade(cls, version, data, what)
    except Invalid as e:
        raise error(_message(what, e)) from None


def loads(data: bytes, *, what: str, error: type[SplitvmmError]) -> Any:
    """Untrusted JSON text: no duplicate keys, no NaN or Infinity, nested at most MAX_DEPTH
    deep; `error` naming `what` otherwise."""
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(clip(f"{what}: not valid JSON: {e}")) from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    # json.loads stops near the interpreter's recursion limit; what nests just below it would
    # still break whatever walks it recursively later (repr, deepcopy, json.dumps).
    try:
        _any_json(doc)
    except Invalid as e:
        raise error(f"{what}: JSON {e.problem}") from None
    return doc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {shown(key)}")
        doc[key] = value
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _upgrade(cls: type, version: object, data: object, what: str) -> dict[str, Any]:
    current: int = getattr(cls, "VERSION", 1)
    if type(version) is not int or version < 1:
        raise Invalid(f"version {shown(version)} is not a positive integer")
    if version > current:
        raise Invalid(
            f"version {version} is newer than this splitvmm reads (up to {current}): "
            "upgrade splitvmm"
        )
    if type(data) is not dict:
        raise Invalid(f"expected an object, got {_kind(data)}")
    steps: Mapping[int, Upgrade] = getattr(cls, "UPGRADES", {})
    doc = dict(data)
    for v in range(version, current):
        step = steps.get(v)
        if step is None:
            raise Invalid(f"no upgrade from v{v}")
        try:
            doc = step(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # A step may assume an object and nothing more: what it trips on is bad data.
            raise Invalid(f"v{v} data cannot be upgraded ({type(e).__name__}: {e})") from None
    return doc


def _message(where: str, e: Invalid) -> str:
    path = "".join(reversed(e.path)).removeprefix(".")
    return clip(f"{where}: {path}: {e.problem}" if path else f"{where}: {e.problem}")


# --- plans ---------------------------------------------------------------------------------------

Encoder = Callable[[Any], Any]
Decoder = Callable[[Any], Any]


class _Plan(Struct, frozen=True):
    encode: Encoder
    decode: Decoder
    label: Callable[[Any], str | None] | None = None  # a record item's name (LABEL)


_PLANS: dict[object, _Plan] = {}


def _plan(tp: object) -> _Plan:
    try:
        return _PLANS[tp]
    except KeyError:
        plan = _PLANS[tp] = _build(tp)
        return plan
    except TypeError:  # unhashable metadata (FieldTypes): built each time, cached by its record
        return _build(tp)


def _split(tp: object) -> tuple[object, tuple[object, ...]]:
    """(the bare type, its Annotated constraints)."""
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tp.__metadata__  # type: ignore[attr-defined]
    return tp, ()


def _build(tp: object) -> _Plan:
    base, meta = _split(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (Union, types.UnionType):
        return _optional(base, args, meta)
    if base is Any or base is object:
        _only(meta, (), tp)
        return _Plan(_same, _any_json)
    if origin is Literal:
        _only(meta, (), tp)
        return _Plan(_same, _literal(args))
    builder = _BUILDERS.get(origin or base)
    if builder is not None:
        return builder(base, args, meta)
    if isinstance(base, type) and issubclass(base, Struct):
        return _record(base, meta)
    if isinstance(base, type) and typing.is_typeddict(base):
        _only(meta, (), tp)
        return _typed_dict(base)
    raise TypeError(f"schema: unsupported type {tp!r}")


def _only(meta: tuple[object, ...], allowed: tuple[type, ...], tp: object) -> None:
    """A constraint that means nothing for this type is a bug in the record, not data."""
    for m in meta:
        if not isinstance(m, allowed):
            raise TypeError(f"schema: {m!r} does not apply to {tp!r}")


def _same(value: Any) -> Any:
    return value


def _kind(value: object) -> str:
    """A JSON value's kind, for a message."""
    return _KINDS.get(type(value), f"a Python {type(value).__name__}")


_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    NONE: "null",
}


def _int_text(value: int) -> str:
    """str() of an int is quadratic in its digits: a huge one is described instead."""
    return str(value) if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"


def _bound(n: int | None) -> str:
    if n is None:
        return ""
    return f"2**{n.bit_length()}-1" if n >= 1 << 16 and not n & (n + 1) else str(n)


# --- scalars -------------------------------------------------------------------------------------


def _bool(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    _only(meta, (), base)

    def dec(value: Any) -> bool:
        if type(value) is not bool:
            raise Invalid(f"expected a boolean, got {_kind(value)}")
        return value

    return _Plan(_same, dec)


def _int(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    _only(meta, (Range, Multiple), base)
    ranges = [m for m in meta if isinstance(m, Range)]
    lo = max((r.lo for r in ranges), default=None)
    hi = min((r.hi for r in ranges), default=None)
    step = math.lcm(*(m.n for m in meta if isinstance(m, Multiple)))
    outside = f"is outside {_bound(lo)}..{_bound(hi)}"

    def dec(value: Any) -> int:
        if type(value) is not int:  # bool is an int subclass: refused too
            raise Invalid(f"expected an integer, got {_kind(value)}")
        if ranges and not lo <= value <= hi:  # type: ignore[operator]
            raise Invalid(f"{_int_text(value)} {outside}")
        if value % step:
            raise Invalid(f"{_int_text(value)} is not a multiple of {step}")
        return value

    def dec_range(value: Any) -> int:  # the common case, on its own: snapshots hold thousands
        if type(value) is not int or not lo <= value <= hi:  # type: ignore[operator]
            return dec(value)
        return value

    return _Plan(int, dec_range if ranges and step == 1 else dec)


def _lengths(meta: tuple[object, ...]) -> tuple[int, int | None, int]:
    """(lo, hi or None, multiple) from Size, MaxLen and Len."""
    lo, hi, multiple = 0, None, 1
    for m in meta:
        if isinstance(m, Size):
            lo, hi = m.n, m.n
        elif isinstance(m, MaxLen):
            hi = m.n
        elif isinstance(m, Len):
            lo, hi, multiple = m.lo, m.hi, m.multiple
    return lo, hi, multiple


def _length_check(meta: tuple[object, ...], unit: str) -> tuple[Callable[[int], None], str]:
    """(a check of a length against Size/MaxLen/Len, what it wants: "8..16 bytes")."""
    lo, hi, multiple = _lengths(meta)
    if hi is None:
        want = f"at least {lo} {unit}"
    elif lo == hi:
        want = f"{lo} {unit}"
    else:
        want = f"at most {hi} {unit}" if lo == 0 else f"{lo}..{hi} {unit}"
    if multiple > 1:
        want += f" in whole multiples of {multiple}"

    def check(n: int) -> None:
        if n < lo or (hi is not None and n > hi) or n % multiple:
            raise Invalid(f"expected {want}, got {n}")

    return check, want


_LENGTHS = (Size, MaxLen, Len)


def _str(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    _only(meta, (*_LENGTHS, Pattern), base)
    check, _ = _length_check(meta, "characters")
    patterns = [(re.compile(m.regex), m.description) for m in meta if isinstance(m, Pattern)]

    def dec(value: Any) -> str:
        if type(value) is not str:
            raise Invalid(f"expected a string, got {_kind(value)}")
        check(len(value))
        for regex, description in patterns:
            if not regex.fullmatch(value):
                raise Invalid(f"{shown(value)} is not {description}")
        return value

    return _Plan(_same, dec)


def _bytes(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    _only(meta, _LENGTHS, base)
    check, want = _length_check(meta, "bytes")
    _, hi, _ = _lengths(meta)
    max_text = None if hi is None else 4 * ((hi + 2) // 3) + 4  # + 4: slack for bad padding

    def dec(value: Any) -> bytes:
        if type(value) is not str:
            raise Invalid(f"expected base64 text, got {_kind(value)}")
        if max_text is not None and len(value) > max_text:  # refused before it is decoded
            raise Invalid(f"expected {want}, got {len(value)} characters of base64")
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise Invalid("not valid base64") from None
        check(len(raw))
        return raw

    return _Plan(_b64, dec)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _literal(choices: tuple[object, ...]) -> Decoder:
    names = ", ".join(str(c) for c in choices)

    def dec(value: Any) -> Any:
        for choice in choices:  # by type too: True == 1, but a bool is not the int 1
            if type(value) is type(choice) and value == choice:
                return choice
        raise Invalid(f"{shown(value)} is not one of {names}")

    return dec


def _any_json(value: Any) -> Any:
    """Opaque JSON data: a walk (iterative, no recursion) that checks it is JSON and no
    deeper than MAX_DEPTH, so whatever walks it later recursively cannot blow the stack."""
    _json_scalar(value)
    stack = [(value, 1)] if type(value) in (dict, list) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Invalid(f"nested too deeply (over {MAX_DEPTH} levels)")
        if type(item) is dict:
            if not all(type(k) is str for k in item):
                raise Invalid("object keys must be strings")
            item = item.values()
        for v in item:
            kind = type(v)
            if kind is dict or kind is list:
                stack.append((v, depth + 1))
            elif kind is not str and kind is not int:
                _json_scalar(v)
    return value


def _json_scalar(value: Any) -> None:
    kind = type(value)
    if kind is float and not math.isfinite(value):
        raise Invalid(f"{value} is not JSON")
    if kind not in (dict, list, str, int, bool, float, NONE):
        raise Invalid(f"{_kind(value)} is not JSON data")


def _optional(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    """X | None, with X's constraints."""
    inner = [a for a in args if a is not NONE]
    if len(inner) != 1 or len(args) != 2:
        raise TypeError(f"schema: only X | None unions are supported, not {base!r}")
    plan = _plan(Annotated[(inner[0], *meta)] if meta else inner[0])
    enc, dec = plan.encode, plan.decode
    return _Plan(
        lambda value: None if value is None else enc(value),
        lambda value: None if value is None else dec(value),
    )


# --- collections ---------------------------------------------------------------------------------


def _items(plan: _Plan, items: list[Any]) -> list[Any]:
    """Each item decoded; an error names the item by its LABEL or its index."""
    dec, out = plan.decode, []
    for i, item in enumerate(items):
        try:
            out.append(dec(item))
        except Invalid as e:
            label = plan.label(item) if plan.label is not None else None
            e.path.append(f"[{shown(label)}]" if label is not None else f"[{i}]")
            raise
    return out


def _sequence(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    _only(meta, _LENGTHS, base)
    if not args:
        raise TypeError(f"schema: {base!r} needs its item type")
    check, _ = _length_check(meta, "items")
    make = tuple if typing.get_origin(base) is tuple else list
    if make is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        _only(meta, (), base)
        return _fixed_tuple(args)
    item = _plan(args[0])
    enc = item.encode

    def dec(value: Any) -> Any:
        if type(value) is not list:
            raise Invalid(f"expected an array, got {_kind(value)}")
        check(len(value))
        return make(_items(item, value))

    return _Plan(lambda value: [enc(v) for v in value], dec)


def _fixed_tuple(args: tuple[object, ...]) -> _Plan:
    plans = [_plan(a) for a in args]

    def dec(value: Any) -> tuple[Any, ...]:
        if type(value) is not list or len(value) != len(plans):
            raise Invalid(f"expected an array of {len(plans)} items, got {_kind(value)}")
        out = []
        for i, (plan, item) in enumerate(zip(plans, value, strict=True)):
            try:
                out.append(plan.decode(item))
            except Invalid as e:
                e.path.append(f"[{i}]")
                raise
        return tuple(out)

    return _Plan(lambda value: [p.encode(v) for p, v in zip(plans, value, strict=True)], dec)


_HEX_KEY = re.compile(r"-?0x[0-9a-f]{1,32}")


def _int_key(plan: _Plan) -> tuple[Encoder, Decoder]:
    """An int key is written as its canonical hex ("0x1f"): MSR and XCR indices read best so;
    one spelling per key, so two spellings of one index cannot both appear."""

    def dec(key: Any) -> int:
        if type(key) is not str or not _HEX_KEY.fullmatch(key):
            raise Invalid(f"key {shown(key)} is not a lowercase 0x-prefixed hex number")
        value = int(key, 16)
        if format(value, "#x") != key:
            raise Invalid(f"key {shown(key)} is not written as {value:#x}")
        try:
            return typing.cast(int, plan.decode(value))
        except Invalid as e:
            raise Invalid(f"key {key}: {e.problem}") from None

    return (lambda key: format(key, "#x")), dec


def _str_key(plan: _Plan) -> tuple[Encoder, Decoder]:
    def dec(key: Any) -> str:
        try:
            return typing.cast(str, plan.decode(key))
        except Invalid as e:
            raise Invalid(f"key {shown(key)}: {e.problem}") from None

    return _same, dec


def _quoted(key: str) -> str:
    return f"[{shown(key)}]"


def _dict(base: object, args: tuple[object, ...], meta: tuple[object, ...]) -> _Plan:
    _only(meta, _LENGTHS, base)
    check, _ = _length_check(meta, "entries")
    key_type, value_type = args if args else (str, Any)
    key_plan, value = _plan(key_type), _plan(value_type)
    bare_key = _split(key_type)[0]
    where: Callable[[Any], str]  # how an entry is named in a message
    if bare_key is int:
        enc_key, dec_key = _int_key(key_plan)
        where = "[{}]".format  # msrs[0xc0000080]
    elif bare_key is str:
        enc_key, dec_key = _str_key(key_plan)
        where = _quoted  # names['x']
    else:
        raise TypeError(f"schema: dict keys must be int or str, not {key_type!r}")
    enc, dec_value = value.encode, value.decode

    def dec(data: Any) -> dict[Any, Any]:
        if type(data) is not dict:
            raise Invalid(f"expected an object, got {_kind(data)}")
        check(len(data))
        out = {}
        for k, v in data.items():
            key = dec_key(k)
            try:
                out[key] = dec_value(v)
            except Invalid as e:
                e.path.append(where(k))
                raise
        return out

    return _Plan(lambda data: {enc_key(k): enc(v) for k, v in data.items()}, dec)


# --- records -------------------------------------------------------------------------------------


class _Field(Struct, frozen=True):
    name: str
    plan: _Plan
    optional_key: bool  # may be absent (None), written only when not None


def _fields(hints: Mapping[str, Any], names: list[str]) -> list[_Field]:
    out = []
    for name in names:
        base, meta = _split(hints[name])
        if OPTIONAL_KEY not in meta:
            out.append(_Field(name, _plan(hints[name]), False))
            continue
        # Absent is the one spelling of None: a present key must hold a value.
        inner = [a for a in typing.get_args(base) if a is not NONE]
        if len(inner) != 1 or NONE not in typing.get_args(base):
            raise TypeError(f"schema: {name}: OPTIONAL_KEY needs an X | None type")
        rest = tuple(m for m in meta if m is not OPTIONAL_KEY)
        out.append(_Field(name, _plan(Annotated[(inner[0], *rest)] if rest else inner[0]), True))
    return out


def _keys_wrong(data: dict[Any, Any], every: frozenset[str], required: frozenset[str]) -> Invalid:
    """The unknown key or the missing key, first in sorted order."""
    unknown = sorted(data.keys() - every, key=repr)
    if unknown:
        return Invalid(f"unknown key {shown(unknown[0])}")
    return Invalid(f"missing key {sorted(required - data.keys())[0]!r}")


def _object(fields: list[_Field], get: Callable[[Any, str], Any]) -> tuple[Encoder, Decoder]:
    """(record -> dict, dict -> field values) over exactly these keys; `get` reads a field."""
    every = frozenset(f.name for f in fields)
    required = frozenset(f.name for f in fields if not f.optional_key)
    decoders = [(f.name, f.plan.decode, f.optional_key) for f in fields]
    encoders = [(f.name, f.plan.encode, f.optional_key) for f in fields]

    def dec(data: Any) -> dict[str, Any]:
        if type(data) is not dict:
            raise Invalid(f"expected an object, got {_kind(data)}")
        if data.keys() != required and not required <= data.keys() <= every:
            raise _keys_wrong(data, every, required)
        out = {}
        try:  # one try for the loop: this runs for every record of a snapshot
            for name, decode_field, optional in decoders:
                out[name] = None if optional and name not in data else decode_field(data[name])
        except Invalid as e:
            e.path.append(f".{name}")
            raise
        return out

    def enc(record: Any) -> dict[str, Any]:
        out = {}
        for name, encode_field, optional in encoders:
            value = get(record, name)
            if value is not None or not optional:
                out[name] = encode_field(value)
        return out

    return enc, dec


def _record(cls: type[Struct], meta: tuple[object, ...]) -> _Plan:
    _only(meta, (FieldTypes,), cls)
    hints = dict(typing.get_type_hints(cls, include_extras=True))
    for m in meta:
        hints.update(typing.cast(FieldTypes, m).types)
    names = [n for n in cls.__struct_fields__ if LOCAL not in _split(hints[n])[1]]
    fields = _fields(hints, names)
    enc, dec_fields = _object(fields, getattr)
    validate: Callable[[Any], None] | None = getattr(cls, "validate", None)

    def dec(data: Any) -> Any:
        record = cls(**dec_fields(data))
        if validate is not None:
            validate(record)
        return record

    return _Plan(enc, dec, _labeller(cls, fields))


def _labeller(cls: type, fields: list[_Field]) -> Callable[[Any], str | None] | None:
    """The record's LABEL field as a name for it in messages, if that field is valid."""
    name = getattr(cls, "LABEL", None)
    if name is None:
        return None
    plan = next(f.plan for f in fields if f.name == name)

    def label(data: Any) -> str | None:
        if type(data) is not dict or type(data.get(name)) is not str:
            return None
        try:
            return typing.cast(str, plan.decode(data[name]))
        except Invalid:
            return None

    return label


def _typed_dict(cls: type) -> _Plan:
    hints = typing.get_type_hints(cls, include_extras=True)
    return _Plan(*_object(_fields(hints, list(hints)), dict.__getitem__))


_BUILDERS: dict[object, Callable[[object, tuple[object, ...], tuple[object, ...]], _Plan]] = {
    bool: _bool,
    int: _int,
    str: _str,
    bytes: _bytes,
    tuple: _sequence,
    list: _sequence,
    dict: _dict,
    Mapping: _dict,
}
