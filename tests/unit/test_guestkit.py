"""The guest kit builder: module dependencies, /init, the VM config, the cache, apt/dpkg use.

No network and no host tools: apt-get, apt-cache, dpkg-deb and busybox are played by
FakeHost, which lays out a synthetic kernel package like the real one (boot/vmlinuz-<rel>,
lib/modules/<rel>/...).
"""

from __future__ import annotations

import errno
import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitvmm.cli import guest as guest_cli
from splitvmm.config import load_config
from splitvmm.guestkit import debian, kit
from splitvmm.guestkit.errors import (
    GuestKitError,
    HostToolMissing,
    KernelModuleError,
    PackageError,
)
from splitvmm.guestkit.kernel import bzimage_info
from splitvmm.guestkit.modules import (
    ELF64_EHDR,
    ELF64_SHDR,
    KernelModules,
    load_order,
    module_name,
    parse_modules_dep,
    read_modinfo,
)
from splitvmm.guestkit.rootfs import APPLETS, VIRTIO_MODULES, Module, render_init, rootfs_entries
from splitvmm.guestkit.vmconfig import DISK_SERIAL, KERNEL_CMDLINE, render_vm_config
from splitvmm.record import replace
from tests.unit.test_initramfs import parse_newc

RELEASE = "6.1.0-50-cloud-amd64"
KERNEL_PACKAGE = f"linux-image-{RELEASE}"

# What depmod writes for the virtio drivers of Debian's 6.1 cloud kernel (dependencies listed
# after the colon; a module appears once per line).
MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko \
kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
"""


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 little-endian file: header, section contents, then section headers."""
    names = [*sections, ".shstrtab"]
    shstrtab = b"\0" + b"".join(name.encode() + b"\0" for name in names)
    contents = [*sections.values(), shstrtab]
    body, offsets = b"", []
    for data in contents:
        offsets.append(ELF64_EHDR.size + len(body))
        body += data
    shdrs = ELF64_SHDR.pack(*[0] * 10)
    for name, offset, data in zip(names, offsets, contents, strict=True):
        name_offset = shstrtab.index(name.encode() + b"\0")
        shdrs += ELF64_SHDR.pack(name_offset, 1, 0, 0, offset, len(data), 0, 0, 1, 0)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    shnum = len(names) + 1
    ehdr = ELF64_EHDR.pack(
        ident, 1, 62, 1, 0, 0, ELF64_EHDR.size + len(body), 0, 64, 0, 0, 64, shnum, shnum - 1
    )
    return ehdr + body + shdrs


def make_module(name: str, depends: str) -> bytes:
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    return make_elf({".text": b"\xc3", ".modinfo": modinfo})


def make_bzimage(protocol: int = 0x020F, xloadflags: int = 0x7F) -> bytes:
    image = bytearray(0x1000)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, protocol)
    struct.pack_into("<H", image, 0x236, xloadflags)
    return bytes(image)


def write_module_tree(moddir: Path, modules_dep: str) -> None:
    """Files named in modules.dep, each holding its own path (easy to recognise later)."""
    for line in modules_dep.replace("\\\n", "").splitlines():
        path = line.partition(":")[0]
        (moddir / path).parent.mkdir(parents=True, exist_ok=True)
        (moddir / path).write_bytes(path.encode())


class FakeHost:
    """apt-cache, apt-get, dpkg-deb and busybox as a Debian 12 host with lists answers them."""

    def __init__(self, have_lists: bool = True) -> None:
        self.have_lists = have_lists
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.calls.append(argv)
        if argv[:2] == ["apt-get", "update"]:
            self.have_lists = True
            return self._result(argv)
        if argv[0] in ("apt-cache", "apt-get") and not self.have_lists:
            return self._result(argv, 100, "E: No packages found")
        if argv[:2] == ["apt-cache", "depends"]:
            return self._result(argv, out=f"{argv[2]}\n  Depends: {KERNEL_PACKAGE}\n")
        if argv[:2] == ["apt-get", "download"] and cwd is not None:
            (cwd / f"{argv[2]}_1.0_amd64.deb").write_bytes(b"!<arch>\n")
            return self._result(argv)
        if argv[:2] == ["dpkg-deb", "--field"]:
            return self._result(argv, out="1.0\n")
        if argv[:2] == ["dpkg-deb", "-x"]:
            self._unpack(Path(argv[2]).name, Path(argv[3]))
            return self._result(argv)
        if argv[1:] == ["--list"]:
            return self._result(argv, out="\n".join(APPLETS) + "\n")
        raise AssertionError(f"unexpected command {argv}")

    @staticmethod
    def _result(
        argv: list[str], rc: int = 0, err: str = "", out: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, rc, out, err)

    USR = ""  # where the packages put /bin and /lib: "usr/" on a merged-/usr release

    def _unpack(self, deb: str, dest: Path) -> None:
        if deb.startswith("busybox-static_"):
            (dest / self.USR / "bin").mkdir(parents=True)
            (dest / self.USR / "bin/busybox").write_bytes(self.BUSYBOX)
            return
        (dest / "boot").mkdir(parents=True)
        (dest / f"boot/vmlinuz-{RELEASE}").write_bytes(make_bzimage())
        moddir = dest / self.USR / "lib/modules" / RELEASE
        write_module_tree(moddir, MODULES_DEP)
        (moddir / "modules.dep").write_text(MODULES_DEP)

    BUSYBOX = b"\x7fELF busybox"


# --- module names and dependencies -------------------------------------------------------


def test_module_name_dash_in_file_name_becomes_underscore():
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"


def test_module_name_xz_suffix_is_stripped():
    assert module_name("kernel/drivers/virtio/virtio_ring.ko.xz") == "virtio_ring"


def test_module_name_not_a_module_raises():
    with pytest.raises(KernelModuleError, match="not a kernel module"):
        module_name("modules.order")


def test_parse_modules_dep_synthetic_gives_paths_and_deps():
    index = parse_modules_dep(MODULES_DEP)
    assert index.paths["virtio_rng"] == "kernel/drivers/char/hw_random/virtio-rng.ko"
    assert index.deps["net_failover"] == ("failover",)


def test_load_order_synthetic_modules_dep_puts_dependencies_first():
    index = parse_modules_dep(MODULES_DEP)
    order = load_order(["virtio_net", "virtio_blk"], index.deps.__getitem__)
    assert order == [
        "virtio_ring",
        "virtio",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_blk",
    ]


def test_load_order_all_virtio_modules_each_once():
    index = parse_modules_dep(MODULES_DEP)
    order = load_order(VIRTIO_MODULES, index.deps.__getitem__)
    assert sorted(order) == sorted(VIRTIO_MODULES)


def test_load_order_dash_and_underscore_names_are_one_module():
    order = load_order(["virtio-rng", "virtio_rng"], {"virtio_rng": ()}.__getitem__)
    assert order == ["virtio_rng"]


def test_load_order_cycle_raises_naming_the_cycle():
    deps = {"a": ("b",), "b": ("c",), "c": ("a",)}
    with pytest.raises(KernelModuleError, match="a -> b -> c -> a"):
        load_order(["a"], deps.__getitem__)


def test_read_modinfo_synthetic_module_gives_depends_and_name():
    info = read_modinfo(make_module("virtio_pci", "virtio_ring,virtio"))
    assert (info["depends"], info["name"]) == (["virtio_ring,virtio"], ["virtio_pci"])


def test_read_modinfo_not_elf_raises():
    with pytest.raises(KernelModuleError, match="not an ELF"):
        read_modinfo(b"#!/bin/sh\n" + bytes(100))


def test_read_modinfo_elf_without_modinfo_raises():
    with pytest.raises(KernelModuleError, match="no .modinfo"):
        read_modinfo(make_elf({".text": b"\xc3"}))


def test_kernel_modules_without_modules_dep_reads_modinfo_of_xz_modules(tmp_path: Path):
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/failover.ko").write_bytes(make_module("failover", ""))
    net_failover = make_module("net_failover", "failover")
    (tmp_path / "kernel/net_failover.ko.xz").write_bytes(lzma.compress(net_failover))
    assert KernelModules(tmp_path).plan(["net_failover"]) == ["failover", "net_failover"]


def test_kernel_modules_plan_leaves_out_builtin_modules(tmp_path: Path):
    write_module_tree(tmp_path, MODULES_DEP)
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    (tmp_path / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    assert KernelModules(tmp_path).plan(["virtio_blk", "failover"]) == ["failover"]


def test_kernel_modules_unknown_module_raises_naming_it(tmp_path: Path):
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    with pytest.raises(KernelModuleError, match="virtio_scsi is not in"):
        KernelModules(tmp_path).plan(["virtio_scsi"])


def test_collect_modules_xz_module_is_kept_compressed(tmp_path: Path):
    image = make_module("failover", "")
    (tmp_path / "failover.ko.xz").write_bytes(lzma.compress(image))
    (module,) = kit.collect_modules(KernelModules(tmp_path), ("failover",))
    assert (module.path, lzma.decompress(module.data)) == ("failover.ko.xz", image)


def test_collect_modules_gz_module_is_decompressed(tmp_path: Path):
    image = make_module("failover", "")
    (tmp_path / "failover.ko.gz").write_bytes(gzip.compress(image))
    (module,) = kit.collect_modules(KernelModules(tmp_path), ("failover",))
    assert (module.path, module.data) == ("failover.ko", image)


# --- /init and the initramfs layout --------------------------------------------------------

INIT = render_init(RELEASE, ["kernel/a.ko", "kernel/b.ko.xz"])


def test_render_init_starts_with_shebang():
    assert INIT.startswith("#!/bin/sh\n")


def test_render_init_mounts_before_marker_before_insmod():
    positions = [
        INIT.index("mount -t proc proc /proc"),
        INIT.index("mount -t sysfs sysfs /sys"),
        INIT.index("mount -t devtmpfs devtmpfs /dev"),
        INIT.index('echo "splitvmm demo guest: init running"'),
        INIT.index("uname -a"),
        INIT.index('insmod "$m"'),
        INIT.index("cat /proc/partitions"),
        INIT.index("poweroff -f"),
        INIT.index("reboot -f"),
    ]
    assert positions == sorted(positions)


def test_render_init_lists_modules_in_the_given_order():
    first = INIT.index(f"/lib/modules/{RELEASE}/kernel/a.ko \\\n")
    second = INIT.index(f"/lib/modules/{RELEASE}/kernel/b.ko.xz \\\n")
    assert first < second


def test_render_init_shell_only_with_splitvmm_shell_on_cmdline():
    assert '*" splitvmm.shell "*)\n' in INIT
    assert INIT.index("setsid cttyhack sh") < INIT.index("poweroff -f")


def test_render_init_powers_off_only_with_acpi_then_resets():
    assert "[ -d /sys/firmware/acpi ] && poweroff -f\nreboot -f\n" in INIT


def test_render_init_uses_only_linked_applets():
    commands = {"[", "mount", "echo", "uname", "insmod", "cat", "setsid", "cttyhack", "poweroff"}
    commands |= {"reboot"}
    assert commands <= set(APPLETS)


ROOTFS = rootfs_entries(b"BB", RELEASE, [Module("kernel/drivers/virtio/virtio.ko", b"KO")])
ROOTFS_BY_NAME = {e.name: e for e in ROOTFS}


def test_rootfs_entries_have_dev_console_5_1():
    console = ROOTFS_BY_NAME["dev/console"]
    assert (console.rdev_major, console.rdev_minor) == (5, 1)


def test_rootfs_entries_link_applets_to_busybox():
    assert (ROOTFS_BY_NAME["bin/sh"].data, ROOTFS_BY_NAME["bin/poweroff"].data) == (
        b"busybox",
        b"busybox",
    )


def test_rootfs_entries_parents_come_before_children():
    names = [e.name for e in ROOTFS]
    early = [n for n in names if "/" in n and n.rpartition("/")[0] not in names[: names.index(n)]]
    assert early == []


def test_rootfs_entries_module_under_lib_modules_release():
    module = ROOTFS_BY_NAME[f"lib/modules/{RELEASE}/kernel/drivers/virtio/virtio.ko"]
    assert module.data == b"KO"


def test_rootfs_entries_init_is_executable():
    assert ROOTFS_BY_NAME["init"].mode & 0o111 == 0o111


# --- the VM config -------------------------------------------------------------------------


def test_render_vm_config_parses_with_the_kit_paths_serial_disk_and_rng():
    text = render_vm_config(Path("/c/vmlinuz"), Path("/c/initrd.gz"), Path("/c/disk.img"))
    config = tomllib.loads(text)
    assert config["vm"] == {"name": "debian", "memory": "512M", "vcpus": 1}
    assert (config["boot"]["kernel"], config["boot"]["initrd"]) == ("/c/vmlinuz", "/c/initrd.gz")
    assert config["device"] == [
        {"name": "serial0", "model": "serial", "output": "stdio"},
        {"name": "disk0", "model": "virtio-blk", "path": "/c/disk.img", "serial": DISK_SERIAL},
        {"name": "rng0", "model": "virtio-rng"},
    ]


def test_render_vm_config_path_with_quote_and_backslash_round_trips():
    odd = Path('/c/a "b"\\c\n/vmlinuz')
    config = tomllib.loads(render_vm_config(odd, Path("/c/i"), Path("/c/d")))
    assert config["boot"]["kernel"] == str(odd)


def test_kernel_cmdline_has_serial_console_and_pvm_workarounds():
    words = KERNEL_CMDLINE.split()
    assert {"console=ttyS0", "reboot=k", "panic=-1", "noxsave", "nopcid"} <= set(words)
    assert (
        "clearcpuid=cx16,xsave,popcnt,rdrand,rdseed,fsgsbase,smap,pcid,invpcid,avx,avx2,rdpid"
        in words
    )


# --- the bzImage check ---------------------------------------------------------------------


def test_bzimage_info_reads_protocol_and_xloadflags():
    info = bzimage_info(make_bzimage(0x020F, 0x7F))
    assert (info.protocol, info.xloadflags, info.protocol_text) == (0x020F, 0x7F, "2.15")


def test_bzimage_info_without_hdrs_raises():
    with pytest.raises(GuestKitError, match="HdrS"):
        bzimage_info(bytes(0x1000))


def test_bzimage_info_without_64bit_entry_raises():
    with pytest.raises(GuestKitError, match="64-bit entry"):
        bzimage_info(make_bzimage(0x020F, 0x0))


# --- apt and dpkg --------------------------------------------------------------------------


def test_parse_depends_apt_cache_output_gives_names_in_order():
    output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-50-cloud-amd64\n |Depends: x\n"
    assert debian.parse_depends(output) == ["linux-image-6.1.0-50-cloud-amd64", "x"]


def test_resolve_kernel_package_metapackage_gives_versioned_package():
    assert debian.resolve_kernel_package(FakeHost()) == KERNEL_PACKAGE


def test_fetch_packages_without_lists_updates_once_and_retries(tmp_path: Path):
    host = FakeHost(have_lists=False)
    kernel, busybox = debian.fetch_packages(host, tmp_path, kit._quiet)
    assert (kernel.name, busybox.name, kernel.version) == (KERNEL_PACKAGE, "busybox-static", "1.0")
    assert host.calls.count(["apt-get", "update"]) == 1


def test_fetch_packages_update_fails_raises_package_error(tmp_path: Path):
    def no_network(argv: Sequence[str], cwd: Path | None = None):
        return subprocess.CompletedProcess(list(argv), 100, "", "E: Temporary failure resolving")

    with pytest.raises(PackageError, match="apt-get update failed.*Temporary failure"):
        debian.fetch_packages(no_network, tmp_path, kit._quiet)


def test_download_failure_names_the_package(tmp_path: Path):
    def not_found(argv: Sequence[str], cwd: Path | None = None):
        return subprocess.CompletedProcess(list(argv), 100, "", "E: Unable to locate package x")

    with pytest.raises(PackageError, match="apt-get download busybox-static failed"):
        debian.download(not_found, "busybox-static", tmp_path)


def test_run_tool_missing_program_raises_naming_it(monkeypatch: pytest.MonkeyPatch):
    def missing(*args: object, **kwargs: object):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(debian.subprocess, "run", missing)
    with pytest.raises(HostToolMissing, match="^dpkg-deb is not installed"):
        debian.run_tool(["dpkg-deb", "-x", "a.deb", "/tmp/x"])


# --- the cache -----------------------------------------------------------------------------


def test_default_cache_dir_absolute_xdg_cache_home_is_used():
    path = kit.default_cache_dir({"XDG_CACHE_HOME": "/xdg"}, home=Path("/home/u"))
    assert path == Path("/xdg/splitvmm/guest")


def test_default_cache_dir_relative_xdg_cache_home_is_ignored():
    path = kit.default_cache_dir({"XDG_CACHE_HOME": "rel"}, home=Path("/home/u"))
    assert path == Path("/home/u/.cache/splitvmm/guest")


def test_build_kit_fresh_cache_writes_config_that_names_the_kit(tmp_path: Path):
    built = kit.build_kit(tmp_path, run=FakeHost())
    config = load_config(built.config)  # as `splitvmm up` reads it
    assert (config.boot.kernel, config.boot.initrd) == (
        tmp_path / f"vmlinuz-{RELEASE}",
        tmp_path / f"initramfs-{RELEASE}.cpio.gz",
    )
    assert config.boot.cmdline == KERNEL_CMDLINE


def test_build_kit_makes_the_disk_once_and_never_overwrites_it(tmp_path: Path):
    built = kit.build_kit(tmp_path, run=FakeHost())
    disk = tmp_path / kit.DISK
    assert load_config(built.config).devices[1].options["path"] == str(disk)
    assert disk.stat().st_size == kit.DISK_SIZE
    assert disk.read_bytes()[: len(kit.DISK_LABEL)] == kit.DISK_LABEL
    with disk.open("r+b") as f:  # the guest wrote to it
        f.write(b"guest data")
    kit.build_kit(tmp_path, run=FakeHost(), force=True)
    assert disk.read_bytes().startswith(b"guest data")


def test_build_kit_initramfs_holds_modules_in_load_order(tmp_path: Path):
    built = kit.build_kit(tmp_path, run=FakeHost())
    archive = parse_newc(gzip.decompress(built.initrd.read_bytes()))
    names = [m.raw_name.rstrip(b"\0").decode() for m in archive]
    assert f"lib/modules/{RELEASE}/kernel/drivers/char/hw_random/virtio-rng.ko" in names
    assert built.modules[:2] == (
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
    )


def test_build_kit_manifest_records_sha256_of_kernel_and_initrd(tmp_path: Path):
    built = kit.build_kit(tmp_path, run=FakeHost())
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert files["kernel"]["sha256"] == kit.sha256_file(built.kernel)
    assert files["initrd"]["sha256"] == kit.sha256_file(built.initrd)


def test_build_kit_leaves_no_build_directory(tmp_path: Path):
    kit.build_kit(tmp_path, run=FakeHost())
    assert not list(tmp_path.glob(".splitvmm-build-*"))


@pytest.mark.parametrize("force", [False, True])
def test_build_kit_removes_the_scratch_of_a_killed_build(tmp_path: Path, force: bool):
    """A build killed by a signal (timeout's SIGTERM, SIGKILL) runs no finally: its scratch,
    tens of MiB of unpacked packages, was left for good, one more each time."""
    kit.build_kit(tmp_path, run=FakeHost())
    killed = tmp_path / ".splitvmm-build-k1ll3d_x"  # as tempfile.mkdtemp names it
    (killed / "debs").mkdir(parents=True)
    (killed / "debs" / "busybox-static_1.0_amd64.deb").write_bytes(b"!<arch>\n")
    (tmp_path / ".splitvmm-build-notes").write_text("mine")  # not a name mkdtemp gives
    (tmp_path / ".build-k1ll3d_x").mkdir()  # another tool's scratch: not ours

    kit.build_kit(tmp_path, force=force, run=FakeHost())

    assert not killed.exists()
    assert (tmp_path / ".splitvmm-build-notes").read_text() == "mine"
    assert (tmp_path / ".build-k1ll3d_x").is_dir()


def test_build_kit_removes_only_what_it_made(tmp_path: Path):
    """--cache-dir is the user's choice: files the kit finds there are not its own, even
    named like its kernels (a --cache-dir /boot must not lose the host's)."""
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "notes.txt").write_text("mine")
    (tmp_path / "vmlinuz-6.1-mine").write_bytes(b"host kernel")
    manifest = {"files": {"kernel": {"name": "vmlinuz-0.1-old"}, "initrd": {"name": "i-old"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # an earlier kit's
    (tmp_path / "vmlinuz-0.1-old").write_bytes(b"ours, stale")

    kit.build_kit(tmp_path, run=FakeHost())

    assert (tmp_path / "build" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "vmlinuz-6.1-mine").read_bytes() == b"host kernel"
    assert not (tmp_path / "vmlinuz-0.1-old").exists()


def test_build_kit_second_run_reuses_without_running_anything(tmp_path: Path):
    kit.build_kit(tmp_path, run=FakeHost())
    host = FakeHost()
    again = kit.build_kit(tmp_path, run=host)
    assert (again.reused, host.calls) == (True, [])


def test_build_kit_force_rebuilds(tmp_path: Path):
    kit.build_kit(tmp_path, run=FakeHost())
    again = kit.build_kit(tmp_path, force=True, run=FakeHost())
    assert again.reused is False


def test_build_kit_changed_initrd_rebuilds(tmp_path: Path):
    first = kit.build_kit(tmp_path, run=FakeHost())
    good = first.initrd.read_bytes()
    first.initrd.write_bytes(b"corrupt")
    again = kit.build_kit(tmp_path, run=FakeHost())
    assert (again.reused, again.initrd.read_bytes() == good) == (False, True)


def test_build_kit_moved_cache_config_names_the_moved_kit(tmp_path: Path):
    kit.build_kit(tmp_path / "a", run=FakeHost())
    (tmp_path / "a").rename(tmp_path / "b")
    moved = kit.build_kit(tmp_path / "b", run=FakeHost())
    assert (moved.reused, load_config(moved.config).boot.kernel) == (
        True,
        tmp_path / f"b/vmlinuz-{RELEASE}",
    )


def test_build_kit_config_that_is_not_utf8_is_rewritten(tmp_path: Path):
    """debian.toml is re-rendered every run: one edited in another encoding (a Latin-1 é) is
    replaced like any other change, not a UnicodeDecodeError traceback."""
    built = kit.build_kit(tmp_path, run=FakeHost())
    good = built.config.read_bytes()
    built.config.write_bytes(good + b"# caf\xe9\n")
    again = kit.build_kit(tmp_path, run=FakeHost())
    assert (again.reused, again.config.read_bytes()) == (True, good)


def test_build_kit_manifest_of_another_recipe_rebuilds(tmp_path: Path):
    kit.build_kit(tmp_path, run=FakeHost())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "recipe": "0" * 64}))
    again = kit.build_kit(tmp_path, run=FakeHost())
    assert again.reused is False


def test_build_kit_garbage_manifest_rebuilds(tmp_path: Path):
    kit.build_kit(tmp_path, run=FakeHost())
    (tmp_path / "manifest.json").write_text('["not", "a", "manifest"]')
    again = kit.build_kit(tmp_path, run=FakeHost())
    assert again.reused is False


@pytest.mark.parametrize(
    "field,value",
    [
        ("boot_protocol", "Infinity"),  # json.loads gives a float that int() cannot take
        ("files", '{"kernel": {"name": "v\\u0000x", "sha256": ""}, "initrd": {"name": "i"}}'),
        ("files", '{"kernel": {"name": "v\\ud800", "sha256": ""}, "initrd": {"name": "i"}}'),
        ("modules", "[" * 100_000 + "]" * 100_000),  # deeper than the decoder recurses
    ],
    ids=["infinity", "nul-in-name", "lone-surrogate-name", "deep"],
)
def test_build_kit_manifest_with_values_of_no_use_rebuilds(tmp_path: Path, field: str, value: str):
    """A manifest.json that JSON reads but no kit of ours wrote (a value no int, a file name
    no file can have, nesting past the decoder's depth) is unusable, as garbage is: it was
    an OverflowError, a ValueError from unlink() or a RecursionError, as a traceback."""
    kit.build_kit(tmp_path, run=FakeHost())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    text = json.dumps({**manifest, field: "@"}).replace('"@"', value)
    (tmp_path / "manifest.json").write_text(text)

    again = kit.build_kit(tmp_path, run=FakeHost())

    assert again.reused is False


class RespunKernelHost(FakeHost):
    """A newer upload of the same kernel ABI: the same release (uname -r), another bzImage."""

    def _unpack(self, deb: str, dest: Path) -> None:
        super()._unpack(deb, dest)
        if not deb.startswith("busybox-static_"):
            (dest / f"boot/vmlinuz-{RELEASE}").write_bytes(make_bzimage(protocol=0x020E))


def disk_full(entries: object, out: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_build_kit_failing_first_build_leaves_only_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A disk full while the initramfs was written: the kernel was in the cache already, named
    by no manifest, so no later build removed it (one of another release never will)."""
    monkeypatch.setattr(kit, "write_initramfs", disk_full)
    with pytest.raises(GuestKitError, match="No space left on device"):
        kit.build_kit(tmp_path, run=FakeHost())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_build_kit_failing_rebuild_leaves_the_earlier_kit_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A rebuild that failed half-way had replaced the kernel already: debian.toml then
    booted the new kernel with the old initramfs, and the earlier kit was lost."""
    first = kit.build_kit(tmp_path, run=FakeHost())
    monkeypatch.setattr(kit, "write_initramfs", disk_full)
    with pytest.raises(GuestKitError, match="No space left on device"):
        kit.build_kit(tmp_path, force=True, run=RespunKernelHost())
    assert kit.load_cached_kit(tmp_path) == replace(first, reused=True)


# --- the CLI -------------------------------------------------------------------------------


def test_guest_build_cli_prints_config_path_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(
        guest_cli, "build_kit", lambda cache, force, progress: kit.build_kit(cache, run=FakeHost())
    )
    result = CliRunner().invoke(guest_cli.command, ["build", "--cache-dir", str(tmp_path)])
    assert (result.exit_code, result.stdout) == (0, f"{tmp_path / 'debian.toml'}\n")


def test_guest_build_cli_kit_error_exits_1_with_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def fail(cache: Path, force: bool, progress: object) -> kit.Kit:
        raise PackageError("apt-get download busybox-static failed: 404")

    monkeypatch.setattr(guest_cli, "build_kit", fail)
    result = CliRunner().invoke(guest_cli.command, ["build", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "apt-get download busybox-static failed: 404" in result.output


def test_guest_build_cli_unwritable_cache_dir_exits_1_with_message(tmp_path: Path):
    """The lock is the first file a build writes: a cache it cannot write there (read-only,
    another user's; here .lock is a directory, which root cannot open either) is the host's
    trouble, told in one line, not a traceback."""
    (tmp_path / ".lock").mkdir()
    result = CliRunner().invoke(guest_cli.command, ["build", "--cache-dir", str(tmp_path)])
    assert (result.exit_code, type(result.exception)) == (1, SystemExit)
    assert f"writing the kit in {tmp_path} failed" in result.output


class MergedUsrHost(FakeHost):
    """A Debian 13 (trixie) host: merged-/usr packages ship nothing under /bin or /lib.
    busybox-static 1:1.37.0-6+b9 (`dpkg-deb -c`) has ./usr/bin/busybox and no ./bin; the
    kernel's modules are in ./usr/lib/modules (which kernel.py MODULE_ROOTS already knows)."""

    USR = "usr/"
    BUSYBOX = b"\x7fELF busybox 1.37"


def test_build_kit_merged_usr_busybox_static_is_found(tmp_path: Path):
    built = kit.build_kit(tmp_path, run=MergedUsrHost())
    archive = parse_newc(gzip.decompress(built.initrd.read_bytes()))
    busybox = [m.data for m in archive if m.raw_name == b"bin/busybox\0"]
    assert busybox == [b"\x7fELF busybox 1.37"]


def booted_files(config_path: Path) -> tuple[Path, Path | None, Path]:
    """The kernel, initrd and disk image `splitvmm up` takes from a kit's config."""
    config = load_config(config_path)
    disk = next(d for d in config.devices if d.name == "disk0").options["path"]
    return config.boot.kernel, config.boot.initrd, Path(disk)


def kit_files(where: Path) -> tuple[Path, Path, Path]:
    return where / f"vmlinuz-{RELEASE}", where / f"initramfs-{RELEASE}.cpio.gz", where / kit.DISK


def test_build_kit_copied_kit_boots_its_own_kernel_and_disk(tmp_path: Path):
    """`cp -r` of a kit (to try something on a copy of the disk) must not boot the original's
    files: the copy's debian.toml wrote to the original's disk.img."""
    kit.build_kit(tmp_path / "a", run=FakeHost())
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert booted_files(tmp_path / "b" / kit.CONFIG) == kit_files(tmp_path / "b")


def test_guest_build_cli_cache_dir_not_utf8_is_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A --cache-dir whose name is not UTF-8 (os.fsdecode gives a surrogate): the kit was
    downloaded and built, then debian.toml's encode() raised UnicodeEncodeError, every run."""
    host = FakeHost()
    monkeypatch.setattr(
        guest_cli,
        "build_kit",
        lambda cache, force, progress: kit.build_kit(cache, run=host),
    )
    cache = os.fsdecode(bytes(tmp_path) + b"/kit-\xff")
    result = CliRunner().invoke(guest_cli.command, ["build", "--cache-dir", cache])
    assert not isinstance(result.exception, UnicodeError), result.exception
    if result.exit_code == 0:  # the kit works from there
        load_config(Path(os.fsdecode(result.stdout_bytes.rstrip(b"\n"))))
    else:  # or it is refused in one line, before anything is downloaded
        assert (result.exit_code, type(result.exception), host.calls) == (
            1,
            SystemExit,
            [],
        )


def test_render_init_prints_at_most_a_sector_of_the_disk(tmp_path: Path):
    """/init shows the disk's first line; a disk the guest zeroed has no newline, and
    `head -n1 /dev/vda` copied all 64 MiB of it to the serial console at every boot."""
    disk = tmp_path / "vda"
    with disk.open("wb") as f:
        f.truncate(kit.DISK_SIZE)
    [line] = [x for x in render_init(RELEASE, []).splitlines() if "/dev/vda" in x]
    script = line.replace("-b /dev/vda", f"-f {disk}").replace("/dev/vda", str(disk))
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=False).stdout
    assert 0 < len(out) <= 512


def test_build_kit_config_reached_through_a_symlink_boots_the_kit(tmp_path: Path):
    kit.build_kit(tmp_path / "cache", run=FakeHost())
    (tmp_path / "vms").mkdir()
    link = tmp_path / "vms" / "demo.toml"
    link.symlink_to(tmp_path / "cache" / kit.CONFIG)

    # as `splitvmm up vms/demo.toml` reads it
    assert booted_files(link) == kit_files(tmp_path / "cache")


# What dpkg-deb -x printed when the cache's file system filled up while it unpacked the
# kernel (a 45 MiB tmpfs, linux-image-6.1.0-53-cloud-amd64 6.1.187-1), first and last lines.
DPKG_DEB_DISK_FULL = """\
tar: ./lib/modules/6.1.0-53-cloud-amd64/kernel/drivers/net/ethernet/mellanox/mlx5/core/\
mlx5_core.ko: Wrote only 5632 of 10240 bytes
tar: ./lib/modules/6.1.0-53-cloud-amd64/kernel/drivers/net/ethernet/mellanox/mlxfw/mlxfw.ko: \
Cannot write: No space left on device
tar: ./usr/share/lintian/overrides/linux-image-6.1.0-53-cloud-amd64: Cannot write: No space \
left on device
tar: Exiting with failure status due to previous errors
dpkg-deb: error: tar subprocess returned error exit status 2
"""


class DiskFullHost(FakeHost):
    def __call__(self, argv: Sequence[str], cwd: Path | None = None):
        if list(argv[:2]) == ["dpkg-deb", "-x"]:
            return subprocess.CompletedProcess(list(argv), 2, "", DPKG_DEB_DISK_FULL)
        return super().__call__(argv, cwd)


def test_build_kit_disk_full_while_unpacking_says_so(tmp_path: Path):
    """A full disk while dpkg-deb unpacks: the error said only "tar subprocess returned
    error exit status 2", dropping the line that names the cause."""
    with pytest.raises(PackageError, match="No space left on device"):
        kit.build_kit(tmp_path, run=DiskFullHost())


APT_LOCKED = (
    "E: Could not open lock file /var/lib/apt/lists/lock - open (13: Permission denied)\n"
    "E: Unable to lock directory /var/lib/apt/lists/\n"
)


def test_fetch_packages_missing_package_not_root_error_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An archive without linux-image-cloud-amd64 (an Ubuntu host, an arm64 one), a user who
    is not root: the one-line error was apt-get update's lock error alone, sending the user to
    sudo; what was missing was only in a progress line."""

    def no_such_package(argv: Sequence[str], cwd: Path | None = None):
        err = APT_LOCKED if list(argv[:2]) == ["apt-get", "update"] else "E: No packages found\n"
        return subprocess.CompletedProcess(list(argv), 100, "", err)

    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(PackageError, match="linux-image-cloud-amd64: No packages found"):
        debian.fetch_packages(no_such_package, tmp_path, kit._quiet)


@pytest.mark.parametrize("name", [kit.CONFIG, kit.MANIFEST])
def test_build_kit_keeps_a_file_it_finds_under_its_own_name(tmp_path: Path, name: str):
    """--cache-dir ~/vms, where the user keeps their own debian.toml (or a manifest.json of
    something else): the kit replaced it without a word. A directory that holds no kit of
    ours is refused, naming the file; the file is kept."""
    mine = b"[vm]\nname = 'my-debian'\nmemory = '4G'\n" if name == kit.CONFIG else b'{"v": 1}\n'
    (tmp_path / name).write_bytes(mine)
    with pytest.raises(GuestKitError, match=name):
        kit.build_kit(tmp_path, run=FakeHost())
    assert (tmp_path / name).read_bytes() == mine


def test_guest_build_cli_symlink_loop_cache_dir_exits_1_with_message(tmp_path: Path):
    """A --cache-dir that is a symlink loop: a RuntimeError traceback from Path.resolve()."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = CliRunner().invoke(guest_cli.command, ["build", "--cache-dir", str(tmp_path / "loop")])
    assert (result.exit_code, type(result.exception)) == (1, SystemExit), result.exception
    assert str(tmp_path / "loop") in result.output


@pytest.mark.parametrize(
    "make", [lambda p: p.write_bytes(b"mine"), os.mkfifo], ids=["regular-file", "fifo"]
)
def test_build_kit_cache_dir_that_is_no_directory_says_so(tmp_path: Path, make):
    """A cache dir that is a file (the default one, $XDG_CACHE_HOME's, which click's
    file_okay=False never sees) or a FIFO: mkdir's "File exists" named no fault."""
    where = tmp_path / "kit"
    make(where)

    with pytest.raises(GuestKitError, match="kit: it is there, but not a directory"):
        kit.build_kit(where, run=FakeHost())


def test_guest_build_cli_unknown_user_home_exits_1_with_message():
    """--cache-dir '~nosuchuser/kit' (quoted, so the shell left the ~): a RuntimeError
    traceback from Path.expanduser()."""
    result = CliRunner().invoke(guest_cli.command, ["build", "--cache-dir", "~nosuchuser/kit"])
    assert (result.exit_code, type(result.exception)) == (1, SystemExit), result.exception
    assert "~nosuchuser/kit" in result.output


def busybox_image(applets: Sequence[str]) -> bytes:
    """What a real busybox holds: its applet names, NUL-terminated, in strcmp order."""
    return b"\x7fELF\0" + b"".join(name.encode() + b"\0" for name in sorted(applets)) + b"\0"


class NoexecHost(FakeHost):
    """The cache on a noexec mount (/tmp, /dev/shm, removable media on hardened hosts): the
    unpacked busybox cannot be run, as run_tool reports it."""

    def __call__(self, argv: Sequence[str], cwd: Path | None = None):
        if list(argv[1:]) == ["--list"]:
            raise GuestKitError(f"cannot run {argv[0]}: Permission denied")
        return super().__call__(argv, cwd)

    BUSYBOX = busybox_image(APPLETS)


def on_noexec(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file system noexec, as statvfs tells the kit."""
    real_statvfs = kit.os.statvfs

    class Noexec:
        def __init__(self, path: object) -> None:
            self._st = real_statvfs(path)

        def __getattr__(self, name: str) -> object:
            return getattr(self._st, name)

        @property
        def f_flag(self) -> int:
            return self._st.f_flag | kit.os.ST_NOEXEC

    monkeypatch.setattr(kit.os, "statvfs", Noexec)


def test_build_kit_cache_on_noexec_file_system_builds_or_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The kit needs to run nothing it unpacks; the applet check did, and a cache on a noexec
    file system failed with "cannot run <scratch>/busybox/bin/busybox: Permission denied",
    a path already removed, which named neither noexec nor the cache directory. The applets
    are read from the binary's own table there."""
    on_noexec(monkeypatch)
    messages: list[str] = []
    built = kit.build_kit(tmp_path, run=NoexecHost(), progress=messages.append)
    assert built.initrd.is_file()
    assert any("noexec" in m for m in messages), messages


class NoexecPoweroffLessHost(NoexecHost):
    """A busybox-static built without poweroff (which /init runs last), in a noexec cache."""

    BUSYBOX = busybox_image(sorted(set(APPLETS) - {"poweroff"}))


def test_build_kit_cache_on_noexec_file_system_refuses_a_busybox_lacking_applets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """check_applets exists so that a busybox lacking an applet /init needs fails the build,
    not the boot. Skipped on a noexec cache, the kit was built and its manifest written (every
    later build reused it), and /init's last `poweroff` was "applet not found"."""
    on_noexec(monkeypatch)
    with pytest.raises(GuestKitError, match="poweroff"):
        kit.build_kit(tmp_path, run=NoexecPoweroffLessHost())
    assert not (tmp_path / kit.MANIFEST).exists()


def test_build_kit_refusing_a_foreign_directory_keeps_its_lock_file(tmp_path: Path):
    """The refusal keeps the user's debian.toml, but the build had opened --cache-dir/.lock
    with "w" by then: a .lock of the user's (another tool's, with its pid) was emptied, in a
    directory the kit then says is not its own."""
    (tmp_path / kit.CONFIG).write_bytes(b"[vm]\nname = 'my-debian'\n")
    (tmp_path / ".lock").write_bytes(b"12345\n")
    with pytest.raises(GuestKitError, match=kit.CONFIG):
        kit.build_kit(tmp_path, run=FakeHost())
    assert (tmp_path / ".lock").read_bytes() == b"12345\n"


# Debian 13 (trixie) busybox-static 1:1.37.0-6+b9, usr/bin/busybox: the 16 bytes before its
# applet table are the end of applet_flags (2 bits an applet: nofork, noexec), which the
# linker put right before applet_names; the last byte, 0x20, packs xz, xzcat, yes (NOEXEC)
# and zcat. Elsewhere in the binary lies b"\0[\0y\0\x98\0" (the first "\0[\0" that is
# followed by a name), which is all busybox_applets found.
APPLET_FLAGS_TAIL = b'\xc0"\x080\xc0\xc0\xb3\x008\xe0\x00\x0e"\xc0\xae '
STRAY = b"\0[\0y\0\x98\0"
TRIXIE_TAIL = ["xz", "xzcat", "yes", "zcat"]


def trixie_busybox_image(applets: Sequence[str]) -> bytes:
    """busybox-static's applet table as it lies in Debian 13's binary."""
    names = b"".join(name.encode() + b"\0" for name in sorted(applets)) + b"\0"
    return b"\x7fELF\0" + STRAY + APPLET_FLAGS_TAIL + names


def test_busybox_applets_reads_a_table_that_follows_applet_flags():
    """busybox_applets looked for b"\\0[\\0": a table whose preceding byte is another object's
    (applet_flags' last byte, non-zero whenever one of the last applets is NOFORK or NOEXEC:
    Debian 13's `yes`) was not found, and the stray "[", "y" was taken for it."""
    applets = sorted({*APPLETS, "[[", *TRIXIE_TAIL})
    assert kit.busybox_applets(trixie_busybox_image(applets)) == set(applets)


class NoexecTrixieHost(NoexecHost):
    """Debian 13's busybox-static (every applet the kit links) in a noexec cache."""

    BUSYBOX = trixie_busybox_image(sorted({*APPLETS, "[[", *TRIXIE_TAIL}))


def test_build_kit_cache_on_noexec_file_system_with_debian_13s_busybox_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """On a Debian 13 host with a noexec cache the build failed with "busybox-static lacks the
    applets ash, cat, chmod, ..." for a busybox that holds every one of them (`busybox --list`
    lists all 272), and no kit could be built there."""
    on_noexec(monkeypatch)
    try:
        built = kit.build_kit(tmp_path, run=NoexecTrixieHost())
    except GuestKitError as e:
        pytest.fail(f"refused: {e}")
    assert built.initrd.is_file()
