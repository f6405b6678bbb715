"""Poison at the edges (issue 14, holes 4 and 5).

Properties (hypothesis, no server): the edge decoder (bus.wire) returns a value that can
be encoded and parsed again, or refuses with its one error and a reason, for any bytes;
dead-lettering works for any message; whatever the ledger stores it can read back.

Against a real nats-server: a PullRunner fed deep JSON, a lone surrogate and garbage
dead-letters each exactly once and is never redelivered; when the DLQ cannot be written
the message is handed back, not dropped, and ends once the DLQ is back (or, if it never
comes back, is terminated with an error log); a task with garbage on its control
subject and on a step's line reads back with its good events and the bad ones reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from pydantic import TypeAdapter, ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.consumer import PullRunner, Reject
from jetmesh.bus.dlq import DeadLetter, list_dead_letters, make_dead_letter
from jetmesh.bus.errors import InvalidEventError
from jetmesh.bus.ledger import LOG_SEQ_BASE, Ledger, Skipped
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams, pull_consumer_config
from jetmesh.bus.wire import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    WireError,
    check_json,
    decode_json,
    depth_of,
)
from jetmesh.orchestrator.projection import all_tasks

PROPS = settings(max_examples=120, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ANY = TypeAdapter(Any)

# ------------------------------------------------------------------ strategies

# Every code point, lone surrogates included.
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), any_text,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 5e-324, 0.0, -0.0, 10**400]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=30,
)


def _dumps(v: Any) -> str:
    """JSON text for any generated value: Python's json writes NaN, Infinity and lone
    surrogates (as escapes) without complaint, which is exactly what a client may send."""
    try:
        return json.dumps(v)
    except (ValueError, RecursionError):
        return "null"


@st.composite
def deep_documents(draw: st.DrawFn) -> str:
    depth = draw(st.one_of(st.integers(0, 2 * MAX_JSON_DEPTH),
                           st.sampled_from([199, 200, 201, 1000, 5000, 100_000])))
    opener = draw(st.sampled_from(['{"a":', "[", '{"x":[']))
    closer = {'{"a":': "}", "[": "]", '{"x":[': "]}"}[opener]
    leaf = draw(st.sampled_from(["1", '"\\ud800"', "NaN", "[]", '"ok"', "1e400"]))
    if draw(st.booleans()):
        return opener * depth + leaf + closer * depth
    return opener * depth  # unclosed


@st.composite
def big_strings(draw: st.DrawFn) -> str:
    """A string literal of about the size limit (just under, at, just over)."""
    n = MAX_MESSAGE_BYTES - 2 + draw(st.integers(-3, 3))
    return '"' + "x" * n + '"'


@st.composite
def surrogate_documents(draw: st.DrawFn) -> str:
    esc = draw(st.lists(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\\\",
                                         "\\u0041", "\\ude00", "x", "\\\""]),
                        min_size=1, max_size=6).map("".join))
    key = draw(st.sampled_from(["task_id", "subject", "goal", "x"]))
    return json.dumps({key: "PLACE"}).replace("PLACE", esc)


documents = st.one_of(
    st.builds(_dumps, json_values),
    deep_documents(),
    surrogate_documents(),
    big_strings(),
    st.sampled_from(["NaN", "-Infinity", "1e300", "1e400", "9" * 400, '"\\u0000"',
                     "[" * 70 + "]" * 70, '{"task_id": "ok\\n"}', "", " ", "[1,]"]),
)
inputs = st.one_of(st.binary(max_size=300), documents.map(lambda s: s.encode()),
                   documents.map(lambda s: s.encode("utf-8", "surrogatepass")))


# ------------------------------------------------------------------ properties


@PROPS
@given(inputs)
def test_the_edge_decoder_returns_a_storable_value_or_refuses_with_a_reason(raw: bytes) -> None:
    try:
        value = decode_json(raw)
    except WireError as e:
        assert isinstance(e.reason, str) and e.reason
        e.reason.encode("utf-8")  # the reason itself can be stored
        return
    # Accepted: it encodes again (no NaN, no surrogate), nests within the limit, and both
    # parsers jetmesh uses read it back to the same value.
    text = json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert depth_of(value) <= MAX_JSON_DEPTH
    assert json.loads(text) == value
    assert ANY.validate_json(text) == value
    assert check_json(text, max_bytes=len(text)) == text


@PROPS
@given(inputs)
def test_decode_event_raises_only_validation_errors(raw: bytes) -> None:
    try:
        ev.decode_event(raw)
    except ValidationError:
        pass


@PROPS
@given(json_values)
def test_whatever_the_ledger_will_store_it_reads_back(value: Any) -> None:
    """Encode refuses, or decode gives the same event back: never stored-but-unreadable."""
    try:
        event = ev.TaskCompleted(subject="t1", data=ev.TaskCompletedData(result={"v": value}))
    except ValidationError:
        return  # refused when built (a NaN in a float field, ...)
    try:
        raw = ev.encode_event(event)
    except InvalidEventError as e:
        assert e.reason
        return
    assert ev.decode_event(raw) == ev.decode_event(ev.encode_event(ev.decode_event(raw)))


@PROPS
@given(st.one_of(st.builds(_dumps, json_values), deep_documents()).filter(
    lambda s: len(s) < 20_000))
def test_an_accepted_submission_always_makes_a_storable_event(text: str) -> None:
    body = '{"task_id": "t1", "workflow": "w", "input": {"v": ' + text + "}}"
    try:
        sub = ev.TaskSubmission.model_validate_json(body)
    except ValidationError:
        return
    event = ev.TaskSubmitted(subject=sub.task_id, data=ev.TaskSubmittedData(input=sub.input))
    assert ev.decode_event(ev.encode_event(event)) == event


def _msg(subject: str, data: bytes, headers: dict[str, str] | None) -> Msg:
    return Msg(_client=None, subject=subject, data=data, headers=headers)  # type: ignore[arg-type]


@PROPS
@given(raw=inputs, subject=any_text, reason=any_text,
       headers=st.dictionaries(any_text, any_text, max_size=3),
       errors=st.lists(st.dictionaries(any_text, json_values, max_size=3), max_size=3))
def test_make_dead_letter_is_total_and_its_json_round_trips(
        raw: bytes, subject: str, reason: str, headers: dict[str, str],
        errors: list[dict[str, Any]]) -> None:
    for subj in (subject, subjects.SUBMIT, f"jm.task.{subject}.events"):
        dl = make_dead_letter(_msg(subj, raw, headers), "S", "c", reason, errors)
        dumped = dl.model_dump_json()
        assert len(dumped.encode()) <= MAX_MESSAGE_BYTES
        back = DeadLetter.model_validate_json(dumped)
        assert back == dl
        assert back.data == raw or (back.data_truncated and raw.startswith(back.data))
        assert back.task_id is None or subjects.check_id(back.task_id)


def test_a_huge_accepted_string_round_trips() -> None:
    text = '"' + "é" * ((MAX_MESSAGE_BYTES - 2) // 2) + '"'
    assert decode_json(text.encode()) == text[1:-1]
    with pytest.raises(WireError, match="exceeds"):
        decode_json(('"' + "x" * MAX_MESSAGE_BYTES + '"').encode())


def test_numbers_at_the_edge_of_float_range() -> None:
    assert decode_json(b"1e300") == 1e300
    assert decode_json(b"[-1.7976931348623157e308]") == [-1.7976931348623157e308]
    for bad in (b"1e400", b"-1e309", b"NaN", b"[Infinity]", b"9" * 400):
        with pytest.raises(WireError):
            decode_json(bad)
    assert math.isfinite(decode_json(b"2.5e-400"))  # underflow is 0.0: harmless


# ------------------------------------------------------------------ against nats-server


POISON = {
    "deep": ('{"task_id": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}").encode(),
    "deep-200": ('{"task_id": "t1", "step_id": "s", "skill": "k", "input": '
                 + '{"a":' * 199 + "1" + "}" * 199 + "}").encode(),
    "surrogate": b'{"task_id": "\\ud800", "step_id": "s1", "skill": "x", "input": {}}',
    "garbage": b"\xff\xfe\x00garbage",
}


async def _until(what: str, cond: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll an observable state (the DLQ, consumer info) until `cond` holds; bounded."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await cond()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _naive_handler(seen: list[bytes], done: asyncio.Event) -> Callable[[Msg], Any]:
    """A handler that trusts its input the way most code does: json.loads, then pydantic."""

    async def handler(msg: Msg) -> None:
        seen.append(msg.data)
        body = json.loads(msg.data)
        try:
            cmd = ev.StepCommand.model_validate(body)
        except ValidationError as e:
            raise Reject("invalid step command") from e
        if cmd.step_id == "sentinel":
            done.set()

    return handler


async def _letters(ledger: Ledger, consumer: str) -> list[DeadLetter]:
    return [dl for _, dl in await list_dead_letters(ledger, stream=subjects.STREAM_WORK)
            if dl.consumer == consumer]


async def test_poison_is_dead_lettered_exactly_once_and_never_redelivered(bus) -> None:
    skill = "poison" + ev.new_id()[:8]
    durable = subjects.work_consumer(skill)
    seen: list[bytes] = []
    done = asyncio.Event()
    runner = PullRunner(bus.js, subjects.STREAM_WORK,
                        pull_consumer_config(durable, subjects.work(skill)),
                        _naive_handler(seen, done), max_deliver=2, backoff_s=(0.05,))
    await runner.start()
    try:
        for data in POISON.values():
            await bus.js.publish(subjects.work(skill), data)
        sentinel = ev.StepCommand(task_id="t1", step_id="sentinel", skill=skill, input={})
        await bus.js.publish(subjects.work(skill), sentinel.model_dump_json().encode())
        await asyncio.wait_for(done.wait(), 15)
        letters = await _until("every poison message in the DLQ",
                               lambda: _letters_if(bus.ledger, durable, len(POISON)))

        async def settled() -> bool:
            info = await bus.js.consumer_info(subjects.STREAM_WORK, durable)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await _until("the consumer to have nothing pending", settled)
        info = await bus.js.consumer_info(subjects.STREAM_WORK, durable)
    finally:
        await runner.stop()
    assert sorted(dl.data for dl in letters) == sorted(POISON.values())  # once each
    assert info.num_redelivered == 0  # each was settled on its first delivery
    by_data = {dl.data: dl for dl in letters}
    assert by_data[POISON["deep"]].reason == (
        f"rejected at the edge: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    assert "surrogate" in by_data[POISON["surrogate"]].reason
    assert "not UTF-8" in by_data[POISON["garbage"]].reason
    assert all(dl.task_id is None for dl in letters)
    # No handler ever parsed the poison: the edge refused it first.
    assert not set(seen) & set(POISON.values())


async def _letters_if(ledger: Ledger, consumer: str, n: int) -> list[DeadLetter] | None:
    got = await _letters(ledger, consumer)
    assert len(got) <= n, f"more dead letters than poison messages: {len(got)}"
    return got if len(got) == n else None


async def _poisoned_runner(server: EmbeddedNats, *, drop_dlq: bool
                           ) -> tuple[Any, Any, Ledger, PullRunner, str]:
    nc = await connect(server.url)
    js = jetstream(nc)
    await declare_streams(js)
    if drop_dlq:
        await js.delete_stream(subjects.STREAM_DLQ)
    skill = "nodlq" + ev.new_id()[:8]
    runner = PullRunner(js, subjects.STREAM_WORK,
                        pull_consumer_config(subjects.work_consumer(skill), subjects.work(skill)),
                        _naive_handler([], asyncio.Event()), max_deliver=2, dlq_retries=2,
                        backoff_s=(0.05,))
    await runner.start()
    await js.publish(subjects.work(skill), POISON["deep"])
    return nc, js, Ledger(nc, js), runner, subjects.work_consumer(skill)


async def test_a_dead_letter_that_cannot_be_stored_is_handed_back_then_kept(
        fresh_server: EmbeddedNats) -> None:
    nc, js, ledger, runner, durable = await _poisoned_runner(fresh_server, drop_dlq=True)
    try:
        async def handed_back() -> bool:
            info = await js.consumer_info(subjects.STREAM_WORK, durable)
            return info.num_redelivered >= 1

        # The DLQ is gone: the letter cannot be stored, so the message is nak'ed
        # (redelivered), not terminated as if kept.
        await _until("a redelivery of the message whose letter failed", handed_back)
        await declare_streams(js)  # the DLQ is back
        letters = await _until("the letter, once the DLQ is back",
                               lambda: _letters_if(ledger, durable, 1))

        async def settled() -> bool:
            info = await js.consumer_info(subjects.STREAM_WORK, durable)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await _until("the consumer to have nothing pending", settled)
        assert await _letters(ledger, durable) == letters  # exactly once
    finally:
        await runner.stop()
        await nc.close()
    assert letters[0].data == POISON["deep"]


async def test_a_message_whose_letter_can_never_be_stored_still_ends(
        fresh_server: EmbeddedNats, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="jetmesh.bus")
    nc, js, _, runner, durable = await _poisoned_runner(fresh_server, drop_dlq=True)
    try:
        async def ended() -> bool:
            info = await js.consumer_info(subjects.STREAM_WORK, durable)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await _until("the message to be terminated", ended, timeout=30)
        info = await js.consumer_info(subjects.STREAM_WORK, durable)
    finally:
        await runner.stop()
        await nc.close()
    # It came back while the runner kept trying to store its letter, then was dropped
    # loudly: max_deliver (2) + dlq_retries (2) deliveries, then one more that gives up.
    assert info.delivered.consumer_seq == 5, info
    assert any("DROPPED" in r.getMessage() for r in caplog.records)


async def test_a_task_with_garbage_on_its_control_and_step_subjects_reads_back(
        bus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="jetmesh.bus")
    task = ev.new_id()
    ledger: Ledger = bus.ledger
    good = [await ledger.append(ev.TaskSubmitted(subject=task,
                                                 data=ev.TaskSubmittedData(goal="g")))]
    line, log_subj = subjects.step_events(task, "s1"), subjects.step_log(task, "s1")
    junk = {
        subjects.task_control(task): b"\xff garbage",
        line: ('{"a":' * 1000 + "1" + "}" * 1000).encode(),
        log_subj: b'{"not": "an event"}',
        subjects.task_events(task): b'{"type": "jetmesh.task.completed.v1", "subject": "\\ud800"}',
    }
    bad = {}
    for subj, data in junk.items():  # the step's log is a stream of its own (JM_LOG)
        ack = await bus.js.publish(subj, data)
        bad[subj] = ack.seq + (LOG_SEQ_BASE if ack.stream == subjects.STREAM_LOG else 0)
    good.append(await ledger.append(ev.StepStarted(subject=task, data=ev.StepStartedData(
        step_id="s1", agent="a", worker="w"))))
    good.append(await ledger.append(ev.CancelRequested(subject=task,
                                                       data=ev.CancelRequestedData())))

    entries = await ledger.read(task)
    assert [e.seq for e in entries] == good
    # In the order they were stored (the log's merged in by time).
    assert [(s.seq, s.subject) for s in entries.skipped] == [(bad[x], x) for x in junk]
    assert all(isinstance(s, Skipped) and s.reason for s in entries.skipped)
    assert "not an event" in {s.subject: s.reason for s in entries.skipped}[line]

    step = await ledger.read_step(task, "s1")
    assert [e.seq for e in step] == [good[1]]
    assert {s.seq for s in step.skipped} == {bad[line], bad[log_subj]}
    # A fence over a subject must count its bad messages too: the log holds only one.
    assert step.last_seq(lambda s: s == log_subj) == bad[log_subj]
    assert step.last_seq(lambda s: s == line) == good[1]

    decisions = await ledger.read(task, without_logs=True)
    assert bad[log_subj] not in {s.seq for s in decisions.skipped}
    assert [e.seq for e in decisions] == good

    reported: list[Skipped] = []
    followed = []
    async for entry in ledger.follow(task, on_bad=reported.append):
        followed.append(entry.seq)
        if len(followed) == len(good):
            break
    assert followed == good
    assert [s.seq for s in reported] == [bad[x] for x in junk if x != log_subj]

    # Logged once per message, however many times it is read.
    for subj, seq in bad.items():
        lines = [r for r in caplog.records if f"seq={seq} " in r.getMessage()]
        assert len(lines) == 1, (subj, [r.getMessage() for r in lines])
    # The bad messages are still in the ledger, for inspection.
    raw = await ledger.read_raw(subjects.task_all(task))
    assert {seq for seq, _, _ in raw} == set(good) | {bad[x] for x in junk if x != log_subj}
    # And the listing of every task (`jetmesh tasks`) passes over them too.
    listed = {st.task_id: st for st in await all_tasks(ledger)}
    assert listed[task].last_seq == good[-1]



class Nasty(Exception):
    """An exception that cannot even be printed."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__


async def test_a_handler_error_that_cannot_be_printed_still_ends_in_the_dlq(bus) -> None:
    skill = "nasty" + ev.new_id()[:8]
    durable = subjects.work_consumer(skill)
    attempts = 0

    async def handler(msg: Msg) -> None:
        nonlocal attempts
        attempts += 1
        raise Nasty()

    runner = PullRunner(bus.js, subjects.STREAM_WORK,
                        pull_consumer_config(durable, subjects.work(skill)), handler,
                        max_deliver=2, backoff_s=(0.05,))
    await runner.start()
    try:
        await bus.js.publish(subjects.work(skill), b'{"ok": true}')
        [letter] = await _until("the letter", lambda: _letters_if(bus.ledger, durable, 1))

        async def settled() -> bool:
            info = await bus.js.consumer_info(subjects.STREAM_WORK, durable)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await _until("the consumer to have nothing pending", settled)
    finally:
        await runner.stop()
    assert attempts == 2
    assert letter.reason == "failed 2 times; last error: <unprintable Nasty>"
