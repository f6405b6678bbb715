// Node's test runner against a real mesh: NATS_URL names it (the Python test
// tests/a2a/test_node_example.py starts nats-server, an orchestrator and the orders agent).
import assert from "node:assert/strict";
import { test } from "node:test";
import { runTask } from "./client.mjs";

test("submits a task with its own id and follows its events to completion", async () => {
  assert.ok(process.env.NATS_URL, "NATS_URL must name a running mesh");
  const seen = [];
  const { taskId, traceId, ack, events, final } = await runTask(
    { workflow: "fanout", input: { order_ids: ["A1001", "A1002", "A1003"] } },
    { onEvent: (e) => seen.push(e) });
  assert.equal(ack.stream, "JM_TASKS");
  assert.equal(final.type, "jetmesh.task.completed.v1");
  assert.equal(final.subject, taskId);
  assert.equal(events[0].event.type, "jetmesh.task.submitted.v1");
  const seqs = events.map((e) => e.seq);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "ledger order");
  const untraced = events.filter((e) => !e.event.traceparent).map((e) => `${e.event.type} ${e.subject}`);
  assert.deepEqual(untraced, [], "every event has a traceparent");
  assert.ok(events.every((e) => e.event.traceparent.split("-")[1] === traceId),
            "every event is in the submitter's trace");
  assert.ok(final.data.result, "the result is on the completion");
});

test("a second publish of the same submission is a duplicate, not a second task", async () => {
  const taskId = `node-dup-${Date.now()}`;
  const sub = { task_id: taskId, workflow: "fanout", input: { order_ids: ["A1004", "A1005", "A1006"] } };
  const one = await runTask(sub);
  const two = await runTask(sub, { timeoutMs: 5_000 });
  assert.equal(one.final.type, "jetmesh.task.completed.v1");
  assert.equal(two.ack.duplicate, true);
  assert.equal(two.events.length, one.events.length, "the same task's events, no more");
});
