// rollcast web page: start a text or webcam stream over WebRTC, steer its prompt live over the
// `control` data channel, show what the stream is doing. State is exposed on `window.rollcast`
// so automated browser tests can read it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  sessionId: null, pc: null, dc: null, camera: null, t0: 0,
  framesDecoded: 0, ttffMs: null, fpsTarget: 16, intervals: [], lastFrameT: null,
  acks: [], errors: [], serverStats: null, stopped: null, msgId: 0,
};
window.rollcast = state;

function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const retry = res.headers.get("Retry-After");
    throw new Error(`${data.error || res.status}: ${data.message || res.statusText}` +
                    (retry ? ` (retry in ${retry} s)` : ""));
  }
  return { status: res.status, data };
}

function setStatus(text) { $("status").textContent = text; }

function send(message) {
  if (!state.dc || state.dc.readyState !== "open") return false;
  message.id = ++state.msgId;
  state.dc.send(JSON.stringify(message));
  return true;
}

function onControl(event) {
  const m = JSON.parse(event.data);
  if (m.type === "ack") {
    state.acks.push(m);
    if (m.applied_at_frame !== undefined) $("s-ack").textContent = m.applied_at_frame;
    log(`ack ${m.for}` + (m.applied_at_frame !== undefined ? ` from frame ${m.applied_at_frame}` : ""));
  } else if (m.type === "error") {
    state.errors.push(m);
    log(`error ${m.error}: ${m.message}`);
  } else if (m.type === "stats") {
    state.serverStats = m;
    state.fpsTarget = m.fps_target || state.fpsTarget;
    $("s-steps").textContent = m.steps;
    $("s-freezes").textContent = m.freezes;
  } else if (m.type === "degraded" || m.type === "recovered") {
    log(`${m.type}: ${m.what} ${m.old} → ${m.new}`);
  } else if (m.type === "stream_stopped") {
    state.stopped = m;
    log(`stream stopped: ${m.reason}`);
    finish(`stopped (${m.reason})`);
  }
}

function watchFrames(video) {
  if (!("requestVideoFrameCallback" in video)) return;
  const onFrame = (now, meta) => {
    if (state.ttffMs === null) {
      state.ttffMs = now - state.t0;
      $("s-ttff").textContent = `${state.ttffMs.toFixed(0)} ms`;
      setStatus("live");
    }
    if (state.lastFrameT !== null) {
      state.intervals.push(now - state.lastFrameT);
      if (state.intervals.length > 256) state.intervals.shift();
    }
    state.lastFrameT = now;
    if (state.pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function jitterP99() {
  const period = 1000 / state.fpsTarget;
  const dev = state.intervals.map((x) => Math.abs(x - period)).sort((a, b) => a - b);
  return dev.length ? dev[Math.min(dev.length - 1, Math.floor(0.99 * dev.length))] : null;
}

async function pollStats() {
  while (state.pc) {
    const report = await state.pc.getStats();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        state.framesDecoded = s.framesDecoded || 0;
        $("s-decoded").textContent = state.framesDecoded;
        $("s-dropped").textContent = s.framesDropped || 0;
        if (s.framesPerSecond !== undefined) $("s-fps").textContent = s.framesPerSecond.toFixed(1);
      }
    });
    const j = jitterP99();
    if (j !== null) $("s-jitter").textContent = `${j.toFixed(1)} ms`;
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function gatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

async function start() {
  $("start").disabled = true;
  Object.assign(state, { framesDecoded: 0, ttffMs: null, intervals: [], lastFrameT: null, acks: [],
                         errors: [], stopped: null });
  const mode = document.querySelector("input[name=mode]:checked").value;
  const steps = $("steps").value ? Number($("steps").value) : undefined;
  state.t0 = performance.now();
  try {
    setStatus("requesting");
    const created = await api("POST", "/v1/sessions", { mode, prompt: $("prompt").value, steps });
    state.sessionId = created.data.session_id;
    state.fpsTarget = created.data.fps;
    log(created.status === 202 ? `queued at position ${created.data.queue_position}`
                               : `session ${state.sessionId} admitted`);
    setStatus(created.status === 202 ? `queued (#${created.data.queue_position})` : "connecting");
    const pc = new RTCPeerConnection();
    state.pc = pc;
    state.dc = pc.createDataChannel("control");
    state.dc.onmessage = onControl;
    if (mode === "v2v") {
      state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
      $("camera").srcObject = state.camera;
      state.camera.getVideoTracks().forEach((t) => pc.addTrack(t, state.camera));
    } else {
      pc.addTransceiver("video", { direction: "recvonly" });
    }
    pc.ontrack = (ev) => {
      const video = $("video");
      video.srcObject = new MediaStream([ev.track]);
      watchFrames(video);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") finish("connection failed");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, 2000);
    const answer = await api("POST", `/v1/sessions/${state.sessionId}/offer`,
                             { sdp: pc.localDescription.sdp, type: "offer" });
    await pc.setRemoteDescription({ sdp: answer.data.sdp, type: "answer" });
    $("stop").disabled = false;
    pollStats();
  } catch (err) {
    log(String(err.message || err));
    finish("error");
  }
}

function finish(status) {
  if (state.pc) state.pc.close();
  state.pc = null;
  state.dc = null;
  if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
  state.camera = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  setStatus(status);
}

async function stop() {
  const id = state.sessionId;
  finish("stopped");
  if (id) await api("DELETE", `/v1/sessions/${id}`).catch((e) => log(String(e.message || e)));
}

let promptTimer = null;
function promptChanged() {
  clearTimeout(promptTimer);
  promptTimer = setTimeout(() => {
    const blocks = Number($("transition").value) || 0;
    send({ type: "params.update", params: { prompt: $("prompt").value, transition_blocks: blocks } });
  }, 300);
}

$("start").onclick = start;
$("stop").onclick = stop;
$("prompt").addEventListener("input", promptChanged);
$("steps").addEventListener("change", () => {
  if ($("steps").value) send({ type: "params.update", params: { steps: Number($("steps").value) } });
});
$("apikey").value = localStorage.getItem("rollcast.apikey") || "";
$("apikey").addEventListener("change", () => localStorage.setItem("rollcast.apikey", $("apikey").value));
fetch("/v1/models", { headers: headers() }).then((r) => r.json()).then((d) => {
  const m = d.models && d.models[0];
  if (m) $("model").textContent = `${m.id} · ${m.resolution} · ${m.fps} fps · ${m.max_steps} steps`;
}).catch(() => {});
