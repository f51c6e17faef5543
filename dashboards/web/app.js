// rayfleet ops dashboard: reads /dashboard/api/events (server-sent events, one fleet state a second) and
// draws it; its controls POST to /dashboard/api/{scale,drain,migrate} after a confirmation. No dependencies.
"use strict";

const ROOT = location.pathname.replace(/\/+$/, "");
const HISTORY = 300; // points kept for the charts: five minutes at one state a second
const SVG = "http://www.w3.org/2000/svg";
const view = {
  key: sessionStorage.getItem("rayfleet-key") || "",
  history: [], // {t, tps, tif}
  replicas: new Map(), // replica id -> {kv: [], tps: []}
  hitRate: [],
  pools: new Map(), // pool name -> its section's live elements
  last: null,
};

// ---------------------------------------------------------------- DOM helpers (text only, never HTML)
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}
const $ = (id) => document.getElementById(id);
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
const pct = (x) => `${(100 * x).toFixed(1)}%`;
const fmt = (x, digits = 1) => (x >= 1000 ? `${(x / 1000).toFixed(digits)}k` : x.toFixed(digits));
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function push(list, value) {
  list.push(value);
  if (list.length > HISTORY) list.splice(0, list.length - HISTORY);
}
function table(node, header, rows, empty) {
  node.replaceChildren(el("tr", {}, header.map((h) => el("th", {}, h))));
  if (!rows.length) node.append(el("tr", {}, el("td", { colspan: header.length, class: "empty" }, empty)));
  for (const row of rows) node.append(row);
}
// Like `table`, but a row already shown (same `data-key`) keeps every cell whose markup did not change: a click on
// a chip or a button must not land on a node the next refresh replaced (the handlers read the latest status).
function patchTable(node, header, rows, empty) {
  const shown = new Map([...node.querySelectorAll(":scope > tr[data-key]")].map((tr) => [tr.dataset.key, tr]));
  const next = rows.map((row) => {
    const prev = shown.get(row.dataset.key);
    if (!prev || prev.children.length !== row.children.length) return row;
    for (const name of row.getAttributeNames()) prev.setAttribute(name, row.getAttribute(name));
    const fresh = [...row.children];
    [...prev.children].forEach((cell, i) => { if (cell.outerHTML !== fresh[i].outerHTML) cell.replaceWith(fresh[i]); });
    return prev;
  });
  const current = [...node.children].slice(1);
  if (next.length && next.length === current.length && next.every((row, i) => row === current[i])) return;
  table(node, header, next, empty);
}

// ---------------------------------------------------------------- charts
function lineChart(node, series, { height = 160, width = 800 } = {}) {
  node.replaceChildren();
  for (const [i, s] of series.entries()) {
    const values = s.values;
    if (values.length < 2) continue;
    const max = Math.max(...values, s.min ?? 1e-9);
    const step = width / (HISTORY - 1);
    const x0 = width - (values.length - 1) * step;
    const points = values.map((v, j) => `${(x0 + j * step).toFixed(1)},${(height - 4 - (v / max) * (height - 20)).toFixed(1)}`);
    node.append(svg("polyline", { points: points.join(" "), class: `line ${s.cls}` }));
    const label = svg("text", { x: i ? width - 4 : 4, y: 12, class: `axis ${s.cls}`, "text-anchor": i ? "end" : "start" });
    label.textContent = `max ${fmt(max)}`;
    node.append(label);
  }
}
function sparkline(values, cls, max) {
  const node = svg("svg", { viewBox: "0 0 60 16", class: "spark", preserveAspectRatio: "none" });
  if (values.length > 1) {
    const top = max ?? Math.max(...values, 1e-9);
    const points = values.map((v, j) => `${((60 * j) / (values.length - 1)).toFixed(1)},${(15 - (v / top) * 14).toFixed(1)}`);
    node.append(svg("polyline", { points: points.join(" "), class: `line ${cls}` }));
  }
  return node;
}
function bar(fraction, label) {
  return el("span", { class: "bar", title: label },
    el("span", { class: `fill ${fraction > 0.9 ? "hot" : ""}`, style: `width:${Math.min(100, 100 * fraction).toFixed(1)}%` }),
    el("span", { class: "barlabel" }, label));
}

// ---------------------------------------------------------------- rendering
function render(s) {
  view.last = s;
  const replicas = s.replicas;
  const sum = (f) => replicas.reduce((acc, r) => acc + f(r), 0);
  const ready = replicas.filter((r) => r.state === "ready").length;
  const desired = Object.values(s.pools).reduce((acc, p) => acc + p.desired, 0);
  push(view.history, { t: s.at, tps: sum((r) => r.decode_tokens_per_s), tif: sum((r) => r.tokens_in_flight) });
  for (const r of replicas) {
    const h = view.replicas.get(r.replica_id) ?? { kv: [], tps: [] };
    push(h.kv, r.kv_cache_usage);
    push(h.tps, r.decode_tokens_per_s);
    view.replicas.set(r.replica_id, h);
  }
  for (const id of [...view.replicas.keys()]) if (!replicas.some((r) => r.replica_id === id)) view.replicas.delete(id);

  $("fleet-name").textContent = s.fleet;
  const priced = Object.entries(s.migration_policy?.pause_s ?? {})
    .map(([pool, pause]) => `${pool} ${(1e3 * pause).toFixed(0)} ms`).join(", ");
  $("policies").textContent = `router ${s.ingress.router} · migration ${s.ingress.migration_policy}` +
    (priced ? ` (moves priced at a pause of ${priced})` : "");
  $("replica-count").textContent = `${ready} / ${desired}`;
  $("in-flight").textContent = `${sum((r) => r.running)} / ${sum((r) => r.waiting)}`;
  $("fleet-tps").textContent = fmt(sum((r) => r.decode_tokens_per_s));
  $("fleet-kv").textContent = replicas.length ? pct(sum((r) => r.kv_cache_usage) / replicas.length) : "–";
  const migrated = s.migrations.filter((m) => m.outcome === "migrated");
  const lastMigration = migrated[migrated.length - 1];
  $("mig-count").textContent = `${s.migrations.length}${lastMigration ? ` (${(1e3 * lastMigration.downtime_s).toFixed(1)} ms)` : ""}`;
  lineChart($("load-chart"), [
    { values: view.history.map((p) => p.tps), cls: "c1" },
    { values: view.history.map((p) => p.tif), cls: "c2" },
  ]);
  renderPools(s);
  renderMigrations(s);
  renderRouting(s.routing);
  renderKVStore(s.kv_store);
  renderRL(s.rl_jobs ?? []);
  renderAudit(s.audit);
}

function renderPools(s) {
  const host = $("pools");
  for (const [name, pool] of Object.entries(s.pools)) {
    let section = view.pools.get(name);
    if (!section) {
      section = poolSection(name, pool);
      view.pools.set(name, section);
      host.append(section.root);
    }
    section.title.textContent = `${pool.ready} / ${pool.desired} ready · min ${pool.min} · max ${pool.max} · ${pool.restarts} replaced`;
    section.model.textContent = pool.model;
    section.input.min = pool.min;
    section.input.max = pool.max;
    if (document.activeElement !== section.input) section.input.value = pool.desired;
    const rows = s.replicas.filter((r) => r.pool === name).map((r) => replicaRow(r, s));
    patchTable(section.table, ["replica", "hardware", "state", "running", "waiting", "KV usage", "", "tokens in flight",
      "decode tok/s", "", "requests", ""], rows, "no replicas");
  }
}

function poolSection(name, pool) {
  const input = el("input", { type: "number", min: pool.min, max: pool.max, value: pool.desired, "data-testid": `scale-input-${name}` });
  const button = el("button", { "data-testid": `scale-${name}`, on: { click: () => scale(name, Number(input.value)) } }, "Scale");
  const title = el("span", { class: "muted", "data-testid": `pool-title-${name}` });
  const model = el("span", { class: "muted model" });
  const tableNode = el("table", { "data-testid": `replicas-${name}` });
  const root = el("section", { class: "card pool", "data-testid": `pool-${name}` },
    el("div", { class: "pool-head" }, el("h2", {}, name), title, model,
      el("span", { class: "grow" }), el("label", {}, "replicas ", input), button),
    tableNode);
  return { root, title, model, input, table: tableNode };
}

function replicaRow(r, s) {
  const h = view.replicas.get(r.replica_id) ?? { kv: [], tps: [] };
  const peers = s.replicas.filter((p) => p.pool === r.pool && p.state === "ready" && p.replica_id !== r.replica_id);
  const chips = r.requests.map((id) => el("button", {
    class: "chip", title: peers.length ? "migrate this request" : "no other ready replica in this pool",
    disabled: !peers.length || r.state !== "ready" && r.state !== "draining", "data-testid": "request",
    on: { click: () => migrate(id, r.replica_id) },
  }, id.slice(-10)));
  return el("tr", { "data-testid": "replica-row", "data-key": r.replica_id, "data-replica": r.replica_id, "data-state": r.state },
    el("td", { class: "mono" }, r.replica_id),
    el("td", {}, r.accelerator || "–"),
    el("td", {}, el("span", { class: `badge ${r.state}` }, r.state), r.last_error ? el("span", { class: "err", title: r.last_error }, " !") : null),
    el("td", { class: "num" }, String(r.running)),
    el("td", { class: "num" }, String(r.waiting)),
    el("td", {}, bar(r.kv_cache_usage, pct(r.kv_cache_usage))),
    el("td", {}, sparkline(h.kv, "c3", 1)),
    el("td", { class: "num" }, String(r.tokens_in_flight)),
    el("td", { class: "num" }, fmt(r.decode_tokens_per_s)),
    el("td", {}, sparkline(h.tps, "c1")),
    el("td", { class: "chips" }, chips),
    el("td", {}, el("button", {
      "data-testid": `drain-${r.replica_id}`, disabled: r.state !== "ready",
      on: { click: () => drain(r.replica_id) },
    }, "Drain")));
}

function renderMigrations(s) {
  const chart = $("mig-chart");
  chart.replaceChildren();
  const records = s.migrations;
  if (records.length) {
    const t0 = Math.min(...records.map((m) => m.started_at));
    const span = Math.max(s.at - t0, 1);
    for (const m of records) {
      const ms = Math.max(1e3 * m.downtime_s, 0.1);
      const y = 130 - ((Math.log10(ms) + 1) / 5) * 120; // 0.1 ms .. 10 s
      const r = 3 + 2 * Math.log10(1 + m.bytes_moved / 65536);
      const dot = svg("circle", { cx: (8 + ((m.started_at - t0) / span) * 784).toFixed(1), cy: y.toFixed(1), r: r.toFixed(1),
        class: m.outcome === "migrated" ? "ok" : "bad" });
      const tip = svg("title");
      tip.textContent = `${m.request_id}: ${m.src} → ${m.dst}, ${m.outcome}, ${ms.toFixed(1)} ms, ${bytes(m.bytes_moved)}`;
      dot.append(tip);
      chart.append(dot);
    }
  }
  const rows = records.slice(-12).reverse().map((m) => el("tr", {},
    el("td", {}, clock(m.started_at)), el("td", { class: "mono" }, m.request_id.slice(-10)),
    el("td", { class: "mono" }, `${m.src} → ${m.dst}`), el("td", {}, m.mode),
    el("td", {}, el("span", { class: `badge ${m.outcome === "migrated" ? "ready" : "draining"}`, title: m.reason || "" }, m.outcome)),
    el("td", { class: "num" }, `${(1e3 * m.downtime_s).toFixed(1)} ms`), el("td", { class: "num" }, bytes(m.bytes_moved)),
    el("td", { class: "num" }, String(m.stages))));
  table($("migrations"), ["time", "request", "from → to", "mode", "outcome", "downtime", "bytes", "stages"], rows,
    "no migrations yet");
}

function renderRouting(decisions) {
  const rows = [];
  for (const d of decisions.slice().reverse().slice(0, 15)) {
    rows.push(el("tr", {}, el("td", {}, clock(d.at)), el("td", { class: "mono" }, d.request_id.slice(-10)),
      el("td", {}, d.model), el("td", {}, d.pool), el("td", { class: "mono" }, d.replica_id), el("td", { class: "muted" }, d.reason || "")));
    if (Array.isArray(d.candidates) && d.candidates.length) rows.push(candidateRow(d.candidates));
  }
  table($("routing"), ["time", "request", "asked", "pool", "replica", "why"], rows, "no requests routed by this ingress yet");
}

function candidateRow(candidates) {
  // Whatever the router explains per candidate (predicted quality, latency...), one column per field.
  const keys = [...new Set(candidates.flatMap((c) => Object.keys(c)))];
  const cell = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v ?? ""));
  const inner = el("table", { class: "candidates" }, el("tr", {}, keys.map((k) => el("th", {}, k.replaceAll("_", " ")))),
    candidates.map((c) => el("tr", {}, keys.map((k) => el("td", { class: "num" }, cell(c[k]))))));
  return el("tr", { class: "sub" }, el("td", { colspan: 6 }, inner));
}

function renderKVStore(shards) {
  const host = $("kv-store");
  if (!shards) {
    host.replaceChildren(el("p", { class: "empty" }, "No KV store in this fleet (add kv_store: to the fleet spec)."));
    return;
  }
  const total = (k) => shards.reduce((acc, s) => acc + s[k], 0);
  const memory = total("hits_memory"), disk = total("hits_disk"), misses = total("misses");
  const asked = memory + disk + misses;
  push(view.hitRate, asked ? (memory + disk) / asked : 0);
  const share = (n) => (asked ? (100 * n) / asked : 0).toFixed(1);
  host.replaceChildren(
    el("p", {}, el("b", {}, asked ? pct((memory + disk) / asked) : "–"), " hit rate over ", String(asked), " blocks asked ",
      sparkline(view.hitRate, "c1", 1)),
    el("div", { class: "stack", title: "memory hits / disk hits / misses" },
      el("span", { class: "mem", style: `width:${share(memory)}%` }), el("span", { class: "disk", style: `width:${share(disk)}%` }),
      el("span", { class: "miss", style: `width:${share(misses)}%` })),
    el("p", { class: "legend" }, el("i", { class: "mem" }), `memory ${memory} `, el("i", { class: "disk" }), `disk ${disk} `,
      el("i", { class: "miss" }), `misses ${misses}`),
    el("table", {}, el("tr", {}, el("th", {}, "shard"), el("th", {}, "memory tier"), el("th", {}, "disk tier"), el("th", {}, "evictions")),
      shards.map((s, i) => el("tr", {}, el("td", {}, String(i)),
        el("td", {}, bar(s.memory_capacity_bytes ? s.memory_bytes / s.memory_capacity_bytes : 0, `${bytes(s.memory_bytes)} / ${bytes(s.memory_capacity_bytes)}`)),
        el("td", {}, s.disk_capacity_bytes ? bar(s.disk_bytes / s.disk_capacity_bytes, `${bytes(s.disk_bytes)} / ${bytes(s.disk_capacity_bytes)}`) : "none"),
        el("td", { class: "num" }, `${s.evictions_memory} / ${s.evictions_disk}`)))));
}

function renderRL(jobs) {
  const host = $("rl-jobs");
  if (!jobs.length) {
    host.replaceChildren(el("p", { class: "empty" }, "No RL jobs on this fleet."));
    return;
  }
  host.replaceChildren(...jobs.map((job) => {
    const history = job.history ?? [];
    const chart = svg("svg", { viewBox: "0 0 800 120", class: "chart", preserveAspectRatio: "none" });
    lineChart(chart, [{ values: history.map((p) => p.reward ?? 0), cls: "c1" }, { values: history.map((p) => p.staleness ?? 0), cls: "c2" }], { height: 120 });
    const facts = Object.entries(job).filter(([k, v]) => k !== "history" && typeof v !== "object")
      .map(([k, v]) => el("span", { class: "fact" }, `${k.replaceAll("_", " ")}: `, el("b", {}, typeof v === "number" ? fmt(v, 2) : String(v))));
    return el("div", { class: "rl", "data-testid": "rl-job" }, el("p", {}, facts), chart,
      el("p", { class: "legend" }, el("i", { class: "c1" }), "reward ", el("i", { class: "c2" }), "staleness"));
  }));
}

function renderAudit(entries) {
  const rows = entries.slice().reverse().map((e) => el("tr", {},
    el("td", {}, clock(e.at)), el("td", {}, e.origin), el("td", {}, e.action),
    el("td", { class: "mono" }, Object.entries(e.params).map(([k, v]) => `${k}=${v}`).join(" ")),
    el("td", {}, el("span", { class: `badge ${e.outcome === "ok" ? "ready" : "dead"}` }, e.outcome)),
    el("td", { class: "muted" }, e.detail)));
  table($("audit"), ["time", "by", "action", "what", "outcome", "detail"], rows, "no operator actions yet");
}

// ---------------------------------------------------------------- controls
function ask(text, extra = null) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-extra").replaceChildren(...(extra ? [extra] : []));
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

async function act(action, body, done) {
  const response = await fetch(`${ROOT}/api/${action}`, {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
  });
  const answer = await response.json();
  toast(response.ok ? done(answer) : `${action} refused: ${answer.error?.message ?? response.status}`, !response.ok);
}

async function scale(pool, replicas) {
  const current = view.last.pools[pool];
  if (!(await ask(`Scale pool ${pool} from ${current.desired} to ${replicas} replicas?` +
    (replicas < current.desired ? " Replicas removed are drained first: their requests move or finish." : "")))) return;
  await act("scale", { pool, replicas }, (a) => `pool ${a.pool}: ${a.desired} replicas desired`);
}

function replicaNow(replicaId) {
  const replica = view.last.replicas.find((r) => r.replica_id === replicaId);
  if (!replica) toast(`${replicaId} is gone`, true);
  return replica;
}

async function drain(replicaId) {
  const replica = replicaNow(replicaId);
  if (!replica) return;
  const moving = view.last.ingress.migration_policy !== "none" ? "move to other replicas" : "finish";
  if (!(await ask(`Drain ${replica.replica_id}? It takes no new requests; its ${replica.requests.length} running ` +
    `requests ${moving}; then it stops and pool ${replica.pool} shrinks by one.`))) return;
  await act("drain", { replica_id: replica.replica_id }, (a) => `${a.replica_id} is ${a.state}`);
}

async function migrate(requestId, srcId) {
  const src = replicaNow(srcId);
  if (!src) return;
  const peers = view.last.replicas.filter((p) => p.pool === src.pool && p.state === "ready" && p.replica_id !== srcId);
  const dst = el("select", { "data-testid": "migrate-dst" }, peers.map((p) => el("option", { value: p.replica_id }, p.replica_id)));
  const mode = el("select", { "data-testid": "migrate-mode" }, el("option", { value: "precopy" }, "precopy"),
    el("option", { value: "stop_and_copy" }, "stop and copy"));
  const extra = el("div", {}, el("label", {}, "to ", dst), " ", el("label", {}, "mode ", mode));
  if (!(await ask(`Live-migrate request ${requestId} from ${src.replica_id}?`, extra))) return;
  await act("migrate", { request_id: requestId, src: src.replica_id, dst: dst.value, mode: mode.value },
    (a) => `${a.request_id}: ${a.outcome}${a.outcome === "migrated" ? `, downtime ${(1e3 * a.downtime_s).toFixed(1)} ms` : ` (${a.reason})`}`);
}

function toast(text, bad = false) {
  const node = $("toast");
  node.textContent = text;
  node.className = `show ${bad ? "bad" : ""}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.className = ""; }, 6000);
}

// ---------------------------------------------------------------- the live stream
function headers(extra = {}) {
  return view.key ? { ...extra, Authorization: `Bearer ${view.key}` } : extra;
}
function setLive(live) {
  $("live").textContent = live ? "live" : "reconnecting";
  $("live").className = `live ${live ? "on" : ""}`;
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function follow() {
  for (;;) {
    try {
      const response = await fetch(`${ROOT}/api/events`, { headers: headers(), cache: "no-store" });
      if (response.status === 401) return login("This fleet needs an admin key:");
      if (response.status === 403) return login("That key is not an admin key; the dashboard needs one:");
      if (response.ok) {
        $("login").hidden = true;
        $("main").hidden = false;
        setLive(true);
        await readEvents(response.body);
      }
    } catch (error) {
      if (!(error instanceof TypeError)) throw error; // TypeError: the network dropped; anything else is a bug
    }
    setLive(false);
    await sleep(2000);
  }
}

async function readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5)).join("\n");
      if (data) render(JSON.parse(data));
    }
  }
}

function login(why) {
  $("login-why").textContent = why;
  $("main").hidden = true;
  $("login").hidden = false;
  setLive(false);
  $("key").focus();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  view.key = $("key").value.trim();
  sessionStorage.setItem("rayfleet-key", view.key);
  follow();
});
follow();
