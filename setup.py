# setuptools needs setup.py for cffi_modules: the KVM bindings and the sandbox's
# syscalls are compiled at install time against this machine's kernel headers
# (<linux/kvm.h>, <linux/landlock.h>, ...; cffi API mode). build_ext also builds the
# device warden, a small static program (splitvmm/native/warden.c), next to them.
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import LinkError

WARDEN_SOURCE = "splitvmm/native/warden.c"


class BuildExtAndWarden(build_ext):
    def run(self) -> None:
        super().run()
        out_dir = "splitvmm/native"
        if not self.inplace:
            out_dir = os.path.join(self.build_lib, out_dir)
        os.makedirs(self.build_temp, exist_ok=True)
        objects = self.compiler.compile(
            [WARDEN_SOURCE], output_dir=self.build_temp, extra_postargs=["-O2", "-Wall", "-fPIE"]
        )
        # static: exec'd under Landlock, it may open no loader and no library
        try:
            self.compiler.link_executable(
                objects, "warden", output_dir=out_dir, extra_postargs=["-static-pie", "-s"]
            )
        except LinkError as e:
            raise LinkError(
                f"cannot link the device warden statically ({e}): it needs the C library's "
                "static archive, libc.a (Debian: libc6-dev; Fedora: glibc-static)"
            ) from None
        # Executable by anyone, readable by its owner alone: a device run as another user
        # (vm.device_uid) execs it in a user namespace that user owns, and only a program it
        # may not read keeps the warden out of that user's reach there (the kernel's
        # would_dump: sandbox/device.py _refuse_a_warden_we_may_read checks it).
        os.chmod(os.path.join(out_dir, "warden"), 0o711)


setup(
    cffi_modules=[
        "splitvmm/native/_build_kvm.py:ffibuilder",
        "splitvmm/native/_build_sys.py:ffibuilder",
    ],
    cmdclass={"build_ext": BuildExtAndWarden},
)
