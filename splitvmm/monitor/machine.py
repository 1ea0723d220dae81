"""Machine: puts a VM together from its config, runs it, and tears it down.

Order matters: the launcher is forked first, while the monitor has one thread and
holds nothing of the VM; everything the VM needs from the host is opened next
(guest RAM sealed before a device can see it). As soon as the devices' fds exist
(their irqfds need the VM and its irqchip), the monitor asks the launcher for
their processes, which start -- a Python interpreter each, the longest step of a
start-up -- while the monitor builds the rest of the VM (a restore asks once
guest RAM holds the snapshot's contents). Then the monitor confines itself
(monitor/confinement.py), serves the devices' channels (the kernel queued their
connections meanwhile), and asks the launcher for any later restart the same
way; vCPUs start only when every device said READY.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import mmap
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from splitvmm import timings
from splitvmm.config import DeviceSection, VmConfig
from splitvmm.errors import DeviceFailure, KvmUnavailable, SplitvmmError
from splitvmm.monitor import acpi, boot, confinement, layout, loader, vmstate
from splitvmm.monitor.bus import Bus
from splitvmm.monitor.console import pump, raw_terminal
from splitvmm.monitor.control import SOCKET_NAME, ControlBusy, ControlError, ControlServer, Handler
from splitvmm.monitor.coordinator import Coordinator
from splitvmm.monitor.devicefds import (
    CreatedFile,
    DeviceFds,
    HeldIrqfds,
    PciInterrupts,
    msix_was_enabled,
    raise_interrupts,
)
from splitvmm.monitor.dirtylog import DirtyTracker
from splitvmm.monitor.exits import Outcome
from splitvmm.monitor.irqroutes import GsiRoutes, MsiVectors, intx_gsi
from splitvmm.monitor.memory import GuestMemory
from splitvmm.monitor.onthread import OnThread
from splitvmm.monitor.pci.bars import BarAllocator
from splitvmm.monitor.pci.function import PciFunctionHost, SharedDecode, place_bars
from splitvmm.monitor.pci.intx import LeftIntx
from splitvmm.monitor.pci.root import ConfigPorts, Ecam, PciRoot, device_numbers
from splitvmm.monitor.platform import GED_POWER_BUTTON, I8042, AcpiGed, AcpiPm, DebugExit
from splitvmm.monitor.rundir import RuntimeDir, check_socket_path
from splitvmm.monitor.slot import (
    DeviceSlot,
    RestartBudget,
    SlotState,
    Spawn,
    mark_shared_outputs,
    refuse_outputs_on_disks,
)
from splitvmm.monitor.supervisor import Supervisor
from splitvmm.monitor.vcpu import VcpuThread, install_kick_handler
from splitvmm.monitor.writebehind import WriteBehind, Zone, kernel_holds_rep_outs_once
from splitvmm.native.eventfd import EventFd
from splitvmm.native.kvm import Kvm
from splitvmm.native.mem import mapping_address
from splitvmm.protocol import faults
from splitvmm.protocol.models import MODELS, FdKind, ModelDescriptor, PciFunction, PortWindow
from splitvmm.protocol.spec import CRASH_SIGNALS, MAX_DEVICES
from splitvmm.record import Struct
from splitvmm.sandbox.launcher import REPLY_TIMEOUT_S, STOP_TIMEOUT_S, Launcher
from splitvmm.sandbox.launcher_start import STOP_SIGNALS, LauncherError, close_all
from splitvmm.snapshot import signing

if TYPE_CHECKING:
    from signal import _HANDLER

    from splitvmm.snapshot.reader import Snapshot

log = logging.getLogger("splitvmm.machine")

DEBUG_EXIT_WINDOW = 4  # accepts outb/outw/outl at 0xf4
STOP_SIGNALS_BEFORE_DEFAULT = 2  # the operator's and `timeout`'s to its process group
# After the devices and their spares started, or the last restart, this long without another
# restart before the launcher may end its zygote (~5 MiB): a restart's new spare needs one,
# and a zygote being started (~100 ms of imports) holds up the launcher for every request
# meanwhile, a warm restart's included. So a burst of crashes is served by one zygote.
ZYGOTE_IDLE_S = 2.0
# How long the teardown waits for the disk images' write-back (write_back_images) before it
# exits without: a healthy disk syncs in well under that, a hung one never would.
WRITE_BACK_TIMEOUT_S = 30.0
# A device stalled and the VM could not pause (a vCPU waits for a device's restart): how
# long before the pause is tried again
STALL_PAUSE_RETRY_S = 0.5
# Control requests that only read a few fields: answered even while a snapshot runs.
READ_ONLY_REQUESTS = ("status", "devices")


class Machine:
    def __init__(
        self,
        cfg: VmConfig,
        runtime_root: Path | None = None,
        snapshot: Snapshot | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.cfg = cfg
        # The VM's launcher, ours to close: `up` starts it before its imports, or build() does.
        # stop() abandons what it has not answered.
        self._launcher = launcher
        self.snapshot = snapshot  # restore from it instead of booting
        self._runtime_root = runtime_root
        self.coordinator = Coordinator(self)
        self.control: ControlServer | None = None
        self.started = time.monotonic()
        self._outcome: Outcome | None = None
        # Re-entrant: a stop signal's handler (_on_signal) runs on the main thread, between
        # any two of its bytecodes, stop()'s own included (a second signal during the first's)
        self._outcome_lock = threading.RLock()
        self._wake = EventFd()  # wakes the main thread when the VM ends
        # The stop signals' handlers before run() put ours in; close() puts them back
        self._previous_handlers: dict[signal.Signals, _HANDLER] = {}
        # The signal wake-up pipe (console.pump) and the wake-up fd before it: set with them
        self._signal_fds: tuple[int, int] | None = None
        self._previous_wakeup_fd = -1
        self._stop_signals = 0  # stop signals received
        self._closables: list[_Closable] = []  # closed in reverse order, whatever build() got to
        self._vm_fds: list[_Closable] = []  # the VM's, then its vCPUs': closed apart (close())
        self._pit_mode: OnThread | None = None  # the PIT's re-injection going off
        self._held_irqfds: HeldIrqfds | None = None  # a restore's, until its irqchip is set
        self._ahead: list[tuple[DeviceSlot, int]] = []  # launch requests sent, not yet taken
        self.slots: list[DeviceSlot] = []
        self._spawns: list[Spawn] = []  # the devices, with their fds, until they are started
        self._images: list[tuple[str, int]] = []  # (device, its write_back_fd): DeviceFds
        self._dirty_logs: dict[str, mmap.mmap] = {}  # each device's dirty log: DeviceFds
        self._created_files: list[CreatedFile] = []  # removed if no vCPU ran: DeviceFds
        self._confined = False  # the monitor's filter is (or may be) on: no file is removed
        self._write_back_failed: dict[str, str] = {}  # device -> why its image's sync failed
        self.vcpus: list[VcpuThread] = []
        self._host_release = os.uname().release  # (the confined monitor may not ask: uname)
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self._console: str | None = None  # the device that takes the operator's keyboard
        self._device_cfg = {d.name: d for d in cfg.devices}  # config.py: names are unique
        self._taps: dict[str, str] = {}  # device -> the interface its TAP is
        self._budgets = {
            d.name: RestartBudget(d.max_restarts, d.restart_window_s) for d in cfg.devices
        }
        # The restarter's work: a crashed device, a device whose warm spare ended, or None
        self._restarts: queue.SimpleQueue[DeviceSlot | SpareLost | None] = queue.SimpleQueue()
        # The pauser's: a device that stalled (the VM to pause for it), or None
        self._stalls: queue.SimpleQueue[DeviceSlot | None] = queue.SimpleQueue()
        self._supervisor: Supervisor | None = None
        self._spawned_at: dict[str, float] = {}  # device -> when its process was asked for
        self.functions: dict[str, PciFunctionHost] = {}  # PCI devices, by name
        self._bar_decode = SharedDecode()  # theirs: their BARs share self.mmio
        self._pci_intx: list[tuple[int, int]] = []  # (PCI device, GSI) of each INTA#: _PRT
        self.firmware: loader.FirmwareImage | None = None  # build(): a firmware boot's image
        # The power button's way to the guest (the DSDT's GED): its events are saved, in the
        # vm chunk, and it pulses its interrupt once the VM exists (build())
        self.ged = AcpiGed(self._ged_interrupt)

    @functools.cached_property
    def firmware_id(self) -> vmstate.FirmwareId | None:
        """The firmware image as a snapshot names it (vm chunk v4), hashed once: at the
        restore that checks it or the first snapshot, not in every snapshot's pause (the
        image does not change). After build()."""
        return None if self.firmware is None else vmstate.FirmwareId.of(self.firmware.data)

    def _install_stop_handlers(self) -> None:
        """SIGINT, SIGTERM, SIGHUP and SIGQUIT stop the VM (_on_signal), from the start of
        build() to the end of close(); SIGQUIT's default, which ends the process where it is
        (with a core dump), left the console's terminal raw, echoing nothing until `reset`
        (a raw terminal sends no Ctrl-\\: it comes from `kill`). A signal ignored when we
        started stays ignored (nohup, a shell's
        `cmd &` ignoring SIGINT): the operator asked for that, as for any program. From the
        start: one during the build used to kill the process (its runtime directory, lock
        and sockets left behind) or raise a KeyboardInterrupt in the middle of a spawn;
        until close() is done: `timeout` signals `up` and then its whole process group, and
        a second signal during the teardown must not cut it short (the devices' syncs and
        the VM's close would be skipped)."""
        if threading.current_thread() is not threading.main_thread():
            return  # (a test building a machine on another thread: signals are not its)
        stop_signals = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in stop_signals}
        self._signal_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._signal_fds[1], warn_on_full_buffer=False
        )

    def build(self) -> None:
        """Everything but running: a stop signal meanwhile ends the build at its next step
        (a restore's RAM load first), and run() then runs nothing."""
        self._install_stop_handlers()
        cfg = self.cfg
        # Refused before anything is made: a monitor that may not run its devices as the user
        # the config names (only root may)
        elsewhere = confinement.devices_elsewhere(cfg.vm.device_user)
        self.rundir = RuntimeDir(cfg.vm.name, self._runtime_root, enterable=elsewhere)
        self._closables.append(self.rundir)
        # Now, before the launcher and /dev/kvm: ControlServer binds it only as the devices
        # are about to start (_launch_devices).
        check_socket_path(self.rundir.path / SOCKET_NAME, "control socket")
        # First, single-threaded, before /dev/kvm or guest RAM: the launcher holds nothing of
        # the VM (`up` starts it earlier still: cli/up.py). Closed after the devices
        # (_closables go in reverse).
        if self._launcher is None:
            self._launcher = Launcher.start()
        self._closables.append(self.launcher)
        self.launcher.configure(
            self.rundir.path, [dev.model for dev in cfg.devices], cfg.vm.device_user
        )
        timings.mark("launcher configure sent")
        if self.stopping:
            return
        restoring = None  # (snapshot, its checked states), decoded before a process is spawned
        if self.snapshot is not None:
            # Only a restore imports restore code: a boot does not pay for it.
            from splitvmm.monitor import restore

            restoring = self.snapshot, restore.decode_states(self.snapshot)
        self.kvm = Kvm()
        self._closables.append(self.kvm)
        self.kvm.require_caps()
        if cfg.vm.vcpus > self.kvm.max_vcpus():
            raise KvmUnavailable(f"vm.vcpus: this host's KVM allows at most {self.kvm.max_vcpus()}")
        # A boot's CPU settings: refused before any device starts (a restore's are saved)
        mask = boot.check_cpu(cfg, self.kvm) if restoring is None else None
        self.mem = GuestMemory(cfg.vm.memory, f"{cfg.vm.name}-ram")
        self._closables.append(self.mem)
        self.vm = self.kvm.create_vm()
        self._vm_fds.append(self.vm)
        image = loader.load_firmware(cfg.boot.firmware) if cfg.boot.firmware else None
        self.firmware = image  # a restore from before its shadow was RAM copies it (restore.py)
        if restoring is None and boot.firmware_without_clock(cfg):
            log.warning(
                "vm.rtc = false: the firmware finds no CMOS clock, and every CMOS register "
                "it reads (RAM size, boot settings) reads 0xff"
            )
        self._create_platform()
        if self.stopping:
            return
        if restoring is not None:
            self._held_irqfds = HeldIrqfds(self.vm)
        for dev in cfg.devices:  # their fds: irqfds are set up before the filter forbids it
            self._spawns.append(self._prepare_device(dev))
        refuse_outputs_on_disks(self._spawns)
        boots: loader.LoadedKernel | loader.FirmwareImage | None = image
        if restoring is None and cfg.boot.kernel is not None:  # refused before any device runs
            boots = boot.load_kernel(cfg, self.mem, cfg.vm.vcpus, self._pci_intx)
        if restoring is None:  # a boot's devices start now, while the rest is built
            self._pit_reinject_off()
            self._launch_devices()
        else:
            # A restore's devices that are handed no guest RAM start now, while RAM loads: they
            # read nothing of the VM but their saved states, and their interrupts wait for the
            # saved irqchip (HeldIrqfds). The others start once RAM is loaded.
            self._launch_devices(guest_ram=False, ahead=True)
        timings.mark("device launch requests")
        self.vcpu_fds = [
            self.vm.create_vcpu(i, self.kvm.vcpu_mmap_size()) for i in range(cfg.vm.vcpus)
        ]
        self._vm_fds.extend(self.vcpu_fds)
        if image is not None:  # part of the platform: a restore maps it too
            self._closables.append(boot.Firmware(self.vm, image))
        if restoring is not None:
            restore.apply(*restoring, self)  # imported above, for this restore
            if self.stopping:  # a stop signal while RAM loaded: no other device is started
                return
            self._take_launched()
            assert self._held_irqfds is not None
            self._held_irqfds.release()  # into the saved irqchip, with any edge sent meanwhile
            # after guest RAM holds what they may read at start
            self._launch_devices(guest_ram=True)
        else:
            assert boots is not None and mask is not None  # config.py: a kernel or a firmware
            boot.prepare(self.kvm, self.mem, self.vcpu_fds, boots, mask, self._pci_intx)
        timings.mark("kvm, vm, ram, boot")
        if self._pit_mode is not None:  # a boot's: its thread ends before confinement
            self._pit_mode.result()
        if self.stopping:
            return
        self.launcher.check_configured()  # the spawns took its reply, or this does
        # Reads its policies (files, now); its rules name the launcher's socket.
        self.confinement = confinement.Confinement(
            launcher_fd=self.launcher.fileno(), keep_kill=elsewhere
        )
        # Everything is open: from here on the monitor holds no capability and can reach
        # nothing on the host but its runtime dir and the snapshot dirs the config names.
        if self.confinement.confine_process(self.rundir.path, cfg.vm.snapshot_dirs):
            self.coordinator.bind_snapshot_dirs()  # what Landlock's rules for them hold
        self._confined = True  # as the filter goes on: it allows no F_OFD_SETLK (close)
        self.confinement.load_monitor_filter()
        for slot in self.slots:  # nothing a device sends is read before this point
            slot.attach()
        timings.mark("confinement, channels")

    # -- construction ---------------------------------------------------------------
    def _create_platform(self) -> None:
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP)
        self.vm.set_tss_addr(layout.KVM_TSS)
        # Guest RAM before the irqchip and the PIT, whose creation leaves an SRCU grace period
        # under way for a few ms: a memslot made meanwhile waits for it (~7 ms here).
        self._ram_slots = list(self.mem.regions)
        for slot, region in enumerate(self._ram_slots):
            hva = mapping_address(self.mem.map, region.offset)
            self.vm.set_user_memory_region(
                slot, region.gpa, region.size, hva, log_dirty=self.cfg.vm.track_dirty_pages
            )
        self.vm.create_irqchip()  # PIC + IOAPIC + LAPICs in the kernel
        self.vm.create_pit2()
        self.routes = GsiRoutes(self.vm)  # the one owner of the VM's GSI routing table
        self._bar_window = BarAllocator(
            layout.PCI_MMIO32_START, layout.PCI_MMIO32_END, "32-bit PCI memory"
        )
        self.pio.insert(layout.DEBUG_EXIT_PORT, DEBUG_EXIT_WINDOW, DebugExit(self._debug_exit))
        self.pio.insert(
            layout.I8042_DATA_PORT, I8042.WINDOW, I8042(lambda: self._reset("the i8042 controller"))
        )
        self.pci = PciRoot()  # every boot kind: firmware may enumerate PCI too
        self._pci_numbers = device_numbers(self.cfg.devices)
        # its latch is saved (monitor/pci/state.py)
        self.config_ports = ConfigPorts(
            self.pci, lambda: self._reset("the reset control register (0xCF9)")
        )
        self.pio.insert(layout.PCI_CONFIG_PORT, layout.PCI_CONFIG_WINDOW, self.config_ports)
        self.mmio.insert(layout.PCIE_ECAM_BASE, layout.PCIE_ECAM_SIZE, Ecam(self.pci))
        pm = AcpiPm(
            acpi.S5_SLEEP_TYPE, acpi.PM_PORTS.reset_value, lambda why: self.stop(Outcome(0, why))
        )
        self.pio.insert(layout.ACPI_PM_PORT, AcpiPm.WINDOW, pm)
        self._wire_ged()

    def _wire_ged(self) -> None:
        """The GED's event register on the port bus, and its line: an irqfd, as every
        interrupt the monitor raises (the confined monitor may not KVM_IRQ_LINE), made before
        the filter forbids KVM_IRQFD."""
        self.pio.insert(layout.ACPI_GED_PORT, AcpiGed.WINDOW, self.ged)
        self._ged_irq = EventFd()
        self._closables.append(self._ged_irq)
        self.vm.register_irqfd(self._ged_irq.fd, layout.ACPI_GED_GSI)

    def _ged_interrupt(self) -> None:
        """An edge on the GED's line (the DSDT says edge-triggered; an irqfd without a
        resample fd pulses it): KVM's IOAPIC delivers it if the guest has the pin unmasked."""
        self._ged_irq.trigger()

    def _pit_reinject_off(self) -> None:
        """Turn the PIT's lost-tick re-injection off (native/kvm.py set_pit_reinject) on a
        thread of its own: the switch waits out SRCU grace periods (~15 ms here) holding the
        PIT's lock. A boot starts it before its devices and joins it before the monitor
        confines itself (single-threaded), by when the devices' start has taken longer. A
        restore starts its devices only once its RAM is loaded, and that join was then on
        its way to the vCPUs (~7 ms, bench/snapshot.py): it starts the switch once its
        vCPUs run (run()). A vCPU's access to the PIT's ports meanwhile waits for the lock,
        once, and the PIT may re-inject a tick missed in those ms, as it does all along under
        QEMU's and Firecracker's defaults. With re-injection off the VM's close waits for no
        grace period (~16 ms with it on); a close that comes first waits for the switch."""
        self._pit_mode = OnThread("pit-mode", lambda: self.vm.set_pit_reinject(False))

    def _prepare_device(self, dev: DeviceSection) -> Spawn:
        """A device's fds and settings, from its model's descriptor: the monitor knows
        transports and fd kinds, never a model (protocol/models.py)."""
        model = MODELS[dev.model]  # config.py admits only known models
        placed = None
        if isinstance(model.transport, PciFunction):
            placed = self._place_function(dev.name, model.transport)
        irqs = None if placed is None else placed.irqs
        irqfds = self.vm if self._held_irqfds is None else self._held_irqfds
        maker = DeviceFds(irqfds, self.mem, self._closables, irqs, created=self._created_files)
        fds = maker.make(dev, model)
        if maker.write_back_fd is not None:
            self._images.append((dev.name, maker.write_back_fd))
        if maker.dirty_log is not None:
            self._dirty_logs[dev.name] = maker.dirty_log
        if maker.tap_name is not None:
            self._taps[dev.name] = maker.tap_name
            log.info("%s: TAP %s", dev.name, maker.tap_name)
        state = None
        if self.snapshot is not None:
            from splitvmm.monitor import restore

            state = restore.saved_device_state(self.snapshot, dev.name)
        if model.console and any(
            r.kind is FdKind.OUTPUT and dev.options[r.option] == "stdio" for r in model.fds
        ):
            self._take_console(dev.name, model)
        spawn = Spawn(
            dev.name,
            dev.model,
            model.transport.size,
            dict(dev.options),
            fds,
            state,
            dev.fault,
            user=self.cfg.vm.device_user,
        )
        if model.machine_facts:
            spawn.transport = {"machine": self._machine_facts()}
        if placed is not None:
            self._plug_function(spawn, placed, maker.notify)
            if maker.tap_offloads is not None:  # what the device may offer (virtio_net.py)
                assert spawn.transport is not None
                spawn.transport["tap_offloads"] = maker.tap_offloads
        return spawn

    def _take_console(self, name: str, model: ModelDescriptor) -> None:
        """The operator's keyboard goes to one device: the first configured console device
        whose output is stdio. Another one there shares the screen, not the keyboard; the
        warning says how to type into it, which depends on where its model takes input."""
        if self._console is None:
            self._console = name
            return
        how = (
            "give it a unix:PATH output, whose peer types into it"
            if model.peer_input
            else "it takes input from the keyboard only: configure it first to type into it"
        )
        log.warning(
            "device %s: its output is stdio too, but the keyboard goes to device %s (the "
            "first console on stdio); %s",
            name,
            self._console,
            how,
        )

    def _place_function(self, name: str, function: PciFunction) -> _Placed:
        """A PCI device's number on bus 0, its BARs' bases, and its interrupts' GSIs."""
        device = self._pci_numbers[name]
        bases = place_bars(name, function, self._bar_window)
        gsis = self.routes.allocate(function.msix_vectors, f"device {name}")
        irqs = PciInterrupts(intx_gsi(device) if function.intx else None, gsis)
        return _Placed(function, device, bases, irqs)

    def _machine_facts(self) -> dict[str, object]:
        """The machine as a model with machine_facts is told it (DeviceSpec.transport)."""
        below = sum(r.size for r in self.mem.regions if r.gpa < layout.FOUR_GIB)
        return {
            "ram_below_4g": below,
            "ram_above_4g": self.mem.size - below,
            "vcpus": self.cfg.vm.vcpus,
        }

    def _plug_function(self, spawn: Spawn, placed: _Placed, notify: dict[int, int]) -> None:
        """Put the function on bus 0, its BARs on the MMIO bus (with their ioeventfds)."""
        queue_fds = tuple(fd for _, fd in sorted(notify.items()))
        host = PciFunctionHost(
            spawn.name, placed.function, (placed.device, placed.bases), self.mmio, self.vm,
            queue_fds, self._bar_decode,
        )  # fmt: skip
        host.plug(self.pci)
        self.functions[spawn.name] = host
        spawn.transport = {  # DeviceSpec.transport (protocol/spec.py)
            **(spawn.transport or {}),
            "pci": [placed.device, 0],
            "intx_gsi": placed.irqs.intx_gsi,
            "ram": [[r.gpa, r.size, r.offset] for r in self._ram_slots],
        }
        spawn.msi = MsiVectors(spawn.name, self.routes, placed.irqs.msix_gsis)
        if placed.irqs.intx_gsi is not None:
            self._pci_intx.append((placed.device, placed.irqs.intx_gsi))

    def _launch_devices(self, *, guest_ram: bool | None = None, ahead: bool = False) -> None:
        """Ask the launcher for the processes of the devices whose models are handed guest
        RAM (`guest_ram` True), are not (False), or of all of them (None); with `ahead`,
        without waiting for its replies, which _take_launched() takes later. Their channels
        are served later still, once the monitor is confined (DeviceSlot.attach). The first
        call makes the control socket first, the last the monitor makes in its runtime dir:
        one it cannot make (a runtime dir with no room) then ends no device on its way up,
        which printed "the monitor closed the channel" before the error's one line. Then
        every device's slot, in the config's order."""
        if self.control is None:
            self.control = ControlServer(
                self.rundir.path, self._control_handlers(), read_only=READ_ONLY_REQUESTS
            )
            for names in mark_shared_outputs(self._spawns):
                log.info("%s write to one file: a crash restart of a device may repeat its "
                         "last output there", ", ".join(names))  # fmt: skip
            for spawn in self._spawns:
                self._make_slot(spawn)
        for slot in self.slots:
            if guest_ram is None or MODELS[slot.model].reads_guest_ram is guest_ram:
                self._spawned_at[slot.name] = time.perf_counter()
                if ahead:
                    self._ahead.append((slot, self.launcher.send_spawn(slot.next_spec())))
                else:
                    slot.launch()

    def _take_launched(self, *, closing: bool = False) -> None:
        """The launcher's replies to the requests _launch_devices sent ahead, each into its
        slot (from then on close() ends the process with it); the first failure raised once
        every reply is taken. A request a stop gave up (LauncherError) is left to close(),
        which takes it all the same (`closing`): its device is ended by its slot before its
        listening socket closes."""
        ahead, self._ahead = self._ahead, []
        wait = STOP_TIMEOUT_S if closing else REPLY_TIMEOUT_S
        failure: SplitvmmError | None = None
        for slot, request in ahead:
            try:
                slot.launched(*self.launcher.take_spawn(request, given_up=closing, timeout_s=wait))
            except LauncherError as e:
                failure = failure or e
                if not closing:
                    self._ahead.append((slot, request))
            except SplitvmmError as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def _make_slot(self, spawn: Spawn) -> None:
        # A device restarted after a crash keeps a warm spare (monitor/slot.py).
        restarts = self._device_cfg[spawn.name].on_crash == "restart"
        slot = DeviceSlot(
            spawn,
            self.rundir.path,
            self.launcher.spawn,
            self._device_failed,
            resumer=self.launcher.resume if restarts else None,
            on_stall=self._stalls.put,
        )
        self.slots.append(slot)  # closed by close() from now on, whatever launch() does
        transport = MODELS[spawn.model].transport
        if isinstance(transport, PortWindow):
            self.pio.insert(transport.base, spawn.window, slot)
        else:  # its BARs are on the MMIO bus already: they forward to the slot now
            self.functions[spawn.name].bind(slot)

    @property
    def launcher(self) -> Launcher:
        """The VM's launcher: build() has one from its first steps on."""
        if self._launcher is None:
            raise RuntimeError("the machine has no launcher before build()")
        return self._launcher

    # -- outcomes ---------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._outcome is not None

    def stop(self, outcome: Outcome) -> None:
        """Ends the VM (first outcome wins); safe from any thread."""
        with self._outcome_lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
        self._give_up_host_io()
        # A spawn or resume the launcher has not answered (a restart, a spare, the devices
        # of a VM still being built) ends now: it may wait for a new zygote's imports.
        if self._launcher is not None:
            self._launcher.abandon("the VM is stopping")
        for v in self.vcpus:
            v.request_stop()
        self._wake.trigger()

    def _give_up_host_io(self) -> None:
        """The VM is ending: a device that says it is in host I/O is no longer waited for. A
        vCPU's read from it, a snapshot's quiesce and the teardown's sync end at their
        deadlines (the flag is the device's to set, and one that never cleared it kept the
        monitor from exiting). From stop(), on any thread, and from close()."""
        for slot in self.slots:
            slot.give_up_host_io()

    def _debug_exit(self, status: int, message: str) -> None:
        self.stop(Outcome(status, message))

    def _reset(self, through: str) -> None:
        self.stop(Outcome(0, f"guest reset through {through}"))

    def _device_failed(self, slot: DeviceSlot, reason: str) -> bool:
        """A device's on_crash policy (called with its slot's lock held); True: restart it."""
        if self.stopping:
            return False
        cfg = self._device_cfg[slot.name]
        # Every device died with the launcher, and none can start again: a device left dead
        # (on_crash = leave) stays so, any other stops the VM naming the launcher.
        if cfg.on_crash != "leave" and self.launcher.exited():
            self.stop(Outcome.fault(
                f"the launcher process exited, and every device with it (device {slot.name} "
                f"failed: {reason}); no device can be restarted without it"
            ))  # fmt: skip
            return False
        # A device that was serving: one that failed its first start ends the VM's start
        # (DeviceSlot.wait_ready), whatever its on_crash
        if cfg.on_crash == "leave" and slot.state is SlotState.LIVE:
            log.warning(
                "device %s stays dead (on_crash = leave); its registers read as all-ones",
                slot.name,
            )
            spawn = next(sp for sp in self._spawns if sp.name == slot.name)
            raise_interrupts(MODELS[slot.model], spawn.fds)
            self._leave_intx(slot.name, MODELS[slot.model], spawn.fds)
            return False
        # A device that was serving, or whose restart met a crash before it was READY
        if cfg.on_crash == "restart" and (slot.state is SlotState.LIVE or slot.restarting):
            if self._budgets[slot.name].take(time.monotonic()):
                if not self.coordinator.hold_restart(slot):  # (a snapshot has saved it)
                    self.restart_later(slot)
                return True
            reason = (
                f"{reason}; it crashed more than max_restarts = {cfg.max_restarts} times "
                f"within restart_window = {cfg.restart_window_s:g} s, so it is not restarted"
            )
        self.stop(Outcome.fault(f"device {slot.name} failed: {reason}"))
        return False

    def _leave_intx(self, name: str, model: ModelDescriptor, fds: dict[str, int]) -> None:
        """The INTx line of a PCI function left dead, raised and held by the monitor from
        now on (pci/intx.py), its resample fd watched by the supervisor (started before
        anything can find a serving device dead: its pidfd watch, a vCPU, a ctl request)."""
        kinds = (FdKind.INTX, FdKind.INTX_RESAMPLE)
        lines = {r.kind: fds[r.name] for r in model.fds if r.kind in kinds and r.name in fds}
        host = self.functions.get(name)
        if host is None or len(lines) != len(kinds):
            return
        if msix_was_enabled(model, fds):
            return  # PCI 3.0 6.8.2.3: with MSI-X enabled the function may not use INTx#
        intx = LeftIntx(lines[FdKind.INTX], lines[FdKind.INTX_RESAMPLE])
        if self._supervisor is not None:
            self._supervisor.watch_resample(intx.resample_fd, intx.resampled)
        host.leave(intx)

    def restart_later(self, slot: DeviceSlot) -> None:
        """Have the restarter restart `slot`, crashed (its on_crash policy said so)."""
        self._restarts.put(slot)

    def _restarter(self) -> None:
        """Restarts crashed devices, one at a time, off the vCPU threads (a vCPU's access
        waits on the slot meanwhile); starts their warm spares, first, once each device
        is back, and when one ended while it waited (monitor/slot.py), off the restarts'
        path; and once no spawn came for ZYGOTE_IDLE_S, lets the launcher end its zygote
        until the next spawn."""
        for each in self.slots:
            if self.stopping:
                break
            self._start_spare(each)
        rested = False
        while True:
            try:
                slot = self._restarts.get(timeout=None if rested else ZYGOTE_IDLE_S)
            except queue.Empty:
                self._rest_launcher()  # asked once; again only after the next spawn
                rested = True
                continue
            if slot is None:
                return
            rested = False
            if isinstance(slot, SpareLost):
                if not self.stopping:
                    self._start_spare(slot.slot)
                continue
            if self.stopping:  # queued before the stop: no process for a VM that is going;
                slot.fail("the VM is stopping", logged=False)  # its waiters read all-ones
                continue
            try:
                slot.restart()
            except DeviceFailure as e:
                self.stop(Outcome.fault(str(e)))
                continue
            except Exception as e:  # a monitor bug: stop the VM, never leave its devices dead
                log.exception("restarting device %s", slot.name)
                self.stop(
                    Outcome.fault(f"device {slot.name}: internal error in its restart: {e!r}")
                )
                continue
            # Only a process that serves: one that died before READY, which stays in the
            # slot until the next restart ends it, has had its death logged (and counted)
            # already; watched, the supervisor logged it again.
            if self._supervisor is not None and slot.ready:
                self._supervisor.watch(slot)
            self._start_spare(slot)

    def _pauser(self) -> None:
        """Pauses the VM for each device that stalls (on_stall), on a thread of its own: a
        pause waits for every vCPU to park (PARK_TIMEOUT_S) and for a snapshot under way,
        which crash restarts must not wait behind. Started once the vCPUs exist (a stall read
        while the devices got READY, a restored device's retry, waits for them)."""
        while (slot := self._stalls.get()) is not None:
            try:
                self._pause_for(slot)
            except Exception as e:  # a monitor bug: stop the VM, never leave a device stalled
                log.exception("pausing the VM for device %s", slot.name)
                self.stop(Outcome.fault(
                    f"device {slot.name}: internal error pausing the VM for it: {e!r}"
                ))  # fmt: skip

    def _pause_for(self, slot: DeviceSlot) -> None:
        """Pause the VM for a device that holds a request until the host has room (its
        model's pause_option is "pause"), unless the operator's resume had it retry
        meanwhile; `ctl resume` has it try again (Coordinator). A pause refused while a vCPU
        waits for a device's restart (ControlBusy: bounded) is tried again; one that cannot
        be made (a vCPU that will not park) is given up, said, and the VM runs on: the
        device holds its requests until `ctl resume`, which has it retry all the same."""
        path = self._device_cfg[slot.name].options.get("path")
        where = f"device {slot.name}" + (f" ({path})" if path else "")
        resume = f"splitvmm ctl --vm {self.cfg.vm.name} resume"
        said = False
        while not self.stopping:
            why = slot.stalled  # the newest: it may have retried and stalled anew
            try:
                if self.coordinator.pause_for(lambda: slot.stalled is not None):
                    log.error(
                        "%s: %s: the VM is paused; make room on the host, then `%s` (its "
                        "request is tried again)",
                        where,
                        slot.stalled or why,
                        resume,
                    )
                return
            except ControlBusy as e:
                if not said:
                    log.warning("%s: %s; the VM cannot pause yet (%s): trying again", where,
                                why, e)  # fmt: skip
                    said = True
            except ControlError as e:
                if not self.stopping:
                    log.error(
                        "%s: %s; the VM could not be paused (%s) and runs on, that device's "
                        "requests held: make room on the host, then `%s`",
                        where,
                        why,
                        e,
                        resume,
                    )
                return
            time.sleep(STALL_PAUSE_RETRY_S)

    def _start_spare(self, slot: DeviceSlot) -> None:
        """A warm spare for `slot` (if it keeps one), watched while it waits; none past the
        launcher's MAX_DEVICES less one place for each device's own process: a spare started in
        the place a crashed device's process freed took it from that device's restart, which
        was refused, and the VM stopped (two devices without spares that crashed together)."""
        if self.stopping:
            return
        if sum(1 for each in self.slots if each.spare_pid) >= MAX_DEVICES - len(self.slots):
            return
        spare = slot.start_spare()
        if spare is not None and self._supervisor is not None:
            try:
                self._supervisor.watch_spare(slot, spare)
            except OSError as e:  # the slot closed it meanwhile (the VM is ending)
                log.debug("device %s: its spare is not watched: %s", slot.name, e)

    def _rest_launcher(self) -> None:
        """Let the launcher end its zygote until the next spawn (sandbox/launcher.py rest)."""
        if self.stopping:
            return
        try:
            self.launcher.rest()
        except SplitvmmError as e:  # a launcher gone wrong fails the next spawn too, louder
            if not self.stopping:
                log.warning("the launcher did not end its zygote: %s", e)

    # -- running ------------------------------------------------------------------------
    def run(self) -> Outcome:
        if self._outcome is not None:  # stopped while it was built: no vCPU runs
            return self._outcome
        install_kick_handler()
        for slot in self.slots:
            slot.wait_ready()
            if slot.ready:  # not one a stop gave up meanwhile (wait_ready returns then too)
                timings.span(f"device {slot.name} ready", self._spawned_at[slot.name])
        timings.mark("devices ready (wait)")
        if self._outcome is not None:  # stopped while the devices got ready: still none runs
            return self._outcome
        supervisor = self._supervisor = Supervisor(
            on_spare_lost=lambda slot: self._restarts.put(SpareLost(slot))
        )
        for slot in self.slots:
            supervisor.watch(slot)
        supervisor.start()
        restarter = threading.Thread(target=self._restarter, name="restarter", daemon=True)
        restarter.start()
        write_behind = self._write_behind()
        # vCPU threads exist before the control socket answers: a pause must see them all.
        self.vcpus = [
            VcpuThread(fd, self.pio, self.mmio, self.mem, self.stop, self.confinement, write_behind)
            for fd in self.vcpu_fds
        ]
        assert self.control is not None
        self.control.start()
        pauser = threading.Thread(target=self._pauser, name="stall-pauser", daemon=True)
        pauser.start()
        try:
            for v in self.vcpus:
                v.start()
            timings.mark("vcpus started")  # where a restore's figure ends (bench/snapshot.py)
            if self._pit_mode is None:  # a restore's, confined (monitor.policy allows it)
                self._pit_reinject_off()
            self._serve_console()
            timings.mark("guest run")
        finally:
            for v in self.vcpus:
                v.request_stop()
            for v in self.vcpus:
                v.join()
            if write_behind is not None:
                try:
                    write_behind.close()  # the guest's last writes, before the devices' sync
                except Exception as e:  # (a monitor bug) the rest of the teardown still runs
                    _log_failure("delivering the held writes", e)
            self._restarts.put(None)
            self._stalls.put(None)
            restarter.join()
            pauser.join()
            supervisor.close()
        assert self._outcome is not None
        return self._outcome

    def _write_behind(self) -> WriteBehind | None:
        """Held writes for the devices whose models declare write-behind registers, where
        KVM can hold port writes (monitor/writebehind.py); started, not armed."""
        zones = []
        for slot in self.slots:
            model = MODELS[slot.model]
            transport = model.transport
            if isinstance(transport, PortWindow):
                base, when = transport.base, model.write_behind_while
                for offset, size in model.write_behind:
                    zones.append(Zone(base + offset, size, slot, base, transport.size, when))
        page = self.vm.coalesced_pio_page() if zones else 0
        if not page:
            return None
        if not kernel_holds_rep_outs_once(self._host_release):
            log.info("no write-behind: the host kernel is older than Linux 6.0")
            return None
        ring = self.vcpu_fds[0].coalesced_ring(page)
        write_behind = WriteBehind(self.vm, ring, zones, lambda why: self.stop(Outcome.fault(why)))
        write_behind.start()
        return write_behind

    # -- control socket ---------------------------------------------------------------------
    def _control_handlers(self) -> dict[str, Handler]:
        steering: dict[str, Handler] = {
            "pause": lambda req: self._pause(),
            "resume": lambda req: self._resume(),
            "snapshot": lambda req: self._snapshot(req, suspend=False),
            "suspend": lambda req: self._snapshot(req, suspend=True),
            "crash-device": self._crash_device,
            "inject-fault": self._inject_fault,
            "link": self._link,
            "power-button": self._power_button,
        }
        return {
            # {"counters": true}: each device's own counters too (a round trip to each)
            "status": lambda req: self._status(req.get("counters") is True),
            "devices": lambda req: {"devices": self._devices(req.get("counters") is True)},
            **{op: self._unless_stopping(handler) for op, handler in steering.items()},
        }

    def _unless_stopping(self, handler: Handler) -> Handler:
        """A request that changes the VM, refused once it is stopping: after a suspend (whose
        devices must stay quiesced, the snapshot being the VM's last state), a stop signal
        or a fault, the socket stays open until the teardown closes it, and a resume, a
        snapshot or a device's crash then would act on a VM that is going away. One
        operation runs at a time (control.py), so none comes between a suspend and its
        stop."""

        def guarded(req: dict[str, object]) -> dict[str, object]:
            if self.stopping:
                raise ControlError(f"VM {self.cfg.vm.name!r} is stopping")
            return handler(req)

        return guarded

    def _inject_fault(self, req: dict[str, object]) -> dict[str, object]:
        """Arm a fault (protocol/faults.py) in a device's running process: a control message."""
        slot = _slot_named(self.slots, "inject-fault", req.get("name"))
        # on and count may be left out (an io-error's); the device gets every field
        fault = {k: req.get(k, faults.DEFAULTS.get(k)) for k in faults.Fault.__struct_fields__}
        faults.decode(fault, "inject-fault", ControlError)
        faults.check_model(fault, slot.model, f"inject-fault: device {slot.name}", ControlError)
        try:
            pid = slot.arm_fault(fault)
        except DeviceFailure as e:
            raise _refusal(slot, e) from None
        return {"name": slot.name, "pid": pid, **fault}

    def _link(self, req: dict[str, object]) -> dict[str, object]:
        """`ctl link NAME [up|down]`: a network device's link taken up or down (`state`), or
        only told (no state), by its process (the control op `link`); a crash restart and a
        snapshot keep it, as they keep the rest of the device's state."""
        slot, state = _slot_named(self.slots, "link", req.get("name")), req.get("state")
        if not MODELS[slot.model].link:
            raise ControlError(f"link: device {slot.name} (model {slot.model}) has no link")
        if state not in (None, "up", "down"):
            raise ControlError("link: state must be up or down")
        args: dict[str, object] = {"up": None if state is None else state == "up"}
        try:
            reply = slot.control("link", args=args)
        except DeviceFailure as e:
            raise _refusal(slot, e) from None
        link = "up" if reply["up"] else "down"
        return {"name": slot.name, "link": link, "changed": reply["changed"]}

    def _power_button(self, req: dict[str, object]) -> dict[str, object]:
        """`ctl power-button`: the ACPI power button pressed (QEMU's system_powerdown,
        cloud-hypervisor's power-button), for a guest OS to shut down as it chooses; the VM
        ends once it enters S5. Only the monitor's own ACPI tables (a kernel boot) have the
        button: a firmware builds its own tables, or none. A paused VM gets it when it runs."""
        if self.cfg.boot.firmware is not None:
            raise ControlError(
                f"power-button: VM {self.cfg.vm.name!r} booted a firmware, whose ACPI tables "
                "(if any) are its own and have no power button of the monitor's"
            )
        self.ged.signal(GED_POWER_BUTTON)
        return {"pressed": "power-button"}

    def _crash_device(self, req: dict[str, object]) -> dict[str, object]:
        slot = _slot_named(self.slots, "crash-device", req.get("name"))
        sig = req.get("signal", "KILL")
        if sig not in CRASH_SIGNALS:
            raise ControlError(f"crash-device: signal must be one of {', '.join(CRASH_SIGNALS)}")
        try:
            pid = slot.crash(signal.Signals[f"SIG{sig}"])
        except DeviceFailure as e:
            raise _refusal(slot, e) from None
        return {"name": slot.name, "pid": pid, "signal": sig}

    def _status(self, counters: bool) -> dict[str, object]:
        return {
            "name": self.cfg.vm.name,
            "state": "paused" if self.coordinator.paused else "running",
            "vcpus": self.cfg.vm.vcpus,
            "memory": self.cfg.vm.memory,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "devices": self._devices(counters),
        }

    def _devices(self, counters: bool = False) -> list[dict[str, object]]:
        if not counters:
            return [self._device(s) for s in self.slots]
        return [{**self._device(s), **self._counters(s)} for s in self.slots]

    def _counters(self, slot: DeviceSlot) -> dict[str, object]:
        """{"counters": the device's own (Device.stats()), checked}, or {} when it cannot
        say now: away, busy, or quiesced by a snapshot (asked nothing then; a live snapshot's
        devices are asked while its copy runs with the VM, before they are quiesced)."""
        counters = None if self.coordinator.snapshotting else slot.stats()
        return {} if counters is None else {"counters": counters}

    def _device(self, s: DeviceSlot) -> dict[str, object]:
        device: dict[str, object] = {
            "name": s.name,
            "model": s.model,
            "pid": s.pid,  # the process that serves it, or None: none does (away, or failed)
            "state": s.state.value,
            "reason": s.failed or "",
            "on_crash": self._device_cfg[s.name].on_crash,
            "generation": s.generation,
            "crashes": s.crashes,
            "restarts": s.restarts,
            "last_failure": s.last_failure,
            "recover_ms": None if s.recover_ms is None else round(s.recover_ms, 1),
            "warm_restarts": s.warm_restarts,  # restarts a warm spare took over
            "spare_pid": s.spare_pid,  # the warm spare waiting to, or 0
            "longest_stall_ms": round(s.longest_stall_ms, 1),
            # why it holds a request until the VM's resume (the VM paused for it), or ""
            "stalled": s.stalled or "",
            # guest accesses forwarded to the device: what its register traffic costs
            # the monitor (queue notifies and interrupts never count here)
            "exits": {"reads": s.reads, "writes": s.writes},
            # of the reads that waited for a reply, those that looked for it before they
            # slept, and those the look caught (protocol/polling.py)
            "reply_polls": {"looked": s.reply_poll.polls, "caught": s.reply_poll.caught},
            # writes to its write-behind registers that KVM held: delivered with no exit
            "held_writes": s.held_writes,
        }
        return device | ({"tap": self._taps[s.name]} if s.name in self._taps else {})

    def _pause(self) -> dict[str, object]:
        self.coordinator.pause()
        return {"state": "paused"}

    def _resume(self) -> dict[str, object]:
        self.coordinator.resume()
        return {"state": "running"}

    def _snapshot(self, req: dict[str, object], suspend: bool) -> dict[str, object]:
        path = req.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("snapshot needs a target directory path")
        key = signing.key_from_hex(req["sign_key"]) if "sign_key" in req else None
        try:
            report = self.coordinator.snapshot(Path(path), keep_paused=suspend, sign_key=key)
        except SplitvmmError as e:
            if not suspend or self.stopping:  # (stopping: a signal or a fault ends it anyway)
                raise
            # A failed suspend leaves the VM as it was (coordinator.py): the operator asked
            # for it to end, and must not take it for gone.
            state = "stays paused" if self.coordinator.paused else "runs on"
            refused = ControlBusy if isinstance(e, ControlBusy) else ControlError
            raise refused(f"{e}; the VM was not suspended and {state}") from None
        if suspend:
            self.stop(Outcome(0, f"suspended to {report.path}"))
        return {
            "path": str(report.path),
            "pause_ms": round(report.pause_ms, 1),
            "write_ms": round(report.write_ms, 1),
            "bytes": report.bytes,
            "signed": key is not None,
        }

    def _on_signal(self, signum: int, frame: object) -> None:
        """A stop request. The second is `timeout` signalling our process group after us
        (run()): nothing more. A third is an operator who will not wait for the teardown
        (a device's restart or the VM's close can take seconds): the signal's default."""
        self._stop_signals += 1
        if self._stop_signals > STOP_SIGNALS_BEFORE_DEFAULT:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.stop(Outcome(128 + signum, f"stopped by {signal.Signals(signum).name}"))

    def _serve_console(self) -> None:
        slot = next((s for s in self.slots if s.name == self._console), None)
        signals = None if self._signal_fds is None else self._signal_fds[0]
        if slot is None:
            pump(None, self._wake.fd, lambda data: None, escape=False, signal_fd=signals)
            return
        stdin = 0 if _is_open(0) else None
        terminal = raw_terminal(0, lambda: self.stopping) if stdin is not None else None
        with terminal if terminal is not None else contextlib.nullcontext(False) as is_tty:
            if pump(stdin, self._wake.fd, slot.input, escape=is_tty, signal_fd=signals):
                self.stop(Outcome(0, "quit from the console (Ctrl-A x)"))

    def close(self) -> None:
        """Tear down whatever build() got to. Every device is synced, then killed, then
        waited for, each step for all of them at once. Once every sync is done (a device's
        event during its sync, an MSI-X route, may still use the VM), the VM's fds close on a
        thread of their own: the kernel's teardown of a VM waits out grace periods
        (bench/startup.py) that the devices' ends fill."""
        self._give_up_host_io()  # a teardown after a failed build or run has had no stop()
        if self.control is not None:
            self.control.close()  # first: no request may start on a machine being torn down
        if self._ahead:  # a restore's launch requests, its build failing before it took them
            # Nobody wants those devices now: a launcher still waiting for its zygote (a new
            # one's imports on a loaded host) refuses them at once, not after STOP_TIMEOUT_S
            # with its handle broken. A stop abandoned them already; a failed build had not.
            self.launcher.abandon("the VM is closing")
            with contextlib.suppress(SplitvmmError):  # refused, or given up: none to end
                self._take_launched(closing=True)  # into their slots, which end them below
        if self._pit_mode is not None:  # a failed build's, or a restore that ended at once
            _log_failure("turning the PIT's re-injection off", self._pit_mode.wait())
        vm_fds, self._vm_fds = self._vm_fds, []
        vm_closer: OnThread | None = None
        try:
            self._sync_devices()
            if vm_fds and not any(v.is_alive() for v in self.vcpus):
                vm_closer = OnThread("vm-close", functools.partial(_close_all, vm_fds))
                vm_fds = []
        finally:
            try:
                self._end_devices()
                self._write_back_at_exit()
            finally:
                # The VM's fds here only if a vCPU thread still runs (it may be in KVM_RUN) or
                # the syncs failed first: before the rest, as before the closing thread.
                _close_all(vm_fds)
                # The devices are gone: nobody writes an output now. Under its filter the
                # monitor may not lock (nor, under Landlock, unlink): kept.
                if not self.vcpus and not self._confined:
                    for created in self._created_files:
                        created.remove_if_unused()
                _close_all(self._closables)
                if self._launcher is not None:  # a build that failed before it took the
                    # launcher among its closables (the runtime dir): a no-op after them
                    _close_all([self._launcher])
                if vm_closer is not None:
                    _log_failure("closing the VM", vm_closer.wait())
                self._wake.close()
                for s, handler in self._previous_handlers.items():
                    signal.signal(s, handler)
                self._previous_handlers = {}
                if self._signal_fds is not None:
                    signal.set_wakeup_fd(self._previous_wakeup_fd)
                    close_all(self._signal_fds)
                    self._signal_fds = None

    def dirty_tracker(self) -> DirtyTracker | None:
        """What a live snapshot asks which pages of guest RAM were written while it copied
        them, where the VM tracks them (vm.track_dirty_pages): KVM's log of its RAM slots and
        the devices' bitmaps (monitor/dirtylog.py)."""
        if not self.cfg.vm.track_dirty_pages:
            return None
        return DirtyTracker(self.vm, self._ram_slots, self._dirty_logs, self.mem.size)

    def write_back_images(self) -> None:
        """fdatasync every writable disk image: what the guest wrote (and saw completed,
        FLUSHed or not) reaches the disk, as QEMU flushes every drive when its VM stops. A
        snapshot's commit calls it once the VM runs again (a restored guest counts on those
        writes; the pause is not the disk's), and the teardown once the devices are gone.
        On the monitor's own open file description of each (DeviceFds.write_back_fd).
        OSError naming the device."""
        for name, fd in self._images:
            if name in self._write_back_failed:
                continue  # the kernel reports a failed write-back once per open file
                # description (errseq): kept, so that a retried snapshot is refused too (QEMU
                # keeps its page_cache_inconsistent the same way)
            try:
                os.fdatasync(fd)
            except OSError as e:
                self._write_back_failed[name] = e.strerror or str(e)
        failures = [
            f"device {name}: its image could not be written back ({why}): the host's page "
            "cache lost writes the guest saw completed"
            for name, why in self._write_back_failed.items()
        ]
        for failure in failures:
            log.error("%s", failure)
        if failures:  # every image tried, each failure logged: raise the first
            raise OSError(errno.EIO, failures[0])

    def _write_back_at_exit(self) -> None:
        """write_back_images() once the devices are gone (they wrote their last), on a thread
        waited for WRITE_BACK_TIMEOUT_S: hung storage (a hard NFS mount) must not keep the
        monitor from exiting; a failure is logged (there)."""
        if self._images and not OnThread("write-back", self.write_back_images).ended_within(
            WRITE_BACK_TIMEOUT_S
        ):
            log.error("the disk images were not written back within %g s; exiting without",
                      WRITE_BACK_TIMEOUT_S)  # fmt: skip

    def _sync_devices(self) -> None:
        """Let every device finish the guest's posted writes (and flush its output line)
        before it dies: all of them at once, a thread each. A failure is logged: the device
        is ended next all the same."""
        syncs: list[tuple[str, OnThread]] = []
        try:
            for slot in self.slots:
                if slot.ready:
                    last = functools.partial(slot.sync, drain=True)  # its line drained too
                    syncs.append((slot.name, OnThread(f"sync-{slot.name}", last)))
        finally:
            for name, sync in syncs:
                _log_failure(f"syncing device {name}", sync.wait())

    def _end_devices(self) -> None:
        """Kill every device, then wait for each: their ends overlap."""
        for slot in self.slots:
            slot.kill()
        for slot in self.slots:
            slot.close()


def _slot_named(slots: Sequence[DeviceSlot], op: str, name: object) -> DeviceSlot:
    """The slot of the device a control request names (`op`: the request, for the error)."""
    slot = next((s for s in slots if s.name == name), None)
    if slot is None:
        raise ControlError(f"{op}: no device named {str(name)[:63]!r}")
    return slot


def _refusal(slot: DeviceSlot, e: DeviceFailure) -> ControlError:
    """A request the device could not take (`e`). Unless it failed for good (its on_crash
    policy), the same request may work later (ctl's 75): it is restarting, or back already
    (a warm spare's restart takes ms, so `restarting` may be clear again by now), or its end
    is not seen yet."""
    return (ControlError if slot.failed else ControlBusy)(str(e))


def _log_failure(what: str, error: BaseException | None) -> None:
    if error is not None:
        log.error("%s failed", what, exc_info=error)


def _close_all(closables: list[_Closable]) -> None:
    """Close each, the last first, whatever one of them raises: the runtime dir and its lock
    must go too."""
    for c in reversed(closables):
        try:
            c.close()
        except Exception:
            log.exception("closing %r failed", c)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Closable(Protocol):
    def close(self) -> None: ...


class SpareLost(NamedTuple):
    """For the restarter: `slot`'s warm spare ended while it waited; start another."""

    slot: DeviceSlot


class _Placed(Struct, frozen=True):
    """Where a PCI function sits: its descriptor, device number, BAR bases, interrupts."""

    function: PciFunction
    device: int
    bases: dict[int, int]
    irqs: PciInterrupts


def run_vm(
    cfg: VmConfig, snapshot: Snapshot | None = None, launcher: Launcher | None = None
) -> Outcome:
    """Build and run the VM; `launcher`, if given, is the VM's (closed with it)."""
    machine = Machine(cfg, snapshot=snapshot, launcher=launcher)
    try:
        try:
            machine.build()
        except SplitvmmError:
            if not machine.stopping:
                raise
            # A stop cut the build short (its launch requests were given up: abandon()):
            # the stop is the outcome, and run() runs nothing.
        return machine.run()
    finally:
        machine.close()
