"""virtio on the device side: guest RAM access (guestram), the split virtqueue (queue)."""
