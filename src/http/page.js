// The status page's script: every second it reads /api/status, /api/history and a page of
// /api/dead and updates the page in place. Data is only ever written with textContent or
// attributes, never parsed as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f6fb3", "#b3261e", "#d08700", "#2e7d32", "#7b1fa2", "#00838f", "#5d4037"];
  const PAGE = 50;
  const state = { offset: 0, selected: new Set(), busy: false };

  const text = (el, value) => { if (el.textContent !== value) el.textContent = value; };
  const ago = (seconds) => seconds < 120 ? `${Math.round(seconds)}s`
    : seconds < 7200 ? `${Math.round(seconds / 60)}m`
    : seconds < 172800 ? `${Math.round(seconds / 3600)}h` : `${Math.round(seconds / 86400)}d`;
  const getJson = async (path) => {
    const response = await fetch(path, { cache: "no-store" });
    if (!response.ok) throw new Error(`${path}: ${response.status}`);
    return response.json();
  };

  function showStatus(s) {
    text($("role"), s.role);
    $("role").className = `badge ${s.role}`;
    text($("replica"), s.replica_id);
    text($("status"), s.status);
    for (const [name, value] of Object.entries(s.metrics)) {
      const el = document.querySelector(`[data-metric="${name}"]`);
      if (el) text(el, String(value));
    }
    const leader = s.role === "leader" ? "this replica"
      : s.leader_replica_id ? `${s.leader_replica_id} (as the database records it)` : "unknown";
    text($("leader-name"), leader);
    const b = s.broker;
    text($("broker-node"), `${b.node || "none yet"}: ${b.connected ? "connected" : "not connected"}${b.blocked ? `, blocked (${b.blocked})` : ""}`);
    text($("database"), `${s.database}: ${s.database_reachable ? "reachable" : "unreachable"}`);
    const keys = s.blocked_ordering_keys;
    text($("blocked-keys"), keys == null ? "unknown" : keys.length ? keys.join(", ") : "none");
    showAlarm(s.alarm);
    $("admin").hidden = !s.admin;
    $("read-only").hidden = s.admin;
    text($("updated"), `updated ${new Date().toLocaleTimeString()}`);
  }

  function showAlarm(alarm) {
    $("alarm").hidden = !alarm;
    if (!alarm) return;
    text($("alarm-text"), `${alarm.kind} alarm: ${alarm.reason}`);
    text($("alarm-since"), `since ${new Date(alarm.since * 1000).toLocaleString()}`);
  }

  // One polyline per series, scaled to the chart's height by the largest value shown.
  function chart(name, series, top = true) {
    const svg = document.querySelector(`[data-chart="${name}"]`);
    const legend = svg.nextElementSibling;
    const width = 900, height = 100;
    const max = Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v != null)));
    svg.replaceChildren();
    legend.replaceChildren();
    series.forEach((s, i) => {
      const line = document.createElementNS(SVG, "polyline");
      const points = [];
      s.values.forEach((v, x) => {
        if (v != null) points.push(`${width - s.values.length + x},${(height - (v / (max || 1)) * (height - 4)).toFixed(1)}`);
      });
      line.setAttribute("points", points.join(" "));
      line.setAttribute("stroke", COLORS[i % COLORS.length]);
      line.dataset.series = s.label;
      svg.append(line);
      const key = document.createElement("i");
      key.style.background = COLORS[i % COLORS.length];
      const last = s.values.filter((v) => v != null).pop();
      legend.append(key, `${s.label}: ${last == null ? "-" : s.format(last)}`);
    });
    if (top && max > 0) legend.append(` (top ${series[0].format(max)})`);
  }

  function showHistory(h) {
    const count = (v) => String(v);
    const seconds = (v) => v >= 1 ? `${v.toFixed(1)}s` : `${(v * 1000).toFixed(1)}ms`;
    chart("published", [{ label: "published/s", values: h.published, format: count }]);
    const reasons = Object.entries(h.failures);
    chart("failures", reasons.length
      ? reasons.map(([reason, values]) => ({ label: reason, values, format: count }))
      : [{ label: "none", values: h.published.map(() => 0), format: count }]);
    const maxPending = Math.max(1, ...h.pending), maxAge = Math.max(1, ...h.oldest_pending_age);
    chart("pending", [
      { label: `pending (top ${maxPending})`, values: h.pending.map((v) => v / maxPending), format: (v) => String(Math.round(v * maxPending)) },
      { label: `oldest age (top ${ago(maxAge)})`, values: h.oldest_pending_age.map((v) => v / maxAge), format: (v) => ago(v * maxAge) },
    ], false);
    chart("latency", [
      { label: "p50", values: h.p50, format: seconds },
      { label: "p99", values: h.p99, format: seconds },
    ]);
  }

  function cell(row, value) {
    const td = document.createElement("td");
    td.textContent = value;
    row.append(td);
    return td;
  }

  function deadRow(r) {
    const tr = document.createElement("tr");
    tr.dataset.messageId = r.message_id;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = state.selected.has(r.message_id);
    box.addEventListener("change", () => box.checked ? state.selected.add(r.message_id) : state.selected.delete(r.message_id));
    cell(tr, "").append(box);
    cell(tr, r.message_id);
    cell(tr, r.ordering_key == null ? "-" : r.ordering_key);
    cell(tr, `${r.exchange || "(default)"} / ${r.routing_key}`);
    cell(tr, String(r.attempts));
    cell(tr, r.last_error == null ? "" : r.last_error);
    cell(tr, ago(r.age_seconds));
    return tr;
  }

  function showDead(d) {
    $("dead-rows").replaceChildren(...d.rows.map(deadRow));
    const first = d.rows.length ? d.offset + 1 : 0;
    text($("page-info"), `rows ${first}–${d.offset + d.rows.length} of ${d.total}`);
    $("prev").disabled = d.offset === 0;
    $("next").disabled = d.offset + d.rows.length >= d.total;
  }

  async function retry(body) {
    const out = $("retry-result");
    out.className = "";
    text(out, "retrying…");
    body.force = $("force").checked;
    const response = await fetch("/api/dead/retry", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${$("token").value}` },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      out.className = "bad";
      text(out, `${response.status}: ${answer.error || response.statusText}`);
      return;
    }
    const refused = answer.refused.map((r) => `${r.message_id}: ${r.detail}`).join("; ");
    text(out, `${answer.retried} retried${refused ? `; refused ${refused}` : ""}`);
    state.selected.clear();
  }

  async function tick() {
    if (state.busy) return;
    state.busy = true;
    try {
      const [status, history, dead] = await Promise.all([
        getJson("/api/status"), getJson("/api/history"),
        getJson(`/api/dead?offset=${state.offset}&limit=${PAGE}`),
      ]);
      showStatus(status);
      showHistory(history);
      showDead(dead);
    } catch (e) {
      text($("updated"), `update failed: ${e.message}`);
    } finally {
      state.busy = false;
    }
  }

  $("retry-selected").addEventListener("click", () => retry({ message_ids: [...state.selected] }).then(tick));
  $("retry-all").addEventListener("click", () => retry({ all: true }).then(tick));
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); tick(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; tick(); });
  tick();
  setInterval(tick, 1000);
})();
