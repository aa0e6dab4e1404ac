"""Fuzzing vmbridged's varlink sockets (issue 10): seeded, bounded, parallel.

Thousands of malformed or odd messages go to the manager socket and to the
control socket of a guest-less VM, from many connections at once (gevent in
this process, with gevent.socket explicitly: nothing is monkey-patched):
truncated JSON, wrong types for every parameter of every method, unknown
methods and interfaces, bad call objects and flags, deep nesting, huge
strings, invalid UTF-8, lone surrogates, NUL-only, random bytes, a message
left without its NUL, 64 MB without a NUL, pipelined batches, oneway, more
and upgrade combinations, streams hung up on.

Each case is built from its own seed (SEED:index), so a failing case is
reproduced by its index. Every byte the daemon sends must be valid varlink
(a JSON object: "error" with optional "parameters", or "parameters" and
"continues"), or the connection is closed; where the answer is known in
advance (wrong types, unknown methods, protocol violations, ...) it must be
exactly that. A case that expects its connection to survive ends with a
sentinel call, whose answer proves the daemon read everything before it.

Meanwhile well-behaved clients call Describe (control socket) and GetInfo
(manager) in threads and must get the right answer every time. Afterwards
the VM still runs with the same pid, fds are back to their baseline, RSS is
bounded (and flat over 2000 more small cases: no leak), and the daemon log
holds no traceback.

VMBRIDGE_FUZZ_CASES sets the number of cases (default 8000, `make fuzz`
runs 200000); VMBRIDGE_FUZZ_SEED the seed.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import socket
import time

import gevent
import gevent.lock
import gevent.socket
import psutil
import varlink.scanner as scanner

from reliability import DescribeLoop, fds_back_to, hwm_mib, open_fds, record, reset_hwm, rss_mib, settled_fds
from test_control import call
from vmbridge.varlink.idl import InterfaceDefinition
from vmbridge.varlink.protocol import interface_text

CASES = int(os.environ.get("VMBRIDGE_FUZZ_CASES", "8000"))
SEED = int(os.environ.get("VMBRIDGE_FUZZ_SEED", "10"))
CONCURRENCY = 32
BIG_CONCURRENCY = 2          # cases sending megabytes, at once
PLATEAU_CASES = 2000         # small cases run after, to tell a leak from the allocator's plateau
TIMEOUT = 60.0               # per read: only so that a hang fails instead of hanging
VM = "fz"
RUNNING = {"parameters": {"running": True, "status": "running"}}
MI = "io.systemd.MachineInstance"
MGR = "io.vmbridge.Manager"
SVC = "org.varlink.service"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
# Never to be called validly: they would change the VM under test.
DANGEROUS = {f"{MI}.{m}" for m in ("Terminate", "PowerOff", "Reboot", "Pause", "Resume")}
# Valid, it turns the connection into a QMP session: not a varlink reply to check here
# (tests/test_acquire_*.py drive those sessions, garbage included).
UPGRADES = {"io.systemd.QemuMachineInstance.AcquireQMP"}
NONEXISTENT_QEMU = "/nonexistent/fuzz-qemu"
MEGABYTE = 1024 * 1024
SIXTY_FOUR_MB = b"x" * (64 * MEGABYTE)

SOCKET_INTERFACES = {
    "control": [MI, "io.systemd.QemuMachineInstance", "io.systemd.VirtualMachineInstance", SVC],
    "manager": [MGR, SVC],
}

# -------------------------------------------------------------- the IDL model


def _kind(interface, vtype):
    """A small, independent model of a varlink type: what the fuzzer needs to make
    values that fit it or, on purpose, do not."""
    if isinstance(vtype, scanner._Maybe):
        return ("maybe", _kind(interface, vtype.element_type))
    if isinstance(vtype, bool):
        return ("bool",)
    if isinstance(vtype, int):
        return ("int",)
    if isinstance(vtype, float):
        return ("float",)
    if isinstance(vtype, str):
        return ("string",)
    if isinstance(vtype, scanner._Object):
        return ("object",)
    if isinstance(vtype, scanner._Array):
        return ("array", _kind(interface, vtype.element_type))
    if isinstance(vtype, scanner._Dict):
        return ("dict", _kind(interface, vtype.element_type))
    if isinstance(vtype, scanner._CustomType):
        return _kind(interface, interface._members[vtype.name].type)
    if isinstance(vtype, scanner._Struct):
        return ("struct", {name: _kind(interface, t) for name, t in vtype.fields.items()})
    if isinstance(vtype, scanner._Enum):
        return ("enum", tuple(vtype.fields))
    raise TypeError(f"unmodelled varlink type {vtype!r}")


class Method:
    def __init__(self, interface_name, definition):
        self.name = f"{interface_name}.{definition.name}"
        self.requires_more = definition.requires_more
        self.requires_upgrade = definition.requires_upgrade
        self.fields = {n: _kind(definition.interface, t) for n, t in definition.input_fields.items()}


def load_methods():
    methods = {}
    for interfaces in SOCKET_INTERFACES.values():
        for name in interfaces:
            definition = InterfaceDefinition(interface_text(name))
            for m in definition.methods.values():
                methods[f"{name}.{m.name}"] = Method(name, m)
    return methods


METHODS = load_methods()
SOCKET_METHODS = {sock: [m for m in METHODS.values() if m.name.rpartition(".")[0] in ifaces]
                  for sock, ifaces in SOCKET_INTERFACES.items()}

# ----------------------------------------------------------------- values

ODD_STRINGS = ["", " ", "../x", "-x", "a,b", "a\0b", "a\nb", "\t", "é", "名前", "\U0001f600", "\u202e", "%s%n",
               "$(reboot)", "`id`", "'", '"', "\\", "/", "//", "a" * 300, "fz ", " fz", "FZ", "fz\0",
               "io.systemd.MachineInstance", "null", "{}", "[]", "0", "1e999", "\ud800", "\udfff"]
WRONG_FOR = {
    "bool": [0, 1, "true", "yes", [], {}, 1.5, [True]],
    "int": ["1x", "", " 1", "0x10", 1.5, -0.5, True, False, [], {}, [1], 2**64, -(2**63) - 1, 10**30,
            "99999999999999999999999", 1e300],
    "float": ["x", "1.5", True, [], {}],
    "string": [0, -1, True, False, [], {}, 1.5, ["x"], {"s": "x"}],
    "object": [[], "x", 0, True, 1.5, [{}]],
    "array": ["x", 0, {}, True, 1.5],
    "dict": ["x", 0, [], True],
    "struct": ["x", 0, [], True, 1.5, [{}]],
    "enum": [0, True, [], {}],
}


def odd_string(rng):
    pick = rng.random()
    if pick < 0.5:
        return rng.choice(ODD_STRINGS)
    if pick < 0.8:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x110000)]))
                       for _ in range(rng.randrange(0, 40)))
    return "nx-" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_.-") for _ in range(rng.randrange(1, 64)))


def safe_name(rng):
    """A VM name that is never an existing VM's: Start/Terminate/Remove stay harmless."""
    while True:
        name = odd_string(rng)
        if name.strip("\0 ").lower() != VM:
            return name


def valid_value(rng, kind, field=None):
    tag = kind[0]
    if tag == "maybe":
        return None if rng.random() < 0.3 else valid_value(rng, kind[1], field)
    if tag == "bool":
        return rng.random() < 0.5
    if tag == "int":
        return rng.choice([0, 1, -1, 7, 2**63 - 1, -(2**63), 2**64 - 1, "42", "-3"])
    if tag == "float":
        return rng.choice([0, 1.5, -2.25, 1e300])
    if tag == "string":
        if field == "name":
            return safe_name(rng)
        if field == "qemu":
            return NONEXISTENT_QEMU
        return odd_string(rng)
    if tag == "object":
        return rng.choice([{}, {"a": 1}, {"nested": {"x": [1, 2, {"y": None}]}}])
    if tag == "array":
        return [valid_value(rng, kind[1], field) for _ in range(rng.randrange(0, 4))]
    if tag == "dict":
        return {odd_string(rng): valid_value(rng, kind[1]) for _ in range(rng.randrange(0, 3))}
    if tag == "enum":
        return rng.choice(kind[1])
    if tag == "struct":
        out = {}
        for name, sub in kind[1].items():
            if sub[0] != "maybe" or rng.random() < 0.4:
                out[name] = valid_value(rng, sub, name)
        if "qemu" in kind[1]:
            out["qemu"] = NONEXISTENT_QEMU  # a config that can never start anything
        return out
    raise AssertionError(kind)


def wrong_value(rng, kind):
    """A value that does not fit `kind` (never None: absence is a case of its own)."""
    tag = kind[0]
    if tag == "maybe":
        return wrong_value(rng, kind[1])
    if tag == "array" and rng.random() < 0.4:
        return [valid_value(rng, kind[1]), wrong_value(rng, kind[1])]
    if tag == "dict" and rng.random() < 0.4:
        return {"k": wrong_value(rng, kind[1])}
    if tag == "struct" and rng.random() < 0.6:
        value = valid_value(rng, kind)
        fields = kind[1]
        how = rng.random()
        if how < 0.5:
            name = rng.choice(list(fields))
            value[name] = wrong_value(rng, fields[name])
        elif how < 0.75:
            value["fuzz_unknown"] = 1
        else:
            required = [n for n, k in fields.items() if k[0] != "maybe"]
            if not required:
                return rng.choice(WRONG_FOR["struct"])
            value.pop(rng.choice(required), None)
        return value
    if tag == "enum" and rng.random() < 0.5:
        return "not-" + rng.choice(kind[1])
    return rng.choice(WRONG_FOR[tag])


def valid_parameters(rng, method):
    out = {}
    for name, kind in method.fields.items():
        if kind[0] != "maybe" or rng.random() < 0.5:
            out[name] = valid_value(rng, kind, name)
    return out


def flags_for(method):
    flags = {}
    if method.requires_more:
        flags["more"] = True
    if method.requires_upgrade:
        flags["upgrade"] = True
    return flags


# ------------------------------------------------------------------ cases


class Case:
    """What to send, and what must come back.

    expect: "replies" (exactly these, then the sentinel), "close" (no reply,
    the daemon hangs up), "any" (anything valid; the sentinel or a hang-up),
    "stream" (READY first; then we hang up).
    replies: one entry per reply expected before the sentinel: an exact
    dict, an error name (str), or None for any valid reply.
    """

    def __init__(self, kind, chunks, expect, replies=(), *, big=False, half_close=False):
        self.kind = kind
        self.chunks = chunks
        self.expect = expect
        self.replies = list(replies)
        self.big = big
        self.half_close = half_close


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def encode(message) -> bytes:
    """A message on the wire, with the guard: a dangerous method is never sent as a valid call."""
    if isinstance(message, dict) and isinstance(message.get("method"), str) and message["method"] in DANGEROUS:
        params = message.get("parameters")
        if params is None or (isinstance(params, dict) and not params):
            message = {**message, "parameters": {"fuzz_guard": True}}
    try:
        return json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\0"
    except UnicodeEncodeError:  # lone surrogates: valid as JSON escapes only
        return json.dumps(message).encode() + b"\0"


def call_message(method, parameters, **flags):
    message = {"method": method, "parameters": parameters}
    message.update(flags)
    return message


def safe_valid_call(rng, sock):
    """(message, expected reply) for a call that is valid and harmless."""
    method = rng.choice([m for m in SOCKET_METHODS[sock] if m.name not in DANGEROUS | UPGRADES])
    params = valid_parameters(rng, method)
    flags = flags_for(method)
    expected = None
    if method.name == f"{MI}.Describe":
        expected = RUNNING
    elif method.name in (f"{MGR}.Start", f"{MGR}.Terminate", f"{MGR}.Remove"):
        expected = {"error": f"{MGR}.NoSuchMachine", "parameters": {"name": params["name"]}}
    elif method.name in (f"{MGR}.Create", f"{MGR}.Define"):
        expected = f"{MGR}.InvalidConfig"
    elif method.name == f"{MGR}.List" and params.get("name") is not None:
        expected = {"error": f"{MGR}.NoSuchMachine", "parameters": {"name": params["name"]}}
    elif method.name.rpartition(".")[2] in ("AddStorage", "ReplaceStorage"):
        # The fuzzer passes no descriptor: whatever the index, it names none.
        expected = {"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": "fileDescriptorIndex"}}
    elif method.name.rpartition(".")[2] == "RemoveStorage":
        expected = {"error": f"{MI}.NoSuchStorage"}
    if isinstance(expected, dict) and any(isinstance(v, str) and has_surrogate(v) for v in
                                          expected.get("parameters", {}).values()):
        expected = None  # a lone surrogate cannot be echoed as UTF-8: any valid answer (EIO) will do
    return method, call_message(method.name, params, **flags), expected


def stream_case(kind, message):
    """A stream call: READY, then we hang up; or NoSuchMachine for a manager stream of a VM not there."""
    name = message["parameters"].get("name") if isinstance(message.get("parameters"), dict) else None
    if message["method"] == f"{MGR}.SubscribeEvents" and name is not None:
        return Case(kind + "-nosuch", [encode(message)], "replies",
                    [None if has_surrogate(name) else {"error": f"{MGR}.NoSuchMachine", "parameters": {"name": name}}])
    return Case(kind, [encode(message)], "stream")


def case_valid(rng, sock):
    method, message, expected = safe_valid_call(rng, sock)
    if method.requires_more:  # a stream: READY, then we hang up
        return stream_case("valid-stream", message)
    return Case("valid", [encode(message)], "replies", [expected])


def case_flags(rng, sock):
    """Valid calls with extra flags, and flag combinations."""
    method, message, expected = safe_valid_call(rng, sock)
    combo = rng.choice([{"oneway": True}, {"more": True}, {"upgrade": True}, {"more": False},
                        {"oneway": True, "more": True}, {"more": True, "upgrade": True},
                        {"oneway": True, "upgrade": True}, {"more": 1}, {"oneway": "yes"},
                        {"upgrade": None}, {"continues": True}, {"fuzz": True}, {"error": "x"}])
    message = {k: v for k, v in message.items() if k not in ("more", "upgrade")}
    message.update(combo)
    truthy = [k for k in ("more", "oneway", "upgrade") if message.get(k) is True]
    bad = [k for k in combo if k not in ("more", "oneway", "upgrade") or not isinstance(combo[k], bool)]
    if bad or len(truthy) > 1:
        return Case("flags-violation", [encode(message)], "close")
    if message.get("oneway"):
        return Case("flags-oneway", [encode(message)], "replies", [])
    if method.requires_more and not message.get("more"):
        return Case("flags-expected-more", [encode(message)], "replies", [{"error": f"{SVC}.ExpectedMore"}])
    if method.requires_upgrade and not message.get("upgrade"):
        return Case("flags-expected-upgrade", [encode(message)], "replies", [{"error": f"{SVC}.ExpectedUpgrade"}])
    if method.requires_more:
        return stream_case("flags-stream", message)
    return Case("flags", [encode(message)], "replies", [None if message.get("upgrade") or
                                                        message.get("more") else expected])


def case_wrong_type(rng, sock):
    """Every parameter of every method, with a value of the wrong type (or absent, or null)."""
    candidates = [m for m in SOCKET_METHODS[sock] if m.fields]
    method = rng.choice(candidates)
    field = rng.choice(list(method.fields))
    kind = method.fields[field]
    params = {}
    for name, sub in method.fields.items():
        if name == field:
            continue
        if sub[0] != "maybe" or rng.random() < 0.5:
            params[name] = valid_value(rng, sub, name)
    how = rng.random()
    if how < 0.8 or kind[0] == "maybe":
        params[field] = wrong_value(rng, kind)
    elif how < 0.9:
        params[field] = None  # null for a required parameter
    # else: absent
    params = dict(rng.sample(list(params.items()), len(params)))  # key order must not matter
    message = call_message(method.name, params, **flags_for(method))
    return Case("wrong-type", [encode(message)], "replies",
                [{"error": INVALID_PARAMETER, "parameters": {"parameter": field}}])


def case_unknown_parameter(rng, sock):
    method = rng.choice(SOCKET_METHODS[sock])
    params = valid_parameters(rng, method)
    key = rng.choice(["x", "fuzz_guard", "", " ", "Name", "name ", "\u00e9", "parameters", "more"])
    while key in method.fields:
        key += "_"
    params[key] = rng.choice([1, None, "x", [], {}])
    message = call_message(method.name, params, **flags_for(method))
    return Case("unknown-parameter", [encode(message)], "replies",
                [{"error": INVALID_PARAMETER, "parameters": {"parameter": key}}])


def case_unknown_method(rng, sock):
    interfaces = SOCKET_INTERFACES[sock]
    pick = rng.random()
    if pick < 0.4:
        interface = rng.choice(interfaces)
        name = f"{interface}.{rng.choice(['Nope', 'describe', 'DESCRIBE', 'Describe ', '', 'Get', 'List2'])}"
    elif pick < 0.6:
        other = "manager" if sock == "control" else "control"
        name = rng.choice([m.name for m in SOCKET_METHODS[other]
                           if m.name.rpartition(".")[0] not in interfaces])
    elif pick < 0.8:
        name = rng.choice(["", ".", "..", "Describe", "io", "io.systemd", "io.systemd.", ".Describe",
                           "org.varlink.service", "org.varlink.service.", "io.systemd.System",
                           "io.systemd.MachineInstance.Describe.Extra", "io.systemd.MachineInstance..Describe"])
    else:
        name = odd_string(rng) + "." + odd_string(rng)
    if name in METHODS and name.rpartition(".")[0] in interfaces:
        name += "X"
    message = {"method": name, "parameters": {}}
    if has_surrogate(name):
        return Case("unknown-method-surrogate", [encode(message)], "replies", [None])
    return Case("unknown-method", [encode(message)], "replies",
                [{"error": METHOD_NOT_FOUND, "parameters": {"method": name}}])


def case_bad_call_object(rng, sock):
    method, message, _ = safe_valid_call(rng, sock)
    how = rng.randrange(8)
    if how == 0:
        message["parameters"] = rng.choice([[], "x", 0, True, 1.5, [{}]])
    elif how == 1:
        message[rng.choice(["id", "params", "Method", "", "interface"])] = 1
    elif how == 2:
        del message["method"]
    elif how == 3:
        message["method"] = rng.choice([None, 1, True, [], {}, ["io.systemd.MachineInstance.Describe"]])
    elif how == 4:
        return Case("not-an-object", [encode(rng.choice([[], [message], "x", 0, None, True, 1.5]))], "close")
    elif how == 5:
        return Case("empty-object", [b"{}\0"], "close")
    elif how == 6:
        return Case("nul-only", [b"\0" * rng.randrange(1, 5)], "close")
    else:
        # parameters: null is sd-varlink's "no parameters"
        message["parameters"] = None
        if method.requires_more:
            return stream_case("null-parameters-stream", message)
        if method.fields and any(k[0] != "maybe" for k in method.fields.values()):
            required = next(n for n, k in method.fields.items() if k[0] != "maybe")
            return Case("null-parameters", [encode(message)], "replies",
                        [{"error": INVALID_PARAMETER, "parameters": {"parameter": required}}])
        return Case("null-parameters", [encode(message)], "replies", [None])
    return Case("bad-call-object", [encode(message)], "close")


def case_truncated(rng, sock):
    _, message, _ = safe_valid_call(rng, sock)
    data = encode(message)[:-1]
    cut = rng.randrange(1, len(data))
    if rng.random() < 0.5:
        return Case("truncated", [data[:cut] + b"\0"], "close")
    # No NUL at all, then we stop writing: the daemon must drop it silently.
    return Case("missing-nul", [data[:cut] if rng.random() < 0.5 else data], "close", half_close=True)


def case_invalid_utf8(rng, sock):
    _, message, _ = safe_valid_call(rng, sock)
    data = bytearray(encode(message)[:-1])
    bad = rng.choice([b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80",
                      b"\xe2\x82", b"\xf4\x90\x80\x80"])
    at = data.find(b'"', 1) + 1 or 1
    data[at:at] = bad
    return Case("invalid-utf8", [bytes(data) + b"\0"], "close")


def case_surrogates(rng, sock):
    """Lone surrogates as JSON escapes: valid JSON, not valid Unicode text."""
    target = rng.choice([f"{SVC}.GetInterfaceDescription", f"{MGR}.Start" if sock == "manager" else f"{MI}.Nope"])
    text = '{"method":"%s","parameters":{"%s":"a\\ud800b"}}' % (
        target, "interface" if target.endswith("Description") else "name")
    if rng.random() < 0.3:
        text = '{"method":"io.systemd.Mach\\udfffineInstance.Describe","parameters":{}}'
    return Case("surrogates", [text.encode() + b"\0"], "any")


def case_deep(rng, sock):
    if rng.random() < 0.6:
        # Around Python's recursion limit (1000), where json.loads still
        # succeeds but a deeper stack (logging it, encoding it) may not.
        depth = rng.randrange(960, 1010)
    else:
        depth = rng.choice([rng.randrange(2, 100), rng.randrange(100, 960), rng.randrange(1010, 200000)])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    nested = opener * depth + "1" + closer * depth
    if sock == "control":
        text = '{"method":"%s.SubscribeEvents","parameters":{"filter":%s},"more":true}' % (MI, nested)
    else:
        text = '{"method":"%s.List","parameters":{"name":%s}}' % (MGR, nested)
    if rng.random() < 0.3:
        text = '{"method":"%s.GetInfo","parameters":{"x":%s}}' % (SVC, nested)
    return Case("deep-nesting", [text.encode() + b"\0"], "any", big=depth > 100000)


def case_huge_string(rng, sock):
    size = rng.choice([64 * 1024, MEGABYTE, 4 * MEGABYTE, 16 * MEGABYTE - 100, 16 * MEGABYTE + 100])
    text = "é" * (size // 2) if rng.random() < 0.2 else "a" * size
    if sock == "manager" and rng.random() < 0.5:
        message = call_message(f"{MGR}.Start", {"name": text})
    else:
        message = call_message(f"{SVC}.GetInterfaceDescription", {"interface": text})
    data = encode(message)
    if len(data) > 16 * MEGABYTE:
        return Case("huge-over-limit", [data], "close", big=True)
    return Case("huge-string", [data], "any", big=True)


def case_huge_no_nul(rng, sock):
    return Case("64MB-no-nul", [SIXTY_FOUR_MB], "close", big=True)


def case_random_bytes(rng, sock):
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2048)))
    if rng.random() < 0.5:
        data += b"\0"
    return Case("random-bytes", [data], "any", half_close=b"\0" not in data)


def case_random_json(rng, sock):
    """Random JSON shaped a little like a call."""
    def value(depth=0):
        pick = rng.random()
        if depth > 3 or pick < 0.4:
            return rng.choice([None, True, False, 0, -1, 1.5, 2**70, "", odd_string(rng)])
        if pick < 0.7:
            return [value(depth + 1) for _ in range(rng.randrange(0, 4))]
        return {odd_string(rng): value(depth + 1) for _ in range(rng.randrange(0, 4))}
    message = {rng.choice(["method", "parameters", "more", "oneway", "upgrade", "x"]): value()
               for _ in range(rng.randrange(0, 5))}
    if isinstance(message.get("method"), str) and message["method"] in METHODS:
        message["method"] += "X"
    return Case("random-json", [encode(message)], "any")


def case_pipelined(rng, sock):
    """Several calls in one write; answers in order; a oneway one answers nothing."""
    chunks, replies = bytearray(), []
    for _ in range(rng.randrange(2, 8)):
        method, message, expected = safe_valid_call(rng, sock)
        if method.requires_more or method.requires_upgrade:
            continue
        if rng.random() < 0.2:
            message["oneway"] = True
        else:
            replies.append(expected)
        chunks += encode(message)
    if not chunks:
        chunks += encode(call_message(f"{MI}.Describe" if sock == "control" else f"{MGR}.List", {"name": None}
                                      if sock == "manager" else {}))
        replies.append(RUNNING if sock == "control" else None)
    # Split the bytes at random points: framing must not depend on write boundaries.
    data = bytes(chunks)
    cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    return Case("pipelined", pieces, "replies", replies)


def case_stream_hangup(rng, sock):
    method = f"{MI}.SubscribeEvents" if sock == "control" else f"{MGR}.SubscribeEvents"
    params = {"filter": rng.choice([None, [], ["STOP"], ["EXITED", "x"]])} if sock == "control" else {}
    message = call_message(method, params, more=True)
    extra = rng.choice([b"", encode(call_message(f"{SVC}.GetInfo", {})), b"garbage\0", b"x" * 1000])
    return Case("stream-hangup", [encode(message)], "stream", replies=[extra])


GENERATORS = [
    (case_valid, 10), (case_flags, 10), (case_wrong_type, 20), (case_unknown_parameter, 8),
    (case_unknown_method, 8), (case_bad_call_object, 10), (case_truncated, 8), (case_invalid_utf8, 5),
    (case_surrogates, 3), (case_deep, 5), (case_random_bytes, 5), (case_random_json, 6),
    (case_pipelined, 6), (case_stream_hangup, 3),
]
RARE = [(case_huge_string, 300), (case_huge_no_nul, 1500)]  # one in N cases


def make_case(index: int, *, rare: bool = True) -> tuple[str, Case]:
    rng = random.Random(f"{SEED}:{index}")
    sock = rng.choice(["control", "manager"])
    for generator, every in RARE:
        if rng.randrange(every) == 0 and rare:
            return sock, generator(rng, sock)
    generators, weights = zip(*GENERATORS)
    return sock, rng.choices(generators, weights)[0](rng, sock)


# ----------------------------------------------------------------- running


class BadReply(AssertionError):
    pass


def check_varlink(raw: bytes) -> dict:
    """One message from the daemon: it must be valid varlink."""
    try:
        message = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise BadReply(f"not UTF-8 JSON: {raw[:200]!r} ({e})")
    if not isinstance(message, dict) or set(message) - {"error", "parameters", "continues"}:
        raise BadReply(f"not a varlink reply: {raw[:200]!r}")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, str) or "." not in error or "continues" in message:
            raise BadReply(f"bad error reply: {raw[:200]!r}")
    if "parameters" in message and not isinstance(message["parameters"], dict):
        raise BadReply(f"parameters is not an object: {raw[:200]!r}")
    if "continues" in message and not isinstance(message["continues"], bool):
        raise BadReply(f"continues is not a bool: {raw[:200]!r}")
    return message


class Connection:
    def __init__(self, path):
        self.sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = bytearray()
        self.eof = False

    def send(self, data) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False  # the daemon hung up on us (expected for violations)

    def next(self) -> dict | None:
        """The next message, or None at EOF."""
        while b"\0" not in self.buf:
            if self.eof:
                if self.buf:
                    raise BadReply(f"EOF after a partial message: {bytes(self.buf[:200])!r}")
                return None
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                raise BadReply(f"no answer within {TIMEOUT}s") from None
            if not chunk:
                self.eof = True
            self.buf += chunk
        raw, _, rest = bytes(self.buf).partition(b"\0")
        self.buf[:] = rest
        return check_varlink(raw)

    def close(self):
        self.sock.close()


def matches(reply: dict, expected) -> bool:
    if expected is None:
        return True
    if isinstance(expected, str):
        return reply.get("error") == expected
    return reply == expected


def run_case(path: str, index: int, case: Case, tally: collections.Counter) -> None:
    conn = Connection(path)
    try:
        sent = all(conn.send(chunk) for chunk in case.chunks)
        if case.half_close and sent:
            conn.sock.shutdown(socket.SHUT_WR)
        if case.expect == "close":
            reply = conn.next()
            if reply is not None:
                raise BadReply(f"expected the daemon to hang up, got {reply}")
            tally["closed"] += 1
            return
        if case.expect == "stream":
            first = conn.next()
            if first != {"parameters": {"event": "READY"}, "continues": True}:
                raise BadReply(f"stream did not start with READY: {first}")
            tally["streams"] += 1
            if case.replies and case.replies[0]:
                conn.send(case.replies[0])
            return
        sentinel_name = f"fuzz.Sentinel{index}"
        sentinel = {"error": "org.varlink.service.InterfaceNotFound", "parameters": {"interface": sentinel_name}}
        if not case.half_close and sent:
            conn.send(encode(call_message(f"{SVC}.GetInterfaceDescription", {"interface": sentinel_name})))
        replies = []
        while True:
            reply = conn.next()
            if reply is None or reply == sentinel:
                break
            replies.append(reply)
            tally["error " + reply["error"] if "error" in reply else "reply"] += 1
        if case.expect == "any":
            tally["closed" if reply is None else "survived"] += 1
            return
        if reply is None:
            raise BadReply(f"connection closed before the sentinel; got {replies}")
        if len(replies) != len(case.replies) or not all(map(matches, replies, case.replies)):
            raise BadReply(f"expected {case.replies}, got {replies}")
    finally:
        conn.close()


def test_fuzz_varlink_sockets(daemon):
    daemon_proc = psutil.Process(daemon.proc.pid)
    vm = daemon.create(VM)
    paths = {"control": daemon.control_socket(VM), "manager": daemon.manager_socket}
    get_info = call(paths["manager"], f"{SVC}.GetInfo")
    assert call(paths["control"], f"{MI}.Describe") == RUNNING
    fds_before = settled_fds(daemon_proc)
    rss_before = rss_mib(daemon_proc)
    reset_hwm(daemon_proc.pid)

    big = gevent.lock.BoundedSemaphore(BIG_CONCURRENCY)
    tally = collections.Counter()
    kinds = collections.Counter()
    failures = []

    def worker(counter, end, rare=True):
        while len(failures) < 20:
            index = next(counter)
            if index >= end:
                return
            sock, case = make_case(index, rare=rare)
            kinds[case.kind] += 1
            try:
                if case.big:
                    with big:
                        run_case(paths[sock], index, case, tally)
                else:
                    run_case(paths[sock], index, case, tally)
            except Exception as e:  # noqa: BLE001 - every failure is reported with its case
                failures.append(f"case {index} ({case.kind} on {sock}): {type(e).__name__}: {e}"[:600])

    start = time.monotonic()
    with DescribeLoop(paths["control"], RUNNING) as describe, \
            DescribeLoop(paths["manager"], get_info, message=b'{"method":"org.varlink.service.GetInfo",'
                         b'"parameters":{}}\0') as info:
        counter = itertools.count()
        gevent.joinall([gevent.spawn(worker, counter, CASES) for _ in range(CONCURRENCY)], raise_error=True)
        seconds = time.monotonic() - start
        # Memory: what the cases above left is mostly the allocator keeping
        # what the megabyte messages needed (a plateau; malloc_trim() gives
        # it back). A leak shows as growth under more of the same small cases.
        rss_plateau = rss_mib(daemon_proc)
        counter = itertools.count(CASES)
        gevent.joinall([gevent.spawn(worker, counter, CASES + PLATEAU_CASES, False) for _ in range(CONCURRENCY)],
                       raise_error=True)
        describe_figures, info_figures = describe.stop(), info.stop()
    ran = sum(kinds.values()) - PLATEAU_CASES
    print(f"\nfuzz: {ran} cases in {seconds:.1f}s (seed {SEED}); kinds {dict(sorted(kinds.items()))}; "
          f"outcomes {dict(sorted(tally.items()))}")
    assert not failures, "\n".join(failures)
    assert ran == CASES
    assert not describe.failures, describe.failures
    assert not info.failures, info.failures

    # Afterwards: everything still works, nothing leaked, the VM untouched.
    assert call(paths["control"], f"{MI}.Describe") == RUNNING
    listed = daemon.call("List")["parameters"]["machines"]
    assert [(m["name"], m["state"], m["pid"]) for m in listed] == [(VM, "running", vm["pid"])]
    assert daemon.proc.poll() is None
    fds = fds_back_to(daemon_proc, fds_before, timeout=30)
    assert fds <= fds_before, f"fds {fds_before} -> {fds}: {open_fds(daemon_proc.pid)}"
    rss_after = rss_mib(daemon_proc)
    peak = hwm_mib(daemon_proc.pid)
    assert rss_after - rss_plateau < 8, \
        f"RSS grew {rss_plateau:.1f} -> {rss_after:.1f} MiB over {PLATEAU_CASES} more cases"
    assert rss_after - rss_before < 192, f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    tracebacks = []
    with open(daemon.log_path, "rb") as f:
        for number, line in enumerate(f, 1):
            if b"Traceback" in line or b"Logging error" in line:
                tracebacks.append(number)
    assert not tracebacks, f"tracebacks in the daemon log at lines {tracebacks[:10]}: {daemon.log_path}"
    record("fuzz", {"cases": ran, "seed": SEED, "seconds": round(seconds, 1),
                    "cases_per_s": round(ran / seconds), "concurrency": CONCURRENCY,
                    "rss_before_mib": round(rss_before, 1), "rss_plateau_mib": round(rss_plateau, 1),
                    "rss_after_mib": round(rss_after, 1), "plateau_cases": PLATEAU_CASES,
                    "peak_rss_mib": round(peak, 1), "fds_before": fds_before, "fds_after": fds,
                    "outcomes": dict(tally), "kinds": dict(kinds),
                    "describe": describe_figures, "getinfo": info_figures})
