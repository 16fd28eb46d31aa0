// student-serve dashboard: polls the gateway's /stats every 2 s and draws the last 10 minutes.
// Plain JS, no build step; charts by the vendored uPlot (vendor/uplot/README.md).
// window.dashboardState is for tests and curious humans:
//   {polls: successful polls, errors: failed polls, lastError, lastStats: {window, total},
//    charts: {name: time points with at least one value drawn}}
(function () {
  "use strict";

  const POLL_MS = 2000;
  const WINDOW_S = 10; // rates and percentiles come from /stats?window=10
  const HISTORY_S = 600; // charts keep the last 10 minutes
  const MIN_SPAN_S = 60; // and show at least the last minute, so a fresh page has sensible time ticks
  const FETCH_TIMEOUT_MS = 5000;
  const CHART_HEIGHT = 200;

  const state = (window.dashboardState = { polls: 0, errors: 0, lastError: null, lastStats: null, charts: {} });

  // ---- reading /stats: any field may be missing or null ---------------------------------------

  function get(obj, path) {
    let value = obj;
    for (const key of path.split(".")) {
      if (value === null || typeof value !== "object") return null;
      value = value[key];
    }
    return value === undefined ? null : value;
  }

  function num(obj, path) {
    const value = get(obj, path);
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  const energyMeasured = (stats) => get(stats, "energy.status") === "ok";

  // ---- formatting -----------------------------------------------------------------------------

  const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const sigFormat = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 3 });

  function fmtInt(value) {
    return value === null ? "—" : intFormat.format(value);
  }

  function fmtNum(value) {
    if (value === null) return "—";
    return Math.abs(value) >= 100 ? intFormat.format(value) : sigFormat.format(value);
  }

  function fmtMoney(value, currency) {
    if (value === null) return "—";
    return currency === "USD" ? `$${fmtNum(value)}` : `${fmtNum(value)} ${currency || ""}`.trim();
  }

  function fmtDuration(seconds) {
    if (seconds === null) return "—";
    const s = Math.floor(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  }

  // ---- the page's numbers -----------------------------------------------------------------------

  function show(id, text, value = null, unmeasured = false) {
    const el = document.getElementById(id);
    el.textContent = text;
    el.dataset.value = value === null ? "" : String(value);
    el.classList.toggle("unmeasured", unmeasured);
  }

  function showCount(id, stats, path) {
    const value = num(stats, path);
    show(id, fmtInt(value), value);
  }

  function renderNumbers(win, total) {
    showCount("requests-total", total, "requests.total");
    showCount("requests-ok", total, "requests.ok");
    showCount("requests-error", total, "requests.error");
    showCount("requests-in-flight", total, "requests.in_flight");
    showCount("tokens-prompt", total, "tokens.prompt");
    showCount("tokens-completion", total, "tokens.completion");
    const tokensPerS = num(win, "throughput.completion_tokens_per_s");
    show("throughput-tokens", fmtNum(tokensPerS), tokensPerS);
    const requestsPerS = num(win, "throughput.requests_per_s");
    show("throughput-requests", fmtNum(requestsPerS), requestsPerS);
    const uptime = num(total, "uptime_s");
    show("uptime", fmtDuration(uptime), uptime);
    renderUpstream(total);
    renderEnergy(win, total);
    renderCosts(total);
  }

  function renderUpstream(total) {
    const url = get(total, "upstream.url") || "—";
    const error = get(total, "upstream.error");
    if (error) {
      show("upstream", `${url}: ${error}`);
      return;
    }
    const kv = num(total, "upstream.kv_cache_usage");
    const running = fmtInt(num(total, "upstream.running"));
    const waiting = fmtInt(num(total, "upstream.waiting"));
    show("upstream", `${url} · running ${running} · waiting ${waiting} · KV ${kv === null ? "—" : fmtNum(kv * 100) + " %"}`);
  }

  function renderEnergy(win, total) {
    const banner = document.getElementById("energy-status");
    const status = get(total, "energy.status");
    banner.dataset.state = status || "unknown";
    if (!energyMeasured(total)) {
      const reason = get(total, "energy.reason") || "no reason given";
      banner.textContent = status === "unavailable" ? `energy: not measured — ${reason}` : "energy: no energy data in /stats";
      show("energy-kwh", "not measured", null, true);
      show("energy-power", "not measured", null, true);
      show("energy-idle", "—");
      return;
    }
    const source = get(total, "energy.source") || "?";
    const power = num(win, "energy.power_w") ?? num(total, "energy.power_w");
    const factor = num(total, "energy.wall_power_factor");
    banner.textContent =
      `energy: measured by ${source} · ${fmtNum(power)} W now` + (factor !== null && factor !== 1 ? ` · ×${factor} for the wall` : "");
    const kwh = num(total, "energy.kwh");
    show("energy-kwh", kwh === null ? "—" : `${fmtNum(kwh)} kWh`, kwh);
    show("energy-power", power === null ? "—" : `${fmtNum(power)} W`, power);
    const idle = num(total, "energy.idle_w");
    show("energy-idle", idle === null ? "—" : `${fmtNum(idle)} W`, idle);
  }

  function renderCosts(total) {
    const currency = get(total, "cost.currency") || "";
    const measured = energyMeasured(total);
    // Electricity cost comes from measured energy: without a measurement there is no cost to show.
    const money = (path, pathUsd) => {
      const value = num(total, path);
      const usd = num(total, pathUsd);
      return value === null ? "—" : fmtMoney(value, currency) + (usd === null || currency === "USD" ? "" : ` (≈ ${fmtMoney(usd, "USD")})`);
    };
    for (const [id, path, pathUsd] of [
      ["cost-electricity", "cost.electricity", "cost.electricity_usd"],
      ["cost-projected-month", "cost.projected_month", "cost.projected_month_usd"],
    ]) {
      if (measured) show(id, money(path, pathUsd), num(total, path));
      else show(id, "not measured", null, true);
    }
    renderApiEquivalent(get(total, "cost.api_equivalent"), measured);
  }

  function renderApiEquivalent(apis, measured) {
    const body = document.querySelector("#api-equivalent tbody");
    const rows = [];
    for (const [name, api] of Object.entries(apis && typeof apis === "object" ? apis : {})) {
      const row = document.createElement("tr");
      row.dataset.api = name;
      const saving = measured ? fmtMoney(num(api, "saving_usd"), "USD") : "— (energy not measured)";
      for (const text of [name, fmtMoney(num(api, "cost_usd"), "USD"), saving, fmtMoney(num(api, "projected_month_usd"), "USD")]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.appendChild(cell);
      }
      rows.push(row);
    }
    if (rows.length === 0) {
      const row = document.createElement("tr");
      row.innerHTML = '<td colspan="4">—</td>';
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }

  // ---- charts -----------------------------------------------------------------------------------

  // Each series picks its value from (windowed stats, cumulative stats); null leaves a gap.
  const CHARTS = {
    latency: {
      el: "chart-latency",
      series: [
        { label: "TTFT p50", stroke: "#1f77b4", pick: (w) => num(w, "latency_ms.ttft.p50") },
        { label: "TTFT p95", stroke: "#1f77b4", dash: [6, 4], pick: (w) => num(w, "latency_ms.ttft.p95") },
        { label: "end-to-end p50", stroke: "#d62728", pick: (w) => num(w, "latency_ms.e2e.p50") },
        { label: "end-to-end p95", stroke: "#d62728", dash: [6, 4], pick: (w) => num(w, "latency_ms.e2e.p95") },
      ],
    },
    throughput: {
      el: "chart-throughput",
      series: [{ label: "completion tokens/s", stroke: "#2ca02c", pick: (w) => num(w, "throughput.completion_tokens_per_s") }],
    },
    power: {
      el: "chart-power",
      energy: true,
      series: [{ label: "W", stroke: "#ff7f0e", pick: (w, t) => (energyMeasured(t) ? num(w, "energy.power_w") ?? num(t, "energy.power_w") : null) }],
    },
    energy: {
      el: "chart-energy",
      energy: true,
      series: [
        { label: "kWh", stroke: "#9467bd", scale: "kwh", pick: (w, t) => (energyMeasured(t) ? num(t, "energy.kwh") : null) },
        { label: "electricity cost", stroke: "#8c564b", scale: "cost", pick: (w, t) => (energyMeasured(t) ? num(t, "cost.electricity") : null) },
      ],
      axes: [{ scale: "kwh" }, { scale: "cost", side: 1, grid: { show: false } }],
    },
    in_flight: {
      el: "chart-in-flight",
      series: [{ label: "in flight", stroke: "#17becf", pick: (w, t) => num(t, "requests.in_flight") }],
      axes: [{ incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }], // whole requests
    },
  };

  const times = [];
  for (const chart of Object.values(CHARTS)) chart.values = chart.series.map(() => []);

  // Tick labels with as many decimals as the tick step needs (uPlot's default rounds 0.00591 to 0.006).
  function axisValues(u, splits, axisIdx, space, incr) {
    const decimals = Math.min(Math.max(0, -Math.floor(Math.log10(incr))), 10);
    return splits.map((v) => (v === null ? "" : v.toFixed(decimals)));
  }

  function seriesOptions({ label, stroke, dash, scale }) {
    // uPlot takes a key given as undefined as set: leave out what a series does not use.
    return { label, stroke, width: 2, spanGaps: false, ...(dash ? { dash } : {}), ...(scale ? { scale } : {}) };
  }

  function createCharts() {
    for (const chart of Object.values(CHARTS)) {
      const el = document.getElementById(chart.el);
      chart.plot = new uPlot(
        {
          width: Math.max(el.clientWidth, 300),
          height: CHART_HEIGHT,
          scales: {
            x: { time: true, range: (u, min, max) => [Math.min(min, max - MIN_SPAN_S), max] },
            y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] }, // rates and counts from zero
          },
          series: [{}, ...chart.series.map(seriesOptions)],
          axes: [{}, ...(chart.axes || [{}]).map((axis) => ({ values: axisValues, ...axis }))],
          legend: { live: false },
        },
        [times, ...chart.values],
        el,
      );
    }
  }

  function record(t, win, total) {
    times.push(t);
    for (const chart of Object.values(CHARTS)) {
      chart.series.forEach((series, i) => chart.values[i].push(win === null ? null : series.pick(win, total)));
    }
    const drop = times.findIndex((time) => time >= t - HISTORY_S);
    if (drop > 0) {
      times.splice(0, drop);
      for (const chart of Object.values(CHARTS)) for (const values of chart.values) values.splice(0, drop);
    }
  }

  function drawCharts(total) {
    const measured = energyMeasured(total);
    for (const [name, chart] of Object.entries(CHARTS)) {
      const el = document.getElementById(chart.el);
      if (chart.energy) {
        el.hidden = !measured;
        el.parentElement.querySelector(".not-measured").hidden = measured;
      }
      chart.plot.setData([times, ...chart.values]);
      state.charts[name] = times.filter((_, i) => chart.values.some((values) => values[i] !== null)).length;
    }
  }

  function resizeCharts() {
    for (const chart of Object.values(CHARTS)) {
      const el = document.getElementById(chart.el);
      if (!el.hidden) chart.plot.setSize({ width: Math.max(el.clientWidth, 300), height: CHART_HEIGHT });
    }
  }

  // ---- polling ----------------------------------------------------------------------------------

  class GatewayError extends Error {}

  async function fetchStats(url) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(url, { cache: "no-store", signal: abort.signal });
    } catch (err) {
      throw new GatewayError(err.name === "AbortError" ? `no answer from ${url} in ${FETCH_TIMEOUT_MS / 1000} s` : `${url}: ${err.message}`);
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) throw new GatewayError(`${url} answered HTTP ${response.status}`);
    try {
      return await response.json();
    } catch (err) {
      throw new GatewayError(`${url} sent no JSON: ${err.message}`);
    }
  }

  function showConnection(error) {
    const el = document.getElementById("conn-status");
    if (error === null) {
      el.dataset.state = "live";
      el.textContent = `live · updated ${new Date().toLocaleTimeString("en-GB")}`;
    } else {
      el.dataset.state = "error";
      el.textContent = `gateway unreachable, retrying (${error})`;
    }
  }

  async function poll() {
    const now = Date.now() / 1000;
    try {
      let win, total;
      try {
        [win, total] = await Promise.all([fetchStats(`/stats?window=${WINDOW_S}`), fetchStats("/stats")]);
      } catch (err) {
        if (!(err instanceof GatewayError)) throw err;
        state.errors += 1;
        state.lastError = err.message;
        showConnection(err.message);
        record(now, null, null); // a gap in every line
        drawCharts(state.lastStats ? state.lastStats.total : null);
        return;
      }
      state.lastStats = { window: win, total };
      record(now, win, total);
      renderNumbers(win, total);
      drawCharts(total);
      state.polls += 1;
      showConnection(null);
    } finally {
      setTimeout(poll, POLL_MS); // a bug in rendering shows in the console; polling goes on regardless
    }
  }

  createCharts();
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(resizeCharts, 150);
  });
  poll();
})();
