"""The live registry: replicas heartbeat cards into KV; dead or forged ones drop out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from a2a_support import Bus, until

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.cards import card_for_spec, card_to_dict
from jetmesh.agents.registry import Advertiser, Registry, advertise
from jetmesh.agents.signing import CardSigner, CardVerifier, generate_keys
from jetmesh.bus import subjects
from jetmesh.bus.presence import Presence
from jetmesh.bus.tasks import cancel_and_wait


async def _kill_silently(p: Presence) -> None:
    """What SIGKILL does to a replica: the heartbeats stop, the key is never deleted."""
    assert p._task is not None
    await cancel_and_wait(p._task)


async def test_signed_registry_liveness_and_forgeries(a2a_bus: Bus, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path)
    signer = CardSigner.from_pem(keys["private"])
    spec = get_agent("orders")
    adv = Advertiser(spec, nats_url=a2a_bus.url, signer=signer)
    reg = await Registry.open(a2a_bus.js, ttl_s=1.0,
                              verifier=CardVerifier.from_file(keys["jwks"]))
    live = Presence(a2a_bus.js, subjects.BUCKET_AGENTS, "orders.r1",
                    lambda: adv.value("r1", steps_done=3), interval_s=0.2)
    tampered_value = adv.value("evil")
    tampered_value["card"] = dict(tampered_value["card"])
    tampered_value["card"]["description"] = "Forwards your orders elsewhere."
    forged = Presence(a2a_bus.js, subjects.BUCKET_AGENTS, "orders.evil",
                      lambda: tampered_value, interval_s=0.2)
    unsigned = Presence(a2a_bus.js, subjects.BUCKET_AGENTS, "writer.r1",
                        lambda: advertise(get_agent("writer"), "r1"), interval_s=0.2)
    try:
        for p in (live, forged, unsigned):
            await p.start()
        await until(lambda: reg.replicas_per_skill().get("lookup_order") == 1, 5,
                    "the signed replica")
        await until(lambda: {"orders.evil", "writer.r1"} <= set(reg.refused()), 5, "refusals")
        (agent,) = reg.agents()
        assert agent.name == "orders" and agent.signed and agent.replicas[0].steps_done == 3
        assert agent.card.description == spec.description
        assert "bad signature" in reg.refused()["orders.evil"]
        assert "unsigned" in reg.refused()["writer.r1"]
        assert set(reg.skills()) == {"lookup_order"}  # the writer's skills are not live
        assert reg.agents(tag="orders") == [agent] and reg.agents(skill="write") == []

        await _kill_silently(live)
        took = await until(lambda: not reg.agents(), 4, "the dead replica to drop out")
        assert took < 1.0 + 1.0
        live = Presence(a2a_bus.js, subjects.BUCKET_AGENTS, "orders.r1",
                        lambda: adv.value("r1"), interval_s=0.2)
        await live.start()
        await until(lambda: reg.replicas_per_skill().get("lookup_order") == 1, 5, "restart")
    finally:
        for p in (live, forged, unsigned):
            await p.stop()
        await reg.close()


async def test_card_value_round_trips_and_unsigned_registry_accepts_legacy(
        a2a_bus: Bus) -> None:
    spec = get_agent("orders")
    value = advertise(spec, "x1", model=None, nats_url=a2a_bus.url)
    assert value["card"] == Advertiser(spec, nats_url=a2a_bus.url).card()
    assert value["card"] == card_to_dict(card_for_spec(spec, nats_url=a2a_bus.url))
    legacy = {k: v for k, v in value.items() if k != "card"}  # a worker without cards
    p = Presence(a2a_bus.js, subjects.BUCKET_AGENTS, "orders.legacy", lambda: legacy,
                 interval_s=0.2)
    reg = await Registry.open(a2a_bus.js, ttl_s=1.0)
    try:
        await p.start()
        await until(lambda: reg.agent("orders") is not None, 5, "legacy agent")
        agent = reg.agent("orders")
        assert agent is not None and not agent.signed
        assert agent.skills[0].input_schema == spec.skills[0].input_schema
    finally:
        await p.stop()
        await reg.close()


def _spawn_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "jetmesh.orchestrator.cli", "worker", "orders"],
            env={**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1",
                 "JETMESH_DATA_DIR": str(log.parent)},
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=log.parent)  # not the repo root: its a2a/ folder would shadow the SDK


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


async def test_killed_worker_process_leaves_registry_within_ttl_and_comes_back(
        a2a_bus: Bus, tmp_path: Path) -> None:
    ttl = 2.5
    reg = await Registry.open(a2a_bus.js, ttl_s=ttl)

    def replicas() -> int:
        return reg.replicas_per_skill().get("lookup_order", 0)

    proc = _spawn_worker(a2a_bus.url, tmp_path / "worker.log")
    try:
        await until(lambda: replicas() == 1, 15, "the worker process to register")
        _kill9(proc)
        took = await until(lambda: replicas() == 0, ttl + 3, "the killed worker to drop out")
        assert took <= ttl + 1.5
        proc = _spawn_worker(a2a_bus.url, tmp_path / "worker.log")
        await until(lambda: replicas() == 1, 15, "the restarted worker")
    finally:
        _kill9(proc)
        await reg.close()
