"""The web pages of `cifarlab serve`: the classifier page at `/` and the API docs page at `/docs`.

Both are single self-contained HTML documents (inline CSS and JS, images as data: URLs) that make no request
outside the service itself; the service sends them with a Content-Security-Policy that enforces it.
"""

from __future__ import annotations

__all__ = ["docs_page", "index_page"]

_STYLE = """
:root { color-scheme: light dark; --fg: #1b1f24; --muted: #57606a; --bg: #ffffff; --panel: #f6f8fa;
  --line: #d0d7de; --accent: #0969da; --bar: #2da44e; --err: #cf222e; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --muted: #9198a1; --bg: #0d1117; --panel: #161b22;
  --line: #30363d; --accent: #4493f8; --bar: #3fb950; --err: #f85149; } }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
  background: var(--bg); }
header, main { max-width: 1040px; margin: 0 auto; padding: 0 16px; }
header { display: flex; flex-wrap: wrap; gap: 12px; align-items: baseline; justify-content: space-between; }
h1 { font-size: 1.4rem; margin: 16px 0 4px; }
h2 { font-size: 1.1rem; margin: 0 0 8px; }
a { color: var(--accent); }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.muted { color: var(--muted); }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
.grid { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; margin: 16px 0; }
@media (max-width: 760px) { .grid { grid-template-columns: 1fr; } }
.controls { display: flex; flex-wrap: wrap; gap: 12px 20px; align-items: center; margin: 12px 0; }
label { font-weight: 600; margin-right: 6px; }
select, input[type=password], button { font: inherit; padding: 6px 8px; border: 1px solid var(--line);
  border-radius: 6px; background: var(--bg); color: var(--fg); }
#drop { border: 2px dashed var(--line); border-radius: 8px; padding: 22px; text-align: center; cursor: pointer; }
#drop.over { border-color: var(--accent); background: color-mix(in srgb, var(--accent) 10%, transparent); }
.images { display: flex; gap: 14px; flex-wrap: wrap; }
figure { margin: 0; }
figcaption { font-size: .85rem; color: var(--muted); }
.images img { width: 192px; height: 192px; image-rendering: pixelated; border: 1px solid var(--line);
  border-radius: 4px; background: var(--panel); object-fit: contain; }
#topk { list-style: none; padding: 0; margin: 12px 0 0; }
#topk li { display: grid; grid-template-columns: 9em 1fr 4.5em; gap: 8px; align-items: center; margin: 4px 0; }
.track { height: 14px; background: color-mix(in srgb, var(--line) 60%, transparent); border-radius: 7px;
  overflow: hidden; }
.fill { height: 100%; background: var(--bar); }
.num { text-align: right; font-variant-numeric: tabular-nums; }
#top1 { font-size: 1.6rem; font-weight: 700; }
#status { min-height: 1.5em; }
#status.error { color: var(--err); font-weight: 600; }
table { border-collapse: collapse; font-size: .9rem; }
td, th { padding: 2px 10px 2px 0; text-align: left; }
td.num { text-align: right; }
[hidden] { display: none !important; }
"""

_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let token = "";
let models = [];
let lastFile = null;

function say(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", !!isError);
}
function authHeaders() { return token ? { "Authorization": "Bearer " + token } : {}; }
function pct(p) { return (100 * p).toFixed(1) + "%"; }
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

async function loadModels() {
  let r;
  try { r = await fetch("/v1/models", { headers: authHeaders() }); }
  catch (e) { say("Cannot reach the service: " + e, true); return; }
  if (r.status === 401) {
    $("auth-form").hidden = false;
    say("This service needs a token: enter it above, then press Enter.", true);
    return;
  }
  const j = await r.json();
  if (!r.ok) { say(j.error || ("error " + r.status), true); return; }
  models = j.models;
  const sel = $("model");
  sel.replaceChildren();
  for (const m of models) {
    const o = el("option", m.id + " (" + m.recipe + ")");
    o.value = m.id;
    sel.append(o);
  }
  sel.value = j.default;
  $("model-row").hidden = models.length < 2;
  showCard();
  say("Ready: drop, choose or paste an image.");
}

function currentModel() { return models.find((m) => m.id === $("model").value) || models[0]; }

function showCard() {
  const m = currentModel();
  if (!m) return;
  $("card-id").textContent = m.id;
  const dl = $("card-facts");
  dl.replaceChildren();
  const facts = [
    ["Recipe", m.recipe + " (" + m.architecture + ")"],
    ["Dataset", (m.dataset || "unknown") + ", " + m.classes.length + " classes, input " + m.input_shape.join("x")],
    ["Test accuracy", m.test_accuracy == null ? "not recorded" : pct(m.test_accuracy)],
    ["Backend", m.backend + (m.tta && m.tta !== "none" ? ", test-time augmentation " + m.tta : "")],
  ];
  for (const [k, v] of facts) { dl.append(el("dt", k)); dl.append(el("dd", v)); }
  const recall = $("card-recall");
  recall.replaceChildren();
  $("recall-block").hidden = !m.per_class_recall;
  if (m.per_class_recall) {
    for (const c of m.classes) {
      const tr = el("tr");
      tr.append(el("th", c));
      const v = m.per_class_recall[c];
      tr.append(el("td", v == null ? "-" : pct(v), "num"));
      recall.append(tr);
    }
  }
  const conf = $("card-confused");
  conf.replaceChildren();
  $("confused-block").hidden = !(m.confused_pairs && m.confused_pairs.length);
  for (const p of m.confused_pairs || []) {
    conf.append(el("li", p.a + " \u2194 " + p.b + ": " + p.count + " test images"));
  }
  const link = $("report");
  link.hidden = !m.report;
  if (m.report) link.href = m.report;
}

async function openReport(ev) {
  if (!token) return;  // a plain link works without a token
  ev.preventDefault();
  const r = await fetch($("report").getAttribute("href"), { headers: authHeaders() });
  if (!r.ok) { say("The report could not be loaded (" + r.status + ")", true); return; }
  const url = URL.createObjectURL(new Blob([await r.blob()], { type: "text/html" }));
  window.open(url, "_blank", "noopener");
}

async function classify(file) {
  if (!file) return;
  lastFile = file;
  const m = currentModel();
  say("Classifying " + (file.name || "the pasted image") + "\u2026");
  $("result").setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("file", file, file.name || "pasted-image");
  const url = "/v1/predict?top_k=5&saliency=true" + (m ? "&model=" + encodeURIComponent(m.id) : "");
  let r, j;
  try {
    r = await fetch(url, { method: "POST", body: form, headers: authHeaders() });
    j = await r.json();
  } catch (e) {
    say("The request failed: " + e, true);
    $("result").removeAttribute("aria-busy");
    return;
  }
  $("result").removeAttribute("aria-busy");
  if (r.status === 401) { $("auth-form").hidden = false; $("token").focus(); }
  if (!r.ok) { say(j.error || ("error " + r.status), true); return; }
  show(j.results[0]);
}

function show(res) {
  const best = res.top_k[0];
  $("result").hidden = false;
  $("top1").textContent = best.class;
  $("top1-p").textContent = pct(best.probability);
  const list = $("topk");
  list.replaceChildren();
  for (const t of res.top_k) {
    const li = el("li");
    li.append(el("span", t.class));
    const track = el("div", undefined, "track");
    track.setAttribute("role", "img");
    track.setAttribute("aria-label", t.class + " " + pct(t.probability));
    const fill = el("div", undefined, "fill");
    fill.style.width = (100 * t.probability).toFixed(2) + "%";
    track.append(fill);
    li.append(track);
    li.append(el("span", pct(t.probability), "num"));
    list.append(li);
  }
  $("preview").src = res.preview || "";
  $("preview").alt = "The image as the model sees it: " + $("model-size").textContent;
  const sal = $("saliency");
  if (res.saliency) {
    sal.src = res.saliency;
    sal.alt = "Grad-CAM saliency overlay: where the model looked to answer " + best.class;
    $("saliency-fig").hidden = false;
  } else {
    sal.removeAttribute("src");
    $("saliency-fig").hidden = true;
  }
  say(res.file + ": " + best.class + " (" + pct(best.probability) + ")" +
      (res.saliency_error ? ". " + res.saliency_error : ""));
}

function setup() {
  const file = $("file"), drop = $("drop");
  file.addEventListener("change", () => classify(file.files[0]));
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); }
  });
  for (const t of ["dragenter", "dragover"]) {
    drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const t of ["dragleave", "drop"]) {
    drop.addEventListener(t, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const items = e.clipboardData ? Array.from(e.clipboardData.files || []) : [];
    if (items.length) { e.preventDefault(); classify(items[0]); }
  });
  $("model").addEventListener("change", () => {
    showCard();
    const m = currentModel();
    $("model-size").textContent = m ? m.input_shape.join("x") : "";
    if (lastFile) classify(lastFile);
  });
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    loadModels();
  });
  $("report").addEventListener("click", openReport);
  loadModels().then(() => {
    const m = currentModel();
    $("model-size").textContent = m ? m.input_shape.join("x") : "";
  });
}
document.addEventListener("DOMContentLoaded", setup);
"""

_INDEX = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>cifarlab: classify an image</title>
<style>__STYLE__</style>
</head>
<body>
<header>
  <h1>cifarlab image classifier</h1>
  <nav aria-label="Service links"><a href="/docs">API docs</a></nav>
</header>
<main>
  <form id="auth-form" class="controls panel" hidden aria-labelledby="auth-title">
    <span id="auth-title" hidden>Access token</span>
    <div id="auth">
      <label for="token">Access token</label>
      <input id="token" type="password" autocomplete="off" aria-describedby="token-help">
      <button type="submit">Use token</button>
      <span id="token-help" class="muted">This service requires a bearer token.</span>
    </div>
  </form>
  <div class="controls">
    <div id="model-row" hidden>
      <label for="model">Model</label>
      <select id="model"></select>
    </div>
    <div>
      <label for="file">Image</label>
      <input id="file" type="file" accept="image/*" aria-describedby="drop-help">
    </div>
  </div>
  <div id="drop" role="button" tabindex="0" aria-describedby="drop-help"
       aria-label="Drop an image here, or press Enter to choose one">
    <strong>Drop an image here</strong>, click to choose one, or paste one (Ctrl+V).
    <div id="drop-help" class="muted">__FORMATS__; any size: the server resizes it to the
      model's input size.</div>
  </div>
  <p id="status" role="status" aria-live="polite">Loading the models&hellip;</p>
  <div class="grid">
    <section id="result" class="panel" aria-labelledby="result-title" hidden>
      <h2 id="result-title">Prediction</h2>
      <p><span id="top1" aria-describedby="top1-p"></span> <span id="top1-p" class="muted"></span></p>
      <div class="images">
        <figure>
          <img id="preview" alt="The image as the model sees it">
          <figcaption>What the model sees (<span id="model-size"></span>)</figcaption>
        </figure>
        <figure id="saliency-fig">
          <img id="saliency" alt="Grad-CAM saliency overlay for the top class">
          <figcaption>Where it looked (Grad-CAM, top class)</figcaption>
        </figure>
      </div>
      <h3 class="muted" style="font-size:1rem;margin:12px 0 0">Top 5 classes</h3>
      <ol id="topk" aria-label="Top 5 classes with probabilities"></ol>
    </section>
    <section id="card" class="panel" aria-labelledby="card-title">
      <h2 id="card-title">Model card: <span id="card-id"></span></h2>
      <dl id="card-facts"></dl>
      <div id="recall-block">
        <h3 style="font-size:1rem;margin:8px 0 4px">Recall per class (test set)</h3>
        <table><caption class="muted" style="text-align:left">Share of each class's test images recognised
        </caption><tbody id="card-recall"></tbody></table>
      </div>
      <div id="confused-block">
        <h3 style="font-size:1rem;margin:8px 0 4px">Classes it confuses most</h3>
        <ul id="card-confused"></ul>
      </div>
      <p><a id="report" href="#" target="_blank" rel="noopener" hidden>Open the run's full report</a></p>
    </section>
  </div>
</main>
<script>__SCRIPT__</script>
</body>
</html>
"""

_DOCS = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cifarlab serve: API</title>
<style>__STYLE__
code, pre { font: .9rem ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background: var(--panel); border: 1px solid var(--line); padding: 10px; border-radius: 6px; overflow: auto; }
.op { margin: 14px 0; }
.method { font-weight: 700; display: inline-block; min-width: 4em; }
</style>
</head>
<body>
<header><h1>cifarlab serve: API</h1><nav aria-label="Service links"><a href="/">Classifier page</a></nav></header>
<main>
  <p>The machine-readable description is <a href="/openapi.json">/openapi.json</a> (OpenAPI 3). This page lists
  it without loading anything from outside this service. Errors are JSON <code>{"error": "..."}</code>.
  When the service was started with a token, every <code>/v1/</code> endpoint needs
  <code>Authorization: Bearer &lt;token&gt;</code>.</p>
  <pre>curl -F file=@cat.jpg 'http://127.0.0.1:8000/v1/predict?top_k=3'
curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/v1/predict'</pre>
  <div id="ops" aria-live="polite">Loading /openapi.json&hellip;</div>
</main>
<script>
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  const ops = document.getElementById("ops");
  ops.replaceChildren();
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const sec = el("section", undefined, "op panel");
      const h = el("h2");
      h.append(el("span", method.toUpperCase(), "method"), el("code", path));
      sec.append(h);
      if (op.summary) sec.append(el("p", op.summary));
      if (op.description) sec.append(el("p", op.description, "muted"));
      const params = op.parameters || [];
      if (params.length) {
        const ul = el("ul");
        for (const p of params) {
          const s = p.schema || {};
          const d = s.default !== undefined ? " (default " + JSON.stringify(s.default) + ")" : "";
          ul.append(el("li", p.name + " [" + p.in + "]" + d + (p.description ? ": " + p.description : "")));
        }
        sec.append(ul);
      }
      if (op.requestBody) {
        sec.append(el("p", "Body: " + Object.keys(op.requestBody.content).join(" or "), "muted"));
      }
      ops.append(sec);
    }
  }
}).catch((e) => { document.getElementById("ops").textContent = "Could not load /openapi.json: " + e; });
</script>
</body>
</html>
"""


def index_page(formats: str) -> str:
    """The classifier page: drop / choose / paste an image, top-5 bars, saliency, model card. `formats`: the
    image formats the service accepts, in words."""
    return _INDEX.replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT).replace("__FORMATS__", formats)


def docs_page() -> str:
    """A local API page built from /openapi.json (FastAPI's Swagger UI would load its assets from a CDN)."""
    return _DOCS.replace("__STYLE__", _STYLE)
