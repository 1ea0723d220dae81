"""How `up` takes its stop signals (monitor/machine.py Machine._on_signal), without a VM:
the first asks for a stop, a second (`timeout` signalling the process group after `up`)
changes nothing, a third is the signal's default at once."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from splitvmm.cli import cli, up
from splitvmm.monitor import machine
from splitvmm.monitor.machine import Machine
from splitvmm.sandbox import launcher


@pytest.fixture
def raised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """What _on_signal did to the process's signals (nothing is really raised)."""
    done: list[tuple[str, int]] = []
    monkeypatch.setattr(machine.signal, "signal", lambda s, h: done.append(("handler", h)))
    monkeypatch.setattr(machine.signal, "raise_signal", lambda s: done.append(("raise", s)))
    return done


def test_stop_signals_first_stops_second_waits_third_is_the_default(raised):
    stops: list[object] = []
    vm = SimpleNamespace(_stop_signals=0, stop=stops.append)

    Machine._on_signal(vm, signal.SIGTERM, None)  # type: ignore[arg-type]
    Machine._on_signal(vm, signal.SIGTERM, None)  # type: ignore[arg-type]
    after_two = list(raised)
    Machine._on_signal(vm, signal.SIGTERM, None)  # type: ignore[arg-type]

    assert [getattr(o, "message", o) for o in stops] == ["stopped by SIGTERM"] * 2
    assert (after_two, raised) == ([], [("handler", signal.SIG_DFL), ("raise", signal.SIGTERM)])


def _interrupted() -> object:
    raise KeyboardInterrupt  # Ctrl-C during the fork of the launcher or the imports before it


def test_up_interrupted_while_it_starts_its_launcher_exits_130_not_click_abort(monkeypatch, capsys):
    """SIGINT while `up` imports and starts its launcher, before the VM's handlers are in:
    a stop by SIGINT (130), as anywhere else then, not click's 'Aborted!' (1, "could not
    start")."""
    monkeypatch.setattr(launcher.Launcher, "start", staticmethod(_interrupted))
    try:
        up.run_and_exit(lambda snapshot: None, None, None)  # type: ignore[arg-type,return-value]
    except KeyboardInterrupt:  # click turns it into 'Aborted!' and status 1
        pytest.fail("the KeyboardInterrupt escaped run_and_exit")
    except SystemExit as ended:
        assert ended.code == 130
    assert "splitvmm: stopped by SIGINT" in capsys.readouterr().err


def test_up_command_interrupted_while_it_starts_its_launcher_is_no_abort(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher.Launcher, "start", staticmethod(_interrupted))
    result = CliRunner().invoke(cli, ["up", str(tmp_path / "vm.toml")])
    assert result.exit_code == 130, result.output
    assert "Aborted" not in result.output
