"""The fast header parser gives exactly what nats-py's own parser gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from jetmesh.bus import natsfast

TOKENS = st.sampled_from([b"Nats-Msg-Id", b"Ce-Type", b"traceparent", b"Nats-Sequence",
                          b"Bad Name", b"tab\tname", b"x\x1cy", b"v\x0bt", b"\x1f",
                          b"\xc3\xa9t\xc3\xa9", b"", b" padded ", b"Status"])
VALUES = st.binary(max_size=40).filter(lambda b: b"\r\n" not in b)


@given(st.lists(st.tuples(TOKENS, st.sampled_from([b": ", b":", b":\t", b""]), VALUES),
                max_size=8))
@settings(max_examples=400, deadline=None)
def test_same_result_as_nats_py(lines: list[tuple[bytes, bytes, bytes]]) -> None:
    raw = b"".join(name + sep + value + b"\r\n" for name, sep, value in lines) + b"\r\n"
    assert natsfast.parse_header_lines(raw) == natsfast.ORIGINAL(raw)


def test_installed_by_the_bus() -> None:
    import jetmesh.bus.connection  # noqa: F401  (installs it)

    assert Client._parse_header_lines is natsfast.parse_header_lines
    raw = b"Nats-Msg-Id: e1\r\nCe-Type: jetmesh.step.completed.v1\r\n\r\n"
    assert Client._parse_header_lines(raw) == {"Nats-Msg-Id": "e1",
                                               "Ce-Type": "jetmesh.step.completed.v1"}
