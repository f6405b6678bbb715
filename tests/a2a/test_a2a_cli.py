"""The A2A commands register on a Typer app and run."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from jetmesh.orchestrator.cli.a2a import register


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command("noop")
    def noop() -> None:  # a second command, so Typer keeps subcommand names
        pass

    register(app)
    return app


def test_commands_are_registered() -> None:
    out = CliRunner().invoke(_app(), ["--help"])
    assert out.exit_code == 0, out.output
    for name in ("gateway", "bridge", "agents-add", "keys"):
        assert name in out.output


def test_keys_generate_writes_a_usable_key_pair(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(_app(), ["keys", "generate", str(tmp_path / "k")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "k" / "card-signing.pem").exists()
    assert "JETMESH_CARD_VERIFY_KEY" in out.output
    again = runner.invoke(_app(), ["keys", "generate", str(tmp_path / "k")])
    assert again.exit_code == 1
