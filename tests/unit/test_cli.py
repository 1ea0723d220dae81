"""The root command: version, help, lazy subcommands, and a clear error for a bad config."""

import gc
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitvmm import __version__, timings
from splitvmm.cli import SUBCOMMANDS, cli, early, up
from splitvmm.errors import DeviceFailure, system_exit_status
from splitvmm.monitor import machine
from splitvmm.sandbox import launcher, launcher_start
from splitvmm.sandbox.launcher import Launcher


def test_cli_version_prints_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert (result.exit_code, result.output) == (0, f"splitvmm, version {__version__}\n")


def test_cli_help_lists_every_subcommand():
    result = CliRunner().invoke(cli, ["--help"])
    assert all(f"  {name} " in result.output for name in SUBCOMMANDS)


def test_cli_up_missing_config_exits_1_naming_file(tmp_path):
    result = CliRunner().invoke(cli, ["up", str(tmp_path / "absent.toml")])
    assert result.exit_code == 1
    assert "absent.toml: cannot read the config" in result.output


def test_cli_up_directory_as_config_exits_1_in_one_line(tmp_path, monkeypatch):
    """click's own check said it in a usage text, exit 2: a bad file, not a bad command line."""
    monkeypatch.setattr(Launcher, "start", classmethod(lambda cls: NoLauncher()))
    result = CliRunner().invoke(cli, ["up", str(tmp_path)])
    assert (result.exit_code, result.output.count("\n")) == (1, 1)
    assert result.output == (
        f"splitvmm: error: {tmp_path}: cannot read the config: is a directory, not a regular file\n"
    )


@pytest.mark.parametrize(
    "config",
    [
        '[vm]\nmemory = "' + "9" * 5000 + '"\n',
        "[vm]\nmemory = " + "9" * 5000 + "\n",
        "x = " + "[" * 100_000 + "]" * 100_000 + "\n",
        '[vm]\nname = "vm\\n"\n',
        "#" * (2 << 20),
        b"\xff\xfe".decode("latin-1"),
    ],
    ids=["memory-digits-string", "memory-digits-int", "nested", "name-newline", "huge", "not-utf8"],
)
def test_cli_up_hostile_config_prints_one_line_without_traceback(tmp_path, config, monkeypatch):
    monkeypatch.setattr(Launcher, "start", classmethod(lambda cls: NoLauncher()))
    path = tmp_path / "vm.toml"
    path.write_bytes(config.encode("latin-1"))
    result = CliRunner().invoke(cli, ["up", str(path)])
    assert isinstance(result.exception, SystemExit)  # not an escaped ValueError/RecursionError
    assert (result.exit_code, result.output.count("\n")) == (1, 1)
    assert result.output.startswith("splitvmm: error: ")
    assert "launcher" not in result.output  # the config's error, not the process's


class NoLauncher:
    """`up` starts a launcher before it reads the config: a process-free stand-in here."""

    def close(self) -> None:
        pass


def kernel_config(tmp_path: Path) -> Path:
    """A config that loads: a VM booting a kernel file (an ELF by its magic alone)."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    config = tmp_path / "vm.toml"
    config.write_text(f'[vm]\nname = "t"\n[boot]\nkernel = "{kernel}"\n')
    return config


def test_cli_up_timings_of_a_failed_start_come_before_its_error(tmp_path, monkeypatch):
    """`up --timings` says where start-up time went at exit (README), a start that failed
    included: one whose device never got READY (READY_TIMEOUT_MS, 10 s) is when the operator
    wants it most, and it printed the error only. The phase the error ended is shown too."""
    monkeypatch.setattr(timings, "_marks", [])
    monkeypatch.setattr(timings, "_spans", [])
    monkeypatch.setattr(Launcher, "start", classmethod(lambda cls: NoLauncher()))

    def failed_start(cfg, snapshot, launcher):
        timings.mark("device launch requests")
        raise DeviceFailure("device serial0: exited with status 1 before it was ready")

    monkeypatch.setattr(machine, "run_vm", failed_start)

    result = CliRunner().invoke(cli, ["up", "--timings", str(kernel_config(tmp_path))])

    phases = re.findall(r"^splitvmm: timings: phase (.+?)\s+[\d.]+ ms$", result.output, re.M)
    assert result.exit_code == 1
    assert phases[-3:] == ["device launch requests", "until the error", "total"], result.output
    assert result.output.splitlines()[-1] == (
        "splitvmm: error: device serial0: exited with status 1 before it was ready"
    )


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (4, 4), (99, 99), (256, 0)])
def test_exit_status_of_system_exit_code_is_the_interpreters(code, status):
    assert system_exit_status(code) == status


def test_exit_status_of_a_message_is_1_and_the_message_goes_to_stderr(capsys):
    assert system_exit_status("splitvmm: no such VM") == 1
    assert capsys.readouterr().err == "splitvmm: no such VM\n"


def test_main_exits_with_the_commands_status_after_flushing_output(tmp_path):
    """`splitvmm` ends by os._exit (cli/__init__.py main): what it printed still arrives and
    the status is the command's (click's usage error: 2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", "up"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "Missing argument 'CONFIG'" in proc.stderr
    version = subprocess.run(
        [sys.executable, "-m", "splitvmm", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (version.returncode, version.stdout.startswith("splitvmm, version")) == (0, True)


def test_main_does_not_import_from_the_working_directory(tmp_path):
    """`python -m` puts the working directory first on sys.path: a json.py, copy.py or
    typing.py there must not stand in for the standard library's."""
    for module in ("json", "copy", "typing", "click"):
        (tmp_path / f"{module}.py").write_text('raise SystemExit("imported from the cwd")\n')
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", "up", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "imported from the cwd" not in proc.stderr
    assert proc.returncode == 1 and "missing.toml: cannot read the config" in proc.stderr


@pytest.mark.parametrize(
    ("args", "found"),
    [
        (["up", "vm.toml"], "up"),
        (["--log-level", "debug", "restore", "snap"], "restore"),
        (["--log-level", "up", "ctl", "status"], "ctl"),  # "up" is the option's value here
        (["--version"], None),
        ([], None),
    ],
)
def test_early_subcommand_skips_root_options_and_their_values(args, found):
    assert early.subcommand(args) == found


@pytest.fixture
def collector(monkeypatch):
    """The collector on and nothing frozen after the test, whatever cli/early.py did (nothing
    freezes in this process otherwise)."""
    monkeypatch.setattr(early, "_collector_held", False)
    frozen = gc.get_freeze_count()
    yield
    gc.enable()
    if gc.get_freeze_count() != frozen:
        gc.unfreeze()


def test_early_collector_is_held_while_a_vm_imports_then_back_on_with_that_frozen(collector):
    early.hold_collector()
    assert not gc.isenabled()
    made: list[list[int]] = [[]]  # what the imports make: a container the collector tracks
    assert any(o is made for o in gc.get_objects())  # in a generation a collection walks
    early.release_collector()
    assert gc.isenabled()
    assert gc.is_tracked(made) and not any(o is made for o in gc.get_objects())  # frozen
    frozen = gc.get_freeze_count()
    gc.disable()
    early.release_collector()  # once only: a second one neither freezes nor turns it on
    assert (gc.isenabled(), gc.get_freeze_count()) == (False, frozen)


def test_early_collector_release_leaves_one_it_did_not_hold_alone(collector):
    gc.disable()  # as the embedding program (a test's process) may have it
    frozen = gc.get_freeze_count()
    early.release_collector()
    assert (gc.isenabled(), gc.get_freeze_count()) == (False, frozen)


def test_cli_other_commands_release_the_collector_held_by_a_guess_of_a_vm(collector):
    """main() guessed `up` from the arguments (a value of an option it does not know); click
    ran another command, which must not run with the collector off."""
    early.hold_collector()
    result = CliRunner().invoke(cli, ["policy", "check"])
    assert (result.exit_code, gc.isenabled()) == (0, True), result.output


def test_cli_up_runs_the_vm_with_the_collector_on(tmp_path, monkeypatch, collector):
    monkeypatch.setattr(Launcher, "start", classmethod(lambda cls: NoLauncher()))
    seen: list[bool] = []

    def run(cfg, snapshot, launcher):
        seen.append(gc.isenabled())
        raise DeviceFailure("enough")

    monkeypatch.setattr(machine, "run_vm", run)
    early.hold_collector()  # as main() does for `up`
    result = CliRunner().invoke(cli, ["up", str(kernel_config(tmp_path))])
    assert (result.exit_code, seen) == (1, [True]), result.output


def test_early_launcher_is_taken_once_and_only_for_a_vm(monkeypatch, collector):
    forked = []
    monkeypatch.setattr(launcher_start, "fork", lambda: forked.append(1) or ("sock", 42))
    monkeypatch.setattr(launcher, "Launcher", lambda sock, pid: ("L", sock, pid))
    closes: list[bool] = []
    monkeypatch.setattr(early, "close_inherited_fds", lambda: closes.append(True))
    early.start_launcher(["ctl", "status"])
    assert (forked, early.take(), gc.isenabled()) == ([], None, True)
    early.start_launcher(["up", "vm.toml"])
    assert (early.take(), early.take(), gc.isenabled()) == (("L", "sock", 42), None, False)
    assert closes == [True]  # only a VM's process closes what it inherited


def test_up_interrupted_while_reading_its_config_exits_130_not_click_abort(monkeypatch, capsys):
    """SIGINT before the VM's handlers are in (reading the config or the snapshot): the
    launcher is closed, and the exit is a stop by SIGINT, not click's 'Aborted!' (1)."""
    closed: list[bool] = []
    fake = type("FakeLauncher", (), {"close": lambda self: closed.append(True)})()
    monkeypatch.setattr(launcher.Launcher, "start", staticmethod(lambda: fake))

    def interrupted(snapshot: object) -> object:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as ended:
        up.run_and_exit(interrupted, None, None)  # type: ignore[arg-type]

    assert ended.value.code == 130 and closed == [True]
    assert "splitvmm: stopped by SIGINT" in capsys.readouterr().err


def test_guest_build_refuses_an_empty_cache_dir(tmp_path, monkeypatch):
    """An unset variable in `--cache-dir "$DIR"`: not a kit built in the current directory."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["guest", "build", "--cache-dir", ""])
    assert result.exit_code == 2
    assert "Invalid value for '--cache-dir': an empty path" in result.output
    assert list(tmp_path.iterdir()) == []


def test_guest_build_error_quoting_the_cache_dir_prints_its_control_characters_escaped(tmp_path):
    """The path is data: a newline in it split the one-line error, and an escape sequence
    reached the terminal raw (color=True: click strips one only off a terminal)."""
    (tmp_path / "file").write_text("")
    cache_dir = tmp_path / "file" / "kit\n\x1b[31m"
    result = CliRunner().invoke(cli, ["guest", "build", "--cache-dir", str(cache_dir)], color=True)
    assert (result.exit_code, result.output.count("\n")) == (1, 1), result.output
    assert "file/kit\\n\\x1b[31m: Not a directory" in result.output


@pytest.mark.parametrize("fd", [3, 4, 63])
def test_up_config_on_an_inherited_fd_says_that_up_closed_it(tmp_path, fd):
    """`up` closes every fd past 2 it inherits (cli/early.py), the config's too, and its own
    then take the low numbers: the error read "No such device or address" (fd 3: the
    launcher's socket), "is a file of unknown type, not a regular file" (fd 4: its pidfd),
    or "No such file or directory" (fd 63), of a config file that is there and readable."""
    config = tmp_path / "vm.toml"
    config.write_text('[vm]\nname = "fd"\n[boot]\nkernel = "k.elf"\n')
    proc = subprocess.run(
        ["bash", "-c", f'exec "$0" -m splitvmm up /dev/fd/{fd} {fd}<"$1"', sys.executable, config],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"/dev/fd/{fd}: cannot read the config: `splitvmm up` closes" in proc.stderr
    assert f"fd {fd} among them" in proc.stderr


@pytest.mark.parametrize("name", ["²", "1²", "٣"])
def test_up_config_path_of_non_ascii_digits_under_dev_fd_is_a_one_line_error(name):
    proc = subprocess.run(
        [sys.executable, "-m", "splitvmm", "up", f"/dev/fd/{name}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "closes every fd" not in proc.stderr  # /dev/fd/٣ is no fd 3: no such file


def test_up_config_on_an_inherited_fd_named_by_the_processs_own_pid_says_that_up_closed_it(
    tmp_path,
):
    """/proc/<pid>/fd/N is /proc/self/fd/N where pid is `up`'s own (`exec splitvmm up
    /proc/$$/fd/3 3<vm.toml`): config.py's _FD_ALIAS_DIR knows it, early.FD_DIRS does not,
    and the error said "No such device or address" (fd 3 is the launcher's socket by then)."""
    config = tmp_path / "vm.toml"
    config.write_text('[vm]\nname = "fd"\n[boot]\nkernel = "k.elf"\n')
    proc = subprocess.run(
        ["bash", "-c", 'exec "$0" -m splitvmm up /proc/$$/fd/3 3<"$1"', sys.executable, config],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "cannot read the config: `splitvmm up` closes" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("name", "text", "shown"),
    [
        ("vm\n\x1b[31m.toml", None, "vm\\n\\x1b[31m.toml: cannot read the config"),
        ("vm.toml", '[vm]\nsnapshot_dirs = ["a\\n\\u001b[31m"]\n', "a\\n\\x1b[31m does not exist"),
    ],
    ids=["config-path", "snapshot-dir"],
)
def test_cli_up_error_quoting_a_path_prints_its_control_characters_escaped(
    tmp_path, monkeypatch, name, text, shown
):
    """A path in `up`'s error is data, as a snapshot's name is in `snapshot inspect`'s: a
    newline in it split the one-line error, and an escape sequence (colours, the terminal's
    title...) reached the terminal raw (color=True: click strips one only off a terminal)."""
    monkeypatch.setattr(Launcher, "start", classmethod(lambda cls: NoLauncher()))
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    result = CliRunner().invoke(cli, ["up", str(path)], color=True)
    assert (result.exit_code, result.output.count("\n")) == (1, 1), result.output
    assert "\x1b" not in result.output and shown in result.output


@pytest.mark.parametrize(
    ("argv", "param"),
    [
        (["up", ""], "'CONFIG'"),
        (["up", "vm.toml", "--restore", ""], "'--restore'"),
        (["restore", ""], "'DIRECTORY'"),
        (["snapshot", "inspect", ""], "'DIRECTORY'"),
        (["snapshot", "verify", ""], "'DIRECTORY'"),
        (["snapshot", "verify", "snap", "--require-signature", ""], "'--require-signature'"),
        (["ctl", "--socket", "", "status"], "'--socket'"),
        (["ctl", "--vm", "vm", "snapshot", ""], "'DIRECTORY'"),
    ],
)
def test_an_empty_path_argument_is_a_usage_error_not_the_current_directory(
    tmp_path, monkeypatch, argv, param
):
    """An unset variable in `up "$CONFIG"` or `snapshot verify "$DIR"`: "" is "." as a Path,
    and the current directory was taken for the config ("is a directory") or the snapshot
    ("manifest.json: does not exist")."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {param}: an empty path" in result.output
