"""Fault injection (crash testing): a plain-data fault a device process arms and fires.

A fault reaches a device in its spec (`[[device]] fault`, first process only) or in a
`fault` control message (`splitvmm ctl inject-fault`); both are this record, never code:
the launcher refuses specs with code in them (sandbox/launcher.py). It counts the access
frames (reads, writes, host input) the process receives after it is armed, and fires once:

    crash  after frame `after` is answered, the process faults (SIGSEGV)
    delay  the reply to frame `after` (or the first reply after it) waits `delay_ms`
    drop   the reply to frame `after` (or the first reply after it) is never sent
    exit   on receiving frame `after`, before applying it, the process exits (status 3)

One more fails the guest's I/O, not the process, in a model that serves requests
(ModelDescriptor.request_faults: virtio-blk), as QEMU's blkdebug inject-error does. It counts
that model's requests of one kind (`on`: read, write -- discard and write-zeroes too --,
flush, or any of them) instead of frames:

    io-error  request `after` and the `count - 1` after it fail as if the host's disk had
              failed them (IOERR to the guest; nothing of them reaches the disk)

A fault belongs to one process: the process a restart brings up has none unless armed anew.

Why SEGV only: a device process is pid 1 of its own PID namespace (sandbox/device.py), and
the kernel drops a signal that such a process sends itself without a handler, SIGKILL and
SIGABRT included. A fault the CPU raises (a read of address 0) is forced, and kills it;
`ctl crash-device --signal KILL|ABRT|...` sends the others from the monitor.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from splitvmm.errors import ConfigError, SplitvmmError, shown
from splitvmm.protocol import schema
from splitvmm.protocol.models import MODELS
from splitvmm.record import Struct

FAULT_KINDS = ("crash", "delay", "drop", "exit", "io-error")
FAULT_SIGNALS = ("SEGV",)
MAX_DELAY_MS = 10000
EXIT_STATUS = 3  # the status an `exit` fault leaves with: no other path of a device uses it

Kind = Literal["crash", "delay", "drop", "exit", "io-error"]
RequestKind = Literal["any", "read", "write", "flush"]  # what an io-error's `on` may name
REQUEST_KINDS: tuple[str, ...] = get_args(RequestKind)
MAX_COUNT = (1 << 32) - 1
# io-error's fields when not given (every other kind has these): every request, one of them.
# A `ctl inject-fault` request may leave them out.
DEFAULT_ON, DEFAULT_COUNT = "any", 1
DEFAULTS: dict[str, object] = {"on": DEFAULT_ON, "count": DEFAULT_COUNT}


class Fault(Struct, frozen=True):
    kind: Kind
    # the frame it fires at, from 1 (io-error: the request of its kind)
    after: Annotated[int, schema.Range(1, MAX_COUNT)]
    delay_ms: Annotated[int, schema.Range(0, MAX_DELAY_MS)]  # delay only
    signal: Literal["SEGV"]  # crash only
    on: RequestKind  # io-error only: which requests
    count: Annotated[int, schema.Range(1, MAX_COUNT)]  # io-error only: how many fail

    def validate(self) -> None:
        if self.kind == "delay" and self.delay_ms == 0:
            raise schema.Invalid("a delay fault needs delay_ms of 1 or more", "delay_ms")
        if self.kind != "io-error" and (self.on, self.count) != (DEFAULT_ON, DEFAULT_COUNT):
            given = "on" if self.on != DEFAULT_ON else "count"
            raise schema.Invalid("on and count belong to an io-error fault", given)


def decode(data: object, where: str, error: type[SplitvmmError]) -> Fault:
    """The fault in untrusted `data` (a spec's or a control message's), or `error`."""
    return schema.decode(Fault, data, where=where, error=error)


def check_model(
    fault: dict[str, object], model: str, where: str, error: type[SplitvmmError]
) -> None:
    """`error` naming `where` for an io-error on a model that serves no requests
    (ModelDescriptor.request_faults): the config's and `ctl inject-fault`'s one check."""
    if fault["kind"] == "io-error" and not MODELS[model].request_faults:
        raise error(f"{where}: model {model} serves no requests an io-error could fail")


def make(
    kind: str,
    after: int = 1,
    delay_ms: int = 0,
    signal: str = "SEGV",
    on: str = DEFAULT_ON,
    count: int = DEFAULT_COUNT,
) -> dict[str, object]:
    """A fault document from its parts (checked by decode())."""
    return {"kind": kind, "after": after, "delay_ms": delay_ms, "signal": signal, "on": on,
            "count": count}  # fmt: skip


def parse(text: object, where: str) -> dict[str, object]:
    """A config's `fault = "KIND[:after=N][,delay_ms=D][,signal=S][,on=O][,count=C]"`, as a
    checked fault document; ConfigError naming `where` otherwise."""
    if not isinstance(text, str):
        raise ConfigError(f'{where}: expected a string like "crash:after=200", got {shown(text)}')
    # KIND, then its parts: after ':' as written in full, or after ',' when `after` (the
    # first) is left out, as the grammar allows: "delay,delay_ms=300"
    kind, _, rest = text.partition(":") if ":" in text else text.partition(",")
    doc = make(kind.strip())
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in ("after", "delay_ms", "signal", "on", "count"):
            raise ConfigError(
                f"{where}: {shown(item)} is not after=N, delay_ms=D, signal=S, on=O or count=C"
            )
        doc[key.strip()] = _value(key.strip(), value.strip(), where)
    decode(doc, where, ConfigError)
    return doc


def _value(key: str, value: str, where: str) -> object:
    if key == "signal":
        return value.upper().removeprefix("SIG")
    if key == "on":
        return value.lower()  # as signal's case, any
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a whole number, got {shown(value)}") from None
