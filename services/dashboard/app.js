// rlaif dashboard: polls /api/state every 2 s and redraws. No libraries: charts are SVG drawn here.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#58a6ff", "#3fb950", "#d29922", "#f778ba", "#a371f7", "#39c5cf", "#ff7b72", "#e3b341", "#8b949e"];
// one colour per pipeline stage, shared by its cards and its timeline series
const STAGE = { generate: "#79c0ff", judge: "#56d364", learn: "#e3b341", judgeLag: "#f778ba", learnerLag: "#d2a8ff" };
const REFRESH_MS = 2000;
const colours = new Map(); // series name -> colour, stable across refreshes

function colourOf(name) {
  const key = name.replace(/ \((train|eval|learner batch mean)\)$/, "");
  if (!colours.has(key)) colours.set(key, PALETTE[colours.size % PALETTE.length]);
  return colours.get(key);
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, n) {
  if (hi === lo) { hi = lo + 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function fmt(v) {
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(1) + "k";
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) < 10 ? v.toFixed(2) : v.toFixed(1);
}

// series: [{name, points: [[x, y], ...], dashed}]; opts: {xLabel, yMin, yMax, integerX, dots}
function lineChart(id, series, opts) {
  const W = 640, H = 260, L = 48, R = 12, T = 10, B = 34;
  const host = document.getElementById(id);
  const legend = document.getElementById(id.replace("chart-", "legend-"));
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": id });
  const all = series.flatMap((s) => s.points);
  svg.dataset.series = String(series.filter((s) => s.points.length).length);
  svg.dataset.points = String(all.length);
  host.replaceChildren(svg);
  legend.replaceChildren();
  if (!all.length) {
    svg.append(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "waiting for data…"));
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let y0 = opts.yMin ?? Math.min(...all.map((p) => p[1]));
  let y1 = opts.yMax ?? Math.max(...all.map((p) => p[1]));
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const axis = el("svg:g", { class: "axis" });
  for (const y of niceTicks(y0, y1, 5)) {
    axis.append(el("svg:line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid-line" }));
    axis.append(el("svg:text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, fmt(y)));
  }
  let xt = niceTicks(x0, x1, 8);
  if (opts.integerX) xt = xt.filter(Number.isInteger);
  for (const x of xt) {
    axis.append(el("svg:line", { x1: sx(x), x2: sx(x), y1: H - B, y2: H - B + 4 }));
    axis.append(el("svg:text", { x: sx(x), y: H - B + 16, "text-anchor": "middle" }, fmt(x)));
  }
  axis.append(el("svg:text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel));
  svg.append(axis);
  for (const s of series) {
    if (!s.points.length) continue;
    const c = s.colour || colourOf(s.name);
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    const path = el("svg:path", { d, fill: "none", stroke: c, "stroke-width": 2, class: "series" });
    if (s.dashed) path.setAttribute("stroke-dasharray", "6 4");
    path.dataset.name = s.name;
    svg.append(path);
    if (opts.dots !== false) {
      for (const p of s.points) {
        const dot = el("svg:circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: c, class: "point" });
        dot.append(el("svg:title", {}, `${s.name}: ${p[1]} @ ${opts.xLabel} ${p[0]}`));
        svg.append(dot);
      }
    }
    const item = el("span", {}, s.name);
    item.style.setProperty("--c", c);
    legend.append(item);
  }
}

function card(key, value, accent) {
  const div = el("div", { class: accent ? "card stage" : "card" });
  if (accent) div.style.setProperty("--accent", accent);
  div.append(el("div", { class: "k" }, key), el("div", { class: "v" }, String(value)));
  return div;
}

function scoreCell(v) {
  const td = el("td", { class: "num" });
  if (v === undefined || v === null) { td.textContent = "–"; return td; }
  const span = el("span", { class: "score" }, v.toFixed(3));
  const hue = Math.round(120 * Math.max(0, Math.min(1, v))); // red (0) → green (1)
  span.style.background = `hsl(${hue}, 60%, 55%)`;
  td.append(span);
  return td;
}

function ago(seconds) {
  return seconds < 60 ? `${seconds.toFixed(0)} s ago` : `${(seconds / 60).toFixed(1)} min ago`;
}

function render(s) {
  const t = s.totals, tp = s.throughput, lag = s.lag;
  document.getElementById("totals").replaceChildren(
    card("learner step", t.learner_step),
    card("latest policy version", `v${t.policy_version}`),
    card("rollouts published", `${t.rollouts_published} (${t.eval_rollouts} eval)`),
    card("rollouts judged", t.judged),
    card("consumed by learner", t.learner_consumed),
    card("dead letters", t.dead_letters, t.dead_letters ? "#f85149" : undefined),
  );
  document.getElementById("stages").replaceChildren(
    card("generate · rollouts/s", tp.rollouts_per_s.toFixed(2), STAGE.generate),
    card("judge · judged/s", tp.judged_per_s.toFixed(2), STAGE.judge),
    card("learn · steps/s", tp.learner_steps_per_s.toFixed(3), STAGE.learn),
    card("judge lag · published − judged − dead-lettered", lag.judge, STAGE.judgeLag),
    card("learner lag · judged − consumed", lag.learner, STAGE.learnerLag),
  );
  lineChart("chart-step", s.reward_by_step, { xLabel: "learner step", yMin: 0, yMax: 1, integerX: true });
  lineChart("chart-version", s.reward_by_version, { xLabel: "policy version", yMin: 0, yMax: 1, integerX: true });
  const tl = s.timeline;
  const pts = (ys) => tl.t.map((x, i) => [x, ys[i]]);
  lineChart("chart-throughput", [
    { name: "rollouts/s", points: pts(tl.rollouts_per_s), colour: STAGE.generate },
    { name: "judged/s", points: pts(tl.judged_per_s), colour: STAGE.judge },
    { name: "learner steps/s", points: pts(tl.steps_per_s), colour: STAGE.learn },
  ], { xLabel: "seconds from now", yMin: 0, dots: false });
  lineChart("chart-lag", [
    { name: "published − judged − dead-lettered", points: pts(tl.judge_lag), colour: STAGE.judgeLag },
    { name: "judged − consumed by learner", points: pts(tl.learner_lag), colour: STAGE.learnerLag },
  ], { xLabel: "seconds from now", yMin: 0, dots: false });

  const gbody = document.querySelector("#generators tbody");
  gbody.replaceChildren(...s.generators.map((g) => {
    const tr = el("tr", { class: "generator-row" });
    tr.append(el("td", {}, g.id), el("td", { class: "num" }, `v${g.serving}`),
      el("td", { class: "num" }, String(g.behind)), el("td", { class: "num" }, String(g.rollouts)),
      el("td", {}, ago(g.last_seen_s)), el("td", {}, g.versions_seen.map((v) => `v${v}`).join(" ")));
    return tr;
  }));

  const head = el("tr");
  for (const h of ["when", "generator", "version", "split", "prompt", "completion", "reward", ...s.principles]) {
    head.append(el("th", ["version", "reward", ...s.principles].includes(h) ? { class: "num" } : {}, h));
  }
  document.querySelector("#rollouts thead").replaceChildren(head);
  document.querySelector("#rollouts tbody").replaceChildren(...s.latest_rollouts.map((r) => {
    const tr = el("tr", { class: "rollout-row" });
    tr.append(el("td", {}, ago(s.now - r.created_at)), el("td", {}, r.generator),
      el("td", { class: "num" }, `v${r.policy_version}`), el("td", {}, r.split),
      el("td", { class: "text" }, r.prompt), el("td", { class: "text" }, r.completion), scoreCell(r.reward));
    for (const p of s.principles) tr.append(scoreCell(r.scores[p]));
    return tr;
  }));

  const status = document.getElementById("status");
  const src = s.source;
  status.className = "pill " + (src.following ? "ok" : "bad");
  status.textContent = src.following ? "live" : "reconnecting";
  document.getElementById("source").textContent =
    `${src.bootstrap} · ${src.topic_prefix}* · ${src.records} records read` +
    (src.malformed ? ` · ${src.malformed} malformed` : "") + (src.error ? ` · last error: ${src.error}` : "") +
    ` · updated ${new Date(s.now * 1000).toLocaleTimeString()}`;
}

async function refresh() {
  try {
    const resp = await fetch("/api/state", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (err) {
    const status = document.getElementById("status");
    status.className = "pill bad";
    status.textContent = `dashboard unreachable (${err.message})`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
