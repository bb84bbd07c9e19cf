"""The one-page browser client served at `/`: drop or pick an image, see the photo, the overlay and the heatmap at
the photo's resolution with a colour bar, and the top-5 classes by name; the model, preset and preprocessing come
from the explainer's metadata. Plain HTML and fetch(), so the server needs no static files or templates.

Each upload clears the previous result first, and only the latest request's answer is drawn, so an error never
sits under an older picture or under another file's name."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>graphlrp explainer</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 80rem; margin: 2rem auto; padding: 0 1rem; }
  form { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
  #drop { border: 2px dashed #999; border-radius: .5rem; padding: 1.5rem; text-align: center; margin: 1rem 0;
          color: #555; }
  #drop.over { border-color: #1565c0; background: #e3f2fd; }
  #model { color: #444; font-size: .9rem; }
  .pictures { display: flex; gap: 1rem; flex-wrap: wrap; align-items: flex-start; }
  figure { margin: 0; flex: 1 1 18rem; max-width: 26rem; }
  figure img { width: 100%; height: auto; border: 1px solid #ccc; display: block; }
  #heatmap { background: repeating-linear-gradient(45deg, #fff 0 4px, #ccc 4px 6px); }
  #colorbar { width: 100%; max-width: 26rem; height: 14px; display: block; border: 1px solid #ccc; }
  .ticks { display: flex; justify-content: space-between; max-width: 26rem; font-size: .85rem; }
  #error { color: #b00020; }
  td { padding: 0 .75rem 0 0; }
  .note { color: #555; font-size: .85rem; }
</style>
</head>
<body>
<h1>graphlrp explainer</h1>
<p id="model">loading the model's description&hellip;</p>
<form id="form">
  <input type="file" id="image" name="image" accept="image/*" required>
  <label>class <input type="number" id="target" min="-1" placeholder="predicted" style="width:7rem"></label>
  <button type="submit" id="submit">Explain</button>
</form>
<div id="drop">drop an image here, or pick a file above</div>
<p id="status" role="status"></p>
<p id="error" role="alert"></p>
<div id="result" hidden>
  <h2 id="explained"></h2>
  <div class="pictures">
    <figure><img id="photo" alt="the photo"><figcaption>photo <span id="photo-size"></span></figcaption></figure>
    <figure><img id="overlay" alt="relevance over the photo"><figcaption>overlay</figcaption></figure>
    <figure><img id="heatmap" alt="relevance heatmap"><figcaption>heatmap</figcaption></figure>
  </div>
  <p class="note">Hatched: outside the model's crop, not explained.</p>
  <img id="colorbar" alt="colour bar">
  <div class="ticks"><span id="vmin"></span><span>relevance</span><span id="vmax"></span></div>
  <p id="scale" class="note"></p>
  <table id="topk"></table>
</div>
<script>
const $ = (id) => document.getElementById(id);
const png = (b64) => "data:image/png;base64," + b64;
const percent = (p) => (100 * p).toFixed(1) + " %";
let latest = 0;       // only the newest request's answer is drawn
let photoUrl = null;

fetch("v1/metadata").then((r) => r.json()).then((m) => {
  const meta = m.metadata || {};
  $("model").textContent = `model ${meta.source_model || "?"} \u00b7 preset ${meta.preset || "?"} \u00b7 ` +
    `${m.preprocessing} \u00b7 ${m.num_classes} classes` + (meta.labels ? "" : " (no class names stored)");
}).catch(() => { $("model").textContent = "the model's description could not be read"; });

function clearResult() {
  $("result").hidden = true;
  for (const id of ["photo", "overlay", "heatmap", "colorbar"]) $(id).removeAttribute("src");
  for (const id of ["explained", "photo-size", "vmin", "vmax", "scale"]) $(id).textContent = "";
  $("topk").replaceChildren();
  if (photoUrl) { URL.revokeObjectURL(photoUrl); photoUrl = null; }
}

async function explain(file) {
  if (!file) return;
  const request = ++latest;
  clearResult();
  $("error").textContent = "";
  $("status").textContent = `explaining ${file.name}\u2026`;
  const body = new FormData();
  body.append("image", file);
  if ($("target").value !== "") body.append("target", $("target").value);
  try {
    const response = await fetch("v1/explain?overlay=1&photo=1", { method: "POST", body });
    let data;
    try { data = await response.json(); } catch { throw new Error(`the server answered ${response.status}`); }
    if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    if (request !== latest) return;
    photoUrl = URL.createObjectURL(file);
    $("photo").src = photoUrl;
    $("overlay").src = png(data.photo_overlay_png || data.overlay_png);
    $("heatmap").src = png(data.photo_heatmap_png || data.heatmap_png);
    $("colorbar").src = png(data.colorbar_png);
    $("vmin").textContent = data.scale.vmin.toPrecision(3);
    $("vmax").textContent = data.scale.vmax.toPrecision(3);
    $("scale").textContent = data.scale.description;
    const size = data.photo_size || [];
    $("photo-size").textContent = size.length ? `${size[0]}\u00d7${size[1]}` : "";
    let heading = `${file.name}: ${data.target_name} (${data.target}) ${percent(data.probability)}`;
    if (data.target !== data.predicted) heading += `; predicted ${data.predicted_name} (${data.predicted})`;
    $("explained").textContent = heading;
    $("topk").replaceChildren(...data.topk.map((c) => {
      const row = document.createElement("tr");
      row.innerHTML = "<td></td><td></td><td></td>";
      row.cells[0].textContent = c.name;
      row.cells[1].textContent = `(${c.index})`;
      row.cells[2].textContent = percent(c.probability);
      return row;
    }));
    $("result").hidden = false;
    $("status").textContent = "";
  } catch (err) {
    if (request !== latest) return;
    clearResult();
    $("status").textContent = "";
    $("error").textContent = err.message.includes(file.name) ? err.message : `${file.name}: ${err.message}`;
  }
}

$("form").addEventListener("submit", (event) => { event.preventDefault(); explain($("image").files[0]); });
$("image").addEventListener("change", () => explain($("image").files[0]));
const drop = $("drop");
for (const kind of ["dragenter", "dragover"]) {
  drop.addEventListener(kind, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const kind of ["dragleave", "drop"]) {
  drop.addEventListener(kind, (event) => { event.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (event) => {
  const file = event.dataTransfer.files[0];
  if (!file) return;
  const files = new DataTransfer();
  files.items.add(file);
  $("image").files = files.files;  // the picker shows the dropped file too
  explain(file);
});
</script>
</body>
</html>
"""
