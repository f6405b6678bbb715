"""FallbackChain and create_model_chain."""

from __future__ import annotations

import pytest

from jetmesh.agents.models import (
    BreakerModel,
    BreakerRegistry,
    CircuitBreaker,
    FallbackChain,
    FunctionModel,
    Message,
    ModelAuthError,
    ModelCallsDisabled,
    ModelChainExhausted,
    ModelCircuitOpen,
    ModelConfigError,
    ModelRequest,
    ModelRequestError,
    ModelResponse,
    ModelSettings,
    ModelTransientError,
    ScriptedModel,
    SimModel,
    create_model_chain,
)
from jetmesh.agents.spec import ModelPolicy, ModelRef


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def req() -> ModelRequest:
    return ModelRequest(messages=[Message(role="user", content="hi")])


def http_500(provider: str = "anthropic", model: str = "primary") -> ModelTransientError:
    return ModelTransientError(provider, model, "HTTP 500: internal error", status=500)


def failing(provider: str, name: str, exc: Exception | None = None) -> FunctionModel:
    def fn(request: ModelRequest) -> str:
        raise exc or http_500(provider, name)

    return FunctionModel(fn, provider=provider, name=name)


async def test_falls_back_to_the_second_model_on_500s() -> None:
    primary = failing("anthropic", "claude")
    second = ScriptedModel("from the fallback", provider="openai", name="gpt")
    chain = FallbackChain([primary, second])
    assert (chain.provider, chain.name) == ("anthropic", "claude")
    response = await chain.complete(req())
    assert response.text == "from the fallback"
    # The response names the model that really answered (ledger and cost use these).
    assert (response.provider, response.model) == ("openai", "gpt")
    assert len(primary.requests) == 1 and len(second.requests) == 1
    assert chain.fallbacks_used == 1
    assert chain.last_answered_by == "openai/gpt"
    assert chain.describe() == "anthropic/claude -> openai/gpt"
    # The answer's record names the member that failed first, and why.
    assert [(f.provider, f.model, f.skipped) for f in response.fallbacks] == [
        ("anthropic", "claude", False)]
    assert "HTTP 500" in response.fallbacks[0].error


async def test_primary_answers_when_healthy() -> None:
    second = ScriptedModel(provider="openai", name="gpt")
    chain = FallbackChain([ScriptedModel("primary", provider="anthropic", name="c"), second])
    response = await chain.complete(req())
    assert (response.text, response.provider) == ("primary", "anthropic")
    assert second.requests == [] and chain.fallbacks_used == 0


async def test_skips_an_open_primary_without_calling_it() -> None:
    clock = Clock()
    open_breaker = CircuitBreaker("anthropic", failure_threshold=1, clock=clock)
    ticket = open_breaker.acquire()
    assert ticket is not None
    open_breaker.failure(ticket)
    primary_inner = ScriptedModel("never", provider="anthropic", name="claude")
    second = ScriptedModel("fallback", provider="openai", name="gpt")
    chain = FallbackChain([BreakerModel(primary_inner, open_breaker), second])
    response = await chain.complete(req())
    assert response.text == "fallback"
    assert primary_inner.requests == []
    assert chain.breaker_states() == {"anthropic": open_breaker.state()}
    [skipped] = response.fallbacks
    assert (skipped.breaker, skipped.breaker_state, skipped.skipped) == ("anthropic", "open", True)


async def test_the_failure_that_trips_a_breaker_is_recorded_with_the_answer() -> None:
    breaker = CircuitBreaker("anthropic", failure_threshold=2, clock=Clock())
    chain = FallbackChain([BreakerModel(failing("anthropic", "claude"), breaker),
                           ScriptedModel("a", "b", "c", provider="openai", name="gpt")])
    first, second = await chain.complete(req()), await chain.complete(req())
    assert [(f.breaker_state, f.skipped) for f in first.fallbacks] == [("closed", False)]
    assert [(f.breaker_state, f.skipped) for f in second.fallbacks] == [("open", False)]
    third = await chain.complete(req())  # now skipped without a call
    assert [(f.breaker_state, f.skipped) for f in third.fallbacks] == [("open", True)]


@pytest.mark.parametrize("error", [
    ModelAuthError("anthropic", "claude", "401 invalid x-api-key", status=401),
    ModelRequestError("anthropic", "claude", "400 prompt too long", status=400),
])
async def test_non_transient_errors_are_raised_at_once(error: Exception) -> None:
    second = ScriptedModel("fallback", provider="openai", name="gpt")
    chain = FallbackChain([failing("anthropic", "claude", error), second])
    with pytest.raises(type(error)) as info:
        await chain.complete(req())
    assert info.value is error
    assert second.requests == []


async def test_all_failing_raises_chain_exhausted_listing_each() -> None:
    clock = Clock()
    b = CircuitBreaker("openai", failure_threshold=1, reset_timeout_s=20, clock=clock)
    chain = FallbackChain([
        failing("anthropic", "claude"),
        BreakerModel(failing("openai", "gpt"), b),
        failing("sim", "last", TimeoutError("read timed out")),
    ])
    with pytest.raises(ModelChainExhausted) as info:
        await chain.complete(req())
    err = info.value
    assert isinstance(err, ModelTransientError)  # the step is retryable
    assert [e.provider for e in err.errors] == ["anthropic", "openai", "sim"]
    assert "all 3 models" in str(err) and "read timed out" in str(err)
    assert isinstance(err.errors[2].__cause__, TimeoutError)
    # The second call finds openai's breaker open; retry_after is the nearest probe.
    with pytest.raises(ModelChainExhausted) as again:
        await chain.complete(req())
    assert isinstance(again.value.errors[1], ModelCircuitOpen)
    assert again.value.retry_after == pytest.approx(20.0)


async def test_single_model_chain_raises_the_original_error() -> None:
    error = http_500()
    chain = FallbackChain([failing("anthropic", "primary", error)])
    with pytest.raises(ModelTransientError) as info:
        await chain.complete(req())
    assert info.value is error
    with pytest.raises(ValueError):
        FallbackChain([])


async def test_fills_in_missing_provider_and_model_and_closes_all() -> None:
    closed: list[str] = []

    class Named(ScriptedModel):
        async def aclose(self) -> None:
            closed.append(self.name)

    blank = ModelResponse(provider="", model="", text="x")
    chain = FallbackChain([Named(blank, provider="openai", name="local"), Named(name="b")])
    response = await chain.complete(req())
    assert (response.provider, response.model) == ("openai", "local")
    await chain.aclose()
    assert closed == ["local", "b"]


# --- create_model_chain --------------------------------------------------------------


def test_create_model_chain_sim_without_fallbacks_is_the_plain_model() -> None:
    model = create_model_chain(ModelPolicy(), settings=ModelSettings())
    assert isinstance(model, SimModel)
    assert isinstance(create_model_chain(None), SimModel)


async def test_create_model_chain_wraps_each_model_in_its_provider_breaker() -> None:
    reg = BreakerRegistry(failure_threshold=2, reset_timeout_s=30)
    settings = ModelSettings(anthropic_api_key="sk-test", openai_base_url="http://127.0.0.1:9")
    policy = ModelPolicy(provider="anthropic", model="claude-haiku-4-5",
                         fallbacks=[ModelRef(provider="openai", model="gpt-4.1-mini"),
                                    ModelRef(provider="sim", model="dry-run")])
    chain = create_model_chain(policy, settings=settings, registry=reg)
    assert isinstance(chain, FallbackChain)
    assert chain.describe() == ("anthropic/claude-haiku-4-5 -> openai/gpt-4.1-mini -> "
                                "sim/dry-run")
    assert all(isinstance(m, BreakerModel) for m in chain.models)
    assert [m.breaker.name for m in chain.models  # type: ignore[attr-defined]
            ] == ["anthropic", "openai", "sim"]
    assert reg.get("anthropic") is chain.models[0].breaker  # type: ignore[attr-defined]
    assert set(chain.breaker_states()) == {"anthropic", "openai", "sim"}
    # Requests are off in tests: the switch refuses the call to anthropic. That refusal
    # is not transient, so it is raised at once and counts for nothing in the breaker.
    with pytest.raises(ModelCallsDisabled):
        await chain.complete(req())
    assert reg.get("anthropic").state()["consecutive_failures"] == 0
    await chain.aclose()


def test_create_model_chain_real_primary_without_fallbacks_still_gets_a_breaker() -> None:
    reg = BreakerRegistry()
    chain = create_model_chain(ModelPolicy(provider="openai", model="gpt-4.1"),
                               settings=ModelSettings(openai_api_key="sk-test"), registry=reg)
    assert isinstance(chain, FallbackChain) and len(chain.models) == 1
    assert reg.names() == ["openai"]


def test_create_model_chain_reports_bad_fallbacks_as_config_errors() -> None:
    policy = ModelPolicy(fallbacks=[ModelRef(provider="nope", model="x")])
    with pytest.raises(ModelConfigError, match="unknown provider"):
        create_model_chain(policy, settings=ModelSettings())
