// Drive castmesh's own player page in Debian's headless Chromium with playwright-core, as a person would:
// wait for the stream in the list, click it, watch; then switch the protocol and watch again. Prints one
// JSON object with what the <video> element did in each phase, and saves a screenshot per phase.
// Usage: node page.mjs PAGE_URL STREAM_PATH SCREENSHOT_PREFIX SECONDS PROTOCOL...
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [pageUrl, stream, shots, secondsArg, ...protocols] = process.argv.slice(2);
const seconds = Number(secondsArg || "5");
const profile = mkdtempSync(join(tmpdir(), "castmesh-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 900 },
  ignoreHTTPSErrors: pageUrl.startsWith("https:"),  // the tests' self-signed certificate
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
const result = { phases: [], consoleErrors: [], requests: [], failures: [] };
try {
  const page = await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") result.consoleErrors.push(msg.text()); });
  page.on("request", (req) => result.requests.push(new URL(req.url()).host));
  page.on("response", (res) => { if (res.status() >= 400) result.failures.push(`${res.status()} ${res.url()}`); });
  await page.goto(pageUrl);
  const row = page.locator(`tr[data-stream="${stream}"]`);
  await row.waitFor({ timeout: 15000 });
  result.row = await row.innerText();
  // the row's thumbnail: the stream's latest keyframe as a JPEG, loaded (refreshed renders replace it)
  await page.waitForFunction((path) => {
    const img = document.querySelector(`tr[data-stream="${path}"] img.thumb`);
    return img !== null && img.complete && img.naturalWidth > 0;
  }, stream, { timeout: 15000 });
  result.thumb = await row.locator("img.thumb").evaluate((img) => [img.naturalWidth, img.naturalHeight]);
  const sample = () => page.evaluate(() => {
    const v = document.getElementById("video");
    return { t: v.currentTime, width: v.videoWidth, height: v.videoHeight, paused: v.paused,
             audioBytes: v.webkitAudioDecodedByteCount || 0,
             frames: v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality().totalVideoFrames : 0,
             stats: (window.report && window.report.stats) || null };  // WebRTC: getStats' inbound-rtp
  });
  for (const [index, protocol] of protocols.entries()) {
    await page.check(`input[name=protocol][value=${protocol}]`);
    if (index === 0) await row.click();  // later switches replay the current stream by themselves
    // start-up: connect, first keyframe, MSE buffer (HLS needs its playlist and first segments); WebRTC:
    // both tracks in getStats (polled every 0.5 s; audio's inbound-rtp appears with its first packet, which
    // can come a poll after video's: waiting for any stats at all let a sample miss the audio)
    await page.waitForFunction(() => document.getElementById("video").currentTime > 0.2
                                     && (window.report.protocol !== "webrtc"
                                         || (window.report.stats && window.report.stats.audio
                                             && window.report.stats.video)), null,
                               { timeout: 20000 }).catch(() => {});
    const first = await sample();
    const started = Date.now();
    await page.waitForTimeout(seconds * 1000);
    const last = await sample();
    const wall = (Date.now() - started) / 1000;
    await page.screenshot({ path: `${shots}-${protocol}.png` });
    const report = await page.evaluate(() => window.report);
    result.phases.push({ protocol, first, last, wall, report });
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
