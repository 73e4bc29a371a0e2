// Drive Debian's headless Chromium with playwright-core: open a test page, let the player run, and print
// what the <video> element did as JSON. Usage: node play.mjs PAGE_URL SECONDS
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [pageUrl, secondsArg] = process.argv.slice(2);
const seconds = Number(secondsArg || "6");
const profile = mkdtempSync(join(tmpdir(), "castmesh-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
try {
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (msg) => { if (msg.type() === "error") consoleErrors.push(msg.text()); });
  await page.goto(pageUrl);
  const sample = () => page.evaluate(() => {
    const v = document.getElementById("video");
    return { t: v.currentTime, width: v.videoWidth, height: v.videoHeight, paused: v.paused,
             audioBytes: v.webkitAudioDecodedByteCount || 0, videoBytes: v.webkitVideoDecodedByteCount || 0,
             frames: v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality().totalVideoFrames : 0 };
  });
  await page.waitForTimeout(2000);  // start-up: connect, first keyframe, MSE buffer
  const first = await sample();
  const started = Date.now();
  await page.waitForTimeout(seconds * 1000);
  const last = await sample();
  const report = await page.evaluate(() => window.report);
  console.log(JSON.stringify({ first, last, wall: (Date.now() - started) / 1000, report, consoleErrors }));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
