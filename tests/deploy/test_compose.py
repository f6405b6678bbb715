"""docker-compose.yml and the Dockerfile, checked here without a Docker engine.

- docker-compose.yml is valid against the Compose Specification JSON schema (the copy
  vendored by check-jsonschema), after the same `${VAR:-default}` interpolation Compose
  does: it stands in for `docker compose config`;
- every service command is a real `jetmesh` command whose arguments parse;
- every environment variable the code reads is set in compose or has a default, and
  every variable compose sets is one the code reads (a typo would be silently ignored);
- the Dockerfile's entry point is the console script pyproject.toml declares, and the
  build context (.dockerignore) keeps what the wheel build needs.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml
from pydantic_settings import BaseSettings

from jetmesh.agents.builtin import builtin_names
from jetmesh.orchestrator.cli import health

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PACKAGE_DIRS = ["agents", "bus", "memory", "orchestrator", "a2a"]

# Commands that other parts of jetmesh add to the CLI: until they are registered, the
# checks of the services running them are skipped (and start passing once they land).
ADDED_LATER = {"memory", "gateway", "health"}

# Settings classes whose fields are read from the environment. The optional ones belong
# to parts that may not be importable yet.
SETTINGS_CLASSES = [
    "jetmesh.bus.settings:BusSettings",
    "jetmesh.orchestrator.service:OrchestratorSettings",
    "jetmesh.memory.settings:MemorySettings",
    "jetmesh.agents.models.factory:ModelSettings",
]
OPTIONAL_SETTINGS_CLASSES = [
    "jetmesh.a2a.gateway:GatewaySettings",
    "jetmesh.agents.signing:SigningSettings",
    "jetmesh.memory.tools:MemoryToolSettings",
]
# Read by libraries or the runtime, not by jetmesh's own settings.
EXTERNAL_ENV = {"PATH", "HOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "MEM0_TELEMETRY"}


# ----------------------------------------------------------------------------- loading


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())  # resolves anchors and `<<` merges
    assert isinstance(data, dict)
    return data


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])"
                  r"(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        have = env.get(name)
        if op == ":-":
            return have if have else arg
        if op == "-":
            return have if have is not None else arg
        if op in (":?", "?"):
            if not have:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return have
        if op in (":+", "+"):
            return arg if have else ""
        return have or ""

    return _VAR.sub(sub, value)


def compose_schema() -> dict[str, Any]:
    try:
        from importlib.resources import files

        text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
                ).read_text()
    except ModuleNotFoundError:
        pytest.skip("the Compose Specification schema comes with check-jsonschema "
                    "(pip install -e '.[dev]')")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _jetmesh_image(svc: dict[str, Any]) -> bool:
    return bool(svc.get("build") or str(svc.get("image", "")).startswith("${JETMESH_IMAGE"))


def one_shot(svc: dict[str, Any]) -> bool:
    """A job that runs to completion on `up` (nats-auth), not a role that serves."""
    return str(svc.get("restart", "")) == "no"


def jetmesh_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run a jetmesh role from the jetmesh image."""
    return {name: svc for name, svc in data["services"].items()
            if _jetmesh_image(svc) and not one_shot(svc)}


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def cli() -> Any:
    """The jetmesh CLI as a command group (typer's own click: checked by duck typing)."""
    from jetmesh.orchestrator.cli import app

    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return group


# ----------------------------------------------------------------------------- schema


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    from jsonschema import Draft202012Validator

    schema = compose_schema()
    Draft202012Validator.check_schema(schema)
    data = interpolate(compose(), env={})
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: e.path)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_check_catches_mistakes() -> None:
    """The validation is real: a misspelt key or a wrong type is reported."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(compose_schema())
    data = interpolate(compose(), env={})
    data["services"]["orders"]["helthcheck"] = {"test": ["CMD", "true"]}
    data["services"]["nats"]["ports"] = "4222"
    paths = {"/".join(map(str, e.path)) for e in validator.iter_errors(data)}
    assert paths & {"services/orders", "services/orders/helthcheck"}
    assert "services/nats/ports" in paths


def test_interpolation_matches_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$HOME ${UNSET}", env) == \
        "x d  d $HOME "


# ----------------------------------------------------------------------------- commands


def service_commands() -> Iterator[tuple[str, list[str]]]:
    for name, svc in jetmesh_services(compose()).items():
        cmd = svc.get("command")
        assert isinstance(cmd, list) and cmd, f"{name}: command must be an exec-form list"
        yield name, [str(c) for c in cmd]


@pytest.mark.parametrize(("service", "command"), list(service_commands()),
                         ids=[s for s, _ in service_commands()])
def test_every_service_command_is_a_jetmesh_command_that_parses(
        service: str, command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    group = cli()
    name, args = command[0], command[1:]
    if name not in group.commands:
        if name in ADDED_LATER:
            pytest.skip(f"`jetmesh {name}` is not registered in the CLI yet (service "
                        f"{service}); this check runs once it is")
        pytest.fail(f"service {service}: `jetmesh {name}` is not a jetmesh command; "
                    f"known: {', '.join(sorted(group.commands))}")
    for key, value in env_of(compose()["services"][service]).items():
        monkeypatch.setenv(key, interpolate(value, {}))
    sub = group.commands[name]
    # Parse exactly as the container would, without running the command.
    ctx = sub.make_context(f"jetmesh {name}", list(args))
    if name == "worker":
        agent = ctx.params["agent"]
        assert agent in builtin_names() or ":" in agent, f"{service}: unknown agent {agent}"
    # The image's HEALTHCHECK (`jetmesh health` with no arguments) finds the role from
    # the container's command line, whatever the init process in front of it.
    role = health.role_from_cmdline(["/sbin/docker-init", "--", "/opt/jetmesh/bin/python",
                                     "/opt/jetmesh/bin/jetmesh", *command])
    assert role is not None and role[0] == name, (service, role)


def test_every_builtin_agent_has_a_scalable_worker_service() -> None:
    services = compose()["services"]
    workers = {svc["command"][1]: name for name, svc in services.items()
               if svc.get("command", [None])[0] == "worker"}
    assert set(workers) == set(builtin_names())
    for agent, name in workers.items():
        svc = services[name]
        # `docker compose up --scale NAME=3` needs no fixed container name or host port.
        assert "container_name" not in svc, name
        assert "ports" not in svc, name
        assert svc["healthcheck"]["test"] == ["CMD", "jetmesh", "health"], name
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy", name
        assert name == agent


def test_healthcheck_command_is_registered() -> None:
    if "health" not in cli().commands:
        pytest.skip("`jetmesh health` is not registered in orchestrator/cli/ yet "
                    "(add: register_health(app))")
    from typer.testing import CliRunner

    from jetmesh.orchestrator.cli import app

    result = CliRunner().invoke(app, ["health", "--help"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- services


def test_services_start_in_order_with_health_checks() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if one_shot(svc):
            continue  # runs to completion; what waits on it waits for that
        assert "healthcheck" in svc, f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
            if cond.get("condition") == "service_completed_successfully":
                assert one_shot(services[dep]), f"{name} waits for {dep} to finish"
    order = {"orchestrator": {"nats"}, "memory": {"nats", "qdrant"},
             "gateway": {"nats", "orchestrator"}}
    for name, deps in order.items():
        assert deps <= set(services[name]["depends_on"]), name


def test_nats_runs_jetstream_with_fsync_always_and_monitoring() -> None:
    data = compose()
    nats = data["services"]["nats"]
    image = nats["image"]
    assert image.startswith("nats:") and re.match(r"nats:2\.(1[2-9]|[2-9]\d)\.\d+", image), \
        "pin a NATS 2.12+ release (read-after-write direct gets)"
    assert "--jetstream" in nats["command"] or "-js" in nats["command"]
    target = nats["configs"][0]["target"]
    assert nats["command"][nats["command"].index("--config") + 1] == target
    conf = data["configs"][nats["configs"][0]["source"]]["content"]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M)
    assert re.search(r"^\s*http:\s*0\.0\.0\.0:8222\s*$", conf, re.M)
    assert "jetstream {" in conf and "store_dir: /data/jetstream" in conf
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert "/healthz?js-enabled-only=true" in " ".join(nats["healthcheck"]["test"])
    assert any(p.endswith(":8222") for p in nats["ports"])


def test_qdrant_is_pinned_with_a_volume_and_memory_uses_it() -> None:
    services = compose()["services"]
    image = services["qdrant"]["image"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", image), image
    assert any(v.endswith(":/qdrant/storage") for v in services["qdrant"]["volumes"])
    assert env_of(services["memory"])["QDRANT_URL"] == "http://qdrant:6333"


def test_gateway_is_published_on_8080() -> None:
    gw = compose()["services"]["gateway"]
    assert any(str(p).endswith(":8080") for p in gw["ports"])
    env = env_of(gw)
    assert env["JETMESH_GATEWAY_HOST"] == "0.0.0.0"  # inside a container: every interface
    assert env["JETMESH_GATEWAY_PORT"] == "8080"


def test_model_keys_pass_through_from_the_environment() -> None:
    for name, svc in jetmesh_services(compose()).items():
        env = env_of(svc)
        for key in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
            assert env.get(key) == f"${{{key}:-}}", f"{name}: {key}"
        assert interpolate(env["ANTHROPIC_API_KEY"], {"ANTHROPIC_API_KEY": "sk-x"}) == "sk-x"
        assert env["NATS_URL"] == "nats://nats:4222"
        assert env["JETMESH_REPLICAS"] == "${JETMESH_REPLICAS:-1}"


def test_jetmesh_services_use_the_dockerfile() -> None:
    images = set()
    for name, svc in jetmesh_services(compose()).items():
        build = svc["build"]
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == \
            DOCKERFILE, name
        images.add(svc["image"])
        assert svc.get("init") is True, f"{name}: an init process forwards SIGTERM"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert images == {"${JETMESH_IMAGE:-jetmesh:local}"}, "one image for every role"


# ----------------------------------------------------------------------------- environment


def _settings_classes() -> list[type[BaseSettings]]:
    out = []
    for ref in SETTINGS_CLASSES + OPTIONAL_SETTINGS_CLASSES:
        mod, _, attr = ref.partition(":")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            if ref in SETTINGS_CLASSES:
                raise
            continue
        out.append(cls)
    return out


def settings_env() -> dict[str, tuple[str, bool]]:
    """Env var -> (who reads it, required?) from every settings class's fields."""
    from pydantic import AliasChoices, AliasPath

    out: dict[str, tuple[str, bool]] = {}
    for cls in _settings_classes():
        prefix = str(cls.model_config.get("env_prefix") or "")
        for fname, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names = [c for c in alias.choices if isinstance(c, str)]
            elif isinstance(alias, str):
                names = [alias]
            elif isinstance(alias, AliasPath) or alias is None:
                names = [prefix + (field.alias or fname)]
                # A settings group also reads the older flat name (bus.settings.GroupSettings).
                legacy = getattr(cls, "legacy_env_prefix", None)
                if legacy:
                    names.append(str(legacy) + (field.alias or fname))
            else:
                names = []
            for n in names:
                out[n.upper()] = (f"{cls.__name__}.{fname}", field.is_required())
    return out


def cli_env() -> dict[str, tuple[str, bool]]:
    """Env var -> (command option, required?) from the CLI's `envvar=` options."""
    out: dict[str, tuple[str, bool]] = {}

    def walk(cmd: Any, path: str) -> None:
        for p in cmd.params:
            names = p.envvar if isinstance(p.envvar, list | tuple) else [p.envvar]
            for n in names:
                if n:
                    out[str(n)] = (f"{path} {p.name}", bool(p.required and p.default is None))
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")

    group = cli()
    if "health" not in group.commands:  # not registered yet: read its options anyway
        app = typer.Typer()

        @app.callback()
        def _root() -> None:
            pass

        health.register(app)
        walk(typer.main.get_command(app), "jetmesh")
    walk(group, "jetmesh")
    return out


def source_env() -> tuple[set[str], set[str]]:
    """(names the package sources mention as env vars, names read with no default)."""
    mentioned: set[str] = set()
    no_default: set[str] = set()
    name = r"((?:JETMESH|NATS|QDRANT|ANTHROPIC|OPENAI|MEM0|FASTEMBED|OTEL)_[A-Z0-9_]+)"
    for d in PACKAGE_DIRS:
        for py in (ROOT / d).rglob("*.py"):
            text = py.read_text()
            mentioned.update(re.findall(rf"[\"']{name}[\"']", text))
            # os.environ["X"] read (not assigned): no default, unless the file looks
            # for it first (`os.environ.get("X")`, `"X" in os.environ`).
            for var in re.findall(rf"os\.environ\[[\"']{name}[\"']\](?!\s*=[^=])", text):
                guarded = re.search(rf"os\.environ\.get\([\"']{var}[\"']|[\"']{var}[\"']"
                                    r"\s+in\s+os\.environ", text)
                if not guarded:
                    no_default.add(var)
    return mentioned, no_default


def test_every_variable_the_code_reads_is_set_or_has_a_default() -> None:
    services = jetmesh_services(compose())
    readers = {**settings_env(), **cli_env()}
    required = {n for n, (_, req) in readers.items() if req}
    _, no_default = source_env()
    for name, svc in services.items():
        env = env_of(svc)
        missing = sorted(n for n in required | no_default if n not in env)
        assert not missing, f"{name}: {missing} have no default and are not set in compose"
    # The variables the roles need in a container are set explicitly.
    for name, svc in services.items():
        env = env_of(svc)
        assert env["NATS_URL"] and env["JETMESH_DATA_DIR"] == "/data", name


def test_every_variable_compose_sets_is_read_by_the_code() -> None:
    readers = {**settings_env(), **cli_env()}
    mentioned, _ = source_env()
    known = set(readers) | mentioned | EXTERNAL_ENV
    commands = cli().commands
    for name, svc in jetmesh_services(compose()).items():
        if svc["command"][0] not in commands and svc["command"][0] in ADDED_LATER:
            continue  # that role's code has not landed yet: its variables are unknown
        unknown = sorted(k for k in env_of(svc) if k not in known)
        assert not unknown, f"{name} sets {unknown}, which no jetmesh code reads (a typo?)"
    for key in dockerfile_env():
        assert key in known, f"Dockerfile ENV {key} is read by nothing"


def test_settings_walk_sees_the_real_names() -> None:
    env = settings_env()
    assert env["NATS_URL"][0] == "BusSettings.nats_url"
    assert env["JETMESH_REPLICAS"][0] == "BusSettings.replicas"
    assert env["QDRANT_URL"][0] == "MemorySettings.qdrant_url"
    assert env["ANTHROPIC_API_KEY"][0] == "ModelSettings.anthropic_api_key"
    assert env["JETMESH_PLANNER_PROVIDER"][0] == "OrchestratorSettings.planner_provider"
    assert "JETMESH_ROLE" in cli_env()


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    """ENV of the final (runtime) stage."""
    env: dict[str, str] = {}
    for instr, args in dockerfile_instructions():
        if instr == "FROM":
            env = {}
        if instr == "ENV":
            for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args):
                env[m.group(1)] = m.group(2)
    return env


def exec_form(instr: str) -> list[str]:
    found = [args for i, args in dockerfile_instructions() if i == instr]
    assert found, f"the Dockerfile has no {instr}"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{instr} must be in exec (JSON) form"
    return [str(v) for v in value]


def test_dockerfile_entry_point_is_the_console_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    entry = exec_form("ENTRYPOINT")
    assert entry == ["jetmesh"] and "jetmesh" in scripts
    mod, _, attr = scripts["jetmesh"].partition(":")
    assert callable(getattr(importlib.import_module(mod), attr))
    cmd = exec_form("CMD")
    assert cmd[0] in cli().commands, f"default CMD {cmd} is not a jetmesh command"


def test_dockerfile_is_slim_multistage_non_root_and_stops_on_sigterm() -> None:
    instrs = dockerfile_instructions()
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) >= 2, "multi-stage: build a wheel, install it in the final stage"
    args = {m.group(1): m.group(2) for i, a in instrs if i == "ARG"
            for m in [re.match(r"(\w+)=(\S+)", a)] if m}
    base = [f.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for f in froms]
    assert all(b == "python:3.11-slim" for b in base), base
    assert "--from=build" in " ".join(a for i, a in instrs if i == "COPY")
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [a for i, a in instrs if i == "STOPSIGNAL"] == ["SIGTERM"]
    health_cmd = [a for i, a in instrs if i == "HEALTHCHECK"]
    assert health_cmd and health_cmd[-1].endswith('CMD ["jetmesh", "health"]')
    # Configuration only from the environment: no secrets or URLs baked in.
    env = dockerfile_env()
    assert not {"NATS_URL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "QDRANT_URL"} & set(env)
    assert env["JETMESH_DATA_DIR"] == "/data"


def _ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.removeprefix("!").strip("/")
        pat_any = pat.removeprefix("**/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or
                  fnmatch.fnmatch(parts[i], pat_any) for i in range(len(parts)))
        if hit:
            result = not neg
    return result


def test_dockerignore_keeps_what_the_wheel_build_needs() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"]["readme"], "__init__.py"]
    needed += [d for d in pyproject["tool"]["setuptools"]["package-dir"].values() if d != "."]
    needed += [str(p.relative_to(ROOT)) for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    kept_out = [p for p in needed if _ignored(p, patterns)]
    assert not kept_out, f".dockerignore drops files the build needs: {kept_out[:10]}"
    for junk in (".git/config", ".venv/bin/python", "tests/conftest.py",
                 "agents/__pycache__/x.pyc", ".jetmesh/nats/url"):
        assert _ignored(junk, patterns), junk


# ----------------------------------------------------------------------------- NATS users


def nats_auth_paths(data: dict[str, Any]) -> tuple[Path, Path]:
    """(server section, env file) that the nats-auth service writes, in its container."""
    cmd = data["services"]["nats-auth"]["command"]
    return Path(cmd[cmd.index("--out") + 1]), Path(cmd[cmd.index("--env-out") + 1])


def mount_of(svc: dict[str, Any], volume: str) -> tuple[str, bool]:
    """(target, read only) of a named volume's mount in `svc`."""
    for v in svc.get("volumes", []):
        parts = str(v).split(":")
        if parts[0] == volume:
            return parts[1], parts[2:] == ["ro"]
    raise AssertionError(f"{volume} is not mounted")


def test_every_role_logs_in_as_its_own_user_like_jetmesh_up() -> None:
    """The nats-auth job writes the users into its volume (`jetmesh nats-config`), the
    server includes the section from there, every role reads the env file from there."""
    data = compose()
    services = data["services"]
    job = services["nats-auth"]
    assert one_shot(job) and _jetmesh_image(job)
    cmd = job["command"]
    ctx = cli().commands[cmd[0]].make_context("jetmesh nats-config", list(cmd[1:]))
    assert ctx.params["fmt"] == "nats" and not ctx.params["rotate"]  # passwords kept
    conf_path, env_path = nats_auth_paths(data)
    job_target, _ = mount_of(job, "nats-auth")
    assert conf_path.parent == env_path.parent == Path(job_target)
    # A named volume takes the ownership of the image's folder: /data is the jetmesh user's.
    assert job_target == dockerfile_env()["JETMESH_DATA_DIR"]

    nats = services["nats"]
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    target, ro = mount_of(nats, "nats-auth")
    assert ro
    config_file = Path(nats["configs"][0]["target"])
    conf = data["configs"][nats["configs"][0]["source"]]["content"]
    (include,) = re.findall(r'^\s*include\s+"([^"]+)"\s*$', conf, re.M)
    # nats-server resolves an include against the including file's folder.
    assert config_file.parent / include == Path(target) / conf_path.name

    for name, svc in jetmesh_services(data).items():
        env = env_of(svc)
        target, ro = mount_of(svc, "nats-auth")
        assert ro, name
        assert env["JETMESH_NATS_AUTH_ENV"] == str(Path(target) / env_path.name), name
        assert not {"NATS_USER", "NATS_PASSWORD", "NATS_CREDS"} & set(env), name


async def test_the_compose_users_serve_a_real_mesh(tmp_path: Path) -> None:
    """Without Docker: the nats-auth command as compose runs it, nats-server on the
    compose file's configuration with its include, the orchestrator role with the
    compose environment: it logs in as `orchestrator` (not admin, not anonymous) and
    its health check passes; anonymous clients are refused."""
    import asyncio
    import os
    import subprocess
    import sys
    import urllib.request

    from typer.testing import CliRunner

    from jetmesh.bus.server import find_nats_server, free_port
    from jetmesh.orchestrator.cli import app

    data = compose()
    vol = tmp_path / "nats-auth"
    cmd = [c.replace("/data/", f"{vol}/") for c in data["services"]["nats-auth"]["command"]]
    for _ in range(2):  # the second `up` keeps the passwords
        result = CliRunner().invoke(app, cmd)
        assert result.exit_code == 0, result.output
    conf_path, env_path = nats_auth_paths(data)
    nats = data["services"]["nats"]
    etc = tmp_path / "etc"
    (etc / "auth").mkdir(parents=True)
    (etc / "auth" / conf_path.name).write_bytes((vol / conf_path.name).read_bytes())
    port, monitor = free_port(), free_port()
    conf = data["configs"][nats["configs"][0]["source"]]["content"]
    conf = conf.replace("0.0.0.0:4222", f"127.0.0.1:{port}").replace(
        "0.0.0.0:8222", f"127.0.0.1:{monitor}").replace("/data/jetstream",
                                                         str(tmp_path / "js"))
    (etc / "jetmesh.conf").write_text(conf)
    args = [find_nats_server(), *[str(etc / "jetmesh.conf") if a.startswith("/etc/") else a
                                  for a in nats["command"]]]
    log = (tmp_path / "nats.log").open("wb")
    server = await asyncio.to_thread(subprocess.Popen, args, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "JETMESH_"))}
    env.update({k: interpolate(v, {}) for k, v in
                env_of(data["services"]["orchestrator"]).items()})
    env.update({"NATS_URL": f"nats://127.0.0.1:{port}", "JETMESH_DATA_DIR": str(tmp_path),
                "JETMESH_NATS_AUTH_ENV": str(vol / env_path.name),
                "JETMESH_ALLOW_MODEL_REQUESTS": "0"})
    jm = [sys.executable, "-m", "jetmesh.orchestrator.cli"]
    orch = None
    orch_log = (tmp_path / "orch.log").open("wb")
    try:
        def connz() -> Any:
            url = f"http://127.0.0.1:{monitor}/connz?auth=true"
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())

        async def until(what: str, fn: Any, timeout: float = 60) -> Any:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                try:
                    return await fn()
                except Exception:
                    if asyncio.get_running_loop().time() > deadline:
                        raise AssertionError(f"timed out: {what}") from None
                    await asyncio.sleep(0.2)

        await until("nats-server", lambda: asyncio.to_thread(connz))
        # The orchestrator declares the streams as itself (its user may create them).
        orch = await asyncio.to_thread(
            subprocess.Popen, [*jm, *data["services"]["orchestrator"]["command"]], env=env,
            stdout=orch_log, stderr=subprocess.STDOUT,
            cwd=tmp_path, start_new_session=True)

        async def healthy() -> None:
            done = await asyncio.to_thread(
                subprocess.run, [*jm, "health", "orchestrator"], env=env, cwd=tmp_path,
                capture_output=True, text=True, timeout=30, check=False)
            assert done.returncode == 0, done.stdout + done.stderr

        await until("the orchestrator's health check", healthy, timeout=90)
        users = {c.get("authorized_user") for c in (await asyncio.to_thread(connz))["connections"]
                 if str(c.get("name", "")).startswith("jetmesh-orchestrator")}
        assert users == {"orchestrator"}, users
        # Anonymous: refused.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"INFO ")
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        assert b"Authorization Violation" in await reader.readline()
        writer.close()
        await writer.wait_closed()
    finally:
        for proc in (orch, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 20)
        log.close()
        orch_log.close()
