// castmesh's player page: lists the live streams (/api/streams) and plays one with mpegts.js (HTTP-FLV,
// WebSocket-FLV) or hls.js (HLS). window.report says what the player did, for people and for tests.
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
};

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
}

function play(path, kind) {
  stop();
  window.report = { supported: window.report.supported, protocol: kind, stream: path, errors: [], warnings: [] };
  const base = `${location.origin}/${path}`;
  nowPlaying.textContent = `${path} over ${kind === "hls" ? "HLS" : kind === "ws" ? "WebSocket-FLV" : "HTTP-FLV"}`;
  if (kind === "hls") {
    if (typeof Hls !== "undefined" && Hls.isSupported()) {
      const hls = new Hls({ liveSyncDurationCount: 3 });
      hls.on(Hls.Events.ERROR, (_, data) => {
        if (data.fatal) fail(`hls.js: ${data.type} ${data.details}`);
        else window.report.warnings.push(data.details);
      });
      hls.loadSource(`${base}.m3u8`);
      hls.attachMedia(video);
      current = { path, protocol: kind, destroy: () => hls.destroy() };
    } else {
      video.src = `${base}.m3u8`;  // Safari plays HLS natively
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

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function render(streams) {
  table.replaceChildren(...streams.map((s) => {
    const row = document.createElement("tr");
    row.dataset.stream = s.path;
    row.append(cell(s.path + (s.publishing ? "" : " (reconnecting)")), cell(s.video || "–"), cell(s.audio || "–"),
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
