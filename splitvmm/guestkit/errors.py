"""The errors of the guest kit builder; each message is one sentence that names the culprit."""

from __future__ import annotations

from splitvmm.errors import SplitvmmError


class GuestKitError(SplitvmmError):
    """The demo guest kit cannot be built (or a cached one cannot be used)."""


class HostToolMissing(GuestKitError):
    """A host program the kit needs (apt-get, apt-cache, dpkg-deb) is not installed."""


class PackageError(GuestKitError):
    """A Debian package cannot be resolved, downloaded or unpacked."""


class KernelModuleError(GuestKitError):
    """A kernel module is missing from the kernel package or cannot be read."""
