# setuptools needs setup.py for cffi_modules: the KVM bindings and the sandbox's
# syscalls are compiled at install time against this machine's kernel headers
# (<linux/kvm.h>, <linux/landlock.h>, ...; cffi API mode).
from setuptools import setup

setup(
    cffi_modules=[
        "splitvmm/native/_build_kvm.py:ffibuilder",
        "splitvmm/native/_build_sys.py:ffibuilder",
    ]
)
