"""The one-page browser client served at `/`: pick an image, see the overlay, heatmap and top-5 classes.
Plain HTML and fetch(), so the server needs no static files or templates."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>graphlrp explainer</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; }
  form { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
  figure { display: inline-block; margin: 1rem 1rem 0 0; }
  img { width: 224px; height: 224px; image-rendering: pixelated; border: 1px solid #ccc; }
  #error { color: #b00020; }
  td { padding: 0 .75rem 0 0; }
</style>
</head>
<body>
<h1>graphlrp explainer</h1>
<p>Relevance of each pixel for the explained class: red speaks for it, blue against it.</p>
<form id="form">
  <input type="file" id="image" name="image" accept="image/*" required>
  <label>class <input type="number" id="target" min="-1" placeholder="predicted" style="width:7rem"></label>
  <button type="submit" id="submit">Explain</button>
</form>
<p id="status"></p>
<p id="error" role="alert"></p>
<div id="result" hidden>
  <figure><img id="overlay" alt="relevance over the input"><figcaption>overlay</figcaption></figure>
  <figure><img id="heatmap" alt="relevance heatmap"><figcaption>heatmap</figcaption></figure>
  <p id="explained"></p>
  <table id="topk"></table>
</div>
<script>
const $ = (id) => document.getElementById(id);
const name = (c) => c.label ? `${c.index} ${c.label}` : `${c.index}`;
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = new FormData();
  body.append("image", $("image").files[0]);
  if ($("target").value !== "") body.append("target", $("target").value);
  $("error").textContent = "";
  $("status").textContent = "explaining\u2026";
  try {
    const response = await fetch("v1/explain?overlay=1", { method: "POST", body });
    const data = await response.json();
    if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    $("overlay").src = "data:image/png;base64," + data.overlay_png;
    $("heatmap").src = "data:image/png;base64," + data.heatmap_png;
    $("explained").textContent = `explained class ${data.target}; predicted ${data.predicted}`;
    $("topk").replaceChildren(...data.topk.map((c) => {
      const row = document.createElement("tr");
      row.innerHTML = "<td></td><td></td>";
      row.cells[0].textContent = name(c);
      row.cells[1].textContent = (100 * c.probability).toFixed(1) + " %";
      return row;
    }));
    $("result").hidden = false;
    $("status").textContent = "";
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = err.message;
  }
});
</script>
</body>
</html>
"""
