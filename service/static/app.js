// VoxBox web UI: plain JS, relative URLs only (works behind the gateway's basic auth).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, ws: null, audioCtx: null, nextTime: 0, streaming: false, recorder: null };
// Counters the browser tests read.
window.voxbox = { chunksReceived: 0, streamDone: false, streamHeader: null, lastError: null, generations: 0 };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
  window.voxbox.lastError = message || null;
}

async function api(path, options = {}) {
  const resp = await fetch(path, options);
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { const body = await resp.json(); if (body.error) message = body.error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

function limit() { return state.info ? state.info.limits.max_text_chars : 0; }

function updateCounter() {
  const n = $("text").value.length;
  $("counter").textContent = `${n} / ${limit()} characters`;
  $("counter").classList.toggle("over", n > limit());
}

async function loadInfo() {
  try {
    state.info = await (await api("info")).json();
    const e = state.info.engine;
    $("status").textContent = `${e.name} on ${e.device} · ${state.info.phase}`;
    $("status").classList.toggle("ready", state.info.phase === "ready");
    const rates = $("rate");
    rates.innerHTML = "";
    for (const r of state.info.limits.sample_rates) {
      rates.add(new Option(`${r / 1000} kHz`, r, false, r === state.info.limits.default_sample_rate));
    }
    const voxcpm = e.name === "voxcpm";
    document.querySelectorAll(".voxcpm").forEach((el) => { el.disabled = !voxcpm; });
    $("knobs-note").textContent = voxcpm ? "" : "CFG and steps apply to the VoxCPM engine only.";
    updateCounter();
  } catch (err) {
    $("status").textContent = "not reachable";
    showError(`Cannot reach the server: ${err.message}`);
  }
}

async function loadVoices(select) {
  const body = await (await api("v1/voices")).json();
  const sel = $("voice");
  const keep = select || sel.value;
  sel.innerHTML = "";
  const presets = document.createElement("optgroup"); presets.label = "Presets";
  const mine = document.createElement("optgroup"); mine.label = "Uploaded";
  const list = $("voice-list");
  list.innerHTML = "";
  for (const v of body.voices) {
    const opt = new Option(v.type === "preset" ? v.name : `${v.name} (${v.duration.toFixed(1)} s)`, v.id);
    (v.type === "preset" ? presets : mine).appendChild(opt);
    if (v.type === "uploaded") {
      const li = document.createElement("li");
      li.textContent = `${v.name} — ${v.duration.toFixed(1)} s `;
      const del = document.createElement("button");
      del.textContent = "Delete";
      del.onclick = async () => {
        try { await api(`v1/voices/${encodeURIComponent(v.id)}`, { method: "DELETE" }); await loadVoices(); }
        catch (err) { showError(err.message); }
      };
      li.appendChild(del);
      list.appendChild(li);
    }
  }
  sel.appendChild(presets);
  if (mine.children.length) sel.appendChild(mine);
  if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

function requestBody() {
  const body = { input: $("text").value, voice: $("voice").value, sample_rate: Number($("rate").value),
                 speed: Number($("speed").value) || 1 };
  if (!$("cfg").disabled && $("cfg").value) body.cfg_value = Number($("cfg").value);
  if (!$("steps").disabled && $("steps").value) body.inference_timesteps = Number($("steps").value);
  return body;
}

function addHistory(kind, text, duration, latency) {
  const li = document.createElement("li");
  const snippet = text.length > 60 ? `${text.slice(0, 57)}…` : text;
  li.textContent = `${kind}: “${snippet}” — ${duration.toFixed(2)} s of audio in ${latency.toFixed(2)} s`;
  $("history").prepend(li);
  while ($("history").children.length > 10) $("history").lastChild.remove();
  window.voxbox.generations += 1;
}

async function generate() {
  showError("");
  const body = { ...requestBody(), response_format: $("format").value };
  setBusy(true);
  const t0 = performance.now();
  try {
    const resp = await api("v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const player = $("player");
    player.src = url;
    const ext = body.response_format === "opus" ? "ogg" : body.response_format;
    $("download").href = url; $("download").download = `voxbox.${ext}`; $("download").hidden = false;
    const duration = Number(resp.headers.get("X-Audio-Duration")) || 0;
    const latency = (performance.now() - t0) / 1000;
    $("result-info").textContent = `${duration.toFixed(2)} s of audio · ${latency.toFixed(2)} s · ${resp.headers.get("X-Sample-Rate")} Hz`;
    addHistory("Generate", body.input, duration, latency);
    player.play().catch(() => { /* autoplay may be blocked; the controls still work */ });
  } catch (err) {
    showError(err.message);
  } finally {
    setBusy(false);
  }
}

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const base = location.pathname.replace(/[^/]*$/, "");
  return `${proto}//${location.host}${base}v1/stream`;
}

function playPcm(buf) {
  const ctx = state.audioCtx;
  const pcm = new Int16Array(buf);
  if (!pcm.length) return;
  const audio = ctx.createBuffer(1, pcm.length, ctx.sampleRate);
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(ctx.destination);
  state.nextTime = Math.max(state.nextTime, ctx.currentTime + 0.05);
  src.start(state.nextTime);
  state.nextTime += audio.duration;
}

function stream() {
  showError("");
  const body = requestBody();
  const req = { text: body.input, voice: body.voice, format: "pcm16", sample_rate: body.sample_rate, speed: body.speed };
  if (body.cfg_value) req.cfg_value = body.cfg_value;
  if (body.inference_timesteps) req.inference_timesteps = body.inference_timesteps;
  Object.assign(window.voxbox, { chunksReceived: 0, streamDone: false, streamHeader: null });
  setBusy(true, true);
  const t0 = performance.now();
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify(req));
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") {
      window.voxbox.chunksReceived += 1;
      playPcm(ev.data);
      $("result-info").textContent = `Streaming… ${window.voxbox.chunksReceived} chunks`;
      return;
    }
    const msg = JSON.parse(ev.data);
    if (msg.type === "header") {
      window.voxbox.streamHeader = msg;
      if (state.audioCtx) state.audioCtx.close();
      state.audioCtx = new AudioContext({ sampleRate: msg.sample_rate });
      state.nextTime = 0;
    } else if (msg.type === "done" || msg.type === "cancelled") {
      window.voxbox.streamDone = true;
      const latency = (performance.now() - t0) / 1000;
      if (msg.type === "done") {
        $("result-info").textContent = `Streamed ${msg.duration.toFixed(2)} s of audio · first audio after ${Number(msg.ttfa).toFixed(2)} s`;
        addHistory("Stream", req.text, msg.duration, latency);
      } else {
        $("result-info").textContent = "Stream stopped.";
      }
      ws.close();
    } else if (msg.type === "error") {
      showError(msg.message);
      ws.close();
    }
  };
  ws.onerror = () => showError("The streaming connection failed (is the server reachable, are you logged in?).");
  ws.onclose = () => { setBusy(false); state.ws = null; };
}

function stop() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "cancel" }));
  if (state.audioCtx) { state.audioCtx.close(); state.audioCtx = null; }
}

function setBusy(busy, streaming = false) {
  $("generate").disabled = busy;
  $("stream").disabled = busy;
  $("stop").disabled = !(busy && streaming);
}

async function uploadVoice(fileOverride) {
  showError("");
  const file = fileOverride || $("voice-file").files[0];
  if (!file) { showError("Choose a reference clip first."); return; }
  const form = new FormData();
  form.append("file", file, file.name || "recording.webm");
  form.append("name", $("voice-name").value || (file.name || "My voice").replace(/\.[^.]*$/, ""));
  form.append("text", $("voice-text").value);
  try {
    const voice = await (await api("v1/voices", { method: "POST", body: form })).json();
    $("voice-msg").textContent = `Added “${voice.name}” (${voice.duration.toFixed(1)} s).`;
    await loadVoices(voice.id);
  } catch (err) {
    showError(`Upload failed: ${err.message}`);
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
    rec.onstop = () => {
      media.getTracks().forEach((t) => t.stop());
      state.recorder = null;
      $("record").textContent = "Record from microphone";
      const type = rec.mimeType.includes("ogg") ? "ogg" : "webm";
      uploadVoice(new File(parts, `recording.${type}`, { type: rec.mimeType }));
    };
    rec.start();
    state.recorder = rec;
    $("record").textContent = "Stop recording and upload";
  } catch (err) {
    showError(`Microphone unavailable: ${err.message}`);
  }
}

$("text").addEventListener("input", updateCounter);
$("generate").addEventListener("click", generate);
$("stream").addEventListener("click", stream);
$("stop").addEventListener("click", stop);
$("upload").addEventListener("click", () => uploadVoice());
$("record").addEventListener("click", toggleRecording);
loadInfo().then(() => loadVoices()).catch((err) => showError(err.message));
