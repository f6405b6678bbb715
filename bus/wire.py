"""The edge: what bytes jetmesh accepts as a JSON message, checked once, before any parser.

Every decoder of bytes that came over NATS (a pull consumer, a ledger read, a dead
letter, a jetmesh model's `model_validate_json`, `decode_event`) calls `check_json`
first. It is iterative (no recursion, so it cannot itself overflow the stack), linear
in the message, and rejects with one error, `WireError`, whose `reason` says why:

- more than `MAX_MESSAGE_BYTES` bytes;
- not UTF-8 (invalid bytes, or an encoded surrogate);
- a lone UTF-16 surrogate in a `\\uXXXX` escape (Python's json accepts it, the string
  then cannot be encoded again, so whatever holds it can never be stored);
- a `NaN` / `Infinity` token, or a number out of float range or with more than
  `MAX_NUMBER_CHARS` digits in a row (parsers turn these into values that serialize as
  `null`, or cannot convert them at all);
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

import itertools
import json
import math
import re
from collections import deque
from typing import Any

from jetmesh.bus.errors import WireError as WireError

MAX_MESSAGE_BYTES = 1_000_000
"""Largest message jetmesh accepts on any subject (the server's default max_payload)."""

MAX_JSON_DEPTH = 64
"""The one nesting limit: no JSON document jetmesh reads or writes nests deeper (an
object or array is one level; a scalar at the top is depth 0)."""

MAX_PAYLOAD_DEPTH = MAX_JSON_DEPTH // 2
"""How deep a client's free-form data (a task submission's `input`) may nest:
half the limit, so the events that carry it (and the step inputs, outputs and results
made from it) stay within MAX_JSON_DEPTH."""

MAX_NUMBER_CHARS = 320
"""Longest run of digits accepted in a number (1e308, the largest float, has 309)."""

MAX_REASON_CHARS = 2_000
"""Longest reason string kept in a dead letter or a skipped-message report."""


# Brackets as signed steps (+1 open, -1 close), every other byte deleted: the depth is
# max(accumulate(...)), at C speed.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# A number's shape at C speed: digits -> "0"; e, E, "+" and the other hex letters -> "e";
# what may end a number (",", "}", "]", whitespace) -> "d"; anything else -> " ". A float
# can overflow only with an exponent of 3 digits or more ("1e400", "1E+309": a run
# e000...d) or with over 200 digits before its exponent. A hex id inside a string
# (often "e123...") never ends in a "d": strings end with a quote.
_NUMERIC = bytes(ord("0") if 48 <= b <= 57
                 else ord("e") if b in b"eE+abcdfABCDF"
                 else ord("d") if b in b",}] \t\n\r"
                 else ord(" ") for b in range(256))
_BIG_EXPONENT = re.compile(rb"e000+(?:d|\Z)")
_MANY_DIGITS = b"0" * 200
_LONG_DIGITS = b"0" * (MAX_NUMBER_CHARS + 1)
_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?[eE][-+]?[0-9]+")
_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_HIGH_OR_LOW = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unescaped(data: bytes) -> bytes:
    """`data` with every escaped backslash replaced by `__`: each `\\` left then starts a
    real escape (pairs of backslashes are read from the left, as a JSON parser does), and
    what stood on either side of an escaped backslash does not become adjacent."""
    return data.replace(b"\\\\", b"__")


def _outside_strings(plain: bytes) -> bytes:
    """What lies outside string literals in `_unescaped` bytes: structure, numbers and
    literals. (For invalid JSON an approximation; the parser after us stops at the first
    invalid token, and everything before it is split exactly as it reads it.)"""
    return b" ".join(plain.replace(b'\\"', b"").split(b'"')[0::2])


def _as_bytes(raw: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError as e:
            raise WireError(f"text holds a lone surrogate at character {e.start}") from None
    return bytes(raw)


_PASSED: deque[tuple[bytes, int]] = deque(maxlen=8)
"""The last bytes objects that passed, with the depth limit they passed: a message is
checked once at its consumer's edge and again by the decoder its handler calls (the
same object: bytes never change), so the second check is an identity lookup."""


def check_json(raw: bytes | bytearray | memoryview | str, *,
               max_bytes: int = MAX_MESSAGE_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> bytes:
    """Return `raw` as bytes if it is safe to parse (see the module doc), else raise
    WireError with the reason. Never raises anything else.

    Each check looks at the raw bytes first, where a match inside a string can only make
    it look closer; strings are set aside (with bytes methods, no regex, no recursion)
    only when the raw bytes hold more brackets than `max_depth`, a `NaN`/`Infinity`, an
    exponent or a long run of digits. A typical event costs a few microseconds."""
    if type(raw) is bytes:
        for seen, depth in tuple(_PASSED):  # (a copy: a thread may append meanwhile)
            if seen is raw and depth <= max_depth and len(raw) <= max_bytes:
                return raw
    data = _as_bytes(raw)
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"not UTF-8: invalid byte at offset {e.start}") from None
    plain: bytes | None = None
    if b"\\u" in data:
        plain = _unescaped(data)
        if b"\\u" in plain:
            pairs = len(_PAIR.findall(plain))
            if pairs * 2 != len(_HIGH_OR_LOW.findall(plain)):
                raise WireError("lone surrogate escape in a JSON string")
    numeric = data.translate(_NUMERIC)
    odd = (b"NaN" in data or b"Infinity" in data or _MANY_DIGITS in numeric
           or _BIG_EXPONENT.search(numeric) is not None)
    deep = data.count(b"{") + data.count(b"[") > max_depth  # no deeper than it opens
    if not deep and not odd:
        _PASSED.append((data, max_depth))
        return data
    bare = _outside_strings(_unescaped(data) if plain is None else plain)
    if odd:
        _check_numbers(bare)
    if deep:
        steps = memoryview(bare.translate(_STEPS, delete=_NOT_BRACKET)).cast("b")
        if len(steps) > max_depth and max(itertools.accumulate(steps)) > max_depth:
            raise WireError(f"JSON nested deeper than {max_depth} levels")
    _PASSED.append((data, max_depth))
    return data


def _check_numbers(bare: bytes) -> None:
    """NaN, infinities, overflowing or overlong numbers, outside strings."""
    if b"NaN" in bare or b"Infinity" in bare:
        raise WireError("NaN and Infinity are not JSON numbers")
    numeric = bare.translate(_NUMERIC)
    if _LONG_DIGITS in numeric:
        raise WireError(f"number literal longer than {MAX_NUMBER_CHARS} digits")
    if _MANY_DIGITS in numeric or _BIG_EXPONENT.search(numeric) is not None:
        for m in _NUMBER.finditer(bare):
            if not math.isfinite(float(m.group())):
                raise WireError(f"number {m.group().decode()[:40]} is out of float range")


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
