"""Outside probes of the A2A push delivery (a2a/push.py, the jm-a2a-push bucket).

On a nats-server of the test's own (the delivery lease is one key per bucket) and a real
local webhook: a hostile push URL is refused when it is set, with a reason; odd entries in
the bucket (a key of another shape, a config or cursor that does not parse) never stop
the delivery of the good configs; a webhook that hangs or answers 500 or a redirect
delays only its own config.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from a2a.server.context import ServerCallContext
from a2a.types import TaskPushNotificationConfig
from a2a.utils.errors import InvalidParamsError
from a2a.utils.push_url_validator import validate_push_notification_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from jetmesh.a2a.gateway import _quiet_server
from jetmesh.a2a.push import KvPushConfigStore, PushNotifications
from jetmesh.bus import events as ev
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.streams import declare_streams


@dataclass
class Hooks:
    """One local webhook server: /ok records, /fail answers 500 `fails` times first,
    /hang never answers, /redirect sends a 307 to /target (which must stay unvisited)."""

    got: dict[str, list[int]] = field(default_factory=dict)
    fails: int = 2
    url: str = ""

    def record(self, path: str, body: bytes) -> None:
        (item,) = json.loads(body).values()
        self.got.setdefault(path, []).append(int(item["metadata"]["jetmesh"]["seq"]))

    def app(self) -> Starlette:
        async def ok(request: Request) -> Response:
            self.record("ok", await request.body())
            return Response(status_code=204)

        async def fail(request: Request) -> Response:
            self.record("fail", await request.body())
            if self.fails > 0:
                self.fails -= 1
                return Response(status_code=500)
            return Response(status_code=204)

        async def hang(request: Request) -> Response:
            self.record("hang", await request.body())
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def redirect(request: Request) -> Response:
            self.record("redirect", await request.body())
            return RedirectResponse(f"{self.url}/target", status_code=307)

        async def target(request: Request) -> Response:
            self.record("target", await request.body())
            return Response(status_code=204)

        return Starlette(routes=[Route(f"/{name}", fn, methods=["POST"]) for name, fn in (
            ("ok", ok), ("fail", fail), ("hang", hang), ("redirect", redirect),
            ("target", target))])


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    h = Hooks()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    h.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _quiet_server(uvicorn.Config(h.app(), log_level="critical", lifespan="off",
                                          timeout_graceful_shutdown=0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await until(lambda: server.started, 10, "the webhook")
    yield h
    server.should_exit = True
    server.force_exit = True
    await task


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # polled: the webhook's record signals nothing


@pytest.fixture
async def bus(fresh_server):  # the test's own server: its own delivery lease
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    await declare_streams(js)
    yield nc, js, Ledger(nc, js)
    await nc.close()


async def finished_task(ledger: Ledger) -> tuple[str, list[int]]:
    """A task with three events in the ledger, the last one its end; their sequences."""
    tid = f"probe-push-{ev.new_id()}"
    seqs = await ledger.append_many([
        ev.TaskSubmitted(id=f"{tid}-submitted", subject=tid,
                         data=ev.TaskSubmittedData(goal="probe")),
        ev.TaskPlanned(id=f"{tid}-planned", subject=tid,
                       data=ev.TaskPlannedData(planner="workflow:probe", steps=[])),
        ev.TaskCompleted(id=f"{tid}-end", subject=tid,
                         data=ev.TaskCompletedData(result={"answer": "done"})),
    ])
    return tid, [int(s) for s in seqs]


CTX = ServerCallContext()


async def test_a_hostile_push_url_is_refused_when_it_is_set(bus) -> None:
    """With the public-address policy (the gateway's default): file://, loopback, the
    cloud metadata address, private and mapped or numeric spellings of them are refused
    with a reason at registration, and nothing is stored for delivery."""
    _nc, js, ledger = bus
    push = await PushNotifications.open(js, ledger, deliver=False,
                                        url_validator=validate_push_notification_url)
    try:
        tid, _ = await finished_task(ledger)
        for url in ("file:///etc/passwd", "gopher://example.com/", "http://127.0.0.1:8080/h",
                    "http://localhost/h", "http://169.254.169.254/latest/meta-data/",
                    "http://[::ffff:127.0.0.1]/h", "http://2130706433/h", "http://0/h",
                    "http://10.0.0.1/h", "http://[::1]/h", "http://100.64.0.1/h"):
            config = TaskPushNotificationConfig(url=url, id="c1")
            with pytest.raises(InvalidParamsError) as refused:
                await push.register(tid, config, CTX, from_seq=1)
            assert "url" in str(refused.value.message), (url, refused.value)
        assert await push.store.get_info_for_dispatch(tid) == []
    finally:
        await push.close()


async def test_odd_bucket_entries_never_stop_the_good_configs(bus, hooks) -> None:
    """Keys of another shape, a config that is not JSON, a cursor that is not a number,
    written into jm-a2a-push (corrupt, or another writer's): the delivering gateway
    keeps delivering every good config, stored by itself or by another gateway."""
    _nc, js, ledger = bus
    store = await KvPushConfigStore.open(js)
    kv = store.kv
    odd_task, _ = await finished_task(ledger)
    for key, value in (("cfg.a.b.c", b"{}"), ("cfg.x", b"{}"), ("cfg.a..b", b"{}"),
                       (f"cfg.{odd_task}.garbage", b"\xff\xfe not json"),
                       (f"cfg.{odd_task}.wrongtype", b'{"url": 7}'),
                       (f"cur.{odd_task}.c1", b"not a number")):
        try:
            await kv.put(key, value)
        except Exception:  # a key the server itself refuses
            continue
    await kv.put(f"cfg.{odd_task}.c1", json.dumps(
        {"taskId": odd_task, "id": "c1", "url": f"{hooks.url}/ok"}).encode())
    holder = await PushNotifications.open(js, ledger, lease_s=1.0)
    other = await PushNotifications.open(js, ledger, deliver=False)  # a gateway not leading
    try:
        await until(lambda: holder.leading, 10, "the lease")
        listed = await store.get_info_for_dispatch(odd_task)  # the API's list still works
        assert [c.id for c in listed] == ["c1"], listed
        tid, seqs = await finished_task(ledger)
        await other.register(tid, TaskPushNotificationConfig(url=f"{hooks.url}/ok", id="k"),
                             CTX, from_seq=1)
        await until(lambda: set(seqs) <= set(hooks.got.get("ok", [])), 15,
                    f"the good config's events {seqs}: got {hooks.got}")
        # The config whose cursor did not parse is delivered too (from its start).
        odd_seqs = [e.seq for e in await ledger.read(odd_task)]
        await until(lambda: set(odd_seqs) <= set(hooks.got.get("ok", [])), 15,
                    f"the odd task's events {odd_seqs}: got {hooks.got}")
    finally:
        await other.close()
        await holder.close()


async def test_a_bad_webhook_delays_only_its_own_config(bus, hooks) -> None:
    """A webhook that hangs, one that answers 500 (then recovers), one that redirects:
    the others' events arrive; the failing one's arrive once it recovers; the redirect is
    not followed (its target is never visited)."""
    _nc, js, ledger = bus
    push = await PushNotifications.open(js, ledger, lease_s=1.0, max_backoff_s=0.2,
                                        http=httpx.AsyncClient(timeout=30.0))
    try:
        await until(lambda: push.leading, 10, "the lease")
        tasks = {}
        for path in ("hang", "redirect", "fail", "ok"):
            tid, seqs = await finished_task(ledger)
            tasks[path] = seqs
            await push.register(tid, TaskPushNotificationConfig(url=f"{hooks.url}/{path}",
                                                                id="c1"), CTX, from_seq=1)
        await until(lambda: hooks.got.get("ok") == tasks["ok"]
                    and hooks.got.get("fail", [])[-3:] == tasks["fail"], 15,
                    f"the ok and the recovered webhooks: got {hooks.got}")
        assert hooks.got.get("hang") == tasks["hang"][:1]  # waiting on its first event
        assert "target" not in hooks.got
        assert set(hooks.got.get("redirect", [])) == {tasks["redirect"][0]}  # retried
    finally:
        await push.close()
