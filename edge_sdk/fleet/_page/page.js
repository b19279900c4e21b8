// The fleet page: polls the JSON API and renders with text nodes only (a device's
// strings are never parsed as markup). No external resources.
"use strict";

const POLL_MS = 1500;
const ORDER = ["committed", "sent", "signing", "pending", "failed", "rolled_back", "refused", "silent"];
const view = { sort: "id", dir: 1, device: null, filters: {} };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function when(ts) {
  if (!ts) return "";
  return new Date(ts * 1000).toLocaleTimeString();
}

async function api(path) {
  const r = await fetch(path, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.status);
  return body;
}

function tagsText(tags) {
  return Object.entries(tags || {}).map(([k, v]) =>
    `${k}=${v !== null && typeof v === "object" ? Object.entries(v).map(([a, b]) => `${a} ${b}`).join(", ") : v}`)
    .join("; ");
}

// What a device reports about itself: any JSON, so every value becomes plain text.
function asText(v) {
  return typeof v === "string" ? v : JSON.stringify(v);
}

function reportedText(d) {
  const groups = (d.reported_groups || []).map(asText).join(", ");
  const tags = Object.entries(d.reported_tags || {}).map(([k, v]) => `${k}=${asText(v)}`).join("; ");
  return [groups, tags].filter((x) => x).join(" · ");
}

function cell(key, d) {
  if (key === "groups") return (d.groups || []).join(", ");
  if (key === "tags") return tagsText(d.tags);
  if (key === "last_seen") return when(d.last_seen);
  if (key === "online") return d.online ? 1 : 0;
  return d[key] === null || d[key] === undefined ? "" : d[key];
}

function renderDevices(devs) {
  const body = document.querySelector("#devices tbody");
  const rows = devs.slice().sort((a, b) => {
    const x = a[view.sort] === undefined ? cell(view.sort, a) : a[view.sort];
    const y = b[view.sort] === undefined ? cell(view.sort, b) : b[view.sort];
    const sx = typeof x === "object" ? JSON.stringify(x) : x;
    const sy = typeof y === "object" ? JSON.stringify(y) : y;
    return (sx > sy ? 1 : sx < sy ? -1 : 0) * view.dir || (a.id > b.id ? 1 : -1);
  });
  body.replaceChildren(...rows.map((d) => {
    const tr = el("tr", { "data-device": d.id, class: d.id === view.device ? "selected" : null },
      el("th", { scope: "row" }, el("button", { type: "button", class: "dev" }, d.id)),
      el("td", { class: d.online ? "on" : "off" }, d.online ? "online" : "offline"),
      el("td", {}, cell("groups", d)), el("td", {}, cell("tags", d)),
      el("td", { class: (d.mismatch || []).length ? "mismatch" : null, title: (d.mismatch || []).join("\n") || null },
        (d.mismatch || []).length ? "⚠ " : "", reportedText(d)),
      el("td", {}, d.model || "—"), el("td", {}, d.version || "—"), el("td", {}, d.phase || ""),
      el("td", { title: d.last_reason || "" }, d.last_result || ""),
      el("td", {}, when(d.last_seen)));
    tr.querySelector("button").addEventListener("click", () => selectDevice(d.id));
    return tr;
  }));
  document.getElementById("devices-caption").textContent =
    `${devs.length} device${devs.length === 1 ? "" : "s"} (${devs.filter((d) => d.online).length} online)`;
  for (const th of document.querySelectorAll("#devices th[data-key]")) {
    if (th.dataset.key === view.sort) th.setAttribute("aria-sort", view.dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

function waveRow(r, p) {
  const total = p.devices || 1;
  const statuses = Object.keys(p.by_status).sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
  const summary = statuses.map((s) => `${p.by_status[s]} ${s.replace("_", " ")}`).join(", ");
  const done = p.by_status.committed || 0;
  const others = statuses.filter((s) => s !== "committed")
    .map((s) => `${p.by_status[s]} ${s.replace("_", " ")}`).join(", ");
  const label = `Wave ${p.wave}: ${done} of ${p.devices} committed` + (summary ? ` (${summary})` : "");
  const bar = el("div", { class: "bar", role: "img", "aria-label": label });
  for (const s of statuses) {
    const seg = el("div", { class: `seg seg-${s}`, title: `${p.by_status[s]} ${s}` });
    seg.style.width = `${(100 * p.by_status[s]) / total}%`;
    bar.append(seg);
  }
  const current = r.wave === p.wave && ["running", "paused"].includes(r.status);
  return el("div", { class: "wave", "data-wave": p.wave },
    el("span", {}, `Wave ${p.wave}${current ? " ◀" : ""}`), bar,
    el("span", { class: "counts" }, `${done}/${p.devices} committed` + (others ? ` · ${others}` : "")));
}

function renderRollouts(rs) {
  const box = document.getElementById("rollouts");
  if (!rs.length) { box.replaceChildren(el("p", { class: "empty" }, "No rollouts.")); return; }
  box.replaceChildren(...rs.map((r) => {
    const sel = Object.entries(r.selector || {}).map(([k, v]) => `${k}: ${v.join(", ")}`).join("; ");
    const art = el("article", { class: "rollout", id: `rollout-${r.id}`, "data-status": r.status,
      "aria-labelledby": `rollout-${r.id}-h` },
      el("h3", { id: `rollout-${r.id}-h` }, `Rollout ${r.id}: ${r.model} ${r.version} `,
        el("span", { class: `status status-${r.status}` }, r.status),
        r.waves ? ` wave ${r.wave} of ${r.waves}` : ""),
      el("p", { class: "counts" }, `selector ${sel} · started ${when(r.created)} by ${r.created_by}` +
        ` · updated ${when(r.updated)}`),
      r.reason ? el("p", { class: "reason" }, r.reason) : null,
      ...r.progress.map((p) => waveRow(r, p)));
    if (r.failures.length) {
      art.append(el("table", { class: "failures" },
        el("caption", {}, `${r.failures.length} failure${r.failures.length === 1 ? "" : "s"}`),
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Device"),
          el("th", { scope: "col" }, "Status"), el("th", { scope: "col" }, "Reason"))),
        el("tbody", {}, ...r.failures.map((f) => el("tr", {},
          el("td", {}, f.device), el("td", {}, f.status), el("td", {}, f.reason || ""))))));
    }
    return art;
  }));
}

function renderModels(ms) {
  document.querySelector("#models tbody").replaceChildren(...ms.map((m) => el("tr", {},
    el("td", {}, m.model || "— none —"), el("td", {}, m.version || ""),
    el("td", {}, m.devices), el("td", {}, m.online))));
}

function renderHistory(doc) {
  const sec = document.getElementById("history");
  if (!doc) { sec.hidden = true; return; }
  const d = doc.device;
  sec.hidden = false;
  document.getElementById("history-h").textContent = `History of ${d.id}`;
  const facts = [["Model", `${d.model || "—"} ${d.version || ""}`],
    ["Previous", `${d.previous_model || "—"} ${d.previous_version || ""}`],
    ["Last result", `${d.last_result || ""} ${d.last_reason ? "— " + d.last_reason : ""}`],
    ["Groups (assigned)", (d.groups || []).join(", ") || "—"], ["Tags (assigned)", tagsText(d.tags) || "—"],
    ["Reported by the device", reportedText(d) || "—"],
    ["Differs", (d.mismatch || []).join("; ") || "—"],
    ["Hardware (reported)", tagsText(d.hardware)],
    ["First seen", d.first_seen ? new Date(d.first_seen * 1000).toLocaleString() : "never reported"]];
  document.getElementById("history-facts").replaceChildren(
    ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  document.querySelector("#history-table tbody").replaceChildren(...doc.history.map((e) => el("tr", {},
    el("td", {}, when(e.ts)), el("td", {}, e.kind), el("td", {}, e.deployment ?? ""),
    el("td", {}, e.model ? `${e.model} ${e.version || ""}` : ""), el("td", {}, e.reason || ""))));
}

function selectDevice(id) {
  view.device = id;
  history.replaceState(null, "", `#device=${encodeURIComponent(id)}`);
  refresh();
  document.getElementById("history").scrollIntoView({ behavior: "smooth" });
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  const status = document.getElementById("updated");
  try {
    const q = new URLSearchParams(Object.entries(view.filters).filter(([, v]) => v));
    const [devs, rs, ms] = await Promise.all([api(`/api/devices?${q}`), api("/api/rollouts"), api("/api/models")]);
    renderDevices(devs);
    renderRollouts(rs);
    renderModels(ms);
    renderHistory(view.device ? await api(`/api/devices/${encodeURIComponent(view.device)}`).catch(() => null) : null);
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    status.textContent = `cannot reach the controller: ${err.message}`;
  } finally {
    busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const m = /^#device=(.+)$/.exec(location.hash);
  if (m) view.device = decodeURIComponent(m[1]);
  document.getElementById("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    view.filters = Object.fromEntries(new FormData(ev.target).entries());
    refresh();
  });
  for (const th of document.querySelectorAll("#devices th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      view.dir = view.sort === th.dataset.key ? -view.dir : 1;
      view.sort = th.dataset.key;
      refresh();
    });
  }
  refresh();
  setInterval(refresh, POLL_MS);
});
