"""Seccomp policy files: a strict subset of crosvm's syntax, compiled with libseccomp.

A policy file holds one rule per line (blank lines and `# comments` ignored):

    read: 1                                  allow
    fcntl: arg1 == F_GETFL || arg1 == F_SETFL    allow when one comparison holds
    mmap: arg2 & PROT_EXEC == 0              allow when the masked argument equals
    sendto: arg3 & MSG_OOB == 0 && arg4 == 0    allow when both hold (&& binds before ||;
                                             each argument once per alternative)
    openat: return ENOENT                    fail with that errno, do not kill
    @include common_device.policy            another file of the same directory

A value is an integer literal or a name from CONSTANTS (names joined with `|`
are or-ed). Files are laid out as crosvm does (policies/<arch>/):
`common_device.policy` and `<model>.policy` are never loaded alone;
`<model>_device.policy` is the one loaded, with its `@include` lines. A rule
may appear once per file; a file may override a rule it included (the later
definition wins). Anything else is a PolicyError naming file:line.

Policies are read by the device process before it enters the sandbox (it has
no file system afterwards) and compiled into a filter whose default action
kills the whole process. Paths are strings (os.path; any os.PathLike is taken):
this module is imported by the zygote, which imports what every device runs on
before it forks one (sandbox/zygote.py), and pathlib with what it imports costs
~4 ms there.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import signal
import socket
import stat
import termios
from collections.abc import Mapping, Sequence

from splitvmm.errors import SplitvmmError
from splitvmm.native import files, tun
from splitvmm.native.confine import CLONE_THREAD, FUTEX_OPS, MAP_GROWSDOWN, PRCTL_OPTIONS
from splitvmm.native.seccomp import pyseccomp as seccomp
from splitvmm.protocol.models import module_name
from splitvmm.record import Struct

ARCH = "x86_64"

# The names a rule may use as a value, each from the module that defines it for
# this platform (no number typed by hand). Add a name here only with a rule
# that needs it.
CONSTANTS: dict[str, int] = {
    "FIONBIO": termios.FIONBIO,
    "FIOCLEX": termios.FIOCLEX,
    "TCGETS": termios.TCGETS,
    "TCSETS": termios.TCSETS,
    "TCSETSW": termios.TCSETSW,
    "TCSETSF": termios.TCSETSF,
    "TIOCGWINSZ": termios.TIOCGWINSZ,
    "TIOCGPGRP": termios.TIOCGPGRP,
    "SIGKILL": signal.SIGKILL,
    "SIGSEGV": signal.SIGSEGV,
    "SIGABRT": signal.SIGABRT,
    "SIGTERM": signal.SIGTERM,
    "SIGBUS": signal.SIGBUS,
    "SIGILL": signal.SIGILL,
    "SIGFPE": signal.SIGFPE,
    "CLONE_THREAD": CLONE_THREAD,
    "PROT_NONE": 0,
    "PROT_READ": mmap.PROT_READ,
    "PROT_WRITE": mmap.PROT_WRITE,
    "PROT_EXEC": mmap.PROT_EXEC,
    "MAP_SHARED": mmap.MAP_SHARED,
    "MAP_ANONYMOUS": mmap.MAP_ANONYMOUS,
    "MAP_GROWSDOWN": MAP_GROWSDOWN,
    "F_GETFD": fcntl.F_GETFD,
    "F_SETFD": fcntl.F_SETFD,
    "F_GETFL": fcntl.F_GETFL,
    "F_SETFL": fcntl.F_SETFL,
    "F_DUPFD_CLOEXEC": fcntl.F_DUPFD_CLOEXEC,
    "FD_CLOEXEC": fcntl.FD_CLOEXEC,
    "LOCK_EX": fcntl.LOCK_EX,
    "LOCK_NB": fcntl.LOCK_NB,
    "O_NONBLOCK": os.O_NONBLOCK,
    "MSG_OOB": socket.MSG_OOB,
    "MSG_DONTWAIT": socket.MSG_DONTWAIT,
    "O_RDONLY": os.O_RDONLY,
    "O_WRONLY": os.O_WRONLY,
    "O_RDWR": os.O_RDWR,
    "O_ACCMODE": os.O_ACCMODE,
    "O_PATH": os.O_PATH,
    "MADV_DONTNEED": mmap.MADV_DONTNEED,
    "MADV_FREE": mmap.MADV_FREE,
    "SIG_BLOCK": signal.SIG_BLOCK,
    "SIG_UNBLOCK": signal.SIG_UNBLOCK,
    "SIG_SETMASK": signal.SIG_SETMASK,
    "STDERR_FILENO": 2,
    "SCHED_OTHER": os.SCHED_OTHER,
    "FALLOC_FL_KEEP_SIZE": files.FALLOC_FL_KEEP_SIZE,
    "FALLOC_FL_PUNCH_HOLE": files.FALLOC_FL_PUNCH_HOLE,
    "FALLOC_FL_ZERO_RANGE": files.FALLOC_FL_ZERO_RANGE,
    "SYNC_FILE_RANGE_WRITE": files.SYNC_FILE_RANGE_WRITE,
    "SYNC_FILE_RANGE_WAIT_BEFORE": files.SYNC_FILE_RANGE_WAIT_BEFORE,
    "TUNSETOFFLOAD": tun.TUNSETOFFLOAD,
    **FUTEX_OPS,
    **PRCTL_OPTIONS,
}

_NAME = r"[a-z_][a-z0-9_]*"
_RULE = re.compile(rf"^(?P<name>{_NAME})\s*:\s*(?P<body>.+)$")
_RETURN = re.compile(r"^return\s+(?P<errno>E[A-Z0-9]+)$")
_CMP = re.compile(r"^arg(?P<arg>[0-5])\s*(?:&\s*(?P<mask>[^=]+?)\s*)?==\s*(?P<value>.+)$")
_INCLUDE = re.compile(r"^@include\s+(?P<file>[a-z0-9_]+\.policy)$")
_INT = re.compile(r"^(0x[0-9a-fA-F]+|[0-9]+)$")
_OCTAL = re.compile(r"^0[0-9]+$")
_U64 = (1 << 64) - 1
# @include nesting: the shipped files nest 2 deep; a long enough chain of distinct files (no
# cycle) would end in RecursionError
MAX_INCLUDE_DEPTH = 16


class PolicyError(SplitvmmError):
    """A policy file cannot be parsed or compiled; str() starts with file:line."""


class Cmp(Struct, frozen=True):
    """`argN & mask == value` (mask is all ones for a plain `==`)."""

    arg: int
    mask: int
    value: int


class Rule(Struct, frozen=True):
    syscall: str
    where: str  # "file:line", for error messages and `policy check`
    errno: int = 0  # non-zero: `return ERRNO`
    # Each a conjunction (`a && b`); empty: allowed whatever the arguments
    any_of: tuple[tuple[Cmp, ...], ...] = ()

    def allows(self, args: Sequence[int]) -> bool:
        """Whether the filter compiled from this rule lets a call with `args` through (or
        fails it with the rule's errno) rather than killing the process (`policy audit`)."""
        if self.errno or not self.any_of:
            return True
        return any(
            all(args[cmp.arg] & cmp.mask == cmp.value for cmp in conjunction)
            for conjunction in self.any_of
        )


class Policy(Struct):
    rules: dict[str, Rule]
    files: list[str]


def default_policy_dir() -> str:
    """policies/<arch>/ of this checkout; SPLITVMM_POLICY_DIR overrides it (trusted env)."""
    env = os.environ.get("SPLITVMM_POLICY_DIR")
    if env:
        return env
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    return os.path.join(checkout, "policies", ARCH)


def _value(text: str, where: str, constants: Mapping[str, int]) -> int:
    total = 0
    for term in (t.strip() for t in text.split("|")):
        if _OCTAL.fullmatch(term):  # C reads 010 as 8, Python's int() refuses it
            raise PolicyError(f"{where}: {term!r} has a leading zero: write it in decimal or 0x")
        if _INT.fullmatch(term):
            try:
                total |= int(term, 0)
            except ValueError:  # a decimal of over 4300 digits (CVE-2020-10735): no u64 either
                raise PolicyError(f"{where}: value {text!r} does not fit in 64 bits") from None
        elif term in constants:
            total |= constants[term]
        else:
            raise PolicyError(f"{where}: unknown constant {term!r} (see policy.CONSTANTS)")
    if total > _U64:
        raise PolicyError(f"{where}: value {text!r} does not fit in 64 bits")
    return total


def _comparisons(
    body: str, where: str, constants: Mapping[str, int]
) -> tuple[tuple[Cmp, ...], ...]:
    """`a && b || c`: alternatives (||), each every one of its comparisons (&&), as seccomp
    compiles them: one rule per alternative, on distinct arguments."""
    alternatives = []
    for alternative in (p.strip() for p in body.split("||")):
        cmps = [_comparison(part.strip(), where, constants) for part in alternative.split("&&")]
        args = [cmp.arg for cmp in cmps]
        if len(set(args)) != len(args):
            raise PolicyError(f"{where}: {alternative!r} compares one argument twice")
        alternatives.append(tuple(cmps))
    return tuple(alternatives)


def _comparison(part: str, where: str, constants: Mapping[str, int]) -> Cmp:
    m = _CMP.fullmatch(part)
    if not m:
        raise PolicyError(f"{where}: expected `argN == VALUE` or `argN & MASK == VALUE`")
    mask = _value(m["mask"], where, constants) if m["mask"] else _U64
    value = _value(m["value"], where, constants)
    if value & ~mask:
        raise PolicyError(f"{where}: {part!r} can never hold (value has bits outside mask)")
    return Cmp(int(m["arg"]), mask, value)


def parse_rule(line: str, where: str, constants: Mapping[str, int] = CONSTANTS) -> Rule:
    m = _RULE.fullmatch(line)
    if not m:
        raise PolicyError(f"{where}: expected `syscall: 1`, `syscall: return ERRNO` or a condition")
    name, body = m["name"], m["body"].strip()
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
        raise PolicyError(f"{where}: {name!r} is not a {ARCH} system call")
    if body == "1":
        return Rule(name, where)
    ret = _RETURN.fullmatch(body)
    if ret:
        code = getattr(errno, ret["errno"], None)
        if not isinstance(code, int):
            raise PolicyError(f"{where}: unknown errno {ret['errno']!r}")
        return Rule(name, where, errno=code)
    return Rule(name, where, any_of=_comparisons(body, where, constants))


def _read_text(path: str, where: str) -> str:
    """The policy file's text; PolicyError for what is no readable UTF-8 regular file (a FIFO
    is refused without waiting for a writer: opened O_NONBLOCK, then checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PolicyError(f"{where}: {path} is not a regular file")
            with open(fd, "rb", closefd=False) as f:
                return f.read().decode("utf-8")
        finally:
            os.close(fd)
    except OSError as e:
        raise PolicyError(f"{where}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        why = f"{e.reason} at byte {e.start}"
        raise PolicyError(f"{where}: {path} is not UTF-8 text ({why})") from None


def parse_file(
    file: str | os.PathLike[str],
    constants: Mapping[str, int] = CONSTANTS,
    _stack: tuple[str, ...] = (),
    _at: str = "",
) -> Policy:
    """Parse one file and what it includes (depth first, in order).

    `constants` may add names known only at run time (the warden's own pid).
    `_at`: the "file:line" of the @include that names this file, if one does.
    """
    path = os.fspath(file)
    if path in _stack:
        raise PolicyError(f"{_at}: @include cycle through {os.path.basename(path)}")
    where = _at or str(path)
    text = _read_text(path, where)
    policy = Policy({}, [path])
    own: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        where = f"{path}:{lineno}"
        if not line:
            continue
        inc = _INCLUDE.fullmatch(line)
        if inc:
            if len(_stack) >= MAX_INCLUDE_DEPTH:
                raise PolicyError(f"{where}: @include nested more than {MAX_INCLUDE_DEPTH} deep")
            sub = parse_file(
                os.path.join(os.path.dirname(path), inc["file"]), constants, (*_stack, path), where
            )
            policy.rules.update(sub.rules)
            policy.files.extend(sub.files)
            continue
        if line.startswith("@"):
            raise PolicyError(f"{where}: expected `@include NAME.policy` (a file beside this one)")
        rule = parse_rule(line, where, constants)
        if rule.syscall in own:
            raise PolicyError(f"{where}: {rule.syscall} is already defined in this file")
        own.add(rule.syscall)
        policy.rules[rule.syscall] = rule
    return policy


def device_policy_name(model: str) -> str:
    """`<model>_device.policy`, the model's name with "_" for "-" (as its module's)."""
    name = module_name(model)
    if not re.fullmatch(_NAME, name):
        raise PolicyError(f"model name {model!r} is not a policy name")
    return f"{name}_device.policy"


def policy_file(name: str, policy_dir: str | os.PathLike[str] | None = None) -> str:
    """The path of policy file `name` in `policy_dir`, or in default_policy_dir()."""
    return os.path.join(policy_dir or default_policy_dir(), name)


def load_model_policy(model: str, policy_dir: str | os.PathLike[str] | None = None) -> Policy:
    """The policy a device process of `model` loads: device_policy_name(model)."""
    return parse_file(policy_file(device_policy_name(model), policy_dir))


def load_warden_policy(self_pid: int, policy_dir: str | os.PathLike[str] | None = None) -> Policy:
    """The policy a device's warden loads: warden.policy, whose rules name the warden's own
    pid, `self_pid`, as SELF_PID."""
    constants = {**CONSTANTS, "SELF_PID": self_pid}
    return parse_file(policy_file("warden.policy", policy_dir), constants)


def compile_filter(
    policy: Policy, default_action: int = seccomp.KILL_PROCESS, tsync: bool = True
) -> seccomp.SyscallFilter:
    """A filter for every thread of the process (TSYNC: the monitor's, or any a device had),
    or with tsync=False for the calling thread alone (and the threads it makes later)."""
    filt = seccomp.SyscallFilter(defaction=default_action)
    # A syscall of another ABI (x32, i386 through int 0x80) kills too, never just the thread.
    filt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    filt.set_attr(seccomp.Attr.CTL_TSYNC, int(tsync))
    # Callers set no_new_privs themselves, before Landlock; libseccomp's own prctl would
    # need a rule in every policy loaded under another (the monitor's vCPU threads).
    filt.set_attr(seccomp.Attr.CTL_NNP, 0)
    for rule in policy.rules.values():
        try:
            _add_rule(filt, rule)
        except OSError as e:
            raise PolicyError(f"{rule.where}: libseccomp rejects the rule: {e.strerror}") from None
    return filt


def _add_rule(filt: seccomp.SyscallFilter, rule: Rule) -> None:
    if rule.errno:
        filt.add_rule(seccomp.ERRNO(rule.errno), rule.syscall)
    elif not rule.any_of:
        filt.add_rule(seccomp.ALLOW, rule.syscall)
    else:
        for conjunction in rule.any_of:
            filt.add_rule(seccomp.ALLOW, rule.syscall, *map(_arg, conjunction))


def _arg(cmp: Cmp) -> seccomp.Arg:
    if cmp.mask == _U64:
        return seccomp.Arg(cmp.arg, seccomp.EQ, cmp.value)
    return seccomp.Arg(cmp.arg, seccomp.MASKED_EQ, cmp.mask, cmp.value)
