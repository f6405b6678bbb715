"""Replay, fork and diff of recorded tasks (`jetmesh replay`, `jetmesh fork`, `jetmesh diff`).

A replay is a new task (`replay_of` the original) run through the live mesh: its plan is
the original's, each step is served from the original's records by the workers (see
`jetmesh.agents.replay`: an unrecorded call fails the step `replay_diverged`, so no
provider is called and no side effect runs), and a merge is served from the original's
recorded merge call. A fork (`fork.from_step`) serves the steps upstream of that step the
same way and runs it and everything downstream again. The original's ledger is only read.

`compare` then lines both tasks up step by step: outputs, tool calls, model calls,
tokens, cost and latency, and names the first event where they part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jetmesh.agents.models.errors import ModelError
from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.bus.ledger_port import TaskLedger
from jetmesh.orchestrator.state import TaskState, fold

if TYPE_CHECKING:
    from jetmesh.orchestrator.client import Client

__all__ = [
    "Comparison",
    "StepComparison",
    "compare",
    "diff_tasks",
    "fork_submission",
    "replay_submission",
    "replayed_merge",
    "replayed_plan",
    "run_replay",
    "submit",
]

SOURCE = "jetmesh/orchestrator"


async def original_state(ledger: TaskLedger, task_id: str) -> TaskState:
    return fold(task_id, await ledger.read(task_id))


def _fail(task_id: str, code: str, reason: str) -> list[ev.Event]:
    return [ev.TaskFailed(id=f"{task_id}-end", subject=task_id, source=SOURCE,
                          data=ev.TaskFailedData(code=code, reason=reason))]


async def replayed_plan(ledger: TaskLedger, state: TaskState) -> list[ev.Event]:
    """The plan of a replayed task: its original's, as recorded (no planner call)."""
    sub = state.submitted
    assert sub is not None and sub.replay_of is not None
    orig = await original_state(ledger, sub.replay_of)
    if not orig.plan:
        return _fail(state.task_id, "replay_source",
                     f"task {sub.replay_of} has no recorded plan to replay")
    if sub.fork is not None and sub.fork.from_step not in {p.id for p in orig.plan}:
        return _fail(state.task_id, "replay_source",
                     f"task {sub.replay_of} has no step {sub.fork.from_step}")
    return [ev.TaskPlanned(
        id=f"{state.task_id}-planned", subject=state.task_id, source=SOURCE,
        data=ev.TaskPlannedData(planner=orig.planner or "replay", steps=orig.plan,
                                merge=orig.merge, context=orig.context))]


async def replayed_merge(ledger: TaskLedger, state: TaskState,
                         outputs: dict[str, dict[str, Any]]) -> list[ev.Event]:
    """The merge of an exact replay: the original's recorded merge call, served only if
    the steps' outputs are the original's (else the merge would have been another call:
    `replay_diverged`)."""
    from jetmesh.agents.replay import RecordingOnlyModel
    from jetmesh.orchestrator.planner import Recorder, merge_with_model

    sub = state.submitted
    assert sub is not None and sub.replay_of is not None
    orig = await original_state(ledger, sub.replay_of)
    for _ in range(16):  # a replay of a replay: the merge was recorded further back
        osub = orig.submitted
        if osub is None or osub.replay_of is None or osub.fork is not None:
            break
        orig = await original_state(ledger, osub.replay_of)
    for sid, out in outputs.items():
        st = orig.steps.get(sid)
        if st is None or st.output != out:
            return _fail(state.task_id, "replay_diverged",
                         f"the merge's input differs from the original's (step {sid})")
    recorder = Recorder("merge", [c for c in orig.orchestrator_calls if c.purpose == "merge"])
    try:
        result = await merge_with_model(RecordingOnlyModel(), sub.goal, outputs, recorder)
    except ModelError as e:
        return _fail(state.task_id, "replay_diverged", f"merge: {e}")
    return [ev.TaskCompleted(id=f"{state.task_id}-end", subject=state.task_id,
                             source=SOURCE, data=ev.TaskCompletedData(result=result))]


# ----------------------------------------------------------------------------- submissions


def replay_submission(orig: TaskState, task_id: str | None = None,
                      fork: ev.ForkSpec | None = None,
                      patch_input: dict[str, Any] | None = None) -> ev.TaskSubmission:
    """The submission of a replay (or, with `fork`, a fork) of the finished task `orig`."""
    sub = orig.submitted
    if sub is None:
        raise ValueError(f"no task {orig.task_id}")
    if not orig.terminal:
        raise ValueError(f"task {orig.task_id} is {orig.status.value}: only a finished "
                         "task is replayed")
    task_input = {**sub.input, **(patch_input or {})}
    kind = "fork" if fork is not None else "replay"
    return ev.TaskSubmission(
        task_id=task_id or f"{orig.task_id[:40]}-{kind}-{ev.new_id()[:8]}",
        goal=sub.goal, input=task_input, workflow=sub.workflow, user_id=sub.user_id,
        budget=sub.budget, metadata=sub.metadata, replay_of=orig.task_id, fork=fork)


def fork_submission(orig: TaskState, from_step: str, *, models: dict[str, str] | None = None,
                    patch_input: dict[str, Any] | None = None, effects: str = "dry-run",
                    task_id: str | None = None) -> ev.TaskSubmission:
    if from_step not in {p.id for p in orig.plan}:
        raise ValueError(f"task {orig.task_id} has no step {from_step} (steps: "
                         + ", ".join(p.id for p in orig.plan) + ")")
    if effects not in ("dry-run", "real"):
        raise ValueError("effects must be dry-run or real")
    models = models or {}
    also = [p.id for p in orig.plan if p.id != from_step
            and (st := orig.steps.get(p.id)) is not None and st.agent in models]
    fork = ev.ForkSpec(from_step=from_step, steps=also, models=models,
                       effects="real" if effects == "real" else "dry-run")
    return replay_submission(orig, task_id, fork, patch_input)


# ----------------------------------------------------------------------------- comparing


@dataclass
class StepRecord:
    """What one task's step did, from its ledger events."""

    status: str
    output: dict[str, Any] | None
    code: str | None
    tools: list[dict[str, Any]]
    """Counted tool calls in order: tool, arguments, output, error, dry_run."""
    model_calls: int
    models: list[str]
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float
    """From its dispatch to its result."""
    end_seq: int | None
    end_type: str | None


@dataclass
class StepComparison:
    step_id: str
    a: StepRecord | None
    b: StepRecord | None

    @property
    def identical(self) -> bool:
        """Same outcome and output (and tool calls, when both recorded them)."""
        if self.a is None or self.b is None:
            return False
        same = (self.a.status, self.a.output, self.a.code) == \
            (self.b.status, self.b.output, self.b.code)
        if self.a.tools and self.b.tools:
            same = same and self.a.tools == self.b.tools
        return same

    def changes(self) -> list[str]:
        if self.a is None or self.b is None:
            return ["only in " + ("B" if self.a is None else "A")]
        out: list[str] = []
        if self.a.status != self.b.status or self.a.code != self.b.code:
            out.append(f"status {self.a.status}{_code(self.a)} -> "
                       f"{self.b.status}{_code(self.b)}")
        if self.a.output != self.b.output:
            out.append("output")
        if self.a.tools and self.b.tools and self.a.tools != self.b.tools:
            out.append("tool calls")
        if self.a.models != self.b.models and self.b.models:
            out.append("model " + ",".join(sorted(set(self.a.models))) + " -> "
                       + ",".join(sorted(set(self.b.models))))
        return out


def _code(r: StepRecord) -> str:
    return f" [{r.code}]" if r.code else ""


@dataclass
class Comparison:
    a: str
    b: str
    steps: list[StepComparison] = field(default_factory=list)
    a_status: str = ""
    b_status: str = ""
    a_result: dict[str, Any] | None = None
    b_result: dict[str, Any] | None = None
    a_state: TaskState | None = None
    b_state: TaskState | None = None
    first_divergence: str | None = None
    """The first event where the tasks part (None: identical)."""

    @property
    def result_identical(self) -> bool:
        return self.a_status == self.b_status and self.a_result == self.b_result

    @property
    def identical(self) -> bool:
        return self.result_identical and all(s.identical for s in self.steps)

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "identical": self.identical,
            "result_identical": self.result_identical,
            "first_divergence": self.first_divergence,
            "status": {"a": self.a_status, "b": self.b_status},
            "steps": [{"step": s.step_id, "identical": s.identical, "changes": s.changes(),
                       "a": _rec_json(s.a), "b": _rec_json(s.b)} for s in self.steps],
        }


def _rec_json(r: StepRecord | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"status": r.status, "code": r.code, "tool_calls": len(r.tools),
            "model_calls": r.model_calls, "models": sorted(set(r.models)),
            "tokens": r.input_tokens + r.output_tokens, "cost_usd": r.cost_usd,
            "latency_ms": round(r.latency_ms, 1), "output": r.output}


def step_records(state: TaskState, entries: list[LedgerEntry]) -> dict[str, StepRecord]:
    """Each step's record: the fold's outcome and usage, and its tool calls (the holder's
    at the time, first of each idempotency key) and models from the events."""
    tools: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    models: dict[str, list[str]] = {}
    ends: dict[str, tuple[int, str]] = {}
    ignored = {i.seq for i in state.ignored}
    for entry in entries:
        sid = subjects.step_id_of(entry.subject)
        if sid is None or entry.seq in ignored:
            continue
        e = entry.event
        if isinstance(e, ev.ToolCalled) and e.data.idempotency_key not in seen:
            seen.add(e.data.idempotency_key)
            tools.setdefault(sid, []).append({
                "tool": e.data.tool, "arguments": e.data.arguments, "output": e.data.output,
                "error": e.data.error, "dry_run": e.data.dry_run})
        elif isinstance(e, ev.ModelCalled):
            models.setdefault(sid, []).append(f"{e.data.provider}/{e.data.model}")
        elif isinstance(e, ev.StepCompleted | ev.StepFailed):
            ends[sid] = (entry.seq, e.type)
    out: dict[str, StepRecord] = {}
    for sid, st in state.steps.items():
        latency = 0.0
        if st.dispatched_at and st.finished_at:
            latency = (st.finished_at - st.dispatched_at).total_seconds() * 1000
        end = ends.get(sid)
        out[sid] = StepRecord(
            status=st.status.value, output=st.output, code=st.code, tools=tools.get(sid, []),
            model_calls=st.model_calls, models=models.get(sid, []),
            input_tokens=st.input_tokens, output_tokens=st.output_tokens,
            cost_usd=st.cost_usd, latency_ms=latency,
            end_seq=end[0] if end else None, end_type=end[1] if end else None)
    return out


def _end_event(entries: list[LedgerEntry]) -> tuple[int, str] | None:
    for entry in entries:
        if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS) and \
                subjects.step_id_of(entry.subject) is None:
            return entry.seq, entry.event.type
    return None


def compare(a_id: str, a_entries: list[LedgerEntry], b_id: str,
            b_entries: list[LedgerEntry]) -> Comparison:
    """Line up two tasks' ledgers step by step (in the plan's order, A's first)."""
    a, b = fold(a_id, a_entries), fold(b_id, b_entries)
    ra, rb = step_records(a, a_entries), step_records(b, b_entries)
    order = [p.id for p in a.plan] + [p.id for p in b.plan if p.id not in ra]
    cmp = Comparison(a_id, b_id, a_status=a.status.value, b_status=b.status.value,
                     a_result=a.result, b_result=b.result, a_state=a, b_state=b)
    for sid in order:
        cmp.steps.append(StepComparison(sid, ra.get(sid), rb.get(sid)))
    if [p.model_dump() for p in a.plan] != [p.model_dump() for p in b.plan]:
        cmp.first_divergence = "the plan (jetmesh.task.planned.v1) differs"
        return cmp
    for s in cmp.steps:
        if s.identical:
            continue
        if s.a is not None and s.b is not None and s.a.tools and s.b.tools:
            for i, (ta, tb) in enumerate(zip(s.a.tools, s.b.tools, strict=False)):
                if ta != tb:
                    cmp.first_divergence = (
                        f"step {s.step_id}: tool call #{i + 1} ({ta['tool']} / {tb['tool']}, "
                        "jetmesh.tool.called.v1) differs")
                    return cmp
        where = []
        for name, r in (("A", s.a), ("B", s.b)):
            if r is not None and r.end_seq is not None:
                where.append(f"{name} seq {r.end_seq}")
        etype = (s.b.end_type if s.b and s.b.end_type else
                 s.a.end_type if s.a and s.a.end_type else "no result")
        cmp.first_divergence = (f"step {s.step_id}: {etype} ({', '.join(where) or 'missing'})"
                                f" differs: {'; '.join(s.changes())}")
        return cmp
    if not cmp.result_identical:
        ea, eb = _end_event(a_entries), _end_event(b_entries)
        cmp.first_divergence = (
            f"the task's end ({ea[1] if ea else 'none'} at A seq {ea[0] if ea else '-'}, "
            f"{eb[1] if eb else 'none'} at B seq {eb[0] if eb else '-'}) differs")
    return cmp


async def submit(client: Client, sub: ev.TaskSubmission) -> str:
    """Publish a replay's or fork's submission (as `Client.submit` does)."""
    await client.js.publish(subjects.SUBMIT, sub.model_dump_json(exclude_none=True).encode(),
                            headers={hn.MSG_ID: sub.task_id})
    return sub.task_id


async def run_replay(client: Client, task_id: str, *, fork: ev.ForkSpec | None = None,
                     patch_input: dict[str, Any] | None = None, new_task_id: str | None = None,
                     timeout: float | None = 120.0) -> Comparison:
    """Replay (or fork) finished task `task_id` on the live mesh, wait for the new task's
    end, and compare it with the original. ValueError if the task cannot be replayed."""
    orig = await client.state(task_id)
    if fork is not None and fork.from_step not in {p.id for p in orig.plan}:
        raise ValueError(f"task {task_id} has no step {fork.from_step}")
    sub = replay_submission(orig, new_task_id, fork, patch_input)
    new = await submit(client, sub)
    await client.result(new, timeout=timeout)
    return compare(task_id, await client.events(task_id), new, await client.events(new))


async def diff_tasks(client: Client, a: str, b: str) -> Comparison:
    return compare(a, await client.events(a), b, await client.events(b))


def short(value: Any, n: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= n else text[:n - 1] + "…"
