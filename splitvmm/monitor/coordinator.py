"""Coordinator: stops the whole machine at a consistent point and writes a snapshot.

1. pause every vCPU: each completes its pending I/O exit (KVM_RUN with
   immediate_exit) and parks outside KVM_RUN;
2. quiesce every device process: it stops taking work, finishes what is in
   flight, and answers "quiesced" (its posted writes are applied by then: the
   channel is ordered);
3. collect device states (opaque `{model, version, fields}` documents), vCPU
   and VM state;
4. write guest RAM and the chunks; the writer puts the manifest last and
   renames the directory into place, so a half-written snapshot never looks valid;
5. resume devices and vCPUs (or leave them stopped for `suspend`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitvmm.config import config_to_dict
from splitvmm.errors import DeviceFailure
from splitvmm.monitor import vmstate
from splitvmm.monitor.control import ControlError
from splitvmm.snapshot.writer import SnapshotWriter

if TYPE_CHECKING:
    from splitvmm.monitor.machine import Machine

log = logging.getLogger("splitvmm.coordinator")

PARK_TIMEOUT_S = 10.0  # a vCPU in a forwarded read waits at most the device's read deadline


@dataclass(frozen=True, slots=True)
class SnapshotReport:
    path: Path
    pause_ms: float  # from the pause request until vCPUs run again (or the snapshot is done)
    write_ms: float
    bytes: int


class Coordinator:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.paused = False

    # -- pause / resume -----------------------------------------------------------------------
    def pause(self) -> None:
        if self.paused:
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} is already paused")
        if self.machine.stopping:
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} is stopping")
        vcpus = self.machine.vcpus
        for v in vcpus:
            v.request_pause()
        stuck = [v.name for v in vcpus if not v.wait_parked(PARK_TIMEOUT_S)]
        if self.machine.stopping:  # a vCPU that stops is not parked between instructions
            for v in vcpus:
                v.resume()
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} stopped while pausing")
        if stuck:
            for v in vcpus:
                v.resume()
            raise ControlError(f"{', '.join(stuck)} did not stop within {PARK_TIMEOUT_S} s")
        self.paused = True

    def resume(self) -> None:
        if not self.paused:
            raise ControlError(f"VM {self.machine.cfg.vm.name!r} is not paused")
        for v in self.machine.vcpus:
            v.resume()
        self.paused = False

    # -- snapshot -----------------------------------------------------------------------------
    def snapshot(
        self, target: Path, keep_paused: bool = False, sign_key: bytes | None = None
    ) -> SnapshotReport:
        """Write a snapshot; the VM runs on afterwards unless it was paused or keep_paused.
        With sign_key, the snapshot carries its manifest's HMAC (snapshot/signing.py)."""
        self._check_target(target)
        if target.exists():
            raise ControlError(f"snapshot target {target} already exists")
        was_paused = self.paused
        t0 = time.monotonic()
        if not was_paused:
            self.pause()
        ok = False
        try:
            t1 = time.monotonic()
            size = self._write(target, sign_key)
            t2 = time.monotonic()
            ok = True
        finally:
            # A suspended VM stays stopped, devices included: input arriving after the
            # snapshot would be lost with the VM. A failed suspend resumes everything.
            if not (ok and keep_paused):
                self._resume_devices()
                if not was_paused:
                    self.resume()
        t3 = time.monotonic()
        return SnapshotReport(target, (t3 - t0) * 1e3, (t2 - t1) * 1e3, size)

    def _check_target(self, target: Path) -> None:
        """Only where the config's vm.snapshot_dirs allow: the monitor's Landlock rules
        would refuse anything else half-way; say so before pausing anything."""
        allowed = self.machine.cfg.vm.snapshot_dirs
        if not target.is_absolute():
            raise ControlError(f"snapshot target {target} is not an absolute path")
        parent = Path(os.path.normpath(target)).parent
        if not any(parent == d or d in parent.parents for d in allowed):
            where = ", ".join(map(str, allowed)) or "nowhere: the config sets no vm.snapshot_dirs"
            raise ControlError(
                f"snapshot target {target} is outside vm.snapshot_dirs (this VM may write to {where})"
            )

    def _quiesce_devices(self) -> dict[str, dict[str, object]]:
        states = {}
        for host in self.machine.hosts:
            if host.failed:
                raise ControlError(f"device {host.name} has failed; the VM cannot be saved")
            try:
                host.control("quiesce")
                states[host.name] = host.control("save")
            except DeviceFailure as e:
                raise ControlError(f"snapshot aborted: {e}") from None
        return states

    def _resume_devices(self) -> None:
        for host in self.machine.hosts:
            if not host.failed:
                try:
                    host.control("resume")
                except DeviceFailure as e:
                    log.error("%s", e)  # the device's on_crash policy has been applied

    def _write(self, target: Path, sign_key: bytes | None) -> int:
        m = self.machine
        device_states = self._quiesce_devices()
        host = vmstate.VcpuHost.probe(m.kvm, m.vm)
        vcpu_states = [vmstate.to_dict(vmstate.save_vcpu(fd, host)) for fd in m.vcpu_fds]
        vm_state = vmstate.to_dict(vmstate.save_vm(m.vm))
        with SnapshotWriter(target, config_to_dict(m.cfg), vcpu_states[0]["cpuid"], m.mem) as w:
            w.add_ram(m.mem)
            for i, state in enumerate(vcpu_states):
                w.add_json_chunk("vcpu", f"vcpu{i}", vmstate.VcpuState.VERSION, state)
            w.add_json_chunk("vm", "vm", vmstate.VmState.VERSION, vm_state)
            for host in m.hosts:
                doc = device_states[host.name]
                w.add_json_chunk(
                    "device", host.name, int(doc["version"]), doc["fields"], model=host.model
                )
            w.commit(sign_key)
        return sum(p.stat().st_size for p in target.iterdir())
