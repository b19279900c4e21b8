// The fleet page: polls the JSON API and renders with DOM text nodes only, so nothing a
// device reports is ever parsed as markup. No external resources.
//
// What a device reports can be any JSON value of any shape (objects with keys such as
// toString or __proto__, arrays, deep nesting, huge strings, numbers where text was
// expected). Every value goes through text(), which turns any of them into a string and
// never throws; and each section (rollouts, devices, models, a device's history) fetches
// and renders on its own, so a failure costs that section (an error shown in it), never
// the page.
"use strict";

const POLL_MS = 1500;
const MAX_TEXT = 200; // characters of one value in a cell; more go to its tooltip
const MAX_TITLE = 2000;
const MAX_ID = 128; // the registry's limit on a device id
// What happened to a rollout's devices, worst first (edge_sdk/fleet/_outcome.py).
const OUTCOMES = ["failed", "gate_failed", "rolled_back", "silent", "rolling_back", "no_traffic",
  "shadowing", "pending", "skipped", "committed"];
const MAX_ITEMS = 12; // items of a reported list shown; the rest are counted
const view = { sort: "id", dir: 1, device: null, filters: {} };

class Unreachable extends Error {}

// Any value as a string of at most `max` characters. Never throws.
function text(v, max = MAX_TEXT) {
  let s;
  try {
    if (v === null || v === undefined) s = "";
    else if (typeof v === "string") s = v;
    else if (typeof v === "number" || typeof v === "boolean") s = String(v);
    // Parsed JSON holds no functions, so JSON.stringify calls no key of the value
    // (a "toJSON" or "toString" key is plain data to it).
    else s = JSON.stringify(v) ?? "";
  } catch (err) {
    s = "[a value that cannot be shown]";
  }
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

function errText(err) {
  return text(err instanceof Error ? err.message : err, 300) || "unknown error";
}

const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const list = (v) => (Array.isArray(v) ? v : []);
const pairs = (v) => (isObj(v) ? Object.keys(v).map((k) => [k, v[k]]) : []);
const count = (v) => (typeof v === "number" && Number.isFinite(v) && v > 0 ? v : 0);
// A value as one CSS class word (status-running): letters, digits, _ and - only.
const word = (v) => text(v, 40).replace(/[^A-Za-z0-9_-]/g, "_");

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined && v !== "") e.setAttribute(k, text(v, MAX_TITLE));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : text(c, MAX_TITLE));
  }
  return e;
}

// A table cell showing any value cut to MAX_TEXT, and up to MAX_TITLE of it as tooltip.
function td(v, attrs) {
  const full = text(v, MAX_TITLE);
  const shown = text(full);
  return el("td", { title: full.length > shown.length ? full : null, ...(attrs || {}) }, shown);
}

function when(ts, long) {
  if (typeof ts !== "number" || !Number.isFinite(ts)) return "";
  const d = new Date(ts * 1000);
  if (Number.isNaN(d.getTime())) return "";
  try {
    return long ? d.toLocaleString() : d.toLocaleTimeString();
  } catch (err) {
    return "";
  }
}

function listText(v) {
  return Array.isArray(v) ? v.map((x) => text(x)).join(", ") : text(v);
}

// Tags: "key=value; key=value", any value shown as text (JSON for nested).
function pairsText(v) {
  if (!isObj(v)) return text(v, MAX_TITLE);
  return pairs(v).map(([k, x]) => `${text(k)}=${text(x)}`).join("; ");
}

// A reported value to read: a list as its items joined by commas (past MAX_ITEMS, "… and
// N more"), an object as "key value, key value" in parentheses, nesting cut at depth 3.
function readable(v, depth = 0) {
  if (Array.isArray(v)) {
    if (depth > 2) return `[${v.length} item${v.length === 1 ? "" : "s"}]`;
    const shown = v.slice(0, MAX_ITEMS).map((x) => readable(x, depth + 1)).join(", ");
    return v.length > MAX_ITEMS ? `${shown} … and ${v.length - MAX_ITEMS} more` : shown;
  }
  if (isObj(v)) {
    if (depth > 2) return "{…}";
    const inner = pairs(v).map(([k, x]) => `${text(k)} ${readable(x, depth + 1)}`).join(", ");
    return depth ? `(${inner})` : inner;
  }
  return text(v);
}

// Hardware facts, one "key: value" per line.
function factsText(v) {
  if (!isObj(v)) return text(v, MAX_TITLE);
  return pairs(v).map(([k, x]) => `${text(k)}: ${text(readable(x), MAX_TITLE)}`).join("\n");
}

// One request and its JSON answer; onStatus sees the status before an error is raised.
async function call(path, init, onStatus) {
  let r;
  try {
    r = await fetch(path, { cache: "no-store", ...init });
  } catch (err) {
    throw new Unreachable(errText(err));
  }
  let body;
  try {
    body = await r.json();
  } catch (err) {
    throw new Error(`the answer (${r.status}) is not JSON`);
  }
  if (onStatus) onStatus(r.status);
  if (!r.ok) throw new Error((isObj(body) && text(body.error, 300)) || `HTTP ${r.status}`);
  return body;
}

function api(path) {
  return call(path, {});
}

function encodeId(id) {
  try {
    return encodeURIComponent(id);
  } catch (err) {
    throw new Error(`device id ${text(id, 40)} cannot be put in a URL`);
  }
}

// What a device reports about its own groups and tags: shown as text, never trusted.
function reportedText(d) {
  return [listText(d.reported_groups), pairsText(d.reported_tags)].filter((x) => x).join(" · ");
}

// Items rendered one by one: an item that cannot be shown is replaced by `broken(item, err)`.
function each(items, render, broken) {
  return items.map((item) => {
    try {
      return render(item);
    } catch (err) {
      return broken(item, err);
    }
  });
}

// -- devices ---------------------------------------------------------------------------

const SORT_KEYS = {
  id: (d) => text(d.id, MAX_TITLE),
  online: (d) => (d.online === true ? 1 : 0),
  groups: (d) => listText(d.groups),
  tags: (d) => pairsText(d.tags),
  reported_groups: (d) => reportedText(d),
  model: (d) => modelsText(d),
  phase: (d) => phaseText(d),
  last_result: (d) => text(d.last_result),
  last_seen: (d) => (typeof d.last_seen === "number" && Number.isFinite(d.last_seen) ? d.last_seen : -Infinity),
};

function sortKey(d) {
  try {
    return isObj(d) ? (SORT_KEYS[view.sort] || SORT_KEYS.id)(d) : "";
  } catch (err) {
    return "";
  }
}

function compare(a, b) {
  const [x, y] = [sortKey(a), sortKey(b)];
  const c = typeof x === typeof y ? (x > y ? 1 : x < y ? -1 : 0) : typeof x === "number" ? -1 : 1;
  if (c) return c * view.dir;
  const [i, j] = [text(isObj(a) ? a.id : a), text(isObj(b) ? b.id : b)];
  return i > j ? 1 : i < j ? -1 : 0;
}

// The models a device serves, each "name version" and " (trial)" while on trial; from a
// controller older than the list, its one model.
function modelLabels(d) {
  if (!Array.isArray(d.models)) return d.model ? [`${text(d.model)} ${text(d.version)}`] : [];
  return d.models.slice(0, MAX_ITEMS).map((m) => (isObj(m)
    ? `${text(m.name)} ${text(m.version)}${m.phase === "trial" ? " (trial)" : ""}` : text(m)))
    .concat(d.models.length > MAX_ITEMS ? [`… and ${d.models.length - MAX_ITEMS} more`] : []);
}

function modelsText(d) {
  return modelLabels(d).join(", ");
}

// One line per model, or "no model"; a device whose inputs drifted gets a line saying so.
function modelsCell(d) {
  const labels = modelLabels(d);
  if (!labels.length) return el("td", { class: "none" }, "no model");
  const full = labels.join("\n");
  const drift = driftText(d);
  return el("td", { class: "models", title: full.length > MAX_TEXT ? text(full, MAX_TITLE) : null },
    ...labels.map((l) => el("div", {}, text(l))),
    ...(d.drifting === true ? [el("div", { class: "drift bad", title: "inputs moved from the evaluation set the model was verified on (PSI)" }, `⚠ drift: ${drift}`)] : []));
}

// The registry's judgement of a device's input drift (edge_sdk/fleet/_drift.py): the
// flagged inputs with their largest PSI, else the warned ones, else "ok" or why not.
function driftText(d) {
  const dr = d.drift;
  if (!isObj(dr) || !isObj(dr.models)) return "";
  const psiOf = (key) => {
    const [m, i] = key.split("/");
    const inp = isObj(dr.models[m]) && isObj(dr.models[m].inputs) ? dr.models[m].inputs[i] : null;
    const p = isObj(inp) && typeof inp.psi_max === "number" && Number.isFinite(inp.psi_max) ? inp.psi_max : null;
    return `${text(key, 80)}${p === null ? "" : ` psi ${p.toFixed(2)}`}`;
  };
  const flagged = list(dr.flagged).filter((x) => typeof x === "string").slice(0, MAX_ITEMS);
  if (flagged.length) return flagged.map(psiOf).join(", ");
  const warn = list(dr.warn).filter((x) => typeof x === "string").slice(0, MAX_ITEMS);
  if (warn.length) return `warn ${warn.map(psiOf).join(", ")}`;
  return "ok";
}

// A device that never installed a model is idle whatever its phase says (older agents
// report "committed" for it).
function phaseText(d) {
  if (d.registered === false) return "never reported"; // assigned by the operator only
  if (modelLabels(d).length) return text(d.phase);
  return d.phase && d.phase !== "committed" ? text(d.phase) : "idle";
}

// A device's shadow run (its last reported one): "shadow det 2 running: 120 compared,
// agreement 0.992"; "" without one. The figures' line is the host's (shadow.text).
function shadowText(sh) {
  if (!isObj(sh)) return "";
  const what = [text(sh.model, 60), text(sh.version, 40)].filter((x) => x).join(" ");
  const how = text(sh.status || sh.result, 60);
  return `shadow${what ? ` ${what}` : ""}${how ? ` ${how}` : ""}${sh.text ? `: ${text(sh.text)}` : ""}`;
}

function phaseCell(d) {
  const sh = shadowText(d.shadow);
  return el("td", {}, phaseText(d), sh ? el("div", { class: "shadow", "data-shadow": "1" }, sh) : null);
}

function onlineText(d) {
  if (isObj(d.revoked)) return `revoked ${when(d.revoked.at)}`.trim();
  if (d.online === true) return "online";
  if (d.silent === true) return "silent";
  return when(d.offline_since) ? `offline since ${when(d.offline_since)}` : "offline";
}

function deviceRow(d) {
  if (!isObj(d)) throw new Error("not a device record");
  const id = text(d.id, MAX_TITLE);
  const button = el("button", { type: "button", class: "dev" }, text(d.id));
  if (typeof d.id === "string") button.addEventListener("click", () => selectDevice(d.id));
  return el("tr", { "data-device": id, class: d.id === view.device ? "selected" : null },
    el("th", { scope: "row" }, button),
    el("td", { class: isObj(d.revoked) ? "revoked" : d.online === true ? "on" : "off",
      title: isObj(d.revoked) ? text(`by ${text(d.revoked.by)}: ${text(d.revoked.reason)}`, MAX_TITLE) : null },
    onlineText(d)),
    td(listText(d.groups)), td(pairsText(d.tags)), reportedCell(d),
    modelsCell(d), phaseCell(d),
    td(d.last_result, { title: text(d.last_reason, MAX_TITLE) }),
    el("td", {}, when(d.last_seen)));
}

function reportedCell(d) {
  const diff = list(d.mismatch).map((x) => text(x));
  return el("td", { class: diff.length ? "mismatch" : null, title: diff.join("\n") || null },
    diff.length ? "⚠ " : "", text(reportedText(d)));
}

function brokenRow(d, err) {
  const id = isObj(d) ? text(d.id) : "";
  return el("tr", { class: "broken", "data-device": id || null },
    el("td", { colspan: 9 }, `cannot show device ${id || "(no id)"}: ${errText(err)}`));
}

function renderDevices(devs) {
  if (!Array.isArray(devs)) throw new Error("the answer is not a list of devices");
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...each(devs.slice().sort(compare), deviceRow, brokenRow));
  const online = devs.filter((d) => isObj(d) && d.online === true).length;
  const drifting = devs.filter((d) => isObj(d) && d.drifting === true).length;
  document.getElementById("devices-caption").textContent =
    `${devs.length} device${devs.length === 1 ? "" : "s"} (${online} online${drifting ? `, ${drifting} with drifting inputs` : ""})`;
  for (const th of document.querySelectorAll("#devices th[data-key]")) {
    if (th.dataset.key === view.sort) th.setAttribute("aria-sort", view.dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
}

// -- pending enrolment -----------------------------------------------------------------

// Accept or reject one device's enrolment (signed in only; the server checks again).
async function decide(id, command) {
  if (auth.acting) return;
  auth.acting = true;
  try {
    await send(`/api/enrolments/${encodeId(id)}/${command}`, {});
    say(`${text(id, MAX_TITLE)}: ${command}ed by ${text(auth.operator, 64)}.`);
  } catch (err) {
    say(`${text(id, MAX_TITLE)}: ${command} failed: ${errText(err)}`, true);
  } finally {
    auth.acting = false;
  }
  refresh();
}

function decisionCell(e) {
  if (typeof auth.operator !== "string" || typeof e.device_id !== "string") return el("td", {});
  return el("td", {}, el("div", { class: "actions", role: "group", "aria-label": `Decide on ${text(e.device_id, MAX_TITLE)}` },
    ...[["accept", "Accept"], ["reject", "Reject"]].map(([command, label]) => {
      const b = el("button", { type: "button", class: `act act-${command}`, "data-action": command }, label);
      b.addEventListener("click", () => decide(e.device_id, command));
      return b;
    })));
}

function enrolmentRow(e) {
  if (!isObj(e)) throw new Error("not an enrolment record");
  return el("tr", { "data-enrolment": text(e.device_id, MAX_TITLE) },
    el("th", { scope: "row" }, text(e.device_id)), td(e.batch),
    el("td", { class: "fingerprint", title: text(e.fingerprint, MAX_TITLE) }, text(e.fingerprint, 16)),
    td(pairsText(e.facts)), el("td", {}, text(e.requests, 20)),
    el("td", { class: e.conflicts ? "mismatch" : null }, text(e.conflicts, 20)),
    el("td", {}, when(e.requested_at)), decisionCell(e));
}

function renderEnrolments(doc) {
  if (!isObj(doc) || !Array.isArray(doc.enrolments)) throw new Error("the answer is not a list of enrolments");
  const rows = doc.enrolments;
  document.querySelector("#enrolments tbody").replaceChildren(...each(rows, enrolmentRow,
    (e, err) => el("tr", { class: "broken" }, el("td", { colspan: 8 }, errText(err)))));
  const counts = isObj(doc.counts) ? doc.counts : {};
  const waiting = typeof counts.pending === "number" ? counts.pending : rows.length;
  const shown = rows.length < waiting ? ` (first ${rows.length} shown)` : "";
  const revoked = typeof counts.revoked === "number" && counts.revoked ? `; ${counts.revoked} revoked` : "";
  document.getElementById("enrolments-caption").textContent = waiting
    ? `${waiting} device${waiting === 1 ? "" : "s"} waiting${shown}${revoked}`
    : `No device is waiting${revoked}.`;
}

// -- rollouts --------------------------------------------------------------------------

function statusName(s) {
  return text(s, 40).replace("_", " ");
}

// One wave: what happened to its devices (committed, rolled back, failed, ...), coloured
// by the worst of it; never the controller's raw status, which calls a device that an
// abort sent back "committed".
function waveRow(r, p) {
  if (!isObj(p)) throw new Error("not a wave record");
  const by = pairs(p.by_outcome).map(([s, n]) => [s, count(n)]).filter(([, n]) => n)
    .sort(([a], [b]) => OUTCOMES.indexOf(a) - OUTCOMES.indexOf(b));
  const devices = count(p.devices);
  const summary = by.map(([s, n]) => `${n} ${statusName(s)}`).join(", ");
  const done = by.filter(([s]) => s === "committed").reduce((t, [, n]) => t + n, 0);
  const wave = text(p.wave, 12);
  const worst = by.length ? by[0][0] : "pending";
  const label = `Wave ${wave}: ${done} of ${devices} committed` + (summary ? ` (${summary})` : "");
  const bar = el("div", { class: "bar", role: "img", "aria-label": label });
  for (const [s, n] of by) {
    const seg = el("div", { class: `seg seg-${word(s)}`, title: `${n} ${statusName(s)}` });
    seg.style.width = `${Math.min(100, (100 * n) / (devices || 1))}%`;
    bar.append(seg);
  }
  const current = r.wave === p.wave && ["running", "paused"].includes(r.status);
  // A gated rollout's wave: its devices shadowing, passed, failed and without traffic.
  const shadow = pairs(p.shadow).map(([s, n]) => `${count(n)} ${statusName(s)}`).join(", ");
  return el("div", { class: `wave wave-${word(worst)}`, "data-wave": wave, "data-outcome": text(worst, 40) },
    el("span", {}, `Wave ${wave}${current ? " ◀" : ""}`), bar,
    el("span", { class: "counts" }, summary || `0 of ${devices} devices`),
    shadow ? el("span", { class: "counts shadow", "data-shadow": "1" }, `shadow: ${shadow}`) : null);
}

function rolloutCard(r) {
  if (!isObj(r)) throw new Error("not a rollout record");
  const id = text(r.id, 20);
  const sel = pairs(r.selector).filter(([, v]) => !Array.isArray(v) || v.length)
    .map(([k, v]) => `${text(k)}: ${listText(v)}`).join("; ");
  const art = el("article", { class: "rollout", id: `rollout-${id}`, "data-status": text(r.status, 40),
    "aria-labelledby": `rollout-${id}-h` },
    el("h3", { id: `rollout-${id}-h` }, `${r.rollback === true ? "Rollback rollout" : "Rollout"} ${id}: ${text(r.model)} ${text(r.version)} `,
      el("span", { class: `status status-${word(r.status)}` }, text(r.status, 40)),
      r.waves ? ` wave ${text(r.wave, 12)} of ${text(r.waves, 12)}` : ""),
    el("p", { class: "counts" }, `selector ${sel} · started ${when(r.created)} by ${text(r.created_by)}` +
      ` · updated ${when(r.updated)}`),
    r.reason ? el("p", { class: "reason" },
      (r.status === "aborted" ? "Aborted: " : r.status === "aborting" ? "Aborting: " : "") + text(r.reason, MAX_TITLE)) : null,
    isObj(r.gate) ? el("p", { class: "counts gate" }, `gate ${text(r.gate.text)} · no traffic: ${text(r.gate.no_traffic, 20)}`) : null,
    ...each(list(r.progress), (p) => waveRow(r, p),
      (p, err) => el("p", { class: "broken" }, `cannot show a wave: ${errText(err)}`)));
  const shadows = list(r.devices).filter((d) => isObj(d) && isObj(d.shadow));
  if (shadows.length) {
    art.append(el("table", { class: "shadows" },
      el("caption", {}, `Shadow figures of ${shadows.length} device${shadows.length === 1 ? "" : "s"}`),
      el("thead", {}, el("tr", {}, ...["Device", "Wave", "Shadow", "Compared", "Agreement", "Worst",
        "Latency ×", "Figures"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...each(shadows, shadowRow,
        (d, err) => el("tr", { class: "broken" }, el("td", { colspan: 8 }, errText(err)))))));
  }
  const failures = list(r.failures);
  if (failures.length) {
    art.append(el("table", { class: "failures" },
      el("caption", {}, `${failures.length} failure${failures.length === 1 ? "" : "s"}`),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Device"),
        el("th", { scope: "col" }, "Outcome"), el("th", { scope: "col" }, "Reason"))),
      el("tbody", {}, ...each(failures, (f) => el("tr", {},
        td(isObj(f) ? f.device : f), td(isObj(f) ? statusName(f.outcome || f.status) : ""),
        td(isObj(f) ? f.reason : "")),
      (f, err) => el("tr", { class: "broken" }, el("td", { colspan: 3 }, errText(err)))))));
  }
  return art;
}

function num(v, digits) {
  return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "";
}

// One device's shadow run in a rollout: the gate's verdict and the figures it judged
// (numbers the host read from the device's report: edge_sdk/fleet/_outcome.py).
function shadowRow(d) {
  const sh = d.shadow;
  const verdict = sh.verdict || sh.stage || "under way";
  return el("tr", { "data-device": text(d.device, MAX_TITLE), "data-verdict": text(verdict, 40) },
    td(d.device), td(d.wave), td(statusName(verdict), { class: verdict === "failed" ? "bad" : null }),
    td(num(sh.compared, 0)), td(num(sh.agreement, 3)),
    td(num(sh.worst, 3), { title: text(sh.worst_detail, MAX_TITLE) || null }),
    td(num(sh.latency_ratio, 2)), td(sh.text, { title: text(sh.text, MAX_TITLE) || null }));
}

function renderRollouts(rs) {
  if (!Array.isArray(rs)) throw new Error("the answer is not a list of rollouts");
  const box = document.getElementById("rollouts");
  if (!rs.length) { box.replaceChildren(el("p", { class: "empty" }, "No rollouts.")); return; }
  box.replaceChildren(...each(rs, rolloutCard, (r, err) =>
    el("p", { class: "broken" }, `cannot show rollout ${text(isObj(r) ? r.id : "", 20)}: ${errText(err)}`)));
}

// -- models ----------------------------------------------------------------------------

function renderModels(ms) {
  if (!Array.isArray(ms)) throw new Error("the answer is not a list of models");
  document.querySelector("#models tbody").replaceChildren(...each(ms, (m) => {
    if (!isObj(m)) throw new Error("not a model record");
    return el("tr", m.yanked ? { class: "yanked" } : {}, td(m.model || "— none —"),
      td(m.yanked ? `${text(m.version)} (yanked${m.yank_reason ? `: ${text(m.yank_reason)}` : ""})` : m.version),
      el("td", {}, text(m.devices, 20)), el("td", {}, text(m.online, 20)));
  }, (m, err) => el("tr", { class: "broken" }, el("td", { colspan: 4 }, errText(err)))));
}

// -- a device's history ----------------------------------------------------------------

function renderHistory(doc) {
  const sec = document.getElementById("history");
  if (doc === null) { sec.hidden = true; return; }
  sec.hidden = false;
  if (!isObj(doc) || !isObj(doc.device)) throw new Error("the answer is not a device record");
  const d = doc.device;
  document.getElementById("history-h").textContent = `History of ${text(d.id)}`;
  const labels = modelLabels(d);
  const facts = [[labels.length > 1 ? "Models" : "Model", labels.join(", ") || "no model installed"],
    ["Phase", phaseText(d)],
    ["Previous", `${text(d.previous_model) || "—"} ${text(d.previous_version)}`],
    ["Last result", `${text(d.last_result)} ${d.last_reason ? "— " + text(d.last_reason, MAX_TITLE) : ""}`],
    ["Groups (assigned)", listText(d.groups) || "—"], ["Tags (assigned)", pairsText(d.tags) || "—"],
    ["Reported by the device", reportedText(d) || "—"],
    ["Differs", list(d.mismatch).map((x) => text(x)).join("; ") || "—"],
    ["Hardware (reported)", factsText(d.hardware) || "—"],
    ["Input drift", driftText(d) || "—"],
    ["First seen", d.first_seen ? when(d.first_seen, true) : "never reported"]];
  document.getElementById("history-facts").replaceChildren(
    ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  document.querySelector("#updates-table tbody").replaceChildren(...each(list(doc.updates), (u) => {
    if (!isObj(u)) throw new Error("not an update record");
    const back = isObj(u.rolled_back);
    return el("tr", { "data-deployment": text(u.deployment, 20), class: back ? "rolled-back" : null },
      el("td", {}, when(u.ts)), td(u.deployment), td(u.model ? `${text(u.model)} ${text(u.version)}` : ""),
      td(u.download_text), td(u.outcome_text, { class: back || ["failed", "refused"].includes(u.result) ? "bad" : null }));
  }, (u, err) => el("tr", { class: "broken" }, el("td", { colspan: 5 }, errText(err)))));
  document.querySelector("#history-table tbody").replaceChildren(...each(list(doc.history), (e) => {
    if (!isObj(e)) throw new Error("not an event record");
    return el("tr", {}, el("td", {}, when(e.ts)), td(e.kind), td(e.deployment),
      td(e.model ? `${text(e.model)} ${text(e.version)}` : ""), td(e.reason));
  }, (e, err) => el("tr", { class: "broken" }, el("td", { colspan: 5 }, errText(err)))));
}

// -- warnings (release metadata that expires and that serve cannot re-sign) -------------

function renderWarnings(ws) {
  if (!Array.isArray(ws)) throw new Error("the answer is not a list of warnings");
  document.getElementById("warnings-box").hidden = !ws.length;
  document.getElementById("warnings").replaceChildren(...each(ws, (w) => {
    if (!isObj(w)) throw new Error("not a warning");
    return el("li", { class: "warning" }, text(w.message, MAX_TITLE));
  }, (w, err) => el("li", { class: "broken" }, errText(err))));
}

// -- sign-in and rollout actions -------------------------------------------------------
//
// The session is an HttpOnly cookie the page never sees; what it holds is the CSRF token
// the server gave at sign-in (or /api/session gives after a reload), sent with every
// action as X-CSRF-Token. Buttons appear only while signed in, and only those that apply
// to a rollout's state; the server checks both again.

const auth = { operator: null, csrf: null, signIn: false, why: null, acting: false };

function send(path, doc) {
  const headers = { "Content-Type": "application/json" };
  if (auth.csrf) headers["X-CSRF-Token"] = auth.csrf;
  return call(path, { method: "POST", headers, body: JSON.stringify(doc || {}),
    credentials: "same-origin" }, (status) => {
    if (status === 401 && path !== "/api/login") signedOut();
  });
}

function say(message, error) {
  const box = document.getElementById("action-status");
  box.textContent = text(message, 400);
  box.classList.toggle("error", !!error);
  box.hidden = !message;
}

function signedOut() {
  auth.operator = null;
  auth.csrf = null;
  renderSignin();
}

function renderSignin() {
  const on = typeof auth.operator === "string";
  document.getElementById("signin-form").hidden = on || !auth.signIn;
  document.getElementById("signed-in").hidden = !on;
  document.getElementById("signed-in-name").textContent = on ? text(auth.operator, 64) : "";
  const note = document.getElementById("signin-note");
  note.textContent = !on && !auth.signIn && auth.why ? `Read-only: ${text(auth.why, 300)}` : "";
  note.hidden = !note.textContent;
  document.body.classList.toggle("signed-in", on);
}

async function loadSession() {
  try {
    const s = await api("/api/session");
    if (!isObj(s)) throw new Error("the answer is not a session record");
    auth.operator = typeof s.operator === "string" ? s.operator : null;
    auth.csrf = typeof s.csrf === "string" ? s.csrf : null;
    auth.signIn = s.sign_in === true;
    auth.why = typeof s.why === "string" ? s.why : null;
  } catch (err) {
    auth.why = `cannot tell whether sign-in is offered: ${errText(err)}`;
  }
  renderSignin();
}

async function signIn(ev) {
  ev.preventDefault();
  const form = ev.target;
  const fields = Object.fromEntries(new FormData(form).entries());
  try {
    const s = await send("/api/login", { name: fields.name, password: fields.password });
    auth.operator = text(s.operator, 64);
    auth.csrf = text(s.csrf, 200);
    form.reset();
    say("");
  } catch (err) {
    say(`Sign-in failed: ${errText(err)}`, true);
  }
  renderSignin();
  refresh();
}

async function signOut() {
  try {
    await send("/api/logout", {});
    say("Signed out.");
  } catch (err) {
    say(`Sign-out: ${errText(err)}`, true);
  }
  signedOut();
  refresh();
}

// Which buttons a rollout in each state gets: [command, label, applies?].
const ACTIONS = [
  ["approve", "Approve next wave", (r) => r.status === "paused" && r.awaiting_approval === true],
  ["resume", "Resume", (r) => r.status === "paused" && r.awaiting_approval !== true],
  ["pause", "Pause", (r) => r.status === "pending" || r.status === "running"],
  ["abort", "Abort…", (r) => ["pending", "running", "paused"].includes(r.status)],
];

async function act(id, command, doc) {
  if (auth.acting) return;
  auth.acting = true;
  try {
    await send(`/api/rollouts/${encodeURIComponent(id)}/${command}`, doc || {});
    say(`Rollout ${text(id, 20)}: ${command} requested by ${text(auth.operator, 64)}.`);
  } catch (err) {
    say(`Rollout ${text(id, 20)}: ${command} failed: ${errText(err)}`, true);
  } finally {
    auth.acting = false;
  }
  refresh();
}

const pendingAbort = { id: null };

function askAbort(id) {
  pendingAbort.id = id;
  document.getElementById("abort-id").textContent = text(id, 20);
  document.getElementById("abort-reason").value = "";
  document.getElementById("abort-dialog").showModal();
}

function actionBar(r) {
  if (!isObj(r) || typeof r.id !== "number") return null;
  const apply = ACTIONS.filter(([, , applies]) => applies(r));
  if (!apply.length) return null;
  return el("div", { class: "actions", role: "group", "aria-label": `Act on rollout ${text(r.id, 20)}` },
    ...apply.map(([command, label]) => {
      const b = el("button", { type: "button", class: `act act-${command}`, "data-action": command }, label);
      b.addEventListener("click", () => (command === "abort" ? askAbort(r.id) : act(r.id, command)));
      return b;
    }));
}

// Adds the action buttons to the rollout cards renderRollouts made (signed in only).
function renderActions(rs) {
  if (typeof auth.operator !== "string" || !Array.isArray(rs)) return;
  for (const r of rs) {
    try {
      const card = isObj(r) ? document.getElementById(`rollout-${text(r.id, 20)}`) : null;
      const bar = card ? actionBar(r) : null;
      if (bar) card.append(bar);
    } catch (err) {
      // The card still shows the rollout; the CLI can still act on it.
    }
  }
}

function startSignin() {
  document.getElementById("signin-form").addEventListener("submit", signIn);
  document.getElementById("signout").addEventListener("click", signOut);
  const dialog = document.getElementById("abort-dialog");
  document.getElementById("abort-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const reason = document.getElementById("abort-reason").value.trim();
    dialog.close();
    if (pendingAbort.id !== null && reason) act(pendingAbort.id, "abort", { reason });
    pendingAbort.id = null;
  });
  document.getElementById("abort-cancel").addEventListener("click", () => {
    pendingAbort.id = null;
    dialog.close();
  });
  return loadSession();
}

// -- the page --------------------------------------------------------------------------

// Each section: where its data comes from (null: nothing to fetch) and how it renders.
const SECTIONS = [
  { id: "warnings", path: () => "/api/warnings", render: renderWarnings },
  { id: "rollouts", path: () => "/api/rollouts", render: (rs) => { renderRollouts(rs); renderActions(rs); } },
  {
    id: "devices",
    path: () => `/api/devices?${new URLSearchParams(Object.entries(view.filters).filter(([, v]) => v))}`,
    render: renderDevices,
  },
  { id: "enrolments", path: () => "/api/enrolments", render: renderEnrolments },
  { id: "models", path: () => "/api/models", render: renderModels },
  {
    id: "history",
    path: () => (view.device === null ? null : `/api/devices/${encodeId(view.device)}`),
    render: renderHistory,
  },
];

// Fetch and render one section; an error is shown in that section only. Returns true,
// or the error.
async function load(sec) {
  const box = document.getElementById(`${sec.id}-error`);
  try {
    const path = sec.path();
    sec.render(path === null ? null : await api(path));
    box.hidden = true;
    box.textContent = "";
    return true;
  } catch (err) {
    if (sec.id === "history") document.getElementById("history").hidden = false;
    if (sec.id === "warnings") document.getElementById("warnings-box").hidden = false;
    box.textContent = `Cannot show this section: ${errText(err)}`;
    box.hidden = false;
    return err;
  }
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const results = await Promise.all(SECTIONS.map(load));
    const failed = results.filter((r) => r !== true);
    const status = document.getElementById("updated");
    if (failed.length === results.length && failed.every((e) => e instanceof Unreachable)) {
      status.textContent = `cannot reach the controller: ${errText(failed[0])}`;
    } else {
      status.textContent = `updated ${new Date().toLocaleTimeString()}` +
        (failed.length ? ` (${failed.length} section${failed.length === 1 ? "" : "s"} could not be shown)` : "");
    }
  } catch (err) {
    document.getElementById("updated").textContent = `update failed: ${errText(err)}`;
  } finally {
    busy = false;
  }
}

// The device a link names (#device=ID), or null when the fragment names none or is not
// a valid percent-encoded id: a bad link opens the page as if it had no fragment.
function deviceFromHash() {
  const m = /^#device=([^#&]*)$/.exec(location.hash);
  if (!m) return null;
  let id;
  try {
    id = decodeURIComponent(m[1]);
  } catch (err) {
    return null;
  }
  return id && id.length <= MAX_ID && !/[\u0000-\u001f\u007f-\u009f/]/.test(id) ? id : null;
}

function selectDevice(id) {
  view.device = id;
  try {
    history.replaceState(null, "", `#device=${encodeId(id)}`);
  } catch (err) {
    // The page still shows the device; only the link to it is not updated.
  }
  refresh();
  document.getElementById("history").scrollIntoView({ behavior: "smooth" });
}

function start() {
  startSignin().then(refresh);
  view.device = deviceFromHash();
  window.addEventListener("hashchange", () => {
    view.device = deviceFromHash();
    refresh();
  });
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
}

document.addEventListener("DOMContentLoaded", () => {
  try {
    start();
  } catch (err) {
    document.getElementById("updated").textContent = `the page failed to start: ${errText(err)}`;
  }
});
