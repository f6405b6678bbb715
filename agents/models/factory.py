"""Model settings from the environment and `create_model`, the one way to get a Model."""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
from typing import TYPE_CHECKING

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from jetmesh.agents.breakers import BREAKERS, BreakerModel, BreakerRegistry
from jetmesh.agents.models.chain import FallbackChain
from jetmesh.agents.models.errors import ModelConfigError, ModelError
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import Model

if TYPE_CHECKING:
    from jetmesh.agents.spec import ModelPolicy

__all__ = [
    "DEFAULT_MODELS",
    "PROVIDERS",
    "ModelSettings",
    "create_model",
    "create_model_chain",
    "default_provider",
    "describe_default_model",
]

log = logging.getLogger(__name__)

PROVIDERS = ("anthropic", "openai", "sim")
DEFAULT_MODELS = {
    "anthropic": "claude-sonnet-4-5",
    "openai": "gpt-4.1-mini",
    "sim": "dry-run",
}
SIM_FALLBACK_WARNING = "no model API key configured: running on the simulated model (sim)"

_warned_sim = False
_warned_lock = threading.Lock()


class ModelSettings(BaseSettings):
    """Model configuration, read from the environment."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "anthropic_api_key")
    )
    """Key for the Anthropic API; its presence makes anthropic the default provider."""
    anthropic_base_url: str | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "anthropic_base_url")
    )
    """Alternative Anthropic endpoint (a proxy or a local fake)."""
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    """Key for the OpenAI API."""
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    """OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp); enough to select openai."""
    model_provider: str | None = Field(
        None, validation_alias=AliasChoices("JETMESH_MODEL_PROVIDER", "model_provider")
    )
    """Force a provider: anthropic, openai or sim."""
    model: str | None = Field(None, validation_alias=AliasChoices("JETMESH_MODEL", "model"))
    """Model name; for sim, ``dry-run`` or ``package.module:attr``."""
    sim_latency_ms: float = Field(
        0.0, ge=0, validation_alias=AliasChoices("JETMESH_SIM_LATENCY_MS", "sim_latency_ms")
    )
    """Simulated latency per call of the dry-run model."""
    allow_model_requests: bool = Field(
        True,
        validation_alias=AliasChoices("JETMESH_ALLOW_MODEL_REQUESTS", "allow_model_requests"),
    )
    """Mirror of the test switch (see `jetmesh.agents.models.switch`), for display."""


def default_provider(settings: ModelSettings) -> str:
    """anthropic if its key is set, else openai if its key or base URL is, else sim."""
    if settings.model_provider:
        return settings.model_provider
    if settings.anthropic_api_key:
        return "anthropic"
    if settings.openai_api_key or settings.openai_base_url:
        return "openai"
    return "sim"


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _load_target(target: str) -> Model:
    module_name, _, attr = target.partition(":")
    try:
        obj: object = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelConfigError("sim", target, f"cannot load {target!r}: {exc}") from exc
    if inspect.isclass(obj) or (callable(obj) and not isinstance(obj, Model)):
        obj = obj()
    if not isinstance(obj, Model):
        raise ModelConfigError(
            "sim", target, f"{target!r} is neither a Model nor a factory returning one"
        )
    return obj


def create_model(
    provider: str | None = None,
    model: str | None = None,
    *,
    settings: ModelSettings | None = None,
) -> Model:
    """Build the configured model.

    Without a provider: anthropic if ANTHROPIC_API_KEY is set, else openai if
    OPENAI_API_KEY or OPENAI_BASE_URL is, else the dry-run sim (with a warning, once).
    For provider ``sim`` the model is ``dry-run`` or ``package.module:attr`` naming a
    Model instance or a zero-argument factory returning one.
    """
    global _warned_sim
    settings = settings or ModelSettings()
    chosen = provider or default_provider(settings)
    if chosen not in PROVIDERS:
        raise ModelConfigError(
            chosen, model or "", f"unknown provider, expected one of {PROVIDERS}"
        )
    name = model or settings.model or DEFAULT_MODELS[chosen]

    if chosen == "anthropic":
        from jetmesh.agents.models.anthropic import AnthropicModel

        return AnthropicModel(
            name,
            api_key=_secret(settings.anthropic_api_key),
            base_url=settings.anthropic_base_url,
        )
    if chosen == "openai":
        from jetmesh.agents.models.openai import OpenAIModel

        return OpenAIModel(
            name, api_key=_secret(settings.openai_api_key), base_url=settings.openai_base_url
        )

    if provider is None and not settings.model_provider:
        with _warned_lock:
            first, _warned_sim = not _warned_sim, True
        if first:
            log.warning(SIM_FALLBACK_WARNING)
    if name == "dry-run":
        return SimModel(latency_s=settings.sim_latency_ms / 1000)
    if ":" in name:
        return _load_target(name)
    raise ModelConfigError("sim", name, "a sim model is 'dry-run' or 'package.module:attr'")


def create_model_chain(
    policy: ModelPolicy | None = None,
    *,
    settings: ModelSettings | None = None,
    registry: BreakerRegistry | None = None,
) -> Model:
    """The model an agent runs on: its policy's primary, then each fallback in order.

    The primary comes from ``policy.provider``/``policy.model`` (None: the deployment's
    default, as in `create_model`); each `ModelRef` in ``policy.fallbacks`` follows it.
    Every model goes behind its provider's circuit breaker from ``registry`` (default:
    the process-wide `BREAKERS`), so one provider's outage is seen by every agent of the
    process. A sim primary without fallbacks is returned as it is (no provider to
    protect); anything else is a `FallbackChain` (of one, when there are no fallbacks).
    Raises `ModelConfigError` when a model of the chain cannot be built.
    """
    settings = settings or ModelSettings()
    registry = registry or BREAKERS
    provider = policy.provider if policy else None
    name = policy.model if policy else None
    refs: list[tuple[str | None, str | None]] = [(provider, name)]
    refs += [(r.provider, r.model) for r in (policy.fallbacks if policy else [])]
    models: list[Model] = []
    for p, m in refs:
        try:
            models.append(create_model(p, m, settings=settings))
        except ModelError:
            raise
        except Exception as exc:  # e.g. an SDK refusing to build a client without a key
            raise ModelConfigError(p or default_provider(settings), m or "",
                                   f"cannot create model: {exc}") from exc
    if len(models) == 1 and models[0].provider == "sim":
        return models[0]
    return FallbackChain([BreakerModel(m, registry.get(m.provider)) for m in models])


def describe_default_model(settings: ModelSettings | None = None) -> str:
    """One line for CLIs, e.g. ``anthropic/claude-sonnet-4-5 (ANTHROPIC_API_KEY)``."""
    settings = settings or ModelSettings()
    provider = default_provider(settings)
    name = settings.model or DEFAULT_MODELS.get(provider, "?")
    if settings.model_provider:
        why = "JETMESH_MODEL_PROVIDER"
    elif provider == "anthropic":
        why = "ANTHROPIC_API_KEY"
    elif provider == "openai":
        why = (
            f"OpenAI-compatible at {settings.openai_base_url}"
            if settings.openai_base_url
            else ("OPENAI_API_KEY")
        )
    else:
        why = "no model API key configured: simulated dry run"
    if provider == "anthropic" and settings.anthropic_base_url:
        why += f", at {settings.anthropic_base_url}"
    suffix = "" if settings.allow_model_requests else "; model requests disabled"
    return f"{provider}/{name} ({why}{suffix})"
