"""The CLI's kit (jetmesh.orchestrator.cli.kit): one runner catching the one error root,
one signal helper, one `module:attr` loader."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import typer

from jetmesh.a2a.errors import ExternalAgentError
from jetmesh.agents.errors import InvalidCardError
from jetmesh.bus.errors import NotConnectedError
from jetmesh.memory.errors import MemoryStoreError
from jetmesh.orchestrator.cli import kit
from jetmesh.orchestrator.errors import WorkflowError


@pytest.mark.parametrize("error", [
    NotConnectedError("nats://nowhere:4222"),
    WorkflowError("no workflow [nosuch]"),
    MemoryStoreError("the store [is] locked"),
    ExternalAgentError("http://x", "refused"),
    InvalidCardError("missing [name]"),
])
def test_every_jetmesh_error_is_one_line_and_exit_1(
        error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    async def fail() -> None:
        raise error

    with pytest.raises(typer.Exit) as exit_:
        kit.run(fail)
    assert exit_.value.exit_code == 1
    out = capsys.readouterr()
    assert out.out == ""
    # the message as it is: square brackets are not taken for rich markup
    assert out.err.strip() == f"error: {error}"


def test_other_errors_are_not_swallowed() -> None:
    async def bug() -> None:
        raise ZeroDivisionError("a bug shows its traceback")

    with pytest.raises(ZeroDivisionError):
        kit.run(bug)


def test_run_returns_the_result() -> None:
    async def answer() -> int:
        return 42

    assert kit.run(answer) == 42


def test_stop_on_signals_is_set_by_sigterm() -> None:
    async def main() -> bool:
        stop = kit.stop_on_signals()
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
        return stop.is_set()

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert asyncio.run(main())  # a loop of its own: its handlers go with it
    finally:
        signal.signal(signal.SIGTERM, before)


def test_load_object_and_load_agent() -> None:
    from jetmesh.agents.builtin import BUILTIN_AGENTS, get_agent

    assert kit.load_object("jetmesh.agents.builtin:BUILTIN_AGENTS") is BUILTIN_AGENTS
    assert kit.load_agent("support") == get_agent("support")
    assert kit.load_agent("jetmesh.agents.builtin:get_agent") is get_agent
    with pytest.raises(typer.Exit) as exit_:
        kit.load_agent("no-such-agent")
    assert exit_.value.exit_code == 2
