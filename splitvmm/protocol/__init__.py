"""The only code both the monitor and the device processes import to talk to each other."""
