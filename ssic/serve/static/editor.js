// The ssic editor: paint on the input, send it to `ssic serve` after each stroke, show the output.
// Talks to the HTTP API of docs/serving.md: GET /v1/model, POST /v1/sessions, .../edit, .../commit.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, main: null, h: 0, w: 0, labels: null, session: null, busy: false, pending: false,
                nLabels: 0, edits: 0 };

// ---------------------------------------------------------------- .npy encoding and decoding
function npyEncode(data, shape, descr) {
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  const pad = 64 - ((10 + header.length + 1) % 64);
  header += " ".repeat(pad % 64) + "\n";
  const out = new Uint8Array(10 + header.length + data.byteLength);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, header.length & 0xff, header.length >> 8]);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), 10 + header.length);
  return new Blob([out], { type: "application/octet-stream" });
}

function npyDecode(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const major = bytes[6];
  const view = new DataView(bytes.buffer);
  const hlen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = String.fromCharCode(...bytes.subarray(start, start + hlen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").filter((s) => s.trim()).map(Number);
  if (descr !== "<f4") throw new Error(`unsupported output dtype ${descr}`);
  const off = start + hlen;
  return { shape, data: new Float32Array(bytes.buffer.slice(off, off + 4 * shape.reduce((a, b) => a * b, 1))) };
}

// ---------------------------------------------------------------- colours of labels
function labelColour(k) {
  if (k === 0) return [0, 0, 0];
  const hue = (k * 137.508) % 360, s = 0.65, l = 0.5 + 0.1 * (k % 3 - 1);
  const c = (1 - Math.abs(2 * l - 1)) * s, x = c * (1 - Math.abs(((hue / 60) % 2) - 1)), m = l - c / 2;
  const [r, g, b] = hue < 60 ? [c, x, 0] : hue < 120 ? [x, c, 0] : hue < 180 ? [0, c, x]
    : hue < 240 ? [0, x, c] : hue < 300 ? [x, 0, c] : [c, 0, x];
  return [Math.round(255 * (r + m)), Math.round(255 * (g + m)), Math.round(255 * (b + m))];
}

function drawLabels() {
  const ctx = $("input").getContext("2d");
  const img = ctx.createImageData(state.w, state.h);
  for (let i = 0; i < state.labels.length; i++) {
    const [r, g, b] = labelColour(state.labels[i]);
    img.data.set([r, g, b, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
}

// A seeded stand-in scene when no picture is opened: bands and a few blobs of labels or colours.
function defaultPicture() {
  const { h, w } = state;
  if (state.main.kind === "labels") {
    state.labels = new Uint8Array(h * w);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
      const sky = y < h * 0.35, road = y > h * 0.7;
      let k = sky ? 23 : road ? 7 : (Math.floor(x / (w / 6)) % 2 ? 11 : 21);
      if (!sky && !road && Math.hypot(x - w * 0.7, y - h * 0.55) < h * 0.12) k = 26;
      state.labels[y * w + x] = Math.min(k, state.nLabels - 1);
    }
    drawLabels();
  } else {
    const ctx = $("input").getContext("2d");
    const grad = ctx.createLinearGradient(0, 0, 0, h);
    grad.addColorStop(0, "#7ab8e8"); grad.addColorStop(0.6, "#d8e8f0"); grad.addColorStop(1, "#6a8a4a");
    ctx.fillStyle = grad; ctx.fillRect(0, 0, w, h);
    ctx.fillStyle = "#8a5a3a"; ctx.fillRect(w * 0.3, h * 0.35, w * 0.4, h * 0.4);
    ctx.fillStyle = "#603020"; ctx.beginPath(); ctx.moveTo(w * 0.25, h * 0.37); ctx.lineTo(w * 0.5, h * 0.15);
    ctx.lineTo(w * 0.75, h * 0.37); ctx.fill();
  }
}

// ---------------------------------------------------------------- requests
async function inputParts() {
  const form = new FormData();
  for (const spec of state.model.inputs) {
    if (spec === state.main) {
      if (spec.kind === "labels") {
        form.append(spec.name, npyEncode(state.labels, [state.h, state.w], "|u1"), `${spec.name}.npy`);
      } else {
        const blob = await new Promise((res) => $("input").toBlob(res, "image/png"));
        form.append(spec.name, blob, `${spec.name}.png`);
      }
    } else {
      const n = spec.shape.reduce((a, b) => a * b, 1);
      form.append(spec.name, npyEncode(new Float32Array(n), spec.shape, "<f4"), `${spec.name}.npy`);
    }
  }
  return form;
}

async function call(method, path, body) {
  const r = await fetch(path, { method, body });
  const json = await r.json();
  if (!r.ok) throw new Error(json.error || `HTTP ${r.status}`);
  return json;
}

function drawOutput(canvasId, b64) {
  const { shape, data } = npyDecode(b64);
  const [, c, h, w] = shape.length === 4 ? shape : [1, 1, shape[0], shape[1]];
  const canvas = $(canvasId);
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  let lo = -1, hi = 1;
  if (c !== 3) {
    lo = Infinity; hi = -Infinity;
    for (let i = 0; i < h * w; i++) { lo = Math.min(lo, data[i]); hi = Math.max(hi, data[i]); }
    if (hi <= lo) hi = lo + 1;
  }
  const plane = h * w;
  for (let i = 0; i < plane; i++) {
    for (let k = 0; k < 3; k++) {
      const v = data[(c >= 3 ? k : 0) * plane + i];
      img.data[4 * i + k] = Math.max(0, Math.min(255, Math.round(((v - lo) / (hi - lo)) * 255)));
    }
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

async function openSession() {
  $("status").textContent = "priming…";
  if (state.session) fetch(`/v1/sessions/${state.session}`, { method: "DELETE" });
  const res = await call("POST", "/v1/sessions", await inputParts());
  state.session = res.session;
  const first = Object.values(res.outputs)[0];
  drawOutput("before", first);
  drawOutput("after", first);
  $("timing").textContent = `primed in ${res.ms.toFixed(1)} ms`;
  $("commit").disabled = true;
  $("status").textContent = "ready";
}

async function sendEdit() {
  if (state.busy) { state.pending = true; return; }
  state.busy = true;
  try {
    do {
      state.pending = false;
      $("status").textContent = "editing…";
      const form = await inputParts();
      form.append("compare_dense", "1");
      const t0 = performance.now();
      const res = await call("POST", `/v1/sessions/${state.session}/edit`, form);
      const rtt = performance.now() - t0;
      drawOutput("after", Object.values(res.outputs)[0]);
      const dense = res.dense_ms !== undefined ? ` · dense ${res.dense_ms.toFixed(1)} ms` : "";
      $("timing").textContent = `${res.mode} ${res.ms.toFixed(1)} ms (${(100 * res.active_fraction).toFixed(1)}% of tiles)`
        + `${dense} · round trip ${rtt.toFixed(0)} ms (both runs)${res.reprimed ? " · re-primed" : ""}`;
      state.edits += 1;
      document.body.dataset.edits = String(state.edits);
      $("commit").disabled = false;
    } while (state.pending);
    $("status").textContent = "ready";
    $("error").textContent = "";
  } catch (err) {
    $("error").textContent = String(err.message || err);
    $("status").textContent = "error";
  } finally {
    state.busy = false;
  }
}

// ---------------------------------------------------------------- painting
function paintAt(x, y) {
  const r = Number($("size").value) / 2;
  if (state.main.kind === "labels") {
    const k = Number($("label").value);
    for (let yy = Math.max(0, Math.floor(y - r)); yy <= Math.min(state.h - 1, Math.ceil(y + r)); yy++) {
      for (let xx = Math.max(0, Math.floor(x - r)); xx <= Math.min(state.w - 1, Math.ceil(x + r)); xx++) {
        if ((xx - x) ** 2 + (yy - y) ** 2 <= r * r) state.labels[yy * state.w + xx] = k;
      }
    }
  }
  const ctx = $("input").getContext("2d");
  const [cr, cg, cb] = state.main.kind === "labels" ? labelColour(Number($("label").value)) : [0, 0, 0];
  ctx.fillStyle = state.main.kind === "labels" ? `rgb(${cr},${cg},${cb})` : $("colour").value;
  ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill();
}

function setUpPainting() {
  const canvas = $("input");
  let last = null;
  const pos = (e) => {
    const b = canvas.getBoundingClientRect();
    return [(e.clientX - b.left) * (canvas.width / b.width), (e.clientY - b.top) * (canvas.height / b.height)];
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!state.session) return;
    canvas.setPointerCapture(e.pointerId);
    last = pos(e); paintAt(...last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = pos(e);
    const steps = Math.max(1, Math.ceil(Math.hypot(p[0] - last[0], p[1] - last[1]) / 2));
    for (let i = 1; i <= steps; i++) paintAt(last[0] + ((p[0] - last[0]) * i) / steps, last[1] + ((p[1] - last[1]) * i) / steps);
    last = p;
  });
  const end = () => { if (last) { last = null; sendEdit(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

async function openFile(file) {
  const { h, w } = state;
  if (state.main.kind === "labels") {
    // a one-channel label map PNG: the red channel holds the label ids
    const bmp = await createImageBitmap(file);
    const c = new OffscreenCanvas(w, h), ctx = c.getContext("2d");
    ctx.drawImage(bmp, 0, 0, w, h);
    const px = ctx.getImageData(0, 0, w, h).data;
    for (let i = 0; i < h * w; i++) state.labels[i] = Math.min(px[4 * i], state.nLabels - 1);
    drawLabels();
  } else {
    const bmp = await createImageBitmap(file);
    $("input").getContext("2d").drawImage(bmp, 0, 0, w, h);  // resized to the model's size
  }
  await openSession();
}

async function main() {
  try {
    state.model = await (await fetch("/v1/model")).json();
    state.main = state.model.inputs.find((s) => s.kind === "image" || s.kind === "labels");
    if (!state.main) throw new Error("this model has no image or label-map input to paint on");
    [state.h, state.w] = state.main.shape.slice(2);
    $("input").width = state.w; $("input").height = state.h;
    $("model").textContent = state.model.inputs.map((s) => `${s.name} [${s.shape.join(",")}]`).join(", ")
      + ` → ${state.model.outputs.map((s) => s.name).join(", ")}`;
    if (state.main.kind === "labels") {
      state.nLabels = state.main.shape[1] - 1;
      $("label-tool").hidden = false; $("colour-tool").hidden = true;
      for (let k = 0; k < state.nLabels; k++) $("label").add(new Option(`label ${k}`, String(k)));
      $("label").value = String(Math.min(8, state.nLabels - 1));
    }
    $("size").addEventListener("input", () => { $("size-value").textContent = $("size").value; });
    $("slider").addEventListener("input", () => {
      $("after").style.clipPath = `inset(0 ${100 - Number($("slider").value)}% 0 0)`;
    });
    $("open").addEventListener("change", (e) => e.target.files[0] && openFile(e.target.files[0]).catch(showError));
    $("reset").addEventListener("click", () => { defaultPicture(); openSession().catch(showError); });
    $("commit").addEventListener("click", async () => {
      try {
        await call("POST", `/v1/sessions/${state.session}/commit`);
        const after = $("after");
        $("before").getContext("2d").drawImage(after, 0, 0);
        $("commit").disabled = true;
      } catch (err) { showError(err); }
    });
    setUpPainting();
    defaultPicture();
    await openSession();
  } catch (err) { showError(err); }
}

function showError(err) {
  $("error").textContent = String(err.message || err);
  $("status").textContent = "error";
}

main();
