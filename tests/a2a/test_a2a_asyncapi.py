"""The AsyncAPI document of the NATS contract: valid AsyncAPI 3.0, in sync with the one in
docs/, covering every subject builder of bus/subjects.py, and matching what a real mesh
publishes on a real nats-server (every subject seen has a channel, every payload its
schema)."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from a2a_mesh import Mesh
from a2a_support import Bus, until
from typer.testing import CliRunner

from jetmesh.a2a.asyncapi import CONTRACT, asyncapi_document, asyncapi_json
from jetmesh.agents.builtin import get_agent
from jetmesh.bus import subjects
from jetmesh.memory.protocol import OPERATIONS
from jetmesh.orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("asyncapi-3.0.0.schema.json")
"""The AsyncAPI 3.0.0 JSON Schema (@asyncapi/specs 6.11.1, schemas/3.0.0-without-$id.json,
Apache-2.0)."""

INTERNAL = {
    "check_id": "validates ids, builds nothing",
    "task_id_of": "parses a subject", "step_id_of": "parses a subject",
    "is_step_log": "parses a subject",
    "task_all": "a wildcard over a task's channels above",
    "task_logs": "a wildcard over a task's step-log channels",
    "task_decisions": "wildcards over a task's channels above",
    "work_consumer": "a consumer name, not a subject",
    "private_work_consumer": "a consumer name, not a subject",
    "is_private_work": "parses a subject",
    "kv_stream": "a stream name, not a subject",
    "killswitch_key": "a key of the jm-killswitch bucket (operators' switch), not a subject",
    "spend_key": "a key of a spend-caps bucket, not a subject",
    "direct_get": "JetStream API", "consumer_next": "JetStream API",
    "stream_info_api": "JetStream API",
    "tenant_of": "parses a subject",
    **dict.fromkeys(("tenant_submit", "tenant_memory", "tenant_task_ops", "tenant_task_events"),
                    "the mesh account's side of a tenant account's import (bus.tenancy): a "
                    "tenant's clients use the channels above in their own account"),
}
"""Functions of bus/subjects.py that build no public subject of their own, and why."""

SAMPLES: dict[str, str] = {"task_events": "jm.task.t1.events",
                           "step_events": "jm.task.t1.step.s1",
                           "step_log": "jm.task.t1.step.s1.log",
                           "task_control": "jm.task.t1.control",
                           "task_approval": "jm.task.t1.approval", "work": "jm.work.refund",
                           "private_work": "jm.work.refund.acme",
                           "dlq": "jm.dlq.JM_WORK.work-refund",
                           "kv_subject": "$KV.jm-agents.orders.host-1",
                           "memory": "jm.memory.search", "SUBMIT": subjects.SUBMIT}


def _pattern(address: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[a-z_]+\\\}", r"[A-Za-z0-9_-]+", re.escape(address)) + "$")


def channel_for(doc: dict[str, Any], subject: str) -> str | None:
    for name, ch in doc["channels"].items():
        if _pattern(ch["address"]).match(subject):
            return name
    return None


def payload_validator(doc: dict[str, Any], channel: str) -> jsonschema.Validator:
    (ref,) = [m["$ref"] for m in doc["channels"][channel]["messages"].values()]
    message = doc["components"]["messages"][ref.rsplit("/", 1)[1]]
    # the document itself is the schema root, so "#/components/schemas/..." resolves
    return jsonschema.Draft202012Validator({**doc, "$ref": message["payload"]["$ref"]})


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi_document("nats://nats.example:4222")


def test_the_document_is_valid_asyncapi_3(doc: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
    assert not errors, [e.message[:200] for e in errors[:5]]
    assert doc["asyncapi"] == "3.0.0"
    bad = dict(doc, operations={"x": {"action": "explode", "channel": {"$ref": "#/x"}}})
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))  # the check can fail


def test_docs_copy_is_in_sync_and_the_cli_writes_it(tmp_path: Path) -> None:
    checked_in = (ROOT / "docs" / "asyncapi.json").read_text()
    assert checked_in == asyncapi_json(), "run `jetmesh asyncapi -o docs/asyncapi.json`"
    out = tmp_path / "a.json"
    res = CliRunner().invoke(app, ["asyncapi", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text() == checked_in


def test_every_subject_builder_has_a_channel(doc: dict[str, Any]) -> None:
    builders = {n for n, f in inspect.getmembers(subjects, inspect.isfunction)
                if f.__module__ == subjects.__name__}
    public = builders - set(INTERNAL)
    assert public | {"SUBMIT"} == set(SAMPLES), f"new builder(s): {public - set(SAMPLES)}"
    covered = {ch.builder for ch in CONTRACT}
    assert covered == set(SAMPLES)
    for name, sample in SAMPLES.items():
        assert channel_for(doc, sample), f"{name}: {sample} has no channel"
    # the samples are what the builders really build
    assert subjects.task_events("t1") == SAMPLES["task_events"]
    assert subjects.step_log("t1", "s1") == SAMPLES["step_log"]
    assert subjects.dlq("JM_WORK", subjects.work_consumer("refund")) == SAMPLES["dlq"]
    assert subjects.kv_subject(subjects.BUCKET_AGENTS, "orders.host-1") == SAMPLES["kv_subject"]
    assert {f"memory-{op}" for op in OPERATIONS} <= set(doc["channels"])
    actions = {ch.name: ch.action for ch in CONTRACT}
    assert {n for n, op in doc["operations"].items() if op["action"] == "receive"} == {
        n for n, a in actions.items() if a == "receive"}


async def test_what_a_real_mesh_publishes_matches_the_document(
        a2a_bus: Bus, doc: dict[str, Any]) -> None:
    seen: list[tuple[str, bytes]] = []

    async def record(msg: Any) -> None:
        seen.append((msg.subject, msg.data))

    subs = [await a2a_bus.nc.subscribe("jm.>", cb=record),
            await a2a_bus.nc.subscribe(subjects.kv_subject(subjects.BUCKET_AGENTS), cb=record)]
    mesh = Mesh(a2a_bus.url, [get_agent("orders")])
    await mesh.start()
    try:
        task_id = f"aa-{uuid.uuid4().hex[:12]}"
        await mesh.gateway.client.submit(  # type: ignore[union-attr]
            "look it up", input={"order_id": "A1001"}, workflow="skill:lookup_order",
            task_id=task_id)
        state = await mesh.gateway.client.result(task_id, timeout=30)  # type: ignore[union-attr]
        assert state.terminal
        await until(lambda: any(s == subjects.task_events(task_id) and b"completed" in d
                                for s, d in seen), 10, "the completion heard")
        async with httpx.AsyncClient() as http:
            served = (await http.get(f"{mesh.base}/asyncapi.json")).json()
            page = await http.get(f"{mesh.base}/asyncapi")
        assert served["channels"].keys() == doc["channels"].keys()
        assert page.status_code == 200 and "AsyncAPI" in page.text
    finally:
        for s in subs:
            await s.unsubscribe()
        await mesh.stop()
        await asyncio.sleep(0)
    mine = [(s, d) for s, d in seen if task_id in s or s.startswith(("$KV", "jm.work."))
            or s == subjects.SUBMIT]
    assert {channel_for(doc, s) for s, _ in mine} >= {
        "submit", "task-events", "step-events", "step-log", "work", "registry"}
    for subject, data in mine:
        name = channel_for(doc, subject)
        assert name is not None, f"{subject} is not in the document"
        if data:  # (a KV delete marker has no body)
            payload_validator(doc, name).validate(json.loads(data))
