"""The fast header parser gives exactly what nats-py's own parser gives, and only
jetmesh's own connections use it: importing jetmesh leaves nats-py as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from jetmesh.bus import natsfast
from jetmesh.bus.connection import connect
from jetmesh.bus.server import EmbeddedNats

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


def test_importing_jetmesh_leaves_nats_py_unpatched(tmp_path: Path) -> None:
    # A fresh interpreter, as a host program would be (run outside the checkout, whose
    # a2a/ folder would shadow the A2A SDK): everything a program imports to use
    # jetmesh, then nats-py's own Client must still have its own parser.
    code = (
        "import jetmesh, jetmesh.bus.connection, jetmesh.bus.natsfast, jetmesh.agents\n"
        "from jetmesh import Client as JC\n"
        "from nats.aio.client import Client\n"
        "f = Client.__dict__['_parse_header_lines']\n"
        "assert isinstance(f, staticmethod), f\n"
        "assert f.__func__.__module__ == 'nats.aio.client', f.__func__.__module__\n"
        "assert Client()._parse_header_lines is not jetmesh.bus.natsfast.parse_header_lines\n"
        "print('unpatched')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "unpatched"


def test_applied_to_one_connection_only() -> None:
    mine, theirs = natsfast.apply(Client()), Client()
    assert mine._parse_header_lines is natsfast.parse_header_lines
    assert theirs._parse_header_lines is not natsfast.parse_header_lines
    assert Client.__dict__["_parse_header_lines"].__func__ is natsfast.ORIGINAL
    raw = b"Nats-Msg-Id: e1\r\nCe-Type: jetmesh.step.completed.v1\r\n\r\n"
    assert mine._parse_header_lines(raw) == theirs._parse_header_lines(raw) == {
        "Nats-Msg-Id": "e1", "Ce-Type": "jetmesh.step.completed.v1"}


async def test_jetmesh_connections_use_it(nats_server: EmbeddedNats) -> None:
    nc = await connect(nats_server.url)
    try:
        assert nc._parse_header_lines is natsfast.parse_header_lines
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(inbox, b"x", headers={"Nats-Msg-Id": "e1", "Ce-Type": "t"})
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {"Nats-Msg-Id": "e1", "Ce-Type": "t"}
    finally:
        await nc.close()
