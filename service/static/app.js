// VoxBox web UI: plain JS, relative URLs only (works behind the gateway's basic auth).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, ws: null, audioCtx: null, nextTime: 0, recorder: null, abort: null, pcm: [] };
// Counters the browser tests read (times are performance.now() milliseconds).
window.voxbox = { chunksReceived: 0, streamDone: false, streamHeader: null, lastError: null, generations: 0,
                  firstChunkAt: null, doneAt: null, scheduledSeconds: 0 };

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
    document.querySelectorAll(".voxcpm").forEach((el) => {
      el.disabled = !voxcpm;
      el.closest("label").hidden = !voxcpm;
    });
    $("knobs-note").textContent = voxcpm ? "CFG and steps: empty means the server's default."
      : "CFG and diffusion steps are VoxCPM settings; this server runs the embedded engine.";
    const [lo, hi] = state.info.limits.voice_seconds;
    const mb = (state.info.limits.voice_max_bytes / 1048576).toFixed(0);
    $("voice-help").textContent = `Upload a clean ${lo}–${hi} s clip of one speaker (at most ${mb} MB) and type ` +
      "exactly what they say. It becomes a voice you can pick above." +
      (e.supports_cloning ? "" : " This server's engine cannot clone voices: uploads are refused until it " +
       "runs VoxCPM.");
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

function addHistory(kind, text, duration, latency, url, ext) {
  const li = document.createElement("li");
  const snippet = text.length > 60 ? `${text.slice(0, 57)}…` : text;
  li.textContent = `${kind}: “${snippet}” — ${duration.toFixed(2)} s of audio in ${latency.toFixed(2)} s `;
  if (url) {
    const play = document.createElement("a");
    play.href = url; play.textContent = "play";
    play.onclick = (ev) => { ev.preventDefault(); showResult(url, ext, false); $("player").play().catch(() => {}); };
    const save = document.createElement("a");
    save.href = url; save.download = `voxbox.${ext}`; save.textContent = "download";
    li.append(play, " · ", save);
  }
  $("history").prepend(li);
  while ($("history").children.length > 10) {
    const old = $("history").lastChild;
    const link = old.querySelector("a");
    if (link && link.href !== $("player").src) URL.revokeObjectURL(link.href);
    old.remove();
  }
  window.voxbox.generations += 1;
}

function showResult(url, ext, autoplay) {
  const player = $("player");
  player.src = url;
  $("download").href = url; $("download").download = `voxbox.${ext}`; $("download").hidden = false;
  if (autoplay) player.play().catch(() => { /* autoplay may be blocked; the controls still work */ });
}

async function generate() {
  showError("");
  const body = { ...requestBody(), response_format: $("format").value };
  setBusy(true, true);
  state.abort = new AbortController();
  $("result-info").textContent = "Generating…";
  const t0 = performance.now();
  try {
    const resp = await api("v1/audio/speech", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: state.abort.signal });
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const ext = body.response_format === "opus" ? "ogg" : body.response_format;
    const duration = Number(resp.headers.get("X-Audio-Duration")) || 0;
    const latency = (performance.now() - t0) / 1000;
    $("result-info").textContent = `${duration.toFixed(2)} s of audio · made in ${latency.toFixed(2)} s · ${resp.headers.get("X-Sample-Rate")} Hz`;
    addHistory("Generate", body.input, duration, latency, url, ext);
    showResult(url, ext, true);
  } catch (err) {
    if (err.name === "AbortError") $("result-info").textContent = "Stopped.";
    else { $("result-info").textContent = "Failed."; showError(err.message); }
  } finally {
    state.abort = null;
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
  const audio = ctx.createBuffer(1, pcm.length, state.rate);  // WebAudio resamples to the device rate
  const ch = audio.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = ctx.createBufferSource();
  src.buffer = audio;
  src.connect(ctx.destination);
  state.nextTime = Math.max(state.nextTime, ctx.currentTime + 0.05);
  src.start(state.nextTime);
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

function stream() {
  showError("");
  const body = requestBody();
  const req = { text: body.input, voice: body.voice, format: "pcm16", sample_rate: body.sample_rate, speed: body.speed };
  if (body.cfg_value) req.cfg_value = body.cfg_value;
  if (body.inference_timesteps) req.inference_timesteps = body.inference_timesteps;
  Object.assign(window.voxbox, { chunksReceived: 0, streamDone: false, streamHeader: null, firstChunkAt: null,
                                 doneAt: null, scheduledSeconds: 0 });
  state.pcm = [];
  // Created in the click handler (a user gesture), so browsers let it play.
  if (state.audioCtx) state.audioCtx.close();
  state.audioCtx = new AudioContext();
  state.audioCtx.resume().catch(() => {});
  setBusy(true, true);
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
      const url = state.pcm.length ? URL.createObjectURL(wavBlob(state.pcm, rate)) : null;
      if (url) showResult(url, "wav", false);
      if (msg.type === "done") {
        $("result-info").textContent = `Streamed ${msg.duration.toFixed(2)} s of audio · first audio after ` +
          `${Number(msg.ttfa).toFixed(2)} s · done in ${latency.toFixed(2)} s`;
        addHistory("Stream", req.text, msg.duration, latency, url, "wav");
      } else {
        $("result-info").textContent = `Stream stopped after ${window.voxbox.chunksReceived} chunks.`;
      }
      ws.close();
    } else if (msg.type === "error") {
      $("result-info").textContent = "Failed.";
      showError(msg.message);
      ws.close();
    }
  };
  ws.onerror = () => showError("The streaming connection failed (is the server reachable, are you logged in?).");
  ws.onclose = (ev) => {
    setBusy(false);
    state.ws = null;
    if (!window.voxbox.streamDone && !window.voxbox.lastError) {
      showError(`The streaming connection closed early (code ${ev.code}); try again.`);
    }
  };
}

function stop() {
  if (state.abort) state.abort.abort();
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
  form.append("file", file, file.name || "recording.wav");
  form.append("name", $("voice-name").value || (file.name || "My voice").replace(/\.[^.]*$/, ""));
  form.append("text", $("voice-text").value);
  $("voice-msg").textContent = "Uploading…";
  try {
    const voice = await (await api("v1/voices", { method: "POST", body: form })).json();
    $("voice-msg").textContent = `Added “${voice.name}” (${voice.duration.toFixed(1)} s).`;
    await loadVoices(voice.id);
  } catch (err) {
    $("voice-msg").textContent = "";
    showError(`Upload failed: ${err.message}`);
  }
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

$("text").addEventListener("input", updateCounter);
$("text").addEventListener("keydown", (ev) => {  // Ctrl/Cmd+Enter: Generate
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !$("generate").disabled) { ev.preventDefault(); generate(); }
});
$("generate").addEventListener("click", generate);
$("stream").addEventListener("click", stream);
$("stop").addEventListener("click", stop);
$("upload").addEventListener("click", () => uploadVoice());
$("record").addEventListener("click", toggleRecording);
$("record").hidden = !(navigator.mediaDevices && window.MediaRecorder);
loadInfo().then(() => loadVoices()).catch((err) => showError(err.message));
