"""The systemd 262 wire transcript, byte for byte, against our server.

The lines are those of reference/systemd-262-wire.md (GetInfo, Describe/
Pause/Resume, Errors, the start and the end of a SubscribeEvents stream),
sent over a raw socket to a Server serving the real interface texts with
fake handlers.
"""

import json

import pytest

from varlink_fixtures import MACHINE, FakeMachine, machine_service
from vmbridge.varlink import interface_text


GET_INFO = [(
    '{"method":"org.varlink.service.GetInfo","parameters":{}}',
    '{"parameters":{"vendor":"The systemd Project","product":"systemd (systemd-vmspawn)",'
    '"version":"262.1 (262.1-1)","url":"https://systemd.io/","interfaces":["io.systemd",'
    '"io.systemd.MachineInstance","io.systemd.VirtualMachineInstance","org.varlink.service"]}}',
)]

DESCRIBE_PAUSE_RESUME = [
    ('{"method":"io.systemd.MachineInstance.Describe","parameters":{}}',
     '{"parameters":{"running":true,"status":"running"}}'),
    ('{"method":"io.systemd.MachineInstance.Pause","parameters":{}}', '{}'),
    ('{"method":"io.systemd.MachineInstance.Describe","parameters":{}}',
     '{"parameters":{"running":false,"status":"paused"}}'),
    ('{"method":"io.systemd.MachineInstance.Pause","parameters":{}}', '{}'),
    ('{"method":"io.systemd.MachineInstance.Resume","parameters":{}}', '{}'),
    ('{"method":"io.systemd.MachineInstance.Resume","parameters":{}}', '{}'),
]

ERRORS = [
    ('{"method":"io.systemd.MachineInstance.Nope","parameters":{}}',
     '{"error":"org.varlink.service.MethodNotFound","parameters":'
     '{"method":"io.systemd.MachineInstance.Nope"}}'),
    ('{"method":"io.systemd.MachineInstance.Describe","parameters":{"x":1}}',
     '{"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"x"}}'),
    ('{"method":"io.systemd.MachineInstance.SubscribeEvents","parameters":{}}',
     '{"error":"org.varlink.service.ExpectedMore"}'),
    ('{"method":"io.systemd.MachineInstance.SubscribeEvents","parameters":{"filter":"STOP"},"more":true}',
     '{"error":"org.varlink.service.InvalidParameter","parameters":{"parameter":"filter"}}'),
    ('{"method":"io.systemd.MachineInstance.RemoveStorage","parameters":{"name":"nope"}}',
     '{"error":"io.systemd.MachineInstance.NoSuchStorage"}'),
]

NOT_SERVED_BY_262 = [
    ('{"method":"io.systemd.QemuMachineInstance.AcquireQMP","parameters":{}}',
     '{"error":"org.varlink.service.MethodNotFound","parameters":'
     '{"method":"io.systemd.QemuMachineInstance.AcquireQMP"}}'),
]


@pytest.mark.parametrize("section", [GET_INFO, DESCRIBE_PAUSE_RESUME, ERRORS,
                                     NOT_SERVED_BY_262],
                         ids=["GetInfo", "Describe-Pause-Resume", "Errors",
                              "AcquireQMP-262"])
def test_transcript_lines_byte_for_byte(serve, raw_clients, section):
    client = raw_clients(serve(machine_service()))
    for sent, expected in section:
        assert client.transact(sent) == expected, sent


def test_malformed_json_closes_the_connection(serve, raw_clients):
    client = raw_clients(serve(machine_service()))
    client.send_message('{"method":"io.systemd.MachineInstance.Describe","parameters":{}')
    assert client.closed_by_server()


def test_subscribe_events_ready_then_events_then_close(serve, raw_clients):
    machine = FakeMachine()
    client = raw_clients(serve(machine_service(machine)))
    client.send_message('{"method":"io.systemd.MachineInstance.SubscribeEvents",'
                        '"parameters":{},"more":true}')
    assert client.receive() == '{"parameters":{"event":"READY"},"continues":true}'
    machine.events.put({"event": "RESET", "data": {"guest": False,
                                                   "reason": "host-qmp-system-reset"}})
    assert client.receive() == ('{"parameters":{"event":"RESET","data":{"guest":false,'
                                '"reason":"host-qmp-system-reset"}},"continues":true}')
    machine.events.put({"event": "POWERDOWN"})
    assert client.receive() == '{"parameters":{"event":"POWERDOWN"},"continues":true}'
    machine.events.put(None)        # the VM is gone
    assert client.closed_by_server()


def test_subscribe_events_filter_still_sends_ready(serve, raw_clients):
    machine = FakeMachine()
    client = raw_clients(serve(machine_service(machine)))
    client.send_message('{"method":"io.systemd.MachineInstance.SubscribeEvents",'
                        '"parameters":{"filter":["STOP"]},"more":true}')
    assert client.receive() == '{"parameters":{"event":"READY"},"continues":true}'
    machine.events.put({"event": "RESUME"})
    machine.events.put({"event": "STOP"})
    assert client.receive() == '{"parameters":{"event":"STOP"},"continues":true}'


def test_get_interface_description_serves_the_exact_text(serve, raw_clients):
    client = raw_clients(serve(machine_service()))
    for name in (MACHINE, "io.systemd", "org.varlink.service",
                 "io.systemd.VirtualMachineInstance"):
        reply = client.call("org.varlink.service.GetInterfaceDescription",
                            {"interface": name})
        assert reply == {"parameters": {"description": interface_text(name)}}


def test_get_interface_description_unknown_and_bad_parameters(serve, raw_clients):
    client = raw_clients(serve(machine_service()))
    assert client.transact('{"method":"org.varlink.service.GetInterfaceDescription",'
                           '"parameters":{"interface":"io.systemd.Nope"}}') == (
        '{"error":"org.varlink.service.InterfaceNotFound",'
        '"parameters":{"interface":"io.systemd.Nope"}}')
    assert client.call("org.varlink.service.GetInterfaceDescription") == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "interface"}}
    assert client.call("org.varlink.service.GetInfo", {"verbose": True}) == {
        "error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "verbose"}}


def test_unknown_interface_is_method_not_found_like_sd_varlink(serve, raw_clients):
    client = raw_clients(serve(machine_service()))
    for method in ("io.example.Nope.Method", "NoDotsAtAll",
                   "io.systemd.MachineInstance.NoSuchStorage",    # an error, not a method
                   "io.systemd.Disconnected"):
        assert client.call(method) == {"error": "org.varlink.service.MethodNotFound",
                                       "parameters": {"method": method}}


def test_null_or_missing_parameters_mean_empty(serve, raw_clients):
    client = raw_clients(serve(machine_service()))
    assert client.transact('{"method":"io.systemd.MachineInstance.Describe"}') == \
        '{"parameters":{"running":true,"status":"running"}}'
    assert client.transact('{"method":"io.systemd.MachineInstance.Describe",'
                           '"parameters":null}') == \
        '{"parameters":{"running":true,"status":"running"}}'


def test_acquire_qmp_needs_upgrade_when_registered(serve, raw_clients):
    service = machine_service()

    class Qemu:
        def AcquireQMP(self, call):
            raise AssertionError("must not be reached without upgrade")
    service.add_interface(interface_text("io.systemd.QemuMachineInstance"), Qemu())
    client = raw_clients(serve(service))
    assert client.transact('{"method":"io.systemd.QemuMachineInstance.AcquireQMP",'
                           '"parameters":{}}') == '{"error":"org.varlink.service.ExpectedUpgrade"}'
    info = client.call("org.varlink.service.GetInfo")["parameters"]
    assert info["interfaces"] == sorted(info["interfaces"])
    assert "io.systemd.QemuMachineInstance" in info["interfaces"]


@pytest.mark.parametrize("call", [
    '[1,2]',
    '{"parameters":{}}',
    '{"method":1}',
    '{"method":"io.systemd.MachineInstance.Describe","parameters":[]}',
    '{"method":"io.systemd.MachineInstance.Describe","more":"yes"}',
    '{"method":"io.systemd.MachineInstance.Describe","unknown":true}',
    '{"method":"io.systemd.MachineInstance.Describe","more":true,"oneway":true}',
    '{"method":"io.systemd.MachineInstance.Describe","more":true,"upgrade":true}',
    '{"method":"io.systemd.MachineInstance.Describe","parameters":{"x":NaN}}',
    b'{"method":"\xff"}',
    b'{"method":"a.b.C","parameters":{"x":' + b"[" * 100000 + b"]" * 100000 + b"}}",
])
def test_protocol_violations_close_the_connection(serve, raw_clients, call):
    client = raw_clients(serve(machine_service()))
    client.send((call if isinstance(call, bytes) else call.encode()) + b"\0")
    assert client.closed_by_server()


def test_reply_keys_are_in_systemd_order(serve, raw_clients):
    client = raw_clients(serve(machine_service()))
    reply = client.transact('{"method":"io.systemd.MachineInstance.Nope","parameters":{}}')
    assert list(json.loads(reply)) == ["error", "parameters"]
