"""VcpuThread: the KVM_RUN loop of one vCPU; dispatches its typed exits to the buses.

KVM_RUN releases the GIL (cffi does for every call), so vCPUs run in parallel
with each other and with the monitor. A vCPU is kicked out of KVM_RUN by
setting immediate_exit and sending it SIGUSR1 (the handler does nothing: its
only job is to make the ioctl return EINTR).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from splitvmm.errors import KvmError
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.confinement import Confinement, ConfinementError
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.memory import GuestMemory, GuestMemoryError
from splitvmm.monitor.writebehind import WriteBehind
from splitvmm.native import confine
from splitvmm.native.exits import (
    INTERRUPTED,
    UNSTARTED,
    Exit,
    FailEntry,
    Hlt,
    InternalError,
    MmioRead,
    MmioWrite,
    PioIn,
    PioOut,
    Shutdown,
    SystemEvent,
    SystemEventKind,
    Unknown,
)
from splitvmm.native.kvm import VcpuFd

log = logging.getLogger("splitvmm.vcpu")

KICK_SIGNAL = signal.SIGUSR1
# An AP that no INIT and SIPI started, woken again and again by an event KVM cannot deliver
# to it (exits.Unstarted: an NMI IPI a guest sent it), would have its thread call KVM_RUN in
# a loop, a host core's worth for the VM's life. It waits between KVM_RUNs instead, from the
# first to the longest wait, doubling. The first EAGAIN of a row is run again at once: an
# honest INIT or SIPI gives one, and the AP then runs at the next KVM_RUN. An AP sent an NMI
# before its start (an honest guest's NMI to all but itself, in a panic) starts up to the
# longest wait late: KVM sees its INIT at the next KVM_RUN.
UNSTARTED_WAIT_S = (0.001, 0.05)


def install_kick_handler() -> None:
    """Must run in the main thread before any vCPU starts."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThread(threading.Thread):
    def __init__(
        self,
        vcpu: VcpuFd,
        pio: Bus,
        mmio: Bus,
        mem: GuestMemory,
        stop: Callable[[Outcome], None],
        confinement: Confinement,
        write_behind: WriteBehind | None = None,
    ) -> None:
        super().__init__(name=f"vcpu{vcpu.vcpu_id}", daemon=True)
        self.vcpu = vcpu
        self.pio, self.mmio, self.mem = pio, mmio, mem
        self.write_behind = write_behind  # writes KVM holds: delivered before other exits
        self._stop_vm = stop
        self._confinement = confinement
        self.stopping = False
        self.exits = 0
        # Pause protocol: the coordinator sets _pause_requested and kicks; the thread
        # completes any pending I/O exit, parks, and sets _parked; resume clears both.
        self._cond = threading.Condition()
        self._pause_requested = False
        self._parked = False

    def kick(self) -> None:
        self.vcpu.set_immediate_exit(True)
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # it exited between is_alive() and the kill: nothing left to kick

    def request_stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
        self.kick()

    def request_pause(self) -> None:
        with self._cond:
            self._pause_requested = True
            self._cond.notify_all()  # an unstarted AP's wait (_wait_unstarted) ends
        self.kick()

    def wait_parked(self, timeout: float) -> bool:
        """True once the vCPU is parked outside KVM_RUN with no I/O exit pending."""
        with self._cond:
            return self._cond.wait_for(lambda: self._parked or self.stopping, timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    def _park(self) -> None:
        # KVM_RUN with immediate_exit set completes a pending PIO/MMIO exit (writes the
        # read value into the guest's register, advances RIP) and returns EINTR without
        # entering the guest, so the state we save is between two instructions.
        # Completing one piece can produce the next exit of the same instruction (a rep
        # ins/outs over more than a page, a split MMIO access): serve those until KVM
        # returns EINTR, so no exit is left half done.
        vcpu = self.vcpu
        vcpu.set_immediate_exit(True)
        while (ex := vcpu.run()) is not INTERRUPTED and ex is not UNSTARTED:
            outcome = self._handle_exit(ex)
            if outcome is not None:
                self._stop_vm(outcome)
                break
        vcpu.set_immediate_exit(False)
        if self.write_behind is not None:  # parked with nothing held: a snapshot comes next
            self.write_behind.flush()
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self.stopping)
            self._parked = False

    def run(self) -> None:
        try:
            confine.set_name(self.name)  # the OS's name of the thread: top -H, ps -L, perf
        except OSError as e:  # a name is for people: the vCPU runs without one
            log.debug("vcpu%d: its thread keeps its name: %s", self.vcpu.vcpu_id, e)
        try:
            self._confinement.confine_vcpu_thread()  # the thread that serves the guest's exits
        except ConfinementError as e:
            self._stop_vm(Outcome.fault(f"vcpu{self.vcpu.vcpu_id}: {e}"))
            return
        try:
            self._loop()
        except KvmError as e:
            self._stop_vm(Outcome.fault(f"vcpu{self.vcpu.vcpu_id}: {e}"))
        except Exception as e:  # a monitor bug: stop the VM rather than leave a dead vCPU
            log.exception("vcpu%d crashed", self.vcpu.vcpu_id)
            self._stop_vm(Outcome.fault(f"vcpu{self.vcpu.vcpu_id}: internal error: {e!r}"))

    def _loop(self) -> None:
        vcpu = self.vcpu
        unstarted_wait = 0.0  # the wait before the next KVM_RUN of an unstarted AP (0: none)
        while not self.stopping:
            if self._pause_requested:
                self._park()
                continue
            ex = vcpu.run()
            if ex is INTERRUPTED:  # kicked: look at the stop and pause requests
                vcpu.set_immediate_exit(False)
                continue
            if ex is UNSTARTED:
                unstarted_wait = self._wait_unstarted(unstarted_wait)
                continue
            unstarted_wait = 0.0
            self.exits += 1
            outcome = self._handle_exit(ex)
            if outcome is not None:
                self._stop_vm(outcome)
                return

    def _wait_unstarted(self, wait: float) -> float:
        """Wait `wait` s (UNSTARTED_WAIT_S), or until a pause or a stop is asked for; the
        wait after the next EAGAIN."""
        first, longest = UNSTARTED_WAIT_S
        if not wait:
            return first
        with self._cond:
            self._cond.wait_for(lambda: self._pause_requested or self.stopping, wait)
        return min(wait * 2, longest)

    def _handle_exit(self, ex: Exit) -> Outcome | None:
        """Serves an access exit (None: run on), or says why the VM stops.

        Every guest access comes through here: `type(ex) is` costs a fifth of what a
        `match` on class patterns does, so the four access kinds are told apart that way
        (written out in each test, not held in a local, so that mypy narrows `ex`).

        Writes KVM held for a device (monitor/writebehind.py) reach it before any other access
        to it, unless this is a read that its register mirror answers with them counted.
        """
        held = self.write_behind
        if type(ex) is PioOut:
            port, size, data = ex
            if held is not None and port in held.ports:
                with held.serving(port):  # no held write overtakes this one
                    self._pio_write(port, size, data)
                held.written(port)  # at a write-behind register: the next ones cost no exit
            else:
                self._pio_write(port, size, data)
        elif type(ex) is PioIn:
            port, size, count = ex
            if held is not None and port in held.ports:
                with held.serving(port, size if count == 1 else None) as answer:
                    self.vcpu.complete_read(
                        answer if answer is not None else self._pio_read(port, size, count)
                    )
            else:
                self.vcpu.complete_read(self._pio_read(port, size, count))
        elif type(ex) is MmioWrite:
            gpa, data = ex
            self.mmio.write(gpa, data)
        elif type(ex) is MmioRead:
            gpa, size = ex
            self.vcpu.complete_read(self.mmio.read(gpa, size))
        else:
            return self._fatal_exit(ex)
        return None

    def _pio_write(self, port: int, size: int, data: bytes) -> None:
        if len(data) == size:
            self.pio.write(port, data)
        else:  # rep outs: len(data) // size accesses, back to back
            self.pio.write_repeated(port, size, data)

    def _pio_read(self, port: int, size: int, count: int) -> bytes:
        if count == 1:
            return self.pio.read(port, size)
        return self.pio.read_repeated(port, size, count)  # rep ins

    def _fatal_exit(self, ex: Exit) -> Outcome:
        vid = self.vcpu.vcpu_id
        match ex:
            case Shutdown():
                return Outcome.fault(
                    f"vcpu{vid}: the guest triple-faulted (KVM_EXIT_SHUTDOWN) {self._where()}"
                )
            case FailEntry(hw):
                return Outcome.fault(
                    f"vcpu{vid}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware "
                    f"reason {hw:#x}) {self._where()}"
                )
            case InternalError():
                return Outcome.fault(self._internal_error(ex))
            case SystemEvent(SystemEventKind.SHUTDOWN):
                return Outcome(0, "guest powered off")
            case SystemEvent(SystemEventKind.RESET):
                return Outcome(0, "guest reset")
            case SystemEvent(_, kind):
                return Outcome.fault(f"vcpu{vid}: unhandled KVM system event {kind}")
            case Hlt():
                return Outcome(0, f"vcpu{vid} halted with no interrupt controller to wake it")
            case Unknown(reason, name):
                return Outcome.fault(
                    f"vcpu{vid}: unexpected exit reason {reason} ({name}) {self._where()}"
                )
        return Outcome.fault(f"vcpu{vid}: unhandled exit {ex!r} {self._where()}")

    def _where(self) -> str:
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        return f"at RIP {regs.rip:#x} (CS base {sregs.cs.base:#x}, CR0 {sregs.cr0:#x})"

    def _internal_error(self, ex: InternalError) -> str:
        vid = self.vcpu.vcpu_id
        if not ex.emulation_failure:
            data = " ".join(f"{word:#x}" for word in ex.data) or "none"
            return (
                f"vcpu{vid}: KVM internal error (suberror {ex.suberror}, data [{data}]) "
                f"{self._where()}"
            )
        insn = ex.insn if ex.insn is not None else self._instruction_bytes()
        shown = insn.hex(" ") if insn else "unreadable"
        return (
            f"vcpu{vid}: the host's KVM could not emulate the guest instruction {self._where()}, "
            f"bytes [{shown}] (KVM_EXIT_INTERNAL_ERROR, emulation failure); on a software "
            "hypervisor such as PVM some instructions cannot run in guest kernel mode"
        )

    def _instruction_bytes(self) -> bytes:
        """Up to 15 bytes at CS:RIP, read through the vCPU's own page tables."""
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        linear = (sregs.cs.base + regs.rip) & 0xFFFFFFFFFFFFFFFF
        gpa = self.vcpu.translate(linear)
        if gpa is None:
            return b""
        for length in range(15, 0, -1):  # stop at the end of RAM rather than fail
            try:
                return self.mem.read(gpa, length)
            except GuestMemoryError:
                continue
        return b""
