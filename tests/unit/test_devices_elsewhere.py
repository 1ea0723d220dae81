"""monitor/confinement.py devices_elsewhere: whether a VM's devices run as another host user
than its monitor (config.py vm.device_uid), and who may run them so."""

from __future__ import annotations

import os

import pytest

from splitvmm.errors import ConfigError
from splitvmm.monitor import confinement


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process seen as uid 1000, gid 1000."""
    monkeypatch.setattr(confinement.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(confinement.os, "getegid", lambda: 1000)


def test_devices_of_no_user_or_ours_run_here() -> None:
    assert confinement.devices_elsewhere(None) is False
    assert confinement.devices_elsewhere((os.geteuid(), os.getegid())) is False


@pytest.mark.skipif(os.geteuid() != 0, reason="root's monitor")
def test_devices_of_another_user_run_elsewhere_for_root() -> None:
    assert confinement.devices_elsewhere((65534, 65534)) is True


@pytest.mark.usefixtures("as_user")
def test_devices_of_a_users_monitor_run_as_that_user_only() -> None:
    assert confinement.devices_elsewhere((1000, 1000)) is False
    for other in ((65534, 65534), (1000, 65534)):
        with pytest.raises(ConfigError) as e:
            confinement.devices_elsewhere(other)
        assert str(e.value) == (
            "vm.device_uid: only a monitor run as root may run its devices as another user "
            "(this one runs as uid 1000, gid 1000)"
        )
