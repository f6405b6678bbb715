"""Circuit breakers: the state machine, BreakerModel, the registry and the tool guards."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from jetmesh.agents.breakers import (
    BREAKER_DENIAL_PREFIX,
    BreakerSettings,
    BreakerTool,
    guard_spec,
    guard_tool,
    is_external_tool,
    worker_breaker_states,
)
from jetmesh.agents.models import (
    BreakerModel,
    BreakerRegistry,
    CircuitBreaker,
    FallbackChain,
    FunctionModel,
    Message,
    ModelAuthError,
    ModelCircuitOpen,
    ModelError,
    ModelRateLimited,
    ModelRequest,
    ModelRequestError,
    ModelRetriesExhausted,
    ModelTransientError,
    describe_breakers,
    is_transient,
)
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import Tool, ToolContext


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def breaker(clock: Clock, n: int = 3, reset: float = 30.0) -> CircuitBreaker:
    return CircuitBreaker("anthropic", failure_threshold=n, reset_timeout_s=reset,
                          clock=clock, wall_clock=lambda: 1_700_000_000.0 + clock.t)


def req() -> ModelRequest:
    return ModelRequest(messages=[Message(role="user", content="hi")])


def server_error() -> ModelTransientError:
    return ModelTransientError("anthropic", "m", "HTTP 500: overloaded", status=500)


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        t = b.acquire()
        assert t is not None
        b.failure(t)


# --- the state machine --------------------------------------------------------------


def test_opens_after_n_consecutive_failures() -> None:
    clock = Clock()
    b = breaker(clock, n=3)
    fail(b, 2)
    assert b.state()["state"] == "closed"
    assert b.state()["consecutive_failures"] == 2
    fail(b, 1)
    s = b.state()
    assert s["state"] == "open"
    assert s["consecutive_failures"] == 3
    assert s["threshold"] == 3
    assert s["opened_at"] is not None and s["next_probe_at"] is not None
    assert b.acquire() is None
    assert b.rejected == 1
    assert b.retry_in_s() == pytest.approx(30.0)


def test_success_resets_the_count_so_failures_must_be_consecutive() -> None:
    b = breaker(Clock(), n=3)
    fail(b, 2)
    t = b.acquire()
    assert t is not None
    b.success(t)
    fail(b, 2)
    assert b.current == "closed"
    assert b.state()["consecutive_failures"] == 2


def test_half_open_lets_exactly_one_probe_through_and_success_closes() -> None:
    clock = Clock()
    b = breaker(clock, n=2, reset=10)
    fail(b, 2)
    clock.advance(9.9)
    assert b.acquire() is None
    assert b.retry_in_s() == pytest.approx(0.1)
    clock.advance(0.1)
    assert b.state()["state"] == "half_open"
    probe = b.acquire()
    assert probe is not None and probe.probe
    assert b.acquire() is None  # concurrent callers are rejected while the probe runs
    assert b.acquire() is None
    b.success(probe)
    s = b.state()
    assert s == {**s, "state": "closed", "consecutive_failures": 0, "opened_at": None,
                 "next_probe_at": None}
    t = b.acquire()
    assert t is not None and not t.probe


def test_failed_probe_reopens_for_another_timeout() -> None:
    clock = Clock()
    b = breaker(clock, n=2, reset=10)
    fail(b, 2)
    clock.advance(10)
    probe = b.acquire()
    assert probe is not None
    b.failure(probe)
    assert b.current == "open"
    assert b.acquire() is None
    clock.advance(9)
    assert b.acquire() is None
    clock.advance(1)
    assert b.acquire() is not None


def test_ignored_probe_frees_the_slot_without_deciding() -> None:
    clock = Clock()
    b = breaker(clock, n=1, reset=5)
    fail(b, 1)
    clock.advance(5)
    probe = b.acquire()
    assert probe is not None
    b.ignore(probe)  # e.g. an auth error or cancellation: says nothing about health
    assert b.current == "half_open"
    again = b.acquire()
    assert again is not None and again.probe


def test_results_of_calls_from_an_earlier_state_are_ignored() -> None:
    clock = Clock()
    b = breaker(clock, n=2, reset=5)
    slow = b.acquire()  # started while closed
    assert slow is not None
    fail(b, 2)  # opens
    b.success(slow)  # the slow call finishing late does not close the breaker
    assert b.current == "open"
    clock.advance(5)
    probe = b.acquire()
    assert probe is not None
    b.failure(slow)  # nor does a stale failure re-open it or spend the probe
    assert b.current == "half_open"
    b.success(probe)
    assert b.current == "closed"


def test_reset_and_validation() -> None:
    b = breaker(Clock(), n=1)
    fail(b, 1)
    b.reset()
    assert b.current == "closed"
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", reset_timeout_s=0)


def test_state_timestamps_are_iso_utc() -> None:
    clock = Clock(0.0)
    b = breaker(clock, n=1, reset=30)
    fail(b, 1)
    s = b.state()
    assert s["opened_at"] == "2023-11-14T22:13:20+00:00"
    assert s["next_probe_at"] == "2023-11-14T22:13:50+00:00"


def test_is_transient() -> None:
    assert is_transient(server_error())
    assert is_transient(ModelRateLimited("a", "m", "429", status=429))
    assert is_transient(ModelRetriesExhausted("a", "m", "x", attempts=4,
                                              last_error=server_error()))
    assert is_transient(TimeoutError())
    assert is_transient(ConnectionResetError())
    assert not is_transient(ModelAuthError("a", "m", "401", status=401))
    assert not is_transient(ModelRequestError("a", "m", "400", status=400))
    assert not is_transient(ValueError("bug"))


# --- BreakerModel -------------------------------------------------------------------


async def test_breaker_model_opens_and_then_rejects_without_calling_the_model() -> None:
    calls = 0

    def always_500(request: ModelRequest) -> str:
        nonlocal calls
        calls += 1
        raise server_error()

    clock = Clock()
    model = BreakerModel(FunctionModel(always_500, provider="anthropic", name="m"),
                         breaker(clock, n=3))
    for _ in range(3):
        with pytest.raises(ModelTransientError) as info:
            await model.complete(req())
        assert not isinstance(info.value, ModelCircuitOpen)
    assert calls == 3
    for _ in range(5):
        with pytest.raises(ModelCircuitOpen) as opened:
            await model.complete(req())
    assert calls == 3  # rejected fast: the model was not called
    err = opened.value
    assert isinstance(err, ModelTransientError)
    assert err.breaker == "anthropic"
    assert err.retry_after == pytest.approx(30.0)
    assert "open after 3 consecutive" in str(err)
    assert model.breaker_states()["anthropic"]["state"] == "open"


async def test_breaker_model_half_open_probe_success_closes() -> None:
    clock = Clock()
    healthy = False
    gate = asyncio.Event()

    async def flaky(request: ModelRequest) -> str:
        if not healthy:
            raise server_error()
        await gate.wait()
        return "ok"

    inner = FunctionModel(flaky, provider="anthropic", name="m")
    model = BreakerModel(inner, breaker(clock, n=2, reset=10))
    for _ in range(2):
        with pytest.raises(ModelTransientError):
            await model.complete(req())
    healthy = True
    clock.advance(10)
    probe = asyncio.create_task(model.complete(req()))
    await asyncio.sleep(0)
    assert len(inner.requests) == 3  # the probe is in flight
    with pytest.raises(ModelCircuitOpen, match="probe call is still running"):
        await model.complete(req())
    assert len(inner.requests) == 3
    gate.set()
    assert (await probe).text == "ok"
    assert model.breaker.current == "closed"
    assert (await model.complete(req())).text == "ok"


async def test_auth_and_request_errors_do_not_trip_the_breaker() -> None:
    errors: list[ModelError] = [ModelAuthError("anthropic", "m", "401 bad key", status=401),
                                ModelRequestError("anthropic", "m", "400 bad", status=400)]

    def bad(request: ModelRequest) -> str:
        raise errors[len(model_inner.requests) % 2]

    model_inner = FunctionModel(bad, provider="anthropic", name="m")
    model = BreakerModel(model_inner, breaker(Clock(), n=2))
    for _ in range(10):
        with pytest.raises((ModelAuthError, ModelRequestError)):
            await model.complete(req())
    assert model.breaker.state()["state"] == "closed"
    assert model.breaker.state()["consecutive_failures"] == 0
    assert len(model_inner.requests) == 10


async def test_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()

    async def hang(request: ModelRequest) -> str:
        await asyncio.sleep(3600)
        return "never"

    b = breaker(clock, n=1, reset=1)
    fail(b, 1)
    clock.advance(1)
    model = BreakerModel(FunctionModel(hang, provider="anthropic", name="m"), b)
    task = asyncio.create_task(model.complete(req()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.current == "half_open"
    assert b.acquire() is not None


# --- registry -----------------------------------------------------------------------


def test_registry_shares_breakers_by_name_and_reports_states() -> None:
    clock = Clock()
    reg = BreakerRegistry(failure_threshold=2, reset_timeout_s=5, clock=clock)
    a = reg.get("anthropic")
    assert reg.get("anthropic") is a
    reg.get("tool:a2a:http://x#y")
    fail(a, 2)
    states = reg.states()
    assert set(states) == {"anthropic", "tool:a2a:http://x#y"}
    assert states["anthropic"]["state"] == "open"
    assert states["tool:a2a:http://x#y"]["state"] == "closed"
    assert set(reg.states(["anthropic", "missing"])) == {"anthropic"}
    assert describe_breakers(states) == "anthropic open (2/2)"
    assert describe_breakers({"x": {"state": "closed"}}) == "ok"
    assert describe_breakers({}) == "-"
    reg.clear()
    assert reg.names() == []


def test_registry_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETMESH_BREAKER_FAILURES", "7")
    monkeypatch.setenv("JETMESH_BREAKER_RESET_S", "12.5")
    assert BreakerSettings().failure_threshold == 7
    b = BreakerRegistry().get("openai")
    assert (b.failure_threshold, b.reset_timeout_s) == (7, 12.5)
    monkeypatch.delenv("JETMESH_BREAKER_FAILURES")
    monkeypatch.delenv("JETMESH_BREAKER_RESET_S")
    b = BreakerRegistry().get("openai")
    assert (b.failure_threshold, b.reset_timeout_s) == (5, 30.0)


# --- tools --------------------------------------------------------------------------


class In(BaseModel):
    x: int = 0


class Out(BaseModel):
    y: int


def make_tool(fn: object, *, name: str = "pay", side_effects: bool = True,
              timeout_s: float = 5.0) -> Tool:
    return Tool(name=name, description="d", input_model=In, output_model=Out,
                fn=fn,  # type: ignore[arg-type]
                side_effects=side_effects, timeout_s=timeout_s)


CTX = ToolContext(task_id="t", step_id="s", agent="a")


def test_is_external_tool() -> None:
    assert is_external_tool(make_tool(lambda a: {"y": 1}))
    assert is_external_tool(make_tool(lambda a: {"y": 1}, name="a2a:http://x#s",
                                      side_effects=False))
    assert not is_external_tool(make_tool(lambda a: {"y": 1}, side_effects=False))


async def test_tool_breaker_counts_only_the_far_sides_failures() -> None:
    clock = Clock()
    reg = BreakerRegistry(failure_threshold=2, reset_timeout_s=10, clock=clock)
    healthy = False

    async def pay(args: In) -> dict[str, int]:
        if not healthy:
            raise RuntimeError("gateway 502")
        return {"y": args.x}

    tool = guard_tool(make_tool(pay), registry=reg)
    for _ in range(2):
        assert (await tool.invoke({"x": 1}, CTX)).kind == "exception"
    denied = await tool.invoke({"x": 1}, CTX)
    assert denied.kind == "denied" and denied.error is not None
    assert denied.error.startswith(BREAKER_DENIAL_PREFIX)
    assert "'pay'" in denied.error and "2 times in a row" in denied.error
    assert reg.states()["tool:pay"]["state"] == "open"

    # Invalid arguments are the model's fault: the probe's slot is freed, nothing counts.
    healthy = True
    clock.advance(10)
    bad = await tool.invoke({"x": "nope"}, CTX)
    assert bad.kind == "invalid_arguments"
    assert reg.get("tool:pay").current == "half_open"
    assert (await tool.invoke({"x": 3}, CTX)).output == {"y": 3}
    assert reg.get("tool:pay").current == "closed"


async def test_guard_tool_wraps_invoke() -> None:
    clock = Clock()
    reg = BreakerRegistry(failure_threshold=2, reset_timeout_s=10, clock=clock)
    calls = 0

    async def slow(args: In) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(1)
        return {"y": 1}

    tool = guard_tool(make_tool(slow, name="a2a:http://x#s", timeout_s=0.01), registry=reg)
    assert isinstance(tool, BreakerTool)
    assert guard_tool(tool, registry=reg) is tool
    assert tool.name == "a2a:http://x#s" and tool.side_effects
    assert tool.definition().input_schema == In.model_json_schema()
    for _ in range(2):
        assert (await tool.invoke({}, CTX)).kind == "timeout"
    denied = await tool.invoke({}, CTX)
    assert denied.kind == "denied" and not denied.ok
    assert denied.error is not None and denied.error.startswith(BREAKER_DENIAL_PREFIX)
    assert calls == 2
    assert reg.states()["tool:a2a:http://x#s"]["state"] == "open"


def test_guard_spec_wraps_only_external_tools() -> None:
    pay = make_tool(lambda a: {"y": 1}, name="pay")
    calc = make_tool(lambda a: {"y": 1}, name="calc", side_effects=False)
    spec = AgentSpec(name="billing", description="d",
                     skills=[SkillSpec(id="s", name="s", description="d", tools=["pay", "calc"])],
                     tools=[pay, calc])
    guarded = guard_spec(spec, registry=BreakerRegistry())
    assert isinstance(guarded.tools[0], BreakerTool)
    assert guarded.tools[1] is calc
    assert spec.tools[0] is pay  # the original spec is unchanged


def test_worker_breaker_states_are_the_agents_own() -> None:
    reg = BreakerRegistry()
    pay = make_tool(lambda a: {"y": 1}, name="pay")
    spec = AgentSpec(name="billing", description="d",
                     skills=[SkillSpec(id="s", name="s", description="d")], tools=[pay])
    reg.get("tool:pay")
    reg.get("tool:someone-elses")
    model = FallbackChain([BreakerModel(FunctionModel(lambda r: "x", provider="openai"),
                                        reg.get("openai"))])
    states = worker_breaker_states(spec, model, registry=reg)
    assert set(states) == {"openai", "tool:pay"}
    assert worker_breaker_states(spec, None, registry=reg).keys() == {"tool:pay"}
