# setuptools needs setup.py for cffi_modules: the KVM bindings are compiled at
# install time against this machine's <linux/kvm.h> (cffi API mode).
from setuptools import setup

setup(cffi_modules=["splitvmm/native/_build_kvm.py:ffibuilder"])
