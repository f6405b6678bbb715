"""bus.wire.check_json remembers the last objects that passed, only as what they passed."""

from __future__ import annotations

import pytest

from jetmesh.bus.wire import WireError, check_json


def test_a_passed_object_passes_again_but_only_within_its_limits() -> None:
    doc = b'{"a": [{"b": [1, 2, {"c": "d"}]}], "e": "' + b"x" * 200 + b'"}'
    assert check_json(doc) is doc
    assert check_json(doc) is doc  # the second check: the same object, known good
    with pytest.raises(WireError, match="deeper than 2"):
        check_json(doc, max_depth=2)  # passed at 64 levels: says nothing about 2
    with pytest.raises(WireError, match="exceeds 100"):
        check_json(doc, max_bytes=100)
    # An equal but distinct object is checked on its own, and the same bad bytes
    # never pass because something equal to them once did not.
    deep = b"[" * 70 + b"]" * 70
    for _ in range(2):
        with pytest.raises(WireError, match="deeper than 64"):
            check_json(bytes(bytearray(deep)))
    # Text and bytearrays are always checked (their contents can change or re-encode).
    with pytest.raises(WireError, match="lone surrogate"):
        check_json('{"a": "\\udc00"}')
    buf = bytearray(doc)
    assert check_json(buf) == doc
    buf[:1] = b"\xff"
    with pytest.raises(WireError, match="not UTF-8"):
        check_json(buf)
