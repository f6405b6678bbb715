"""OTLP/protobuf trace requests written directly, field by field (no SDK span objects).

The telemetry role derives finished spans from the ledger; turning them into the SDK's
`ReadableSpan` and through its encoder (`encode_spans`, one protobuf object per span,
attribute and value) cost more than deriving them. These functions write the same
bytes from plain values: `span()` one `Span` message, `request()` an
`ExportTraceServiceRequest` with one resource and one scope around any number of them.
The result parses, with the OTLP protocol's own classes, into the message the SDK's
encoder builds from the equivalent `ReadableSpan`s (tests/telemetry/test_otlp_encoding.py
compares the two); values are encoded as the SDK's `_encode_value` does (None as an
empty value, bool before int, a str is not a sequence, a mapping as a key-value list,
another type or an int beyond int64 drops its key). Field numbers: opentelemetry-proto
`trace/v1/trace.proto`, `common/v1/common.proto`, `resource/v1/resource.proto`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_SMALL = [bytes([i]) for i in range(128)]
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack

KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = 1, 2, 3, 4, 5
"""OTLP `Span.SpanKind` values (the SDK's SpanKind enum is one lower)."""
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
FLAG_HAS_IS_REMOTE, FLAG_IS_REMOTE = 0x100, 0x200
"""`SpanFlags` bits the SDK's encoder sets: whether the parent is known to be remote."""


class _Unencodable(Exception):
    """A value the SDK's encoder would refuse (its key is dropped)."""


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


# tags: (field << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)
_T1, _T2, _T3, _T4, _T5, _T6, _T7 = b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a", b"\x32", b"\x3a"
_V_BOOL, _V_INT, _V_DOUBLE = b"\x10", b"\x18", b"\x21"
_S_KIND, _S_START, _S_END, _S_ATTR, _S_EVENT, _S_STATUS, _S_FLAGS = (
    b"\x30", b"\x39", b"\x41", b"\x4a", b"\x5a", b"\x7a", b"\x85\x01")
_E_TIME = b"\x09"
_ST_CODE = b"\x18"
_INT64 = 1 << 63


def _value(v: Any) -> bytes:
    """An `AnyValue` message's bytes (without its own tag)."""
    if v is None:
        return b""
    if v is True:
        return b"\x10\x01"
    if v is False:
        return b"\x10\x00"
    if isinstance(v, str):
        return _ld(_T1, v.encode())
    if isinstance(v, bool):  # a bool subclass
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        if not -_INT64 <= v < _INT64:
            raise _Unencodable(f"int {v} out of int64 range")
        return _V_INT + _varint(v if v >= 0 else v + (1 << 64))
    if isinstance(v, float):
        return _V_DOUBLE + _pack_d(v)
    if isinstance(v, bytes):
        return _ld(_T7, v)
    if isinstance(v, Sequence):
        return _ld(_T5, b"".join(_ld(_T1, _value(x)) for x in v))
    if isinstance(v, Mapping):
        return _ld(_T6, b"".join(_ld(_T1, _key_value(str(k), x)) for k, x in v.items()))
    raise _Unencodable(f"invalid type {type(v).__name__}")


def _key_value(key: str, v: Any) -> bytes:
    return _ld(_T1, key.encode()) + _ld(_T2, _value(v))


_CACHE: dict[tuple[bytes, str, Any], bytes] = {}
_CACHE_MAX = 50_000
"""Encoded fields of repeated (tag, key, value) pairs: a task's spans repeat their
conversation id, operation names, models and providers."""
_KEYS: dict[str, bytes] = {}
"""A key's `KeyValue.key` field plus the value's tag, by key."""


def attributes(tag: bytes, attrs: Mapping[str, Any]) -> bytes:
    """Repeated `KeyValue` fields under `tag`, in the mapping's order. A key whose value
    the SDK's encoder refuses is left out, as the SDK does (it logs the error)."""
    out = []
    cache, keys, varint = _CACHE, _KEYS, _varint
    for k, v in attrs.items():
        t = type(v)
        ck = None
        if t is str:
            if len(v) < 256:
                ck = (tag, k, v)
                hit = cache.get(ck)
                if hit is not None:
                    out.append(hit)
                    continue
            try:
                raw = v.encode()
            except UnicodeEncodeError:
                continue
            val = _T1 + varint(len(raw)) + raw
        elif t is int:
            if not -_INT64 <= v < _INT64:
                continue
            val = _V_INT + varint(v if v >= 0 else v + (1 << 64))
        elif t is float:
            val = _V_DOUBLE + _pack_d(v)
        else:
            if t is bool:
                ck = (tag, k, v)
                hit = cache.get(ck)
                if hit is not None:
                    out.append(hit)
                    continue
            try:
                val = _value(v)
            except (_Unencodable, UnicodeEncodeError):
                continue
        kb = keys.get(k)
        if kb is None:
            if len(keys) >= _CACHE_MAX:
                keys.clear()
            try:
                kb = keys[k] = _ld(_T1, k.encode()) + _T2
            except UnicodeEncodeError:
                continue
        body = kb + varint(len(val)) + val
        field = tag + varint(len(body)) + body
        if ck is not None:
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[ck] = field
        out.append(field)
    return b"".join(out)


def _text(s: str) -> bytes:
    """A name or message as UTF-8 (a lone surrogate, which no event the ledger accepts
    holds, replaced: one bad name never stops a batch)."""
    try:
        return s.encode()
    except UnicodeEncodeError:
        return s.encode(errors="replace")


def span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, parent_remote: bool,
         name: str, kind: int, start_ns: int, end_ns: int, attrs: Mapping[str, Any],
         events: Iterable[tuple[str, Mapping[str, Any], int]], status_code: int,
         status_message: str | None) -> bytes:
    """One `Span` message, wrapped as a `ScopeSpans.spans` field (tag 2). Ids are the
    big-endian bytes (16 for the trace, 8 for spans); times in ns since the epoch."""
    parts = [_T1, b"\x10", trace_id, _T2, b"\x08", span_id]
    if parent_id is not None:
        parts += (_T4, b"\x08", parent_id)
    if name:
        parts.append(_ld(_T5, _text(name)))
    parts += (_S_KIND, _SMALL[kind], _S_START, _pack_q(start_ns),
              _S_END, _pack_q(end_ns), attributes(_S_ATTR, attrs))
    for ev_name, ev_attrs, at in events:
        parts.append(_ld(_S_EVENT, _E_TIME + _pack_q(at) + _ld(_T2, _text(ev_name))
                         + attributes(_T3, ev_attrs)))
    status = b""
    if status_message:
        status += _ld(_T2, _text(status_message))
    if status_code:
        status += _ST_CODE + _SMALL[status_code]
    parts += (_ld(_S_STATUS, status), _S_FLAGS,
              _pack_i(FLAG_HAS_IS_REMOTE | (FLAG_IS_REMOTE if parent_remote else 0)))
    return _ld(_T2, b"".join(parts))


def resource_bytes(attrs: Mapping[str, Any]) -> bytes:
    """The `Resource` message of a resource's attributes."""
    return attributes(_T1, attrs)


def scope_bytes(name: str, version: str | None) -> bytes:
    """An `InstrumentationScope` message (no attributes)."""
    out = _ld(_T1, name.encode())
    if version:
        out += _ld(_T2, version.encode())
    return out


def request(resource: bytes, resource_schema_url: str, scope: bytes, scope_schema_url: str,
            spans: Sequence[bytes]) -> bytes:
    """An `ExportTraceServiceRequest`: one resource, one scope, these `span()`s."""
    scope_spans = _ld(_T1, scope) + b"".join(spans)
    if scope_schema_url:
        scope_spans += _ld(_T3, scope_schema_url.encode())
    rs = _ld(_T1, resource) + _ld(_T2, scope_spans)
    if resource_schema_url:
        rs += _ld(_T3, resource_schema_url.encode())
    return _ld(_T1, rs)
