// Publish from headless Chromium over WHIP, as a browser publisher does: Chromium's fake camera and
// microphone (a test pattern and a beep) through getUserMedia, one offer with every candidate gathered,
// POSTed to the WHIP endpoint; after SECONDS, DELETE on the session. Prints one JSON object: the HTTP
// statuses, the codecs the browser sent and how many packets of each kind went out.
// Usage: node whip.mjs PAGE_URL WHIP_URL SECONDS
import { chromium } from "playwright-core";

const [pageUrl, whipUrl, secondsArg] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("console", (msg) => { if (msg.type() === "error") errors.push(msg.text()); });
  await page.goto(pageUrl);  // the same origin as the endpoint
  const result = await page.evaluate(async ([url, seconds]) => {
    const media = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: true });
    const pc = new RTCPeerConnection();
    for (const track of media.getTracks()) pc.addTransceiver(track, { direction: "sendonly" });
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {
      if (pc.iceGatheringState === "complete") return done();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
      setTimeout(done, 3000);
    });
    const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/sdp" },
                                        body: pc.localDescription.sdp });
    const answer = await response.text();
    if (response.status !== 201) return { status: response.status, answer };
    const session = new URL(response.headers.get("Location"), url).href;
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    await new Promise((done) => setTimeout(done, seconds * 1000));
    const state = pc.connectionState;
    const report = await pc.getStats();
    const sent = {};
    report.forEach((s) => {
      if (s.type === "outbound-rtp") {
        const codec = s.codecId && report.get(s.codecId);
        sent[s.kind] = { packets: s.packetsSent, codec: codec ? codec.mimeType : "" };
      }
    });
    const deleted = (await fetch(session, { method: "DELETE" })).status;
    pc.close();
    return { status: response.status, state, sent, deleted };
  }, [whipUrl, Number(secondsArg || "10")]);
  result.consoleErrors = errors;
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
