"""Trust at the edges (issue 14, holes 4 and 5): poison that cannot kill dead-lettering,
and one bad ledger message that cannot brick a task's reads.

Unit tests here (no server, or the session's server); the property tests and the
PullRunner end-to-end runs are in tests/faults/test_poison.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from nats.aio.msg import Msg
from pydantic import ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter, list_dead_letters, make_dead_letter
from jetmesh.bus.errors import InvalidEventError
from jetmesh.bus.ledger import validate_event
from jetmesh.bus.wire import WireError, check_json, decode_json


def nested(depth: int, leaf: str = "1") -> str:
    """A JSON object nested `depth` levels deep."""
    return '{"a":' * depth + leaf + "}" * depth


def nested_value(depth: int) -> dict[str, Any]:
    v: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        v = {"a": v}
    return v


def completed_json(result: str) -> bytes:
    body = json.dumps({"specversion": "1.0", "subject": "t1", "id": "e1",
                       "type": "jetmesh.task.completed.v1", "data": {"result": {"x": 0}}})
    return body.replace('{"x": 0}', result).encode()


def fake(subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=None, subject=subject, data=data, headers=headers)  # type: ignore[arg-type]


POISON = [
    pytest.param(nested(1000).encode(), id="deep-1000"),
    pytest.param(nested(100_000).encode(), id="deep-100k"),
    pytest.param(b'{"task_id": "\\ud800", "step_id": "s"}', id="surrogate-task-id"),
    pytest.param(b'{"subject": "\\udfff"}', id="surrogate-subject"),
    pytest.param(b'{"task_id": ' + nested(5000).encode() + b"}", id="deep-task-id"),
    pytest.param(b"\xff\xfe garbage \x00", id="garbage"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"task_id": "ok\\n"}', id="task-id-newline"),
    pytest.param(b"[" * 900_000, id="open-brackets"),
]


# ---------------------------------------------------------------- hole 4: dead letters


@pytest.mark.parametrize("data", POISON)
@pytest.mark.parametrize("subject", [subjects.SUBMIT, "jm.work.x", "jm.task.bad\ud800.events",
                                     "jm.task.t1.control"])
def test_make_dead_letter_is_total_and_round_trips(subject: str, data: bytes) -> None:
    dl = make_dead_letter(fake(subject, data, {"X-A": "\ud800", "\udc00": "v"}),
                          subjects.STREAM_TASKS, "c", f"bad \ud800 {'r' * 10_000}",
                          [{"loc": ["\ud800", 1], "msg": "\udfff", "input": object(),
                            "ctx": {"deep": nested_value(500)}}])
    dumped = dl.model_dump_json()
    back = DeadLetter.model_validate_json(dumped)
    assert back == DeadLetter.model_validate(json.loads(dumped))
    if back.data_truncated:  # too big for one letter: its first bytes, and its size
        assert data.startswith(back.data) and back.data_bytes == len(data)
    else:
        assert back.data == data
    assert len(dumped.encode()) <= ev.MAX_MESSAGE_BYTES
    assert back.task_id is None or subjects.check_id(back.task_id) == back.task_id
    assert len(back.reason) <= 2_000


def test_make_dead_letter_still_finds_a_safe_task_id() -> None:
    dl = make_dead_letter(fake(subjects.SUBMIT, b'{"task_id": "t-7", "x": 1}'),
                          subjects.STREAM_TASKS, "c", "r")
    assert dl.task_id == "t-7"
    dl = make_dead_letter(fake(subjects.task_control("t-8"), b"junk"),
                          subjects.STREAM_LEDGER, "c", "r")
    assert dl.task_id == "t-8"


def test_a_letter_too_big_for_the_dlq_keeps_a_prefix_and_says_so() -> None:
    data = b"x" * ev.MAX_MESSAGE_BYTES
    dl = make_dead_letter(fake("jm.work.x", data), subjects.STREAM_WORK, "c", "too big")
    assert len(dl.model_dump_json().encode()) <= ev.MAX_MESSAGE_BYTES
    assert dl.data_truncated and dl.data_bytes == len(data)
    assert data.startswith(dl.data) and len(dl.data) > 100_000


# ---------------------------------------------------------------- hole 4: decoding


@pytest.mark.parametrize("raw", [
    pytest.param(completed_json(nested(1000)), id="deep-1000"),
    pytest.param(completed_json(nested(200)), id="deep-200"),
    pytest.param(completed_json(nested(70)), id="deep-70"),
    pytest.param(completed_json('{"x": "\\ud800"}'), id="surrogate"),
    pytest.param(completed_json('{"x": NaN}'), id="nan"),
    pytest.param(completed_json('{"x": 1e400}'), id="overflow"),
    pytest.param(completed_json('{"x": -Infinity}'), id="infinity"),
    pytest.param(b"\xff", id="not-utf8"),
])
def test_decode_event_rejects_unreadable_input_with_a_validation_error(raw: bytes) -> None:
    with pytest.raises(ValidationError) as info:
        ev.decode_event(raw)
    assert info.value.errors()[0]["type"] == "json_invalid"


def test_a_float_field_refuses_nan_instead_of_storing_null() -> None:
    call = json.dumps({"specversion": "1.0", "subject": "t1", "type": "jetmesh.model.called.v1",
                       "data": {"agent": "a", "provider": "p", "model": "m", "response": {},
                                "cost_usd": 0.5}}).encode()
    ev.decode_event(call)
    with pytest.raises(ValidationError):
        ev.decode_event(call.replace(b"0.5", b"NaN"))
    with pytest.raises(ValidationError):
        ev.ModelCalledData(agent="a", provider="p", model="m", response={},
                           cost_usd=float("inf"))


@pytest.mark.parametrize("depth", [1, 10, 30, 62, 63, 64, 65, 100, 199, 200, 400, 1500])
def test_whatever_the_ledger_accepts_it_can_read_back(depth: int) -> None:
    """The round trip: an event either is refused before it is written, or decodes."""
    event = {"specversion": "1.0", "subject": "t1", "type": "jetmesh.task.completed.v1",
             "data": {"result": nested_value(depth)}}
    try:
        checked = validate_event(event)
        raw = ev.encode_event(checked)
    except InvalidEventError as e:
        assert e.reason
        return
    assert ev.decode_event(raw) == checked


@pytest.mark.parametrize("bad", ["abc\n", "a.b", "*", ">", "", "a" * 129, "\ud800", "a b"])
def test_check_id_refuses_anything_but_one_safe_token(bad: str) -> None:
    with pytest.raises(subjects.InvalidIdError):
        subjects.check_id(bad)


@pytest.mark.parametrize("subject", ["jm.task.a\u00e9.events", "jm.task.\ud800.control",
                                     "jm.task..events", "jm.task.a\n.step.s1"])
def test_an_id_read_from_a_subject_is_a_valid_id_or_none(subject: str) -> None:
    assert subjects.task_id_of(subject) is None
    assert subjects.step_id_of("jm.task.t1.step.b\u00e9") is None
    assert subjects.task_id_of("jm.task.t-1.step.s1") == "t-1"
    assert subjects.step_id_of("jm.task.t-1.step.s_1.log") == "s_1"


def test_check_id_refuses_a_non_string_with_invalid_id_error() -> None:
    with pytest.raises(subjects.InvalidIdError):
        subjects.check_id(5)  # type: ignore[arg-type]


def test_a_submission_payload_leaves_room_for_its_envelopes() -> None:
    deep = {"task_id": "t1", "workflow": "w", "input": nested_value(ev.MAX_PAYLOAD_DEPTH + 1)}
    with pytest.raises(ValidationError) as info:
        ev.TaskSubmission.model_validate(deep)
    assert info.value.errors()[0]["loc"] == ("input",)
    ok = {"task_id": "t1", "workflow": "w", "input": nested_value(ev.MAX_PAYLOAD_DEPTH)}
    sub = ev.TaskSubmission.model_validate_json(json.dumps(ok))
    # The event that carries it can be stored and read back.
    event = ev.TaskSubmitted(subject=sub.task_id, data=ev.TaskSubmittedData(input=sub.input))
    assert ev.decode_event(ev.encode_event(event)) == event


@pytest.mark.parametrize("data", POISON)
def test_every_command_model_decodes_poison_with_a_validation_error(data: bytes) -> None:
    for model in (ev.TaskSubmission, ev.StepCommand):
        with pytest.raises(ValidationError):
            model.model_validate_json(data)


@pytest.mark.parametrize(("raw", "ok"), [
    (rb'"\ud83d\ude00"', True),              # a pair
    (rb'"\uD83D\uDE00"', True),              # a pair, upper case
    (rb'"\\\ud83d\ude00"', True),          # an escaped backslash, then a pair
    (rb'"\\ud800"', True),                   # an escaped backslash, then text
    (rb'"\ud800"', False),
    (rb'"\udc00\ud800"', False),             # low then high
    (rb'"\\ud83d\ude00"', False),           # text, then a lone low
    (rb'"\ud800\\ude00"', False),           # a lone high, then text
    (rb'"\ud83d\\\ude00"', False),         # high, escaped backslash, low: not a pair
    (b'"' + "\ud800".encode("utf-8", "surrogatepass") + b'"', False),  # encoded
    (b"1e308", True), (b"[1.5e300, -2e-400]", True), (b'"1e400 NaN"', True),
    (b"1e400", False), (b"[1E+309 ]", False), (b'{"a":-1e4000}', False),
    (b"1" * 250 + b".0e99", False), (b"[NaN]", False), (b"-Infinity", False),
    (b"9" * 321, False), (b"[" * 64 + b"]" * 64, True), (b"[" * 65 + b"]" * 65, False),
    (b'["' + b"[" * 100 + b'"]', True),        # brackets inside a string do not nest
    (rb'["\\"' + b"[" * 100 + b"]" * 100 + b"]", False),  # ...but after one they do
])
def test_the_edge_check_reads_escapes_numbers_and_nesting_as_a_parser_does(
        raw: bytes, ok: bool) -> None:
    if ok:
        assert check_json(raw) == raw
        json.dumps(decode_json(raw), ensure_ascii=False, allow_nan=False).encode()
    else:
        with pytest.raises(WireError):
            check_json(raw)


# ---------------------------------------------------------------- hole 5: readers


async def test_list_dead_letters_skips_and_reports_a_malformed_entry(bus) -> None:
    consumer = "edge" + ev.new_id()[:8]
    good = make_dead_letter(fake("jm.work.x", b"{}"), subjects.STREAM_WORK, consumer, "r")
    subj = subjects.dlq(subjects.STREAM_WORK, consumer)
    bad_seqs = []
    for junk in (b"\xffjunk", b'{"not": "a letter"}', nested(3000).encode(),
                 b'{"stream": "\\ud800"}'):
        bad_seqs.append((await bus.js.publish(subj, junk)).seq)
    await bus.js.publish(subj, good.model_dump_json().encode())
    letters = await list_dead_letters(bus.ledger, stream=subjects.STREAM_WORK)
    mine = [dl for _, dl in letters if dl.consumer == consumer]
    assert mine == [good]
    assert {s.seq for s in letters.skipped} >= set(bad_seqs)
    assert all(s.reason for s in letters.skipped)


def test_dead_letter_data_is_base64_of_the_bytes() -> None:
    dl = make_dead_letter(fake("jm.work.x", b"\x00\xff"), "S", "c", "r")
    assert base64.b64decode(dl.data_b64) == b"\x00\xff"


async def test_the_ledger_refuses_to_store_what_it_could_not_read_back(bus) -> None:
    task = ev.new_id()
    too_deep = ev.TaskCompleted(subject=task, data=ev.TaskCompletedData(
        result=nested_value(ev.MAX_JSON_DEPTH + 10)))
    for validate in (True, False):
        with pytest.raises(InvalidEventError, match="deeper than"):
            await bus.ledger.append(too_deep, validate=validate)
        with pytest.raises(InvalidEventError):
            await bus.ledger.append_pipelined([too_deep], validate=validate)
    assert await bus.ledger.read(task) == []
    fits = ev.TaskCompleted(subject=task, data=ev.TaskCompletedData(
        result=nested_value(ev.MAX_JSON_DEPTH - 3)))
    seq = await bus.ledger.append(fits)
    [entry] = await bus.ledger.read(task)
    assert (entry.seq, entry.event) == (seq, fits)


async def test_a_stray_message_on_the_ledgers_reply_inbox_is_ignored(bus) -> None:
    """Anyone who can publish to the inbox could send a reply without the direct-get
    headers; the callback raised KeyError on it (and the read then timed out)."""
    import asyncio

    from jetmesh.bus.ledger import Ledger

    ledger = Ledger(bus.nc, bus.js)
    done: asyncio.Future[list[tuple[int, str, bytes]]] = \
        asyncio.get_running_loop().create_future()
    ledger._pending["7"] = ([], done, None)
    for headers in (None, {}, {"Nats-Sequence": "x", "Nats-Subject": "s"}):
        await ledger._on_reply(fake("_INBOX.p.7", b"junk", headers))
    assert ledger._pending["7"][0] == [] and not done.done()
    await ledger._on_reply(fake("_INBOX.p.7", b"ok", {"Nats-Sequence": "3",
                                                      "Nats-Subject": "jm.task.t.events"}))
    await ledger._on_reply(fake("_INBOX.p.7", b"", {"Status": "204"}))
    assert done.result() == [(3, "jm.task.t.events", b"ok")]


def test_a_letter_with_huge_errors_and_headers_still_fits_with_its_data() -> None:
    # Sized so that the letter is under the limit in characters but over it in bytes.
    data = b"x" * 900_000
    headers = {f"H-{i}": "é" * 5_000 for i in range(10)}
    errors = [{"msg": "é" * 5_000} for _ in range(100)]
    dl = make_dead_letter(fake("jm.work.x", data, headers), "S", "c", "\x03" * 50_000, errors)
    dumped = dl.model_dump_json().encode()
    assert len(dumped) <= ev.MAX_MESSAGE_BYTES
    back = DeadLetter.model_validate_json(dumped)
    assert data.startswith(back.data) and len(back.data) > 600_000
    assert back.reason.startswith("\x03")


async def test_a_poisoned_registry_value_does_not_stop_the_presence_view(bus) -> None:
    """json.loads raised RecursionError on a deep value and the watcher loop died: every
    later heartbeat was missed, so all agents looked gone."""
    import asyncio

    from jetmesh.bus.presence import PresenceView, ensure_bucket

    bucket = "edge-" + ev.new_id()[:8]
    view = PresenceView(bus.js, bucket, ttl_s=60)
    await view.start()
    try:
        kv = await ensure_bucket(bus.js, bucket)
        await kv.put("a.deep", nested(5000).encode())
        await kv.put("a.list", b"[1, 2]")
        await kv.put("a.surrogate", b'{"name": "\\ud800"}')
        await kv.put("a.good", b'{"name": "a"}')
        async with asyncio.timeout(10):
            while "a.good" not in {e.key for e in view.live()}:
                view.changed.clear()
                await view.changed.wait()
        assert {e.key for e in view.live()} == {"a.good"}
        assert view._task is not None and not view._task.done()
    finally:
        await view.stop()
        await bus.js.delete_key_value(bucket)
