// harness view: the page. No framework and no build step: the DOM is built with createElement and
// every text from results or models is inserted with textContent (never parsed as HTML).
"use strict";

const state = { runs: [], statuses: [], trees: {} };

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = String(v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    e.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString("en-US") : v.toFixed(2);
  if (typeof v === "boolean") return v ? "yes" : "no";
  return String(v);
}

// counts print as integers; rates (JSON drops the ".0" of 30.0) always with two decimals
const isCount = key => /(^|\.)n(_|$)|_n$|count|requests|correct|tokens/.test(key);

function numCell(runId, key, v) {
  const text = typeof v === "number" && !isCount(key) ? v.toFixed(2) : fmt(v);
  return el("td", { class: "num", "data-run": runId, "data-key": key,
                    "data-value": typeof v === "number" ? String(v) : JSON.stringify(v), text });
}

async function api(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(`${r.status}: ${await r.text()}`);
  return r.json();
}

function route() {
  const h = location.hash.replace(/^#/, "");
  const [page, qs] = h.split("?");
  return { page: page || "overview", params: new URLSearchParams(qs || "") };
}

function go(page, params) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== null && v !== undefined && v !== "") qs.set(k, v);
  const s = qs.toString();
  location.hash = page + (s ? "?" + s : "");
}

function runName(id) { const r = state.runs[id]; return r ? r.name : `run ${id}`; }
function levelName(run, lv) { return (state.runs[run] && state.runs[run].levels[String(lv)]) || `level ${lv}`; }

// ------------------------------------------------------------------ overview

const MAIN_KEYS = [
  ["n_items", "items"], ["hca", "HCA"], ["leaf_acc", "leaf accuracy"], ["por", "POR"], ["strict_por", "strict POR"],
  ["tor", "TOR"], ["por_f1", "POR F1"], ["hf1", "hierarchical F1"],
  ["leaf_right_ancestor_wrong", "leaf right, an ancestor wrong (%)"],
  ["ancestors_right_leaf_wrong", "ancestors right, leaf wrong (%)"],
  ["n_questions", "questions"], ["n_unanswered", "unanswered"], ["n_errors", "failed"], ["n_unparsed", "unparsed"],
];

function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out.push([key, v]);
  }
  return out;
}

function banner(run) {
  const s = run.summary || {};
  const bits = [];
  if (s.error) return el("div", { class: "banner error", text: `${run.name}: ${s.error}` });
  if (run.complete === false) {
    const c = run.counts || {};
    bits.push(`${run.name}: this run is incomplete (status ${run.status || "unknown"}; `
      + `${fmt(s.n_unanswered ?? null)} unanswered, ${fmt(c.failed)} failed, ${fmt(c.unparsed)} unparsed). `
      + "Its numbers cover the questions answered so far.");
  }
  return bits.length ? el("div", { class: "banner incomplete", "data-run": run.id, text: bits.join(" ") }) : null;
}

function overviewHierarchy(runs) {
  const t = el("table", { id: "overview-table" });
  t.appendChild(el("tr", {}, el("th", { text: "metric" }), runs.map(r => el("th", { text: r.name }))));
  const ci = (r, key) => {
    const v = r.summary[key];
    return Array.isArray(v) && v[0] !== null ? ` [${v[0].toFixed(2)}, ${v[1].toFixed(2)}]` : "";
  };
  for (const [key, label] of MAIN_KEYS) {
    if (!runs.some(r => key in (r.summary || {}))) continue;
    t.appendChild(el("tr", {}, el("th", { text: label }), runs.map(r => {
      if (!(key in r.summary)) return el("td", { text: "–" });
      const td = numCell(r.id, key, r.summary[key]);
      if (key === "hca" || key === "leaf_acc") {
        td.appendChild(el("span", { class: "muted ci", "data-run": r.id, "data-key": key + "_ci",
                                    "data-value": JSON.stringify(r.summary[key + "_ci"]), text: ci(r, key + "_ci") }));
      }
      if (key === "leaf_right_ancestor_wrong") {
        td.appendChild(el("div", {}, el("a", { href: `#questions?run=${r.id}&lraw=1`, text: "show these" })));
      }
      return td;
    })));
  }
  t.appendChild(el("tr", {}, el("th", { text: "complete" }),
    runs.map(r => numCell(r.id, "complete", "complete" in r.summary ? r.summary.complete : r.complete))));
  const statuses = state.statuses;
  for (const st of statuses) {
    t.appendChild(el("tr", {}, el("th", { text: `questions ${st} (viewer index)` }), runs.map(r =>
      el("td", { class: "num", "data-run": r.id, "data-count": st },
         el("a", { href: `#questions?run=${r.id}&status=${st}`, text: fmt((r.counts || {})[st] || 0) })))));
  }
  const levels = [...new Set(runs.flatMap(r => Object.keys(r.summary.per_level || {})))].sort((a, b) => a - b);
  const lt = el("table", { id: "levels-table" });
  lt.appendChild(el("tr", {}, el("th", { text: "level" }), runs.map(r => el("th", { text: r.name }))));
  for (const lv of levels) {
    lt.appendChild(el("tr", {}, el("th", { text: `${lv} · ${levelName(runs[0].id, lv)}` }), runs.map(r => {
      const v = (r.summary.per_level || {})[lv];
      if (v === undefined) return el("td", { text: "–" });
      const td = numCell(r.id, `per_level.${lv}`, v);
      td.appendChild(el("span", { class: "dist", style: null }));
      td.lastChild.style.width = `${Math.max(0, Math.min(100, v))}px`;
      td.appendChild(el("div", {}, el("a", { class: "muted", href: `#questions?run=${r.id}&level=${lv}&status=wrong`,
                                              text: `${fmt((r.summary.per_level_n || {})[lv])} questions · wrong ones` })));
      return td;
    })));
  }
  return [el("h3", { text: "Hierarchical consistency" }), t,
          levels.length ? el("h3", { text: "Accuracy per level" }) : null, levels.length ? lt : null];
}

function overviewOther(run) {
  const t = el("table", { class: "summary-table", "data-run": run.id });
  t.appendChild(el("tr", {}, el("th", { text: "metric" }), el("th", { text: "value" })));
  for (const [k, v] of flatten(run.summary, "", [])) {
    if (k === "kind") continue;
    t.appendChild(el("tr", {}, el("th", { text: k }),
      typeof v === "number" || typeof v === "boolean" ? numCell(run.id, k, v) : el("td", { text: JSON.stringify(v) })));
  }
  return [el("h3", { text: `${run.name} (${run.kind})` }), t];
}

function renderOverview(main) {
  main.appendChild(el("h2", { text: "Overview" }));
  const desc = el("table", { id: "runs-table" },
    el("tr", {}, ["run", "kind", "model", "taxonomy", "mode", "answer", "status", "results files"].map(h => el("th", { text: h }))),
    state.runs.map(r => el("tr", {}, [r.name, r.kind, r.model, r.taxonomy, r.mode, r.answer, r.status,
                                      (r.files || []).join(", ")].map(v => el("td", { text: fmt(v) })))));
  main.appendChild(desc);
  for (const r of state.runs) { const b = banner(r); if (b) main.appendChild(b); }
  const hier = state.runs.filter(r => r.summary && r.summary.kind === "hierarchy");
  if (hier.length) main.append(...overviewHierarchy(hier).filter(Boolean));
  for (const r of state.runs.filter(r => !r.summary || r.summary.kind !== "hierarchy")) main.append(...overviewOther(r));
}

// ------------------------------------------------------------------ taxonomy map

function runSelect(name, value, withNone) {
  const s = el("select", { name });
  if (withNone) s.appendChild(el("option", { value: "", text: "—" }));
  for (const r of state.runs) s.appendChild(el("option", { value: r.id, text: r.name, selected: String(r.id) === String(value) }));
  return s;
}

async function renderMap(main, params) {
  const run = Number(params.get("run") || 0);
  main.appendChild(el("h2", { text: "Taxonomy map" }));
  const sel = runSelect("run", run, false);
  sel.addEventListener("change", () => go("map", { run: sel.value }));
  main.appendChild(el("p", {}, "Run ", sel, el("span", { class: "muted",
    text: " · accuracy of the questions whose truth is each node; the ring is the level, the arc the number of questions. Click a node to list its questions." })));
  const tree = state.trees[run] || (state.trees[run] = await api(`/api/tree?run=${run}`));
  const wrap = el("div", { class: "mapwrap" });
  main.appendChild(wrap);
  const info = el("div", { id: "map-info", class: "legend" }, el("p", { class: "muted", text: "Hover a node." }));
  if (!tree.nodes.length) { wrap.appendChild(el("p", { text: "No questions with a truth in this run." })); return; }
  // d3 hierarchy: a virtual root above the first level's nodes
  const byId = new Map(tree.nodes.map(n => [n.id, { ...n, children: [] }]));
  const root = { id: -1, name: runName(run), children: [], n: 0 };
  for (const n of byId.values()) {
    const p = n.parent !== null && byId.has(n.parent) ? byId.get(n.parent) : null;
    if (p && p.level === n.level - 1) p.children.push(n); else root.children.push(n);
  }
  const h = d3.hierarchy(root).sum(d => (d.children && d.children.length ? 0 : d.n)).sort((a, b) => b.value - a.value);
  const size = 640, radius = size / 2;
  d3.partition().size([2 * Math.PI, radius])(h);
  const color = d3.scaleSequential(d3.interpolateRdYlGn).domain([0, 100]);
  const arc = d3.arc().startAngle(d => d.x0).endAngle(d => d.x1).innerRadius(d => d.y0).outerRadius(d => d.y1 - 1);
  const svg = d3.create("svg").attr("id", "sunburst").attr("width", size).attr("height", size)
    .attr("viewBox", [-radius, -radius, size, size]);
  svg.append("g").selectAll("path").data(h.descendants().filter(d => d.depth > 0 && d.x1 - d.x0 > 0.0005)).join("path")
    .attr("d", arc)
    .attr("fill", d => d.data.acc === null ? "#ccc" : color(d.data.acc))
    .attr("data-level", d => d.data.level).attr("data-truth", d => d.data.name)
    .attr("data-n", d => d.data.n).attr("data-right", d => d.data.right)
    .on("mouseover", (ev, d) => {
      info.replaceChildren(
        el("h3", { text: d.data.name }),
        el("p", { text: `${d.data.level_name} (level ${d.data.level})${d.data.scored ? "" : " · not scored"}` }),
        el("p", { text: `accuracy ${fmt(d.data.acc)} % · ${fmt(d.data.right)} of ${fmt(d.data.n)} questions right` }),
        el("p", { class: "muted", text: d.ancestors().reverse().slice(1).map(a => a.data.name).join(" › ") }));
    })
    .on("click", (ev, d) => go("questions", { run, level: d.data.level, truth: d.data.name }))
    .append("title").text(d => `${d.data.name}: ${fmt(d.data.acc)} % of ${d.data.n}`);
  wrap.appendChild(svg.node());
  wrap.appendChild(info);
  // the same numbers as a table (first two rings, worst first) for reading and sorting by eye
  const top = tree.nodes.filter(n => n.level === Math.min(...tree.nodes.map(m => m.level)) + 1 || n.parent === null)
    .sort((a, b) => (a.acc ?? 0) - (b.acc ?? 0)).slice(0, 40);
  const t = el("table", { id: "map-table" }, el("tr", {}, ["node", "level", "questions", "accuracy %"].map(x => el("th", { text: x }))));
  for (const n of top) {
    t.appendChild(el("tr", {},
      el("td", {}, el("a", { href: `#questions?run=${run}&level=${n.level}&truth=${encodeURIComponent(n.name)}`, text: n.name })),
      el("td", { text: `${n.level} · ${n.level_name}` }), el("td", { class: "num", text: fmt(n.n) }),
      el("td", { class: "num", text: fmt(n.acc) })));
  }
  main.appendChild(el("h3", { text: "Weakest nodes of the upper levels" }));
  main.appendChild(t);
}

// ------------------------------------------------------------------ questions

function optionsList(q) {
  const ul = el("ul", { class: "options" });
  const truth = (q.truth || "").toLowerCase();
  for (const [L, text] of Object.entries(q.choices || {})) {
    const isTruth = String(text).toLowerCase() === truth;
    const isPred = q.option ? L === q.option : L === q.letter;
    const li = el("li", { class: [isTruth ? "truth" : "", isPred ? "pred" : "", isPred && !isTruth ? "wrongpred" : ""].join(" ").trim() || null,
                          "data-letter": L }, `${L}. `, String(text));
    if (isTruth) li.appendChild(el("span", { text: " ✓ truth" }));
    if (isPred) li.appendChild(el("span", { text: q.option ? ` ← statement (${fmt(q.shown)})` : " ← predicted" }));
    const d = q.distribution ? q.distribution[L] : undefined;
    if (typeof d === "number") {
      const p = q.distribution_kind === "logprob" ? Math.exp(d) : d;
      const bar = el("span", { class: "dist" }); bar.style.width = `${Math.round(80 * p)}px`;
      li.append(bar, el("span", { class: "muted", text: ` ${q.distribution_kind === "logprob" ? "logprob " + d.toFixed(3) : (100 * p).toFixed(1) + " %"}` }));
    }
    ul.appendChild(li);
  }
  return ul;
}

function thumb(q, full) {
  if (!q.image) return el("div", { class: "noimg", text: "no image (outside the run's image roots, or text mode)" });
  const img = el("img", { class: full ? "itemimg" : "thumb", src: full ? q.image.url : q.image.thumb, alt: `image of ${q.item}`, loading: "lazy" });
  img.addEventListener("error", () => img.replaceWith(el("div", { class: "noimg", text: "image not available" })));
  return img;
}

function questionCard(q) {
  const right = el("div", {},
    el("div", {},
      el("span", { class: `badge ${q.status}`, text: q.status }), " ",
      q.lraw ? el("span", { class: "badge lraw", text: "leaf right, ancestor wrong" }) : null, " ",
      el("strong", { text: `${q.level_name || ""}${q.level !== null && q.level !== undefined ? " (level " + q.level + ")" : ""}` }), " · item ",
      el("a", { href: `#item?item=${encodeURIComponent(q.item)}`, class: "item-link", text: q.item }),
      q.scored === false ? el("span", { class: "muted", text: " · not scored (taxonomy root)" }) : null),
    el("div", { class: "muted", text: `truth: ${q.truth} · prediction: ${fmt(q.shown)}` }),
    q.question && q.question.system ? el("details", {}, el("summary", { text: "system prompt" }), el("pre", { text: q.question.system })) : null,
    q.question && q.question.note ? el("div", { class: "muted", text: q.question.note }) : null,
    q.question && q.question.text ? el("pre", { class: "question", text: q.question.text }) : null,
    optionsList(q),
    el("div", {}, el("span", { class: "muted", text: "raw answer: " })),
    el("pre", { class: "raw", text: q.raw === null || q.raw === undefined ? "(none)" : q.raw }),
    q.error ? el("div", { class: "banner error", text: `error: ${q.error}` }) : null,
    q.other ? el("div", { class: "other" }, el("span", { class: "muted", text: `${runName(q.other.run)}: ` }),
      el("span", { class: `badge ${q.other.status}`, text: q.other.status }), ` ${fmt(q.other.shown)} · raw `,
      el("code", { text: q.other.raw === null ? "(none)" : q.other.raw })) : null);
  return el("div", { class: "card question-row", "data-qid": q.qid, "data-status": q.status, "data-level": q.level,
                     "data-truth": q.truth, "data-item": q.item }, el("div", {}, thumb(q, false)), right);
}

async function renderQuestions(main, params) {
  const run = Number(params.get("run") || 0);
  const r = state.runs[run];
  main.appendChild(el("h2", { text: "Questions" }));
  const form = el("form", { class: "filters", id: "filters" });
  const level = el("select", { name: "level" }, el("option", { value: "", text: "any" }),
    Object.entries(r ? r.levels : {}).map(([lv, name]) => el("option", { value: lv, text: `${lv} · ${name}`, selected: params.get("level") === lv })));
  const status = el("select", { name: "status" }, el("option", { value: "", text: "any" }),
    state.statuses.map(s => el("option", { value: s, text: s, selected: params.get("status") === s })));
  const lraw = el("input", { type: "checkbox", name: "lraw", checked: params.get("lraw") === "1" });
  const truth = el("input", { type: "text", name: "truth", value: params.get("truth") || "", placeholder: "exact truth" });
  const other = runSelect("other", params.get("other") || "", true);
  const per = el("select", { name: "per" }, [10, 25, 50, 100].map(n => el("option", { value: n, text: n, selected: String(n) === (params.get("per") || "25") })));
  form.append(el("label", {}, "run", runSelect("run", run, false)), el("label", {}, "level", level),
              el("label", {}, "status", status), el("label", {}, "leaf right, ancestor wrong", lraw),
              el("label", {}, "truth", truth), el("label", {}, "disagrees with run", other), el("label", {}, "per page", per),
              el("button", { type: "submit", id: "apply", text: "Apply" }));
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const fd = new FormData(form);
    go("questions", { run: fd.get("run"), level: fd.get("level"), status: fd.get("status"), lraw: lraw.checked ? "1" : "",
                      truth: fd.get("truth"), other: fd.get("other"), per: fd.get("per"), page: 0 });
  });
  main.appendChild(form);
  const q = new URLSearchParams(params);
  q.set("run", run);
  const page = Number(params.get("page") || 0);
  const res = await api(`/api/questions?${q.toString()}`);
  const pages = Math.max(1, Math.ceil(res.total / res.per));
  const nav = () => el("div", { class: "pager" },
    el("button", { type: "button", class: "prev", disabled: page <= 0, onclick: () => { q.set("page", page - 1); go("questions", Object.fromEntries(q)); }, text: "‹ previous" }),
    el("span", { class: "pageinfo", "data-total": res.total, "data-page": page, text: `${fmt(res.total)} questions · page ${page + 1} of ${fmt(pages)}` }),
    el("button", { type: "button", class: "next", disabled: page + 1 >= pages, onclick: () => { q.set("page", page + 1); go("questions", Object.fromEntries(q)); }, text: "next ›" }));
  main.appendChild(nav());
  const list = el("div", { id: "question-list" });
  for (const row of res.rows) list.appendChild(questionCard(row));
  main.appendChild(list);
  if (res.rows.length > 3) main.appendChild(nav());
}

// ------------------------------------------------------------------ item card

async function renderItem(main, params) {
  main.appendChild(el("h2", { text: "Item" }));
  const item = params.get("item");
  const form = el("form", { class: "filters" }, el("label", {}, "item id", el("input", { name: "item", value: item || "", size: 60 })),
                  el("button", { type: "submit", text: "Show" }));
  form.addEventListener("submit", ev => { ev.preventDefault(); go("item", { item: new FormData(form).get("item") }); });
  main.appendChild(form);
  if (!item) { main.appendChild(el("p", { class: "muted", text: "Pick an item from the Questions page." })); return; }
  const res = await api(`/api/item?item=${encodeURIComponent(item)}${params.get("runs") ? "&runs=" + encodeURIComponent(params.get("runs")) : ""}`);
  const withImg = res.runs.find(r => r.image);
  main.appendChild(el("div", { id: "item-card" },
    el("h3", { text: item }), withImg ? thumb({ image: withImg.image, item }, true) : el("div", { class: "noimg", text: "no image" })));
  const grid = el("div", { class: "runs-grid" });
  for (const r of res.runs) {
    const t = el("table", { class: "item-run", "data-run": r.run },
      el("tr", {}, ["level", "truth", "prediction", "", "raw answer"].map(x => el("th", { text: x }))));
    for (const ln of r.lines) {
      t.appendChild(el("tr", { "data-level": ln.level },
        el("td", { text: `${ln.level ?? ""} · ${ln.level_name || ""}${ln.option ? " · statement " + ln.option : ""}` }),
        el("td", { text: ln.truth }), el("td", { text: fmt(ln.shown) }),
        el("td", {}, el("span", { class: `badge ${ln.status}`, text: ln.status })),
        el("td", {}, el("code", { text: ln.raw === null || ln.raw === undefined ? "(none)" : ln.raw }))));
    }
    grid.appendChild(el("div", {}, el("h3", { text: r.name }),
      r.lraw ? el("div", { class: "badge lraw", text: "leaf right, an ancestor wrong" }) : null,
      r.lines.length ? t : el("p", { class: "muted", text: "not in this run" })));
  }
  main.appendChild(grid);
  // every level's question as rendered, for the first run that has the item
  const first = res.runs.find(r => r.lines.length);
  if (first) {
    main.appendChild(el("h3", { text: `Questions as ${first.name} asked them` }));
    for (const ln of first.lines) main.appendChild(questionCard(ln));
  }
}

// ------------------------------------------------------------------ main

async function render() {
  const { page, params } = route();
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.page === page);
  const main = document.getElementById("main");
  main.replaceChildren();
  main.dataset.page = page;
  main.dataset.ready = "0";
  try {
    if (page === "map") await renderMap(main, params);
    else if (page === "questions") await renderQuestions(main, params);
    else if (page === "item") await renderItem(main, params);
    else renderOverview(main);
  } catch (e) {
    main.appendChild(el("div", { class: "banner error", text: String(e.message || e) }));
  }
  main.dataset.ready = "1";
}

async function start() {
  const res = await api("/api/runs");
  state.runs = res.runs;
  state.statuses = res.statuses;
  window.addEventListener("hashchange", render);
  await render();
}

start().catch(e => {
  document.getElementById("main").replaceChildren(el("div", { class: "banner error", text: String(e.message || e) }));
});
