"""The only code that touches ffi, raw pointers and ioctl numbers."""
