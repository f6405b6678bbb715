"""MCP tools against real fixture servers (subprocesses built with the SDK): schemas,
risk levels, validation, untrusted output, and the resilience of each server."""

from __future__ import annotations

import asyncio

from mcp_support import Fixture, HttpFixture, stdio_config

from jetmesh.agents.mcp import ClientCredentials, HttpServer
from jetmesh.agents.mcp.toolset import McpTool, McpToolset
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import ToolContext

CTX = ToolContext(task_id="t1", step_id="s1", agent="mcp-test")


def spec_with(*servers: object) -> AgentSpec:
    return AgentSpec(name="mcp-test", description="d", mcp_servers=list(servers),  # type: ignore[arg-type]
                     skills=[SkillSpec(id="ask", name="Ask", description="d")])


def tools_of(spec: AgentSpec) -> dict[str, McpTool]:
    return {t.name: t for t in spec.tools if isinstance(t, McpTool)}


async def test_stdio_tools_schemas_risks_and_calls(fixture_dir: Fixture) -> None:
    spec = spec_with(stdio_config(fixture_dir, read_only=["slow"], irreversible=["transfer"]))
    toolset = await McpToolset.open(spec)
    try:
        bound = toolset.attach(spec)
        tools = tools_of(bound)
        assert [t.name for t in bound.tools] == sorted(t.name for t in bound.tools)
        assert set(tools) == {"fx__crash", "fx__lookup", "fx__slow", "fx__transfer",
                              "fx__write_note"}
        # The server's schema is what the model sees.
        assert tools["fx__lookup"].definition().input_schema["required"] == ["key"]
        # Risk: write unless configured (or trusted annotations); destructive raises it.
        assert tools["fx__lookup"].risk == "write"  # readOnlyHint, but not trusted
        assert tools["fx__slow"].risk == "read" and not tools["fx__slow"].side_effects
        assert tools["fx__write_note"].risk == "write" and tools["fx__write_note"].side_effects
        assert tools["fx__transfer"].risk == "irreversible"
        assert bound.mcp_tool_hashes == {"fx": toolset.servers["fx"].hash}

        ok = await tools["fx__lookup"].invoke({"key": "alpha"}, CTX)
        assert ok.ok and ok.output == {"text": "first", "structured": {"result": "first"}}
        # Arguments are checked here, against the server's schema: nothing is sent.
        bad = await tools["fx__lookup"].invoke({"key": 3}, CTX)
        assert not bad.ok and bad.kind == "invalid_arguments" and "key" in (bad.error or "")
        assert [c["args"] for c in fixture_dir.calls("lookup")] == [{"key": "alpha"}]
        # Output is shown to the model as untrusted data.
        evil = await tools["fx__lookup"].invoke({"key": "evil"}, CTX)
        content = tools["fx__lookup"].content_for_model(evil)
        assert content.startswith('<untrusted-data source="tool:fx__lookup">')
    finally:
        await toolset.aclose()


def test_skills_may_name_mcp_tools_before_they_are_listed(fixture_dir: Fixture) -> None:
    import pytest

    from jetmesh.agents.errors import SpecError

    skill = SkillSpec(id="ask", name="Ask", description="d", tools=["fx__lookup"])
    AgentSpec(name="a", description="d", skills=[skill], mcp_servers=[stdio_config(fixture_dir)])
    with pytest.raises(SpecError, match="unknown tools"):
        AgentSpec(name="a", description="d", skills=[skill])


def test_risk_levels_from_configuration_and_annotations(fixture_dir: Fixture) -> None:
    from mcp.types import Tool as Info
    from mcp.types import ToolAnnotations as Ann

    from jetmesh.agents.mcp.toolset import risk_of

    def info(name: str, **ann: bool) -> Info:
        return Info(name=name, input_schema={"type": "object"},
                    annotations=Ann(**ann) if ann else None)

    plain, trusting = stdio_config(fixture_dir), stdio_config(fixture_dir, trust_annotations=True)
    listed = stdio_config(fixture_dir, read_only=["get_*"], irreversible=["pay"])
    assert risk_of(plain, info("get", read_only_hint=True)) == "write"  # not trusted
    assert risk_of(trusting, info("get", read_only_hint=True)) == "read"
    assert risk_of(trusting, info("put")) == "write"
    assert risk_of(plain, info("rm", destructive_hint=True)) == "irreversible"  # always believed
    assert risk_of(listed, info("get_x")) == "read"
    assert risk_of(listed, info("pay", read_only_hint=True)) == "irreversible"


async def test_killed_server_breaker_opens_then_half_open_probe_closes(
        fixture_dir: Fixture) -> None:
    spec = spec_with(stdio_config(fixture_dir, trust_annotations=True, retries=0,
                                  breaker_threshold=2, breaker_reset_s=0.5))
    toolset = await McpToolset.open(spec)
    try:
        tools = tools_of(toolset.attach(spec))
        server = toolset.servers["fx"]
        for _ in range(2):  # the server dies in the middle of each call
            died = await tools["fx__crash"].invoke({}, CTX)
            assert not died.ok and died.kind == "exception"
            assert "connection lost" in (died.error or "")
        assert server.breaker.current == "open"
        # What `jetmesh agents` shows for it (the presence value carries these states).
        from jetmesh.agents.models import describe_breakers

        assert describe_breakers(toolset.breaker_states()) == "mcp:fx open (2/2)"
        refused = await tools["fx__lookup"].invoke({"key": "alpha"}, CTX)
        assert refused.kind == "denied" and "circuit open" in (refused.error or "")
        assert fixture_dir.calls("lookup") == []  # the open breaker made no call
        await asyncio.sleep(server.breaker.retry_in_s() + 0.02)  # the breaker's own clock
        assert server.breaker.current == "half_open"
        probe = await tools["fx__lookup"].invoke({"key": "alpha"}, CTX)  # reconnects
        assert probe.ok and server.breaker.current == "closed"
        assert server.connection.connects == 3  # first, after each crash
        pids = {c["pid"] for c in fixture_dir.calls()}
        assert len(pids) == 3
    finally:
        await toolset.aclose()


async def test_read_only_calls_retry_writes_do_not(fixture_dir: Fixture) -> None:
    spec = spec_with(stdio_config(fixture_dir, trust_annotations=True, retries=1,
                                  backoff_s=0.01, breaker_threshold=10))
    toolset = await McpToolset.open(spec)
    try:
        tools = tools_of(toolset.attach(spec))
        # crash is read-only: retried once (on a new server process), then a clear error.
        out = await tools["fx__crash"].invoke({}, CTX)
        assert not out.ok and "after 2 attempts" in (out.error or "")
        assert len(fixture_dir.calls("crash")) == 2
    finally:
        await toolset.aclose()
    spec = spec_with(stdio_config(fixture_dir, retries=1, backoff_s=0.01))
    toolset = await McpToolset.open(spec)
    try:
        tools = tools_of(toolset.attach(spec))
        assert tools["fx__crash"].risk == "write"  # annotations not trusted
        out = await tools["fx__crash"].invoke({}, CTX)
        assert not out.ok and "not retried: a write may already have taken effect" in (
            out.error or "")
        assert len(fixture_dir.calls("crash")) == 3
    finally:
        await toolset.aclose()


async def test_hanging_server_times_out_and_is_restarted(fixture_dir: Fixture) -> None:
    spec = spec_with(stdio_config(fixture_dir, read_only=["*"], retries=0, timeout_s=1.0))
    toolset = await McpToolset.open(spec)
    try:
        tools = tools_of(toolset.attach(spec))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await tools["fx__slow"].invoke({"seconds": 30}, CTX)
        assert not out.ok and out.kind == "timeout" and "within 1s" in (out.error or "")
        assert loop.time() - t0 < 5
        # The hung process was dropped: the next call runs on a fresh one at once.
        after = await tools["fx__lookup"].invoke({"key": "beta"}, CTX)
        assert after.ok and after.output and after.output["text"] == "second"
    finally:
        await toolset.aclose()


async def test_http_401_refreshed_once_then_clear_error_and_429_waited_out(
        http_server: HttpFixture, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "token"
    token_file.write_text("old")
    http_server.set("token", "old")
    before = len(http_server.http_statuses())

    def statuses() -> list[str]:
        return http_server.http_statuses()[before:]

    cfg = http_server.config(transport=HttpServer(url=http_server.url,
                                                  bearer_token_file=token_file),
                             read_only=["lookup"], max_retry_after_s=1.5)
    toolset = await McpToolset.open(spec_with(cfg))
    try:
        tools = tools_of(toolset.attach(spec_with(cfg)))
        gate = toolset.servers["web"].connection.gate
        assert gate is not None
        # The token rotates: one 401, one refresh (the file read again), then success.
        http_server.set("token", "new")
        token_file.write_text("new")
        out = await tools["web__lookup"].invoke({"key": "alpha"}, CTX)
        assert out.ok, out.error
        assert gate.refreshes == 1 and statuses() == ["401"]
        # Rotated on the server only: one refresh, still 401, a clear error, no storm.
        http_server.set("token", "newer")
        out = await tools["web__lookup"].invoke({"key": "alpha"}, CTX)
        assert not out.ok and "401 Unauthorized" in (out.error or "")
        assert "rejected the refreshed credentials" in (out.error or "")
        assert gate.refreshes == 2 and statuses() == ["401"] * 3
        assert toolset.servers["web"].breaker.current == "closed"  # not the server's fault
        http_server.clear("token")
        # 429 with Retry-After: 1 is waited out, then the call goes through once.
        http_server.set("ratelimit", "1")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await tools["web__lookup"].invoke({"key": "delta"}, CTX)
        assert out.ok, out.error
        assert loop.time() - t0 >= 0.95 and statuses()[-1] == "429"
        assert len(http_server.calls("lookup", key="delta")) == 1 and gate.rate_limited == 1
        # More 429s in a row than allowed (rate_limit_retries=3): a clear error, no call.
        http_server.set("ratelimit", "10")
        out = await tools["web__lookup"].invoke({"key": "epsilon"}, CTX)
        assert not out.ok and "429 Too Many Requests" in (out.error or "")
        assert "3 already waited out" in (out.error or "")
        assert http_server.calls("lookup", key="epsilon") == []
    finally:
        http_server.clear("token")
        http_server.clear("ratelimit")
        await toolset.aclose()


async def test_http_oauth_client_credentials_token_refreshed_on_401(
        http_server: HttpFixture) -> None:
    http_server.set("oauth_token", "t1")
    http_server.set("token", "t1")
    token_url = http_server.url.rsplit("/", 1)[0] + "/token"
    cfg = http_server.config(name="oauth", read_only=["lookup"], transport=HttpServer(
        url=http_server.url, oauth=ClientCredentials(token_url=token_url, client_id="jetmesh",
                                                     client_secret="s3cret")))  # type: ignore[arg-type]
    before = len(http_server.http_statuses())
    try:
        toolset = await McpToolset.open(spec_with(cfg))
        try:
            tools = tools_of(toolset.attach(spec_with(cfg)))
            # The token expires (rotated at the issuer and the server): one 401, one new
            # token from the endpoint, the call goes through.
            http_server.set("oauth_token", "t2")
            http_server.set("token", "t2")
            out = await tools["oauth__lookup"].invoke({"key": "zeta"}, CTX)
            assert out.ok, out.error
            assert http_server.http_statuses()[before:] == ["token", "401", "token"]
            assert len(http_server.calls("lookup", key="zeta")) == 1
        finally:
            await toolset.aclose()
    finally:
        http_server.clear("token")


async def test_tool_list_drift_accepted_and_cache_hints_honoured(fixture_dir: Fixture) -> None:
    accepting = stdio_config(fixture_dir, on_drift="accept")
    cached = stdio_config(fixture_dir, name="cached", on_drift="accept")
    cached = cached.model_copy(update={"transport": cached.transport.model_copy(  # type: ignore[union-attr]
        update={"env": {**cached.transport.env, "FIXTURE_TTL_MS": "600000"}})})  # type: ignore[union-attr]
    spec = spec_with(accepting, cached)
    toolset = await McpToolset.open(spec)
    try:
        bound = toolset.attach(spec)
        pinned = toolset.servers["fx"].hash
        fixture_dir.set("variant", "v2")
        changes, accepted = await toolset.check_drift()
        # The server whose list may be cached for 10 minutes is not asked again (its
        # listing is still fresh); the other is, and its change is accepted.
        assert [(c.server, c.added, c.action) for c in changes] == [("fx", ["extra"], "accepted")]
        assert accepted and toolset.servers["fx"].hash == changes[0].current_hash != pinned
        rebound = toolset.attach(bound)
        assert "fx__extra" in {t.name for t in rebound.tools}
        assert "cached__extra" not in {t.name for t in rebound.tools}
        assert rebound.mcp_tool_hashes["fx"] != bound.mcp_tool_hashes["fx"]
        assert [t.name for t in rebound.tools] == sorted(t.name for t in rebound.tools)
        extra = tools_of(rebound)["fx__extra"]
        out = await extra.invoke({"x": 41}, CTX)
        assert out.ok and out.output and out.output["text"] == "42"
        assert (await toolset.check_drift()) == ([], False)  # pinned anew
    finally:
        await toolset.aclose()


async def test_a_server_that_cannot_start_is_a_clear_error(fixture_dir: Fixture) -> None:
    import pytest

    from jetmesh.agents.mcp import McpServerConfig, StdioServer
    from jetmesh.agents.mcp.errors import McpUnavailable

    bad = McpServerConfig(name="gone", transport=StdioServer(command="/nonexistent/mcp-server"))
    with pytest.raises(McpUnavailable, match="MCP server 'gone': cannot connect"):
        await McpToolset.open(spec_with(bad))
