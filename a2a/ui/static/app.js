// jetmesh dashboard: plain modern JavaScript, no build step, no dependencies.
// Every value from the server goes into the page as text (never as HTML).

const $ = (sel) => document.querySelector(sel);
const state = { me: null, sources: [], timers: [] };

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function put(el, ...children) {
  // replaceChildren with the same child rules as h(): arrays flattened, nulls left out.
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}

function cookie(name) {
  const m = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return m ? decodeURIComponent(m.split("=").slice(1).join("=")) : "";
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-CSRF-Token": cookie("jm_csrf") },
  };
  const resp = await fetch("/ui/api/" + path, { credentials: "same-origin", ...opts });
  let data = {};
  try { data = await resp.json(); } catch (_) { /* not JSON */ }
  if (resp.status === 401 && path !== "login") { showLogin(); throw new Error("log in first"); }
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}

function toast(text, error = false) {
  const t = $("#toast");
  t.textContent = text;
  t.className = error ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

const badge = (s) => h("span", { class: `badge s-${s}`, "data-status": s }, s);
const money = (v) => (v === null || v === undefined ? "-" : "$" + Number(v).toFixed(4));
const secs = (v) => (v === null || v === undefined ? "-" :
  v < 60 ? v.toFixed(1) + "s" : v < 3600 ? (v / 60).toFixed(1) + "m" : (v / 3600).toFixed(1) + "h");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");
const json = (v) => h("pre", {}, typeof v === "string" ? v : JSON.stringify(v, null, 2));

function costBar(cost, budget) {
  if (!budget) return h("span", {}, money(cost));
  const pct = Math.min(100, (100 * cost) / budget);
  return h("div", { title: `${money(cost)} of ${money(budget)}` },
    h("span", {}, `${money(cost)} / ${money(budget)}`),
    h("div", { class: "bar" + (cost > budget ? " over" : "") }, h("span", { style: `width:${pct}%` })));
}

function live(url, handlers) {
  const es = new EventSource(url, { withCredentials: true });
  for (const [name, fn] of Object.entries(handlers)) {
    es.addEventListener(name, (e) => fn(JSON.parse(e.data), e));
  }
  state.sources.push(es);
  return es;
}

function debounce(fn, ms) {
  // Runs the last call after `ms` quiet; a failure shows as a toast, never unhandled.
  let t = null;
  return (...a) => {
    clearTimeout(t);
    t = setTimeout(() => Promise.resolve().then(() => fn(...a)).catch((e) => toast(e.message, true)), ms);
  };
}

function leaveView() {
  state.sources.forEach((s) => s.close());
  state.sources = [];
  state.timers.forEach((t) => clearInterval(t));
  state.timers = [];
}

// ----------------------------------------------------------------------- login

function showLogin() {
  leaveView();
  state.me = null;
  $("#nav").hidden = true;
  $("#who").textContent = "";
  put($("#view"));
  delete $("#view").dataset.ready;
  $("#login").hidden = false;
}

async function doLogin(ev) {
  ev.preventDefault();
  $("#login-error").textContent = "";
  try {
    state.me = await api("login", { token: $("#token").value });
    $("#token").value = "";
    $("#login").hidden = true;
    route();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
}

async function logout() {
  await api("logout", {}).catch(() => {});
  showLogin();
}

// ----------------------------------------------------------------------- tasks

const filters = { state: "", workflow: "", user: "", q: "" };

async function viewTasks(view) {
  const status = h("select", { "data-testid": "filter-status", onchange: (e) => { filters.state = e.target.value; load(); } });
  const workflow = h("select", { "data-testid": "filter-workflow", onchange: (e) => { filters.workflow = e.target.value; load(); } });
  const user = h("input", { placeholder: "user", value: filters.user, "data-testid": "filter-user",
    oninput: debounce((e) => { filters.user = e.target.value; load(); }, 250) });
  const search = h("input", { placeholder: "search task id", value: filters.q, "data-testid": "search",
    oninput: debounce((e) => { filters.q = e.target.value; load(); }, 250) });
  const total = h("span", { class: "muted" });
  const body = h("tbody", { "data-testid": "tasks" });
  put(view, h("h1", {}, "Tasks"),
    h("div", { class: "filters" }, status, workflow, user, search, total),
    h("table", {}, h("thead", {}, h("tr", {}, ["task", "state", "workflow", "user", "cost / budget",
      "steps", "duration", "created"].map((c) => h("th", {}, c)))), body));

  async function load() {
    const p = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
    const data = await api("tasks?" + p.toString());
    const opt = (v, label, sel) => h("option", { value: v, selected: sel }, label);
    put(status, opt("", `all states (${data.all})`, !filters.state),
      ...["submitted", "working", "input-required", "completed", "failed", "canceled", "rejected"]
        .map((s) => opt(s, `${s} (${data.counts[s] || 0})`, filters.state === s)));
    put(workflow, opt("", "all workflows", !filters.workflow),
      ...data.workflows.map((w) => opt(w, w, filters.workflow === w)));
    total.textContent = `${data.total} matching`;
    put(body, ...data.tasks.map((t) => h("tr", {
      class: "clickable", "data-task": t.task_id, onclick: () => { location.hash = "#/task/" + t.task_id; },
    },
    h("td", {}, h("code", {}, t.task_id)), h("td", {}, badge(t.status)),
    h("td", {}, t.workflow || t.planner || "-"), h("td", {}, t.user_id || "-"),
    h("td", {}, costBar(t.cost_usd, t.budget_usd)), h("td", {}, `${t.steps_done}/${t.steps_total}`),
    h("td", {}, secs(t.duration_s)), h("td", {}, when(t.created_at)))));
  }
  await load();
  const reload = debounce(load, 150);
  live("/ui/api/tasks/live", { tasks: reload, reload });
}

// ----------------------------------------------------------------------- one task

function stepGraph(plan, steps) {
  const depth = {};
  const byId = Object.fromEntries(plan.map((p) => [p.id, p]));
  const d = (id, seen = new Set()) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id) || !byId[id]) return 0;
    seen.add(id);
    depth[id] = Math.max(-1, ...byId[id].depends_on.map((x) => d(x, seen))) + 1;
    return depth[id];
  };
  plan.forEach((p) => d(p.id));
  const cols = [];
  plan.forEach((p) => { (cols[depth[p.id]] = cols[depth[p.id]] || []).push(p); });
  return h("div", { class: "graph", "data-testid": "graph" }, cols.map((col) => h("div", { class: "col" },
    col.map((p) => {
      const s = steps[p.id] || { status: "pending" };
      return h("div", { class: `node s-${s.status}`, "data-step": p.id, "data-status": s.status },
        h("b", {}, p.id), " ", badge(s.status),
        h("small", {}, `${p.skill}${s.agent ? " · " + s.agent : ""}`),
        h("small", {}, `${s.model_calls || 0} model, ${s.tool_calls || 0} tool calls · ${money(s.cost_usd || 0)}`),
        p.depends_on.length ? h("small", {}, "after " + p.depends_on.join(", ")) : null,
        s.reason ? h("small", { class: "error" }, s.reason) : null,
        s.input || s.output ? h("details", {}, h("summary", {}, "input / output"),
          s.input ? json(s.input) : null, s.output ? json(s.output) : null) : null);
    }))));
}

function approvalRow(p, mayDecide, onDone) {
  const reason = h("input", { placeholder: "reason", "data-testid": "reason" });
  const decide = async (verb) => {
    try {
      await api(`tasks/${p.task_id}/${verb}`, { step_id: p.step_id, tool: p.tool, args_hash: p.args_hash, reason: reason.value });
      toast(`${verb === "approve" ? "approved" : "denied"} ${p.tool} on ${p.task_id}`);
      onDone();
    } catch (e) { toast(e.message, true); }
  };
  const left = h("span", { "data-testid": "time-left" });
  const tick = () => {
    const s = Math.max(0, (new Date(p.expires_at) - Date.now()) / 1000);
    left.textContent = s > 0 ? secs(s) : "expired";
  };
  tick();
  state.timers.push(setInterval(tick, 1000));
  return h("tr", { "data-approval": p.key, "data-task": p.task_id },
    h("td", {}, h("a", { href: "#/task/" + p.task_id }, h("code", {}, p.task_id)), h("br"), `step ${p.step_id} · ${p.agent}`),
    h("td", {}, h("b", {}, p.tool), json(p.arguments)),
    h("td", {}, h("code", { title: p.args_hash }, p.args_hash.slice(0, 16) + "…")),
    h("td", {}, p.rule || "-", h("br"), h("span", { class: "muted" }, p.reason), p.risk ? h("div", {}, badge(p.risk)) : null),
    h("td", {}, left),
    h("td", {}, h("div", { class: "actions" }, reason,
      h("button", { class: "primary", "data-testid": "approve", disabled: !mayDecide, onclick: () => decide("approve") }, "Approve"),
      h("button", { class: "danger", "data-testid": "deny", disabled: !mayDecide, onclick: () => decide("deny") }, "Deny"))));
}

function approvalsTable(rows, mayDecide, onDone) {
  return h("table", { "data-testid": "approvals" },
    h("thead", {}, h("tr", {}, ["task", "call and exact arguments", "hash", "rule / reason", "time left", ""].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((p) => approvalRow(p, mayDecide, onDone))));
}

function eventItem(e) {
  return h("li", { "data-seq": e.seq, "data-type": e.type },
    h("span", { class: "muted" }, "#" + e.seq),
    h("span", { class: "muted" }, new Date(e.time).toLocaleTimeString()),
    h("span", {}, e.step_id ? h("code", {}, e.step_id + " ") : null, e.line));
}

async function viewTask(view, taskId) {
  const timeline = h("ol", { class: "timeline", "data-testid": "timeline" });
  const detail = h("div");
  const seen = new Set();
  const LOG_BASE = 2 ** 40; // step log records (their own stream) are numbered from here
  let lastSeq = 0;
  let lastLog = 0;
  put(view, h("h1", {}, "Task ", h("code", {}, taskId)), detail,
    h("h2", {}, "Timeline (live)"), timeline);
  const append = (e) => {
    if (seen.has(e.seq)) return;
    seen.add(e.seq);
    if (e.seq >= LOG_BASE) lastLog = Math.max(lastLog, e.seq);
    else lastSeq = Math.max(lastSeq, e.seq);
    timeline.append(eventItem(e));
  };

  async function load() {
    const t = await api("tasks/" + encodeURIComponent(taskId));
    t.events.forEach(append);
    const s = t.summary;
    const mayAct = state.me && state.me.may_act;
    const actions = h("div", { class: "actions" });
    if (!t.terminal) {
      actions.append(h("button", { class: "danger", "data-testid": "cancel", disabled: !mayAct, onclick: async () => {
        if (!confirm("Cancel task " + taskId + "?")) return;
        try { await api(`tasks/${taskId}/cancel`, { reason: "canceled from the dashboard" }); toast("cancel requested"); } catch (e) { toast(e.message, true); }
      } }, "Cancel task"));
    } else {
      const step = h("select", { "data-testid": "fork-step" }, t.plan.map((p) => h("option", { value: p.id }, p.id)));
      const model = h("input", { placeholder: "agent=provider:model (optional)", "data-testid": "fork-model" });
      const go = async (fork) => {
        const body = {};
        if (fork) {
          body.from_step = step.value;
          const m = model.value.trim();
          if (m) { const [a, v] = m.split("="); body.models = { [a.trim()]: (v || "").trim() }; }
        }
        try { const r = await api(`tasks/${taskId}/replay`, body); location.hash = "#/task/" + r.task_id; } catch (e) { toast(e.message, true); }
      };
      actions.append(h("button", { "data-testid": "replay", disabled: !mayAct, onclick: () => go(false) }, "Replay"),
        " fork from ", step, model, h("button", { "data-testid": "fork", disabled: !mayAct || !t.plan.length, onclick: () => go(true) }, "Fork"));
    }
    const pending = s.pending || [];
    const byStep = {};
    t.calls.forEach((c) => { (byStep[c.step_id || "(orchestrator)"] = byStep[c.step_id || "(orchestrator)"] || []).push(c); });
    put(detail,
      h("dl", { class: "kv" },
        h("dt", {}, "state"), h("dd", { "data-testid": "task-status" }, badge(s.status), s.reason ? " " + s.reason : ""),
        h("dt", {}, "workflow"), h("dd", {}, s.workflow || s.planner || "-"),
        h("dt", {}, "user"), h("dd", {}, s.user_id || "-"),
        h("dt", {}, "goal"), h("dd", {}, s.goal || "-"),
        h("dt", {}, "cost"), h("dd", {}, costBar(s.cost_usd, s.budget_usd), ` · ${s.tokens} tokens · ${s.model_calls} model / ${s.tool_calls} tool calls`),
        h("dt", {}, "duration"), h("dd", {}, secs(s.duration_s), ` (created ${when(s.created_at)})`),
        s.replay_of ? [h("dt", {}, "replay of"), h("dd", {}, h("a", { href: "#/task/" + s.replay_of }, s.replay_of))] : null,
        t.trace_url ? [h("dt", {}, "trace"), h("dd", {}, h("a", { href: t.trace_url, target: "_blank", rel: "noopener" }, "open trace"))] : null),
      actions,
      pending.length ? [h("h2", {}, "Waiting for approval"), approvalsTable(pending, mayAct, load)] : null,
      h("h2", {}, "Steps"), stepGraph(t.plan, t.steps),
      h("h2", {}, "Model and tool calls"),
      Object.keys(byStep).length ? h("table", { "data-testid": "calls" },
        h("thead", {}, h("tr", {}, ["step", "call", "tokens", "cost", "latency", "in / out"].map((c) => h("th", {}, c)))),
        h("tbody", {}, Object.entries(byStep).flatMap(([step, calls]) => calls.map((c) => h("tr", {},
          h("td", {}, step), h("td", {}, `${c.kind} ${c.name}`, c.error ? h("div", { class: "error" }, c.error) : null),
          h("td", {}, c.kind === "model" ? `${c.input_tokens}+${c.output_tokens}` : "-"),
          h("td", {}, c.kind === "model" ? money(c.cost_usd) : "-"),
          h("td", {}, `${Math.round(c.latency_ms)} ms`),
          h("td", {}, c.arguments !== undefined ? json(c.arguments) : null, json(c.output))))))) : h("p", { class: "muted" }, "none yet"),
      h("h2", {}, "Policy decisions"),
      t.policy.length ? h("table", { "data-testid": "policy" }, h("tbody", {}, t.policy.map((p) => h("tr", {},
        h("td", {}, p.step_id), h("td", {}, p.tool), h("td", {}, badge(p.decision)), h("td", {}, p.rule), h("td", {}, p.reason))))) : h("p", { class: "muted" }, "none"),
      t.result ? [h("h2", {}, "Result"), json(t.result)] : null);
    return t;
  }

  await load();
  const refresh = debounce(load, 200);
  live(`/ui/api/tasks/${encodeURIComponent(taskId)}/live?after=${lastSeq}&after_log=${lastLog}`, {
    ledger: (e) => { append(e); refresh(); },
  });
}

// ----------------------------------------------------------------------- approvals

async function viewApprovals(view) {
  const box = h("div");
  put(view, h("h1", {}, "Approvals inbox"), box);
  async function load() {
    state.timers.forEach((t) => clearInterval(t));
    state.timers = [];
    const data = await api("approvals");
    put(box, data.approvals.length ? approvalsTable(data.approvals, data.may_decide, load)
      : h("p", { class: "muted", "data-testid": "inbox-empty" }, "Nothing waits for a decision."),
    data.may_decide ? null : h("p", { class: "muted" }, "Read-only login: you see the inbox but cannot decide."));
    shown = signature(data.approvals);
    // Also look again every few seconds, and redraw only if the pending set changed (a
    // reason being typed stays): a change that landed between this read and the live
    // stream's start is never missed for long. Cleared when the view is left.
    state.timers.push(setTimeout(check, 3000));
  }
  let shown = "";
  const signature = (rows) => JSON.stringify(rows.map((r) => [r.task_id, r.key]));
  async function check() {
    try {
      if (signature((await api("approvals")).approvals) !== shown) return reload();
    } catch (_) { /* tried again below */ }
    state.timers.push(setTimeout(check, 3000));
  }
  const reload = debounce(load, 150);
  live("/ui/api/tasks/live", { tasks: reload, reload });  // subscribed before the first read
  await load();
}

// ----------------------------------------------------------------------- agents

async function viewAgents(view) {
  const data = await api("agents");
  put(view, h("h1", {}, "Agents"), h("div", { class: "grid", "data-testid": "agents" },
    data.agents.map((a) => h("div", { class: "card", "data-agent": a.name },
      h("h2", {}, a.name, " ", h("span", { class: "muted" }, a.version), " ",
        h("span", { class: "badge " + (a.signed ? "s-completed" : "s-canceled") }, a.signed ? "signed card" : "unsigned card")),
      h("p", {}, `${a.replicas.length} replica(s): `, a.replicas.map((r) => r.replica + (r.model ? ` (${r.model})` : "")).join(", ")),
      h("h2", {}, "Skills"),
      a.skills.map((s) => h("details", {}, h("summary", {}, h("b", {}, s.id), " ", s.description || ""),
        h("div", {}, "input"), json(s.input_schema || {}), h("div", {}, "output"), json(s.output_schema || {}))),
      h("h2", {}, "Breakers"),
      Object.keys(a.breakers).length ? h("table", {}, h("tbody", {}, Object.entries(a.breakers).map(([n, b]) =>
        h("tr", {}, h("td", {}, n), h("td", {}, badge(b.state || JSON.stringify(b))))))) : h("p", { class: "muted" }, "none"),
      h("details", {}, h("summary", {}, "card"), json(a.card))))),
  Object.keys(data.refused).length ? [h("h2", {}, "Refused cards"), json(data.refused)] : null);
}

// ----------------------------------------------------------------------- dead letters

async function viewDlq(view) {
  const data = await api("dlq");
  const mayAct = state.me && state.me.may_act;
  put(view, h("h1", {}, "Dead letters"), data.dead_letters.length ? h("table", { "data-testid": "dlq" },
    h("thead", {}, h("tr", {}, ["seq", "from", "task", "reason", "bytes", ""].map((c) => h("th", {}, c)))),
    h("tbody", {}, data.dead_letters.map((d) => h("tr", { "data-seq": d.seq },
      h("td", {}, d.seq), h("td", {}, `${d.stream}/${d.consumer}`, h("br"), h("code", {}, d.subject)),
      h("td", {}, d.task_id ? h("a", { href: "#/task/" + d.task_id }, d.task_id) : "-"),
      h("td", {}, d.reason, h("div", { class: "muted" }, `${d.deliveries} deliveries`)),
      h("td", {}, `${d.data_bytes} bytes`, json(d.data)),
      h("td", {}, h("button", { "data-testid": "redrive", disabled: !mayAct, onclick: async () => {
        try { await api(`dlq/${d.seq}/redrive`, {}); toast(`redriven to ${d.subject}`); viewDlq(view); } catch (e) { toast(e.message, true); }
      } }, "Redrive"))))))
    : h("p", { class: "muted", "data-testid": "dlq-empty" }, "No dead letters."));
}

// ----------------------------------------------------------------------- stats

function barChart(title, rows, key, fmt = (v) => v) {
  const w = 480, hgt = 140, pad = 24;
  const vals = rows.map((r) => r[key] || 0);
  const max = Math.max(1e-9, ...vals);
  const bw = rows.length ? (w - pad) / rows.length : 0;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("width", "100%");
  rows.forEach((r, i) => {
    const v = vals[i];
    const bh = ((hgt - pad) * v) / max;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", pad + i * bw + 2);
    rect.setAttribute("y", hgt - pad - bh);
    rect.setAttribute("width", Math.max(1, bw - 4));
    rect.setAttribute("height", bh);
    rect.setAttribute("fill", "#2563eb");
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${new Date(r.hour).toLocaleString()}: ${fmt(v)}`;
    rect.append(tip);
    svg.append(rect);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 4);
  label.setAttribute("y", 14);
  label.setAttribute("font-size", 11);
  label.textContent = `max ${fmt(max)}`;
  svg.append(label);
  return h("div", { class: "card" }, h("b", {}, title), h("div", {}, svg));
}

async function viewStats(view) {
  const data = await api("stats");
  const f = data.figures.all;
  const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%");
  const rate = data.series.map((r) => ({ ...r, rate: r.tasks ? r.completed / r.tasks : 0, esc: r.tasks ? r.escalated / r.tasks : 0 }));
  put(view, h("h1", {}, `Stats (last ${data.hours} h)`),
    h("dl", { class: "kv", "data-testid": "stats" },
      h("dt", {}, "tasks finished"), h("dd", {}, f.tasks),
      h("dt", {}, "completion rate"), h("dd", {}, pct(f.completion_rate)),
      h("dt", {}, "cost per completed task"), h("dd", {}, money(f.cost_per_completed_task)),
      h("dt", {}, "escalation rate"), h("dd", {}, pct(f.escalation_rate)),
      h("dt", {}, "latency p50 / p95 / p99"), h("dd", {}, [f.latency_s.p50, f.latency_s.p95, f.latency_s.p99].map(secs).join(" / ")),
      h("dt", {}, "by outcome"), h("dd", {}, JSON.stringify(f.by_outcome))),
    h("div", { class: "grid" },
      barChart("completion rate per hour", rate, "rate", pct),
      barChart("cost per hour", rate, "cost_usd", money),
      barChart("escalation rate per hour", rate, "esc", pct),
      barChart("latency p50 per hour", rate, "latency_p50_s", secs)));
}

// ----------------------------------------------------------------------- router

async function route() {
  leaveView();
  delete $("#view").dataset.ready;
  if (!state.me) {
    try { state.me = await api("me"); } catch (_) { return; }
  }
  $("#login").hidden = true;
  $("#nav").hidden = false;
  put($("#who"), `${state.me.name} (${state.me.role})`, h("button", { onclick: logout }, "Log out"));
  const [, name = "tasks", arg] = (location.hash || "#/tasks").split("/");
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  const view = $("#view");
  view.dataset.view = name;
  const views = { tasks: viewTasks, task: (v) => viewTask(v, decodeURIComponent(arg || "")),
    approvals: viewApprovals, agents: viewAgents, dlq: viewDlq, stats: viewStats };
  try {
    await (views[name] || viewTasks)(view);
    view.dataset.ready = name;
  } catch (e) {
    put(view, h("p", { class: "error" }, e.message));
  }
}

async function inboxBadge() {
  if (!state.me) return;
  try {
    const data = await api("approvals");
    const b = $("#inbox-count");
    b.textContent = data.approvals.length;
    b.hidden = !data.approvals.length;
  } catch (_) { /* shown on the next try */ }
}

$("#login-form").addEventListener("submit", doLogin);
window.addEventListener("hashchange", route);
setInterval(inboxBadge, 5000);
route();
