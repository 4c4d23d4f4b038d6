// Outpost status page: polls status.json and draws it. No framework, no build step.
// Every value from the gateway is written with textContent or an attribute, never as HTML.
"use strict";

(function () {
  const REFRESH_MS = 3000;
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f6fd1", "#d97706", "#7c3aed", "#0f766e"];
  const token = new URLSearchParams(window.location.search).get("token");
  const withToken = (url) => (token ? url + "?token=" + encodeURIComponent(token) : url);

  function $(sel) { return document.querySelector(sel); }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function age(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "-";
    const s = Math.max(0, seconds);
    if (s < 60) return Math.round(s) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
  }

  function utc(ms) {
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function bytes(n) {
    if (typeof n !== "number") return "-";
    const units = ["B", "KB", "MB", "GB"];
    let v = n;
    let i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function note(text, columns) {
    const row = el("tr", { class: "note" });
    row.appendChild(el("td", { colspan: columns, class: "muted" }, text));
    return row;
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // A link's up/down history over the window as coloured segments.
  function timeline(changes, fromMs, toMs) {
    const box = svg("svg", { class: "timeline", viewBox: "0 0 260 14", preserveAspectRatio: "none" });
    const span = Math.max(1, toMs - fromMs);
    const x = (t) => Math.min(260, Math.max(0, ((t - fromMs) / span) * 260));
    for (let i = 0; i < changes.length; i += 1) {
      const [start, state] = changes[i];
      const end = i + 1 < changes.length ? changes[i + 1][0] : toMs;
      if (end < fromMs) continue;
      const x0 = x(start);
      const w = Math.max(1, x(end) - x0);
      const rect = svg("rect", { x: x0, y: 0, width: w, height: 14, fill: state === "up" ? "#2fa35a" : "#d8363c",
        "data-state": state });
      const title = svg("title", {});
      title.textContent = state + " from " + utc(start);
      rect.appendChild(title);
      box.appendChild(rect);
    }
    return box;
  }

  function renderLinks(doc, fromMs, now) {
    const history = (doc.history && doc.history.links) || {};
    const rows = [];
    for (const [name, link] of Object.entries(doc.links || {})) {
      const state = link.link || (link.up ? "up" : "down");
      const row = el("tr", { "data-link": name, "data-state": link.up ? "up" : "down" });
      row.appendChild(el("td", {}, name));
      const cell = el("td", { class: link.up ? "up" : "down" }, link.up ? "UP" : state.toUpperCase());
      if (!link.up && link.last_error) cell.appendChild(el("div", { class: "muted" }, link.last_error));
      for (const [dest, r] of Object.entries(link.refused || {})) {
        cell.appendChild(el("div", { class: "down", "data-refused": dest }, dest + " REFUSED: " + (r.reason || "?")));
      }
      row.appendChild(cell);
      row.appendChild(el("td", {}, link.since_ms ? age((now - link.since_ms) / 1000) : "-"));
      const td = el("td", {});
      td.appendChild(timeline(history[name] || [[link.since_ms || now, state]], fromMs, now));
      row.appendChild(td);
      row.appendChild(el("td", {}, link.server || link.host_id || ""));
      const counters = Object.entries(link.counters || {}).filter(([, v]) => v).map(([k, v]) => k + " " + v);
      row.appendChild(el("td", { class: "muted" }, counters.join(", ")));
      rows.push(row);
    }
    if (!rows.length) rows.push(note("no uplink configured", 6));
    fill($("#links tbody"), rows);
  }

  function renderDepth(doc, now) {
    const buffer = doc.buffer || {};
    const cursors = buffer.cursors || {};
    const names = Object.keys(cursors).sort();
    const current = $("#depth-now");
    current.replaceChildren(...names.map((name, i) => {
      const records = cursors[name].records || 0;
      const span = el("span", { "data-cursor": name, "data-records": records });
      span.appendChild(el("span", { class: "swatch c" + (i % 4) }));
      span.appendChild(document.createTextNode(name + ": " + records.toLocaleString("en") + " records waiting, " +
        bytes(cursors[name].bytes)));
      return span;
    }));
    if (buffer.error) current.appendChild(el("span", { class: "down" }, "buffer unreadable: " + buffer.error));

    const plot = $("#depth-plot");
    const W = 800, H = 220, L = 64, R = 12, T = 12, B = 28;
    const depth = (doc.history && doc.history.depth) || { t_ms: [], cursors: {} };
    const times = depth.t_ms || [];
    const windowMs = ((doc.history && doc.history.window_s) || 21600) * 1000;
    const from = times.length ? Math.min(times[0], now - 60000) : now - 60000;
    let max = 1;
    for (const name of names) for (const v of (depth.cursors[name] || [])) if (typeof v === "number") max = Math.max(max, v);
    const x = (t) => L + ((t - from) / Math.max(1, now - from)) * (W - L - R);
    const y = (v) => H - B - (v / max) * (H - T - B);
    const parts = [];
    parts.push(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#9aa5b1" }));
    parts.push(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#9aa5b1" }));
    for (const v of [0, max / 2, max]) {
      const label = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#4a5560" });
      label.textContent = Math.round(v).toLocaleString("en");
      parts.push(label);
    }
    for (const t of [from, (from + now) / 2, now]) {
      const label = svg("text", { x: x(t), y: H - 8, "text-anchor": t === from ? "start" : t === now ? "end" : "middle",
        "font-size": 11, fill: "#4a5560" });
      label.textContent = t === now ? "now" : "-" + age((now - t) / 1000);
      parts.push(label);
    }
    names.forEach((name, i) => {
      const values = depth.cursors[name] || [];
      const points = [];
      for (let k = 0; k < times.length; k += 1) {
        if (typeof values[k] === "number") points.push(x(times[k]).toFixed(1) + "," + y(values[k]).toFixed(1));
      }
      if (points.length) {
        parts.push(svg("polyline", { points: points.join(" "), fill: "none", stroke: COLORS[i % 4], "stroke-width": 2,
          "data-cursor": name, "data-points": points.length,
          "data-last": values.length ? values[values.length - 1] : "" }));
      }
    });
    plot.replaceChildren(...parts);
    plot.setAttribute("data-max", String(max));
    for (const span of document.querySelectorAll(".window")) {
      span.textContent = "(last " + age(Math.min(windowMs, now - from) / 1000) + ")";
    }
    const file = [];
    if (buffer.file_bytes !== undefined) file.push("file " + bytes(buffer.file_bytes) + ", wal " + bytes(buffer.wal_bytes));
    if (typeof buffer.oldest_age_s === "number") file.push("oldest record " + age(buffer.oldest_age_s) + " old");
    if (buffer.wal_pinned) file.push("WAL pinned by a reader");
    $("#buffer-file").textContent = file.join(" · ");
    return from;
  }

  function renderDrops(doc) {
    const buffer = doc.buffer || {};
    const rows = [];
    for (const [reason, n] of Object.entries(buffer.dropped || {})) {
      if (n) rows.push([["dropped", reason, n], { "data-drop": reason, "data-records": n }]);
    }
    const q = buffer.quarantine || {};
    for (const [reason, n] of Object.entries(q.by_reason || {})) {
      if (n) rows.push([["quarantined", reason, n], { "data-quarantine": reason, "data-records": n }]);
    }
    if (buffer.dropped_in_memory) {
      rows.push([["dropped in memory", "buffer not writable", buffer.dropped_in_memory], { "data-drop": "in_memory" }]);
    }
    const trs = rows.map(([cells, attrs]) => {
      const tr = el("tr", attrs);
      cells.forEach((c, i) => tr.appendChild(el("td", i === 0 ? { class: "down" } : {}, c)));
      return tr;
    });
    if (!trs.length) trs.push(note("nothing dropped, nothing quarantined", 3));
    fill($("#drops tbody"), trs);
  }

  function renderDevices(doc, now) {
    const rows = [];
    for (const [name, d] of Object.entries(doc.devices || {}).sort()) {
      const row = el("tr", { "data-device": name, "data-online": d.online ? "true" : "false" });
      row.appendChild(el("td", {}, name));
      row.appendChild(el("td", { class: d.online ? "online" : "offline" }, d.online ? "online" : "OFFLINE"));
      const last = d.last_good_ts_ms;
      row.appendChild(el("td", {}, typeof last === "number" && last > 0 ? age((now - last) / 1000) + " ago" : "never"));
      row.appendChild(el("td", {}, d.errors || 0));
      let quality = d.quality;
      if (quality && typeof quality === "object") {
        quality = Object.entries(quality).filter(([, v]) => v).map(([k, v]) => k + ":" + v).join(", ");
      }
      row.appendChild(el("td", {}, quality || "-"));
      row.appendChild(el("td", { class: "muted" }, d.last_error || ""));
      rows.push(row);
    }
    if (!rows.length) rows.push(note("no device configured", 6));
    fill($("#devices tbody"), rows);
  }

  function renderEvents(doc) {
    const events = ((doc.history && doc.history.events) || []).slice(-50).reverse();
    const items = events.map((e) => el("li", { class: e.level || "info" }, utc(e.ts_ms) + "  " + e.text));
    if (!items.length) items.push(el("li", { class: "muted" }, "no state change recorded yet"));
    $("#events").replaceChildren(...items);
  }

  function render(doc) {
    const now = doc.now_ms || Date.now();
    $("#gateway").textContent = doc.gateway || "";
    $("#version").textContent = doc.version || "?";
    $("#uptime").textContent = age(doc.uptime_s);
    const clock = doc.clock || {};
    const clockEl = $("#clock");
    clockEl.setAttribute("data-synced", clock.synced ? "true" : "false");
    clockEl.className = clock.synced ? "synced" : "unsynced";
    clockEl.textContent = clock.synced ? "clock synchronised"
      : clock.holdover ? "clock in holdover (NTP lost)" : "clock NOT synchronised";
    const from = renderDepth(doc, now);
    renderLinks(doc, from, now);
    renderDrops(doc);
    renderDevices(doc, now);
    renderEvents(doc);
    const updated = $("#updated");
    updated.textContent = utc(now);
    updated.setAttribute("data-now-ms", String(now));
    document.title = "Outpost " + (doc.gateway || "") + " status";
  }

  function problem(text) {
    const banner = $("#banner");
    banner.hidden = !text;
    banner.textContent = text || "";
    document.body.setAttribute("data-state", text ? "error" : "ok");
  }

  let renders = 0;

  async function refresh() {
    let doc = null;
    try {
      const answer = await fetch(withToken("status.json"), { cache: "no-store" });
      if (!answer.ok) throw new Error("status.json answered " + answer.status);
      doc = await answer.json();
      problem("");
    } catch (err) {
      problem("the gateway is not answering (" + err.message + "); showing the last state received");
    }
    window.setTimeout(refresh, REFRESH_MS);
    if (doc) {
      render(doc);  // a bug in here is an uncaught error in the console, not a "not answering"
      renders += 1;
      document.body.setAttribute("data-renders", String(renders));
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#json-link").setAttribute("href", withToken("status.json"));
    $("#metrics-link").setAttribute("href", withToken("metrics"));
    refresh();
  });
})();
