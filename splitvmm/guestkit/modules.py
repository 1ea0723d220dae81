"""Kernel modules for the initramfs: names, dependencies and the order to insmod them.

Debian's kernel packages ship no modules.dep (depmod writes it in the package's postinst on the
machine that installs it), and the host may have no kmod at all. So where a tree has no
modules.dep, dependencies come from each module's own `.modinfo` section: `depends=` is what
modpost computed at kernel build time from the symbols the module imports, which is also what
depmod would have written.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from splitvmm.guestkit.errors import KernelModuleError
from splitvmm.record import Struct

# Longest first, so "x.ko.xz" is not mistaken for a module named "x.ko".
MODULE_SUFFIXES = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")

# ELF64 little-endian (x86_64), from <elf.h>.
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EI_CLASS = 4
EI_DATA = 5
# Elf64_Ehdr: e_ident, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
# e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# Elf64_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
# sh_addralign, sh_entsize
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")
MODINFO_SECTION = ".modinfo"


def normalize(name: str) -> str:
    """The kernel treats "-" and "_" in module names alike; "_" is the canonical spelling."""
    return name.replace("-", "_")


def module_name(path: str) -> str:
    """kernel/drivers/char/hw_random/virtio-rng.ko -> virtio_rng."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            return normalize(base.removesuffix(suffix))
    raise KernelModuleError(f"{path!r} is not a kernel module file name (.ko, .ko.xz, ...)")


def decompress_module(path: str, raw: bytes) -> bytes:
    """The ELF image of a module file, whatever its compression."""
    if path.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.endswith(".ko.zst"):
        # Python 3.11 has no zstd in its standard library, and busybox 1.35 cannot insmod it.
        raise KernelModuleError(f"module {path} is zstd-compressed, which the kit cannot read")
    return raw


class ModuleIndex(Struct, frozen=True):
    """What modules.dep says: each module's path (relative to /lib/modules/<ver>) and deps."""

    paths: Mapping[str, str]
    deps: Mapping[str, tuple[str, ...]]


def parse_modules_dep(text: str) -> ModuleIndex:
    """Parse modules.dep: one `path: dep_path dep_path ...` line per module."""
    paths: dict[str, str] = {}
    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, colon, rest = line.partition(":")
        if not colon:
            raise KernelModuleError(f"modules.dep line {line!r} has no ':'")
        name = module_name(path.strip())
        paths[name] = path.strip()
        deps[name] = tuple(module_name(dep) for dep in rest.split())
    return ModuleIndex(paths, deps)


def _section_headers(image: bytes) -> tuple[tuple[int, int, int], ...]:
    """(sh_name, sh_offset, sh_size) of every section, after checking it is ELF64 LE."""
    if len(image) < ELF64_EHDR.size or image[:4] != ELF_MAGIC:
        raise KernelModuleError("not an ELF file")
    if image[EI_CLASS] != ELFCLASS64 or image[EI_DATA] != ELFDATA2LSB:
        raise KernelModuleError("not a 64-bit little-endian ELF file")
    ehdr = ELF64_EHDR.unpack_from(image)
    shoff, shentsize, shnum = ehdr[6], ehdr[11], ehdr[12]
    if shentsize != ELF64_SHDR.size or shoff + shnum * shentsize > len(image):
        raise KernelModuleError("ELF section header table is malformed or truncated")
    headers = (ELF64_SHDR.unpack_from(image, shoff + i * shentsize) for i in range(shnum))
    return tuple((h[0], h[4], h[5]) for h in headers)


def elf_section(image: bytes, wanted: str) -> bytes | None:
    """The contents of the section named `wanted`, or None if the file has none."""
    headers = _section_headers(image)
    shstrndx = ELF64_EHDR.unpack_from(image)[13]
    if shstrndx >= len(headers):
        raise KernelModuleError("ELF section name table index is out of range")
    _, names_offset, names_size = headers[shstrndx]
    names = image[names_offset : names_offset + names_size]
    for name_offset, offset, size in headers:
        if names[name_offset:].split(b"\0", 1)[0] == wanted.encode():
            return image[offset : offset + size]
    return None


def read_modinfo(image: bytes) -> dict[str, list[str]]:
    """The `key=value` strings of a module's .modinfo section, by key (keys may repeat)."""
    section = elf_section(image, MODINFO_SECTION)
    if section is None:
        raise KernelModuleError("ELF file has no .modinfo section: not a kernel module")
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, eq, value = item.decode(errors="replace").partition("=")
        if eq:
            info.setdefault(key, []).append(value)
    return info


def modinfo_depends(image: bytes) -> tuple[str, ...]:
    """The direct dependencies a module declares (`depends=a,b`; empty for none)."""
    values = read_modinfo(image).get("depends", [""])
    return tuple(normalize(dep) for dep in values[0].split(",") if dep)


def load_order(wanted: Iterable[str], deps_of: Callable[[str], Sequence[str]]) -> list[str]:
    """Every module in `wanted` and everything it needs, each after its dependencies.

    A depth-first post-order: deterministic (it follows `wanted`, then each module's own
    dependency order), and it names the cycle if there is one instead of looping.
    """
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise KernelModuleError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        for dep in deps_of(name):
            visit(normalize(dep), (*chain, name))
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(normalize(name), ())
    return order


class KernelModules:
    """The modules of one kernel release in an unpacked package: <root>/lib/modules/<ver>."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.builtin = self._read_builtin(moddir / "modules.builtin")
        dep_file = moddir / "modules.dep"
        if dep_file.is_file():
            index = parse_modules_dep(dep_file.read_text())
            self._paths, self._deps = dict(index.paths), dict(index.deps)
        else:
            self._paths = self._scan(moddir)
            self._deps = {}  # filled from .modinfo as modules are asked about

    @staticmethod
    def _read_builtin(path: Path) -> frozenset[str]:
        if not path.is_file():
            return frozenset()
        return frozenset(module_name(line) for line in path.read_text().split())

    @staticmethod
    def _scan(moddir: Path) -> dict[str, str]:
        found = (p for p in moddir.rglob("*.ko*") if p.is_file())
        paths = {}
        for path in sorted(found):
            relative = path.relative_to(moddir).as_posix()
            if relative.endswith(MODULE_SUFFIXES):
                paths[module_name(relative)] = relative
        return paths

    def path(self, name: str) -> str:
        """The module's file, relative to the modules directory."""
        try:
            return self._paths[normalize(name)]
        except KeyError:
            raise KernelModuleError(
                f"kernel module {name} is not in {self.moddir} (neither a module nor built in)"
            ) from None

    def image(self, name: str) -> bytes:
        """The module's ELF image, decompressed."""
        relative = self.path(name)
        return decompress_module(relative, (self.moddir / relative).read_bytes())

    def deps(self, name: str) -> tuple[str, ...]:
        name = normalize(name)
        if name not in self._deps:
            relative = self.path(name)  # a missing module gets its own, clearer error
            try:
                self._deps[name] = modinfo_depends(self.image(name))
            except (KernelModuleError, lzma.LZMAError, OSError, EOFError) as e:
                raise KernelModuleError(f"kernel module {relative} cannot be read: {e}") from e
        return self._deps[name]

    def plan(self, wanted: Iterable[str]) -> list[str]:
        """The modules to insmod for `wanted`, dependencies first; built-in ones are left out."""
        loadable = [normalize(n) for n in wanted if normalize(n) not in self.builtin]
        return load_order(loadable, self.deps)
