"""What a QMP server does with its client's bytes, the way QEMU 7.2 does it.

QEMU does not read QMP line by line. Its JSON "streamer" lexes the input and
counts braces and brackets; a message is complete when both counts are back
to zero, wherever the newlines are. So a command may span lines, and one line
may hold several commands::

    {"execute":
     "query-status"}{"execute": "cont"}        <- two commands

Whatever is not a well-formed JSON value is answered without an ``id``
(``{"error": {"class": "GenericError", "desc": "JSON parse error, ..."}}``)
and the session carries on; so is a JSON value that is not an object
(``QMP input must be a JSON object``). A well-formed object is then checked
member by member (:func:`check_request`) before any command is looked up.
Texts are QEMU 7.2's, checked against a real QEMU (tests/test_acquire_qmp.py
compares the two side by side).

Differences from QEMU, on purpose:

* a message (or a stray token) that grows past ``max_size`` bytes (1 MiB)
  without ending is not an error reply but the end of the session
  (:class:`InputOverflow`): QEMU buffers up to 64 MiB per message;
* after a lexical error *inside* a message (a raw control character in a
  string), the rest of that line is skipped, then parsing resumes; QEMU's
  lexer recovers token by token, which answers the same input with a
  different number of errors;
* parse-error texts come from Python's JSON parser, lower-cased the way QEMU
  words them ("expecting value" is the same in both).

QEMU's extensions that clients rely on are kept: single-quoted strings
(``{'execute': 'query-status'}``), and duplicate keys are an error
(``JSON parse error, duplicate key``). NaN and Infinity are not JSON, in
QEMU or here.

Nothing here does I/O or knows gevent: :class:`InputSplitter` is fed bytes
and returns what it found, so it is tested on its own.
"""

from __future__ import annotations

import json
import re

#: A message, or a stray token, longer than this ends the session.
MAX_MESSAGE_SIZE = 1 << 20
#: QEMU's own limit on brace/bracket nesting.
MAX_NESTING = 1024

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_STRUCTURAL = re.compile(rb"[{}\[\]\"']")
# Strings, unrolled so that a megabyte of string is one fast regex step.
# The longest valid start of a string (quote, characters, escapes), unrolled
# so that a megabyte of string is one fast regex step.
_STRING_BODY = {
    ord('"'): re.compile(rb'"[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*', re.DOTALL),
    ord("'"): re.compile(rb"'[^'\\\x00-\x1f]*(?:\\.[^'\\\x00-\x1f]*)*", re.DOTALL),
}
_TOKEN = re.compile(rb"[^ \t\r\n{}\[\]\"',:]+")
_KEYWORD = re.compile(rb"[A-Za-z]+\Z")
_SCALAR = re.compile(rb"(?:true|false|null|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\Z")
_ANY_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'((?:[^\'\\]|\\.)*)\'', re.DOTALL)
_SQ_ESCAPE = re.compile(r'\\.|"', re.DOTALL)


class InputOverflow(Exception):
    """The client sent more than ``max_size`` bytes without ending a message."""


class RequestError(Exception):
    """A JSON object that is not a valid QMP request; ``desc`` is QEMU's text.

    ``has_id``/``id``: the request's ``id`` if it had one (QEMU echoes it
    with the error).
    """

    def __init__(self, desc: str, has_id: bool = False, id=None):
        super().__init__(desc)
        self.desc = desc
        self.has_id = has_id
        self.id = id


class ParseError(ValueError):
    pass


def _no_constants(name):
    raise ParseError(f"invalid keyword '{name}'")


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ParseError("duplicate key")
        result[key] = value
    return result


_decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def _single_quoted_to_json(text: str) -> str:
    """Rewrite QEMU's single-quoted strings as JSON strings."""
    def convert(match):
        inner = match.group(1)
        if inner is None:
            return match.group(0)  # a double-quoted string, as it is
        return '"' + _SQ_ESCAPE.sub(
            lambda m: {"\\'": "'", '"': '\\"'}.get(m.group(0), m.group(0)), inner) + '"'
    return _ANY_STRING.sub(convert, text)


def parse_message(data: bytes):
    """Decode one complete message; ParseError with QEMU-style wording."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("invalid UTF-8 sequence in string") from None
    if "'" in text:
        text = _single_quoted_to_json(text)
    try:
        value, end = _decoder.raw_decode(text)
    except ParseError:
        raise
    except RecursionError:
        raise ParseError("too deeply nested") from None
    except ValueError as e:
        message = getattr(e, "msg", str(e))
        raise ParseError(message[:1].lower() + message[1:]) from None
    if text[end:].strip():
        raise ParseError("expecting end of input")
    return value


class InputSplitter:
    """Cuts a client's byte stream into QMP messages, as QEMU's streamer does.

    :meth:`feed` returns a list of items, in input order:

    * ``("message", value)``: a complete, well-formed JSON value (usually an
      object; anything else is QEMU's "QMP input must be a JSON object");
    * ``("error", desc)``: input QEMU answers with ``JSON parse error, ...``
      (``desc`` is the whole text).

    Raises :class:`InputOverflow` when a message grows past ``max_size``.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE):
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0              # how far _buf has been scanned
        self._start = None         # where the message being read began
        self._braces = 0
        self._brackets = 0
        self._skip_line = False    # after an error inside a message
        self._skipped = 0

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        items = []
        self._buf += data
        while self._step(items):
            pass
        # Keep only what an unfinished message or token still needs.
        keep = self._start if self._start is not None else self._pos
        if keep:
            del self._buf[:keep]
            self._pos -= keep
            if self._start is not None:
                self._start = 0
        if len(self._buf) > self.max_size:
            raise InputOverflow(f"more than {self.max_size} bytes without the end of a message")
        return items

    def _step(self, items) -> bool:
        """Consume one token or message; False when more input is needed."""
        if self._skip_line:
            return self._skip_to_newline()
        if self._start is None:
            return self._top_level(items)
        return self._in_message(items)

    def _skip_to_newline(self) -> bool:
        newline = self._buf.find(b"\n", self._pos)
        if newline < 0:
            self._skipped += len(self._buf) - self._pos
            self._pos = len(self._buf)
            if self._skipped > self.max_size:
                raise InputOverflow(f"more than {self.max_size} bytes of garbage without a newline")
            return False
        self._pos = newline + 1
        self._skip_line = False
        self._skipped = 0
        return True

    def _top_level(self, items) -> bool:
        buf = self._buf
        self._pos = _WHITESPACE.match(buf, self._pos).end()
        if self._pos >= len(buf):
            return False
        c = buf[self._pos]
        if c in b"{[":
            self._start = self._pos
            self._braces, self._brackets = (1, 0) if c == ord("{") else (0, 1)
            self._pos += 1
        elif c in b"}],:":
            items.append(("error", "JSON parse error, expecting value"))
            self._pos += 1
        elif c in b"\"'":
            end = self._string_end(items)
            if end is None:
                return False
            if end >= 0:
                _emit(items, bytes(buf[self._pos:end]))
                self._pos = end
        else:
            match = _TOKEN.match(buf, self._pos)
            if match.end() >= len(buf):
                return False  # the token may go on: wait, as QEMU's lexer does
            token = match.group(0)
            if _SCALAR.match(token):
                _emit(items, token)
            elif _KEYWORD.match(token):
                items.append(("error", f"JSON parse error, invalid keyword '{token.decode()}'"))
            else:
                stray = token.decode("utf-8", "replace")[:1]
                items.append(("error", f"JSON parse error, stray '{stray}'"))
            self._pos = match.end()
        return True

    def _in_message(self, items) -> bool:
        buf = self._buf
        match = _STRUCTURAL.search(buf, self._pos)
        if match is None:
            self._pos = len(buf)
            return False
        self._pos = match.start()
        c = buf[self._pos]
        if c in b"\"'":
            end = self._string_end(items)
            if end is None:
                return False
            if end >= 0:
                self._pos = end
            return True
        if c == ord("{"):
            self._braces += 1
        elif c == ord("}"):
            self._braces -= 1
        elif c == ord("["):
            self._brackets += 1
        else:
            self._brackets -= 1
        self._pos += 1
        if self._braces + self._brackets > MAX_NESTING:
            items.append(("error", "JSON parse error, too deeply nested"))
            self._reset()
            self._skip_line = True
        elif (self._braces == 0 and self._brackets == 0) or self._braces < 0 or self._brackets < 0:
            message = bytes(buf[self._start:self._pos])
            self._reset()
            _emit(items, message)
        return True

    def _string_end(self, items):
        """Where the string at ``_pos`` ends: None if it may still be
        completed by more input; -1 after a lexical error (reported, and
        the input skipped past it)."""
        buf, pos = self._buf, self._pos
        end = _STRING_BODY[buf[pos]].match(buf, pos).end()
        if end >= len(buf) or (buf[end] == ord("\\") and end + 1 == len(buf)):
            return None
        if buf[end] == buf[pos]:
            return end + 1
        # A raw control character (a newline, typically) inside the string.
        text = bytes(buf[pos:end + 1]).decode("utf-8", "replace")
        items.append(("error", f"JSON parse error, stray '{text}'"))
        self._reset()
        self._pos = end + 1
        self._skip_line = buf[end] != ord("\n")
        return -1

    def _reset(self):
        self._start = None
        self._braces = self._brackets = 0


def _emit(items, data: bytes) -> None:
    try:
        items.append(("message", parse_message(data)))
    except ParseError as e:
        items.append(("error", f"JSON parse error, {e}"))


def check_request(message):
    """``(command, arguments or None, oob)`` of a request, checked like QEMU's
    ``qmp_dispatch_check_obj()``; RequestError otherwise.

    Out-of-band execution is never enabled on a vmbridge session, so
    ``exec-oob`` is always "unexpected", as QEMU says when oob is off.
    """
    if not isinstance(message, dict):
        raise RequestError("QMP input must be a JSON object")
    has_id = "id" in message
    request_id = message.get("id")

    def fail(desc):
        raise RequestError(desc, has_id, request_id)

    for key, value in message.items():
        if key == "execute":
            if not isinstance(value, str):
                fail("QMP input member 'execute' must be a string")
        elif key == "exec-oob":
            fail("QMP input member 'exec-oob' is unexpected")
        elif key == "arguments":
            if not isinstance(value, dict):
                fail("QMP input member 'arguments' must be an object")
        elif key != "id":
            fail(f"QMP input member '{key}' is unexpected")
    if "execute" not in message:
        fail("QMP input lacks member 'execute'")
    return message["execute"], message.get("arguments")


def check_capabilities_arguments(arguments) -> str | None:
    """QEMU's complaint about ``qmp_capabilities``'s arguments, or None.

    (The generated unmarshaller's texts, "Parameter 'null'" quirk included.)
    """
    if not arguments:
        return None
    for key in arguments:
        if key != "enable":
            return f"Parameter '{key}' is unexpected"
    enable = arguments["enable"]
    if not isinstance(enable, list):
        return "Invalid parameter type for 'enable', expected: array"
    for index, item in enumerate(enable):
        if not isinstance(item, str):
            return f"Invalid parameter type for 'enable[{index}]', expected: string"
        if item != "oob":
            return f"Parameter 'null' does not accept value '{item}'"
    return None
