"""Every ledger event type reads as a sentence in `jetmesh timeline`, not a bare type."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

from pydantic import BaseModel

from jetmesh.bus import events as ev
from jetmesh.orchestrator.timeline import describe


def _sample(cls: type[BaseModel]) -> typing.Any:
    """A minimal valid instance: strings, numbers and literals filled with a first value."""
    fields: dict[str, typing.Any] = {}
    for name, f in cls.model_fields.items():
        if not f.is_required():
            continue
        ann = f.annotation
        origin = typing.get_origin(ann)
        if origin is typing.Literal:
            fields[name] = typing.get_args(ann)[0]
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            fields[name] = _sample(ann)
        elif ann is int or ann is float:
            fields[name] = 1
        elif ann is datetime:
            fields[name] = datetime.now(UTC)
        elif ann is bool:
            fields[name] = False
        elif origin is tuple and ... not in typing.get_args(ann):
            fields[name] = tuple(1 for _ in typing.get_args(ann))
        elif origin in (list, tuple):
            fields[name] = []
        elif origin is dict:
            fields[name] = {}
        else:
            fields[name] = "x"
    return cls.model_validate(fields)


def test_every_event_type_is_described() -> None:
    classes = typing.get_args(typing.get_args(ev.Event)[0])
    assert len(classes) == len(ev.EVENT_TYPES)
    for cls in classes:
        event = cls(subject="t1", data=_sample(cls.model_fields["data"].annotation))
        line = describe(event)
        assert line and line != event.type, cls.__name__


def test_effect_started_names_the_tool_agent_and_replica() -> None:
    e = ev.EffectStarted(subject="t1", data=ev.EffectStartedData(
        step_id="s1", agent="billing", worker="billing-host-1", tool="refund",
        args_hash="h", idempotency_key="k"))
    assert describe(e) == "effect starting: refund by billing on billing-host-1"
