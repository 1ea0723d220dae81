"""VcpuThread: the KVM_RUN loop of one vCPU; decodes exits and dispatches to the buses.

KVM_RUN releases the GIL (cffi does for every call), so vCPUs run in parallel
with each other and with the monitor. A vCPU is kicked out of KVM_RUN by
setting kvm_run.immediate_exit and sending it SIGUSR1 (the handler does
nothing: its only job is to make the ioctl return EINTR).
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
from splitvmm.native._kvm import lib
from splitvmm.native.kvm import VcpuFd

log = logging.getLogger("splitvmm.vcpu")

KICK_SIGNAL = signal.SIGUSR1
SYSTEM_EVENT_SHUTDOWN = 1  # KVM_SYSTEM_EVENT_SHUTDOWN
SYSTEM_EVENT_RESET = 2  # KVM_SYSTEM_EVENT_RESET


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
    ) -> None:
        super().__init__(name=f"vcpu{vcpu.vcpu_id}", daemon=True)
        self.vcpu = vcpu
        self.pio, self.mmio, self.mem = pio, mmio, mem
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
        self.vcpu.run_struct.immediate_exit = 1
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
        run = self.vcpu.run_struct
        run.immediate_exit = 1
        while self.vcpu.run() >= 0:
            outcome = self._handle_exit(run)
            if outcome is not None:
                self._stop_vm(outcome)
                break
        run.immediate_exit = 0
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause_requested or self.stopping)
            self._parked = False

    def run(self) -> None:
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
        run = self.vcpu.run_struct
        while not self.stopping:
            if self._pause_requested:
                self._park()
                continue
            if self.vcpu.run() < 0:  # kicked
                run.immediate_exit = 0
                continue
            self.exits += 1
            outcome = self._handle_exit(run)
            if outcome is not None:
                self._stop_vm(outcome)
                return

    def _handle_exit(self, run) -> Outcome | None:
        reason = run.exit_reason
        if reason == lib.KVM_EXIT_IO:
            self._handle_pio(run)
        elif reason == lib.KVM_EXIT_MMIO:
            self._handle_mmio(run)
        elif reason == lib.KVM_EXIT_INTR:
            pass
        else:
            return self._fatal_exit(run, reason)
        return None

    def _handle_pio(self, run) -> None:
        io = run.io
        size, port, count = io.size, io.port, io.count
        data = self.vcpu.io_data(io.data_offset, size * count)
        if io.direction == lib.KVM_EXIT_IO_OUT:
            for i in range(count):  # rep outs: `count` accesses, back to back in the page
                self.pio.write(port, bytes(data[i * size : (i + 1) * size]))
        else:
            for i in range(count):
                data[i * size : (i + 1) * size] = self.pio.read(port, size)

    def _handle_mmio(self, run) -> None:
        mmio = run.mmio
        size = mmio.len
        if mmio.is_write:
            self.mmio.write(mmio.phys_addr, bytes(mmio.data[0:size]))
        else:
            value = self.mmio.read(mmio.phys_addr, size)
            for i in range(size):
                mmio.data[i] = value[i]

    def _fatal_exit(self, run, reason: int) -> Outcome | None:
        vid = self.vcpu.vcpu_id
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return Outcome.fault(
                f"vcpu{vid}: the guest triple-faulted (KVM_EXIT_SHUTDOWN) {self._where()}"
            )
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            hw = run.fail_entry.hardware_entry_failure_reason
            return Outcome.fault(
                f"vcpu{vid}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {hw:#x})"
            )
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            return Outcome.fault(self._internal_error(run))
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind in (SYSTEM_EVENT_SHUTDOWN, SYSTEM_EVENT_RESET):
                return Outcome(
                    0, f"guest {'reset' if kind == SYSTEM_EVENT_RESET else 'powered off'}"
                )
            return Outcome.fault(f"vcpu{vid}: unhandled KVM system event {kind}")
        if reason == lib.KVM_EXIT_HLT:
            return Outcome(0, f"vcpu{vid} halted with no interrupt controller to wake it")
        return Outcome.fault(f"vcpu{vid}: unexpected exit reason {reason} {self._where()}")

    def _where(self) -> str:
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        return f"at RIP {regs.rip:#x} (CS base {sregs.cs.base:#x}, CR0 {sregs.cr0:#x})"

    def _internal_error(self, run) -> str:
        vid = self.vcpu.vcpu_id
        sub = run.internal.suberror
        if sub != lib.KVM_INTERNAL_ERROR_EMULATION:
            return f"vcpu{vid}: KVM internal error (suberror {sub}) {self._where()}"
        failure = run.emulation_failure
        if (
            failure.ndata >= 3
            and failure.flags & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        ):
            insn = bytes(failure.insn_bytes[0 : failure.insn_size])
        else:
            insn = self._instruction_bytes()
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
