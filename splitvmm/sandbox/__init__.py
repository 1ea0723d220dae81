"""Confinement, used for the device processes and by the monitor on itself: seccomp policy
files (policy.py), the device sandbox (device.py), the one way a device process is started
(spawn.py) and the launcher that starts them for the monitor (launcher.py)."""
