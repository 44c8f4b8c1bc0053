/* circuitfinder circuit explorer (graphs/explorer.py writes the page around this script).
 *
 * Reads the JSON in #cf-data (always) and #cf-rest (the compact tail of the scored edges, parsed
 * only when the edge control asks for edges beyond the embedded top ones), and draws with
 * Cytoscape.js. Positions are preset: y from the layer, x from the head index; the optional dagre
 * layout only reorders nodes within a layer. window.explorer exposes the view to tests.
 */
(function () {
  "use strict";

  const D = JSON.parse(document.getElementById("cf-data").textContent);
  const errors = [];
  window.addEventListener("error", (e) => errors.push(String(e.message)));

  const COLORS = { support: "#2166ac", oppose: "#b2182b", shared: "#000000", A: "#0072b2", B: "#d55e00" };
  const FILL = { input: "#eeeeee", logits: "#eeeeee", attn: "#fff2cc", mlp: "#d9ead3" };
  const DX = 68, DY = 48;
  const DAGRE_MAX = 400; // more drawn links than this: dagre is too slow, the grid layout is kept
  const HEAVY = 1500;   // above this many drawn edges: straight "haystack" lines, no arrows
  const LABELLED = 300; // up to this many drawn edges: q/k/v labels
  const $ = (id) => document.getElementById(id);

  // ---- small helpers --------------------------------------------------------------------------

  function fmt(x) {
    if (x == null || Number.isNaN(x)) return "–";
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : String(+x.toPrecision(4));
  }
  const int = (n) => Number(n).toLocaleString("en-US");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  const NAME = /^(input|logits|m(\d+)|a(\d+)\.(?:h(\d+)|g(\d+)))(?:<([qkv])>)?$/;
  const parsed = new Map();
  /** Parse a node or receiver name: input, logits, m3, a2.h1, a2.h1<q>, a2.g0<k>. */
  function parse(name) {
    let p = parsed.get(name);
    if (p) return p;
    const m = NAME.exec(name);
    if (!m) throw new Error("not a node name: " + name);
    if (name === "input") p = { kind: "input", layer: -1 };
    else if (name === "logits") p = { kind: "logits", layer: null };
    else if (m[2] !== undefined) p = { kind: "mlp", layer: +m[2] };
    else p = { kind: "attn", layer: +m[3], head: m[4] !== undefined ? +m[4] : null,
               group: m[5] !== undefined ? +m[5] : null, slot: m[6] || null };
    parsed.set(name, p);
    return p;
  }

  // ---- the model's shape: node names, positions, and where an edge leads ----------------------

  /** One model's shape; `prefix` tells its node ids apart on a page with two shapes. */
  function Model(about, prefix, x0) {
    this.L = about.n_layers; this.H = about.n_heads; this.G = about.n_kv_groups;
    this.hpg = this.H / this.G; this.prefix = prefix; this.x0 = x0;
  }
  Model.prototype.id = function (name) { return name === "input" || name === "logits" ? name : this.prefix + name; };
  Model.prototype.headX = function (h) { return this.x0 + (h + Math.floor(h / this.hpg) * 0.5) * DX; };
  Model.prototype.mlpX = function () { return this.x0 + (this.H + (this.G - 1) * 0.5 + 0.3) * DX; };
  Model.prototype.right = function () { return this.mlpX() + DX; };
  Model.prototype.groupHeads = function (layer, g) {
    const out = [];
    for (let h = g * this.hpg; h < (g + 1) * this.hpg; h++) out.push(`a${layer}.h${h}`);
    return out;
  };

  /** The node(s) each edge leads to, as circuitfinder.engine.masks.receiver_targets: a k/v
   *  group's input leads to the group's heads that are otherwise in the edge set, or to its first
   *  head; `all` false keeps the first of them only (one drawn line per edge). */
  function targets(model, edges, all) {
    const own = new Set();
    for (const e of edges) {
      own.add(e.s);
      const p = parse(e.r);
      if (p.slot === "q") own.add(`a${p.layer}.h${p.head}`);
    }
    return edges.map((e) => {
      const p = parse(e.r);
      if (p.kind !== "attn") return [e.r];
      if (p.slot === "q") return [`a${p.layer}.h${p.head}`];
      const heads = model.groupHeads(p.layer, p.group);
      const mine = heads.filter((h) => own.has(h));
      const t = mine.length ? mine : [heads[0]];
      return all ? t : [t[0]];
    });
  }

  /** Edges merged into drawn links: one per edge (level "edge") or per pair of units ("node"). */
  function merge(model, edges, level) {
    const to = targets(model, edges, level === "node");
    const nodes = new Set(), links = new Map();
    edges.forEach((e, k) => {
      nodes.add(e.s);
      for (const t of to[k]) {
        nodes.add(t);
        const key = level === "edge" ? e.key : e.s + "|" + t;
        let link = links.get(key);
        if (!link) links.set(key, (link = { key, s: e.s, t, edges: [], abs: 0, net: 0, circ: 0 }));
        link.edges.push(e);
        link.abs += Math.abs(e.v);
        link.net += e.v;
        if (e.circ) link.circ += 1;
      }
    });
    return { nodes, links };
  }

  function slotsOf(link) {
    const s = new Set(link.edges.map((e) => parse(e.r).slot).filter(Boolean));
    return "qkv".split("").filter((x) => s.has(x)).join(",");
  }

  function describeNode(name, model) {
    const p = parse(name);
    if (p.kind === "input") return "the input (token and position embeddings)";
    if (p.kind === "logits") return "the logits (the unembedding's input)";
    if (p.kind === "mlp") return `the MLP of layer ${p.layer}`;
    const g = Math.floor(p.head / model.hpg);
    return `attention head ${p.head} of layer ${p.layer}` + (model.G < model.H ? ` (key/value group ${g})` : "");
  }

  function describeReceiver(r, model) {
    const p = parse(r);
    if (p.kind !== "attn") return "";
    if (p.slot === "q") return "query input";
    const heads = model.groupHeads(p.layer, p.group);
    const what = p.slot === "k" ? "key" : "value";
    return model.G < model.H ? `${what} input of group ${p.group} (heads ${heads[0]}…${heads[heads.length - 1]})` : `${what} input`;
  }

  // ---- Cytoscape ------------------------------------------------------------------------------

  const STYLE = [
    { selector: "node", style: {
      label: "data(label)", "text-valign": "center", "text-halign": "center", "font-size": 10, "text-wrap": "wrap",
      width: "data(nw)", height: 22, shape: "ellipse", "background-color": "data(fill)", "border-width": 1,
      "border-color": "data(border)", color: "#222" } },
    { selector: "node.roled", style: { height: 30, "font-size": 9 } },
    { selector: "node.mlp", style: { shape: "round-rectangle" } },
    { selector: "node.input", style: { shape: "pentagon", height: 30 } },
    { selector: "node.logits", style: { shape: "octagon", height: 30 } },
    { selector: "node.circ", style: { "border-width": 2.5 } },
    { selector: "node.tick", style: { "background-opacity": 0, "border-width": 0, color: "#888", "font-size": 11, events: "no" } },
    { selector: "node:selected", style: { "border-color": "#ff7f00", "border-width": 3.5 } },
    { selector: "edge", style: {
      "curve-style": "bezier", width: "data(w)", "line-color": "data(color)", "target-arrow-color": "data(color)",
      "target-arrow-shape": "triangle", "arrow-scale": 0.6, opacity: 0.3 } },
    { selector: "edge.circ", style: { opacity: 0.9, "z-index": 5 } },
    { selector: "edge.labelled", style: {
      label: "data(label)", "font-size": 8, color: "data(color)", "text-background-color": "#ffffff",
      "text-background-opacity": 0.8, "text-background-padding": 1 } },
    { selector: "edge.dashed", style: { "line-style": "dashed" } },
    { selector: "edge.dotted", style: { "line-style": "dotted" } },
    { selector: "edge.bow", style: {
      "curve-style": "unbundled-bezier", "control-point-distances": "data(bow)", "control-point-weights": 0.5 } },
    { selector: "edge.heavy", style: { "curve-style": "haystack", "haystack-radius": 0, "target-arrow-shape": "none" } },
    { selector: ".dim", style: { opacity: 0.07 } },
    { selector: "node.hl", style: { opacity: 1 } },
    { selector: "edge.hl", style: { opacity: 1, "z-index": 20 } },
  ];

  // textureOnViewport: pan and zoom move a picture of the drawing, so large views stay responsive
  const cy = cytoscape({ container: $("cf-graph"), elements: [], style: STYLE, layout: { name: "preset" },
                         minZoom: 0.03, maxZoom: 6, textureOnViewport: true });
  const state = { level: "edge", layout: "grid", selected: null, fitted: false };
  let linkById = new Map();
  let page = null; // run or compare page: { models, build(), panel(name), about }

  function tickNodes(models, yOf, labels) {
    const left = Math.min(...models.map((m) => m.x0)) - DX;
    return labels.map(([label, y], k) => ({ group: "nodes", data: { id: "_tick" + k, label, fill: "#fff", border: "#fff", nw: 30 },
                                            position: { x: left, y }, classes: "tick", selectable: false, grabbable: false }));
  }

  function nodeElement(model, name, y, xMid, classes, extra) {
    const p = parse(name);
    const x = p.kind === "attn" ? model.headX(p.head) : p.kind === "mlp" ? model.mlpX() : xMid;
    const role = (extra && extra.role) || null;
    const short = role && role.length > 14 ? role.slice(0, 13) + "…" : role;
    const nw = Math.max(p.kind === "input" || p.kind === "logits" ? 56 : 48, 5.6 * Math.max(name.length, (short || "").length) + 10);
    return { group: "nodes", position: { x, y: p.kind === "mlp" ? y - 0.4 * DY : y },
             data: Object.assign({ id: model.id(name), name, label: short ? `${name}\n${short}` : name, kind: p.kind,
                                   fill: FILL[p.kind], border: "#777", nw }, extra || {}),
             classes: [p.kind, role ? "roled" : "", classes || ""].join(" ") };
  }

  /** Replace the drawing with these elements; keep the viewport unless nothing was drawn before. */
  function show(elements, nEdges) {
    // classes are set before adding: restyling thousands of edges afterwards costs seconds
    const extra = nEdges > HEAVY ? " heavy" : nEdges <= LABELLED && state.level === "edge" ? " labelled" : "";
    for (const e of elements) if (e.group === "edges") e.classes = (e.classes || "") + extra;
    cy.batch(() => {
      cy.elements().remove();
      cy.add(elements);
    });
    layout();
    if (!extra.includes("heavy")) bow();
    if (!state.fitted) { cy.fit(undefined, 30); state.fitted = true; }
    if (state.selected) highlight(state.selected);
    const c = counts();
    document.body.dataset.nodes = c.nodes;
    document.body.dataset.edges = c.edges;
    const warn = nEdges > 5000 ? ` <span class="cf-warn">(${int(nEdges)} lines are slow to draw: node level is lighter)</span>` : "";
    const note = $("cf-status").dataset.note;
    $("cf-status").innerHTML = `Drawn: ${int(c.nodes)} nodes, ${int(c.edges)} ${state.level === "edge" ? "edges" : "links"}` + warn +
      (note && state.layout === "dagre" ? `<br><span class="cf-warn">${note}</span>` : "");
  }

  /** Edges along one column (same x, several layers apart) bow sideways, so they do not run
   *  through the nodes between their ends. */
  function bow() {
    cy.batch(() => cy.edges().forEach((e) => {
      const s = e.source().position(), t = e.target().position();
      const bend = Math.abs(s.x - t.x) < 1 && Math.abs(s.y - t.y) > 1.2 * DY;
      e.toggleClass("bow", bend);
      if (bend) e.data("bow", Math.min(70, 14 + 0.12 * Math.abs(s.y - t.y)));
    }));
  }

  /** Node rank for dagre: from y (two ranks per layer: heads, then the MLP), so dagre keeps the layers' order. */
  const rankOf = (n) => Math.round(-n.data("y0") / (0.5 * DY));

  function layout() {
    const nodes = cy.nodes().not(".tick");
    nodes.forEach((n) => { if (n.data("y0") === undefined) n.data("y0", n.position("y")); });
    if (state.layout !== "dagre" || !nodes.length) return;
    if (cy.edges().length > DAGRE_MAX) {
      $("cf-status").dataset.note = `dagre skipped: more than ${DAGRE_MAX} links drawn (grid layout kept)`;
      return;
    }
    delete $("cf-status").dataset.note;
    cy.elements().not(".tick").layout({
      name: "dagre", rankDir: "BT", fit: false, animate: false, nodeSep: 12, rankSep: 10,
      minLen: (e) => Math.max(1, rankOf(e.target()) - rankOf(e.source())),
      transform: (node, pos) => ({ x: pos.x, y: node.data("y0") }),
    }).run();
    const left = Math.min(...nodes.map((n) => n.position("x"))) - DX;
    cy.nodes(".tick").forEach((t) => { t.position("x", left); });
  }

  function counts() {
    const out = { nodes: cy.nodes().not(".tick").length, edges: cy.edges().length, level: state.level };
    if (page && page.extraCounts) Object.assign(out, page.extraCounts());
    return out;
  }

  // ---- hover, click, search -------------------------------------------------------------------

  const tip = $("cf-tip");
  cy.on("mouseover", "edge", (evt) => {
    const link = linkById.get(evt.target.id());
    if (!link) return;
    tip.innerHTML = "";
    tip.append(page.describeLink(link));
    const p = evt.renderedPosition;
    tip.style.left = Math.min(p.x + 14, $("cf-graph").clientWidth - 200) + "px";
    tip.style.top = p.y + 14 + "px";
    tip.hidden = false;
  });
  cy.on("mouseout", "edge", () => { tip.hidden = true; });
  cy.on("viewport", () => { tip.hidden = true; });
  cy.on("tap", "node", (evt) => { if (!evt.target.hasClass("tick")) select(evt.target.id()); });
  cy.on("tap", (evt) => { if (evt.target === cy) clearSelection(); });

  function highlight(id) {
    cy.elements().removeClass("hl dim");
    const node = cy.getElementById(id);
    if (!node.length) return;
    cy.elements().not(".tick").addClass("dim");
    node.closedNeighborhood().removeClass("dim").addClass("hl");
    cy.nodes().unselect();
    node.select();
  }

  function clearSelection() {
    state.selected = null;
    cy.elements().removeClass("hl dim");
    cy.nodes().unselect();
    $("cf-panel").hidden = true;
    updateSide();
  }

  /** Select a node by id: highlight its edges, centre it, open its panel (also if not drawn). */
  function select(id) {
    state.selected = id;
    highlight(id);
    const node = cy.getElementById(id);
    const panel = $("cf-panel");
    panel.innerHTML = "";
    const close = el("button", { class: "cf-close", type: "button", text: "×", "aria-label": "close" });
    close.addEventListener("click", clearSelection);
    panel.append(close, ...page.panel(id, node.length > 0).filter(Boolean));
    panel.hidden = false;
    updateSide();
    return node.length > 0;
  }

  function updateSide() {
    const side = $("cf-side");
    side.classList.toggle("cf-empty", $("cf-panel").hidden && !$("cf-table"));
  }

  $("cf-search").addEventListener("change", (e) => {
    const name = e.target.value.trim();
    if (!name) return;
    const id = page.idOf(name);
    if (id) { select(id); const n = cy.getElementById(id); if (n.length) cy.animate({ center: { eles: n }, duration: 200 }); }
    else $("cf-status").textContent = `no node called ${name}`;
  });

  function edgeRows(title, links, other) {
    const rows = links.sort((a, b) => b.abs - a.abs).slice(0, 12)
      .map((l) => el("tr", {}, el("td", { text: other(l) }), el("td", { class: "num", text: fmt(l.net) })));
    return [el("h3", { text: `${title}: ${links.length}` + (links.length > 12 ? " (12 largest |score| listed)" : "") }),
            rows.length ? el("table", {}, el("tr", {}, el("th", { text: "node" }), el("th", { text: "score" })), ...rows) : null];
  }

  function roleTable(entry) {
    if (!entry) return [el("p", { class: "cf-muted", text: "no role scores for this node" })];
    const rows = Object.entries(entry).filter(([k, v]) => k !== "role" && typeof v === "number")
      .map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { class: "num", text: fmt(v) })));
    return [el("p", {}, "role: ", el("b", { text: entry.role || "none" })),
            rows.length ? el("table", {}, ...rows) : null];
  }

  // ---- attention heatmap ----------------------------------------------------------------------

  function heatmap(tokens, pattern, caption) {
    const T = tokens.length, Q = pattern.length, q0 = T - Q;
    const cell = Math.max(4, Math.min(16, Math.floor(240 / T)));
    const lab = 58;
    const canvas = el("canvas", { width: lab + T * cell, height: Q * cell + lab, title: caption });
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    for (let q = 0; q < Q; q++) for (let k = 0; k < T; k++) {
      const w = Math.max(0, Math.min(1, pattern[q][k]));
      ctx.fillStyle = `rgb(${Math.round(255 - 247 * w)},${Math.round(255 - 207 * w)},${Math.round(255 - 148 * w)})`;
      ctx.fillRect(lab + k * cell, q * cell, cell, cell);
    }
    const show = (t) => (t.length > 8 ? t.slice(0, 7) + "…" : t).replace(/ /g, "␣").replace(/\n/g, "⏎");
    ctx.fillStyle = "#333";
    ctx.font = `${Math.min(10, cell + 2)}px sans-serif`;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    if (cell >= 6) for (let q = 0; q < Q; q++) ctx.fillText(show(tokens[q0 + q]), lab - 3, q * cell + cell / 2);
    if (cell >= 6) for (let k = 0; k < T; k++) {
      ctx.save();
      ctx.translate(lab + k * cell + cell / 2, Q * cell + 3);
      ctx.rotate(-Math.PI / 2);
      ctx.fillText(show(tokens[k]), 0, 0);
      ctx.restore();
    }
    canvas.addEventListener("mousemove", (e) => {
      const r = canvas.getBoundingClientRect();
      const k = Math.floor((e.clientX - r.left - lab) / cell), q = Math.floor((e.clientY - r.top) / cell);
      canvas.title = k >= 0 && k < T && q >= 0 && q < Q
        ? `query ${JSON.stringify(tokens[q0 + q])} → key ${JSON.stringify(tokens[k])}: ${pattern[q][k]}` : caption;
    });
    return [el("div", { class: "cf-muted", text: caption + " (rows: query, columns: key)" }), canvas];
  }

  function attentionBlock(name) {
    const a = (D.attention || {})[name];
    if (!a) return [];
    const out = [el("h3", { text: "Attention pattern" })];
    a.patterns.forEach((p, k) => out.push(...heatmap(a.tokens[k], p, a.labels[k] || `prompt ${k}`)));
    return out;
  }

  // ---- export ---------------------------------------------------------------------------------

  const xml = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

  /** The drawing as SVG text, built from the drawn positions and styles. */
  function exportSVG() {
    const bb = cy.elements().boundingBox({ includeLabels: true });
    const pad = 16, x0 = bb.x1 - pad, y0 = bb.y1 - pad, w = bb.w + 2 * pad, h = bb.h + 2 * pad;
    const colors = [...new Set(cy.edges().map((e) => e.data("color")))];
    const out = [`<svg xmlns="http://www.w3.org/2000/svg" width="${w.toFixed(0)}" height="${h.toFixed(0)}" ` +
                 `viewBox="${x0.toFixed(1)} ${y0.toFixed(1)} ${w.toFixed(1)} ${h.toFixed(1)}" font-family="Helvetica, Arial, sans-serif">`,
                 `<title>${xml(document.title)}</title>`, "<defs>"];
    colors.forEach((c, k) => out.push(`<marker id="cf-arrow-${k}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="4" ` +
      `markerHeight="4" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="${xml(c)}"/></marker>`));
    out.push("</defs>", `<rect x="${x0}" y="${y0}" width="${w}" height="${h}" fill="#ffffff"/>`);
    const pt = (p) => `${p.x.toFixed(1)},${p.y.toFixed(1)}`;
    cy.edges().forEach((e) => {
      const s = e.sourceEndpoint(), t = e.targetEndpoint();
      const cps = e.hasClass("heavy") ? null : e.controlPoints();
      let d = `M${pt(s)} L${pt(t)}`;
      if (cps && cps.length === 1) d = `M${pt(s)} Q${pt(cps[0])} ${pt(t)}`;
      else if (cps && cps.length > 1) d = `M${pt(s)} ` + cps.map((c) => `L${pt(c)}`).join(" ") + ` L${pt(t)}`;
      const dash = e.hasClass("dashed") ? ' stroke-dasharray="6,3"' : e.hasClass("dotted") ? ' stroke-dasharray="2,2"' : "";
      const arrow = e.hasClass("heavy") ? "" : ` marker-end="url(#cf-arrow-${colors.indexOf(e.data("color"))})"`;
      const link = linkById.get(e.id());
      out.push(`<path d="${d}" fill="none" stroke="${xml(e.data("color"))}" stroke-width="${e.numericStyle("width").toFixed(2)}" ` +
               `stroke-opacity="${e.effectiveOpacity().toFixed(2)}"${dash}${arrow}><title>${xml(link ? link.key : e.id())} ` +
               `${link ? fmt(link.net) : ""}</title></path>`);
      if (e.hasClass("labelled") && e.data("label")) {
        const m = e.midpoint();
        out.push(`<text x="${m.x.toFixed(1)}" y="${m.y.toFixed(1)}" font-size="8" fill="${xml(e.data("color"))}" text-anchor="middle">${xml(e.data("label"))}</text>`);
      }
    });
    cy.nodes().forEach((n) => {
      const p = n.position(), nw = n.width(), nh = n.height(), op = n.effectiveOpacity().toFixed(2);
      const lines = String(n.data("label") || "").split("\n");
      if (!n.hasClass("tick")) {
        const fill = xml(n.style("background-color")), stroke = xml(n.style("border-color"));
        const attrs = `fill="${fill}" stroke="${stroke}" stroke-width="${n.numericStyle("border-width")}" opacity="${op}"`;
        if (n.hasClass("mlp")) out.push(`<rect x="${(p.x - nw / 2).toFixed(1)}" y="${(p.y - nh / 2).toFixed(1)}" width="${nw}" height="${nh}" rx="4" ${attrs}/>`);
        else if (n.hasClass("input") || n.hasClass("logits")) {
          const sides = n.hasClass("input") ? 5 : 8, pts = [];
          for (let k = 0; k < sides; k++) {
            const a = -Math.PI / 2 + (2 * Math.PI * k) / sides + (sides === 8 ? Math.PI / 8 : 0);
            pts.push(`${(p.x + (nw / 2) * Math.cos(a)).toFixed(1)},${(p.y + (nh / 2) * Math.sin(a)).toFixed(1)}`);
          }
          out.push(`<polygon points="${pts.join(" ")}" ${attrs}/>`);
        } else out.push(`<ellipse cx="${p.x.toFixed(1)}" cy="${p.y.toFixed(1)}" rx="${nw / 2}" ry="${nh / 2}" ${attrs}/>`);
      }
      const size = n.numericStyle("font-size");
      lines.forEach((line, k) => {
        const y = p.y + (k - (lines.length - 1) / 2) * size * 1.15 + size * 0.35;
        out.push(`<text x="${p.x.toFixed(1)}" y="${y.toFixed(1)}" font-size="${size}" text-anchor="middle" ` +
                 `fill="${n.hasClass("tick") ? "#888" : "#222"}" opacity="${op}">${xml(line)}</text>`);
      });
    });
    out.push("</svg>");
    return out.join("\n");
  }

  const exportPNG = () => cy.png({ output: "base64uri", full: true, scale: 2, bg: "#ffffff", maxWidth: 8000, maxHeight: 8000 });

  function download(url, name) {
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
  }
  const stem = () => (D.about && D.about.name) || "circuit";
  $("cf-svg").addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([exportSVG()], { type: "image/svg+xml" }));
    download(url, stem() + ".svg");
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
  $("cf-png").addEventListener("click", () => download(exportPNG(), stem() + ".png"));
  $("cf-fit").addEventListener("click", () => cy.fit(undefined, 30));

  // ---- the run page ---------------------------------------------------------------------------

  function runPage() {
    const about = D.about, model = new Model(about, "", 0);
    const K = D.top.v.length, TOTAL = K + D.n_rest;
    let REST = null;
    const rest = () => (REST = REST || JSON.parse($("cf-rest").textContent));
    const cache = new Map();

    function make(i, s, r, v, approx) {
      const e = { i, s: D.senders[s], r: D.receivers[r], v, approx, circ: false };
      e.key = e.s + "->" + e.r;
      return e;
    }
    /** The edge of rank i + 1 (0: largest |score|); edges past the embedded top come from #cf-rest. */
    function edgeAt(i) {
      let e = cache.get(i);
      if (e) return e;
      if (i < K) e = make(i, D.top.s[i], D.top.r[i], D.top.v[i], false);
      else { const R = rest(); e = make(i, R.s[i - K], R.r[i - K], R.v[i - K], true); }
      cache.set(i, e);
      return e;
    }
    const absAt = (i) => Math.abs(i < K ? D.top.v[i] : rest().v[i - K]);

    const circuitEdges = D.circuit.i.map((i, k) => {
      const e = make(i, D.circuit.s[k], D.circuit.r[k], D.circuit.v[k], false);
      e.circ = true;
      if (D.circuit.necessity[k] != null) e.necessity = D.circuit.necessity[k];
      cache.set(i, e);
      return e;
    });
    const circuitNodes = merge(model, circuitEdges, "edge").nodes;
    const necessity = new Map(D.necessity.i.map((i, k) => [i, { drop: D.necessity.metric_drop[k], rise: D.necessity.distance_rise[k] }]));
    const exact = new Map(D.validation.i.map((i, k) => [i, D.validation.exact_effect[k]]));

    const view = { mode: "circuit", n: Math.max(1, circuitEdges.length), t: 0 };
    const maxAbs = TOTAL ? absAt(0) : 1, minAbs = about.min_abs || maxAbs / 1e6;

    /** How many edges have |score| ≥ t (|score| falls with rank: a binary search). */
    function countAbove(t) {
      let lo = 0, hi = TOTAL;
      if (K && absAt(K - 1) >= t) lo = K; else hi = K;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (absAt(mid) >= t) lo = mid + 1; else hi = mid; }
      return lo;
    }
    function viewEdges() {
      if (view.mode === "circuit") return circuitEdges;
      const n = view.mode === "top" ? view.n : countAbove(view.t);
      const out = new Array(n);
      for (let i = 0; i < n; i++) out[i] = edgeAt(i);
      return out;
    }

    // slider positions 0…1000 on a log scale
    const logTotal = Math.log(Math.max(TOTAL, 2));
    const nOf = (p) => Math.max(1, Math.min(TOTAL, Math.round(Math.exp((p / 1000) * logTotal))));
    const pOfN = (n) => Math.round((Math.log(Math.max(n, 1)) / logTotal) * 1000);
    const tOf = (p) => +(maxAbs * Math.pow(minAbs / maxAbs, p / 1000)).toPrecision(4);
    const pOfT = (t) => Math.round((Math.log(t / maxAbs) / Math.log(minAbs / maxAbs)) * 1000) || 0;

    const slider = $("cf-slider"), number = $("cf-number"), mode = $("cf-mode");
    function syncControls() {
      mode.value = view.mode;
      if (view.mode === "threshold") {
        slider.value = pOfT(view.t); number.value = view.t; number.step = "any"; number.min = 0;
      } else {
        const n = view.mode === "top" ? view.n : circuitEdges.length;
        slider.value = pOfN(n); number.value = n; number.step = 1; number.min = 1; number.max = TOTAL;
      }
    }
    let pending = null;
    const redraw = () => { if (pending) clearTimeout(pending); pending = setTimeout(() => { pending = null; build(); }, 40); };
    slider.addEventListener("input", () => {
      if (view.mode === "circuit") view.mode = "top";
      if (view.mode === "top") view.n = nOf(+slider.value); else view.t = tOf(+slider.value);
      number.value = view.mode === "top" ? view.n : view.t;
      mode.value = view.mode;
      redraw();
    });
    number.addEventListener("change", () => {
      const x = parseFloat(number.value);
      if (!Number.isFinite(x)) return;
      if (view.mode === "circuit") view.mode = "top";
      if (view.mode === "top") view.n = Math.max(1, Math.min(TOTAL, Math.round(x))); else view.t = Math.max(0, x);
      syncControls();
      redraw();
    });
    mode.addEventListener("change", () => {
      const before = view.mode === "circuit" ? circuitEdges.length : view.mode === "top" ? view.n : countAbove(view.t);
      view.mode = mode.value;
      if (view.mode === "top") view.n = Math.max(1, before);
      if (view.mode === "threshold") view.t = +absAt(Math.max(0, Math.min(TOTAL, before) - 1)).toPrecision(4);
      syncControls();
      build();
    });

    /** Held-out faithfulness at n edges from curve.csv: a point, or interpolated (linear in log n). */
    function faithAt(n) {
      const c = D.curve;
      if (!c.length) return null;
      const exactPoint = c.find((p) => p.top_n === n);
      if (exactPoint) return { value: exactPoint.faithfulness, how: `curve.csv point at top ${int(n)}` + (exactPoint.edges_kept != null ? ` (${int(exactPoint.edges_kept)} edges after pruning)` : "") };
      if (n < c[0].top_n) return { value: c[0].faithfulness, how: `nearest curve.csv point, top ${int(c[0].top_n)} (none smaller)` };
      const last = c[c.length - 1];
      if (n > last.top_n) return { value: last.faithfulness, how: `nearest curve.csv point, top ${int(last.top_n)} (none larger)` };
      let k = 0;
      while (c[k + 1].top_n < n) k++;
      const lo = c[k], hi = c[k + 1], f = (Math.log(n) - Math.log(lo.top_n)) / (Math.log(hi.top_n) - Math.log(lo.top_n));
      return { value: lo.faithfulness + f * (hi.faithfulness - lo.faithfulness),
               how: `interpolated (linear in log N) between curve.csv points top ${int(lo.top_n)} (${fmt(lo.faithfulness)}) and top ${int(hi.top_n)} (${fmt(hi.faithfulness)})` };
    }

    function drawCurve(n) {
      const svg = $("cf-curve"), c = D.curve;
      if (!c.length) { svg.style.display = "none"; return; }
      const W = 250, H = 90, l = 28, b = 16, lx = (x) => Math.log(Math.max(x, 1));
      const x0 = lx(Math.min(c[0].top_n, n)), x1 = lx(Math.max(TOTAL, c[c.length - 1].top_n, n));
      const ymax = Math.max(1.05, ...c.map((p) => p.faithfulness)), ymin = Math.min(0, ...c.map((p) => p.faithfulness));
      const X = (v) => l + ((lx(v) - x0) / ((x1 - x0) || 1)) * (W - l - 6), Y = (f) => 4 + (1 - (f - ymin) / (ymax - ymin)) * (H - b - 4);
      const path = c.map((p, k) => `${k ? "L" : "M"}${X(p.top_n).toFixed(1)},${Y(p.faithfulness).toFixed(1)}`).join(" ");
      svg.innerHTML = `<line x1="${l}" y1="${Y(1)}" x2="${W - 6}" y2="${Y(1)}" stroke="#ccc" stroke-dasharray="3,2"/>` +
        `<text x="${l - 3}" y="${Y(1) + 3}" font-size="9" text-anchor="end">1</text>` +
        `<text x="${l - 3}" y="${Y(ymin) + 3}" font-size="9" text-anchor="end">${fmt(ymin)}</text>` +
        `<path d="${path}" fill="none" stroke="#555"/>` +
        c.map((p) => `<circle cx="${X(p.top_n).toFixed(1)}" cy="${Y(p.faithfulness).toFixed(1)}" r="2" fill="#555"/>`).join("") +
        `<line x1="${X(n).toFixed(1)}" y1="2" x2="${X(n).toFixed(1)}" y2="${H - b}" stroke="#ff7f00"/>` +
        `<text x="${l}" y="${H - 3}" font-size="9">edges (log scale), faithfulness held-out</text>`;
    }

    function faithText(n) {
      const parts = [];
      if (view.mode === "circuit" && about.faithfulness != null)
        parts.push(`The circuit's ${int(n)} edges: held-out faithfulness <b>${fmt(about.faithfulness)}</b> (${about.faithfulness_source}).`);
      if (view.mode === "threshold") parts.push(`|score| ≥ ${fmt(view.t)} keeps ${int(n)} edges.`);
      const f = faithAt(n);
      if (f) parts.push(`Top ${int(n)} by |score|: held-out faithfulness <b>${fmt(f.value)}</b>, ${f.how}.`);
      else if (view.mode !== "circuit") parts.push("No curve.csv in this run: the faithfulness at this size was not measured.");
      return parts.join("<br>");
    }

    function build() {
      const edges = viewEdges();
      const { nodes, links } = merge(model, edges, state.level);
      const elements = [], yOf = (layer) => -(layer + 1) * DY, xMid = (model.right() - DX) / 2;
      for (const name of nodes) {
        const p = parse(name);
        const role = p.kind === "attn" && D.roles[name] ? D.roles[name].role : null;
        elements.push(nodeElement(model, name, yOf(p.kind === "logits" ? model.L : p.layer), xMid,
                                  circuitNodes.has(name) ? "circ" : "", { role, border: circuitNodes.has(name) ? "#333" : "#888" }));
      }
      elements.push(...tickNodes([model], yOf, Array.from({ length: model.L }, (_, l) => [`L${l}`, yOf(l)])));
      const top = Math.max(1e-30, ...[...links.values()].map((l) => (state.level === "edge" ? Math.abs(l.net) : l.abs)));
      linkById = new Map();
      let k = 0;
      for (const link of links.values()) {
        const id = state.level === "edge" ? "e" + link.edges[0].i : "l" + k++;
        const weight = state.level === "edge" ? Math.abs(link.net) : link.abs;
        linkById.set(id, link);
        elements.push({ group: "edges", data: {
          id, source: link.s, target: link.t, w: 1 + 5 * weight / top, label: state.level === "edge" ? slotsOf(link) : "",
          color: link.net < 0 ? COLORS.support : COLORS.oppose }, classes: link.circ ? "circ" : "" });
      }
      const n = edges.length;
      show(elements, links.size);
      $("cf-faith").innerHTML = faithText(n);
      drawCurve(n);
    }

    function describeLink(link) {
      const box = el("div");
      if (state.level === "node") {
        box.append(el("b", { text: `${link.s} → ${link.t}` }), el("br"),
                   `${link.edges.length} edge(s)` + (slotsOf(link) ? ` (into ${slotsOf(link)})` : "") +
                   `, sum |score| ${fmt(link.abs)}, net score ${fmt(link.net)}`, el("br"),
                   `${link.circ} of them in the circuit`);
        return box;
      }
      const e = link.edges[0];
      const lines = [
        `score ${fmt(e.v)}${e.approx ? " (4 significant digits)" : ""}: ${e.v < 0 ? "negative, supports the behaviour" : "positive, opposes it"}`,
        `rank ${int(e.i + 1)} of ${int(TOTAL)} by |score|`,
        e.circ ? "in the circuit" : "not in the circuit",
      ];
      const what = describeReceiver(e.r, model);
      if (what && parse(e.r).slot !== "q") lines.push(`${what}; drawn to ${link.t}`);
      else if (what) lines.push(what);
      const nec = necessity.get(e.i);
      if (nec) lines.push(`necessity: metric drop ${fmt(nec.drop)}` + (nec.rise != null ? `, distance rise ${fmt(nec.rise)}` : "") + " (necessity.csv)");
      else if (e.necessity != null) lines.push(`necessity ${fmt(e.necessity)} (circuit.json)`);
      if (exact.has(e.i)) lines.push(`exact effect ${fmt(exact.get(e.i))} (validation.csv)`);
      box.append(el("b", { text: e.key }));
      for (const line of lines) box.append(el("br"), line);
      return box;
    }

    function panel(id, drawn) {
      const name = id, p = parse(name);
      const inLinks = [...linkById.values()].filter((l) => l.t === name), outLinks = [...linkById.values()].filter((l) => l.s === name);
      return [
        el("h2", { text: name }),
        el("p", { text: describeNode(name, model) }),
        el("p", { class: circuitNodes.has(name) ? "" : "cf-muted", text: circuitNodes.has(name) ? "in the circuit" : "not in the circuit" }),
        drawn ? null : el("p", { class: "cf-muted", text: "not drawn in the current view" }),
        ...(p.kind === "attn" ? roleTable(D.roles[name]) : []),
        ...edgeRows("In (highlighted)", inLinks, (l) => l.s + (slotsOf(l) ? ` <${slotsOf(l)}>` : "")),
        ...edgeRows("Out (highlighted)", outLinks, (l) => l.t + (slotsOf(l) ? ` <${slotsOf(l)}>` : "")),
        ...attentionBlock(name),
      ];
    }

    function idOf(name) {
      try { parse(name); } catch (err) { return null; }
      return name;
    }

    // header, search names, legend
    const s = about.summary || {};
    $("cf-about").textContent = [
      `${about.n_layers} layers × ${about.n_heads} heads` + (about.n_kv_groups < about.n_heads ? ` (${about.n_kv_groups} key/value groups)` : ""),
      `${int(circuitEdges.length)} circuit edges, ${int(circuitNodes.size)} nodes`,
      `${int(TOTAL)} scored edges (${about.scores_source})`,
      about.faithfulness != null ? `held-out faithfulness ${fmt(about.faithfulness)}` : null,
      s.metric ? `metric ${s.metric}` : null, s.ablation ? `ablation ${s.ablation}` : null,
    ].filter(Boolean).join(" · ");
    const names = ["input"];
    for (let l = 0; l < model.L; l++) { for (let h = 0; h < model.H; h++) names.push(`a${l}.h${h}`); names.push(`m${l}`); }
    names.push("logits");
    $("cf-names").append(...names.map((n) => el("option", { value: n })));
    $("cf-legend").innerHTML =
      `<div><span class="cf-swatch" style="border-color:${COLORS.support}"></span>score &lt; 0: supports the behaviour</div>` +
      `<div><span class="cf-swatch" style="border-color:${COLORS.oppose}"></span>score &gt; 0: opposes it</div>` +
      "<div>opaque: the circuit's own edges; faint: other scored edges; width ∝ |score| (node level: summed |score|)</div>" +
      "<div>bold outline: a node of the circuit; edge labels q/k/v: the receiving head's input " +
      "(a key/value group's input is drawn to the group's first head in view)</div>" +
      "<div>ellipse: attention head · box: MLP · pentagon: input · octagon: logits</div>";
    if (about.scores_source !== "scores.parquet")
      $("cf-faith").insertAdjacentHTML("afterend", '<div class="cf-muted">No scores.parquet: only the circuit\'s own edges are known.</div>');

    syncControls();
    return {
      models: [model], build, describeLink, panel, idOf,
      extraCounts: () => ({ mode: view.mode, shown: view.mode === "circuit" ? circuitEdges.length : view.mode === "top" ? view.n : countAbove(view.t),
                            restParsed: REST !== null, total: TOTAL }),
      api: {
        setMode(m) { mode.value = m; mode.dispatchEvent(new Event("change")); },
        setTop(n) { view.mode = "top"; view.n = Math.max(1, Math.min(TOTAL, n)); syncControls(); build(); },
        setThreshold(t) { view.mode = "threshold"; view.t = t; syncControls(); build(); },
      },
    };
  }

  // ---- the comparison page --------------------------------------------------------------------

  function comparePage() {
    const A = D.a, B = D.b, same = D.same_shape;
    const ma = new Model(A.about, same ? "" : "A:", 0);
    const mb = same ? new Model(B.about, "", 0) : new Model(B.about, "B:", ma.right() + DX);
    const Lmax = Math.max(ma.L, mb.L);
    const yOf = (m, layer) => (layer < 0 ? 0 : -((layer / m.L) * Lmax + 1) * DY);
    const sides = [[A, ma, "A"], [B, mb, "B"]].map(([part, m, side]) => {
      const edges = part.edges.map(([s, r, v], k) => ({ s, r, v, key: `${s}->${r}`, rank: k + 1, circ: true, side }));
      return { part, m, side, edges, nodes: merge(m, edges, "edge").nodes, top: Math.max(1e-30, ...edges.map((e) => Math.abs(e.v))) };
    });
    const show_ = { shared: $("cf-show-shared"), A: $("cf-show-a"), B: $("cf-show-b") };
    let tally = { shared: 0, A: 0, B: 0 };
    const nodeInfo = new Map();

    function build() {
      const union = new Map(); // link id → { a, b }
      nodeInfo.clear();
      for (const { m, side, edges, nodes, top } of sides) {
        const { links } = merge(m, edges, state.level);
        const tops = Math.max(1e-30, ...[...links.values()].map((l) => l.abs));
        for (const link of links.values()) {
          const key = same ? link.key : side + ":" + link.key;
          const u = union.get(key) || { key, s: m.id(link.s), t: m.id(link.t), name: link.key };
          u[side] = link;
          u.w = Math.max(u.w || 0, (state.level === "edge" ? link.abs / top : link.abs / tops));
          union.set(key, u);
        }
        for (const n of nodes) {
          const id = m.id(n), info = nodeInfo.get(id) || { id, name: n, m, sides: new Set() };
          info.sides.add(side);
          nodeInfo.set(id, info);
        }
      }
      tally = { shared: 0, A: 0, B: 0 };
      const elements = [], drawnNodes = new Set();
      linkById = new Map();
      let k = 0;
      for (const u of union.values()) {
        u.status = u.A && u.B ? "shared" : u.A ? "A" : "B";
        u.net = (u.A || u.B).net;
        u.abs = (u.A || u.B).abs;
        tally[u.status] += 1;
        if (!show_[u.status].checked) continue;
        const id = "c" + k++;
        linkById.set(id, u);
        drawnNodes.add(u.s).add(u.t);
        const slots = slotsOf(u.A || u.B);
        elements.push({ group: "edges", data: { id, source: u.s, target: u.t, w: 0.8 + 3.7 * u.w, color: COLORS[u.status],
                                                label: state.level === "edge" ? slots : "" },
                        classes: "circ " + (u.status === "A" ? "dashed" : u.status === "B" ? "dotted" : "") });
      }
      const xMid = (Math.max(ma.right(), mb.right()) - DX) / 2;
      for (const id of drawnNodes) {
        const info = nodeInfo.get(id) || { name: id, m: ma, sides: new Set() };
        const p = parse(info.name), status = info.sides.size === 2 ? "shared" : [...info.sides][0] || "A";
        const roles = [A, B].map((part) => (part.roles[info.name] || {}).role).filter(Boolean);
        const role = same ? [...new Set(roles)].join(" / ") : ((info.m === ma ? A : B).roles[info.name] || {}).role;
        const layer = p.kind === "logits" ? info.m.L : p.layer;
        elements.push(nodeElement(info.m, info.name, p.kind === "logits" ? -(Lmax + 1) * DY : yOf(info.m, layer), xMid, "circ",
                                  { id, role: role || null, border: COLORS[status], status }));
      }
      const ticks = same ? Array.from({ length: ma.L }, (_, l) => [`L${l}`, yOf(ma, l)])
                         : Array.from({ length: 10 }, (_, d) => [`${d * 10}%`, -((d / 10) * Lmax + 1) * DY]);
      elements.push(...tickNodes([ma, mb], null, ticks));
      show(elements, linkById.size);
    }

    function describeLink(u) {
      const box = el("div", {}, el("b", { text: u.name.replace("|", " → ") }), el("br"),
                     { shared: "in both circuits", A: "only in A", B: "only in B" }[u.status]);
      for (const side of ["A", "B"]) {
        const l = u[side];
        if (!l) continue;
        box.append(el("br"), `${side}: score ${fmt(l.net)}` + (state.level === "node" ? ` over ${l.edges.length} edge(s), sum |score| ${fmt(l.abs)}` :
                                                             `, rank ${l.edges[0].rank} of ${sides[side === "A" ? 0 : 1].edges.length} in the circuit`));
      }
      return box;
    }

    function panel(id) {
      const info = nodeInfo.get(id);
      if (!info) return [el("h2", { text: id }), el("p", { class: "cf-muted", text: "in neither circuit" })];
      const out = [el("h2", { text: id }), el("p", { text: describeNode(info.name, info.m) }),
                   el("p", { text: info.sides.size === 2 ? "in both circuits" : `only in ${[...info.sides][0]}` })];
      for (const [part, side] of [[A, "A"], [B, "B"]]) {
        if (!same && info.m !== (side === "A" ? ma : mb)) continue;
        const entry = part.roles[info.name];
        if (entry) out.push(el("h3", { text: `role in ${side}` }), ...roleTable(entry));
      }
      const links = [...linkById.values()];
      out.push(...edgeRows("In (highlighted)", links.filter((l) => l.t === id), (l) => `${l.s} [${l.status}]`),
               ...edgeRows("Out (highlighted)", links.filter((l) => l.s === id), (l) => `${l.t} [${l.status}]`));
      return out;
    }

    function idOf(name) {
      if (cy.getElementById(name).length || nodeInfo.has(name)) return name;
      for (const p of ["A:", "B:"]) if (nodeInfo.has(p + name)) return p + name;
      return null;
    }

    Object.values(show_).forEach((box) => box.addEventListener("change", build));
    $("cf-layout").value = "grid";
    $("cf-about").textContent = same ? "one model shape: nodes and edges match by name"
      : `different model shapes (${ma.L} and ${mb.L} layers): aligned by relative depth, layer / n_layers; A's nodes left of B's; no edge is shared`;
    $("cf-legend").innerHTML = `<div>A: ${xml(D.names[0])}</div><div>B: ${xml(D.names[1])}</div>` +
      `<div><span class="cf-swatch" style="border-color:${COLORS.shared}"></span>in both</div>` +
      `<div><span class="cf-swatch" style="border-color:${COLORS.A};border-top-style:dashed"></span>only in A</div>` +
      `<div><span class="cf-swatch" style="border-color:${COLORS.B};border-top-style:dotted"></span>only in B</div>` +
      "<div>width ∝ |score| relative to the circuit's largest; node outline: the circuit(s) holding the node</div>" +
      "<div>y = relative depth (layer / n_layers)</div>";
    const names = new Set();
    for (const sd of sides) for (const n of sd.nodes) names.add(sd.m.id(n));
    $("cf-names").append(...[...names].sort().map((n) => el("option", { value: n })));
    return {
      models: [ma, mb], build, describeLink, panel, idOf,
      extraCounts: () => ({ shared: tally.shared, a_only: tally.A, b_only: tally.B }),
      api: {},
    };
  }

  // ---- start ----------------------------------------------------------------------------------

  document.body.classList.add(D.kind === "compare" ? "cf-compare" : "cf-run");
  page = D.kind === "compare" ? comparePage() : runPage();
  document.querySelectorAll('input[name="cf-level"]').forEach((r) => r.addEventListener("change", () => {
    state.level = document.querySelector('input[name="cf-level"]:checked').value;
    page.build();
  }));
  $("cf-layout").addEventListener("change", (e) => { state.layout = e.target.value; page.build(); cy.fit(undefined, 30); });
  page.build();
  updateSide();

  window.explorer = Object.assign({
    cy, counts, select, clearSelection, exportSVG, exportPNG, errors,
    setLevel(level) { state.level = level; document.querySelector(`input[name="cf-level"][value="${level}"]`).checked = true; page.build(); },
    setLayout(name) { state.layout = name; $("cf-layout").value = name; page.build(); },
    nodePosition(id) { const n = cy.getElementById(id); return n.length ? n.renderedPosition() : null; },
  }, page.api);
  document.body.dataset.ready = "1";
})();
