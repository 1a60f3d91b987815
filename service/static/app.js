// VoxBox web UI: plain JS, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, models: [], ws: null, audioCtx: null, nextTime: 0, recorder: null, abort: null, pcm: [],
                voices: new Map(), cloning: false, previews: new Map(), previewAudio: null };
// Counters the browser tests read (times are performance.now() milliseconds).
// generateStartedAt/generateDoneAt: a Generate's click and its audio in hand; streamStartedAt/playStartAt: a
// Stream's click and the moment its first chunk is due to sound (playState: the AudioContext's state then).
window.voxbox = { chunksReceived: 0, streamDone: false, streamHeader: null, lastError: null, generations: 0,
                  firstChunkAt: null, doneAt: null, scheduledSeconds: 0, previews: 0, generateStartedAt: null,
                  generateDoneAt: null, streamStartedAt: null, playStartAt: null, playState: null };

// Every request URL is absolute, from location.origin and the page's directory (so a path prefix still
// works): a page opened as http://user:pass@host/ resolves relative URLs to ones carrying the
// credentials, and fetch() refuses those ("Request cannot be constructed from a URL that includes
// credentials"). The browser keeps sending the basic auth it logged in with, per origin.
const BASE = location.origin + location.pathname.replace(/[^/]*$/, "");
const url = (path) => BASE + path;

// The API names voices by id ("v_0123…"): say the name the user gave it.
function withVoiceNames(message) {
  return message.replace(/'?(v_[0-9a-f]{16})'?/g,
    (quoted, id) => (state.voices.has(id) ? `“${state.voices.get(id).name}”` : quoted));
}

function showError(message) {
  const box = $("error");
  box.textContent = message ? withVoiceNames(message) : "";
  box.hidden = !message;
  window.voxbox.lastError = message ? box.textContent : null;
}

async function api(path, options = {}) {
  const resp = await fetch(url(path), options);
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { const body = await resp.json(); if (body.error) message = body.error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

function limit() { return state.info ? state.info.limits.max_text_chars : null; }

function updateCounter() {
  const n = $("text").value.length;
  const max = limit();
  $("counter").textContent = max === null ? `${n} characters` : `${n} / ${max} characters`;
  // Over the limit the buttons would only earn an error: say so before (the counter is red, and why).
  $("counter").title = max !== null && n > max ? `The server takes at most ${max} characters per request.` : "";
  $("counter").classList.toggle("over", max !== null && n > max);
}

async function loadInfo() {
  try {
    // GET /v1/models says per model what it can do (supports_instructions; absent means no). Without it the
    // page still works, only with no instructions box: it is not a reason to call the server unreachable.
    const listed = api("v1/models").then((r) => r.json()).catch(() => ({ data: [] }));
    state.info = await (await api("info")).json();
    state.models = (await listed).data || [];
    const e = state.info.engine;
    $("status").textContent = `${e.name} on ${e.device} · ${state.info.phase}`;
    $("status").classList.toggle("ready", state.info.phase === "ready");
    const rates = $("rate");
    rates.innerHTML = "";
    for (const r of state.info.limits.sample_rates) {
      rates.add(new Option(`${r / 1000} kHz`, r, false, r === state.info.limits.default_sample_rate));
    }
    // Several models: a picker (GET /info lists them); the knobs, cloning and voices follow the one picked.
    const models = state.info.models || [];
    const picker = $("model");
    const keep = picker.value;
    picker.innerHTML = "";
    for (const m of models) picker.add(new Option(`${m.id} (${m.family}${m.default ? ", default" : ""})`, m.id));
    const fallback = models.find((m) => m.default);
    picker.value = models.some((m) => m.id === keep) ? keep : fallback ? fallback.id : "";
    $("model-field").hidden = models.length < 2;
    applyModel();
    updateCounter();
    showError("");
    return true;
  } catch (err) {
    $("status").textContent = "not reachable, retrying…";
    showError(`Cannot reach the server: ${err.message}`);
    return false;
  }
}

// The engine of the model requests go to: the picked one, else the worker's default.
function engine() {
  const m = (state.info.models || []).find((x) => x.id === $("model").value);
  return m ? m.engine : state.info.engine;
}

// The picked model's GET /v1/models entry (the default model's when there is no picker).
function modelEntry() {
  const id = $("model").value || ((state.info.models || []).find((m) => m.default) || {}).id;
  return state.models.find((m) => m.id === id) || state.models.find((m) => m.default) || {};
}

function applyModel() {
  const e = engine();
  // Instructions (style / voice design text) only where the model applies them; elsewhere the field would
  // promise what the engine ignores.
  $("instructions-field").hidden = modelEntry().supports_instructions !== true;
  const voxcpm = e.name.startsWith("voxcpm");  // VoxCPM-1.5 and VoxCPM2 take the same knobs
  document.querySelectorAll(".voxcpm").forEach((el) => {
    el.disabled = !voxcpm;
    el.closest("label").hidden = !voxcpm;
  });
  $("knobs-note").textContent = voxcpm ? "CFG and steps: empty means the server's default."
    : `CFG and diffusion steps are VoxCPM settings; this model runs the ${e.name} engine.`;
  const [lo, hi] = state.info.limits.voice_seconds;
  const mb = (state.info.limits.voice_max_bytes / 1048576).toFixed(0);
  state.cloning = e.supports_cloning;
  // An engine that cannot clone refuses every upload (400 cloning_not_supported): say so and the way
  // out before the user records or picks a clip, instead of failing after.
  $("upload-form").disabled = !state.cloning;
  $("voice-help").textContent = state.cloning
    ? `Upload a clean ${lo}–${hi} s clip of one speaker (at most ${mb} MB) and type exactly what they say. ` +
      "It becomes a voice you can pick above."
    : `The ${e.name} engine cannot clone voices, so uploads are off. To clone voices, deploy the VoxCPM ` +
      "engine (TTS_ENGINE=voxcpm with MODEL_URI naming its weights, or a VoxCPM entry in MODELS; see the README).";
}

function button(label, onclick, title = "") {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.title = title; b.onclick = onclick;
  return b;
}

async function loadVoices(select) {
  const body = await (await api("v1/voices")).json();
  // A voice is stored for one model family and only that family's engines use it, if they clone at all.
  const family = state.info ? engine().name : null;
  const usable = (v) => v.type === "preset" || (state.cloning && (!v.family || v.family === family));
  const sel = $("voice");
  const keep = select || sel.value;
  sel.innerHTML = "";
  const presets = document.createElement("optgroup"); presets.label = "Presets";
  const mine = document.createElement("optgroup");
  // Voices stored under an engine that could clone stay listed (to preview or delete them), but one this
  // engine cannot use is never selectable: picking it could only end in an error.
  mine.label = state.cloning ? "Uploaded" : "Uploaded (need the VoxCPM engine)";
  const list = $("voice-list");
  list.innerHTML = "";
  state.voices = new Map(body.voices.map((v) => [v.id, v]));
  for (const v of body.voices) {
    const opt = new Option(v.type === "preset" ? v.name : `${v.name} (${v.duration.toFixed(1)} s)`, v.id);
    if (v.type === "preset" && v.description) opt.title = v.description;
    opt.disabled = !usable(v);
    (v.type === "preset" ? presets : mine).appendChild(opt);
    if (v.type === "uploaded") {
      const li = document.createElement("li");
      li.textContent = `${v.name} — ${v.duration.toFixed(1)} s${usable(v) ? "" : ` (not usable by the ${family} engine)`} `;
      li.append(button("▶ Play", () => preview(v.id), "The uploaded reference clip"), button("Delete", async () => {
        try { await api(`v1/voices/${encodeURIComponent(v.id)}`, { method: "DELETE" }); await loadVoices(); }
        catch (err) { showError(err.message); }
      }));
      list.appendChild(li);
    }
  }
  sel.appendChild(presets);
  if (mine.children.length) sel.appendChild(mine);
  if (keep && [...sel.options].some((o) => o.value === keep && !o.disabled)) sel.value = keep;
  else sel.value = presets.children.length ? presets.children[0].value : "";
  describeVoice();
}

function describeVoice() {
  const v = state.voices.get($("voice").value);
  $("voice-note").textContent = !v ? "" : v.type === "preset" ? v.description || ""
    : `Cloned from your ${v.duration.toFixed(1)} s clip`;
}

// A preset has no stored audio: its sample is synthesised once (a short sentence) and kept for the page's
// life. An uploaded voice plays its reference clip (GET /v1/voices/{id}/audio).
async function preview(id = $("voice").value) {
  const v = state.voices.get(id);
  if (!v) return;
  showError("");
  try {
    let src = state.previews.get(id);
    if (!src) {
      const resp = v.type === "uploaded" ? await api(`v1/voices/${encodeURIComponent(id)}/audio`)
        : await api("v1/audio/speech", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ input: `Hello, this is the ${v.name} voice.`, voice: id, response_format: "wav" }) });
      src = URL.createObjectURL(await resp.blob());
      state.previews.set(id, src);
    }
    if (state.previewAudio) state.previewAudio.pause();
    state.previewAudio = window.voxboxPreview = new Audio(src);
    state.previewAudio.play().catch(() => { /* autoplay may be blocked; a second click plays */ });
    window.voxbox.previews += 1;
  } catch (err) {
    showError(`Preview of “${v.name}” failed: ${err.message}`);
  }
}

function requestBody() {
  const body = { input: $("text").value, voice: $("voice").value, speed: Number($("speed").value) || 1 };
  if ($("model").value) body.model = $("model").value;
  const instructions = $("instructions").value.trim();
  if (!$("instructions-field").hidden && instructions) body.instructions = instructions;
  // No rates listed means /info did not answer: let the server pick its default rather than send 0.
  if ($("rate").value) body.sample_rate = Number($("rate").value);
  if (!$("cfg").disabled && $("cfg").value) body.cfg_value = Number($("cfg").value);
  if (!$("steps").disabled && $("steps").value) body.inference_timesteps = Number($("steps").value);
  return body;
}

// History lives in localStorage as text and settings only: audio as base64 would fill its ~5 MB in a few
// WAV results (44.1 kHz is ~88 kB a second), and object URLs die with the page. Audio made in this page
// stays playable; an entry from an earlier visit is made again with ↻, with the settings it had.
const HISTORY_KEY = "voxbox.history.v1";
const HISTORY_MAX = 20;
const sessionAudio = new Map();  // history id -> {url, ext}

function loadHistory() {
  try {
    const items = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    // Whatever else is stored under the key (another version, a hand edit) must not break the page.
    const valid = (i) => i && typeof i.text === "string" && typeof i.id === "string" &&
      Number.isFinite(i.duration) && Number.isFinite(i.latency);
    return Array.isArray(items) ? items.filter(valid).slice(0, HISTORY_MAX) : [];
  } catch (_) { return []; }  // unreadable or storage disabled: start empty
}

function saveHistory(items) {
  try { localStorage.setItem(HISTORY_KEY, JSON.stringify(items.slice(0, HISTORY_MAX))); }
  catch (_) { /* full or disabled (private mode): the list still works for this page */ }
}

function addHistory(kind, settings, duration, latency, audioUrl, ext) {
  const voice = state.voices.get(settings.voice);
  const item = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, kind, ...settings,
                 voiceName: voice ? voice.name : settings.voice, duration, latency, at: new Date().toISOString() };
  if (audioUrl) sessionAudio.set(item.id, { url: audioUrl, ext });
  const items = [item, ...loadHistory()];
  for (const old of items.slice(HISTORY_MAX)) {
    const audio = sessionAudio.get(old.id);
    if (audio && audio.url !== $("player").src) URL.revokeObjectURL(audio.url);
    sessionAudio.delete(old.id);
  }
  saveHistory(items);
  renderHistory();
  window.voxbox.generations += 1;
}

function restoreSettings(item) {
  $("text").value = item.text;
  if (item.model && [...$("model").options].some((o) => o.value === item.model) && $("model").value !== item.model) {
    $("model").value = item.model;
    applyModel();
  }
  const option = [...$("voice").options].find((o) => o.value === item.voice && !o.disabled);
  if (option) { $("voice").value = item.voice; describeVoice(); }
  if (item.format) $("format").value = item.format;
  if ([...$("rate").options].some((o) => Number(o.value) === item.sample_rate)) $("rate").value = item.sample_rate;
  $("speed").value = item.speed || 1;
  showSpeed();
  $("instructions").value = item.instructions || "";
  $("cfg").value = item.cfg_value || "";
  $("steps").value = item.inference_timesteps || "";
  updateCounter();
}

function renderHistory() {
  const items = loadHistory();
  const list = $("history");
  list.innerHTML = "";
  $("recent").hidden = items.length === 0;
  for (const item of items) {
    const li = document.createElement("li");
    const snippet = item.text.length > 80 ? `${item.text.slice(0, 77)}…` : item.text;
    const meta = document.createElement("div");
    meta.className = "meta";
    const instructions = item.instructions ? ` · “${item.instructions.slice(0, 40)}${item.instructions.length > 40 ? "…" : ""}”` : "";
    meta.textContent = `${item.kind} · ${item.voiceName}${instructions} · ${item.duration.toFixed(2)} s of audio in ` +
      `${item.latency.toFixed(2)} s · ${new Date(item.at).toLocaleString()}`;
    const actions = document.createElement("div");
    actions.className = "actions";
    const audio = sessionAudio.get(item.id);
    if (audio) {
      const save = document.createElement("a");
      save.href = audio.url; save.download = `voxbox.${audio.ext}`; save.textContent = "Download";
      save.setAttribute("aria-label", `Download “${snippet}”`);
      const play = button("▶ Play", () => { showResult(audio.url, audio.ext, false); $("player").play().catch(() => {}); });
      play.setAttribute("aria-label", `Play “${snippet}”`);
      actions.append(play, save);
    }
    actions.append(button("↻ Regenerate", () => {
      if ($("generate").disabled) return;  // one request at a time, as with the form's own buttons
      restoreSettings(item);
      (item.kind === "Stream" ? stream : generate)();
    },
                          "Put this text and its settings back in the form and make it again"));
    const remove = button("Delete", () => deleteHistory(item.id), "Remove this entry from the history");
    remove.setAttribute("aria-label", `Delete “${snippet}” from the history`);
    remove.className = "link delete";
    actions.append(remove);
    li.append(`“${snippet}”`, meta, actions);
    list.append(li);
  }
}

function deleteHistory(id) {
  const audio = sessionAudio.get(id);
  if (audio && audio.url !== $("player").src) URL.revokeObjectURL(audio.url);
  sessionAudio.delete(id);
  saveHistory(loadHistory().filter((i) => i.id !== id));
  renderHistory();
}

function clearHistory() {
  for (const audio of sessionAudio.values()) if (audio.url !== $("player").src) URL.revokeObjectURL(audio.url);
  sessionAudio.clear();
  saveHistory([]);
  renderHistory();
}

// The result's waveform: its samples decoded once per result, drawn as bars; the played part in the accent
// colour, and a click seeks. A format the browser cannot decode leaves the player alone, which still works.
const wave = { data: null, url: null, peaks: null };

async function loadWaveform(audioUrl) {
  wave.url = audioUrl;
  wave.data = null;
  paintWaveform();
  try {
    const bytes = await (await fetch(audioUrl)).arrayBuffer();
    const audio = await new OfflineAudioContext(1, 1, 44100).decodeAudioData(bytes);
    if (wave.url === audioUrl) { wave.data = audio.getChannelData(0); wave.peaks = null; }  // unless a newer one came
  } catch (_) { /* undecodable here: no waveform */ }
  paintWaveform();
}

function paintWaveform() {
  const canvas = $("waveform");
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width) return;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  if (!wave.data) return;
  const css = getComputedStyle(document.documentElement);
  const [accent, rest] = [css.getPropertyValue("--accent"), css.getPropertyValue("--wave")];
  const player = $("player");
  const played = player.duration ? player.currentTime / player.duration : 0;
  const bars = Math.max(16, Math.floor(width / 4));
  // Peaks are computed once per result and width: playback repaints every frame.
  if (!wave.peaks || wave.peaks.length !== bars) {
    const step = wave.data.length / bars;
    wave.peaks = Array.from({ length: bars }, (_, b) => {
      let peak = 0;
      for (let i = Math.floor(b * step); i < Math.floor((b + 1) * step); i++) peak = Math.max(peak, Math.abs(wave.data[i]));
      return peak;
    });
  }
  const top = Math.max(...wave.peaks) || 1;
  wave.peaks.forEach((p, b) => {
    const h = Math.max(2, (p / top) * (height - 12));
    g.fillStyle = (b + 0.5) / bars <= played ? accent : rest;
    g.fillRect(b * 4 + 1, (height - h) / 2, 2, h);
  });
}

function followPlayback() {
  paintWaveform();
  if (!$("player").paused) requestAnimationFrame(followPlayback);
}

function showResult(audioUrl, ext, autoplay) {
  const player = $("player");
  player.src = audioUrl;
  $("download").href = audioUrl; $("download").download = `voxbox.${ext}`; $("download").hidden = false;
  $("result").hidden = false;
  loadWaveform(audioUrl);
  if (autoplay) player.play().catch(() => { /* autoplay may be blocked; the controls still work */ });
}

// After a failure the last audio must not stay under "Failed." as if it were the answer.
function clearResult(message) {
  wave.data = null;
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  player.load();
  $("download").hidden = true;
  $("download").removeAttribute("href");
  $("result").hidden = true;
  $("result-info").textContent = message;
}

async function generate() {
  showError("");
  const body = { ...requestBody(), response_format: $("format").value };
  setBusy(true, "generate");
  state.abort = new AbortController();
  $("result-info").textContent = "Generating…";
  const t0 = performance.now();
  Object.assign(window.voxbox, { generateStartedAt: t0, generateDoneAt: null });
  try {
    const resp = await api("v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: state.abort.signal });
    const blob = await resp.blob();
    window.voxbox.generateDoneAt = performance.now();
    const audioUrl = URL.createObjectURL(blob);
    const ext = body.response_format === "opus" ? "ogg" : body.response_format;
    const duration = Number(resp.headers.get("X-Audio-Duration")) || 0;
    const latency = (performance.now() - t0) / 1000;
    $("result-info").textContent = `${duration.toFixed(2)} s of audio · made in ${latency.toFixed(2)} s · ${resp.headers.get("X-Sample-Rate")} Hz`;
    addHistory("Generate", settingsOf(body), duration, latency, audioUrl, ext);
    showResult(audioUrl, ext, true);
  } catch (err) {
    if (err.name === "AbortError") clearResult("Stopped.");
    else { clearResult("Failed."); showError(err.message); }
  } finally {
    state.abort = null;
    setBusy(false);
  }
}

// What history keeps of a request: enough to make it again.
function settingsOf(body) {
  return { text: body.input, voice: body.voice, format: body.response_format || "wav", sample_rate: body.sample_rate,
           speed: body.speed, cfg_value: body.cfg_value, inference_timesteps: body.inference_timesteps,
           model: body.model, instructions: body.instructions };
}

// location.host never carries user:pass, so neither does this URL.
function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const base = location.pathname.replace(/[^/]*$/, "");
  return `${proto}//${location.host}${base}v1/stream`;
}

function playPcm(buf) {
  const ctx = state.audioCtx;
  const pcm = new Int16Array(buf);
  if (!pcm.length) return;
  const audio = ctx.createBuffer(1, pcm.length, state.rate);  // WebAudio resamples to the device rate
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(ctx.destination);
  state.nextTime = Math.max(state.nextTime, ctx.currentTime + 0.05);
  src.start(state.nextTime);
  if (window.voxbox.playStartAt === null) {
    window.voxbox.playStartAt = performance.now() + (state.nextTime - ctx.currentTime) * 1000;
    window.voxbox.playState = ctx.state;
  }
  state.nextTime += audio.duration;
  window.voxbox.scheduledSeconds += audio.duration;
}

// A WAV file (PCM16 mono) from the streamed chunks, so a stream can be replayed and downloaded.
function wavBlob(chunks, rate) {
  const size = chunks.reduce((n, c) => n + c.byteLength, 0);
  const head = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((ch, i) => head.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); head.setUint32(4, 36 + size, true); text(8, "WAVE"); text(12, "fmt ");
  head.setUint32(16, 16, true); head.setUint16(20, 1, true); head.setUint16(22, 1, true);
  head.setUint32(24, rate, true); head.setUint32(28, rate * 2, true); head.setUint16(32, 2, true);
  head.setUint16(34, 16, true); text(36, "data"); head.setUint32(40, size, true);
  return new Blob([head.buffer, ...chunks], { type: "audio/wav" });
}

// The WebSocket request for the form's settings (its field names are the HTTP API's, but `text`).
function streamRequest(body) {
  const req = { text: body.input, voice: body.voice, format: "pcm16", speed: body.speed };
  for (const key of ["model", "sample_rate", "cfg_value", "inference_timesteps", "instructions"]) {
    if (body[key]) req[key] = body[key];
  }
  return req;
}

function stream() {
  showError("");
  const body = requestBody();
  const req = streamRequest(body);
  Object.assign(window.voxbox, { chunksReceived: 0, streamDone: false, streamHeader: null, firstChunkAt: null,
                                 doneAt: null, scheduledSeconds: 0, streamStartedAt: performance.now(),
                                 playStartAt: null, playState: null });
  state.pcm = [];
  // Created in the click handler (a user gesture), so browsers let it play.
  if (state.audioCtx) state.audioCtx.close();
  state.audioCtx = new AudioContext();
  state.audioCtx.resume().catch(() => {});
  setBusy(true, "stream");
  $("result-info").textContent = "Connecting…";
  const t0 = performance.now();
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify(req));
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      window.voxbox.chunksReceived += 1;
      if (window.voxbox.firstChunkAt === null) window.voxbox.firstChunkAt = performance.now();
      state.pcm.push(ev.data);
      if (state.audioCtx) playPcm(ev.data);
      $("result-info").textContent = `Streaming… ${window.voxbox.chunksReceived} chunks`;
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "header") {
      window.voxbox.streamHeader = msg;
      state.rate = msg.sample_rate;
      state.nextTime = 0;
    } else if (msg.type === "done" || msg.type === "cancelled") {
      window.voxbox.doneAt = performance.now();
      window.voxbox.streamDone = true;
      const latency = (window.voxbox.doneAt - t0) / 1000;
      const rate = window.voxbox.streamHeader ? window.voxbox.streamHeader.sample_rate : req.sample_rate;
      const audioUrl = state.pcm.length ? URL.createObjectURL(wavBlob(state.pcm, rate)) : null;
      if (audioUrl) showResult(audioUrl, "wav", false);
      if (msg.type === "done") {
        $("result-info").textContent = `Streamed ${msg.duration.toFixed(2)} s of audio · first audio after ` +
          `${Number(msg.ttfa).toFixed(2)} s · done in ${latency.toFixed(2)} s`;
        addHistory("Stream", settingsOf({ ...body, response_format: "wav" }), msg.duration, latency, audioUrl, "wav");
      } else {
        $("result-info").textContent = `Stream stopped after ${window.voxbox.chunksReceived} chunks.`;
      }
      ws.close();
    } else if (msg.type === "error") {
      clearResult("Failed.");
      showError(msg.message);
      ws.close();
    }
  };
  ws.onerror = () => {
    clearResult("Failed.");
    showError("The streaming connection failed (is the server reachable, are you logged in?).");
  };
  ws.onclose = (ev) => {
    setBusy(false);
    state.ws = null;
    if (!window.voxbox.streamDone && !window.voxbox.lastError) {
      clearResult("Failed.");
      showError(`The streaming connection closed early (code ${ev.code}); try again.`);
    }
  };
}

function stop() {
  if (state.abort) state.abort.abort();
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "cancel" }));
  if (state.audioCtx) { state.audioCtx.close(); state.audioCtx = null; }
}

// One request at a time: while one runs, its button shows a spinner (same size, so nothing moves), the
// other is off and Stop is on.
function setBusy(busy, which = null) {
  for (const id of ["generate", "stream"]) {
    $(id).disabled = busy;
    $(id).setAttribute("aria-busy", String(busy && id === which));
  }
  $("stop").disabled = !busy;
}

async function uploadVoice(fileOverride) {
  showError("");
  const file = fileOverride || $("voice-file").files[0];
  if (!file) { showError("Choose a reference clip first."); return; }
  const form = new FormData();
  form.append("file", file, file.name || "recording.wav");
  form.append("name", $("voice-name").value || (file.name || "My voice").replace(/\.[^.]*$/, ""));
  form.append("text", $("voice-text").value);
  if ($("model").value) form.append("model", $("model").value);
  $("voice-msg").textContent = "Uploading…";
  let voice;
  try {
    voice = await (await api("v1/voices", { method: "POST", body: form })).json();
  } catch (err) {
    $("voice-msg").textContent = "";
    showError(`Upload failed: ${err.message}`);
    return;
  }
  resetUploadForm();
  // "Added" once the voice is in the picker and selected, not before: that is what the message promises.
  try { await loadVoices(voice.id); } catch (err) { showError(`The voice list did not refresh: ${err.message}`); }
  $("voice-msg").textContent = `Added “${voice.name}” (${voice.duration.toFixed(1)} s).`;
}

function resetUploadForm() {
  $("voice-name").value = "";
  $("voice-text").value = "";
  $("voice-file").value = "";
  showFileName();
}

function showFileName() {
  const file = $("voice-file").files[0];
  $("voice-file-name").textContent = file ? file.name : "No file chosen";
}

// Browsers record WebM/Ogg Opus, which the server's decoder may not read: decode here, upload a WAV.
async function recordingAsWav(blob) {
  const ctx = new AudioContext();
  try {
    const audio = await ctx.decodeAudioData(await blob.arrayBuffer());
    const pcm = new Int16Array(audio.length);
    for (let c = 0; c < audio.numberOfChannels; c++) {
      const data = audio.getChannelData(c);
      for (let i = 0; i < data.length; i++) pcm[i] += Math.round(Math.max(-1, Math.min(1, data[i])) * 32767 / audio.numberOfChannels);
    }
    return new File([wavBlob([pcm.buffer], audio.sampleRate)], "recording.wav", { type: "audio/wav" });
  } finally {
    ctx.close();
  }
}

async function toggleRecording() {
  if (state.recorder) { state.recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) { showError("This browser cannot record audio."); return; }
  try {
    const media = await navigator.mediaDevices.getUserMedia({ audio: true });
    const rec = new MediaRecorder(media);
    const parts = [];
    rec.ondataavailable = (e) => parts.push(e.data);
    rec.onstop = async () => {
      media.getTracks().forEach((t) => t.stop());
      state.recorder = null;
      $("record").textContent = "Record from microphone";
      try {
        await uploadVoice(await recordingAsWav(new Blob(parts, { type: rec.mimeType })));
      } catch (err) {
        showError(`The recording could not be read: ${err.message}`);
      }
    };
    rec.start();
    state.recorder = rec;
    $("record").textContent = "Stop recording and upload";
  } catch (err) {
    showError(`Microphone unavailable: ${err.message}`);
  }
}

function showSpeed() { $("speed-value").textContent = `${Number($("speed").value).toFixed(2)}×`; }

$("text").addEventListener("input", updateCounter);
$("speed").addEventListener("input", showSpeed);
$("player").addEventListener("play", followPlayback);
$("player").addEventListener("timeupdate", paintWaveform);
$("player").addEventListener("loadedmetadata", paintWaveform);
$("waveform").addEventListener("click", (ev) => {
  const player = $("player"), box = $("waveform").getBoundingClientRect();
  if (player.duration) { player.currentTime = player.duration * (ev.clientX - box.left) / box.width; paintWaveform(); }
});
window.addEventListener("resize", paintWaveform);
// A Mac's shortcut is ⌘+Enter: say that one there.
if (/Mac|iPhone|iPad/.test(navigator.platform)) $("limit-note").querySelector("kbd").textContent = "⌘";
// Ctrl/Cmd+Enter generates from anywhere in the form (the text, the instructions, a picker).
document.addEventListener("keydown", (ev) => {
  if (ev.target instanceof Element && ev.target.closest(".voices-card")) return;  // the upload form is not the request
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !$("generate").disabled) { ev.preventDefault(); generate(); }
  if (ev.key === "Escape" && !$("stop").disabled) { ev.preventDefault(); stop(); }  // as the Stop button
});
$("generate").addEventListener("click", generate);
$("stream").addEventListener("click", stream);
$("stop").addEventListener("click", stop);
$("upload").addEventListener("click", () => uploadVoice());
$("record").addEventListener("click", toggleRecording);
$("record").hidden = !(navigator.mediaDevices && window.MediaRecorder);
$("voice-file").addEventListener("change", showFileName);
$("preview").addEventListener("click", () => preview());
$("voice").addEventListener("change", describeVoice);
$("model").addEventListener("change", async () => {
  applyModel();
  try { await loadVoices(); } catch (err) { showError(err.message); }
});
$("clear-history").addEventListener("click", clearHistory);
renderHistory();

// The server may still be starting (or briefly away): keep asking instead of leaving empty lists.
async function start() {
  if (!(await loadInfo())) { setTimeout(start, 3000); return; }
  try { await loadVoices(); } catch (err) { showError(err.message); }
}
updateCounter();
showSpeed();
start();
