"""A device process's spec, from its stdin (sandbox/spawn.py start_device and fork_device
write it there): the first line, and for a warm spare the rest when it takes over."""

import json
import os
import sys

from splitvmm.errors import ProtocolError
from splitvmm.protocol.models import MODELS
from splitvmm.protocol.spec import MAX_SPEC, DeviceSpec
from splitvmm.sandbox.device import SeccompMode


def read_spec() -> DeviceSpec:
    """The spec from stdin's first line; then stdin becomes /dev/null, unless the spec is
    deferred: the device holds no pipe it does not need (sandbox/spawn.py start_device says
    what fds 0-2 are)."""
    data = sys.stdin.buffer.readline(MAX_SPEC + 1)
    if not data:  # EOF: whoever was to send it is gone (a launcher or zygote that died)
        sys.exit(0)
    if len(data) > MAX_SPEC:
        sys.exit(f"splitvmm: device: the spec is over {MAX_SPEC} bytes")
    try:
        spec = _checked(DeviceSpec.from_json(data.decode()))
    except (ProtocolError, TypeError, ValueError) as e:  # not JSON, or not the spec's keys
        sys.exit(f"splitvmm: device: bad spec on stdin: {str(e)[:200]}")
    if not spec.deferred:
        _close_stdin()
    return spec


def _checked(spec: DeviceSpec) -> DeviceSpec:
    """What the launcher checks of a spec before it forks (launcher_server.py _checked_spec,
    _check_spec), for a device started by hand: its fields' types (the launcher's own check),
    its fds' entries, a known model and a known seccomp mode."""
    if (problem := spec.field_problem()) is not None:
        raise TypeError(f"its {problem}")
    if not all(type(role) is str and type(fd) is int for role, fd in spec.fds.items()):
        raise TypeError("its fds are not role: fd number")
    if spec.model not in MODELS:
        raise ValueError(f"unknown device model {spec.model[:63]!r}")
    # ValueError for a mode enter_sandbox does not know (the launcher takes "kill" alone)
    SeccompMode(spec.seccomp)
    return spec


def read_rest(spec: DeviceSpec) -> DeviceSpec:
    """A spare's whole spec: `spec` and the rest, which comes on stdin when it takes over
    (EOF without it: the monitor ended the spare, or is gone). Called in the sandbox
    (runtime.run), where no /dev/null is left to open: stdin becomes a copy of fd 1, which
    is /dev/null (sandbox/spawn.py start_device)."""
    data = sys.stdin.buffer.read(MAX_SPEC + 1)
    os.dup2(1, 0)
    if not data:
        sys.exit(0)
    if len(data) > MAX_SPEC:
        sys.exit(f"splitvmm: device: the spec is over {MAX_SPEC} bytes")
    try:
        rest = json.loads(data)
        if not isinstance(rest, dict):
            raise TypeError("not an object")
        return spec.completed(rest)
    except (TypeError, ValueError) as e:
        sys.exit(f"splitvmm: device: bad spec on stdin: {str(e)[:200]}")


def _close_stdin() -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
