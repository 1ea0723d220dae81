"""Build the demo guest kit into a cache directory, or reuse the one already there.

Layout of the cache:
    vmlinuz-<release>                 the bzImage, copied out of the kernel package
    initramfs-<release>.cpio.gz       busybox + virtio modules + /init
    debian.toml                       the VM config (file names, which `splitvmm up` takes
                                      from the config's directory: a copied kit boots its own)
    disk.img                          the demo VM's virtio-blk disk (raw, sparse); the guest's
                                      data: made once, never rebuilt or overwritten
    manifest.json                     written last: what was built, with sha256 of each file
    .splitvmm-build-XXXXXXXX/         scratch while building (the unpacked packages, and the
                                      kernel and initramfs until both are whole), a new
                                      directory each build, removed (a killed build's by the
                                      next build)

The cache directory is the user's to choose (`--cache-dir`), and may hold other files: the kit
removes only what it made, its scratch directory and the kernel and initramfs an earlier
manifest.json names, never files it merely finds there.

A kit is reused when manifest.json names files that exist with the recorded sha256. The config
is not in the manifest: it is re-rendered on every run (cheap).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from splitvmm import __version__
from splitvmm.guestkit.debian import Package, Progress, Runner, extract, fetch_packages, run_tool
from splitvmm.guestkit.errors import GuestKitError
from splitvmm.guestkit.initramfs import write_initramfs
from splitvmm.guestkit.kernel import (
    SETUP_HEADER_END,
    BzImageInfo,
    UnpackedKernel,
    bzimage_info,
    find_kernel,
)
from splitvmm.guestkit.modules import KernelModules
from splitvmm.guestkit.rootfs import (
    APPLETS,
    VIRTIO_MODULES,
    Module,
    render_init,
    rootfs_entries,
)
from splitvmm.guestkit.vmconfig import CONFIG_HEADER, render_vm_config
from splitvmm.record import Struct

# Bump when the manifest's shape changes. Changes to what goes in the kit (/init, applets,
# modules) need no bump: the recipe fingerprint below catches them.
MANIFEST_FORMAT = 1
MANIFEST = "manifest.json"
CONFIG = "debian.toml"
DISK = "disk.img"
DISK_SIZE = 64 << 20
# The first sector, so that `head -n1 /dev/vda` in the guest shows the disk is this one.
DISK_LABEL = b"splitvmm demo disk: raw, 64 MiB, yours to write\n"
# Debian 12's busybox-static ships /bin/busybox; merged-/usr releases (Debian 13) ship nothing
# under /bin, and have /usr/bin/busybox (as kernel.py MODULE_ROOTS for the modules).
BUSYBOX_IN_PACKAGE = ("bin/busybox", "usr/bin/busybox")
HASH_CHUNK = 1 << 20
SCRATCH_PREFIX = ".splitvmm-build-"
# The names tempfile.mkdtemp gives scratch directories (8 of its characters after a prefix
# that names us): only those are ours to sweep, in a directory that may hold the user's.
SCRATCH_NAME = re.compile(re.escape(SCRATCH_PREFIX) + r"[a-z0-9_]{8}")


class Kit(Struct, frozen=True):
    config: Path
    kernel: Path
    initrd: Path
    release: str  # the kernel's uname -r
    packages: Mapping[str, str]  # Debian package name -> version
    boot_protocol: int
    xloadflags: int
    modules: tuple[str, ...]  # in load order, relative to /lib/modules/<release>
    reused: bool


def recipe_fingerprint() -> str:
    """A hash of what this splitvmm puts in a kit, so a cache built by another recipe rebuilds."""
    recipe = "\0".join((render_init("RELEASE", ["MODULE"]), *APPLETS, "", *VIRTIO_MODULES))
    return hashlib.sha256(recipe.encode()).hexdigest()


def _quiet(message: str) -> None:
    del message


def default_cache_dir(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Path:
    """$XDG_CACHE_HOME/splitvmm/guest, else ~/.cache/splitvmm/guest (XDG: a relative
    XDG_CACHE_HOME is invalid and ignored)."""
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else (home or Path.home()) / ".cache"
    return base / "splitvmm" / "guest"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears at `path` only once complete, so a crash never leaves half a kit."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            yield f
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One build at a time per cache: two would share (and delete) the same build/ dir."""
    with (cache_dir / ".lock").open("a") as lock:  # "a": a .lock found there keeps its bytes
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_kit(
    cache_dir: Path,
    force: bool = False,
    progress: Progress = _quiet,
    run: Runner = run_tool,
) -> Kit:
    """The kit in `cache_dir`: reused if complete and intact (unless `force`), else built."""
    try:
        cache_dir = cache_dir.expanduser().resolve()  # the config holds absolute paths
    except (RuntimeError, OSError) as e:  # a symlink loop, ~user of no such user
        raise GuestKitError(f"cannot use {cache_dir} as the cache directory: {e}") from e
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exist_ok spares a directory only: "File exists" names no fault
        raise GuestKitError(f"cannot use {cache_dir}: it is there, but not a directory") from None
    except OSError as e:
        raise GuestKitError(f"cannot create the cache directory {cache_dir}: {e.strerror}") from e
    # The lock is the first file written, and the cached kit the first read: a directory
    # this user cannot write or read fails there.
    try:
        with _locked(cache_dir):
            _remove_killed_scratch(cache_dir)
            _refuse_foreign_files(cache_dir)
            kit = None if force else load_cached_kit(cache_dir, progress)
            if kit is None:
                earlier = _recorded_files(cache_dir)
                kit = _build(cache_dir, progress, run)
                _remove_stale(earlier, kit)
            _write_config(kit)
            return kit
    except OSError as e:  # the host's trouble (disk full, permissions), not a bug of ours
        raise GuestKitError(f"writing the kit in {cache_dir} failed: {e}") from e


def _remove_killed_scratch(cache_dir: Path) -> None:
    """The scratch of builds killed by a signal, which ran no `finally` (timeout's SIGTERM,
    SIGKILL): with the lock held no other build is using one."""
    for path in cache_dir.iterdir():
        if SCRATCH_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _refuse_foreign_files(cache_dir: Path) -> None:
    """A build overwrites debian.toml and manifest.json: in a directory that holds no kit of
    ours (neither our config nor a manifest naming our files), those names are the user's."""
    with contextlib.suppress(OSError), (cache_dir / CONFIG).open("rb") as f:
        if f.readline().rstrip(b"\n") == CONFIG_HEADER.encode():
            return
    if _recorded_files(cache_dir):
        return
    for name in (CONFIG, MANIFEST):
        path = cache_dir / name
        if path.exists() or path.is_symlink():
            raise GuestKitError(
                f"{path} was not written by `splitvmm guest build`, which would overwrite it;"
                " move it, or choose another --cache-dir"
            )


def _recorded_files(cache_dir: Path) -> set[Path]:
    """The kernel and initramfs an earlier build's manifest names (a stale kit's included):
    the only files a new build may remove."""
    try:
        files = _read_manifest(cache_dir)["files"]
        return {cache_dir / _file_name(files[role]) for role in ("kernel", "initrd")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no manifest, or one we cannot read: nothing of ours to remove


def _remove_stale(earlier: set[Path], kit: Kit) -> None:
    """The kernel and initramfs of an earlier build that this one does not reuse."""
    for path in earlier - {kit.kernel, kit.initrd}:
        path.unlink(missing_ok=True)


def _make_disk(path: Path) -> None:
    """The demo disk, if there is none: a sparse raw image with a label in sector 0."""
    if path.exists():
        return
    with _atomic_output(path) as f:
        f.write(DISK_LABEL)
        f.truncate(DISK_SIZE)


def _write_config(kit: Kit) -> None:
    disk = kit.config.with_name(DISK)
    _make_disk(disk)
    # Names, not absolute paths: relative paths are taken from the config's directory, so a
    # copy of the kit (cp -r) boots its own kernel and writes its own disk, not the original's.
    names = (Path(kit.kernel.name), Path(kit.initrd.name), Path(disk.name))
    data = render_vm_config(*names).encode()
    # Bytes, not text: a config edited in another encoding is a change like any other.
    if not kit.config.is_file() or kit.config.read_bytes() != data:
        with _atomic_output(kit.config) as f:
            f.write(data)


def _build(cache_dir: Path, progress: Progress, run: Runner) -> Kit:
    work = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=cache_dir))  # ours alone
    try:
        kernel_pkg, busybox_pkg = fetch_packages(run, work / "debs", progress)
        progress(f"unpacking {kernel_pkg.name} and {busybox_pkg.name}")
        kernel = find_kernel(extract(run, kernel_pkg, work / "kernel"))
        unpacked = extract(run, busybox_pkg, work / "busybox")
        found = [unpacked / p for p in BUSYBOX_IN_PACKAGE if (unpacked / p).is_file()]
        if not found:
            raise GuestKitError(f"{busybox_pkg.name} has no {' or '.join(BUSYBOX_IN_PACKAGE)}")
        busybox = found[0]
        check_applets(busybox, run, progress)
        kit = _assemble(work, cache_dir, kernel, busybox, (kernel_pkg, busybox_pkg), progress)
        _write_manifest(kit)
        return kit
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble(
    work: Path,
    cache_dir: Path,
    kernel: UnpackedKernel,
    busybox: Path,
    packages: tuple[Package, ...],
    progress: Progress,
) -> Kit:
    """Write vmlinuz and the initramfs from the unpacked packages in the scratch `work`, then
    move both into the cache: a build that fails (or is killed) before then leaves the cache
    as it was, with no kernel of a kit never finished and no earlier kit half replaced."""
    with kernel.vmlinuz.open("rb") as f:
        boot = bzimage_info(f.read(SETUP_HEADER_END))
    progress(f"collecting the virtio modules of {kernel.release}")
    modules = collect_modules(KernelModules(kernel.moddir), VIRTIO_MODULES)
    kit = Kit(
        config=cache_dir / CONFIG,
        kernel=cache_dir / f"vmlinuz-{kernel.release}",
        initrd=cache_dir / f"initramfs-{kernel.release}.cpio.gz",
        release=kernel.release,
        packages={p.name: p.version for p in packages},
        boot_protocol=boot.protocol,
        xloadflags=boot.xloadflags,
        modules=tuple(m.path for m in modules),
        reused=False,
    )
    staged_kernel, staged_initrd = work / kit.kernel.name, work / kit.initrd.name
    with staged_kernel.open("wb") as f, kernel.vmlinuz.open("rb") as src:
        shutil.copyfileobj(src, f)
    progress(f"writing {kit.initrd.name}")
    entries = rootfs_entries(busybox.read_bytes(), kernel.release, modules)
    with staged_initrd.open("wb") as f:
        write_initramfs(entries, f)
    staged_kernel.replace(kit.kernel)
    staged_initrd.replace(kit.initrd)
    return kit


def check_applets(busybox: Path, run: Runner, progress: Progress = _quiet) -> None:
    """Fail at build time, not at boot, if this busybox lacks an applet the kit links."""
    if os.statvfs(busybox).f_flag & os.ST_NOEXEC:  # it cannot run: read its applet table
        progress(f"reading busybox's applets from the binary: {busybox.parent} is noexec")
        have = busybox_applets(busybox.read_bytes())
        if not have:
            raise GuestKitError(
                f"busybox-static holds no applet table to check, and it cannot be run:"
                f" {busybox.parent} is on a noexec file system; choose another --cache-dir"
            )
    else:
        result = run([str(busybox), "--list"])
        if result.returncode != 0:
            raise GuestKitError(f"{busybox} --list failed with exit status {result.returncode}")
        have = set(result.stdout.split())
    missing = sorted(set(APPLETS) - have)
    if missing:
        raise GuestKitError(f"busybox-static lacks the applets {', '.join(missing)}")


_APPLET_NAME = re.compile(rb"[\x21-\x7e]+")


def busybox_applets(image: bytes) -> set[str]:
    """The applets of a busybox binary, read without running it: busybox keeps their names in
    one table (applet_names), each NUL-terminated, in strcmp order, "[" (test) first. The
    longest such run in the binary; empty if there is none. What precedes the table is
    another object's last byte (applet_flags, in a static build), not always a NUL."""
    best: list[bytes] = []
    start = image.find(b"[\0")
    while start != -1:
        names, at = [b"["], start + 2
        while (end := image.find(b"\0", at)) != -1:
            name = image[at:end]
            if name <= names[-1] or not _APPLET_NAME.fullmatch(name):
                break
            names.append(name)
            at = end + 1
        best = max(best, names, key=len)
        start = image.find(b"[\0", start + 1)
    return {name.decode() for name in best}


def collect_modules(kernel_modules: KernelModules, wanted: tuple[str, ...]) -> list[Module]:
    """The modules for `wanted` in load order, as they will sit in the initramfs.

    .ko and .ko.xz files go in as they are: busybox-static's insmod (1.35, Debian 12)
    decompresses xz itself (checked: it hands init_module the uncompressed size). Other
    compressions are decompressed here, since that support was not checked.
    """
    modules = []
    for name in kernel_modules.plan(wanted):
        path = kernel_modules.path(name)
        if path.endswith((".ko", ".ko.xz")):
            modules.append(Module(path, (kernel_modules.moddir / path).read_bytes()))
        else:
            stem = path[: path.rindex(".ko")]
            modules.append(Module(f"{stem}.ko", kernel_modules.image(name)))
    return modules


def _manifest(kit: Kit) -> dict[str, object]:
    return {
        "format": MANIFEST_FORMAT,
        "producer": f"splitvmm {__version__}",
        "recipe": recipe_fingerprint(),
        "release": kit.release,
        "packages": dict(kit.packages),
        "boot_protocol": kit.boot_protocol,
        "xloadflags": kit.xloadflags,
        "modules": list(kit.modules),
        "files": {
            "kernel": {"name": kit.kernel.name, "sha256": sha256_file(kit.kernel)},
            "initrd": {"name": kit.initrd.name, "sha256": sha256_file(kit.initrd)},
        },
    }


def _write_manifest(kit: Kit) -> None:
    text = json.dumps(_manifest(kit), indent=2, sort_keys=True) + "\n"
    with _atomic_output(kit.config.with_name(MANIFEST)) as f:
        f.write(text.encode())


def load_cached_kit(cache_dir: Path, progress: Progress = _quiet) -> Kit | None:
    """The kit recorded in the cache's manifest if every file in it is intact, else None."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        kit, hashes = _parse_manifest(cache_dir, _read_manifest(cache_dir))
    except KeyError as e:
        progress(f"the cached kit's {MANIFEST} has no {e.args[0]!r} field; rebuilding")
        return None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        progress(f"the cached kit's {MANIFEST} is unusable: {e}; rebuilding")
        return None
    for file, want in hashes.items():
        if not file.is_file() or sha256_file(file) != want:
            progress(f"the cached {file.name} is missing or changed; rebuilding")
            return None
    progress(f"reusing the kit in {cache_dir}")
    return kit


def _read_manifest(cache_dir: Path) -> Any:
    """What manifest.json holds; ValueError for JSON nested past the decoder's depth (a
    RecursionError), which no manifest of ours is."""
    try:
        return json.loads((cache_dir / MANIFEST).read_text())
    except RecursionError:
        raise ValueError("it is nested too deep") from None


def _file_name(entry: Any) -> str:
    """A name in the cache directory; ValueError for one no file can have (a NUL, a lone
    surrogate: unlink() and open() would raise that, later)."""
    name = entry["name"]
    if not isinstance(name, str) or "/" in name or "\0" in name or name in ("", ".", ".."):
        raise ValueError(f"bad file name {name!r}")
    os.fsencode(name)  # UnicodeEncodeError, a ValueError, for a lone surrogate
    return name


def _parse_manifest(cache_dir: Path, data: Any) -> tuple[Kit, dict[Path, str]]:
    """Raises ValueError, KeyError, TypeError, AttributeError or OverflowError (an infinite
    float where an int goes) on anything unexpected."""
    if data["format"] != MANIFEST_FORMAT:
        raise ValueError(f"format {data['format']!r}, this splitvmm writes {MANIFEST_FORMAT}")
    if data["recipe"] != recipe_fingerprint():
        raise ValueError("it was built by another version of the kit recipe")
    files = data["files"]
    kernel = cache_dir / _file_name(files["kernel"])
    initrd = cache_dir / _file_name(files["initrd"])
    kit = Kit(
        config=cache_dir / CONFIG,
        kernel=kernel,
        initrd=initrd,
        release=str(data["release"]),
        packages={str(k): str(v) for k, v in data["packages"].items()},
        boot_protocol=int(data["boot_protocol"]),
        xloadflags=int(data["xloadflags"]),
        modules=tuple(str(m) for m in data["modules"]),
        reused=True,
    )
    hashes = {kernel: str(files["kernel"]["sha256"]), initrd: str(files["initrd"]["sha256"])}
    return kit, hashes


def describe(kit: Kit) -> str:
    """One line for people: what the kit is and how big."""
    boot = BzImageInfo(kit.boot_protocol, kit.xloadflags)
    packages = ", ".join(f"{name} {version}" for name, version in kit.packages.items())
    return (
        f"kernel {kit.release} ({kit.kernel.name} {_mib(kit.kernel)}, boot protocol"
        f" {boot.protocol_text}, xloadflags {kit.xloadflags:#x}); {kit.initrd.name}"
        f" {_mib(kit.initrd)} with {len(kit.modules)} modules; from {packages}"
    )


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / (1 << 20):.1f} MiB"
