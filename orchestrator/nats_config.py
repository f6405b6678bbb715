"""`jetmesh nats-config`: a nats-server configuration with one user per role.

The permissions come from `jetmesh.bus.permissions`; this module only resolves the
agents, keeps passwords stable across regenerations and writes the files (mode 0600).

`jetmesh up` uses the same files in its data directory (`write_data_dir_auth`): the
server includes `nats-auth.conf`, each child gets its role's block of `nats-auth.env`,
and the CLI's commands run against that mesh find their credentials there
(`use_data_dir_credentials`: admin for most, approver for `approve` / `deny`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jetmesh.bus.permissions import ROLE_ADMIN, AuthConfig, Options

err = Console(stderr=True)

_ENV_LINE = re.compile(r"^(NATS_USER|NATS_PASSWORD)=(.*)$")
_ANY_ENV_LINE = re.compile(r"^(NATS_[A-Z_]+)=(.*)$")

AUTH_CONF = "nats-auth.conf"
"""In a data directory: the server's `authorization` section (`jetmesh up`)."""
AUTH_ENV = "nats-auth.env"
"""In a data directory: every role's NATS_USER / NATS_PASSWORD / NATS_INBOX_PREFIX."""
CREDENTIAL_VARS = ("NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX")


def resolve_agents(items: Sequence[str] | None) -> dict[str, list[str]]:
    """Agent name -> skill ids. Each item: a built-in name, `module:attr` of an AgentSpec,
    or `name=skill+skill` for an agent this process cannot import. Default: every
    built-in agent."""
    from jetmesh.agents.builtin import BUILTIN_AGENTS, builtin_names

    if not items:
        return {n: [s.id for s in spec.skills] for n, spec in BUILTIN_AGENTS.items()}
    out: dict[str, list[str]] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if "=" in item:
            name, _, skills = item.partition("=")
            out[name.strip()] = [s.strip() for s in skills.split("+") if s.strip()]
        elif ":" in item:
            import importlib

            mod, _, attr = item.partition(":")
            spec = getattr(importlib.import_module(mod), attr)
            out[spec.name] = [s.id for s in spec.skills]
        elif item in BUILTIN_AGENTS:
            out[item] = [s.id for s in BUILTIN_AGENTS[item].skills]
        else:
            raise typer.BadParameter(
                f"unknown agent {item!r}: use a built-in name ({', '.join(builtin_names())}), "
                "module:attr, or name=skill+skill")
    return out


def read_passwords(env_file: Path) -> dict[str, str]:
    """User -> password from an env file this command wrote before (to keep them)."""
    found: dict[str, str] = {}
    user: str | None = None
    if not env_file.exists():
        return found
    for line in env_file.read_text().splitlines():
        m = _ENV_LINE.match(line.strip())
        if not m:
            continue
        if m.group(1) == "NATS_USER":
            user = m.group(2)
        elif user is not None:
            found[user] = m.group(2)
            user = None
    return found


def read_env_blocks(env_file: Path) -> dict[str, dict[str, str]]:
    """User -> its block's NATS_* variables, from an env file this module wrote."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    if not env_file.exists():
        return blocks
    for line in env_file.read_text().splitlines():
        m = _ANY_ENV_LINE.match(line.strip())
        if not m:
            continue
        name, value = m.group(1), m.group(2)
        if name == "NATS_USER":
            current = {}
            blocks[value] = current
        current[name] = value
    return blocks


def write_data_dir_auth(data_dir: Path, agents: dict[str, list[str]],
                        options: Options | None = None) -> tuple[AuthConfig, Path, Path]:
    """The users of a `jetmesh up` mesh in `data_dir` (passwords kept from an earlier run,
    so children restarted alone still log in): (auth, config path, env path), both files
    mode 0600."""
    conf, env = data_dir / AUTH_CONF, data_dir / AUTH_ENV
    auth = AuthConfig.create(agents, options, passwords=read_passwords(env))
    _write_secret(conf, auth.server_config())
    _write_secret(env, auth.env_file())
    return auth, conf, env


def credentials_in(data_dir: Path, user: str) -> dict[str, str] | None:
    """The NATS_* variables of `user` from a `jetmesh up` data directory, if it has them."""
    return read_env_blocks(data_dir / AUTH_ENV).get(user)


ROLE_COMMANDS = {"orchestrator": "orchestrator", "memory": "memory", "gateway": "gateway",
                 "bridge": "bridge", "approve": "approver", "deny": "approver",
                 "telemetry": "telemetry"}
"""CLI commands that run as a role of their own (the rest run as the admin)."""


def user_for_command() -> str:
    """The user the running CLI command should log in as: a role's own (`jetmesh worker
    orders` as agent-orders, `jetmesh orchestrator` as orchestrator...), the approver for
    approve / deny, else the admin (the operator's commands)."""
    import click

    ctx = click.get_current_context(silent=True)
    name = ctx.info_name if ctx is not None else None
    if name == "worker" and ctx is not None:
        agent = str(ctx.params.get("agent") or "")
        return f"agent-{agent}"  # module:attr has no user of its own: none is found
    return ROLE_COMMANDS.get(name or "", ROLE_ADMIN)


def use_data_dir_credentials(data_dir: Path, user: str | None = None) -> bool:
    """For the CLI run against a `jetmesh up` mesh: when no credentials are set in the
    environment (NATS_USER, NATS_CREDS), take `user`'s (default: `user_for_command()`)
    from the data directory. True when it set them."""
    if any(os.environ.get(v) for v in ("NATS_USER", "NATS_CREDS", "JETMESH_NATS_CREDS")):
        return False
    found = credentials_in(data_dir, user or user_for_command())
    if not found:
        return False
    for name in CREDENTIAL_VARS:
        if name in found:
            os.environ[name] = found[name]
    return True


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def embedded_instructions(config_file: Path | None, env_file: Path | None) -> str:
    conf = str(config_file) if config_file else "nats-auth.conf"
    env = str(env_file) if env_file else "nats-auth.env"
    return f"""\
Run the embedded server with these users (the section is appended verbatim to
the generated server configuration):

    from pathlib import Path
    from jetmesh.bus.server import EmbeddedNats
    server = EmbeddedNats(data_dir=Path(".jetmesh/nats"), port=4222,
                          extra_config=Path("{conf}").read_text())
    server.start()

Or a standalone nats-server: add `include "{conf}"` to its configuration.

Then start each role with its block of {env}
(NATS_USER, NATS_PASSWORD, NATS_INBOX_PREFIX): the admin block for `jetmesh`
operator commands, `approver` for `jetmesh approve` / `deny`, `orchestrator` for
`jetmesh orchestrator`, `agent-<name>` for `jetmesh worker <name>`, `bridge`,
`memory`, `gateway`. Declare the streams and buckets
as admin (or start the orchestrator) before the agents: agents only read them.
"""


def register(app: typer.Typer) -> None:
    """Add the `nats-config` command to the jetmesh CLI."""

    @app.command("nats-config")
    def nats_config_cmd(
        out: Annotated[Path | None, typer.Option(
            "--out", "-o", help="Write the server configuration section here (default: "
                                "stdout).")] = None,
        env_out: Annotated[Path | None, typer.Option(
            "--env-out", help="Write the per-role NATS_USER / NATS_PASSWORD env blocks here "
                              "(default: <out>.env; stderr without --out).")] = None,
        agents: Annotated[str | None, typer.Option(
            "--agents", help="Comma-separated agents: built-in names, module:attr, or "
                             "name=skill+skill (default: every built-in agent).")] = None,
        url: Annotated[str | None, typer.Option(
            "--url", help="Also write NATS_URL into each env block.")] = None,
        rotate: Annotated[bool, typer.Option(
            "--rotate", help="New passwords for every user (default: keep those already "
                             "in the env file).")] = False,
        shared_inbox: Annotated[bool, typer.Option(
            "--shared-inbox", help="Let every user subscribe to _INBOX.> (clients that "
                                   "cannot set an inbox prefix; users can then read "
                                   "each other's replies).")] = False,
        agents_write_control: Annotated[bool, typer.Option(
            "--agents-write-control", help="Let agents append to task control subjects "
                                           "(cancel tasks; approvals stay the approver's).")
        ] = False,
        legacy_consumers: Annotated[bool, typer.Option(
            "--legacy-consumers", help="Also allow consumer creation by durable name "
                                       "(CONSUMER.DURABLE.CREATE, filter in the body) for "
                                       "older clients; lets a role re-point its own durable "
                                       "at another subject.")] = False,
        _strict_consumers: Annotated[bool, typer.Option(
            "--strict-consumers", hidden=True,
            help="The default now; kept so that existing scripts still run.")] = False,
        embedded: Annotated[bool, typer.Option(
            "--embedded", help="Also print how to run the embedded server with it.")
        ] = False,
    ) -> None:
        """Write a nats-server configuration with one user per role (admin, approver,
        orchestrator, each agent, bridge, memory, gateway), each allowed only its own
        subjects."""
        resolved = resolve_agents(agents.split(",") if agents else None)
        options = Options(private_inboxes=not shared_inbox,
                          agents_write_control=agents_write_control,
                          legacy_consumer_create=legacy_consumers)
        env_path = env_out or (out.with_name(out.name + ".env") if out else None)
        keep = {} if rotate or env_path is None else read_passwords(env_path)
        try:
            auth = AuthConfig.create(resolved, options, passwords=keep)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        config = auth.server_config()
        env = auth.env_file(url)
        if out is None:
            typer.echo(config, nl=False)
        else:
            _write_secret(out, config)
            err.print(f"wrote {out} ({len(auth.users)} users: "
                      f"{', '.join(u.user for u in auth.users)})")
        if env_path is None:
            typer.echo(env, err=True, nl=False)
        else:
            _write_secret(env_path, env)
            kept = sum(1 for u in auth.users if u.user in keep)
            err.print(f"wrote {env_path} (mode 600; {kept} password(s) kept, "
                      f"{len(auth.users) - kept} new)")
        if embedded:
            typer.echo(embedded_instructions(out, env_path), err=True, nl=False)
