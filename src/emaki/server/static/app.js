// emaki's web page: a client of the same job API every other client uses.
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "txt2img";
let initImage = null; // an HTMLImageElement once an init image is loaded
const shown = new Set(); // job ids already in the gallery

function token() { return localStorage.getItem("emaki-token") || ""; }
function headers(extra = {}) {
  const h = { ...extra };
  if (token()) h["Authorization"] = "Bearer " + token();
  return h;
}
async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).detail || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}
async function blobUrl(path) {
  const r = await api(path);
  return URL.createObjectURL(await r.blob());
}
function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }

// -- settings <-> form ---------------------------------------------------------------------------
const NUMBERS = ["steps", "cfg_scale", "seed", "width", "height", "batch_size", "n_iter",
  "clip_skip", "guidance_rescale", "subseed", "subseed_strength", "denoising_strength", "eta"];

function requestFromForm() {
  const req = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value, schedule: $("schedule").value, emphasis: $("emphasis").value,
    tiling: $("tiling").checked };
  for (const k of NUMBERS) {
    const v = $(k).value;
    if (v !== "") req[k] = Number(v);
  }
  const resize = $("seed_resize_from").value.trim();
  if (resize) {
    const [w, h] = resize.toLowerCase().split("x").map(Number);
    req.seed_resize_from = [w, h];
  }
  if ($("vae").value.trim()) req.vae = $("vae").value.trim();
  if (mode === "txt2img") {
    delete req.denoising_strength;
    if ($("hires_on").checked) {
      req.hires = { scale: Number($("hires_scale").value), upscaler: $("hires_upscaler").value,
        steps: Number($("hires_steps").value), denoising_strength: Number($("hires_denoising").value) };
      if ($("hires_cfg").value !== "") req.hires.cfg_scale = Number($("hires_cfg").value);
      if ($("hires_sampler").value) req.hires.sampler = $("hires_sampler").value;
      if ($("hires_prompt").value) req.hires.prompt = $("hires_prompt").value;
      if ($("hires_negative").value) req.hires.negative_prompt = $("hires_negative").value;
    }
  } else {
    if (!initImage) throw new Error("load an init image first");
    req.init = { image: imageData(initImage), resize_mode: Number($("resize_mode").value),
      mask_blur: Number($("mask_blur").value), inpainting_fill: Number($("inpainting_fill").value),
      inpaint_full_res: $("inpaint_full_res").checked,
      inpaint_full_res_padding: Number($("inpaint_full_res_padding").value),
      inpainting_mask_invert: $("inpainting_mask_invert").checked };
    const mask = maskData();
    if (mask) req.init.mask = mask;
  }
  return req;
}

function fillForm(req) {
  for (const k of ["prompt", "negative_prompt", "sampler", "schedule", "emphasis", ...NUMBERS]) {
    if (req[k] !== undefined && req[k] !== null && $(k)) $(k).value = req[k];
  }
  $("tiling").checked = !!req.tiling;
  $("hires_on").checked = !!req.hires;
  if (req.hires) {
    $("hires_scale").value = req.hires.scale; $("hires_upscaler").value = req.hires.upscaler;
    $("hires_steps").value = req.hires.steps; $("hires_denoising").value = req.hires.denoising_strength;
    $("hires_cfg").value = req.hires.cfg_scale ?? ""; $("hires_sampler").value = req.hires.sampler ?? "";
    $("hires_prompt").value = req.hires.prompt ?? ""; $("hires_negative").value = req.hires.negative_prompt ?? "";
  }
  $("seed_resize_from").value = req.seed_resize_from ? req.seed_resize_from.join("x") : "";
  $("vae").value = req.vae ?? "";
}

// A1111 infotext parameters (from /sdapi/v1/png-info) -> request fields
function requestFromInfotext(p) {
  const req = { prompt: p["Prompt"] || "", negative_prompt: p["Negative prompt"] || "" };
  const num = { "Steps": "steps", "CFG scale": "cfg_scale", "Seed": "seed", "Clip skip": "clip_skip",
    "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
    "Denoising strength": "denoising_strength" };
  for (const [k, f] of Object.entries(num)) if (p[k] !== undefined) req[f] = Number(p[k]);
  if (p["Sampler"]) req.sampler = p["Sampler"];
  if (p["Schedule type"]) req.schedule = p["Schedule type"];
  if (p["Size-1"]) { req.width = Number(p["Size-1"]); req.height = Number(p["Size-2"]); }
  if (p["Tiling"]) req.tiling = p["Tiling"] === "True";
  return req;
}

// -- img2img canvas and mask painting ---------------------------------------------------------------
function imageData(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  c.getContext("2d").drawImage(img, 0, 0);
  return c.toDataURL("image/png");
}
function maskData() {
  const m = $("mask_canvas");
  const px = m.getContext("2d").getImageData(0, 0, m.width, m.height).data;
  let painted = false;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 0) { painted = true; break; }
  if (!painted) return null;
  const out = document.createElement("canvas");
  out.width = initImage.naturalWidth; out.height = initImage.naturalHeight;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "black"; ctx.fillRect(0, 0, out.width, out.height);
  // painted strokes are white on the mask the server reads
  const white = document.createElement("canvas");
  white.width = m.width; white.height = m.height;
  const w = white.getContext("2d");
  w.drawImage(m, 0, 0); w.globalCompositeOperation = "source-in";
  w.fillStyle = "white"; w.fillRect(0, 0, m.width, m.height);
  ctx.drawImage(white, 0, 0, out.width, out.height);
  return out.toDataURL("image/png");
}
function loadInit(file) {
  const img = new Image();
  img.onload = () => {
    initImage = img;
    $("init_canvas").getContext("2d").drawImage(img, 0, 0, 256, 256);
    $("mask_canvas").getContext("2d").clearRect(0, 0, 256, 256);
  };
  img.src = URL.createObjectURL(file);
}
function setupPainting() {
  const m = $("mask_canvas"), ctx = m.getContext("2d");
  let last = null; // the previous point of the stroke: segments join points, so fast moves leave no gaps
  const point = (e) => { const r = m.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  const paint = (e) => {
    if (!last) return;
    const p = point(e);
    ctx.strokeStyle = "rgba(255, 40, 40, 1)";
    ctx.lineWidth = Number($("brush").value);
    ctx.lineCap = "round";
    ctx.beginPath(); ctx.moveTo(...last); ctx.lineTo(...p); ctx.stroke();
    last = p;
  };
  m.addEventListener("pointerdown", (e) => { last = point(e); paint(e); });
  m.addEventListener("pointermove", paint);
  window.addEventListener("pointerup", (e) => { if (last) paint(e); last = null; });
  $("clear_mask").addEventListener("click", () => ctx.clearRect(0, 0, m.width, m.height));
  $("init_file").addEventListener("change", (e) => e.target.files[0] && loadInit(e.target.files[0]));
}

// -- queue, progress, gallery -------------------------------------------------------------------------
async function refresh() {
  try {
    const active = await (await api("/api/jobs?state=queued,running")).json();
    // update rows in place, so a Cancel button being clicked is never replaced under the pointer
    const q = $("queue");
    const ids = new Set(active.map((job) => job.id));
    for (const li of [...q.children]) if (!ids.has(li.dataset.job)) li.remove();
    for (const job of active) {
      let li = q.querySelector(`li[data-job="${job.id}"]`);
      if (!li) {
        li = document.createElement("li");
        li.dataset.job = job.id;
        const label = document.createElement("span");
        label.className = "label";
        const bar = document.createElement("progress");
        bar.max = 1; bar.value = 0; bar.id = "progress-" + job.id;
        const cancel = document.createElement("button");
        cancel.type = "button"; cancel.textContent = "Cancel"; cancel.className = "cancel";
        cancel.addEventListener("click", () => api("/api/jobs/" + job.id, { method: "DELETE" }).then(refresh, showError));
        li.append(label, bar, cancel);
        q.append(li);
      }
      li.querySelector(".label").textContent = `${job.kind} ${job.id.slice(0, 8)} ${job.state}`;
    }
    const done = await (await api("/api/jobs?state=done,failed,cancelled&limit=30")).json();
    for (const job of done.reverse()) if (!shown.has(job.id)) await addToGallery(job);
  } catch (e) { showError(e); }
}

async function addToGallery(job) {
  shown.add(job.id);
  const gallery = $("gallery");
  if (job.state !== "done") {
    const card = document.createElement("div");
    card.className = "card"; card.textContent = `${job.id.slice(0, 8)}: ${job.state} (${job.error || ""})`;
    gallery.prepend(card);
    return;
  }
  const r = job.result;
  for (let i = r.images.length - 1; i >= 0; i--) {
    const card = document.createElement("div");
    card.className = "card";
    const img = document.createElement("img");
    img.alt = r.infotexts[i].split("\n")[0];
    img.src = await blobUrl("/api/outputs/" + r.images[i]);
    const info = document.createElement("pre");
    info.className = "infotext"; info.textContent = r.infotexts[i];
    const again = document.createElement("button");
    again.type = "button"; again.textContent = "Use these settings";
    again.addEventListener("click", () => fillForm({ ...r.request, seed: r.seeds[i] }));
    card.append(img, info, again);
    gallery.prepend(card);
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/api/ws?token=${encodeURIComponent(token())}`);
  let last = null;
  ws.onmessage = async (ev) => {
    const p = JSON.parse(ev.data);
    if (p.job) {
      const bar = $("progress-" + p.job);
      if (bar) bar.value = p.fraction;
      if (p.preview && p.step !== last) {
        last = p.step;
        $("preview").src = "data:image/png;base64," + p.preview;
        $("preview").hidden = false;
      }
    }
    if (!p.job) $("preview").hidden = true;
    refresh();
  };
  ws.onclose = () => setTimeout(connect, 2000);
}

// -- drag an image in to read its parameters -----------------------------------------------------------
function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault(); drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) await readParameters(file);
  });
}
async function readParameters(file) {
  const data = await new Promise((ok) => { const fr = new FileReader(); fr.onload = () => ok(fr.result); fr.readAsDataURL(file); });
  try {
    const r = await api("/sdapi/v1/png-info", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: data }) });
    const info = await r.json();
    $("dropped").textContent = info.info || "(no parameters in this image)";
    if (info.info) fillForm(requestFromInfotext(info.parameters));
  } catch (e) { showError(e); }
}

// -- start ------------------------------------------------------------------------------------------
async function start() {
  $("token").value = token();
  $("token").addEventListener("change", () => { localStorage.setItem("emaki-token", $("token").value); init(); });
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      mode = tab.dataset.mode;
      document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
      document.querySelectorAll(".img2img-only").forEach((el) => { el.hidden = mode !== "img2img"; });
      document.querySelectorAll(".txt2img-only").forEach((el) => { el.hidden = mode !== "txt2img"; });
    });
  }
  $("form").addEventListener("submit", async (e) => {
    e.preventDefault(); showError(null);
    try {
      await api("/api/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestFromForm()) });
      refresh();
    } catch (err) { showError(err); }
  });
  setupPainting(); setupDrop();
  await init();
}
async function init() {
  try {
    const info = await (await api("/api/info")).json();
    $("model").textContent = info.model;
    $("sampler").replaceChildren(...info.samplers.map((s) => new Option(s, s, s === "DPM++ 2M", s === "DPM++ 2M")));
    $("schedule").replaceChildren(new Option("automatic"), ...info.schedules.map((s) => new Option(s)));
    $("hires_sampler").replaceChildren(new Option("same", ""), ...info.samplers.map((s) => new Option(s, s)));
    showError(null);
    refresh(); connect();
  } catch (e) { showError(e); }
}
start();
