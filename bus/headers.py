"""Every NATS and HTTP header name jetmesh reads or writes, in one place.

NATS header names are case-sensitive (nats-py keeps them as sent); HTTP header names are
not (ASGI lowers them), so the HTTP ones are written in lower case, as servers see them.
No header name is written as a string literal anywhere else.
"""

from __future__ import annotations

# --- NATS / JetStream (set by jetmesh or by the server) ---------------------------------

MSG_ID = "Nats-Msg-Id"
"""JetStream de-duplication: a second publish with the same id inside the stream's
duplicate window is acknowledged as a duplicate and not stored."""
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
"""The ledger's fence: stored only if the subject's last sequence is this one. It is
stored with the message, so a delivered event tells what came before it on its subject."""
EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
"""With EXPECTED_LAST_SUBJECT_SEQUENCE: the subject whose last sequence is checked, if not
the message's own."""
SEQUENCE = "Nats-Sequence"
"""A direct-get reply: the stream sequence of the message."""
SUBJECT = "Nats-Subject"
"""A direct-get reply: the subject of the message."""
TIME_STAMP = "Nats-Time-Stamp"
"""A direct-get reply: when the stream stored the message (RFC 3339)."""
STATUS = "Status"
"""A status reply (no payload): the code, e.g. 404 (nothing found), 204 (end of batch),
100 (idle heartbeat / flow control)."""
DESCRIPTION = "Description"
"""A status reply: the words with the code."""
NATS_PREFIX = "Nats-"
"""Every header the server reads or sets starts with this (a redriven dead letter drops
them: they described its first publish)."""

# --- jetmesh events on the bus -----------------------------------------------------------

CE_TYPE = "Ce-Type"
"""The event's versioned type (CloudEvents binary mode), so a reader can filter without
decoding the body."""
TRACEPARENT = "traceparent"
"""W3C trace context of the task the message belongs to (NATS and HTTP)."""
RESENT = "Jm-Resent"
"""A step command sent again (a dead letter redriven, a dispatch re-published by an
orchestrator that restarted): the step may have run before, so the worker reads its line
and claims it before running it, even on the message's first delivery."""
REPLY_TO = "Jm-Reply-To"
"""A submission's inbox for the orchestrator's answer (accepted / rejected)."""
SEQ = "Jm-Seq"
"""On each live event relayed to a tenant: its ledger sequence (to drop what a later
`get` also returns)."""

# --- HTTP (A2A gateway, dashboard, MCP, model vendors, webhooks) -------------------------

AUTHORIZATION = "authorization"
API_KEY = "x-api-key"
"""An A2A caller's API key."""
API_KEY_DISPLAY = "X-API-Key"
"""The same name as the agent card's APIKeySecurityScheme spells it for callers."""
CSRF_TOKEN = "x-csrf-token"
"""The dashboard's double-submit CSRF token (compared with its cookie)."""
CONTENT_TYPE = "content-type"
CONTENT_LENGTH = "content-length"
CACHE_CONTROL = "cache-control"
ETAG = "etag"
IF_NONE_MATCH = "if-none-match"
LAST_EVENT_ID = "last-event-id"
"""Server-sent events: where a reconnecting stream resumes."""
RETRY_AFTER = "retry-after"
"""Seconds (or an HTTP date) a rate-limited or unavailable server asks us to wait."""
RETRY_AFTER_MS = "retry-after-ms"
"""The same in milliseconds (OpenAI, Azure)."""
X_FRAME_OPTIONS = "x-frame-options"
X_ACCEL_BUFFERING = "x-accel-buffering"
"""``no``: a reverse proxy must not buffer a server-sent event stream."""
