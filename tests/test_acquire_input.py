"""qmp_input: QEMU's way of cutting QMP input into requests, without sockets.

What QEMU 7.2 itself answers to the same input is checked side by side with a
real QEMU in test_acquire_qmp.py; here the corner cases, chunking and limits.
"""

from __future__ import annotations

import pytest

from vmbridge.machine.qmp_input import (MAX_NESTING, InputOverflow, InputSplitter, RequestError,
                                        check_capabilities_arguments, check_request)


def feed_all(data: bytes, chunk: int | None = None, max_size: int = 1 << 20):
    splitter = InputSplitter(max_size)
    if chunk is None:
        return splitter.feed(data), splitter
    items = []
    for i in range(0, len(data), chunk):
        items += splitter.feed(data[i:i + chunk])
    return items, splitter


CASES = [
    (b'{"execute": "query-status"}\n', [("message", {"execute": "query-status"})]),
    # Not line-based: one command over lines, two on one line.
    (b'{"execute":\n "query-status",\n "id": 1}{"execute":"cont"}\n',
     [("message", {"execute": "query-status", "id": 1}), ("message", {"execute": "cont"})]),
    (b"garbage\n", [("error", "JSON parse error, invalid keyword 'garbage'")]),
    (b"foo bar\n", [("error", "JSON parse error, invalid keyword 'foo'"),
                    ("error", "JSON parse error, invalid keyword 'bar'")]),
    (b"42\n", [("message", 42)]),
    (b'"str"\n', [("message", "str")]),
    (b"[1, 2]\n", [("message", [1, 2])]),
    (b"}\n", [("error", "JSON parse error, expecting value")]),
    (b'{"a":}\n', [("error", "JSON parse error, expecting value")]),
    (b'{"execute":"x",}\n', [("error", "JSON parse error, expecting property name enclosed in double quotes")]),
    (b'"\n', [("error", "JSON parse error, stray '\"\n'")]),
    (b"\xff\n", [("error", "JSON parse error, stray '\ufffd'")]),
    (b'{"execute":"x","id":1,"id":2}\n', [("error", "JSON parse error, duplicate key")]),
    (b'{"id": NaN}\n', [("error", "JSON parse error, invalid keyword 'NaN'")]),
    # QEMU's single-quoted strings, with their escapes.
    (b"{'execute': 'query-status', 'id': 'a\\'b\"c'}\n",
     [("message", {"execute": "query-status", "id": "a'b\"c"})]),
    (b'{"s": "caf\\u00e9 \\"q\\" \\\\"}\n', [("message", {"s": 'caf\u00e9 "q" \\'})]),
    (b'{"s": "\xc3\xa9"}\n', [("message", {"s": "\u00e9"})]),
    (b'{"s": "\xff"}\n', [("error", "JSON parse error, invalid UTF-8 sequence in string")]),
    (b"   \r\n\t\n", []),
    # A raw newline inside a string: an error, then parsing goes on after it.
    (b'{"a": "b\n{"execute": "cont"}\n',
     [("error", "JSON parse error, stray '\"b\n'"), ("message", {"execute": "cont"})]),
    # Brackets inside strings do not count.
    (b'{"a": "}]{[", "b": [1, {"c": "]"}]}\n', [("message", {"a": "}]{[", "b": [1, {"c": "]"}]})]),
]


@pytest.mark.parametrize("data,expected", CASES, ids=[repr(c[0][:30]) for c in CASES])
def test_items(data, expected):
    assert feed_all(data)[0] == expected


@pytest.mark.parametrize("data,expected", CASES, ids=[repr(c[0][:30]) for c in CASES])
def test_items_byte_by_byte(data, expected):
    items, splitter = feed_all(data, chunk=1)
    assert items == expected
    assert splitter.buffered == 0


def test_a_token_waits_for_its_end():
    splitter = InputSplitter()
    assert splitter.feed(b"garb") == []  # it may go on, as QEMU's lexer assumes
    assert splitter.feed(b"age ") == [("error", "JSON parse error, invalid keyword 'garbage'")]
    assert splitter.feed(b'{"execute": "x"') == []
    assert splitter.buffered == len(b'{"execute": "x"')
    assert splitter.feed(b"}") == [("message", {"execute": "x"})]
    assert splitter.buffered == 0


def test_an_endless_message_overflows():
    splitter = InputSplitter(max_size=1000)
    splitter.feed(b'{"execute": "' + b"x" * 900)
    with pytest.raises(InputOverflow):
        splitter.feed(b"x" * 200)


def test_an_endless_token_overflows():
    splitter = InputSplitter(max_size=1000)
    with pytest.raises(InputOverflow):
        splitter.feed(b"a" * 1001)


def test_endless_garbage_after_an_error_overflows():
    splitter = InputSplitter(max_size=1000)
    assert splitter.feed(b'{"a": "\x01') == [("error", "JSON parse error, stray '\"\x01'")]
    splitter.feed(b"z" * 900)
    assert splitter.buffered == 0  # skipped, not kept
    with pytest.raises(InputOverflow):
        splitter.feed(b"z" * 200)


def test_a_megabyte_string_is_fine():
    big = b'{"execute": "x", "arguments": {"s": "' + b"y" * 1_000_000 + b'"}}\n'
    items, _ = feed_all(big, chunk=65536, max_size=1 << 21)
    assert items[0][1]["arguments"]["s"] == "y" * 1_000_000


def test_nesting_limit():
    deep = b"[" * (MAX_NESTING + 1)
    items, splitter = feed_all(deep + b"\n" + b'{"execute": "x"}\n')
    assert items == [("error", "JSON parse error, too deeply nested"), ("message", {"execute": "x"})]
    ok = b"[" * 500 + b"]" * 500 + b"\n"
    assert feed_all(ok)[0][0][0] == "message"


def test_unbalanced_brackets():
    # As QEMU counts: braces and brackets apart; a message ends when both are
    # back to zero, or either goes below.
    assert feed_all(b'{"a": [1}\n')[0] == []
    assert feed_all(b'{"a": 1]}\n')[0] == [("error", "JSON parse error, expecting ',' delimiter"),
                                            ("error", "JSON parse error, expecting value")]


@pytest.mark.parametrize("message,desc,has_id", [
    (42, "QMP input must be a JSON object", False),
    ([1], "QMP input must be a JSON object", False),
    ({"id": 3}, "QMP input lacks member 'execute'", True),
    ({"execute": 3, "id": 4}, "QMP input member 'execute' must be a string", True),
    ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object", False),
    ({"execute": "x", "arguments": None}, "QMP input member 'arguments' must be an object", False),
    ({"execute": "x", "foo": 1}, "QMP input member 'foo' is unexpected", False),
    ({"exec-oob": "x", "id": 5}, "QMP input member 'exec-oob' is unexpected", True),
    ({"execute": "x", "exec-oob": "x"}, "QMP input member 'exec-oob' is unexpected", False),
])
def test_check_request_errors(message, desc, has_id):
    with pytest.raises(RequestError) as info:
        check_request(message)
    assert info.value.desc == desc
    assert info.value.has_id == has_id
    if has_id:
        assert info.value.id == message["id"]


def test_check_request():
    assert check_request({"execute": "x"}) == ("x", None)
    assert check_request({"id": None, "execute": "x", "arguments": {"a": 1}}) == ("x", {"a": 1})


@pytest.mark.parametrize("arguments,problem", [
    (None, None),
    ({}, None),
    ({"enable": []}, None),
    ({"enable": ["oob"]}, None),
    ({"foo": 1}, "Parameter 'foo' is unexpected"),
    ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ({"enable": ["x"]}, "Parameter 'null' does not accept value 'x'"),
    ({"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
])
def test_capabilities_arguments(arguments, problem):
    assert check_capabilities_arguments(arguments) == problem
