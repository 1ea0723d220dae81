"""Confinement shared by both sides: seccomp policy files (policy.py), used by the device
processes' sandbox and by the monitor's own confinement."""
