"""The edge: what bytes jetmesh accepts as a JSON message, checked once, before any parser.

Every decoder of bytes that came over NATS (a pull consumer, a ledger read, a dead
letter, a jetmesh model's `model_validate_json`, `decode_event`) calls `check_json`
first. It is iterative (no recursion, so it cannot itself overflow the stack), linear
in the message, and rejects with one error, `WireError`, whose `reason` says why:

- more than `MAX_MESSAGE_BYTES` bytes;
- not UTF-8 (invalid bytes, or an encoded surrogate);
- a lone UTF-16 surrogate in a `\\uXXXX` escape (Python's json accepts it, the string
  then cannot be encoded again, so whatever holds it can never be stored);
- a `NaN` / `Infinity` token, or a number out of float range or longer than
  `MAX_NUMBER_CHARS` (parsers turn these into values that serialize as `null` or not
  at all);
- nesting deeper than `MAX_JSON_DEPTH`.

It does not check that the bytes are JSON: the parser after it does, and says so.

Anything that passes is safe for every parser jetmesh uses (pydantic's JSON parser
gives up at 200 levels, Python's json near the interpreter's recursion limit) and
whatever a jetmesh event or command wraps around a value that passed can be stored
and read back: the ledger refuses to write a document the check would refuse to read
(`bus.events.encode_event`), and a task submission's free-form fields may nest at most
`MAX_PAYLOAD_DEPTH`, leaving the rest of the depth to the envelopes that carry them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from jetmesh.bus.errors import BusError

MAX_MESSAGE_BYTES = 1_000_000
"""Largest message jetmesh accepts on any subject (the server's default max_payload)."""

MAX_JSON_DEPTH = 64
"""The one nesting limit: no JSON document jetmesh reads or writes nests deeper (an
object or array is one level; a scalar at the top is depth 0)."""

MAX_PAYLOAD_DEPTH = MAX_JSON_DEPTH // 2
"""How deep a client's free-form data (a submission's `input` and `metadata`) may nest:
half the limit, so the events that carry it (and the step inputs, outputs and results
made from it) stay within MAX_JSON_DEPTH."""

MAX_NUMBER_CHARS = 320
"""Longest number literal accepted (1e308, the largest float, needs 309 digits)."""

MAX_REASON_CHARS = 2_000
"""Longest reason string kept in a dead letter or a skipped-message report."""


class WireError(BusError, ValueError):
    """Bytes refused at the edge; `reason` says why (safe to log and to store)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# A JSON string literal (the unrolled form of "(?:[^"\\]|\\.)*": linear, no
# backtracking). Removing every one leaves only structure, numbers and literals.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Bytes that are not a bracket, for bytes.translate(None, delete=...).
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")
_NON_FINITE = re.compile(rb"NaN|Infinity")
# A number with an exponent (may overflow), or a run of digits longer than allowed.
_RISKY_NUMBER = re.compile(
    rb"-?[0-9]+(?:\.[0-9]+)?[eE][-+]?[0-9]+|[-0-9.eE+]{%d,}" % (MAX_NUMBER_CHARS + 1))
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _as_bytes(raw: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WireError(f"text holds a lone surrogate at character {e.start}") from None
    return bytes(raw)


def check_json(raw: bytes | bytearray | memoryview | str, *,
               max_bytes: int = MAX_MESSAGE_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> bytes:
    """Return `raw` as bytes if it is safe to parse (see the module doc), else raise
    WireError with the reason. Never raises anything else."""
    data = _as_bytes(raw)
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"not UTF-8: invalid byte at offset {e.start}") from None
    if b"\\u" in data and _MAYBE_SURROGATE.search(data):
        _check_surrogates(data)
    bare = _STRING.sub(b'""', data)
    if _NON_FINITE.search(bare):
        raise WireError("NaN and Infinity are not JSON numbers")
    for m in _RISKY_NUMBER.finditer(bare):
        token = m.group()
        if len(token) > MAX_NUMBER_CHARS:
            raise WireError(f"number literal longer than {MAX_NUMBER_CHARS} characters")
        try:
            finite = math.isfinite(float(token))
        except ValueError:
            continue  # not a number: the parser will say so
        if not finite:
            raise WireError(f"number {token.decode()[:40]} is out of float range")
    brackets = bare.translate(None, delete=_NOT_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return data  # cannot nest deeper than it has brackets
    depth = deepest = 0
    for b in brackets:
        if b in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise WireError(f"JSON nested deeper than {max_depth} levels")
        else:
            depth -= 1
    return data


def _check_surrogates(data: bytes) -> None:
    """A high surrogate escape must be followed at once by a low one, and a low one
    must follow a high one. Every escape is matched whole, so `\\\\ud800` (an escaped
    backslash, then text) is not mistaken for one."""
    pending: int | None = None  # where the escape after a high surrogate must start
    for m in _ESCAPE.finditer(data):
        hexa = m.group(1)
        code = int(hexa, 16) if hexa is not None else -1
        if pending is not None:
            if m.start() != pending or not 0xDC00 <= code <= 0xDFFF:
                raise WireError("lone surrogate escape in a JSON string")
            pending = None
            continue
        if 0xD800 <= code <= 0xDBFF:
            pending = m.end()
        elif 0xDC00 <= code <= 0xDFFF:
            raise WireError("lone surrogate escape in a JSON string")
    if pending is not None:
        raise WireError("lone surrogate escape in a JSON string")


def _no_constant(name: str) -> Any:
    raise WireError(f"{name} is not a JSON number")


def decode_json(raw: bytes | bytearray | memoryview | str, *,
                max_bytes: int = MAX_MESSAGE_BYTES,
                max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse one JSON message received from outside; raises only WireError.

    What it returns can always be encoded again (`json.dumps(v, allow_nan=False)`,
    UTF-8) and nests at most `max_depth` levels."""
    data = check_json(raw, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return json.loads(data, parse_constant=_no_constant)
    except WireError:
        raise
    except (ValueError, RecursionError) as e:  # RecursionError: cannot happen; total anyway
        raise WireError(f"not JSON: {safe_text(str(e), 200)}") from None


def depth_of(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep a Python value (dicts, lists, tuples, scalars) nests, counted like
    `check_json`, iteratively; stops counting at `limit + 1`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list | tuple):
            children = v
        else:
            continue
        d += 1
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        stack.extend((c, d) for c in children)
    return deepest


def safe_text(value: object, limit: int = MAX_REASON_CHARS) -> str:
    """`value` as a string that can always be encoded (lone surrogates and other
    unencodable characters replaced) and is at most `limit` characters. Never raises."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        text = f"<unprintable {type(value).__name__}>"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        suffix = "... (truncated)"
        text = (text[: limit - len(suffix)] + suffix) if limit > len(suffix) else text[:limit]
    return text
