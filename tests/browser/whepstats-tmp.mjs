import { chromium } from "playwright-core";
const [url, seconds] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"] });
const page = await browser.newPage();
page.on("console", (m) => console.error("console:", m.type(), m.text()));
await page.goto(new URL("/", url).href);
const out = await page.evaluate(async ([url, seconds]) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((r) => { if (pc.iceGatheringState === "complete") r(); pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && r(); setTimeout(r, 2000); });
  const res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp });
  const answer = await res.text();
  if (res.status !== 201) return { status: res.status, answer };
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const stats = [];
  (await pc.getStats()).forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") stats.push(s); if (s.type === "codec") stats.push(s); });
  return { status: res.status, stats, offer: pc.localDescription.sdp.split("\r\n").filter(l => /VP9|AV1|H265|rtpmap/.test(l)).slice(0, 30) };
}, [url, Number(seconds)]);
console.log(JSON.stringify(out, null, 1));
await browser.close();
