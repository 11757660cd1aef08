// The streamssm browser client (served at / and /ui by `streamssm serve`): the microphone
// (through an AudioWorklet) or a file -> one protocol v1 stream at the browser's own sample rate
// (the server resamples to the model's) -> a live plot of the per-sample results: surprisal
// (LM), forecast (regression) or class probabilities (classifier). What was sent and received
// stays on window.streamssm; its dump() gives it as base64 float32 (read by tests).
import { Plot } from "./plot.js";
import { Stream } from "./stream.js";
import { floatsBase64 } from "./wire.js";

const $ = (id) => document.getElementById(id);
const CHUNK_SECONDS = 0.02; // 20 ms frames
const SENSOR_FRAME_ROWS = 64; // rows per frame of a sensor file without a sample rate
const DNA_FRAME_BASES = 256;
const PLOT_SECONDS = 10; // seconds of a live microphone's results the plot spans
const LN2 = Math.log(2);
const sleep = (ms) => new Promise((wake) => setTimeout(wake, ms));

const app = {
  status: "idle", info: null, ready: null, summary: null, error: null, rate: null, pongs: 0,
  sent: [], results: [], stream: null, plot: null, view: null, paused: false, finishing: false,
  stop: () => {}, cleanup: () => {}, dump,
};
window.streamssm = app;

function setStatus(status, detail = "") {
  app.status = status;
  $("status").textContent = detail ? `${status}: ${detail}` : status;
  const live = status === "streaming" || status === "paused";
  $("pause").disabled = !live;
  $("stop").disabled = !live;
  $("mic").disabled = $("play").disabled = live || status === "connecting" || status === "ending";
  $("pause").textContent = status === "paused" ? "Resume" : "Pause";
}

/** What was sent (base64 float32, or the bases) and every result, for tests. */
function dump() {
  const rs = app.results;
  const numeric = app.info?.modality !== "dna";
  return {
    status: app.status, error: app.error, rate: app.rate, ready: app.ready, summary: app.summary, pongs: app.pongs,
    chunks: app.sent.map((c) => c.length), sent: numeric ? floatsBase64(app.sent) : app.sent.join(""),
    seqs: rs.map((r) => r.seq), starts: rs.map((r) => r.start), ns: rs.map((r) => r.n), o: rs.length ? rs[0].o : 0,
    scores: floatsBase64(rs.filter((r) => r.scores).map((r) => r.scores)),
    outputs: floatsBase64(rs.filter((r) => r.outputs).map((r) => r.outputs)),
  };
}

async function loadInfo(token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(new URL("model.json", import.meta.url), { headers });
  if (response.status === 401) throw new Error("the server wants a bearer token (or this one is wrong): fill in Token");
  if (!response.ok) throw new Error(`model.json: HTTP ${response.status}`);
  return response.json();
}

/** How a model's results are drawn: series names, unit, y range, which result fields to ask for,
 * and result -> n*k values (k series per sample). */
function viewOf(info) {
  if (info.head === "lm") {
    return { names: ["surprisal"], unit: "bits", range: null, include: ["scores"],
             values: (r) => r.scores.map((s) => -s / LN2) };
  }
  if (info.head === "classifier") {
    return { names: info.classes.length ? info.classes : info.output_names, unit: "p", range: [0, 1],
             include: ["outputs"], values: (r) => r.outputs };
  }
  const k = Math.max(1, Math.round(info.output_dim / info.horizon)); // forecast channels; first horizon step drawn
  const firstStep = (r) => {
    const out = new Float32Array(r.n * k);
    for (let i = 0; i < r.n; i++) out.set(r.outputs.subarray(i * r.o, i * r.o + k), i * k);
    return out;
  };
  return { names: info.output_names.slice(0, k), unit: "forecast", range: null, include: ["outputs"], values: firstStep };
}

function onResult(r) {
  app.results.push(r);
  app.plot.push(app.view.values(r), r.n);
  if (app.info.head === "classifier" && r.n) {
    const row = r.outputs.subarray((r.n - 1) * r.o, r.n * r.o);
    const best = row.indexOf(Math.max(...row));
    $("label").textContent = `label: ${app.view.names[best]} (p = ${row[best].toFixed(3)})`;
  }
}

function onEvent(msg) {
  if (msg.type === "pong") app.pongs++;
}

function onClosed(code, why) {
  if (why && !app.error) fail(new Error(why));
}

function fail(err) {
  app.error = err.message;
  app.cleanup();
  app.stream = null;
  setStatus("error", err.message);
}

/** Open the stream (start -> ready); the plot spans `shown` result samples. */
async function openStream(token, fields, shown) {
  const info = app.info;
  app.view = viewOf(info);
  const start = { type: "start", version: 1, ...fields, results: "binary", include: app.view.include };
  app.stream = new Stream(token, start, { result: onResult, event: onEvent, closed: onClosed }, info.idle_timeout);
  app.ready = await app.stream.open();
  app.plot = new Plot($("plot"), app.view.names, { shown, unit: app.view.unit, range: app.view.range });
  return app.stream;
}

async function finish() {
  if (app.finishing) return;
  app.finishing = true;
  app.cleanup();
  setStatus("ending");
  try {
    app.summary = await app.stream.end();
    app.plot.draw();
    const s = app.summary;
    setStatus("done", `${s.samples} samples in ${s.chunks} chunks` + (s.bits_per_token !== undefined ? `, ${s.bits_per_token.toFixed(3)} bits/sample` : ""));
  } catch (err) {
    fail(err);
  }
}

async function beginAudio(token, kind, seconds) {
  const ctx = new AudioContext(); // the browser's own rate: the server resamples
  const stops = [() => ctx.close()];
  app.cleanup = () => stops.splice(0).forEach((f) => f());
  app.rate = ctx.sampleRate;
  await ctx.audioWorklet.addModule(new URL("worklet.js", import.meta.url));
  const chunk = Math.max(1, Math.round(ctx.sampleRate * CHUNK_SECONDS));
  const capture = new AudioWorkletNode(ctx, "streamssm-capture", { processorOptions: { chunk } });
  const mute = ctx.createGain();
  mute.gain.value = 0; // the worklet must reach the destination to run; silently
  capture.connect(mute).connect(ctx.destination);
  let source;
  if (kind === "mic") {
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    stops.unshift(() => media.getTracks().forEach((t) => t.stop()));
    source = ctx.createMediaStreamSource(media);
  } else {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a file first");
    source = ctx.createBufferSource();
    source.buffer = await ctx.decodeAudioData(await file.arrayBuffer()); // at the context's rate
    source.connect(ctx.destination); // heard while it streams
    capture.port.postMessage({ expect: source.buffer.length }); // the worklet finishes after the file's last sample
  }
  const span = Math.min(seconds, kind === "mic" ? PLOT_SECONDS : source.buffer.duration);
  const shown = Math.max(1, Math.round(span * app.info.sample_rate)); // results come at the model's rate
  const stream = await openStream(token, { format: "f32le", sample_rate: ctx.sampleRate, channels: 1 }, shown);
  const limit = Number.isFinite(seconds) ? Math.round(seconds * ctx.sampleRate) : Infinity;
  let total = 0;
  capture.port.onmessage = (event) => {
    if (app.finishing) return;
    const last = !(event.data instanceof Float32Array);
    let samples = last ? event.data.last : event.data;
    if (!app.paused) {
      samples = samples.subarray(0, Math.min(samples.length, limit - total));
      if (samples.length) {
        total += samples.length;
        app.sent.push(samples);
        stream.send(samples);
      }
    }
    if (last || total >= limit) finish();
  };
  app.stop = () => capture.port.postMessage("flush"); // the buffered tail, then finish
  source.connect(capture);
  if (kind === "file") source.start();
  setStatus("streaming", `${kind === "mic" ? "microphone" : "file"} at ${ctx.sampleRate} Hz`);
}

/** Sensor CSV rows (comma, semicolon, tab or space separated; a header line is skipped). */
function parseRows(text, channels) {
  const rows = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    const values = line.trim().split(/[,;\t ]+/).map(Number);
    if (values.some(Number.isNaN)) {
      if (i === 0) return;
      throw new Error(`line ${i + 1} is not all numbers: ${line.slice(0, 60)}`);
    }
    if (values.length !== channels) throw new Error(`line ${i + 1} has ${values.length} values; the model reads ${channels} channels`);
    rows.push(values);
  });
  return rows;
}

async function beginFile(token, seconds) {
  const info = app.info;
  const file = $("file").files[0];
  if (!file) throw new Error("choose a file first");
  const text = await file.text();
  let frames, fields;
  if (info.modality === "dna") {
    const bases = text.split(/\r?\n/).filter((l) => !l.startsWith(">")).join("").replace(/\s+/g, "");
    frames = [];
    for (let i = 0; i < bases.length; i += DNA_FRAME_BASES) frames.push(bases.slice(i, i + DNA_FRAME_BASES));
    fields = { format: "text" };
  } else {
    const rows = parseRows(text, info.channels);
    const limit = Number.isFinite(seconds) && info.sample_rate ? Math.round(seconds * info.sample_rate) : rows.length;
    const per = info.sample_rate ? Math.max(1, Math.round(info.sample_rate * CHUNK_SECONDS)) : SENSOR_FRAME_ROWS;
    frames = [];
    for (let i = 0; i < Math.min(limit, rows.length); i += per) frames.push(Float32Array.from(rows.slice(i, Math.min(i + per, limit)).flat()));
    fields = { format: "f32le", channels: info.channels, ...(info.sample_rate ? { sample_rate: info.sample_rate } : {}) };
  }
  app.rate = info.sample_rate;
  const shown = frames.reduce((total, f) => total + f.length, 0) / (info.modality === "dna" ? 1 : info.channels);
  const stream = await openStream(token, fields, Math.max(1, shown));
  let stopped = false;
  app.stop = () => (stopped = true);
  setStatus("streaming", `${file.name}: ${frames.length} frames` + (info.sample_rate ? " in real time" : ""));
  for (const frame of frames) {
    while (app.paused && !stopped) await sleep(100);
    await stream.window();
    if (stopped || !stream.isOpen) break;
    app.sent.push(frame);
    stream.send(frame);
    if (info.sample_rate) await sleep(CHUNK_SECONDS * 1000); // replayed at the recording's pace
  }
  if (stream.isOpen) finish();
}

async function begin(kind) {
  Object.assign(app, { info: null, ready: null, summary: null, error: null, rate: null, pongs: 0, sent: [], results: [],
                       paused: false, finishing: false, stop: () => {}, cleanup: () => {} });
  $("label").textContent = "";
  setStatus("connecting");
  try {
    const token = $("token").value;
    app.info = await loadInfo(token);
    const info = app.info;
    $("model").textContent = `model: ${info.modality} ${info.head}` + (info.sample_rate ? ` at ${info.sample_rate} Hz` : "");
    const seconds = $("seconds").value ? Number($("seconds").value) : Infinity;
    if (info.modality === "audio") await beginAudio(token, kind, seconds);
    else if (kind === "file") await beginFile(token, seconds);
    else throw new Error(`a ${info.modality} model streams a file (CSV rows for a sensor model, bases for DNA)`);
  } catch (err) {
    fail(err);
  }
}

function togglePause() {
  app.paused = !app.paused;
  app.stream.pause(app.paused);
  setStatus(app.paused ? "paused" : "streaming", app.paused ? `pinging every ${(app.stream.pingMs / 1000).toFixed(1)} s` : "");
}

$("mic").addEventListener("click", () => begin("mic"));
$("play").addEventListener("click", () => begin("file"));
$("pause").addEventListener("click", togglePause);
$("stop").addEventListener("click", () => app.stop());
setInterval(() => app.plot?.draw(), 100);
setStatus("idle");
