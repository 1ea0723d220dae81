"""Device models, each run in its own sandboxed process (`python -m splitvmm.devprocs`)."""
