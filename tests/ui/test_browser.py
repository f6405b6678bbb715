"""The dashboard in a real headless browser: Debian's chromium driven by Playwright.

Never `playwright install`: the browser is /usr/bin/chromium (`.ci/run` installs it when
missing). Screenshots of each view go to build/ui-screenshots (or
$JETMESH_UI_SCREENSHOTS)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ui_support import APPROVER_TOKEN, READER_TOKEN, UiMesh, wait_event

from jetmesh.agents.builtin.support import refunds_file
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter
from jetmesh.orchestrator.stats import put_summary, task_summary
from jetmesh.orchestrator.tasks_kv import is_log

CHROMIUM = Path("/usr/bin/chromium")
expect = pytest.importorskip("playwright.async_api").expect
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 45_000


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Path:
    where = os.environ.get("JETMESH_UI_SCREENSHOTS")
    path = Path(where) if where else Path(request.config.rootpath) / "build" / "ui-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user-data-dir
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def page(browser: Any, ui_mesh: UiMesh) -> AsyncIterator[Any]:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(ui_mesh.base + "/ui/")
    yield page
    await page.close()
    assert not errors, errors


async def login(page: Any, token: str) -> None:
    # The page shows the login form, or (a session from an earlier test) who is in.
    await page.locator("#login-form:visible, #who button").first.wait_for()
    if await page.locator("#who button").count():
        await page.click("#who button")  # log out first
    await page.wait_for_selector("#login-form", state="visible")
    await page.fill("#token", token)
    await page.click("#login-form button")
    await page.wait_for_selector("#view[data-ready]")


async def go(page: Any, hash_: str, ready: str) -> None:
    await page.evaluate(f"location.hash = {json.dumps(hash_)}")
    await page.wait_for_selector(f'#view[data-ready="{ready}"]')


async def cli_submit(ui_mesh: UiMesh, goal: str, workflow: str, task_id: str,
                     task_input: dict[str, Any] | None = None) -> None:
    """`jetmesh submit` as a user would type it."""
    exe = Path(sys.executable).with_name("jetmesh")
    args = [str(exe), "submit", goal, "--workflow", workflow, "--task-id", task_id]
    if task_input:
        args += ["--input", json.dumps(task_input)]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=str(ui_mesh.data_dir), env={**os.environ, "NATS_URL": ui_mesh.url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


def refunds() -> list[dict[str, Any]]:
    path = refunds_file()
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def test_watch_a_task_from_the_cli_progress_live(page: Any, ui_mesh: UiMesh,
                                                       shots: Path) -> None:
    await page.wait_for_selector("#login-form", state="visible")
    await page.screenshot(path=str(shots / "login.png"))
    await login(page, APPROVER_TOKEN)
    await page.evaluate("window.__noReload = 1")
    tid = "ui-live-" + ev.new_id()[:8]
    await cli_submit(ui_mesh, "gate live1", "wait2_ui", tid, {"then": "gate live2"})
    # It appears in the list live, and is working.
    row = page.locator(f'tr[data-task="{tid}"]')
    await row.locator('[data-status="working"]').wait_for()
    await page.screenshot(path=str(shots / "tasks.png"))
    await row.click()
    await page.wait_for_selector('#view[data-ready="task"]')
    status = page.locator('[data-testid="task-status"]')
    await status.locator('[data-status="working"]').wait_for()
    await page.locator('[data-step="first"][data-status="running"]').wait_for()
    ui_mesh.gates.gate("live1").set()
    await page.locator('[data-step="first"][data-status="completed"]').wait_for()
    await page.locator('[data-step="second"][data-status="running"]').wait_for()
    ui_mesh.gates.gate("live2").set()
    await status.locator('[data-status="completed"]').wait_for()
    await page.locator('[data-step="second"][data-status="completed"]').wait_for()
    ledger = await ui_mesh.client.events(tid)
    items = page.locator('[data-testid="timeline"] li')
    await expect(items).to_have_count(len(ledger))
    shown = [int(s) for s in await items.evaluate_all("els => els.map(e => e.dataset.seq)")]
    types = await items.evaluate_all("els => els.map(e => e.dataset.type)")
    # The timeline's events are the ledger's, each once (step logs from a stream of
    # their own may interleave as they arrived; the ledger's own order is kept).
    assert sorted(zip(shown, types, strict=True)) == sorted(
        (e.seq, e.event.type) for e in ledger)
    own = [s for s in shown if not is_log(s)]
    assert own == sorted(own)
    assert await page.evaluate("window.__noReload") == 1  # never reloaded
    await page.screenshot(path=str(shots / "task.png"), full_page=True)
    # Replay it from its page: the new task's page opens and shows it completed.
    await page.click('[data-testid="replay"]')
    heading = page.locator("#view h1 code", has_text=f"{tid}-replay-")
    await heading.wait_for()
    await page.locator('[data-testid="task-status"] [data-status="completed"]').wait_for()
    new_id = await heading.inner_text()
    replayed = await ui_mesh.client.state(new_id)
    assert replayed.submitted is not None and replayed.submitted.replay_of == tid


async def test_approve_in_the_inbox_and_read_only_cannot(page: Any, ui_mesh: UiMesh,
                                                         shots: Path) -> None:
    before = len(refunds())
    tid = await ui_mesh.client.submit("refund 230 on A1029", workflow="refund_ui")
    await wait_event(ui_mesh.client, tid, ev.ApprovalRequested)
    # Read-only: sees the inbox, cannot approve (the button is off and the server says no).
    await login(page, READER_TOKEN)
    await go(page, "#/approvals", "approvals")
    row = page.locator(f'tr[data-task="{tid}"]')
    await row.wait_for()
    assert await row.locator('[data-testid="approve"]').is_disabled()
    status = await page.evaluate("""async (tid) => {
        const csrf = document.cookie.split('; ').find(c => c.startsWith('jm_csrf=')).slice(8);
        const r = await fetch(`/ui/api/tasks/${tid}/approve`, {method: 'POST',
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
            body: JSON.stringify({step_id: 'only', tool: 'issue_refund', args_hash: 'x'})});
        return r.status; }""", tid)
    assert status == 403
    await page.screenshot(path=str(shots / "approvals-read-only.png"))
    # The approver sees the exact arguments and approves there.
    await login(page, APPROVER_TOKEN)
    await go(page, "#/approvals", "approvals")
    row = page.locator(f'tr[data-task="{tid}"]')
    text = await row.inner_text()
    assert "A1029" in text and "230" in text and "issue_refund" in text
    await page.screenshot(path=str(shots / "approvals.png"))
    await row.locator('[data-testid="reason"]').fill("checked with the customer")
    await row.locator('[data-testid="approve"]').click()
    await row.wait_for(state="detached")
    state = await ui_mesh.client.result(tid, timeout=30)
    assert state.status.value == "completed"
    made = refunds()[before:]
    assert len(made) == 1 and made[0]["amount_usd"] == 230  # ran exactly once
    granted = [e.event for e in await ui_mesh.client.events(tid)
               if isinstance(e.event, ev.ApprovalGranted)]
    assert [g.data.by for g in granted] == ["ui:alice"]
    # The task page shows it continued to its end.
    await go(page, f"#/task/{tid}", "task")
    await page.locator('[data-testid="task-status"] [data-status="completed"]').wait_for()
    # Another one denied there ends as a denial from the CLI would: the call never runs.
    other = await ui_mesh.client.submit("refund 240 on A1029", workflow="refund_ui")
    await wait_event(ui_mesh.client, other, ev.ApprovalRequested)
    await go(page, "#/approvals", "approvals")
    row = page.locator(f'tr[data-task="{other}"]')
    await row.locator('[data-testid="reason"]').fill("too much")
    await row.locator('[data-testid="deny"]').click()
    await row.wait_for(state="detached")
    state = await ui_mesh.client.result(other, timeout=30)
    denied = [e.event for e in await ui_mesh.client.events(other)
              if isinstance(e.event, ev.ApprovalDenied)]
    assert [(d.data.by, d.data.reason) for d in denied] == [("ui:alice", "too much")]
    assert state.status.value == "completed" and len(refunds()) == before + 1


async def test_cancel_and_redrive_from_the_page(page: Any, ui_mesh: UiMesh,
                                                shots: Path) -> None:
    await login(page, APPROVER_TOKEN)
    tid = await ui_mesh.client.submit("gate pagecancel", workflow="wait_ui")
    await asyncio.wait_for(ui_mesh.gates.start("pagecancel").wait(), 20)
    await go(page, f"#/task/{tid}", "task")
    page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.click('[data-testid="cancel"]')
    await page.locator('[data-testid="task-status"] [data-status="canceled"]').wait_for()
    assert (await ui_mesh.client.state(tid)).status.value == "canceled"

    sub = ev.TaskSubmission(goal="gate pageredrive", workflow="wait_ui")
    raw = sub.model_dump_json().encode()
    letter = DeadLetter(stream=subjects.STREAM_TASKS, consumer=subjects.CONSUMER_ORCH_SUBMIT,
                        subject=subjects.SUBMIT, reason="orchestrator was down",
                        data_b64=base64.b64encode(raw).decode(), task_id=sub.task_id)
    ack = await ui_mesh.client.js.publish(
        subjects.dlq(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
        letter.model_dump_json().encode())
    await go(page, "#/dlq", "dlq")
    row = page.locator(f'tr[data-seq="{ack.seq}"]')
    assert "orchestrator was down" in await row.inner_text()
    await page.screenshot(path=str(shots / "dead-letters.png"))
    await row.locator('[data-testid="redrive"]').click()
    await row.wait_for(state="detached")
    ui_mesh.gates.gate("pageredrive").set()
    state = await ui_mesh.client.result(sub.task_id, timeout=30)
    assert state.status.value == "completed"

    await go(page, "#/agents", "agents")
    await page.locator('[data-agent="refunder"]').wait_for()
    await page.screenshot(path=str(shots / "agents.png"), full_page=True)
    summary = task_summary(sub.task_id, await ui_mesh.client.events(sub.task_id))
    assert summary is not None
    await put_summary(ui_mesh.client.js, summary)  # what the telemetry role records
    await go(page, "#/stats", "stats")
    assert "completion rate" in await page.locator('[data-testid="stats"]').inner_text()
    await page.screenshot(path=str(shots / "stats.png"), full_page=True)
