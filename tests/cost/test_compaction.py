"""Context compaction in the step loop: a 40-tool-call step with large outputs stays under
its limit, the early identifiers survive, each compaction merges only the new span, and
a step resumed from its records compacts exactly as the original did."""

from __future__ import annotations

import itertools

from jetmesh.agents.compaction import SUMMARY_HEADER, extract_identifiers
from jetmesh.agents.costdemo import cheap, make_concierge, page_ref
from jetmesh.agents.loop import ListRecorder, StepReplay, run_step
from jetmesh.agents.tools import ToolContext

LIMIT = 4000  # the demo agent's compaction threshold (max_context_tokens)


async def digest(skill: str, rec: ListRecorder, replay: StepReplay | None = None,
                 summarizer: str = "extract"):  # type: ignore[no-untyped-def]
    m = cheap()
    return await run_step(make_concierge(summarizer=summarizer), skill,
                          {"pages": 40, "want": [1, 2, 3]}, m,
                          ctx=ToolContext(task_id="t-compact", step_id="s1", agent="concierge"),
                          recorder=rec, replay=replay), m


async def test_forty_tool_calls_stay_under_the_limit_and_keep_the_early_ids() -> None:
    rec = ListRecorder()
    out, model = await digest("digest_pages", rec)
    assert out.ok, out.reason
    assert out.output == {"refs": [page_ref(1), page_ref(2), page_ref(3)], "pages_read": 40}
    assert len(rec.tool_calls) == 40 and out.model_calls == 41
    assert max(c.input_tokens for c in rec.model_calls) <= LIMIT

    full = ListRecorder()
    base, _ = await digest("digest_pages_full", full)
    assert base.ok and base.output == out.output
    assert max(c.input_tokens for c in full.model_calls) > 4 * LIMIT
    saved = 1 - out.input_tokens / base.input_tokens
    print(f"\ninput tokens per step: {base.input_tokens} without compaction, "
          f"{out.input_tokens} with ({saved:.1%} fewer); "
          f"{len(rec.compactions)} compactions")
    assert saved > 0.5

    # Each compaction merges only the span truncated since the last one.
    spans = [c.messages for c in rec.compactions]
    assert spans[0][0] == 1
    assert all(b[0] == a[1] for a, b in itertools.pairwise(spans))
    assert [c.compaction for c in rec.compactions] == list(range(1, len(spans) + 1))
    assert all(c.tokens_after < c.tokens_before for c in rec.compactions)

    # Linked to what it replaces: the keys are the recorded calls', in order, each once.
    replaced = [k for c in rec.compactions for k in c.tool_calls]
    keys = [t.idempotency_key for t in rec.tool_calls]
    assert replaced == keys[:len(replaced)] and len(replaced) >= 30
    ordinals = [o for c in rec.compactions for o in c.model_calls]
    assert ordinals == list(range(len(ordinals)))

    # Identifiers come from the recorded tool results, every one of the replaced span.
    last = rec.compactions[-1].summary
    recorded_refs = [t.output["ref"] for t in rec.tool_calls[:len(replaced)]]
    assert [i for i in last["identifiers"] if i.startswith("REF-")] == recorded_refs
    assert set(last) == {"intent", "decisions", "identifiers", "facts", "tool_results",
                         "open_questions", "next_steps"}
    assert len(last["tool_results"]) == len(replaced)
    assert model.calls == 41


async def test_a_resumed_step_compacts_as_the_original_did() -> None:
    rec = ListRecorder()
    out, _ = await digest("digest_pages", rec)
    # A redelivery after a crash at model call 30: calls 1-30 (and their tools) are
    # served from the records, the rest are made again, with the same compactions.
    cut = 30
    replay = StepReplay.from_records(rec.model_calls[:cut], rec.tool_calls[:cut - 1])
    again = ListRecorder()
    out2, model = await digest("digest_pages", again, replay)
    assert out2.output == out.output and out2.replayed_model_calls == cut
    assert model.calls == 41 - cut
    # Recorded anew only where the calls are new, and then identical to the original's.
    assert again.compactions
    assert [c.model_dump() for c in again.compactions] == \
        [c.model_dump() for c in rec.compactions[-len(again.compactions):]]


async def test_a_model_written_summary_never_replaces_the_recorded_identifiers() -> None:
    rec = ListRecorder()
    out, _ = await digest("digest_pages", rec, summarizer="model")
    assert out.ok and out.output["refs"] == [page_ref(1), page_ref(2), page_ref(3)]
    compact_calls = [i for i, c in enumerate(rec.model_calls) if c.purpose == "compact"]
    assert compact_calls and [c.summary_call for c in rec.compactions] == compact_calls
    assert max(c.input_tokens for c in rec.model_calls if c.purpose == "step") <= LIMIT
    last = rec.compactions[-1]
    # The (lossy) model wrote the decisions and next steps; the identifiers are still
    # every one of the replaced tool results', from the records.
    assert last.summary["decisions"] == ["kept reading the case file page by page"]
    assert last.summary["next_steps"] == ["read the next page"]
    replaced = [k for c in rec.compactions for k in c.tool_calls]
    refs = [t.output["ref"] for t in rec.tool_calls[:len(replaced)]]
    assert [i for i in last.summary["identifiers"] if i.startswith("REF-")] == refs
    # Resumed mid-step: the summariser's calls before the cut are replayed, not made.
    cut = compact_calls[1] + 1
    steps_before = sum(c.purpose == "step" for c in rec.model_calls[:cut])
    again = ListRecorder()  # each step call before the cut had its tool run and recorded
    replay = StepReplay.from_records(rec.model_calls[:cut], rec.tool_calls[:steps_before])
    out2, model = await digest("digest_pages", again, replay, summarizer="model")
    assert out2.output == out.output and model.calls == len(rec.model_calls) - cut
    assert [c.model_dump() for c in again.compactions] == \
        [c.model_dump() for c in rec.compactions[-len(again.compactions):]]


def test_identifiers_from_keys_and_text() -> None:
    value = {"order_id": "A1001", "items": [{"sku": "TEA-7", "n": 2}],
             "note": "see REF-0042-ab12 and https://x.test/a?b=1", "count": 3,
             "customer": {"id": 77, "name": "Ann"}}
    assert extract_identifiers(value) == ["A1001", "TEA-7", "REF-0042-ab12",
                                          "https://x.test/a?b=1", "77"]
    assert SUMMARY_HEADER.startswith("[")
