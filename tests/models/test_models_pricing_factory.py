"""Pricing table, ModelSettings and create_model."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import jetmesh.agents.models as models_pkg
from jetmesh.agents.models import (
    ModelConfigError,
    ModelSettings,
    ScriptedModel,
    SimModel,
    Usage,
    cost_usd,
    create_model,
    describe_default_model,
    factory,
)
from jetmesh.agents.models.anthropic import AnthropicModel
from jetmesh.agents.models.openai import OpenAIModel

MILLION = Usage(input_tokens=1_000_000, output_tokens=1_000_000)

SCRIPTED = ScriptedModel("from a target")


def make_scripted() -> ScriptedModel:
    return ScriptedModel("from a factory")


def test_prices() -> None:
    assert cost_usd("anthropic", "claude-sonnet-4-5", MILLION) == 18.0
    assert cost_usd("anthropic", "claude-sonnet-4-5-20250929", MILLION) == 18.0
    assert cost_usd("openai", "gpt-4o-mini-2024-07-18", MILLION) == pytest.approx(0.75)
    assert cost_usd("sim", "dry-run", Usage(input_tokens=1000, output_tokens=1000)) == 0.003


def test_unknown_model_costs_zero_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert cost_usd("openai", "mystery-model-x", MILLION) == 0.0
        assert cost_usd("openai", "mystery-model-x", MILLION) == 0.0
    assert [r.getMessage() for r in caplog.records].count(
        "no price known for openai/mystery-model-x: counting its cost as 0"
    ) == 1


def test_prices_file_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    override = tmp_path / "prices.json"
    override.write_text(
        json.dumps(
            {
                "openai": {"llama3.2": {"input_per_mtok": 0.5, "output_per_mtok": 0.5}},
                "sim": {"*": {"input_per_mtok": 10.0, "output_per_mtok": 10.0}},
            }
        )
    )
    monkeypatch.setenv("JETMESH_PRICES_FILE", str(override))
    assert cost_usd("openai", "llama3.2", MILLION) == 1.0
    assert cost_usd("sim", "dry-run", MILLION) == 20.0
    assert cost_usd("openai", "gpt-4o", MILLION) == 12.5  # default rows survive the merge


def test_default_is_sim_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(factory, "_warned_sim", False)
    with caplog.at_level(logging.WARNING):
        first = create_model()
        create_model()
    assert isinstance(first, SimModel)
    assert [r.getMessage() for r in caplog.records].count(factory.SIM_FALLBACK_WARNING) == 1
    assert describe_default_model().startswith("sim/dry-run")


async def test_provider_choice_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    model = create_model()
    assert isinstance(model, OpenAIModel) and model.base_url.startswith("http://127.0.0.1:11434")
    await model.aclose()
    assert describe_default_model().startswith("openai/gpt-4.1-mini (OpenAI-compatible at")

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("JETMESH_MODEL", "claude-haiku-4-5")
    model = create_model()
    assert isinstance(model, AnthropicModel) and model.name == "claude-haiku-4-5"
    await model.aclose()
    assert describe_default_model() == "anthropic/claude-haiku-4-5 (ANTHROPIC_API_KEY)"

    monkeypatch.setenv("JETMESH_MODEL_PROVIDER", "sim")
    monkeypatch.setenv("JETMESH_MODEL", "dry-run")
    monkeypatch.setenv("JETMESH_SIM_LATENCY_MS", "5")
    sim = create_model()
    assert isinstance(sim, SimModel) and sim.latency_s == 0.005


def test_sim_targets() -> None:
    assert create_model("sim", f"{__name__}:SCRIPTED") is SCRIPTED
    built = create_model("sim", f"{__name__}:make_scripted")
    assert isinstance(built, ScriptedModel) and built.remaining == 1
    assert isinstance(create_model("sim", "jetmesh.agents.models.sim:SimModel"), SimModel)
    with pytest.raises(ModelConfigError, match="cannot load"):
        create_model("sim", "no.such.module:thing")
    with pytest.raises(ModelConfigError, match="neither a Model"):
        create_model("sim", "json:__name__")
    with pytest.raises(ModelConfigError):
        create_model("sim", "other")
    with pytest.raises(ModelConfigError, match="unknown provider"):
        create_model("gemini")


def test_settings_can_be_passed_explicitly() -> None:
    settings = ModelSettings(openai_api_key="k", model="gpt-4o")  # type: ignore[arg-type]
    assert describe_default_model(settings) == "openai/gpt-4o (OPENAI_API_KEY)"


def test_public_surface_is_sorted_and_complete() -> None:
    exported = models_pkg.__all__
    assert exported == sorted(exported)
    for name in exported:
        assert hasattr(models_pkg, name), name


def test_importing_the_package_does_not_import_the_sdks() -> None:
    code = (
        "import sys, jetmesh.agents.models; "
        "print('anthropic' in sys.modules, 'openai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
