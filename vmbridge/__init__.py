"""vmbridge: a runtime-control plane for QEMU virtual machines.

vmbridged launches QEMU, drives it over QMP and serves systemd's varlink
machine-control interfaces (io.systemd.MachineInstance and friends) on one
socket per VM; vmctl is its command-line client.
"""

__version__ = "0.1.0"
