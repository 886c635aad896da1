// The page: connects to the agent, streams the mic up, plays the agent's voice, shows the conversation.
// Plain ES module, no dependencies; the server is the only thing it talks to.

const STAGES = [
  ["endpoint", "endpoint", "#90a4ae"], ["asr_final", "asr", "#42a5f5"], ["llm_first_token", "llm 1st token", "#ab47bc"],
  ["first_sentence", "1st sentence", "#ffa726"], ["first_tts_chunk", "1st tts chunk", "#ef5350"],
  ["first_sample_played", "1st sample played", "#66bb6a"],
];
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token") || "";
const state = { status: "idle", micSamples: 0, playedSamples: 0, turns: [], transcripts: [], replyText: "", bundle: null };
window.voiceAgent = state;  // for tests and the curious

let ws = null, micContext = null, playerContext = null, player = null, stream = null;
let duplexTouched = false;
const playedBase = new Map();  // utterance id -> samples already counted

function setStatus(text) {
  state.status = text;
  $("status").textContent = text;
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

async function start() {
  $("start").disabled = true;
  for (const input of document.querySelectorAll('input[name="mode"]')) input.disabled = true;
  setStatus("connecting");
  ws = new WebSocket(`ws://${location.host}/ws?token=${encodeURIComponent(token)}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => send({ type: "hello", mode: mode(), full_duplex: $("full-duplex").checked });
  ws.onmessage = (event) => (typeof event.data === "string" ? onMessage(JSON.parse(event.data)) : onAudio(event.data));
  ws.onclose = (event) => {
    setStatus(`closed${event.reason ? ": " + event.reason : ""} (${event.code})`);
    stopAudio();
    $("stop").disabled = true;
    $("talk").disabled = true;
  };
  $("stop").disabled = false;
}

async function startAudio(msg) {
  playerContext = new AudioContext({ sampleRate: msg.sample_rate, latencyHint: "interactive" });
  await playerContext.audioWorklet.addModule("/static/player-worklet.js");
  player = new AudioWorkletNode(playerContext, "player", {
    numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { jitterSamples: Math.round(msg.sample_rate * 0.12) },
  });
  player.connect(playerContext.destination);
  player.port.onmessage = (event) => {
    const { id, played, final } = event.data;
    const before = playedBase.get(id) || 0;
    state.playedSamples += Math.max(0, played - before);
    playedBase.set(id, Math.max(before, played));
    $("played").textContent = String(state.playedSamples);
    send({ type: "played", id, samples: played, final });
  };

  stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  });
  const settings = stream.getAudioTracks()[0].getSettings();
  if (!duplexTouched && settings.echoCancellation) {
    $("full-duplex").checked = true;  // the browser cancels the agent's voice: let the user interrupt
  }
  send({ type: "duplex", full: $("full-duplex").checked, echo_cancellation: Boolean(settings.echoCancellation) });
  micContext = new AudioContext({ sampleRate: msg.mic_rate });
  await micContext.audioWorklet.addModule("/static/mic-worklet.js");
  const mic = new AudioWorkletNode(micContext, "mic-frames");
  mic.port.onmessage = (event) => {
    if (event.data.pcm) {
      if (ws && ws.readyState === WebSocket.OPEN) {
        ws.send(event.data.pcm);
        state.micSamples += event.data.pcm.byteLength / 2;
      }
    } else {
      $("level").style.width = `${Math.min(100, 300 * event.data.level)}%`;
    }
  };
  const silent = micContext.createGain();
  silent.gain.value = 0;  // the worklet must be pulled by the graph to run; nothing is heard
  micContext.createMediaStreamSource(stream).connect(mic).connect(silent).connect(micContext.destination);
  await Promise.all([micContext.resume(), playerContext.resume()]);
  setStatus(msg.mode === "push-to-talk" ? "ready: hold the button or the space bar to talk" : "listening");
  state.ready = true;
}

function stopAudio() {
  if (stream) stream.getTracks().forEach((track) => track.stop());
  if (micContext) micContext.close();
  if (playerContext) playerContext.close();
  stream = micContext = playerContext = player = null;
}

function onAudio(buffer) {
  if (!player) return;
  const id = new DataView(buffer).getUint32(0, true);
  const pcm = new Int16Array(buffer, 4);
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  player.port.postMessage({ type: "audio", id, samples }, [samples.buffer]);
}

function onMessage(msg) {
  switch (msg.type) {
    case "busy": setStatus(`busy: ${msg.message}`); break;
    case "loading": setStatus("loading the models..."); break;
    case "ready":
      $("untrained").hidden = !msg.tts.untrained;
      $("tts-describe").textContent = msg.tts.describe;
      if (msg.bundle) {
        state.bundle = msg.bundle;
        $("bundle").href = msg.bundle;
        $("bundle").hidden = false;
      }
      $("talk").disabled = msg.mode !== "push-to-talk";
      startAudio(msg).catch((err) => { setStatus(`microphone: ${err}`); ws.close(); });
      break;
    case "utterance": case "end": case "clear":
      if (player) player.port.postMessage(msg);
      break;
    case "speech": $("vad").textContent = msg.on ? "speaking" : ""; $("vad").className = msg.on ? "on" : ""; break;
    case "listening": setStatus(msg.on ? "listening" : "agent speaking (mic muted: half duplex)"); break;
    case "transcript":
      state.transcripts.push(msg.text);
      $("heard").textContent = msg.text || "(no words)";
      break;
    case "reply_start": state.replyText = ""; $("reply").textContent = ""; break;
    case "reply":
      state.replyText += msg.text;
      $("reply").textContent = state.replyText;
      break;
    case "echo": $("heard").innerHTML = ""; $("heard").append(echoNote(msg.text)); break;
    case "withdrawn":  // the user went on speaking: the turn continues, its reply so far is dropped
      state.transcripts.pop(); state.replyText = ""; $("reply").textContent = ""; $("heard").textContent = "";
      break;
    case "turn": addTurn(msg); break;
    case "error": setStatus(`error: ${msg.message}`); break;
  }
}

function echoNote(text) {
  const span = document.createElement("span");
  span.className = "echo";
  span.textContent = `(ignored: the agent's own voice, "${text}")`;
  return span;
}

function addTurn(turn) {
  state.turns.push(turn);
  const li = document.createElement("li");
  const you = document.createElement("div");
  you.className = "you";
  you.textContent = `you: ${turn.transcript}`;
  const agent = document.createElement("div");
  agent.className = "agent";
  agent.textContent = `agent: ${turn.reply}`;
  li.append(you, agent);
  if (turn.interrupted) {
    const note = document.createElement("span");
    note.className = "interrupted";
    note.textContent = " [interrupted]";
    agent.append(note);
  }
  $("turns").append(li);
  $("heard").textContent = "";
  $("reply").textContent = "";
  drawLatency();
}

function drawLatency() {
  const rows = state.turns.map((t) => t.waterfall);
  const longest = Math.max(1, ...rows.map((w) => Math.max(...STAGES.map(([k]) => w[k] || 0))));
  const box = $("latency");
  box.replaceChildren();
  rows.forEach((w, index) => {
    const bar = document.createElement("div");
    bar.className = "bar";
    const label = document.createElement("span");
    label.textContent = `turn ${index}`;
    const track = document.createElement("div");
    track.className = "track";
    let from = 0;
    for (const [key, name, color] of STAGES) {
      if (!(key in w)) continue;
      const seg = document.createElement("div");
      seg.className = "seg";
      seg.style.left = `${(100 * from) / longest}%`;
      seg.style.width = `${(100 * Math.max(0, w[key] - from)) / longest}%`;
      seg.style.background = color;
      seg.title = `${name}: ${Math.round(w[key])} ms`;
      track.append(seg);
      from = Math.max(from, w[key]);
    }
    const total = document.createElement("span");
    total.className = "total";
    total.textContent = `${Math.round(from)} ms`;
    bar.append(label, track, total);
    box.append(bar);
  });
  if (!$("legend").childElementCount) {
    for (const [, name, color] of STAGES) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = color;
      item.append(swatch, name);
      $("legend").append(item);
    }
  }
}

function talk(down) {
  if ($("talk").disabled || $("talk").classList.contains("down") === down) return;
  $("talk").classList.toggle("down", down);
  send({ type: "key", down });
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => ws && ws.close(1000, "stopped by the user"));
$("full-duplex").addEventListener("change", () => {
  duplexTouched = true;
  send({ type: "duplex", full: $("full-duplex").checked });
});
$("talk").addEventListener("pointerdown", () => talk(true));
$("talk").addEventListener("pointerup", () => talk(false));
$("talk").addEventListener("pointerleave", () => talk(false));
document.addEventListener("keydown", (event) => {
  if (event.code === "Space" && !event.repeat && !$("talk").disabled) { event.preventDefault(); talk(true); }
});
document.addEventListener("keyup", (event) => {
  if (event.code === "Space" && !$("talk").disabled) { event.preventDefault(); talk(false); }
});
