"""Virtio 1.x devices over PCI: guest RAM as a device sees it (guestram.py), the split
virtqueue (queue.py), the interrupts of a PCI function (msix.py) and the transport (pci.py),
which the device models (devprocs/virtio_blk.py, virtio_rng.py) build on."""
