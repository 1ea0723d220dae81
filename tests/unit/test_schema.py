"""The schema codec (protocol/schema.py): each constraint at its edges, round trips, versions,
and fuzzing: random or mutated JSON raises only the caller's error, and every valid record
generated from a schema's own types decodes back to itself."""

from __future__ import annotations

import contextlib
import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypedDict, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitvmm.devprocs.serial import UartState
from splitvmm.errors import ProtocolError, StateError
from splitvmm.monitor.platform import GED_EVENTS
from splitvmm.monitor.vmstate import MAX_CPUID_ENTRIES, VcpuState, VmState
from splitvmm.native.kvm import CpuidEntry
from splitvmm.protocol import codec, control, schema
from splitvmm.protocol.schema import (
    OPTIONAL_KEY,
    U8,
    U32,
    U64,
    FieldTypes,
    Invalid,
    Len,
    MaxLen,
    Multiple,
    Pattern,
    Range,
    Size,
)
from splitvmm.record import Struct, replace
from splitvmm.snapshot.format import (
    MAX_JSON_CHUNK_BYTES,
    ChunkEntry,
    Manifest,
    RegionEntry,
    SnapshotError,
)
from tests.documents import places


class Part(Struct, frozen=True):
    LABEL: ClassVar[str] = "name"
    name: Annotated[str, Pattern("[a-z]{1,8}", "a short name")]
    weight: Annotated[int, U8]


class Pair(TypedDict):
    left: Annotated[int, Range(-5, 5)]
    right: list[bool]


class Plain(
    Struct, frozen=True
):  # a record of another layer's (native/'s CpuidEntry): no Annotated of its own
    a: int
    b: int


class Sample(Struct, frozen=True, kw_only=True):
    gpa: Annotated[int, Range(0, 1 << 52), Multiple(4096)]
    blob: Annotated[bytes, Size(12)]
    area: Annotated[bytes, Len(8, 16, multiple=4)]
    text: Annotated[str, MaxLen(5)]
    kind: Literal["ram", "vm", 7]
    flag: bool
    parts: Annotated[tuple[Part, ...], MaxLen(3)]
    regs: Annotated[dict[Annotated[int, U32], Annotated[int, U64]], MaxLen(4)]
    names: dict[str, Annotated[int, U8]]
    pair: Pair
    fixed: tuple[Annotated[int, U8], str]
    plain: Annotated[Plain, FieldTypes({"a": Annotated[int, U8], "b": Annotated[int, U8]})]
    note: Annotated[str | None, MaxLen(3)]
    extra: Annotated[Annotated[str, MaxLen(3)] | None, OPTIONAL_KEY] = None
    opaque: Any = None
    local: Annotated[int, schema.LOCAL] = 9


SAMPLE = Sample(
    gpa=8192,
    blob=bytes(range(12)),
    area=b"\xff" * 8,
    text="hello",
    kind=7,
    flag=False,
    parts=(Part("ab", 255), Part("cd", 0)),
    regs={0x10: (1 << 64) - 1, 0xC0000080: 0},
    names={"x": 1},
    pair={"left": -5, "right": [True]},
    fixed=(3, "z"),
    plain=Plain(1, 2),
    note=None,
    opaque={"deep": [1, 2.5, None, "s", {"t": True}]},
)


def encoded(**changes: object) -> dict[str, Any]:
    """SAMPLE as JSON gives it back, with top-level keys changed (a value None: removed)."""
    doc = json.loads(json.dumps(schema.encode(SAMPLE)))
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None or k not in changes}


def decode_sample(doc: object) -> Sample:
    return schema.decode(Sample, doc, where="sample", error=StateError)


# --- round trips ----------------------------------------------------------------------------------


def test_schema_sample_roundtrip_through_json_is_lossless():
    assert decode_sample(json.loads(json.dumps(schema.encode(SAMPLE)))) == SAMPLE


def test_schema_encode_writes_plain_json_data():
    doc = schema.encode(SAMPLE)

    assert (doc["blob"], doc["parts"][0], doc["regs"], doc["fixed"], doc["plain"]) == (
        "AAECAwQFBgcICQoL",
        {"name": "ab", "weight": 255},
        {"0x10": (1 << 64) - 1, "0xc0000080": 0},
        [3, "z"],
        {"a": 1, "b": 2},
    )


def test_schema_optional_key_absent_when_none_and_local_never_written():
    doc = schema.encode(SAMPLE)

    assert ("extra" in doc, "local" in doc, doc["note"]) == (False, False, None)


def test_schema_optional_key_present_decodes_its_value():
    assert decode_sample(encoded(extra="abc")).extra == "abc"


def test_schema_local_field_keeps_its_default_on_decode():
    assert decode_sample(encoded()).local == 9


def test_schema_tuples_decode_as_tuples_and_lists_as_lists():
    decoded = decode_sample(encoded())

    assert (type(decoded.parts), type(decoded.fixed), type(decoded.pair["right"])) == (
        tuple,
        tuple,
        list,
    )


# --- each constraint at its edges ------------------------------------------------------------------

ACCEPTED = {
    "gpa_low": {"gpa": 0},
    "gpa_high": {"gpa": (1 << 52) - 4096},
    "blob_exact": {"blob": "A" * 16},
    "area_low": {"area": "A" * 11 + "="},
    "area_high": {"area": "A" * 22 + "=="},
    "text_max": {"text": "12345"},
    "text_empty": {"text": ""},
    "kind_str": {"kind": "vm"},
    "kind_int": {"kind": 7},
    "parts_max": {"parts": [{"name": "a", "weight": 1}] * 3},
    "parts_empty": {"parts": []},
    "regs_max": {"regs": {"0x0": 0, "0x1": 1, "0x2": 2, "0xffffffff": (1 << 64) - 1}},
    "pair_low": {"pair": {"left": -5, "right": []}},
    "pair_high": {"pair": {"left": 5, "right": [False, True]}},
    "note_max": {"note": "abc"},
    "opaque_32_deep": {"opaque": json.loads("[" * 32 + "]" * 32)},
}


@pytest.mark.parametrize("changes", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_schema_edge_value_accepted(changes):
    assert isinstance(decode_sample(encoded(**changes)), Sample)


REFUSED = {
    "gpa_below": ({"gpa": -4096}, "sample: gpa: -4096 is outside 0..4503599627370496"),
    "gpa_above": ({"gpa": (1 << 52) + 4096}, "sample: gpa: 4503599627374592 is outside"),
    "gpa_unaligned": ({"gpa": 4097}, "sample: gpa: 4097 is not a multiple of 4096"),
    "gpa_bool": ({"gpa": False}, "sample: gpa: expected an integer, got a boolean"),
    "gpa_float": ({"gpa": 4096.0}, "sample: gpa: expected an integer, got a number"),
    "blob_short": ({"blob": "A" * 15 + "="}, "sample: blob: expected 12 bytes, got 11"),
    "blob_long": ({"blob": "A" * 18 + "=="}, "sample: blob: expected 12 bytes, got 13"),
    "blob_huge": ({"blob": "A" * 10**6}, "sample: blob: expected 12 bytes, got 1000000 charact"),
    "blob_not_b64": ({"blob": "A" * 15 + "!"}, "sample: blob: not valid base64"),
    "blob_int": ({"blob": 12}, "sample: blob: expected base64 text, got an integer"),
    "area_below": ({"area": "A" * 10 + "=="}, "sample: area: expected 8..16 bytes in whole multip"),
    "area_above": ({"area": "A" * 27 + "="}, "sample: area: expected 8..16 bytes in whole multip"),
    "area_odd": ({"area": "A" * 12}, "sample: area: expected 8..16 bytes in whole multiples of 4"),
    "text_long": ({"text": "123456"}, "sample: text: expected at most 5 characters, got 6"),
    "kind_other": ({"kind": "disk"}, "sample: kind: 'disk' is not one of ram, vm, 7"),
    "kind_bool": ({"kind": True}, "sample: kind: True is not one of ram, vm, 7"),
    "kind_float": ({"kind": 7.0}, "sample: kind: 7.0 is not one of ram, vm, 7"),
    "flag_int": ({"flag": 0}, "sample: flag: expected a boolean, got an integer"),
    "parts_over": ({"parts": [{"name": "a", "weight": 1}] * 4}, "sample: parts: expected at most"),
    "parts_object": ({"parts": {}}, "sample: parts: expected an array, got an object"),
    "part_weight": ({"parts": [{"name": "ab", "weight": 256}]}, "sample: parts['ab'].weight: 256"),
    "part_bad_name": ({"parts": [{"name": "AB", "weight": 1}]}, "sample: parts[0].name: 'AB' is"),
    "part_name_newline": ({"parts": [{"name": "ab\n", "weight": 1}]}, "sample: parts[0].name:"),
    "part_extra": ({"parts": [{"name": "a", "weight": 1, "x": 0}]}, "sample: parts['a']: unknown"),
    "part_missing": ({"parts": [{"name": "a"}]}, "sample: parts['a']: missing key 'weight'"),
    "regs_over": ({"regs": {f"{i:#x}": 0 for i in range(5)}}, "sample: regs: expected at most 4"),
    "regs_key_high": ({"regs": {"0x100000000": 0}}, "sample: regs: key 0x100000000: 4294967296"),
    "regs_key_negative": ({"regs": {"-0x1": 0}}, "sample: regs: key -0x1: -1 is outside 0..2**"),
    "regs_key_decimal": ({"regs": {"16": 0}}, "sample: regs: key '16' is not a lowercase 0x-pref"),
    "regs_key_upper": ({"regs": {"0xA": 0}}, "sample: regs: key '0xA' is not a lowercase 0x-prefi"),
    "regs_key_zeros": ({"regs": {"0x0a": 0}}, "sample: regs: key '0x0a' is not written as 0xa"),
    "regs_value_high": ({"regs": {"0x1": 1 << 64}}, "sample: regs[0x1]: 18446744073709551616 is"),
    "names_value": ({"names": {"x": -1}}, "sample: names['x']: -1 is outside 0..255"),
    "pair_below": ({"pair": {"left": -6, "right": []}}, "sample: pair.left: -6 is outside -5..5"),
    "pair_extra": ({"pair": {"left": 0, "right": [], "up": 1}}, "sample: pair: unknown key 'up'"),
    "pair_item": ({"pair": {"left": 0, "right": [1]}}, "sample: pair.right[0]: expected a boolean"),
    "fixed_short": ({"fixed": [1]}, "sample: fixed: expected an array of 2 items, got an array"),
    "fixed_item": ({"fixed": [256, "z"]}, "sample: fixed[0]: 256 is outside 0..255"),
    "plain_override": ({"plain": {"a": 256, "b": 0}}, "sample: plain.a: 256 is outside 0..255"),
    "note_long": ({"note": "abcd"}, "sample: note: expected at most 3 characters, got 4"),
    "extra_null": ({"extra": None}, "sample: extra: expected a string, got null"),
    "extra_long": ({"extra": "abcd"}, "sample: extra: expected at most 3 characters, got 4"),
    "opaque_33_deep": ({"opaque": json.loads("[" * 33 + "]" * 33)}, "sample: opaque: nested too"),
    "opaque_nan": ({"opaque": [float("nan")]}, "sample: opaque: nan is not JSON"),
    "opaque_bytes": ({"opaque": [b"x"]}, "sample: opaque: a Python bytes is not JSON data"),
    "opaque_int_key": ({"opaque": {1: 2}}, "sample: opaque: object keys must be strings"),
    "unknown_key": ({"zzz": 1}, "sample: unknown key 'zzz'"),
    "local_key": ({"local": 1}, "sample: unknown key 'local'"),
}


@pytest.mark.parametrize(("changes", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_schema_one_past_edge_refused_naming_the_path(changes, message):
    with pytest.raises(StateError, match=f"^{re.escape(message)}"):
        decode_sample({**encoded(), **changes})


def test_schema_missing_key_refused():
    doc = encoded()
    del doc["flag"]

    with pytest.raises(StateError, match="^sample: missing key 'flag'$"):
        decode_sample(doc)


def test_schema_not_an_object_refused():
    with pytest.raises(StateError, match="^sample: expected an object, got an array$"):
        decode_sample([])


def test_schema_error_is_the_callers_class():
    with pytest.raises(SnapshotError, match="^manifest.json: expected an object, got null$"):
        schema.decode(Sample, None, where="manifest.json", error=SnapshotError)


def test_schema_huge_int_is_described_not_printed():
    with pytest.raises(StateError, match="^sample: gpa: an integer of 3322 bits is outside"):
        decode_sample(encoded(gpa=10**1000))


# --- record hooks ---------------------------------------------------------------------------------


class Span(Struct, frozen=True):
    start: Annotated[int, U8]
    end: Annotated[int, U8]

    def validate(self) -> None:
        if self.end < self.start:
            raise Invalid(f"{self.end} is before start {self.start}", at="end")


class Spans(Struct, frozen=True):
    spans: tuple[Span, ...]


def test_schema_validate_refusal_names_its_place():
    doc = {"spans": [{"start": 1, "end": 2}, {"start": 5, "end": 4}]}

    with pytest.raises(ProtocolError, match=r"^spans: spans\[1\].end: 4 is before start 5$"):
        schema.decode(Spans, doc, where="spans", error=ProtocolError)


def test_schema_unsupported_type_is_a_bug_not_data():
    class Floaty(Struct, frozen=True):
        ratio: float

    with pytest.raises(TypeError, match="unsupported type"):
        schema.decode(Floaty, {"ratio": 0.5}, where="f", error=StateError)


def test_schema_constraint_of_another_type_is_a_bug_not_data():
    class Wrong(Struct, frozen=True):
        name: Annotated[str, Range(0, 1)]

    with pytest.raises(TypeError, match="does not apply"):
        schema.decode(Wrong, {"name": "x"}, where="w", error=StateError)


# --- versions -------------------------------------------------------------------------------------


class Versioned(Struct, frozen=True):
    VERSION: ClassVar[int] = 3
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {
        1: lambda d: {"size": d["length"]},  # v2 renamed length to size
        2: lambda d: {**d, "unit": "bytes"},  # v3 added unit
    }
    size: int
    unit: Literal["bytes", "pages"]


def decode_versioned(doc: object, version: int) -> Versioned:
    return schema.decode(Versioned, doc, where="v", error=StateError, version=version)


def test_schema_upgrade_runs_every_step_in_order():
    assert decode_versioned({"length": 4}, version=1) == Versioned(4, "bytes")


def test_schema_current_version_needs_no_step():
    assert decode_versioned({"size": 4, "unit": "pages"}, version=3) == Versioned(4, "pages")


@pytest.mark.parametrize(
    ("doc", "version", "message"),
    [
        ({"size": 1}, 4, "v: version 4 is newer than this splitvmm reads (up to 3): upgrade"),
        ({"size": 1}, 0, "v: version 0 is not a positive integer"),
        ({"size": 1}, True, "v: version True is not a positive integer"),
        ([1], 1, "v: expected an object, got an array"),
        ({"size": 1}, 1, "v: v1 data cannot be upgraded (KeyError: 'length')"),
        ({"length": "x"}, 1, "v: size: expected an integer, got a string"),
    ],
)
def test_schema_upgrade_refuses_bad_version_or_data(doc, version, message):
    with pytest.raises(StateError, match=f"^{re.escape(message)}"):
        decode_versioned(doc, version)


class Gap(Struct, frozen=True):
    VERSION: ClassVar[int] = 2  # and no UPGRADES: v1 cannot be read
    size: int


def test_schema_missing_upgrade_step_refused():
    with pytest.raises(SnapshotError, match=r"^m: no upgrade from v1$"):
        schema.upgrade(Gap, 1, {"size": 1}, what="m", error=SnapshotError)


# --- strict JSON text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"a": 1, "a": 2}', "doc: not valid JSON: duplicate key 'a'"),
        (b"[NaN]", "doc: not valid JSON: NaN is not JSON"),
        (b"[" * 33 + b"]" * 33, "doc: JSON nested too deeply (over 32 levels)"),
        (b"[" * 100_000 + b"]" * 100_000, "doc: JSON nested too deeply"),
        (b"\xff", "doc: not valid JSON"),
    ],
)
def test_schema_loads_refuses_ambiguous_or_deep_json(text, message):
    with pytest.raises(ProtocolError, match=f"^{re.escape(message)}"):
        schema.loads(text, what="doc", error=ProtocolError)


# --- fuzzing --------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=30,
)


def values(tp: object) -> st.SearchStrategy[Any]:
    """Valid values of a schema type, written from the constraints' documented meaning (not
    from the codec's code), so that a disagreement between the two shows up as a failure."""
    base, meta = _split(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        rest = tuple(m for m in meta if m is not OPTIONAL_KEY)
        return st.none() | values(Annotated[(inner, *rest)] if rest else inner)
    if base is Any:
        return JSON
    if origin is Literal:
        return st.sampled_from(args)
    if base is bool:
        return st.booleans()
    if base is int:
        return _ints(meta)
    if base in (str, bytes):
        return _sized(base, meta)
    if origin in (tuple, list) or origin in (dict, Mapping):
        return _collection(base, origin, args, meta)
    return _record(base, meta)


def _split(tp: object) -> tuple[object, tuple[object, ...]]:
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tp.__metadata__  # type: ignore[attr-defined]
    return tp, ()


def _ints(meta: tuple[object, ...]) -> st.SearchStrategy[int]:
    lo = max((m.lo for m in meta if isinstance(m, Range)), default=-(1 << 70))
    hi = min((m.hi for m in meta if isinstance(m, Range)), default=1 << 70)
    step = next((m.n for m in meta if isinstance(m, Multiple)), 1)
    return st.integers(-(-lo // step), hi // step).map(lambda n: n * step)


def _lengths(meta: tuple[object, ...]) -> tuple[int, int | None, int]:
    """(lo, hi or None, multiple) as Size, MaxLen and Len say."""
    lo, hi, multiple = 0, None, 1
    for m in meta:
        if isinstance(m, Size):
            lo = hi = m.n
        elif isinstance(m, MaxLen):
            hi = m.n
        elif isinstance(m, Len):
            lo, hi, multiple = m.lo, m.hi, m.multiple
    return lo, hi, multiple


def _sizes(meta: tuple[object, ...]) -> tuple[int, int, int]:
    """Lengths to generate: the allowed ones, at most 64 past the least (snapshots are big)."""
    lo, hi, multiple = _lengths(meta)
    return lo, min(hi if hi is not None else lo + 6, lo + 64), multiple


def _sized(base: object, meta: tuple[object, ...]) -> st.SearchStrategy[Any]:
    patterns = [m for m in meta if isinstance(m, Pattern)]
    if patterns:  # the pattern bounds the length, and the constraints
        lo, hi, _ = _lengths(meta)
        regex = patterns[0].regex
        strings = st.from_regex(regex, fullmatch=True).filter(lambda s: re.fullmatch(regex, s))
        return strings.filter(lambda s: lo <= len(s) <= (hi if hi is not None else len(s)))
    lo, hi, multiple = _sizes(meta)
    if base is bytes:
        sizes = st.integers(-(-lo // multiple), hi // multiple).map(lambda n: n * multiple)
        return sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n))
    return st.text(min_size=lo, max_size=hi)


def _collection(
    base: object, origin: object, args: tuple[Any, ...], meta: tuple[object, ...]
) -> st.SearchStrategy[Any]:
    lo, hi, _ = _sizes(meta)
    if origin in (dict, Mapping):
        return st.dictionaries(values(args[0]), values(args[1]), min_size=lo, max_size=hi)
    if origin is tuple and args[-1] is not Ellipsis:
        return st.tuples(*map(values, args))
    items = st.lists(values(args[0]), min_size=lo, max_size=hi)
    return items.map(tuple) if origin is tuple else items


def _record(cls: Any, meta: tuple[object, ...], checked: bool = True) -> st.SearchStrategy[Any]:
    """Records whose fields are valid each; `checked`: those that pass validate() too."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for m in meta:
        hints.update(m.types)
    if typing.is_typeddict(cls):
        return st.fixed_dictionaries({k: values(t) for k, t in hints.items()})
    assert issubclass(cls, Struct), cls
    names = [
        n
        for n in cls.__struct_fields__
        if schema.LOCAL not in getattr(hints[n], "__metadata__", ())
    ]
    records = st.builds(cls, **{n: values(hints[n]) for n in names})
    return records.filter(_valid) if checked else records


def _valid(record: Any) -> bool:
    with contextlib.suppress(Invalid):
        getattr(record, "validate", lambda: None)()
        return True
    return False


def _fitted_chunk(c: ChunkEntry) -> ChunkEntry:
    """A chunk made to pass its cross-field checks, which random fields rarely do."""
    return replace(
        c,
        model="serial" if c.kind == "device" else None,
        encoding="sparse-v1" if c.kind == "ram" else None,
        size=c.size % (MAX_JSON_CHUNK_BYTES + 1),
    )


def _fitted_vcpu(v: VcpuState) -> VcpuState:
    """A vCPU with the CPUID leaves 0 and 1 validate() asks for, which random tables lack."""
    leaves = (CpuidEntry(0, 0, 0, 1, 2, 3, 4), CpuidEntry(1, 0, 0, 5, 6, 7, 8))
    return replace(v, cpuid=(*leaves, *v.cpuid)[:MAX_CPUID_ENTRIES])


def _fitted_vm(v: VmState) -> VmState:
    """A VM state whose GED events are ones validate() knows, which random u32s rarely are."""
    return replace(v, ged_events=v.ged_events & GED_EVENTS)


RECORDS = [Sample, Versioned, Spans, VmState, VcpuState, UartState, codec.StateDocument]
RECORDS += [control.Request, control.StateReply, control.Failed, ChunkEntry, RegionEntry]
STRATEGIES = {
    ChunkEntry: _record(ChunkEntry, (), checked=False).map(_fitted_chunk),
    VcpuState: _record(VcpuState, (), checked=False).map(_fitted_vcpu).filter(_valid),
    VmState: _record(VmState, (), checked=False).map(_fitted_vm),
}


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_schema_valid_generated_record_roundtrips(cls, data):
    record = data.draw(STRATEGIES[cls] if cls in STRATEGIES else values(cls))

    text = json.dumps(schema.encode(record))

    assert schema.decode(cls, json.loads(text), where="fuzz", error=StateError) == record


@pytest.mark.parametrize("cls", [*RECORDS, Manifest], ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None)
@given(doc=JSON)
def test_schema_random_json_raises_only_the_chosen_error(cls, doc):
    with contextlib.suppress(SnapshotError):
        record = schema.decode(cls, doc, where="fuzz", error=SnapshotError)
        assert schema.decode(cls, schema.encode(record), where="again", error=StateError) == record


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[path[0]] = _replaced(doc[path[0]], path[1:], value)
    return copy


@settings(max_examples=400, deadline=None)
@given(data=st.data(), value=JSON)
def test_schema_mutated_valid_document_raises_only_the_chosen_error(data, value):
    doc = json.loads(json.dumps(schema.encode(SAMPLE)))
    path = data.draw(st.sampled_from(places(doc)))

    with contextlib.suppress(SnapshotError):
        record = schema.decode(Sample, _replaced(doc, path, value), where="m", error=SnapshotError)
        assert decode_sample(schema.encode(record)) == record


def test_schema_plans_are_built_once_per_type():
    schema.encode(SAMPLE)

    assert schema._plan(Sample) is schema._plan(Sample)


def test_schema_prepare_builds_the_plans_a_later_decode_uses(monkeypatch):
    """What a zygote does before it forks (devprocs/runtime.py prepare_model): a record's
    first decode in its devices builds nothing."""

    class Prepared(Struct, frozen=True):
        name: Annotated[str, MaxLen(8)]
        parts: tuple[Part, ...] = ()

    schema.prepare(Prepared)

    def no_build(tp: object) -> None:
        raise AssertionError(f"a plan built at decode time: {tp}")

    monkeypatch.setattr(schema, "_build", no_build)
    doc = {"name": "x", "parts": [{"name": "ab", "weight": 1}]}
    assert schema.decode(Prepared, doc, where="p", error=StateError) == Prepared(
        "x", (Part("ab", 1),)
    )
