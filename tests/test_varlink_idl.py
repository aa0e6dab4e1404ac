"""IDL parsing, flag comments and parameter validation (no sockets)."""

import pytest

from varlink_fixtures import TEST_IDL, TestHandler, make_test_service
from vmbridge.varlink import (Call, InterfaceDefinition, Service, VarlinkError,
                              interface_text)


def invalid(name):
    return ("org.varlink.service.InvalidParameter", {"parameter": name})


def dispatch(service, method, parameters=None, **flags):
    call = Call("org.example.test." + method, parameters or {}, **flags)
    try:
        return service.handle(call)
    except VarlinkError as e:
        return e.error, e.parameters


@pytest.fixture
def service():
    return make_test_service()


@pytest.mark.parametrize("name", ["io.systemd.MachineInstance", "io.systemd",
                                  "io.systemd.QemuMachineInstance",
                                  "io.systemd.VirtualMachineInstance",
                                  "org.varlink.service"])
def test_systemd_interface_texts_parse(name):
    definition = InterfaceDefinition(interface_text(name))
    assert definition.name == name
    assert definition.text == interface_text(name)


def test_flag_comments_are_read_from_the_text():
    machine = InterfaceDefinition(interface_text("io.systemd.MachineInstance"))
    flagged = {m for m, d in machine.methods.items() if d.requires_more}
    assert flagged == {"SubscribeEvents"}
    assert not any(d.requires_upgrade for d in machine.methods.values())
    qemu = InterfaceDefinition(interface_text("io.systemd.QemuMachineInstance"))
    assert qemu.methods["AcquireQMP"].requires_upgrade
    assert not qemu.methods["AcquireQMP"].requires_more
    test = InterfaceDefinition(TEST_IDL)
    assert test.methods["Count"].supports_more and not test.methods["Count"].requires_more
    assert test.methods["Watch"].requires_more
    assert test.methods["Raw"].requires_upgrade
    assert not test.methods["Echo"].supports_more
    assert test.errors == {"Failed"}


def test_bad_idl_is_a_value_error():
    with pytest.raises(ValueError):
        InterfaceDefinition("interface org.example\nmethod broken(")


@pytest.mark.parametrize("parameters, expected", [
    ({"i": "STOP"}, invalid("i")),
    ({"i": True}, invalid("i")),
    ({"i": 1.5}, invalid("i")),
    ({"i": 1 << 64}, invalid("i")),
    ({"i": "12x"}, invalid("i")),
    ({"f": "1.0"}, invalid("f")),
    ({"f": False}, invalid("f")),
    ({"s": 1}, invalid("s")),
    ({"s": {}}, invalid("s")),
    ({"b": 0}, invalid("b")),
    ({"b": "true"}, invalid("b")),
    ({"o": []}, invalid("o")),
    ({"o": "x"}, invalid("o")),
    ({"strings": "STOP"}, invalid("strings")),
    ({"strings": ["a", 1]}, invalid("strings")),
    ({"strings": ["a", None]}, invalid("strings")),
    ({"map": {"a": "1x"}}, invalid("map")),
    ({"map": ["a"]}, invalid("map")),
    ({"point": {"x": 1}}, invalid("point")),
    ({"point": {"x": 1, "y": 2, "z": 3}}, invalid("point")),
    ({"point": {"x": 1, "y": "two"}}, invalid("point")),
    ({"color": "purple"}, invalid("color")),
    ({"color": 1}, invalid("color")),
    ({"points": [{"x": 1, "y": 2}, {"x": 1}]}, invalid("points")),
    ({"nested": {"b": []}}, invalid("nested")),
    ({"nested": {"a": 1, "b": [1]}}, invalid("nested")),
    ({"set": {"a": 1}}, invalid("set")),
    ({"set": ["a"]}, invalid("set")),
    ({"unknown": 1}, invalid("unknown")),
    # Declared fields are checked before unknown keys, as sd-varlink does.
    ({"unknown": 1, "s": 2}, invalid("s")),
])
def test_wrong_types_name_the_top_level_parameter(service, parameters, expected):
    assert dispatch(service, "Types", parameters) == expected


def test_valid_values_are_normalised(service):
    got = dispatch(service, "Types", {
        "i": -5, "f": 2, "s": "x", "b": False, "o": {"any": [1, None]},
        "strings": [], "map": {"a": 1}, "point": {"x": 1, "y": 2},
        "color": "green", "points": [], "nested": {"a": "7", "b": ["s", None]},
        "set": {"a": {}, "b": {}}})["got"]
    assert got["f"] == 2.0 and isinstance(got["f"], float)
    assert got["nested"] == {"a": 7, "b": ["s", None]}     # int given as a string
    assert got["o"] == {"any": [1, None]}


def test_int_accepts_decimal_strings_like_sd_varlink(service):
    assert dispatch(service, "Types", {"i": "-42"})["got"]["i"] == -42
    assert dispatch(service, "Types", {"i": str((1 << 64) - 1)})["got"]["i"] == (1 << 64) - 1


def test_absent_optional_parameters_are_none(service):
    got = dispatch(service, "Types", {})["got"]
    assert got == dict.fromkeys(["i", "f", "s", "b", "o", "strings", "map", "point",
                                 "color", "points", "nested", "set"])
    assert dispatch(service, "Types", {"s": None})["got"]["s"] is None


def test_required_parameters(service):
    assert dispatch(service, "Required", {}) == invalid("name")
    assert dispatch(service, "Required", {"name": "a"}) == invalid("count")
    assert dispatch(service, "Required", {"name": None, "count": 1}) == invalid("name")
    assert dispatch(service, "Required", {"name": "a", "count": 1}) == {}


def test_flags_are_checked_before_parameters(service):
    assert dispatch(service, "Watch", {"bogus": 1}) == ("org.varlink.service.ExpectedMore", None)
    assert dispatch(service, "Raw", {"bogus": 1}) == ("org.varlink.service.ExpectedUpgrade", None)
    assert dispatch(service, "Watch", {"bogus": 1}, more=True) == invalid("bogus")


def test_missing_handler_method_is_method_not_found(service):
    assert dispatch(service, "Unimplemented") == (
        "org.varlink.service.MethodNotFound",
        {"method": "org.example.test.Unimplemented"})


def test_add_interface_rules():
    service = Service(vendor="v", product="p", version="1", url="u")
    assert service.interfaces == ["org.varlink.service", "io.systemd"]
    service.add_interface(interface_text("io.systemd"))       # replaces the built-in
    service.add_interface(TEST_IDL, TestHandler())
    with pytest.raises(ValueError):
        service.add_interface(TEST_IDL, TestHandler())
    with pytest.raises(ValueError):
        service.add_interface(interface_text("org.varlink.service"), object())
    info = service.handle(Call("org.varlink.service.GetInfo"))
    assert info == {"vendor": "v", "product": "p", "version": "1", "url": "u",
                    "interfaces": ["io.systemd", "org.example.test", "org.varlink.service"]}


def test_interface_text_rejects_paths():
    for bad in ("../setup", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            interface_text(bad)
    with pytest.raises(FileNotFoundError):
        interface_text("io.example.Missing")


def test_call_take_fd_semantics():
    call = Call("x.y.Z", fds=[10, 11])
    assert call.take_fd(1) == 11
    with pytest.raises(IndexError):
        call.take_fd(1)             # already taken
    with pytest.raises(IndexError):
        call.take_fd(2)
    with pytest.raises(VarlinkError) as e:
        call.take_fd(-1, "fileDescriptorIndex")
    assert e.value.parameters == {"parameter": "fileDescriptorIndex"}
    assert call.fds == [10, None]


def test_varlink_error_shapes():
    assert VarlinkError("a.b.C").to_message() == {"error": "a.b.C"}
    assert VarlinkError("a.b.C", {}).to_message() == {"error": "a.b.C"}
    assert VarlinkError.from_errno(2).to_message() == {
        "error": "io.systemd.System",
        "parameters": {"origin": "linux", "errno": 2, "errnoName": "ENOENT"}}
    with pytest.raises(TypeError):
        VarlinkError("")
