"""`jetmesh health ROLE [AGENT]`: is this role's process serving? One line, exit 0 or 1.

Container health checks call it (the Dockerfile's HEALTHCHECK runs `jetmesh health`
with no arguments: the role comes from JETMESH_ROLE / JETMESH_AGENT, else from the
container's main command line, `/proc/1/cmdline`). What each role must show:

- every NATS role: the server is reachable within the timeout and JetStream answers;
- ``orchestrator`` (and ``up``): its three durable consumers exist;
- ``worker AGENT``: the work consumer of each of the agent's skills exists, and a
  replica of AGENT on this host has heartbeated into the registry within the TTL
  (``--any-host`` accepts any live replica, for checks run from elsewhere);
- ``memory``: something answers the memory request subject (no responders = down);
- ``gateway``: its agent card is served over HTTP;
- ``nats``: JetStream answers.

Exit codes: 0 healthy, 1 unhealthy, 2 usage error (unknown role or agent, no role).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from jetmesh.bus import subjects
from jetmesh.bus.settings import DATA_DIR_ENV, DEFAULT_DATA_DIR, GATEWAY_PORT, GATEWAY_PORT_ENV
from jetmesh.orchestrator.cli.kit import load_object, loop_run

ROLES = ("orchestrator", "worker", "memory", "gateway", "nats", "up", "telemetry")
DEFAULT_GATEWAY_PORT = GATEWAY_PORT
HEALTHY, UNHEALTHY, USAGE = 0, 1, 2


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str

    @property
    def exit_code(self) -> int:
        return HEALTHY if self.ok else UNHEALTHY

    def line(self) -> str:
        return f"{'healthy' if self.ok else 'unhealthy'}: {self.reason}"


class UsageError(Exception):
    """The check cannot even be attempted (unknown role, unknown agent, no role)."""


# ----------------------------------------------------------------------------- role


def role_from_cmdline(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """(role, agent) from a `jetmesh ROLE [AGENT] [options]` command line, else None."""
    for i, arg in enumerate(argv):
        if Path(arg).name != "jetmesh":
            continue
        rest = [a for a in argv[i + 1:] if not a.startswith("-")]
        if not rest or rest[0] not in ROLES:
            return None
        if rest[0] == "worker":
            return "worker", rest[1] if len(rest) > 1 else None
        return rest[0], None
    return None


def _pid1_cmdline() -> list[str]:
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def resolve_role(role: str | None, agent: str | None,
                 cmdline: Sequence[str] | None = None) -> tuple[str, str | None]:
    """The role to check: as given, else from the main process's command line."""
    if not role:
        found = role_from_cmdline(_pid1_cmdline() if cmdline is None else cmdline)
        if found is None:
            raise UsageError("no role: pass ROLE (orchestrator, worker AGENT, memory, gateway) "
                             "or set JETMESH_ROLE")
        role, agent = found[0], agent or found[1]
    if role not in ROLES:
        raise UsageError(f"unknown role '{role}'; expected one of {', '.join(ROLES)}")
    if role == "worker" and not agent:
        raise UsageError("role worker needs AGENT (or JETMESH_AGENT)")
    return role, agent


def _agent_skills(agent: str) -> list[str]:
    """Skill ids of a built-in agent, or of `package.module:attr` naming an AgentSpec."""
    if ":" in agent:
        try:
            spec: Any = load_object(agent)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"cannot load agent {agent}: {e}") from e
    else:
        from jetmesh.agents.builtin import BUILTIN_AGENTS, builtin_names

        if agent not in BUILTIN_AGENTS:
            raise UsageError(f"unknown agent '{agent}'; built-in: {', '.join(builtin_names())}")
        spec = BUILTIN_AGENTS[agent]
    return [s.id for s in spec.skills]


# ----------------------------------------------------------------------------- checks


async def check(
    role: str, agent: str | None = None, *, url: str | None = None, timeout_s: float = 3.0,
    gateway_url: str | None = None, any_host: bool = False, agent_ttl_s: float = 5.0,
) -> Health:
    """Check one role. Raises UsageError for an unknown role or agent."""
    role, agent = resolve_role(role, agent, cmdline=())
    if role == "gateway":
        return await check_gateway(gateway_url or default_gateway_url(), timeout_s)
    skills = _agent_skills(agent) if role == "worker" and agent else []
    if not url:
        return Health(False, "NATS_URL is not set")
    try:
        return await asyncio.wait_for(
            _check_nats_role(role, agent, skills, url, timeout_s, any_host, agent_ttl_s),
            timeout_s * 2 + 1)
    except TimeoutError:
        return Health(False, f"{role}: no answer from NATS within {timeout_s * 2 + 1:g}s")


def default_gateway_url() -> str:
    port = os.environ.get(GATEWAY_PORT_ENV) or str(DEFAULT_GATEWAY_PORT)
    return f"http://127.0.0.1:{port}/.well-known/agent-card.json"


async def check_gateway(url: str, timeout_s: float) -> Health:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            r = await http.get(url)
    except httpx.HTTPError as e:
        return Health(False, f"gateway: GET {url}: {type(e).__name__}: {e}")
    if r.status_code != 200:
        return Health(False, f"gateway: GET {url} returned {r.status_code}")
    try:
        card = r.json()
    except ValueError:
        return Health(False, f"gateway: {url} is not JSON")
    name = card.get("name") if isinstance(card, dict) else None
    if not name:
        return Health(False, f"gateway: {url} is not an agent card (no name)")
    return Health(True, f"gateway serves the card of '{name}' at {url}")


async def _check_nats_role(role: str, agent: str | None, skills: list[str], url: str,
                           timeout_s: float, any_host: bool, agent_ttl_s: float) -> Health:
    from nats.js.errors import NotFoundError

    from jetmesh.bus.connection import connect
    from jetmesh.bus.errors import NotConnectedError
    from jetmesh.bus.settings import BusSettings

    settings = BusSettings(connect_timeout_s=timeout_s, request_timeout_s=timeout_s)
    try:
        # nats-py treats max_reconnect_attempts=0 as "forever"; 1 = one retry per server.
        nc = await connect(url, settings=settings, name=f"jetmesh-health-{role}",
                           allow_reconnect=False, max_reconnect_attempts=1,
                           reconnect_time_wait=0.1)
    except NotConnectedError as e:
        return Health(False, f"{role}: {e}")
    try:
        js = nc.jetstream(timeout=timeout_s)
        try:
            await js.account_info()
        except Exception as e:
            return Health(False, f"{role}: JetStream does not answer at {url}: "
                                 f"{type(e).__name__}: {e}")

        consumers: list[tuple[str, str]] = []
        if role in ("orchestrator", "up"):
            consumers = [(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
                         (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS),
                         (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL),
                         (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_APPROVALS)]
        elif role == "worker":
            consumers = [(subjects.STREAM_WORK, subjects.work_consumer(s)) for s in skills]
        elif role == "telemetry":
            consumers = [(subjects.STREAM_LEDGER, subjects.CONSUMER_TELEMETRY)]
        for stream, durable in consumers:
            try:
                await js.consumer_info(stream, durable)
            except NotFoundError:
                return Health(False, f"{role}: consumer {durable} on {stream} does not exist")
            except Exception as e:
                return Health(False, f"{role}: consumer {durable} on {stream}: "
                                     f"{type(e).__name__}: {e}")

        if role == "worker":
            assert agent is not None
            return await _check_presence(js, agent, skills, any_host, agent_ttl_s)
        if role == "memory":
            return await _check_memory(nc, timeout_s)
        if role == "nats":
            return Health(True, f"JetStream answers at {url}")
        if role == "telemetry":
            return Health(True, f"telemetry consumer present at {url}")
        return Health(True, f"orchestrator consumers present at {url}")
    finally:
        await nc.close()


async def _check_presence(js: Any, agent: str, skills: list[str], any_host: bool,
                          ttl_s: float) -> Health:
    """A replica of `agent` (on this host unless any_host) heartbeated within `ttl_s`."""
    from nats.js.errors import BucketNotFoundError, NotFoundError

    from jetmesh.bus.kvscan import current_entries

    try:
        await js.key_value(subjects.BUCKET_AGENTS)
    except (BucketNotFoundError, NotFoundError):
        return Health(False, f"worker {agent}: registry bucket {subjects.BUCKET_AGENTS} "
                             "does not exist")
    prefix = f"{agent}." if any_host else f"{agent}.{socket.gethostname()}-"
    newest: datetime | None = None
    for entry in await current_entries(js, subjects.BUCKET_AGENTS, f"{agent}.>"):
        if entry.key.startswith(prefix) and entry.created is not None and (
                newest is None or entry.created > newest):
            newest = entry.created
    where = "anywhere" if any_host else f"on {socket.gethostname()}"
    if newest is None:
        return Health(False, f"worker {agent}: no replica registered {where}")
    age = datetime.now(UTC) - newest
    if age > timedelta(seconds=ttl_s):
        return Health(False, f"worker {agent}: last heartbeat {where} "
                             f"{age.total_seconds():.1f}s ago (ttl {ttl_s:g}s)")
    return Health(True, f"worker {agent}: consumers for {', '.join(skills)} present, "
                        f"heartbeat {age.total_seconds():.1f}s ago")


async def _check_memory(nc: Any, timeout_s: float) -> Health:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeoutError

    subject = subjects.memory("search")
    probe = json.dumps({"query": "", "limit": 1, "health": True}).encode()
    try:
        await nc.request(subject, probe, timeout=min(timeout_s, 1.0))
    except NoRespondersError:
        return Health(False, f"memory: no service answers on {subject}")
    except (NatsTimeoutError, TimeoutError):
        # Someone is subscribed (else the server would have said no responders) but
        # busy: serving, if slowly.
        return Health(True, f"memory: {subject} has responders (no reply within "
                            f"{min(timeout_s, 1.0):g}s)")
    return Health(True, f"memory: {subject} answers")


# ----------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    """Add the `health` command to the jetmesh CLI."""

    @app.command("health")
    def health_cmd(
        role: Annotated[str | None, typer.Argument(
            envvar="JETMESH_ROLE", show_default=False,
            help="orchestrator, worker, memory, gateway or nats (default: JETMESH_ROLE, "
                 "else the role of this container's main command).")] = None,
        agent: Annotated[str | None, typer.Argument(
            envvar="JETMESH_AGENT", show_default=False,
            help="For worker: the agent (built-in name or module:attr).")] = None,
        url: Annotated[str | None, typer.Option(
            "--url", envvar="NATS_URL", help="NATS server URL(s).")] = None,
        data_dir: Annotated[Path, typer.Option(
            "--data-dir", envvar=DATA_DIR_ENV,
            help="Find an embedded server here when NATS_URL is unset.")] = DEFAULT_DATA_DIR,
        timeout: Annotated[float, typer.Option(
            "--timeout", envvar="JETMESH_HEALTH_TIMEOUT_S",
            help="Seconds to wait for NATS / HTTP.")] = 3.0,
        gateway_url: Annotated[str | None, typer.Option(
            "--gateway-url", help="Agent card URL (default: 127.0.0.1:"
                                  f"${GATEWAY_PORT_ENV}, {GATEWAY_PORT}).")] = None,
        any_host: Annotated[bool, typer.Option(
            "--any-host", help="worker: accept a live replica on any host.")] = False,
        agent_ttl: Annotated[float, typer.Option(
            "--ttl", envvar="JETMESH_AGENT_TTL_S",
            help="worker: a heartbeat older than this is stale.")] = 5.0,
    ) -> None:
        """Check that a role is serving: exit 0 healthy, 1 unhealthy (one line why)."""
        from jetmesh.bus.server import discover_url

        try:
            r, a = resolve_role(role, agent)
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(USAGE) from None
        from jetmesh.orchestrator.cli.nats_config import use_data_dir_credentials

        # Against a `jetmesh up` mesh with no credentials set: the admin's (read only).
        use_data_dir_credentials(data_dir)
        target = url or discover_url(data_dir)
        try:
            result = loop_run(check(r, a, url=target, timeout_s=timeout,
                                       gateway_url=gateway_url, any_host=any_host,
                                       agent_ttl_s=agent_ttl))
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(USAGE) from None
        typer.echo(result.line())
        raise typer.Exit(result.exit_code)
