// The status page (GET /): one self-contained HTML document, no external
// assets. Its script polls /status every 2 s and updates the table in
// place: one row per node (tr[data-node=ID]), one cell per field
// (td[data-field=NAME]). Everything shown that comes from nodes or the
// store (ids, reasons, summaries) is set with textContent or as a data
// attribute through the DOM, never parsed as HTML.
#include "http/status_api.hpp"

namespace http {

const std::string& status_page() {
  static const std::string page = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nbdroot status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  header { display: flex; gap: 1.5em; align-items: baseline; flex-wrap: wrap; }
  h1 { font-size: 1.3em; margin: 0; }
  #summary span { margin-right: 1em; }
  #updated { color: #777; }
  #error { color: #fff; background: #b3261e; padding: .4em .8em; border-radius: 4px; }
  table { border-collapse: collapse; margin-top: 1em; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .35em .7em; border-bottom: 1px solid #e5e5e5;
           vertical-align: top; }
  th { background: #f0f0f0; font-weight: 600; }
  td[data-field="node"] { font-family: ui-monospace, monospace; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr[data-state="ready"] td[data-field="state"] { color: #1e7b34; }
  tr[data-state="failed"] td[data-field="state"] { color: #b3261e; font-weight: 600; }
  tr[data-state="verify"] td[data-field="state"], tr[data-state="new"] td[data-field="state"] { color: #8a5a00; }
  tr[data-state="retired"] { color: #999; }
  td[data-verification="passed"] { color: #1e7b34; }
  td[data-verification="failed"], td[data-verification="timedout"] { color: #b3261e; }
  td[data-verification="degraded"] { color: #8a5a00; }
  td[data-field="reason"], td[data-field="verification"] { max-width: 28em; overflow-wrap: anywhere; }
</style>
</head>
<body data-polls="0">
<header>
  <h1>nbdroot</h1>
  <div id="summary"></div>
  <div id="updated">loading&hellip;</div>
</header>
<p id="error" hidden></p>
<table id="nodes">
  <thead><tr>
    <th>Node</th><th>State</th><th>Reason</th><th>Image</th><th>Generation</th>
    <th>Dirty</th><th>Last verification</th><th>Last seen</th><th>Conns</th>
    <th>Boots</th><th>Read</th><th>Written</th>
  </tr></thead>
  <tbody id="node-rows"></tbody>
</table>
<p id="empty" hidden>No nodes in the store yet.</p>
<script>
"use strict";
(function () {
  const FIELDS = ["node", "state", "reason", "image", "generation", "dirty", "verification",
                  "last_seen", "connections", "boots", "read", "written"];
  const NUMERIC = new Set(["dirty", "connections", "boots", "read", "written"]);
  const tbody = document.getElementById("node-rows");
  const errorEl = document.getElementById("error");
  const updatedEl = document.getElementById("updated");
  const rows = new Map();  // node id -> its <tr>
  let serverNow = 0, fetchedAt = 0, polls = 0;

  function bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
  }
  function ago(t) {
    if (!t) return "never";
    const now = serverNow + (Date.now() - fetchedAt) / 1000;
    const s = Math.max(0, Math.round(now - t));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }
  function rowFor(id) {
    let tr = rows.get(id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.node = id;
      for (const f of FIELDS) {
        const td = document.createElement("td");
        td.dataset.field = f;
        if (NUMERIC.has(f)) td.className = "num";
        tr.appendChild(td);
      }
      rows.set(id, tr);
    }
    return tr;
  }
  function cell(tr, f) { return tr.children[FIELDS.indexOf(f)]; }
  function set(tr, f, text) {
    const td = cell(tr, f);
    const s = text === null || text === undefined ? "" : String(text);
    if (td.textContent !== s) td.textContent = s;
    return td;
  }
  function render(st) {
    serverNow = st.server.now;
    fetchedAt = Date.now();
    const seen = new Set();
    st.nodes.forEach(function (n, i) {
      const tr = rowFor(n.node);
      seen.add(n.node);
      tr.dataset.state = n.state;
      tr.dataset.lastSeen = n.last_seen === null ? "" : String(n.last_seen);
      set(tr, "node", n.node);
      set(tr, "state", n.state);
      set(tr, "reason", n.reason);
      set(tr, "image", n.image);
      set(tr, "generation", n.generation);
      set(tr, "dirty", bytes(n.dirty_bytes)).title = n.dirty_bytes + " bytes (" + n.dirty_source + ")";
      const v = n.last_verification;
      const vt = set(tr, "verification", v ? (v.status === "passed" ? "pass" : "FAIL") + " (" +
                     v.status + ")" + (v.summary ? ": " + v.summary : "") : "none");
      vt.dataset.verification = v ? v.status : "";
      vt.title = v ? "run " + v.run + (v.finished ? ", finished " + v.finished : "") : "";
      set(tr, "last_seen", ago(n.last_seen));
      set(tr, "connections", n.connections);
      set(tr, "boots", n.boots);
      set(tr, "read", bytes(n.read_bytes));
      set(tr, "written", bytes(n.written_bytes));
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    for (const [id, tr] of rows) {
      if (!seen.has(id)) { tr.remove(); rows.delete(id); }
    }
    const summary = document.getElementById("summary");
    summary.textContent = "";
    for (const [state, count] of Object.entries(st.server.nodes_by_state)) {
      const span = document.createElement("span");
      span.dataset.state = state;
      span.textContent = state + ": " + count;
      summary.appendChild(span);
    }
    const conns = document.createElement("span");
    conns.textContent = "connections: " + st.server.connections.open;
    summary.appendChild(conns);
    document.getElementById("empty").hidden = st.nodes.length > 0;
    polls++;
    document.body.dataset.polls = String(polls);
  }
  function tick() {
    for (const tr of rows.values()) {
      const t = tr.dataset.lastSeen;
      set(tr, "last_seen", ago(t ? Number(t) : 0));
    }
    if (fetchedAt)
      updatedEl.textContent = "updated " + Math.round((Date.now() - fetchedAt) / 1000) + " s ago";
  }
  async function poll() {
    try {
      const r = await fetch("status", {cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      errorEl.hidden = true;
      tick();
    } catch (e) {
      errorEl.textContent = "cannot get /status: " + e.message;
      errorEl.hidden = false;
    } finally {
      setTimeout(poll, 2000);
    }
  }
  setInterval(tick, 1000);
  poll();
})();
</script>
</body>
</html>
)HTML";
  return page;
}

}  // namespace http
