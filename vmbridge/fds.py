"""File descriptors passed with SCM_RIGHTS: the helpers every socket layer needs.

Standard library only, and cheap to import (vmctl uses it through the
varlink client).
"""

import array
import os
import socket


def ancillary_space(max_fds: int) -> int:
    """The recvmsg() ancillary buffer size for up to `max_fds` descriptors."""
    return socket.CMSG_SPACE(max_fds * array.array("i").itemsize)


def fds_from_ancdata(ancdata) -> list:
    """The descriptors in recvmsg()'s ancillary data (now the caller's to close)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def close_fds(fds) -> None:
    """Close every fd in an iterable, ignoring ones that are already gone."""
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
