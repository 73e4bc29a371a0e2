// The live latency castmesh's player page measures (now minus the program date time of the frame on
// screen), sampled every half second while headless Chromium plays a stream over one protocol.
// Usage: node latency.mjs PAGE_URL STREAM_PATH PROTOCOL SECONDS   -> one JSON object on stdout
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [pageUrl, stream, protocol, secondsArg] = process.argv.slice(2);
const seconds = Number(secondsArg || "20");
const profile = mkdtempSync(join(tmpdir(), "castmesh-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  ignoreHTTPSErrors: pageUrl.startsWith("https:"),
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
const result = { samples: [], stalls: 0, errors: [] };
try {
  const page = await context.newPage();
  const began = Date.now();
  result.requests = [];
  page.on("requestfinished", async (req) => {
    const res = await req.response();
    const t = req.timing();
    result.requests.push([((Date.now() - began) / 1000).toFixed(2), res ? res.status() : 0,
                          Math.round(t.responseEnd), req.url().replace(/^.*\/live\//, "")]);
  });
  page.on("requestfailed", (req) => result.requests.push([((Date.now() - began) / 1000).toFixed(2), "failed",
                                                          req.failure() && req.failure().errorText, req.url()]));
  await page.goto(pageUrl);
  const row = page.locator(`tr[data-stream="${stream}"]`);
  await row.waitFor({ timeout: 15000 });
  await page.check(`input[name=protocol][value=${protocol}]`);
  await row.click();
  await page.waitForFunction(() => document.getElementById("video").currentTime > 0.5
                                   && window.report.latency !== undefined, null, { timeout: 30000 });
  await page.waitForTimeout(3000);  // let the player settle at its hold-back
  let last = await page.evaluate(() => document.getElementById("video").currentTime);
  for (let i = 0; i < seconds * 2; i++) {
    await page.waitForTimeout(500);
    const now = await page.evaluate(() => ({ latency: window.report.latency, t: document.getElementById("video").currentTime,
                                             edge: window.report.edgeLatency, target: window.report.targetLatency,
                                             errors: window.report.errors, warnings: window.report.warnings }));
    result.samples.push({ latency: now.latency, edge: now.edge, target: now.target });
    if (now.t <= last) result.stalls += 1;
    last = now.t;
    result.errors = now.errors;
    result.warnings = now.warnings;
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
