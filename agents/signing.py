"""Signed agent cards: JWS (RFC 7515, detached, JCS-canonical payload) with a deployment key.

The SDK's `a2a.utils.signing` does the JWS work; this module loads keys and names them.

Key set-up (see the README):

* ``jetmesh keys generate DIR`` writes ``card-signing.pem`` (EC P-256 private key),
  ``card-verify.pem`` (its public key) and ``jwks.json`` (the public key as a JWK Set).
* Every process that advertises cards gets ``JETMESH_CARD_SIGNING_KEY=DIR/card-signing.pem``.
* Every process that reads cards (orchestrator, gateway, ``jetmesh agents``) gets
  ``JETMESH_CARD_VERIFY_KEY`` pointing at the public PEM or at a JWKS file (several keys,
  chosen by ``kid``: rotate by adding the new key before signing with it). With a verify
  key set, unsigned and tampered cards are refused: such agents are not live.

The key id (``kid``) is the RFC 7638 thumbprint of the public key unless
``JETMESH_CARD_KEY_ID`` names one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from a2a.types import AgentCard
from a2a.utils.signing import (
    ProtectedHeader,
    SignatureVerificationError,
    create_agent_card_signer,
    create_signature_verifier,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import CardSignatureError, KeyConfigError

__all__ = [
    "ALGORITHM",
    "CardSigner",
    "CardVerifier",
    "SigningSettings",
    "generate_keys",
    "signer_from_env",
    "verifier_from_env",
]

ALGORITHM = "ES256"
ACCEPTED_ALGORITHMS = ["ES256", "ES384", "RS256", "PS256", "EdDSA"]
PRIVATE_FILE = "card-signing.pem"
PUBLIC_FILE = "card-verify.pem"
JWKS_FILE = "jwks.json"


class SigningSettings(BaseSettings):
    """Card signing keys, from the environment."""

    model_config = SettingsConfigDict(env_prefix="JETMESH_CARD_", extra="ignore")

    signing_key: Path | None = None
    """PEM private key that signs the cards this process advertises."""
    verify_key: Path | None = None
    """PEM public key or JWKS file; when set, unsigned or tampered cards are refused."""
    key_id: str | None = None
    """The ``kid`` put in signatures (default: the public key's RFC 7638 thumbprint)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public: PublicKeyTypes) -> dict[str, Any]:
    """The public key as a JWK (EC keys only: what `generate_keys` makes)."""
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise KeyConfigError("only EC (P-256) card keys are supported; "
                             "use `jetmesh keys generate`")
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(public))
    return jwk


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of an EC key."""
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return _b64(hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                          sort_keys=True).encode()).digest())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyConfigError(f"cannot read key {path}: {e}") from e


def load_private_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except ValueError as e:
        raise KeyConfigError(f"{path} is not a PEM private key: {e}") from e


@dataclass
class CardSigner:
    """Signs cards with one private key."""

    private_key: ec.EllipticCurvePrivateKey
    kid: str

    @classmethod
    def from_pem(cls, path: Path, kid: str | None = None) -> CardSigner:
        key = load_private_key(path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyConfigError(f"{path}: card keys must be EC P-256 ({ALGORITHM})")
        return cls(key, kid or thumbprint(public_jwk(key.public_key())))

    def sign(self, card: AgentCard) -> AgentCard:
        """A copy of `card` carrying exactly one signature, by this key."""
        out = AgentCard()
        out.CopyFrom(card)
        del out.signatures[:]
        header: ProtectedHeader = {"kid": self.kid, "alg": ALGORITHM, "jku": None,
                                   "typ": "JOSE"}
        protected = {k: v for k, v in header.items() if v is not None}
        signer = create_agent_card_signer(self.private_key, protected)  # type: ignore[arg-type]
        return signer(out)


@dataclass
class CardVerifier:
    """Verifies card signatures against a set of public keys (by ``kid``)."""

    keys: dict[str, PyJWK] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> CardVerifier:
        """A public PEM, a private PEM (its public half is used), or a JWKS JSON file."""
        raw = _read(path)
        if raw.lstrip().startswith(b"{"):
            try:
                doc = json.loads(raw)
                jwks = doc.get("keys", [doc]) if isinstance(doc, dict) else []
                keys = {}
                for jwk in jwks:
                    key = PyJWK(jwk)
                    keys[jwk.get("kid") or thumbprint(jwk)] = key
            except Exception as e:
                raise KeyConfigError(f"{path} is not a usable JWK Set: {e}") from e
            if not keys:
                raise KeyConfigError(f"{path} holds no keys")
            return cls(keys)
        public: PublicKeyTypes
        try:
            public = serialization.load_pem_public_key(raw)
        except ValueError:
            public = load_private_key(path).public_key()
        jwk = public_jwk(public)
        kid = thumbprint(jwk)
        return cls({kid: PyJWK({**jwk, "kid": kid, "alg": ALGORITHM})})

    def add(self, kid: str, jwk: dict[str, Any]) -> None:
        self.keys[kid] = PyJWK(jwk)

    def _key(self, kid: str | None, jku: str | None) -> PyJWK:
        if kid is not None and kid in self.keys:
            return self.keys[kid]
        if len(self.keys) == 1:  # one trusted key: the signature itself decides
            return next(iter(self.keys.values()))
        raise _UnknownKid(kid)

    def verify(self, card: AgentCard) -> None:
        """Return if one signature verifies; else CardSignatureError with the reason."""
        verify: Callable[[AgentCard], None] = create_signature_verifier(
            self._key_or_invalid, ACCEPTED_ALGORITHMS)
        try:
            verify(card)
        except SignatureVerificationError as e:
            reason = "unsigned" if not card.signatures else f"bad signature ({e})"
            raise CardSignatureError(card.name or "?", reason) from e

    def _key_or_invalid(self, kid: str | None, jku: str | None) -> PyJWK:
        try:
            return self._key(kid, jku)
        except _UnknownKid as e:
            # PyJWTError makes the SDK try the next signature instead of crashing.
            from jwt.exceptions import InvalidKeyError

            raise InvalidKeyError(f"unknown key id {kid!r}") from e


class _UnknownKid(Exception):
    pass


def generate_keys(directory: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write a new EC P-256 key pair and its JWKS into `directory`; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"private": directory / PRIVATE_FILE, "public": directory / PUBLIC_FILE,
             "jwks": directory / JWKS_FILE}
    if not overwrite and paths["private"].exists():
        raise KeyConfigError(f"{paths['private']} exists; pass overwrite=True to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    paths["private"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths["private"].chmod(0o600)
    public = key.public_key()
    paths["public"].write_bytes(public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    jwk = public_jwk(public)
    jwk.update({"kid": thumbprint(jwk), "alg": ALGORITHM, "use": "sig"})
    paths["jwks"].write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    return paths


def signer_from_env(settings: SigningSettings | None = None) -> CardSigner | None:
    """The signer ``JETMESH_CARD_SIGNING_KEY`` names, or None (cards go unsigned)."""
    s = settings or SigningSettings()
    return CardSigner.from_pem(s.signing_key, s.key_id) if s.signing_key else None


def verifier_from_env(settings: SigningSettings | None = None) -> CardVerifier | None:
    """The verifier ``JETMESH_CARD_VERIFY_KEY`` names, or None (verification off)."""
    s = settings or SigningSettings()
    return CardVerifier.from_file(s.verify_key) if s.verify_key else None
