"""Cards derived from specs are valid A2A 1.0 cards; signatures catch tampering."""

from __future__ import annotations

from pathlib import Path

import pytest
from a2a.types import AgentCard
from a2a.utils.constants import TransportProtocol
from a2a.utils.proto_utils import validate_proto_required_fields
from google.protobuf.json_format import ParseDict

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.cards import (
    NATS_BINDING,
    SKILL_SCHEMAS_EXTENSION,
    card_for_spec,
    card_from_dict,
    card_to_dict,
    mesh_card,
    skills_from_card,
)
from jetmesh.agents.errors import CardSignatureError, InvalidCardError, KeyConfigError
from jetmesh.agents.signing import CardSigner, CardVerifier, generate_keys, verifier_from_env

REQUIRED = ["name", "description", "supportedInterfaces", "version", "capabilities",
            "defaultInputModes", "defaultOutputModes", "skills"]


def test_card_from_spec_is_a_valid_a2a_1_0_card() -> None:
    spec = get_agent("orders")
    card = card_for_spec(spec, nats_url="nats://user:pw@127.0.0.1:4222",
                         http_base_url="http://127.0.0.1:8000")
    validate_proto_required_fields(card)  # the SDK's own check of REQUIRED fields
    data = card_to_dict(card)
    for key in REQUIRED:
        assert data.get(key), key
    # round trip through the SDK's model
    again = ParseDict(data, AgentCard())
    assert again == card
    nats, jsonrpc, rest = card.supported_interfaces
    assert nats.protocol_binding == NATS_BINDING
    assert nats.url == "nats://127.0.0.1:4222/jm.work.{skill}"  # no credentials
    assert jsonrpc.protocol_binding == TransportProtocol.JSONRPC.value
    assert jsonrpc.url == "http://127.0.0.1:8000/agents/orders/"
    assert rest.protocol_binding == TransportProtocol.HTTP_JSON.value
    assert all(i.protocol_version == "1.0" for i in card.supported_interfaces)
    skill = card.skills[0]
    assert (skill.id, skill.name) == ("lookup_order", "Look up an order")
    assert list(skill.tags) == ["orders", "deterministic"] and list(skill.examples) == ["A1001"]
    ext = [e for e in data["capabilities"]["extensions"] if e["uri"] == SKILL_SCHEMAS_EXTENSION]
    assert ext and set(ext[0]["params"]["skills"]["lookup_order"]) == {"input", "output"}


def test_skill_schemas_read_back_from_card_equal_the_spec() -> None:
    spec = get_agent("orders")
    card = card_from_dict(card_to_dict(card_for_spec(spec)))
    (skill,) = skills_from_card(card)
    assert skill.input_schema == spec.skills[0].input_schema
    assert skill.output_schema == spec.skills[0].output_schema
    assert skill.tags == spec.skills[0].tags


def test_mesh_card_lists_live_skills() -> None:
    skills = [s for n in ("orders", "writer") for s in get_agent(n).skills]
    card = mesh_card(skills, base_url="http://127.0.0.1:9/", nats_url="nats://127.0.0.1:4222")
    validate_proto_required_fields(card)
    assert card.supported_interfaces[0].url == "nats://127.0.0.1:4222/jm.task.submit"
    assert card.supported_interfaces[1].url == "http://127.0.0.1:9/"
    assert sorted(s.id for s in card.skills) == sorted(s.id for s in skills)


def test_invalid_card_is_refused() -> None:
    data = card_to_dict(card_for_spec(get_agent("orders")))
    del data["supportedInterfaces"]
    with pytest.raises(InvalidCardError) as e:
        card_from_dict(data)
    assert "supported_interfaces" in str(e.value)


def test_signed_card_verifies_and_tampering_is_refused(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path)
    signer = CardSigner.from_pem(paths["private"])
    card = signer.sign(card_for_spec(get_agent("orders")))
    assert len(card.signatures) == 1
    for source in ("public", "jwks", "private"):
        verifier = CardVerifier.from_file(paths[source])
        verifier.verify(card_from_dict(card_to_dict(card)))  # survives the JSON round trip

    verifier = CardVerifier.from_file(paths["jwks"])
    tampered = card_to_dict(card)
    tampered["skills"][0]["description"] = "Sends every order to me."
    with pytest.raises(CardSignatureError, match="bad signature"):
        verifier.verify(card_from_dict(tampered))

    unsigned = card_for_spec(get_agent("orders"))
    with pytest.raises(CardSignatureError, match="unsigned"):
        verifier.verify(unsigned)

    other = CardSigner.from_pem(generate_keys(tmp_path / "other")["private"])
    with pytest.raises(CardSignatureError):
        verifier.verify(other.sign(card_for_spec(get_agent("orders"))))


def test_keys_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert verifier_from_env() is None
    paths = generate_keys(tmp_path)
    with pytest.raises(KeyConfigError):
        generate_keys(tmp_path)  # never overwrites a key by accident
    monkeypatch.setenv("JETMESH_CARD_VERIFY_KEY", str(paths["public"]))
    assert verifier_from_env() is not None
    monkeypatch.setenv("JETMESH_CARD_VERIFY_KEY", str(tmp_path / "missing.pem"))
    with pytest.raises(KeyConfigError):
        verifier_from_env()
