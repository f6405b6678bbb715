"""Dashboard logins: tokens with a role, signed session cookies, CSRF checks.

Tokens live in a JSON file (default `<data-dir>/ui-tokens.json`, mode 0600) holding only
their SHA-256 and the key that signs sessions; `jetmesh up` writes a fresh one on every
start and prints the tokens once (`generate_tokens`). Deployments set their own with
``JETMESH_UI_TOKENS=name:role:token,...`` or point ``JETMESH_UI_TOKENS_FILE`` at a file
(then `up` leaves it alone).

A login (POST a token) sets two cookies, both ``SameSite=Strict``: the HttpOnly session
(name, role, expiry, a CSRF nonce, HMAC-signed) and a readable ``jm_csrf`` cookie with
that nonce. Every state-changing request must be JSON and carry the nonce in the
``X-CSRF-Token`` header (double submit bound to the signed session): a cross-site page
can neither read the cookie nor send that header without a CORS preflight, which the
dashboard never grants.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jetmesh.bus import headers as hn

Role = Literal["approver", "read-only"]
ROLES: tuple[Role, ...] = ("approver", "read-only")
SESSION_COOKIE = "jm_session"
CSRF_COOKIE = "jm_csrf"
CSRF_HEADER = hn.CSRF_TOKEN
TOKENS_FILE = "ui-tokens.json"


@dataclass(frozen=True)
class Person:
    """Who is logged in (the name is recorded with every action they take)."""

    name: str
    role: Role
    csrf: str
    expires: float
    tenant: str | None = None
    """A login with the gateway's credentials (a2a/auth) of a tenant's user: they see and
    act on that tenant's tasks only. None: an operator's login (every tenant)."""
    operator: bool = True
    """Operator views (dead letters, redrive, every tenant's stats): dashboard tokens and
    the gateway's admins; not a tenant's users."""

    @property
    def may_act(self) -> bool:
        return self.role == "approver"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def generate_tokens(path: Path) -> dict[Role, str]:
    """Write a new tokens file at `path` (0600): one approver and one read-only token;
    returns them (the file keeps only their hashes)."""
    tokens: dict[Role, str] = {r: secrets.token_urlsafe(24) for r in ROLES}
    body = {"secret": secrets.token_hex(32),
            "tokens": [{"name": "operator" if r == "approver" else "viewer", "role": r,
                        "sha256": _digest(t)} for r, t in tokens.items()]}
    _write_secret(path, json.dumps(body, indent=1))
    return tokens


def configured_elsewhere() -> bool:
    """Whether the deployment set its own tokens (then `up` generates none)."""
    return bool(os.environ.get("JETMESH_UI_TOKENS") or os.environ.get("JETMESH_UI_TOKENS_FILE"))


class TokenBook:
    """Checks tokens and sessions. Re-reads its file when the file changes."""

    def __init__(self, path: Path | None, *, env_tokens: str | None = None,
                 session_ttl_s: float = 12 * 3600.0) -> None:
        self.path = path
        self.session_ttl_s = session_ttl_s
        self._mtime = -1.0
        self._tokens: dict[str, tuple[str, Role]] = {}
        self._secret = secrets.token_bytes(32)
        self._env: dict[str, tuple[str, Role]] = {}
        for item in (env_tokens or "").split(","):
            if not item.strip():
                continue
            name, role, token = item.strip().split(":", 2)
            if role not in ROLES:
                raise ValueError(f"JETMESH_UI_TOKENS: role {role!r} is not one of {ROLES}")
            self._env[_digest(token)] = (name, role)  # type: ignore[assignment]
        if self._env and os.environ.get("JETMESH_UI_SECRET"):
            self._secret = os.environ["JETMESH_UI_SECRET"].encode()
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._tokens = {}
            return
        if mtime == self._mtime:
            return
        body = json.loads(self.path.read_text())
        self._secret = bytes.fromhex(body["secret"])
        self._tokens = {t["sha256"]: (t["name"], t["role"]) for t in body["tokens"]
                        if t.get("role") in ROLES}
        self._mtime = mtime

    @property
    def empty(self) -> bool:
        self._reload()
        return not (self._tokens or self._env)

    def login(self, token: str) -> Person | None:
        self._reload()
        found = self._env.get(_digest(token)) or self._tokens.get(_digest(token))
        if found is None:
            return None
        name, role = found
        return self.person(name, role)

    def person(self, name: str, role: Role, tenant: str | None = None,
               operator: bool = True) -> Person:
        """A new session's person (e.g. one the gateway's credentials identified)."""
        return Person(name, role, secrets.token_urlsafe(18), time.time() + self.session_ttl_s,
                      tenant, operator)

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def cookie(self, person: Person) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(
            {"n": person.name, "r": person.role, "c": person.csrf, "e": person.expires,
             "t": person.tenant, "o": person.operator}).encode()).decode()
        return f"{payload}.{self._sign(payload.encode())}"

    def session(self, cookie: str | None) -> Person | None:
        """The person of a session cookie, if it is signed by us and not expired."""
        if not cookie or "." not in cookie:
            return None
        self._reload()
        payload, sig = cookie.rsplit(".", 1)
        if not hmac.compare_digest(sig, self._sign(payload.encode())):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload.encode()))
            tenant = body.get("t")
            person = Person(str(body["n"]), body["r"], str(body["c"]), float(body["e"]),
                            None if tenant is None else str(tenant), bool(body.get("o", True)))
        except (ValueError, KeyError, TypeError):
            return None
        if person.role not in ROLES or person.expires < time.time():
            return None
        return person
