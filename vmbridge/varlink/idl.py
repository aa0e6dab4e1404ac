"""Varlink interface definitions: parsing, method flags, parameter validation.

python-varlink's ``varlink.Interface`` parses systemd's interface texts
(comments, ``?[]string``, ``object``, named types) into a small type tree. It
does not check parameter types, so validation lives here and follows
sd-varlink's ``varlink_idl_validate_method_call()``:

* the declared fields are checked first, in declaration order; a missing or
  null non-optional field, or a value of the wrong type anywhere inside a
  field, makes that *top-level* field the bad one;
* then the first key that the method does not declare is the bad one;
* ``int`` also accepts a string holding a decimal integer (sd-varlink allows it
  because JSON implementations lose precision past 53 bits); we hand the
  handler a real ``int``;
* ``float`` accepts any JSON number, ``object`` any JSON object; ``bool`` is
  never an ``int`` and an ``int`` is never a ``bool``.

Which methods need the ``more`` or ``upgrade`` flag is not part of the IDL
grammar: systemd writes it as a comment line directly above the method, e.g.
``# [Requires 'more' flag]``. We read those comments from the text.
"""

import functools
import re
from collections.abc import Set

import varlink.scanner as _scanner

from .protocol import VarlinkError

# int64 and uint64 together: what sd-json can carry as an integer.
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1
_DECIMAL = re.compile(r"-?[0-9]+\Z")

_FLAG_COMMENT = re.compile(r"\[(Requires|Supports) '(more|upgrade)' flag\]")
_METHOD_LINE = re.compile(r"\s*method\s+([A-Z][A-Za-z0-9]*)\b")


class _Mismatch(Exception):
    """A value does not have its declared type (internal to validation)."""


class MethodDefinition:
    """One method of an interface, with its flag requirements."""

    def __init__(self, interface, parsed, flags):
        self.interface = interface
        self.name = parsed.name
        self.full_name = "%s.%s" % (interface.name, parsed.name)
        self.input_fields = parsed.in_type.fields
        self.output_fields = parsed.out_type.fields
        self.requires_more = ("Requires", "more") in flags
        self.supports_more = self.requires_more or ("Supports", "more") in flags
        self.requires_upgrade = ("Requires", "upgrade") in flags
        self.supports_upgrade = (self.requires_upgrade
                                 or ("Supports", "upgrade") in flags)

    def __repr__(self):
        return "<MethodDefinition %s>" % self.full_name

    def validate_parameters(self, parameters):
        """Check call parameters against the IDL input.

        Returns a new dict: every declared field present (missing optional
        ones as None), ints normalised. Raises VarlinkError InvalidParameter
        naming the first bad parameter, in sd-varlink's order.
        """
        return self.interface._validate_struct_fields(self.input_fields,
                                                      parameters)

    def reply_mismatch(self, parameters):
        """The first reply field that does not fit the IDL output, else None.

        sd-varlink only logs such replies and sends them anyway; so do we.
        """
        try:
            self.interface._validate_struct_fields(self.output_fields, parameters)
        except VarlinkError as e:
            return e.parameters["parameter"]
        return None


class InterfaceDefinition:
    """A parsed .varlink text. ``text`` is kept verbatim for GetInterfaceDescription."""

    def __init__(self, text):
        if not isinstance(text, str):
            raise TypeError("interface text must be str")
        try:
            parsed = _scanner.Interface(text)
        except SyntaxError as e:
            raise ValueError("cannot parse varlink interface: %s" % e) from None
        self.text = text
        self.name = parsed.name
        self._members = parsed.members
        flags = _method_flags(text)
        self.methods = {}
        self.errors = set()
        for member in parsed.members.values():
            if isinstance(member, _scanner._Method):
                self.methods[member.name] = MethodDefinition(
                    self, member, flags.get(member.name, ()))
            elif isinstance(member, _scanner._Error):
                self.errors.add(member.name)

    def __repr__(self):
        return "<InterfaceDefinition %s>" % self.name

    # -- validation ----------------------------------------------------------

    def _validate_struct_fields(self, fields, parameters):
        if parameters is None:
            parameters = {}
        result = {}
        for name, field_type in fields.items():
            try:
                result[name] = self._check(field_type, parameters.get(name))
            except _Mismatch:
                raise VarlinkError.invalid_parameter(name) from None
        for name in parameters:
            if name not in fields:
                raise VarlinkError.invalid_parameter(name)
        return result

    def _check(self, vtype, value):
        """Return ``value`` (normalised) if it fits ``vtype``, else raise _Mismatch."""
        if isinstance(vtype, _scanner._Maybe):
            if value is None:
                return None
            return self._check(vtype.element_type, value)
        if value is None:
            raise _Mismatch()
        # python-varlink represents the scalar types by an instance of the
        # Python type: False, 0, 0.0, "". bool first: bool is an int subclass.
        if isinstance(vtype, bool):
            if value is True or value is False:
                return value
            raise _Mismatch()
        if isinstance(vtype, int):
            return _check_int(value)
        if isinstance(vtype, float):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise _Mismatch()
        if isinstance(vtype, str):
            if isinstance(value, str):
                return value
            raise _Mismatch()
        if isinstance(vtype, _scanner._Object):
            if isinstance(value, dict):
                return value
            raise _Mismatch()
        if isinstance(vtype, _scanner._Array):
            if not isinstance(value, list):
                raise _Mismatch()
            return [self._check(vtype.element_type, item) for item in value]
        if isinstance(vtype, _scanner._Dict):
            if not isinstance(value, dict):
                raise _Mismatch()
            return {key: self._check(vtype.element_type, item)
                    for key, item in value.items()}
        if isinstance(vtype, Set):
            # [string]() — a set of strings, each mapped to an empty object.
            if not isinstance(value, dict):
                raise _Mismatch()
            for item in value.values():
                if item != {}:
                    raise _Mismatch()
            return value
        if isinstance(vtype, _scanner._CustomType):
            alias = self._members.get(vtype.name)
            if not isinstance(alias, _scanner._Alias):
                raise _Mismatch()      # the IDL names a type it never defines
            return self._check(alias.type, value)
        if isinstance(vtype, _scanner._Enum):
            if isinstance(value, str) and value in vtype.fields:
                return value
            raise _Mismatch()
        if isinstance(vtype, _scanner._Struct):
            if not isinstance(value, dict):
                raise _Mismatch()
            try:
                return self._validate_struct_fields(vtype.fields, value)
            except VarlinkError:
                raise _Mismatch() from None
        raise _Mismatch()


@functools.lru_cache(maxsize=64)
def parse_interface(text):
    """The :class:`InterfaceDefinition` of ``text``, parsed once and shared.

    A definition never changes after parsing and holds nothing of the
    service using it, so every VM's control socket can share one: parsing
    systemd's three machine interfaces costs ~2 ms and ~40 KiB per service.
    """
    return InterfaceDefinition(text)


def _check_int(value):
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, str) and _DECIMAL.match(value):
        value = int(value)
    if not isinstance(value, int):
        raise _Mismatch()
    if not _INT_MIN <= value <= _INT_MAX:
        raise _Mismatch()
    return value


def _method_flags(text):
    """Map method name -> {("Requires"|"Supports", "more"|"upgrade"), ...}.

    Only the comment block directly above ``method X`` counts: a blank or
    non-comment line ends the block, as in systemd's formatted IDL.
    """
    flags = {}
    block = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            for match in _FLAG_COMMENT.finditer(stripped):
                block.add((match.group(1), match.group(2)))
            continue
        method = _METHOD_LINE.match(line)
        if method:
            flags[method.group(1)] = frozenset(block)
        block = set()
    return flags
