#!/usr/bin/env node
// A jetmesh client in Node.js, written from the README's "From any NATS client" section
// only: publish a submission on jm.task.submit (JetStream, Nats-Msg-Id = the task id we
// chose: the PubAck does not carry it), then follow jm.task.<id>.> on the JM_LEDGER
// stream with an ordered consumer until a terminal event (completed / failed / canceled /
// rejected).
//
//   NATS_URL=nats://127.0.0.1:4222 node client.mjs '{"workflow":"fanout","input":{...}}'
//
// Prints one JSON line per event ({seq, type, subject}) and finally the result; exits 0
// when the task completed, 1 otherwise. NATS_USER / NATS_PASSWORD / NATS_INBOX_PREFIX log
// in to a `jetmesh up` mesh (the `gateway` user may submit and read the ledger).
import { randomUUID } from "node:crypto";
import { connect, headers, JSONCodec } from "nats";

const TERMINAL = new Set([
  "jetmesh.task.completed.v1", "jetmesh.task.failed.v1",
  "jetmesh.task.canceled.v1", "jetmesh.task.rejected.v1",
]);

/** Submit `submission` (task_id filled in when absent) and follow it to its end. */
export async function runTask(submission, { servers, timeoutMs = 60_000, onEvent } = {}) {
  const opts = { servers: servers ?? process.env.NATS_URL ?? "nats://127.0.0.1:4222" };
  if (process.env.NATS_USER) {
    opts.user = process.env.NATS_USER;
    opts.pass = process.env.NATS_PASSWORD ?? "";
  }
  if (process.env.NATS_INBOX_PREFIX) opts.inboxPrefix = process.env.NATS_INBOX_PREFIX;
  const nc = await connect(opts);
  const jc = JSONCodec();
  try {
    const taskId = submission.task_id ?? `node-${randomUUID()}`;
    const body = { ...submission, task_id: taskId };
    const js = nc.jetstream();
    const h = headers();
    h.set("Nats-Msg-Id", taskId); // a retried publish is stored once
    // W3C trace context: the task's trace continues ours, and every event carries it
    const traceId = randomUUID().replaceAll("-", "");
    h.set("traceparent", `00-${traceId}-${traceId.slice(0, 16)}-01`);
    const ack = await js.publish("jm.task.submit", jc.encode(body), { headers: h });
    // ack = {stream: "JM_TASKS", seq, duplicate}: no task id, hence our own.

    const consumer = await js.consumers.get("JM_LEDGER", {
      filterSubjects: [`jm.task.${taskId}.>`],
    });
    const messages = await consumer.consume();
    const events = [];
    const timer = setTimeout(() => messages.stop(), timeoutMs);
    let last = null;
    for await (const m of messages) {
      const event = jc.decode(m.data);
      events.push({ seq: m.seq, subject: m.subject, event });
      onEvent?.({ seq: m.seq, subject: m.subject, type: event.type });
      if (m.subject === `jm.task.${taskId}.events` && TERMINAL.has(event.type)) {
        last = event;
        break;
      }
    }
    clearTimeout(timer);
    await messages.close?.();
    return { taskId, traceId, ack, events, final: last };
  } finally {
    await nc.close();
  }
}

const isMain = process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isMain) {
  const submission = JSON.parse(process.argv[2] ?? '{"goal": "hello"}');
  const { taskId, final } = await runTask(submission, {
    onEvent: (e) => console.log(JSON.stringify(e)),
  });
  console.log(JSON.stringify({ task_id: taskId, type: final?.type ?? null,
                               result: final?.data?.result ?? null,
                               reason: final?.data?.reason ?? null }));
  process.exit(final?.type === "jetmesh.task.completed.v1" ? 0 : 1);
}
