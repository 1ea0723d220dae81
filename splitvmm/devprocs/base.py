"""The device contract: a pure register state machine plus its saved state.

A device model never touches sockets, processes or the channel: the runtime
(runtime.py) feeds it accesses and host input, and it talks back only through
its DeviceContext (an irq trigger, a bounded output buffer).
"""

from __future__ import annotations

import abc
import importlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

from splitvmm.devprocs.output import BoundedOutput
from splitvmm.errors import StateError
from splitvmm.protocol import schema
from splitvmm.protocol.models import MODELS


class Trigger(Protocol):
    def trigger(self) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState:
    """Plain data (ints, bools, bytes, str, tuples, records; protocol/schema.py types, with
    their bounds): untrusted when read back. A field change bumps VERSION and adds the step
    from the old version to UPGRADES (it gets and gives the JSON fields: bytes are base64)."""

    VERSION: ClassVar[int] = 1
    UPGRADES: ClassVar[Mapping[int, schema.Upgrade]] = {}

    @classmethod
    def migrate(cls, version: int, fields: dict[str, object]) -> dict[str, object]:
        """Fields of `version` as fields of VERSION: UPGRADES, one step at a time."""
        return schema.upgrade(cls, version, fields, what=cls.__name__, error=StateError)


@dataclass(slots=True)
class Counters:
    """Guest mistakes we tolerate but count (bad sizes, unknown registers, overruns)."""

    bad_access: int = 0
    rx_overrun: int = 0
    tx_dropped: int = 0  # output written with no room for it (a driver that did not wait)


class RateLimitedLog:
    """A guest mistake is logged at most once a second per kind (STYLE 7): a guest that
    repeats it cannot flood the operator's terminal."""

    INTERVAL_S = 1.0

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._clock = clock
        self._last: dict[str, float] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last.get(kind, -self.INTERVAL_S) >= self.INTERVAL_S:
            self._last[kind] = now
            self._log.warning(msg, *args)


@dataclass(slots=True)
class DeviceContext:
    """Host resources handed to a device; never part of its state."""

    irq: Trigger
    out: BoundedOutput = field(default_factory=BoundedOutput)
    counters: Counters = field(default_factory=Counters)


class Device(abc.ABC):
    NAME: ClassVar[str]  # model name: module, policy, config `model` and log name
    WINDOW: ClassVar[int]  # bytes of PIO/MMIO space the device decodes
    State: ClassVar[type[DeviceState]]
    # fd roles whose whole file the model maps (guest RAM, for a virtio device): their sizes
    # add to the address space its process may use (runtime.address_space_limit).
    MAPPED_FDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """len(result) == size; the runtime guarantees offset + size <= WINDOW."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None: ...

    def host_input(self, data: bytes) -> None:
        """Bytes from the host side of a console device (keyboard, socket)."""
        self.ctx.counters.bad_access += 1

    def output_room(self) -> None:
        """The output line took buffered bytes (ctx.out): there is room again."""
        return None  # deliberately empty: optional for devices without output

    def quiesce(self) -> None:
        """Snapshot step 2: stop taking work from guest queues and finish what is in flight,
        or record it in the state so that restore() re-runs it. Until resume(), the device
        still answers register accesses. A register-only device has nothing to do."""
        return None  # deliberately empty: optional for devices without queues

    def resume(self) -> None:
        """After a snapshot: take work from the guest's queues again."""
        return None  # deliberately empty: optional for devices without queues

    @abc.abstractmethod
    def save(self) -> DeviceState:
        """The device's state; called only between quiesce() and resume()."""

    @classmethod
    @abc.abstractmethod
    def restore(cls, ctx: DeviceContext, state: Any) -> Self: ...


REGISTRY: dict[str, type[Device]] = {}


def register(cls: type[Device]) -> type[Device]:
    """Register a model; it must match its descriptor (protocol/models.py), which is all the
    monitor knows of it: a model and its descriptor that disagree fail at import, in tests."""
    descriptor = MODELS.get(cls.NAME)
    if descriptor is None:
        raise TypeError(f"{cls.__name__}: no descriptor {cls.NAME!r} in protocol.models.MODELS")
    if cls.WINDOW != descriptor.transport.size:
        raise TypeError(f"{cls.__name__}: WINDOW {cls.WINDOW} != its descriptor's window")
    if cls.State.VERSION != descriptor.state_version:
        raise TypeError(f"{cls.__name__}: State.VERSION != its descriptor's state_version")
    REGISTRY[cls.NAME] = cls
    return cls


def load_model(name: str) -> type[Device]:
    """The model class for a descriptor name: its module is splitvmm.devprocs.<name>
    (STYLE 6: the name is the key everywhere). Names come from the monitor's spec and
    must be a descriptor's, never anything else."""
    if name not in MODELS:
        raise StateError(f"unknown device model {name!r}")
    if name not in REGISTRY:
        importlib.import_module(f"splitvmm.devprocs.{name}")
    return REGISTRY[name]


def load_all_models() -> dict[str, type[Device]]:
    """Every model with a descriptor (the policy checker, the conformance tests)."""
    return {name: load_model(name) for name in MODELS}
