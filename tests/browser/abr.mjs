// The player page plays a stream with an ABR ladder over HLS in headless Chromium: hls.js reads the
// multivariant playlist, and the page's quality menu switches rendition, lowest then highest; prints what
// the <video> showed after each switch. Usage: node abr.mjs PAGE_URL STREAM_PATH
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
const result = { consoleErrors: [], switches: [] };
try {
  const page = await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") result.consoleErrors.push(msg.text()); });
  await page.goto(pageUrl);
  await page.check("input[name=protocol][value=hls]");
  const row = page.locator(`tr[data-stream="${stream}"]`);
  await row.waitFor({ timeout: 15000 });
  await row.click();
  await page.waitForFunction(() => document.getElementById("video").currentTime > 0.5, null, { timeout: 30000 });
  result.levels = await page.evaluate(() => window.report.levels);
  const options = await page.locator("#quality option").evaluateAll((os) => os.map((o) => [o.value, o.text]));
  result.menu = options.map(([, text]) => text);
  const size = () => page.evaluate(() => {
    const v = document.getElementById("video");
    return { width: v.videoWidth, height: v.videoHeight, t: v.currentTime };
  });
  const heights = result.levels.map(([, h]) => h);
  const lowest = heights.indexOf(Math.min(...heights));
  const highest = heights.indexOf(Math.max(...heights));
  for (const level of [lowest, highest]) {
    await page.selectOption("#quality", String(level));
    const [w, h] = result.levels[level];
    const switched = await page.waitForFunction(([width, height]) => {
      const v = document.getElementById("video");
      return v.videoWidth === width && v.videoHeight === height;
    }, [w, h], { timeout: 30000 }).then(() => true, () => false);
    const before = await size();
    await page.waitForTimeout(1500);
    const after = await size();
    result.switches.push({ level, wanted: [w, h], switched, size: [after.width, after.height],
                           played: after.t - before.t, hlsLevel: await page.evaluate(() => window.report.level) });
  }
  result.errors = await page.evaluate(() => window.report.errors);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
