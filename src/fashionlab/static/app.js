// The fashionlab page: send an image to /v1/explain, draw what comes back. No outside requests.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "note error" : "note";
}

// Draw a 28x28 grid of 0..255 values scaled up without smoothing; `colour` maps a value to RGBA.
function drawGrid(canvas, grid, colour) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(28, 28);
  for (let y = 0; y < 28; y++) for (let x = 0; x < 28; x++) {
    const rgba = colour(grid[y][x], x, y), o = (y * 28 + x) * 4;
    img.data.set(rgba, o);
  }
  const tmp = document.createElement("canvas");
  tmp.width = tmp.height = 28;
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
}

let oodThreshold = null;  // from /v1/model: scores above it are unsure

// The out-of-distribution verdict: a visible mark when the image is unlike the garments the model knows.
function showOod(r) {
  const mark = $("ood-mark");
  mark.hidden = r.unsure !== true;
  $("result").classList.toggle("unsure", r.unsure === true);
  if (r.ood_score === null || r.ood_score === undefined) {
    $("ood-detail").textContent = "";
    $("ood-line").textContent = "No out-of-distribution check for this model.";
    return;
  }
  const limit = oodThreshold === null ? "" : ` (threshold ${oodThreshold.toFixed(2)})`;
  $("ood-detail").textContent = `This image is unlike the garments it was trained on: ` +
    `out-of-distribution score ${r.ood_score.toFixed(2)}${limit}. The prediction above is only a guess.`;
  $("ood-line").textContent = r.unsure ? "" : `Out-of-distribution score ${r.ood_score.toFixed(2)}${limit}: looks like a garment.`;
}

function showResult(r) {
  $("result").hidden = false;
  $("prediction").textContent = r.prediction.label;
  $("confidence").textContent = `(${(100 * r.prediction.score).toFixed(1)}%)`;
  showOod(r);
  drawGrid($("input-view"), r.input, (v) => [v, v, v, 255]);
  if (r.saliency) {
    // the input in grey with the saliency in red on top, so the hot pixels can be placed on the garment
    drawGrid($("saliency-view"), r.input, (v, x, y) => {
      const s = r.saliency[y][x] / 255, g = v * 0.6;
      return [Math.round(g + (255 - g) * s), Math.round(g * (1 - s)), Math.round(g * (1 - s)), 255];
    });
  } else {
    const ctx = $("saliency-view").getContext("2d");
    ctx.clearRect(0, 0, 224, 224);
    ctx.fillText("no saliency (no PyTorch weights)", 10, 110);
  }
  const bars = $("bars");
  bars.replaceChildren();
  for (const p of r.probabilities) {
    const row = document.createElement("div");
    row.className = "bar" + (p.index === r.prediction.index ? " top" : "");
    row.setAttribute("role", "listitem");
    row.dataset.label = p.label;
    const name = document.createElement("span"); name.textContent = p.label;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill";
    fill.style.width = (100 * p.score).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span"); value.className = "value";
    value.textContent = (100 * p.score).toFixed(1) + "%";
    row.append(name, track, value);
    bars.appendChild(row);
  }
  setStatus("Done.");
}

async function classify(blob, name) {
  setStatus(`Classifying ${name}...`);
  const form = new FormData();
  form.append("file", blob, name);
  try {
    const resp = await fetch("/v1/explain", { method: "POST", body: form });
    const body = await resp.json();
    if (!resp.ok) { $("result").hidden = true; setStatus(`Error ${resp.status}: ${body.error}`, true); return; }
    showResult(body);
  } catch (e) {
    setStatus(`Request failed: ${e}`, true);
  }
}

async function loadSamples() {
  const resp = await fetch("/v1/samples");
  const body = await resp.json();
  $("samples-note").textContent = body.note || "";
  for (const s of body.samples) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = `test image ${s.id} (${s.label})`;
    b.dataset.label = s.label;
    const img = document.createElement("img");
    img.src = s.url; img.alt = s.label;
    b.appendChild(img);
    b.addEventListener("click", async () => {
      const r = await fetch(s.url);
      classify(await r.blob(), `sample-${s.id}.png`);
    });
    $("samples").appendChild(b);
  }
}

async function loadModel() {
  const resp = await fetch("/v1/model");
  if (!resp.ok) return;
  const m = await resp.json();
  $("model-line").textContent = `Model ${m.name} (${m.backend}): ${m.class_names.join(", ")}`;
  if (m.ood && m.ood.available) oodThreshold = m.ood.threshold;
}

$("file").addEventListener("change", (e) => {
  const f = e.target.files[0];
  if (f) classify(f, f.name);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const f = e.dataTransfer.files[0];
  if (f) classify(f, f.name);
});
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });

loadModel();
loadSamples();
