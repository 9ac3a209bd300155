"""qvirtd: a small, fast QEMU/KVM management daemon that never hangs."""

__version__ = "0.1.0"
