// wanx web UI: plain JS against the server's own /v1 API (no build step, no dependencies).
// User text is only ever put into the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  facts: null,
  key: sessionStorage.getItem("wanx-key") || "",
  blobs: new Map(),      // video id -> object URL of its mp4 (fetched once, with the key)
  cards: new Map(),      // video id -> gallery card element
  timer: null,
};

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.param = e.param || null;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const r = await fetch("/v1" + path, Object.assign({}, options, { headers }));
  if (r.status === 401) $("keybar").hidden = false;
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, body);
  }
  return r;
}

// ------------------------------------------------------------------------------------- the form

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text || value;
  select.appendChild(o);
}

function setupForm(f) {
  $("model").textContent = `${f.model} · ${f.task}`;
  const size = $("size");
  size.replaceChildren();
  f.sizes.forEach((s) => option(size, s, s.replace("*", " × ")));
  size.value = f.default_size;
  const solver = $("sample_solver");
  solver.replaceChildren();
  f.solvers.forEach((s) => option(solver, s));
  $("frame_num").max = f.limits.max_frames;
  $("sample_steps").max = f.limits.max_steps;
  $("image-box").hidden = !f.takes_image;
  $("image-need").textContent = f.image_required ? "(required)" : "(optional)";
  $("audio-box").hidden = !f.takes_audio;
  $("extend-row").hidden = !f.prompt_extend.enabled;
  $("lora-box").hidden = f.loras.length === 0;
  const loras = $("loras");
  loras.replaceChildren();
  f.loras.forEach((name) => option(loras, name));
  loras.disabled = !f.loras_supported;
  $("lora-note").textContent = f.loras_supported ? "" : "(listed; this wanx cannot apply them yet)";
  fillDefaults(f.defaults);
}

function fillDefaults(d) {
  $("frame_num").value = d.frame_num;
  $("sample_steps").value = d.sample_steps;
  $("guide_scale").value = Array.isArray(d.guide_scale) ? "" : d.guide_scale;
  $("guide_scale").placeholder = Array.isArray(d.guide_scale) ? d.guide_scale.join(", ") : "";
  $("sample_solver").value = d.sample_solver;
  $("negative_prompt").placeholder = d.negative_prompt ? "the task's default" : "none";
  showSeconds();
}

function showSeconds() {
  const fps = state.facts ? state.facts.defaults.fps : 16;
  const n = parseInt($("frame_num").value, 10);
  $("seconds").textContent = n > 0 ? `= ${(n / fps).toFixed(2)} s at ${fps} fps` : "";
}

function formData() {
  const data = new FormData();
  const put = (name, value) => { if (value !== "" && value !== null && value !== undefined) data.append(name, value); };
  put("prompt", $("prompt").value);
  put("negative_prompt", $("negative_prompt").value.trim());
  put("size", $("size").value.replace("*", "x"));
  put("frame_num", $("frame_num").value);
  put("sample_steps", $("sample_steps").value);
  put("guide_scale", $("guide_scale").value);
  put("seed", $("seed").value);
  put("sample_solver", $("sample_solver").value);
  if ($("prompt_extend").checked) put("prompt_extend", "true");
  const image = $("image").files[0];
  if (!$("image-box").hidden && image) data.append("input_reference", image);
  const audio = $("audio").files[0];
  if (!$("audio-box").hidden && audio) data.append("audio", audio);
  const loras = Array.from($("loras").selectedOptions).map((o) => o.value);
  if (loras.length) put("loras", loras.join(","));
  return data;
}

function showError(err) {
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  $("error").hidden = !err;
  if (!err) return;
  $("error").textContent = err.message;
  const aliases = { input_reference: "input_reference", image: "input_reference", num_frames: "frame_num",
                    seconds: "frame_num", guidance_scale: "guide_scale" };
  const param = aliases[err.param] || err.param;
  const field = param && document.querySelector(`[data-param="${CSS.escape(param)}"]`);
  if (field) { field.classList.add("invalid"); field.focus(); }
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  $("submit").disabled = true;
  try {
    await api("/videos", { method: "POST", body: formData() });
    await refresh();
  } catch (err) {
    showError(err);
  } finally {
    $("submit").disabled = false;
  }
}

function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function extendPrompt() {
  const button = $("extend");
  button.disabled = true;
  $("extend-note").hidden = false;
  $("extend-note").textContent = "extending…";
  try {
    const body = { prompt: $("prompt").value };
    const image = $("image").files[0];
    if (!$("image-box").hidden && image) body.image = await fileToDataURL(image);
    const r = await api("/prompts/extend", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify(body) });
    const result = await r.json();
    if (result.ok) $("prompt").value = result.prompt;
    $("extend-note").textContent = result.ok
      ? `extended by ${result.model}${result.message ? " · " + result.message : ""}` : result.message;
  } catch (err) {
    $("extend-note").textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

function reuse(v) {
  const r = v.recipe || {};
  $("prompt").value = v.prompt_extend ? v.prompt_extend.original : (v.prompt || "");
  $("negative_prompt").value = r.negative_prompt || "";
  if (r.size) $("size").value = r.size;
  $("frame_num").value = r.frame_num || "";
  $("sample_steps").value = r.sample_steps || "";
  const g = r.sample_guide_scale || [];
  $("guide_scale").value = g.length && g[0] === g[1] ? g[0] : "";
  $("seed").value = r.seed ?? "";
  if (r.sample_solver) $("sample_solver").value = r.sample_solver;
  $("prompt_extend").checked = !!v.prompt_extend;
  showSeconds();
  $("prompt").focus();
}

// ---------------------------------------------------------------------------- queue and gallery

function renderQueue(active) {
  const list = $("queue");
  list.replaceChildren();
  $("queue-count").textContent = active.length ? `(${active.length})` : "";
  if (!active.length) {
    const li = document.createElement("li");
    li.className = "muted empty";
    li.textContent = "nothing waiting";
    list.appendChild(li);
    return;
  }
  for (const v of active) {
    const li = document.createElement("li");
    li.dataset.id = v.id;
    const text = document.createElement("span");
    text.className = "text";
    const tag = document.createElement("span");
    tag.className = "tag" + (v.status === "in_progress" ? " running" : "");
    tag.textContent = v.status === "in_progress" ? `running ${v.progress}%` : "queued";
    text.append(tag, document.createTextNode(v.prompt));
    const cancel = document.createElement("button");
    cancel.className = "small danger";
    cancel.type = "button";
    cancel.textContent = "Cancel";
    cancel.onclick = () => remove(v.id);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${v.progress}%`;
    bar.appendChild(fill);
    li.append(text, cancel, bar);
    list.appendChild(li);
  }
}

function meta(v) {
  const r = v.recipe || {};
  const parts = [v.size, `${v.frame_num} frames`, `${v.sample_steps} steps`, `seed ${v.seed}`];
  if (v.completed_at) parts.push(new Date(v.completed_at * 1000).toLocaleTimeString());
  if (r.prompt_extend && r.prompt_extend.ok) parts.push("prompt extended");
  return parts.join(" · ");
}

function button(text, onclick, cls = "small") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.onclick = onclick;
  return b;
}

function buildCard(v) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.id = v.id;
  const [w, h] = (v.size || "1x1").split("x").map(Number);
  card.style.setProperty("--aspect", `${w} / ${h}`);
  let media;
  if (v.status === "completed") {
    media = document.createElement("video");
    Object.assign(media, { muted: true, loop: true, autoplay: true, playsInline: true, controls: true });
    loadVideo(v.id, media);
  } else {
    media = document.createElement("div");
    media.className = "placeholder";
    media.textContent = `failed: ${(v.error && v.error.message) || "unknown error"}`;
  }
  const body = document.createElement("div");
  body.className = "body";
  const prompt = document.createElement("div");
  prompt.className = "prompt";
  prompt.textContent = v.recipe && v.recipe.prompt ? v.recipe.prompt : v.prompt;
  const info = document.createElement("div");
  info.className = "meta";
  info.textContent = meta(v);
  const recipe = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "recipe";
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(v.recipe, null, 2);
  recipe.append(summary, pre);
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(button("Reuse settings", () => reuse(v)));
  if (v.status === "completed") actions.append(button("Download", () => download(v.id)));
  actions.append(button("Delete", () => remove(v.id), "small danger"));
  body.append(prompt, info, actions, recipe);
  card.append(media, body);
  return card;
}

async function loadVideo(id, element) {
  try {
    if (!state.blobs.has(id)) {
      const r = await api(`/videos/${encodeURIComponent(id)}/content`);
      state.blobs.set(id, URL.createObjectURL(await r.blob()));
    }
    element.src = state.blobs.get(id);
  } catch (err) {
    element.replaceWith(Object.assign(document.createElement("div"), { className: "placeholder", textContent: err.message }));
  }
}

async function download(id) {
  const a = document.createElement("a");
  a.href = state.blobs.get(id) || URL.createObjectURL(await (await api(`/videos/${encodeURIComponent(id)}/content`)).blob());
  a.download = `${id}.mp4`;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

async function remove(id) {
  try {
    await api(`/videos/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    if (err.status !== 404) showError(err);
  }
  if (state.blobs.has(id)) URL.revokeObjectURL(state.blobs.get(id));
  state.blobs.delete(id);
  await refresh();
}

function renderGallery(done) {
  const gallery = $("gallery");
  const keep = new Set(done.map((v) => v.id));
  for (const [id, card] of state.cards) {
    if (!keep.has(id)) { card.remove(); state.cards.delete(id); }
  }
  gallery.querySelector(".empty")?.remove();
  done.forEach((v, i) => {
    if (!state.cards.has(v.id)) state.cards.set(v.id, buildCard(v));
    const card = state.cards.get(v.id);
    if (gallery.children[i] !== card) gallery.insertBefore(card, gallery.children[i] || null);
  });
  if (!done.length) {
    const p = Object.assign(document.createElement("p"), { className: "muted empty", textContent: "finished videos appear here" });
    gallery.appendChild(p);
  }
}

async function refresh() {
  clearTimeout(state.timer);
  let active = [];
  try {
    const list = await (await api("/videos?limit=50")).json();
    active = list.data.filter((v) => v.status === "queued" || v.status === "in_progress").reverse();
    renderQueue(active);
    renderGallery(list.data.filter((v) => v.status === "completed" || v.status === "failed"));
  } catch (err) {
    if (err.status !== 401) showError(err);
  }
  // Poll fast while something runs (live progress), slowly otherwise (other clients' jobs).
  state.timer = setTimeout(refresh, active.length ? 700 : 4000);
}

async function health() {
  try {
    const h = await (await fetch("/health")).json();
    const pill = $("health");
    pill.textContent = h.status === "ok" ? "ready" : h.status;
    pill.className = "pill " + (h.status === "ok" ? "ok" : h.status === "error" ? "bad" : "");
    if (h.status === "loading") setTimeout(health, 1000);
  } catch (_) {
    setTimeout(health, 3000);
  }
}

async function start() {
  try {
    state.facts = await (await api("/server")).json();
    setupForm(state.facts);
    $("keybar").hidden = true;
    refresh();
  } catch (err) {
    if (err.status !== 401) showError(err);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", submit);
  $("dice").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); };
  $("frame_num").addEventListener("input", showSeconds);
  $("extend").onclick = extendPrompt;
  $("savekey").onclick = () => {
    state.key = $("apikey").value.trim();
    sessionStorage.setItem("wanx-key", state.key);
    start();
  };
  health();
  start();
});
