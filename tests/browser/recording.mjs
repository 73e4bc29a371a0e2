// The player page lists a stream's recordings and plays one in headless Chromium: hls.js reads the VOD
// playlist (byte ranges of the recorded fMP4 files). Prints what the <video> did.
// Usage: node recording.mjs PAGE_URL STREAM_PATH
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [pageUrl, stream] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "castmesh-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
const result = { consoleErrors: [] };
try {
  const page = await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") result.consoleErrors.push(msg.text()); });
  await page.goto(pageUrl);
  const row = page.locator(`tr[data-recording="${stream}"]`).first();
  await row.waitFor({ timeout: 20000 });
  result.rows = await page.locator(`tr[data-recording="${stream}"]`).count();
  result.download = await row.locator("a").getAttribute("href");
  await row.locator("button").click();
  await page.waitForFunction(() => document.getElementById("video").currentTime > 3, null, { timeout: 30000 });
  result.state = await page.evaluate(() => {
    const v = document.getElementById("video");
    return { duration: v.duration, currentTime: v.currentTime, width: v.videoWidth, height: v.videoHeight,
             report: window.report };
  });
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
