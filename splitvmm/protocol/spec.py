"""DeviceSpec: what the monitor tells a device process at spawn (trusted direction)."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import cast

from splitvmm.errors import ProtocolError
from splitvmm.protocol import schema
from splitvmm.record import Struct, asdict, field, replace

# A VM's or a device's name (config.py), which a device's channel, its sockets, its snapshot
# chunk and its process name are made of: a file name, printable, not hidden. Validate with
# fullmatch(): `$` also matches before a trailing newline, so match() would take "vm\n" (the
# anchors stay so that a stray match() cannot take a prefix either).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# NAME_RE in words, for an error: "..", "-x" and "_x" are made of the characters alone
NAME_RULE = "1-63 letters, digits, '_', '.' or '-', the first a letter or digit"
# A device's channel is <name>.sock in the VM's runtime dir, beside the monitor's control.sock
# (monitor/control.py SOCKET_NAME): one named "control" would take the other's place. The
# config refuses these names, and so does the launcher, which a compromised monitor asks.
RUNTIME_DIR_NAMES = ("control",)

# How a device process is started: this interpreter, the device package, the spec on stdin.
# -I (isolated): `-m` would put the working directory first on sys.path, so a json.py there
# would run in every device before its sandbox; -I leaves it out, and PYTHON* variables too.
DEVICE_COMMAND = (sys.executable, "-I", "-m", "splitvmm.devprocs")

# A host uid or gid a device may run as (DeviceSpec.user, config.py vm.device_uid): not 0,
# which is root, nor 2**32 - 1, which is -1 to setresuid(2) ("leave it as it is") and no id.
HOST_IDS = range(1, 2**32 - 1)


def another_user(user: tuple[int, int] | None) -> bool:
    """Whether devices of `user` (DeviceSpec.user) run as another host user than this
    process: only root may start them (sandbox/device.py _become)."""
    return user is not None and user != (os.geteuid(), os.getegid())


# What `ctl crash-device --signal` may send a device (monitor.policy allows these, through a
# pidfd only): the ways a process dies that crash testing wants to see.
CRASH_SIGNALS = ("KILL", "SEGV", "ABRT", "TERM", "BUS", "ILL", "FPE")

# Live devices of one VM, warm spares included: a compromised monitor gets no fork bomb from
# the launcher, and a config (or a snapshot's stored one) with more is refused as it is read.
MAX_DEVICES = 64

# The most a device reads of its spec: options plus a saved state (restore). The monitor
# refuses a larger one before it spawns anything (sandbox/spawn.py).
MAX_SPEC = 2 << 20

# What a warm spare (monitor/slot.py) gets only when it takes over a crashed process, on its
# stdin after the rest of its spec: what differs per process. Everything else is per slot.
DEFERRED = ("state", "resume", "fault")


def spare_path(channel: str) -> str:
    """Where a warm spare's listening socket is made, until it takes over (sandbox/spawn.py resume_child)."""
    return channel.removeprefix("ipc://") + ".spare"


class DeviceSpec(Struct, frozen=True):
    name: str  # the configured device name, e.g. "serial0"
    model: str  # a key of protocol.models.MODELS
    channel: str  # the channel's socket, as a ZeroMQ endpoint (ipc://PATH)
    fds: dict[str, int] = field(default_factory=dict)  # role -> inherited fd number
    options: dict[str, object] = field(default_factory=dict)
    # -- sandbox (issue 3) --
    seccomp: str = "kill"  # sandbox.SeccompMode: "kill" (enforce), "log" or "trace" (audit)
    # The host (uid, gid) the device runs as, outside its user namespace (config.py
    # vm.device_uid); None: its starter's (sandbox/device.py).
    user: tuple[int, int] | None = None
    # Tests only: base64 of a cloudpickled callable `hook(fds) -> dict` that runs inside
    # the sandbox before READY; its JSON result goes to fds["hook_result"] (runtime.py).
    hook: str = ""
    # Restore: the device's saved `{model, version, fields}` document (from a snapshot).
    state: dict[str, object] | None = None
    # Crash restart: where the state above stands, and what to re-apply on top of it,
    # {"applied": frames, "emitted": output bytes, "skip": output bytes already sent,
    #  "replay": [base64 frames], "replay_wall_ns": [CLOCK_REALTIME ns each was sent],
    #  "confirmed": how many replay frames, from the first, the dead process applied}
    # (monitor/slot.py Resume; checked by devprocs/runtime.py).
    resume: dict[str, object] | None = None
    # Crash testing: a fault document (protocol/faults.py) this process arms at start; plain
    # data, checked by the launcher and by the device. A restarted process gets none.
    fault: dict[str, object] | None = None
    # Where the device sits, for transports that need more than their descriptor says: a PCI
    # function gets {"pci": [device, function], "intx_gsi": GSI, "ram": [[gpa, size,
    # memfd offset], ...]} (the guest-physical ranges its GUEST_RAM fd backs), one with
    # a TAP "tap_offloads": whether the TAP takes offloads (the monitor tried them), and a
    # model with machine_facts "machine": {"ram_below_4g": bytes, "ram_above_4g": bytes,
    # "vcpus": count}.
    transport: dict[str, object] | None = None
    # A warm spare: it gets this spec (DEFERRED all None) at its start, runs up to its
    # sandbox and waits for a JSON object of the DEFERRED keys on its stdin
    # (devprocs/runtime.py; sandbox/spawn.py start_device and resume_child).
    deferred: bool = False

    def spare(self) -> DeviceSpec:
        """This spec less what a spare gets later (DEFERRED)."""
        return replace(self, deferred=True, state=None, resume=None, fault=None)

    def rest(self) -> dict[str, object]:
        """What a spare gets later: the DEFERRED part of this spec."""
        return {key: getattr(self, key) for key in DEFERRED}

    def completed(self, rest: dict[str, object]) -> DeviceSpec:
        """A spare's spec with its DEFERRED part; TypeError if `rest` is not one."""
        parts = {key: rest.get(key) for key in DEFERRED}
        if set(rest) - set(DEFERRED) or any(not isinstance(v, dict | None) for v in parts.values()):
            raise TypeError(f"a spec's deferred part is an object of {', '.join(DEFERRED)}")
        state, resume, fault = (cast(dict[str, object] | None, parts[k]) for k in DEFERRED)
        return replace(self, deferred=False, state=state, resume=resume, fault=fault)

    def field_problem(self) -> str | None:
        """Which field does not have its type ("fds is not a dict"), or None: from_json takes
        any JSON value for each. What the launcher refuses of a request, and a device started
        by hand of its stdin."""
        for key, kind in _FIELD_TYPES.items():
            if type(getattr(self, key)) is not kind:
                return f"{key} is not a {kind.__name__}"
        for key in ("state", "resume", "fault", "transport"):  # an object, or none
            if getattr(self, key) is not None and type(getattr(self, key)) is not dict:
                return f"{key} is not an object"
        user = self.user
        if user is not None and not (
            type(user) is tuple and len(user) == 2 and all(type(v) is int for v in user)
        ):
            return "user is not a [uid, gid] pair"
        return None

    def to_json(self) -> str:
        # Compact, as a device's state reply is (control.encode): a state no larger than
        # MAX_CONTROL there (monitor/restore.py device_state) fits a spec's MAX_SPEC here.
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        """ProtocolError if `text` is no JSON object (or nests deeper than schema.MAX_DEPTH);
        TypeError if its keys are not the spec's."""
        fields = schema.loads(text.encode(), what="a device spec", error=ProtocolError)
        if isinstance(fields, dict) and type(fields.get("user")) is list:
            fields["user"] = tuple(fields["user"])  # JSON has no tuple: field_problem checks it
        return cls(**fields)


# The type of each field of a spec that must be there (DeviceSpec.field_problem).
_FIELD_TYPES: dict[str, type] = {"name": str, "model": str, "channel": str, "fds": dict,
                                 "options": dict, "seccomp": str, "hook": str, "deferred": bool}  # fmt: skip
