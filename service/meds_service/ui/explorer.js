// The meds explorer: plain JavaScript, no libraries; every number comes from the service's JSON API.
"use strict";
const $ = (sel) => document.querySelector(sel);
const state = { run: null, offset: 0, limit: 25, sort: "collapse", total: 0 };
const COLORS = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00", "#b82e2e", "#316395"];

function apiKey() { return sessionStorage.getItem("meds-api-key") || ""; }

async function api(path) {
  const headers = { Accept: "application/json" };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  const response = await fetch(path, { headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new Error(response.status + ": " + message);
  }
  $("#error").hidden = true;
  return body;
}

function fail(error) { $("#error").textContent = String(error.message || error); $("#error").hidden = false; }
function fmt(x, digits = 3) { return x === null || x === undefined ? "–" : (Number.isInteger(x) ? String(x) : x.toFixed(digits)); }
function enc(s) { return encodeURIComponent(s); }
function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}
function svg(tag, attrs = {}, text = "") {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}
function show(view) { for (const id of ["runs-view", "run-view", "prompt-view"]) $("#" + id).hidden = id !== view; }
function cell(row, value, field, numeric = true) {
  const td = el("td", { "data-field": field, class: numeric ? "num" : "" }, typeof value === "number" ? fmt(value) : value);
  row.appendChild(td);
}

// ---- plots (hand-written SVG) ----------------------------------------------------------------------

function linePlot(title, xs, series, id) {
  const W = 300, H = 150, L = 36, B = 20, T = 8, R = 8;
  const box = el("div", { class: "plot", id });
  box.appendChild(el("h4", {}, title));
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  const all = series.flatMap((s) => s.values);
  const ymax = Math.max(1e-9, ...all), xmin = Math.min(...xs), xmax = Math.max(...xs);
  const x = (v) => L + (xmax === xmin ? 0.5 : (v - xmin) / (xmax - xmin)) * (W - L - R);
  const y = (v) => H - B - (v / ymax) * (H - B - T);
  root.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#99a" }));
  root.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#99a" }));
  root.appendChild(svg("text", { x: 2, y: T + 8 }, fmt(ymax, 2)));
  root.appendChild(svg("text", { x: 2, y: H - B }, "0"));
  if (xs.length) {
    root.appendChild(svg("text", { x: L, y: H - 4 }, "step " + xmin));
    root.appendChild(svg("text", { x: W - R - 40, y: H - 4 }, String(xmax)));
  }
  series.forEach((s, i) => {
    const points = xs.map((v, j) => `${x(v).toFixed(1)},${y(s.values[j]).toFixed(1)}`).join(" ");
    root.appendChild(svg("polyline", { points, fill: "none", stroke: s.color || COLORS[i % COLORS.length], "stroke-width": 2 }));
  });
  box.appendChild(root);
  return box;
}

function barPlot(title, labels, values, id) {
  const W = 420, H = 150, L = 30, B = 30, T = 8;
  const box = el("div", { class: "plot", id });
  box.appendChild(el("h4", {}, title));
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  const ymax = Math.max(1, ...values), w = (W - L) / Math.max(values.length, 1);
  values.forEach((v, i) => {
    const h = (v / ymax) * (H - B - T);
    const bar = svg("rect", { x: L + i * w + 1, y: H - B - h, width: Math.max(w - 2, 1), height: h, fill: "#3366cc", "data-count": v });
    bar.appendChild(svg("title", {}, `${labels[i]}: ${v}`));
    root.appendChild(bar);
    if (values.length <= 12) root.appendChild(svg("text", { x: L + i * w + 2, y: H - B + 12 }, labels[i]));
  });
  root.appendChild(svg("text", { x: 2, y: T + 8 }, String(ymax)));
  box.appendChild(root);
  return box;
}

function stackedClusters(steps, clusters) {
  // size per step of every cluster, stacked; noise (-1) in grey
  const W = 520, H = 170, L = 30, B = 20, T = 8;
  const box = el("div", { class: "plot", id: "cluster-stack" });
  box.appendChild(el("h4", {}, "wrong rollouts per step, by cluster (grey: noise)"));
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  const labels = Object.keys(clusters).sort((a, b) => Number(a) - Number(b));
  const totals = steps.map((_, j) => labels.reduce((t, l) => t + clusters[l].sizes[j], 0));
  const ymax = Math.max(1, ...totals), w = (W - L) / Math.max(steps.length, 1);
  steps.forEach((step, j) => {
    let base = H - B;
    labels.forEach((l, i) => {
      const h = (clusters[l].sizes[j] / ymax) * (H - B - T);
      if (!h) return;
      const rect = svg("rect", { x: L + j * w + 1, y: base - h, width: Math.max(w - 2, 1), height: h,
        fill: l === "-1" ? "#bbb" : COLORS[Number(l) % COLORS.length], "data-label": l, "data-step": step });
      rect.appendChild(svg("title", {}, `step ${step}, cluster ${l}: ${clusters[l].sizes[j]}`));
      root.appendChild(rect);
      base -= h;
    });
  });
  if (steps.length) {
    root.appendChild(svg("text", { x: L, y: H - 4 }, "step " + steps[0]));
    root.appendChild(svg("text", { x: W - 40, y: H - 4 }, String(steps[steps.length - 1])));
  }
  root.appendChild(svg("text", { x: 2, y: T + 8 }, String(ymax)));
  box.appendChild(root);
  return box;
}

// ---- views ---------------------------------------------------------------------------------------

async function showRuns() {
  show("runs-view");
  $("#crumbs").textContent = "";
  const body = await api("/v1/runs");
  const tbody = $("#runs tbody");
  tbody.replaceChildren();
  for (const run of body.runs) {
    const row = el("tr", { "data-run": run.run });
    cell(row, run.run, "run", false);
    cell(row, run.config.penalty_target, "penalty_target", false);
    cell(row, run.stats.keys, "keys");
    cell(row, run.stats.rollouts, "rollouts");
    cell(row, run.stats.pending_refits, "pending_refits");
    row.addEventListener("click", () => { location.hash = "#run=" + enc(run.run); });
    tbody.appendChild(row);
  }
}

async function showRun(run) {
  show("run-view");
  if (state.run !== run) { state.run = run; state.offset = 0; }
  $("#run-title").textContent = run;
  $("#crumbs").replaceChildren(el("a", { href: "#run=" + enc(run) }, run));
  const summary = await api(`/v1/runs/${enc(run)}/summary`);
  const s = summary.series;
  $("#plots").replaceChildren(
    linePlot("repeat rate", s.step, [{ values: s.repeat_rate }], "plot-repeat_rate"),
    linePlot("largest cluster share", s.step, [{ values: s.largest_cluster_share }], "plot-largest_cluster_share"),
    linePlot("cluster entropy (nats)", s.step, [{ values: s.cluster_entropy }], "plot-cluster_entropy"),
    linePlot("distinct error clusters per prompt", s.step, [{ values: s.distinct_error_clusters }], "plot-distinct_error_clusters"),
    linePlot("noise share", s.step, [{ values: s.noise_share, color: "#888" }], "plot-noise_share"),
    linePlot("wrong rollouts", s.step, [{ values: s.wrong_rollouts, color: "#109618" }], "plot-wrong_rollouts"),
  );
  await loadPrompts();
}

async function loadPrompts() {
  const run = state.run;
  const page = await api(`/v1/runs/${enc(run)}/prompts?sort=${state.sort}&offset=${state.offset}&limit=${state.limit}`);
  state.total = page.total;
  $("#page-info").textContent = `${page.total ? state.offset + 1 : 0}–${state.offset + page.prompts.length} of ${page.total}`;
  const tbody = $("#prompts tbody");
  tbody.replaceChildren();
  for (const p of page.prompts) {
    const row = el("tr", { "data-prompt": p.prompt_id });
    cell(row, p.prompt_id, "prompt_id", false);
    cell(row, p.fitted, "fitted");
    cell(row, p.clusters, "clusters");
    cell(row, p.largest_cluster_share, "largest_cluster_share");
    cell(row, p.cluster_entropy, "cluster_entropy");
    cell(row, p.noise_share, "noise_share");
    cell(row, `${fmt(p.first_step)}–${fmt(p.last_step)}`, "steps", false);
    row.addEventListener("click", () => { location.hash = `#run=${enc(run)}&prompt=${enc(p.prompt_id)}`; });
    tbody.appendChild(row);
  }
}

async function showPrompt(run, prompt) {
  show("prompt-view");
  state.run = run;
  $("#crumbs").replaceChildren(el("a", { href: "#run=" + enc(run) }, run), document.createTextNode(" › " + prompt));
  $("#prompt-title").textContent = prompt;
  const view = await api(`/v1/runs/${enc(run)}/collapse/${enc(prompt)}`);
  const wrong = view.groups.wrong || { fitted: 0, noise_share: 0, rollouts: 0, steps: [], clusters: {}, penalties: { zero: 0, edges: [], counts: [] } };
  $("#prompt-fitted").textContent = String(wrong.fitted);
  $("#prompt-noise").textContent = fmt(wrong.noise_share);
  const rollouts = Object.values(view.groups).reduce((t, g) => t + g.rollouts, 0);
  $("#prompt-rollouts").textContent = String(rollouts);
  $("#cluster-plot").replaceChildren(stackedClusters(wrong.steps, wrong.clusters));
  const tbody = $("#clusters tbody");
  tbody.replaceChildren();
  $("#cluster-detail").hidden = true;
  const labels = Object.keys(wrong.clusters).sort((a, b) => wrong.clusters[b].size - wrong.clusters[a].size);
  for (const label of labels) {
    const c = wrong.clusters[label];
    const row = el("tr", { "data-label": label });
    cell(row, label === "-1" ? "noise" : label, "label", false);
    cell(row, c.size, "size");
    cell(row, c.first_step, "first_step");
    cell(row, c.last_step, "last_step");
    cell(row, c.sizes.join(" "), "sizes", false);
    row.addEventListener("click", () => selectCluster(row, label, c, wrong.steps));
    tbody.appendChild(row);
  }
  // penalties of every remembered rollout of the prompt (all groups)
  const groups = Object.values(view.groups);
  const counts = groups.length ? groups[0].penalties.counts.map((_, i) => groups.reduce((t, g) => t + (g.penalties.counts[i] || 0), 0)) : [];
  const edges = groups.length ? groups[0].penalties.edges : [];
  const zero = groups.reduce((t, g) => t + g.penalties.zero, 0);
  const names = ["0", ...counts.map((_, i) => `≤${fmt(edges[i + 1], 2)}`)];
  $("#penalty-plot").replaceChildren(barPlot("rollouts by penalty", names, [zero, ...counts], "penalty-histogram"));
}

function selectCluster(row, label, cluster, steps) {
  for (const r of document.querySelectorAll("#clusters tr.selected")) r.classList.remove("selected");
  row.classList.add("selected");
  const detail = $("#cluster-detail");
  detail.replaceChildren(
    el("h4", {}, label === "-1" ? "noise: wrong rollouts in no cluster" : `cluster ${label}`),
    el("p", { id: "cluster-summary" }, `${cluster.size} wrong rollouts, seen from step ${fmt(cluster.first_step)} to step ${fmt(cluster.last_step)}`),
    barPlot("size per step", steps.map(String), cluster.sizes, "cluster-sizes"),
  );
  const examples = el("ol", { id: "cluster-examples" });
  for (const text of cluster.examples || []) examples.appendChild(el("li", {}, text));
  detail.appendChild(cluster.examples && cluster.examples.length
    ? examples : el("p", { class: "note" }, "No texts kept: set the run's text_max_chars to see examples."));
  detail.hidden = false;
}

async function route() {
  try {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("run") && params.get("prompt")) await showPrompt(params.get("run"), params.get("prompt"));
    else if (params.get("run")) await showRun(params.get("run"));
    else await showRuns();
  } catch (error) { fail(error); }
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("meds-api-key", $("#api-key").value.trim());
  route();
});
$("#sort").addEventListener("change", () => { state.sort = $("#sort").value; state.offset = 0; loadPrompts().catch(fail); });
$("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadPrompts().catch(fail); });
$("#next").addEventListener("click", () => {
  if (state.offset + state.limit < state.total) { state.offset += state.limit; loadPrompts().catch(fail); }
});
window.addEventListener("hashchange", route);
route();
