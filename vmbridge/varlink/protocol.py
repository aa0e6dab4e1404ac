"""The varlink wire format, shared by our server and our client (stdlib only).

Varlink (https://varlink.org) sends one JSON object per message over a stream
socket, each message terminated by a NUL byte. A call looks like

    {"method":"io.systemd.MachineInstance.Describe","parameters":{},"more":true}

and a reply like

    {"parameters":{"running":true,"status":"running"}}
    {"parameters":{"event":"READY"},"continues":true}
    {"error":"org.varlink.service.ExpectedMore"}

We serialise exactly as systemd 262's sd-varlink does: compact JSON, keys in
the order "error", "parameters", "continues", and the "parameters" key left out
when the object is empty (so an empty reply is literally ``{}``). File
descriptors travel as SCM_RIGHTS ancillary data on the sendmsg() that carries
the first byte of the message they belong to.

This module must stay importable without gevent or python-varlink: the CLI's
client imports it and has to start fast.
"""

import errno as _errno
import json
import os

# --- limits (the numbers are sd-varlink's, so both ends agree) -------------

#: Largest message we buffer while waiting for its NUL terminator.
BUFFER_MAX = 16 * 1024 * 1024
#: How much we ask the kernel for per read.
READ_SIZE = 64 * 1024
#: Most fds accepted with one message: the kernel's SCM_MAX_FD per sendmsg().
FDS_MAX = 253
#: sd-varlink's default method-call timeout; we use it as the send timeout.
DEFAULT_TIMEOUT = 45.0

# --- well-known error names -------------------------------------------------

INTERFACE_NOT_FOUND = "org.varlink.service.InterfaceNotFound"
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
METHOD_NOT_IMPLEMENTED = "org.varlink.service.MethodNotImplemented"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
PERMISSION_DENIED = "org.varlink.service.PermissionDenied"
EXPECTED_MORE = "org.varlink.service.ExpectedMore"
EXPECTED_UPGRADE = "org.varlink.service.ExpectedUpgrade"
SYSTEM_ERROR = "io.systemd.System"

SERVICE_INTERFACE = "org.varlink.service"
SYSTEMD_INTERFACE = "io.systemd"


class VarlinkError(Exception):
    """A varlink error reply: a fully qualified error name plus parameters.

    Raised by method handlers to answer with an error, and by the client when
    the server answered with one. ``parameters`` None (or empty) means the
    reply carries no "parameters" key, exactly as systemd sends it.
    """

    def __init__(self, error, parameters=None):
        if not isinstance(error, str) or not error:
            raise TypeError("varlink error name must be a non-empty string")
        super().__init__(error, parameters)
        self.error = error
        self.parameters = parameters

    def __str__(self):
        if self.parameters:
            return "%s %s" % (self.error, encode_json(self.parameters))
        return self.error

    @classmethod
    def invalid_parameter(cls, name):
        return cls(INVALID_PARAMETER, {"parameter": name})

    @classmethod
    def from_errno(cls, number):
        """io.systemd.System for a Linux errno, shaped like sd_varlink_error_errno()."""
        parameters = {"origin": "linux", "errno": abs(number)}
        name = _errno.errorcode.get(abs(number))
        if name:
            parameters["errnoName"] = name
        return cls(SYSTEM_ERROR, parameters)

    def to_message(self):
        return error_message(self.error, self.parameters)


# --- message construction ---------------------------------------------------

# One encoder for every message: json.dumps() with non-default options builds
# a new JSONEncoder per call, which costs more than encoding a small reply.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


class MessageBuffer:
    """Bytes read from a varlink socket, cut into NUL-terminated messages.

    Each byte is searched for the NUL once, however many reads a message
    takes (a 16 MiB call arrives in hundreds of them).
    """

    def __init__(self):
        self._data = bytearray()
        self._scanned = 0           # bytes known to hold no NUL

    def __len__(self):
        return len(self._data)

    def append(self, data):
        self._data += data

    def next_message(self):
        """The next whole message without its NUL, or None while it is incomplete."""
        end = self._data.find(b"\0", self._scanned)
        if end < 0:
            self._scanned = len(self._data)
            return None
        message = bytes(self._data[:end])
        del self._data[:end + 1]
        self._scanned = 0
        return message

    def take_rest(self):
        """Everything buffered (e.g. the first bytes of an upgraded protocol), emptied."""
        rest = bytes(self._data)
        self._data.clear()
        self._scanned = 0
        return rest


def encode_json(obj):
    """Compact JSON text as systemd formats it (no spaces, raw UTF-8)."""
    return _encoder.encode(obj)


def encode_message(message):
    """One wire message: compact JSON, UTF-8, NUL-terminated."""
    return encode_json(message).encode("utf-8") + b"\0"


def reply_message(parameters=None, continues=False):
    message = {}
    if parameters:
        message["parameters"] = parameters
    if continues:
        message["continues"] = True
    return message


def error_message(error, parameters=None):
    message = {"error": error}
    if parameters:
        message["parameters"] = parameters
    return message


def call_message(method, parameters=None, *, more=False, oneway=False,
                 upgrade=False):
    # Like sd-varlink, a call always carries "parameters", {} when empty.
    message = {"method": method, "parameters": parameters or {}}
    if oneway:
        message["oneway"] = True
    if more:
        message["more"] = True
    if upgrade:
        message["upgrade"] = True
    return message


def _reject_constant(name):
    # json.loads accepts NaN/Infinity, which are not JSON; sd-json rejects them.
    raise ValueError("invalid JSON constant %s" % name)


def decode_message(data):
    """Parse one message (without its NUL); raises ValueError if malformed."""
    text = data.decode("utf-8")          # UnicodeDecodeError is a ValueError
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise ValueError("varlink message is not a JSON object")
    return message


def describe_message(message, limit=8192):
    """Message text for debug logs, cut short so a 200 KB reply stays readable.

    Never raises: a message nested too deeply to encode (or to repr) is only
    named, so that logging it cannot break the connection that carried it.
    """
    try:
        text = encode_json(message)
    except (ValueError, RecursionError):
        try:
            text = repr(message)
        except RecursionError:
            text = "<%s nested too deeply to show>" % type(message).__name__
    if len(text) > limit:
        return "%s…(%d chars)" % (text[:limit], len(text))
    return text


# --- interface texts shipped with the package --------------------------------

_INTERFACES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                               "interfaces")


def interface_text(name):
    """The exact text of vmbridge/interfaces/<name>.varlink.

    That text is what GetInterfaceDescription serves, byte for byte.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError("invalid interface name %r" % (name,))
    with open(os.path.join(_INTERFACES_DIR, name + ".varlink"),
              encoding="utf-8") as f:
        return f.read()


