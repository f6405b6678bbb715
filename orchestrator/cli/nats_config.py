"""`jetmesh nats-config`: a nats-server configuration with one user per role.

The permissions come from `jetmesh.bus.permissions`; this module only resolves the
agents, keeps passwords stable across regenerations and writes the files (mode 0600).

`jetmesh up` uses the same files in its data directory (`write_data_dir_auth`): the
server includes `nats-auth.conf`, each child gets its role's block of `nats-auth.env`,
and the CLI's commands run against that mesh find their credentials there
(`use_data_dir_credentials`: admin for most, approver for `approve` / `deny`).
`JETMESH_NATS_AUTH_ENV` names such an env file elsewhere (docker-compose.yml mounts the
one its `nats-auth` service writes).

`--format kubernetes` writes the same users as Kubernetes Secrets (`kubernetes_secrets`):
one holding the server's `authorization` section (`auth.conf`, which the NATS
StatefulSet of deploy/kubernetes includes) and one per role with its NATS_USER /
NATS_PASSWORD / NATS_INBOX_PREFIX (each pod takes its role's with `envFrom`).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from jetmesh.bus.credentials import (
    AUTH_CONF,
    AUTH_ENV,
    AUTH_ENV_VAR,
    CREDENTIAL_VARS,
    credentials_in,
    read_env_blocks,
)
from jetmesh.bus.permissions import ROLE_ADMIN, AuthConfig, Options
from jetmesh.bus.tenancy import tenant_user
from jetmesh.orchestrator.cli.kit import load_object

err = Console(stderr=True)

_ENV_LINE = re.compile(r"^(NATS_USER|NATS_PASSWORD)=(.*)$")

FORMATS = ("nats", "kubernetes")
K8S_SERVER_SECRET = "jetmesh-nats-server-auth"
"""The Secret with the server's `authorization` section, under the key `K8S_AUTH_KEY`."""
K8S_AUTH_KEY = "auth.conf"
K8S_SECRET_PREFIX = "jetmesh-nats-"
"""A role's Secret is this prefix and its user (`jetmesh-nats-agent-orders`)."""
K8S_LABEL_USER = "jetmesh.dev/nats-user"
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")


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
            spec = load_object(item)
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


ROLE_COMMANDS = {"orchestrator": "orchestrator", "memory": "memory", "gateway": "gateway",
                 "bridge": "bridge", "approve": "approver", "deny": "approver",
                 "telemetry": "telemetry"}
"""CLI commands that run as a role of their own (the rest run as the admin)."""


def _current_context() -> Any:
    """The running command's click context: typer 0.22+ runs its own copy of click
    (`typer._click`), whose context stack `click.get_current_context` does not see."""
    import importlib

    for name in ("typer._click.globals", "click"):
        try:
            ctx = importlib.import_module(name).get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            return ctx
    return None


def user_for_command() -> str:
    """The user the running CLI command should log in as: a role's own (`jetmesh worker
    orders` as agent-orders, `jetmesh orchestrator` as orchestrator...), the approver for
    approve / deny, else the admin (the operator's commands)."""
    ctx = _current_context()
    name = ctx.info_name if ctx is not None else None
    if name == "worker" and ctx is not None:
        agent = str(ctx.params.get("agent") or "")
        return f"agent-{agent}"  # module:attr has no user of its own: none is found
    return ROLE_COMMANDS.get(name or "", ROLE_ADMIN)


def use_data_dir_credentials(data_dir: Path, user: str | None = None) -> bool:
    """For the CLI run against a `jetmesh up` mesh: when no credentials are set in the
    environment (NATS_USER, NATS_CREDS), take `user`'s (default: `user_for_command()`)
    from the data directory, or from the env file `JETMESH_NATS_AUTH_ENV` names. True
    when it set them."""
    if any(os.environ.get(v) for v in ("NATS_USER", "NATS_CREDS", "JETMESH_NATS_CREDS")):
        return False
    who = user or user_for_command()
    named = os.environ.get(AUTH_ENV_VAR)
    found = (read_env_blocks(Path(named)).get(who) if named
             else credentials_in(data_dir, who))
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


# ----------------------------------------------------------------------------- kubernetes


def k8s_secret_name(user: str) -> str:
    """The Secret of `user`'s credentials: a DNS label (`jetmesh-nats-agent-orders`)."""
    label = _DNS_LABEL.sub("-", user.lower()).strip("-")
    name = f"{K8S_SECRET_PREFIX}{label}"
    if not label or len(name) > 63:
        raise ValueError(f"user {user!r} makes no valid Kubernetes name ({name!r})")
    return name


def _secret(name: str, data: dict[str, str], namespace: str | None,
            labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/part-of": "jetmesh",
                      "app.kubernetes.io/managed-by": "jetmesh-nats-config", **labels}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "stringData": data}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the server's auth section) as `|` blocks."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_block)


def kubernetes_secrets(auth: AuthConfig, namespace: str | None = None,
                       url: str | None = None) -> str:
    """The users of `auth` as Kubernetes Secrets, one YAML stream: the server's
    `authorization` section (`K8S_SERVER_SECRET`, key `K8S_AUTH_KEY`), then one Secret
    per role (`k8s_secret_name(user)`) with its NATS_* variables (and NATS_URL if
    given)."""
    docs = [_secret(K8S_SERVER_SECRET, {K8S_AUTH_KEY: auth.server_config()}, namespace,
                    {"app.kubernetes.io/component": "nats"})]
    for u in auth.users:
        data = {}
        if url:
            data["NATS_URL"] = url
        data.update({"NATS_USER": u.user, "NATS_PASSWORD": auth.passwords[u.user],
                     "NATS_INBOX_PREFIX": u.inbox_prefix})
        docs.append(_secret(k8s_secret_name(u.user), data, namespace,
                            {K8S_LABEL_USER: u.user}))
    for t in auth.tenants:  # each tenant's own account (bus.tenancy): its user's login
        user = tenant_user(t)
        data = {"NATS_URL": url} if url else {}
        data.update({"NATS_USER": user, "NATS_PASSWORD": auth.passwords[user]})
        docs.append(_secret(k8s_secret_name(user), data, namespace, {K8S_LABEL_USER: user}))
    head = ("# jetmesh bus credentials as Kubernetes Secrets: one user per role. Keep this "
            "file secret.\n# Generated by `jetmesh nats-config --format kubernetes`; run "
            "it again when agents\n# or skills change (passwords already here are kept).\n")
    return head + yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False,
                                explicit_start=True, width=100)


def read_kubernetes_passwords(path: Path) -> dict[str, str]:
    """User -> password from Secrets this command wrote before (stringData or data)."""
    found: dict[str, str] = {}
    if not path.exists():
        return found
    for doc in yaml.safe_load_all(path.read_text()):
        if not isinstance(doc, dict) or doc.get("kind") != "Secret":
            continue
        values = {str(k): str(v) for k, v in (doc.get("stringData") or {}).items()}
        for k, v in (doc.get("data") or {}).items():
            values.setdefault(str(k), base64.b64decode(str(v)).decode())
        if "NATS_USER" in values and "NATS_PASSWORD" in values:
            found[values["NATS_USER"]] = values["NATS_PASSWORD"]
    return found


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
        fmt: Annotated[str, typer.Option(
            "--format", help="nats: a server config section and env blocks; kubernetes: "
                             "Secrets (the server's auth.conf and one per role) in one "
                             "YAML file (--out, else stdout).")] = "nats",
        namespace: Annotated[str | None, typer.Option(
            "--namespace", help="kubernetes: the Secrets' namespace (default: none, "
                                "kustomize's or kubectl's).")] = None,
        tenants: Annotated[str | None, typer.Option(
            "--tenants", help="Comma-separated tenants that connect to NATS directly: each "
                              "gets an account of its own importing only its own submit, "
                              "memory, task reads and task events from the mesh's account "
                              "(bus.tenancy); the roles' users move into that account.")
        ] = None,
    ) -> None:
        """Write a nats-server configuration with one user per role (admin, approver,
        orchestrator, each agent, bridge, memory, gateway), each allowed only its own
        subjects."""
        if fmt not in FORMATS:
            raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
        resolved = resolve_agents(agents.split(",") if agents else None)
        options = Options(private_inboxes=not shared_inbox,
                          agents_write_control=agents_write_control,
                          legacy_consumer_create=legacy_consumers)
        tenant_ids = [t for t in (tenants or "").split(",") if t.strip()]
        if fmt == "kubernetes":
            if env_out is not None or embedded:
                raise typer.BadParameter("--env-out and --embedded are for --format nats")
            _write_kubernetes(out, resolved, options, url, namespace, rotate, tenant_ids)
            return
        env_path = env_out or (out.with_name(out.name + ".env") if out else None)
        keep = {} if rotate or env_path is None else read_passwords(env_path)
        try:
            auth = AuthConfig.create(resolved, options, passwords=keep, tenants=tenant_ids)
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


def _write_kubernetes(out: Path | None, agents: dict[str, list[str]], options: Options,
                      url: str | None, namespace: str | None, rotate: bool,
                      tenants: Sequence[str] = ()) -> None:
    keep = {} if rotate or out is None else read_kubernetes_passwords(out)
    try:
        auth = AuthConfig.create(agents, options, passwords=keep, tenants=tenants)
        text = kubernetes_secrets(auth, namespace, url)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if out is None:
        typer.echo(text, nl=False)
        return
    _write_secret(out, text)
    kept = sum(1 for u in auth.users if u.user in keep)
    err.print(f"wrote {out} ({len(auth.users) + 1} Secrets, mode 600; {kept} password(s) "
              f"kept, {len(auth.users) - kept} new)")
