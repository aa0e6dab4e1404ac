"""Device set-up over QMP, between ``-S`` and ``cont``."""

from __future__ import annotations


def setup_devices(machine) -> None:
    """Add every device of `machine`'s plan over QMP; raise SetupError on the first failure."""
    plan = machine.config.devices()
    assert not plan.drives and not plan.networks and not plan.shares
