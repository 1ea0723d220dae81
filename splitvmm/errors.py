"""The error types of splitvmm: each names what went wrong in one sentence."""


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
