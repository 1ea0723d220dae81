"""The monitor: owns /dev/kvm, guest RAM, the vCPUs and the address map; supervises devices."""
