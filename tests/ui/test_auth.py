"""Dashboard logins without a server: the tokens file, sessions, roles, and `up`'s banner."""

from __future__ import annotations

import base64
import json
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest

from jetmesh.a2a.ui.api import redact
from jetmesh.a2a.ui.auth import TOKENS_FILE, TokenBook, generate_tokens
from jetmesh.orchestrator.cli.up import dashboard_banner


def test_generated_tokens_are_kept_hashed_and_private(tmp_path: Path) -> None:
    path = tmp_path / TOKENS_FILE
    tokens = generate_tokens(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert tokens["approver"] not in text and tokens["read-only"] not in text
    book = TokenBook(path)
    approver, reader = book.login(tokens["approver"]), book.login(tokens["read-only"])
    assert approver is not None and approver.role == "approver" and approver.may_act
    assert reader is not None and reader.role == "read-only" and not reader.may_act
    assert book.login("guess") is None
    # A new file (the next `up`): the old tokens and sessions stop working.
    cookie = book.cookie(approver)
    assert book.session(cookie) == approver
    fresh = generate_tokens(path)
    assert book.login(tokens["approver"]) is None and book.login(fresh["approver"])
    assert book.session(cookie) is None


def test_sessions_are_signed_and_expire(tmp_path: Path) -> None:
    book = TokenBook(None, env_tokens="ann:read-only:t1,root:approver:t2")
    ann = book.login("t1")
    assert ann is not None and ann.name == "ann"
    cookie = book.cookie(ann)
    _, sig = cookie.rsplit(".", 1)
    forged = json.dumps({"n": "ann", "r": "approver", "c": ann.csrf, "e": ann.expires})
    other = base64.urlsafe_b64encode(forged.encode()).decode()
    assert book.session(f"{other}.{sig}") is None  # a role raised by hand is nobody
    assert book.session(cookie) == ann
    assert book.session(book.cookie(replace(ann, expires=time.time() - 1))) is None
    with pytest.raises(ValueError, match="role"):
        TokenBook(None, env_tokens="x:admin:t3")


def test_up_banner_prints_tokens_once_unless_configured(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.delenv("JETMESH_UI_TOKENS", raising=False)
    monkeypatch.delenv("JETMESH_UI_TOKENS_FILE", raising=False)
    text = dashboard_banner(tmp_path, "http://127.0.0.1:8080/ui/")
    token = text.split("approver token:")[1].split()[0]
    assert TokenBook(tmp_path / TOKENS_FILE).login(token) is not None
    monkeypatch.setenv("JETMESH_UI_TOKENS", "ops:approver:mine")
    (tmp_path / TOKENS_FILE).unlink()
    text = dashboard_banner(tmp_path, "http://127.0.0.1:8080/ui/")
    assert "token:" not in text and not (tmp_path / TOKENS_FILE).exists()


def test_redact_hides_content_keeps_the_shape() -> None:
    row = {"task_id": "t", "goal": "secret goal", "pending": [
        {"tool": "issue_refund", "arguments": {"amount_usd": 230}, "args_hash": "abc"}],
        "input": {}, "reason": "over $200"}
    assert redact(row) == {"task_id": "t", "goal": "[hidden]", "pending": [
        {"tool": "issue_refund", "arguments": "[hidden]", "args_hash": "abc"}],
        "input": {}, "reason": "over $200"}
