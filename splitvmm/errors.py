"""The error types of splitvmm: each names what went wrong in one sentence; and how a process
of ours ends once an error (or its work) is done."""

import contextlib
import os
import signal
import sys
from typing import NoReturn


class SplitvmmError(Exception):
    """Base of every error we raise on purpose; the CLI prints it without a traceback."""


class ConfigError(SplitvmmError):
    """The VM config (TOML) is malformed or names something that does not exist."""


class KvmError(OSError, SplitvmmError):
    """An ioctl on /dev/kvm or one of its fds failed; str() names the ioctl."""

    def __init__(self, errno_: int, what: str) -> None:
        import os

        super().__init__(errno_, f"{what} failed: {os.strerror(errno_)}")
        self.what = what

    def __str__(self) -> str:
        return f"{self.args[1]} (errno {self.errno})"


class KvmUnavailable(SplitvmmError):
    """/dev/kvm is missing, not accessible, or lacks a capability we need."""


class BootError(SplitvmmError):
    """The kernel, initrd or firmware cannot be loaded as given."""


class ProtocolError(SplitvmmError):
    """A device process sent a frame that breaks the channel protocol."""


class DeviceFailure(SplitvmmError):
    """A device process died, timed out or misbehaved; it has been killed."""


class StateError(SplitvmmError):
    """A device or VM state is invalid (bad field, out of range, unknown version)."""


class GuestHalt(SplitvmmError):
    """The guest stopped the VM in a way that ends it with an error (triple fault, ...)."""


SHOWN_MAX = 100  # characters of an untrusted value an error message quotes


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """repr() for an error message, of a value that may come from a hostile file: control
    and invisible characters stay escapes ("\\x1b", never a raw escape sequence on the
    terminal), and a long value is clipped, so the message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def escaped(text: str, keep: str = "") -> str:
    """Text from elsewhere (a snapshot, the monitor's reply, a device's words) as data:
    control and invisible characters (escape sequences, newlines, bidi overrides) as their
    Python escapes, so none reaches the terminal raw; those in `keep` stay as they are."""
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def clip(message: str, limit: int = 4 * SHOWN_MAX) -> str:
    """A message that quotes untrusted values, clipped to one short line. The middle goes:
    the start says what is at fault and the end says what is wrong with it."""
    if len(message) <= limit:
        return message
    return f"{message[: limit // 2]} ... {message[-limit // 2 :]}"


def system_exit_status(code: object) -> int:
    """The status the interpreter exits with for SystemExit(code), printing a message code to
    stderr as it does: for processes that end by os._exit (cli/root.py main(), a device forked
    by the zygote: sandbox/zygote.py)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def exit_now(status: int) -> NoReturn:
    """End this process without the interpreter's teardown (~35 ms of freeing modules), once
    what it opened is closed: logging and stdio are flushed, then os._exit(status). A negative
    status is death by that signal, as the interpreter's own after a KeyboardInterrupt."""
    import logging  # here: the launcher imports this module before its fork, and not logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status & 0xFF)
