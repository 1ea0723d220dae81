"""A test-only device with requests in flight, to hold the snapshot contract to account.

The guest submits request ids by writing them to offset 0 (as a virtio driver
puts descriptors on a ring and kicks); an asynchronous backend completes them
later. On quiesce() the device stops taking new requests (they stay queued,
as they would stay in a ring in guest memory), finishes what the backend can
finish, and records what it cannot; restore() re-runs the recorded requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Self

from splitvmm.devprocs.base import Device, DeviceContext, DeviceState
from splitvmm.errors import StateError

MAX_REQUESTS = 64


class InflightState(DeviceState, frozen=True, kw_only=True):
    VERSION: ClassVar[int] = 1
    done: bytes = b""  # completed request ids, in completion order
    in_flight: bytes = b""  # taken from the guest, not completed: re-run on restore
    queued: bytes = b""  # submitted while quiesced: not yet taken


class InflightDevice(Device):
    NAME = "inflight-test"
    WINDOW = 8
    State = InflightState

    def __init__(
        self, ctx: DeviceContext, backend: Callable[[int], bool] = lambda rid: True
    ) -> None:
        super().__init__(ctx)
        self.backend = backend  # returns True when it could complete the request now
        self.done, self.in_flight, self.queued = bytearray(), bytearray(), bytearray()
        self.taking = True

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 1:
            self.ctx.counters.bad_access += 1
            return
        (self.in_flight if self.taking else self.queued).append(data[0])

    def read(self, offset: int, size: int) -> bytes:
        return bytes([len(self.done)]) + bytes(size - 1)

    def pump(self) -> None:
        """The backend's completions arrive (an event loop would call this)."""
        for rid in list(self.in_flight):
            if self.backend(rid):
                self.in_flight.remove(rid)
                self.done.append(rid)

    def quiesce(self) -> None:
        self.taking = False
        self.pump()  # finish what can finish; the rest stays recorded in in_flight

    def resume(self) -> None:
        self.taking = True
        self.in_flight += self.queued
        self.queued.clear()

    def save(self) -> InflightState:
        return InflightState(
            done=bytes(self.done), in_flight=bytes(self.in_flight), queued=bytes(self.queued)
        )

    @classmethod
    def restore(cls, ctx: DeviceContext, state: InflightState) -> Self:
        if max(len(state.done), len(state.in_flight), len(state.queued)) > MAX_REQUESTS:
            raise StateError(f"inflight-test: more than {MAX_REQUESTS} requests")
        device = cls(ctx)
        device.done = bytearray(state.done)
        device.queued = bytearray(state.queued)
        device.in_flight = bytearray(state.in_flight)  # re-run: the backend never finished them
        device.pump()
        return device
