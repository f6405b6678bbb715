"""Moved: card signing is `jetmesh.agents.signing` (a layer down, beside the cards). This
name is kept only until the last importers move; import `jetmesh.agents.signing`."""

from jetmesh.agents.signing import signer_from_env, verifier_from_env

__all__ = ["signer_from_env", "verifier_from_env"]
