"""Debian packages for the kit: resolve, download (`apt-get download`) and unpack
(`dpkg-deb -x`) into a directory, without installing anything on the host.

apt-get update policy: the package lists are used as they are, and refreshed once only when
resolving or downloading fails. Most Debian hosts have lists (an update costs tens of seconds
and needs root), and both ways stale or missing lists show up, "No packages found" and a 404
for a version the mirror has dropped, are fixed by one update and a retry.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from splitvmm.guestkit.errors import GuestKitError, HostToolMissing, PackageError
from splitvmm.record import Struct

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# What the metapackage points at: linux-image-6.1.0-50-cloud-amd64 (never "-dbg", never the
# metapackage itself).
KERNEL_PACKAGE = re.compile(r"^linux-image-\d[\w.+~-]*-cloud-amd64(?:-unsigned)?$")
APT_ERROR_MAX = 300  # characters of apt's message kept in ours

Progress = Callable[[str], None]


class Runner(Protocol):
    def __call__(
        self, argv: Sequence[str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]: ...


def run_tool(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host program and capture its output; the C locale keeps apt's output parseable."""
    env = {**os.environ, "LC_ALL": "C"}
    try:
        return subprocess.run(
            list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise HostToolMissing(
            f"{argv[0]} is not installed, and `splitvmm guest build` needs Debian's apt and dpkg"
            " (apt-get, apt-cache, dpkg-deb)"
        ) from None
    except OSError as e:
        raise GuestKitError(f"cannot run {argv[0]}: {e.strerror}") from None


def tool_error(result: subprocess.CompletedProcess[str]) -> str:
    """apt's own error lines, else the last line printed, shortened. dpkg-deb -x ends with
    only "tar subprocess returned error exit status 2": tar's first "Cannot ..." line, which
    says why (a full disk, a permission), goes first."""
    lines = (result.stderr + "\n" + result.stdout).strip().splitlines()
    errors = [line.removeprefix("E: ") for line in lines if line.startswith("E: ")]
    if not errors and lines:
        causes = [line for line in lines if line.startswith("tar: ") and ": Cannot " in line]
        errors = causes[:1] + lines[-1:]
    text = "; ".join(errors) or f"exit status {result.returncode}"
    return text[:APT_ERROR_MAX]


def parse_depends(output: str) -> list[str]:
    """The `Depends:` package names in `apt-cache depends` output, in order."""
    names = []
    for line in output.splitlines():
        kind, colon, name = line.strip().lstrip("|").partition(":")
        if colon and kind == "Depends":
            names.append(name.strip())
    return names


def resolve_kernel_package(run: Runner, metapackage: str = KERNEL_METAPACKAGE) -> str:
    """The real kernel package behind the metapackage, for the candidate version."""
    result = run(["apt-cache", "depends", metapackage])
    if result.returncode != 0:
        raise PackageError(f"cannot resolve {metapackage}: {tool_error(result)}")
    kernels = [name for name in parse_depends(result.stdout) if KERNEL_PACKAGE.fullmatch(name)]
    if not kernels:
        raise PackageError(f"{metapackage} depends on no linux-image-<version>-cloud-amd64")
    return kernels[0]


class Package(Struct, frozen=True):
    """A downloaded .deb and what dpkg-deb says it is."""

    name: str
    version: str
    deb: Path


def download(run: Runner, package: str, dest: Path) -> Package:
    """`apt-get download` one package into `dest` (which holds no other version of it)."""
    result = run(["apt-get", "download", package], cwd=dest)
    if result.returncode != 0:
        raise PackageError(f"apt-get download {package} failed: {tool_error(result)}")
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise PackageError(f"apt-get download {package} left {len(debs)} .deb files in {dest}")
    info = run(["dpkg-deb", "--field", str(debs[0]), "Version"])
    if info.returncode != 0:
        raise PackageError(f"dpkg-deb cannot read {debs[0].name}: {tool_error(info)}")
    return Package(package, info.stdout.strip(), debs[0])


def extract(run: Runner, package: Package, dest: Path) -> Path:
    """Unpack a .deb's files under `dest` (no maintainer scripts run, nothing installed)."""
    result = run(["dpkg-deb", "-x", str(package.deb), str(dest)])
    if result.returncode != 0:
        raise PackageError(f"dpkg-deb could not unpack {package.name}: {tool_error(result)}")
    return dest


def update_lists(run: Runner) -> None:
    result = run(["apt-get", "update"])
    if result.returncode != 0:
        needs_root = " (it needs root)" if os.geteuid() != 0 else ""
        raise PackageError(f"apt-get update failed{needs_root}: {tool_error(result)}")


def _fetch(run: Runner, dest: Path, progress: Progress) -> tuple[Package, Package]:
    for stale in dest.glob("*.deb"):  # a failed first try may have left another version
        stale.unlink()
    progress(f"resolving {KERNEL_METAPACKAGE}")
    kernel_name = resolve_kernel_package(run)
    progress(f"downloading {kernel_name}")
    kernel = download(run, kernel_name, dest)
    progress(f"downloading {BUSYBOX_PACKAGE}")
    busybox = download(run, BUSYBOX_PACKAGE, dest)
    return kernel, busybox


def fetch_packages(run: Runner, dest: Path, progress: Progress) -> tuple[Package, Package]:
    """Download the cloud kernel and busybox-static; (kernel, busybox)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch(run, dest, progress)
    except PackageError as e:
        first = e
        progress(f"{e}; refreshing the package lists (apt-get update) and retrying")
    try:
        update_lists(run)
    except PackageError as e:  # the first failure is the one to fix; the update's comes after
        raise PackageError(f"{first}; then {e}") from e
    return _fetch(run, dest, progress)
