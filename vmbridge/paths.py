"""Where vmbridged lives by default; shared by the daemon and vmctl (stdlib only, cheap)."""

import os


def default_runtime_dir():
    """/run/vmbridge for root, $XDG_RUNTIME_DIR/vmbridge otherwise; None without $XDG_RUNTIME_DIR."""
    if os.getuid() == 0:
        return "/run/vmbridge"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "vmbridge") if xdg else None
