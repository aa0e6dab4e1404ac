"""vmbridge's varlink layer: a gevent server, a stdlib client, IDL validation.

It speaks varlink exactly as systemd's sd-varlink does (error names and
shapes, ``more``/``oneway``/``upgrade``, fd passing) and knows nothing of
QEMU. Server side::

    service = Service(vendor=..., product=..., version=..., url=...)
    service.add_interface(interface_text("io.systemd.MachineInstance"), handler)
    server = Server(service, path="/run/vmbridge/vm1/control")
    server.start()

Client side (stdlib only, fast to import)::

    from vmbridge.varlink.client import Connection
    with Connection("/run/vmbridge/vm1/control") as c:
        c.call("io.systemd.MachineInstance.Describe")

The server half needs gevent and python-varlink, so its names are imported
lazily here: ``import vmbridge.varlink.client`` must not pay for them.
"""

from .protocol import VarlinkError, interface_text

_LAZY = {
    "Service": ".service",
    "Call": ".service",
    "Upgrade": ".service",
    "SharedReply": ".service",
    "InterfaceDefinition": ".idl",
    "MethodDefinition": ".idl",
    "Server": ".server",
    "ConnectionClosed": ".connection",
    "PeerCredentials": ".connection",
    "default_connection_limits": ".server",
}

__all__ = ["VarlinkError", "interface_text", "Service", "Call", "Upgrade", "SharedReply",
           "InterfaceDefinition", "MethodDefinition", "Server", "ConnectionClosed",
           "PeerCredentials", "default_connection_limits"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    import importlib
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
