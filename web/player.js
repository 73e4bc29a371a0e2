// castmesh's player page: lists the live streams (/api/streams) and plays one with mpegts.js (HTTP-FLV,
// WebSocket-FLV), hls.js (HLS) or the browser's own WebRTC (WHEP: POST an offer to /{stream}/whep, DELETE
// the session it names when done). Lists what workers recorded (/api/recordings) and plays a recorded span
// as HLS VOD with hls.js. window.report says what the player did, for people and for tests.
"use strict";

const video = document.getElementById("video");
const table = document.getElementById("streams");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");
const nowPlaying = document.getElementById("now-playing");
let current = null;  // { path, protocol, destroy }
window.report = { protocol: null, stream: null, errors: [], warnings: [], supported: {} };

window.report.supported = {
  flv: typeof mpegts !== "undefined" && mpegts.isSupported(),
  hls: typeof Hls !== "undefined" && (Hls.isSupported() || !!video.canPlayType("application/vnd.apple.mpegurl")),
  webrtc: typeof RTCPeerConnection !== "undefined",
};
const NAMES = { flv: "HTTP-FLV", ws: "WebSocket-FLV", hls: "HLS", llhls: "LL-HLS", webrtc: "WebRTC (WHEP)" };
const latencyLine = document.getElementById("latency");

function protocol() {
  return document.querySelector("input[name=protocol]:checked").value;
}

function fail(message) {
  window.report.errors.push(message);
  errorLine.textContent = message;
  errorLine.hidden = false;
}

function stop() {
  if (current) current.destroy();
  current = null;
  errorLine.hidden = true;
  latencyLine.textContent = "";
}

// The live latency a player can measure: now minus the program date time (ingest's clock) of the frame on
// screen. hls.js knows the playhead's date from EXT-X-PROGRAM-DATE-TIME.
function showLatency(hls) {
  const timer = setInterval(() => {
    const date = hls.playingDate;
    if (!date) return;
    const seconds = (Date.now() - date.getTime()) / 1000;
    window.report.latency = seconds;
    window.report.edgeLatency = hls.latency;  // hls.js's own: how far behind the playlist's live edge
    window.report.targetLatency = hls.targetLatency;
    latencyLine.textContent = `latency ${seconds.toFixed(2)} s`;
  }, 500);
  return () => clearInterval(timer);
}

// A recorded span, as an HLS VOD playlist (/recordings/{app}/{stream}.m3u8?start=&end=).
function playRecording(path, span) {
  stop();
  window.report = { supported: window.report.supported, protocol: "vod", stream: path, recording: span,
                    errors: [], warnings: [] };
  const url = `${location.origin}/recordings/${path}.m3u8?start=${span.start}&end=${span.end}`;
  nowPlaying.textContent = `${path}, recorded ${when(span.start)}`;
  if (typeof Hls !== "undefined" && Hls.isSupported()) {
    const hls = new Hls();
    hls.on(Hls.Events.ERROR, (_, data) => {
      if (data.fatal) fail(`hls.js: ${data.type} ${data.details}`);
      else window.report.warnings.push(data.details);
    });
    hls.loadSource(url);
    hls.attachMedia(video);
    current = { path: null, protocol: "vod", destroy: () => hls.destroy() };
  } else {
    video.src = url;
    current = { path: null, protocol: "vod", destroy: () => video.removeAttribute("src") };
  }
  video.play().catch((e) => window.report.warnings.push(`play(): ${e.message}`));
}

function when(seconds) {
  return new Date(seconds * 1000).toLocaleString();
}

function renderRecordings(recordings) {
  const rows = [];
  for (const r of recordings) {
    const path = `${r.app}/${r.stream}`;
    for (const span of r.spans.slice().reverse()) {
      const row = document.createElement("tr");
      row.dataset.recording = path;
      const length = Math.round(span.end - span.start);
      const button = document.createElement("button");
      button.textContent = "Play";
      button.addEventListener("click", () => playRecording(path, span));
      const download = document.createElement("a");
      download.href = `/recordings/${path}.mp4?start=${span.start}&end=${span.end}`;
      download.textContent = "MP4";
      const actions = cell("");
      actions.append(button, " ", download);
      row.append(cell(path), cell(when(span.start)), cell(when(span.end)),
                 cell(`${Math.floor(length / 60)}:${String(length % 60).padStart(2, "0")}`), actions);
      rows.push(row);
    }
  }
  document.getElementById("recordings").replaceChildren(...rows);
}

async function refreshRecordings() {
  try {
    const response = await fetch("/api/recordings", { cache: "no-store" });
    if (response.ok) renderRecordings((await response.json()).recordings);
  } catch (e) { /* a node without recordings: the section stays empty */ }
}

function play(path, kind) {
  stop();
  window.report = { supported: window.report.supported, protocol: kind, stream: path, errors: [], warnings: [] };
  const base = `${location.origin}/${path}`;
  nowPlaying.textContent = `${path} over ${NAMES[kind]}`;
  if (kind === "webrtc") {
    if (!window.report.supported.webrtc) return fail("this browser has no WebRTC");
    current = whep(path, `${base}/whep`);
  } else if (kind === "hls" || kind === "llhls") {
    const url = kind === "llhls" ? `${base}.m3u8?format=llhls` : `${base}.m3u8`;
    if (typeof Hls !== "undefined" && Hls.isSupported()) {
      // LL-HLS: hls.js follows the parts, blocking reloads and preload hints, PART-HOLD-BACK behind the edge,
      // and plays up to 1.5x until it is there (it starts on a keyframe, up to a GOP behind). The back buffer
      // stays at hls.js's default (unbounded; Chrome evicts played media itself): a bounded one is flushed
      // after every segment, and in hls.js 1.7 a flush that lands between a part's load and its append drops
      // the segment being loaded, and it waits on that segment until it leaves the playlist: ~6 s frozen.
      const hls = new Hls(kind === "llhls" ? { lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.5 }
                                           : { liveSyncDurationCount: 3 });
      hls.on(Hls.Events.ERROR, (_, data) => {
        if (data.fatal) fail(`hls.js: ${data.type} ${data.details}`);
        else window.report.warnings.push(data.details);
      });
      hls.on(Hls.Events.MANIFEST_PARSED, () => showLevels(hls));
      hls.on(Hls.Events.LEVEL_SWITCHED, (_, data) => { window.report.level = data.level; });
      hls.loadSource(url);
      hls.attachMedia(video);
      const stopLatency = showLatency(hls);
      current = { path, protocol: kind, destroy: () => { stopLatency(); hideLevels(); hls.destroy(); } };
    } else {
      video.src = url;  // Safari plays HLS and LL-HLS natively
      current = { path, protocol: kind, destroy: () => video.removeAttribute("src") };
    }
  } else {
    if (!window.report.supported.flv) return fail("this browser has no MediaSource: FLV cannot play here");
    const url = kind === "ws" ? base.replace(/^http/, "ws") + ".flv" : `${base}.flv`;
    const player = mpegts.createPlayer({ type: "flv", isLive: true, url },
                                       { enableStashBuffer: false, liveBufferLatencyChasing: true });
    player.on(mpegts.Events.ERROR, (type, detail) => fail(`mpegts.js: ${type} ${detail}`));
    player.on(mpegts.Events.MEDIA_INFO, (info) => { window.report.mediaInfo = info; });
    player.attachMediaElement(video);
    player.load();
    current = { path, protocol: kind, destroy: () => { player.destroy(); } };
  }
  video.play().catch((e) => window.report.warnings.push(`play(): ${e.message}`));
  for (const row of table.rows) row.classList.toggle("selected", row.dataset.stream === path);
}

// WHEP (draft-ietf-wish-whep): receive-only audio and video, every ICE candidate in the offer (castmesh
// answers with all of its own, so nothing trickles), the session's URL from Location, DELETE to leave.
function whep(path, endpoint) {
  const pc = new RTCPeerConnection();
  const state = { path, protocol: "webrtc", session: null, timer: null };
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.ontrack = (event) => { stream.addTrack(event.track); video.srcObject = stream; };
  pc.onconnectionstatechange = () => {
    window.report.connectionState = pc.connectionState;
    if (pc.connectionState === "failed") fail("WebRTC: the connection failed");
  };
  state.destroy = () => {
    clearInterval(state.timer);
    pc.close();
    video.srcObject = null;
    if (state.session) fetch(state.session, { method: "DELETE" }).catch(() => {});
  };
  (async () => {
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {
      if (pc.iceGatheringState === "complete") return done();
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") done(); };
      setTimeout(done, 2000);  // enough candidates by then on any network worth waiting for
    });
    const response = await fetch(endpoint, { method: "POST", headers: { "Content-Type": "application/sdp" },
                                             body: pc.localDescription.sdp });
    const body = await response.text();
    if (response.status !== 201) {
      let detail = body;
      try { detail = JSON.parse(body).detail; } catch (e) { /* a plain-text error */ }
      return fail(`WHEP: ${response.status} ${detail}`);
    }
    state.session = new URL(response.headers.get("Location"), endpoint).href;
    await pc.setRemoteDescription({ type: "answer", sdp: body });
    state.timer = setInterval(async () => {  // what arrives and is decoded, as getStats sees it
      const stats = {};
      const report = await pc.getStats();
      report.forEach((s) => {
        if (s.type === "inbound-rtp") {
          const codec = s.codecId && report.get(s.codecId);
          stats[s.kind] = { packets: s.packetsReceived, lost: s.packetsLost, bytes: s.bytesReceived,
                            framesDecoded: s.framesDecoded, samples: s.totalSamplesReceived,
                            concealed: s.concealedSamples, codec: codec ? codec.mimeType : s.codecId };
        }
      });
      window.report.stats = stats;
    }, 500);
  })().catch((e) => fail(`WHEP: ${e.message}`));
  return state;
}

// A stream with an ABR ladder: its renditions (the multivariant playlist's), to pick one or let hls.js choose.
const quality = document.getElementById("quality");
function showLevels(hls) {
  const levels = hls.levels.map((level, index) => ({ index, level }));
  const auto = new Option("auto", "-1", true, true);
  quality.replaceChildren(auto, ...levels.map(({ index, level }) =>
    new Option(`${level.height}p${level.bitrate ? ` (${Math.round(level.bitrate / 1000)} kb/s)` : ""}`, String(index))));
  quality.onchange = () => { hls.currentLevel = Number(quality.value); };
  quality.parentElement.hidden = levels.length < 2;
  window.report.levels = hls.levels.map((level) => [level.width, level.height]);
}
function hideLevels() { quality.parentElement.hidden = true; }

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

// A stream's latest keyframe (made by a worker while the page asks), a new one every few seconds.
function thumbnail(s) {
  const td = document.createElement("td");
  if (!s.video) return td;
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "";
  img.width = 96;
  img.src = `/${s.path}.jpg?t=${Math.floor(Date.now() / 5000)}`;
  img.addEventListener("error", () => { img.hidden = true; });
  td.append(img);
  return td;
}

function render(streams) {
  table.replaceChildren(...streams.map((s) => {
    const row = document.createElement("tr");
    row.dataset.stream = s.path;
    row.append(thumbnail(s), cell(s.path + (s.publishing ? "" : " (reconnecting)")), cell(s.video || "–"), cell(s.audio || "–"),
               cell(s.width ? `${s.width}×${s.height}${s.fps ? ` @ ${Math.round(s.fps)}` : ""}` : "–"),
               cell(`${s.bitrate_kbps} kb/s`), cell(String(s.viewers)));
    row.classList.toggle("selected", current !== null && current.path === s.path);
    row.addEventListener("click", () => play(s.path, protocol()));
    return row;
  }));
  statusLine.textContent = `${streams.length} live stream${streams.length === 1 ? "" : "s"}`;
}

async function refresh() {
  try {
    const response = await fetch("/api/streams", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    render((await response.json()).streams);
  } catch (e) {
    statusLine.textContent = `cannot list streams: ${e.message}`;
  }
}

document.getElementById("protocol").addEventListener("change", () => {
  if (current) play(current.path, protocol());
});
refresh();
setInterval(refresh, 2000);
refreshRecordings();
setInterval(refreshRecordings, 10000);
