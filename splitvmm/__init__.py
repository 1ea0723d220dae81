"""splitvmm: a KVM virtual machine monitor with every device in its own sandboxed process."""

__version__ = "0.1.0"
