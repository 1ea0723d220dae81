"""`splitvmm guest build`: a demo Linux guest from Debian packages.

debian.py fetches and unpacks the packages (apt-get download, dpkg-deb -x), modules.py picks the
virtio modules and their dependencies, initramfs.py writes the newc archive, rootfs.py lays out
its contents and /init, vmconfig.py renders the VM config, and kit.py ties them together and
keeps the cache.
"""
