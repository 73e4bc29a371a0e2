"""ABR ladders made by the worker in `castmesh up`: ffmpeg publishes a 320x180 stream, the rule for its app
makes a 180p and a 90p (15 fps) rendition (and skips a 720p one: a ladder never upscales). Each rendition
decodes at its size, keyframes fall at the same timestamps in every rendition and the source, and the
multivariant playlist lists them with their attributes; LL-HLS media playlists carry rendition reports;
hls.js plays the ladder and switches rendition. Ladders through the API; bad input: a rule that cannot be
met, a source that changes its picture size, a source without video."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.integration.harness import FFMPEG, http_get, publish, start_up, wait_live, watch_in_background

LADDER = "live=720p:x720:2000k,180p:x180:300k,90p:x90:150k:15"  # 720p: above the source, skipped


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    up = start_up(tmp_path_factory.mktemp("worker"), "--abr", LADDER)
    source = publish(up.rtmp("cam"), 90, size="320x180", gop=30)
    try:
        for name in ("cam", "cam_180p", "cam_90p"):
            wait_live(up.flv(name), timeout=20)
        yield up
    finally:
        source.kill()
        source.wait()
        up.process.stop()


def keyframe_times(tags: list) -> list[int]:  # type: ignore[type-arg]
    """Presentation times (ms) of the keyframes among FLV video tags."""
    return [t.timestamp + int.from_bytes(t.payload[2:5], "big", signed=True)
            for t in tags if t.kind == 9 and t.payload[0] >> 4 == 1 and t.payload[1] == 1]


def decoded_sizes(url: str, seconds: float = 2.0) -> tuple[set[str], int, str]:
    """Picture sizes ffmpeg decodes from `url` (showinfo), the pictures, and what it complained of."""
    result = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "level+info", "-i", url, "-t", str(seconds),
                             "-vf", "showinfo", "-f", "null", "-"], capture_output=True, timeout=30, check=False)
    text = result.stderr.decode(errors="replace")
    sizes = set(re.findall(r" s:(\d+x\d+) ", text))
    pictures = len(re.findall(r"\] n:\s*\d+ ", text))
    errors = "\n".join(line for line in text.splitlines() if "[error]" in line or "[fatal]" in line)
    return sizes, pictures, errors


def test_every_rendition_decodes_at_its_size_with_keyframes_aligned(ladder) -> None:  # type: ignore[no-untyped-def]
    for name, size in (("cam_180p", "320x180"), ("cam_90p", "160x90")):
        sizes, pictures, errors = decoded_sizes(ladder.flv(name))
        assert sizes == {size}, (name, sizes, errors)
        assert pictures > 10 and not errors, (name, pictures, errors)
    watching = {name: watch_in_background(ladder.flv(name), 4.5) for name in ("cam", "cam_180p", "cam_90p")}
    keys = {}
    for name, (seen, thread) in watching.items():
        thread.join()
        assert seen.status == 200 and not seen.error, (name, seen.status, seen.error)
        keys[name] = keyframe_times(seen.tags)
    # the players started within a few ms of each other, but each starts at its own GOP cache's keyframe:
    # compare the keyframes all three saw
    start, end = max(k[0] for k in keys.values()), min(k[-1] for k in keys.values())
    window = {name: [t for t in times if start <= t <= end] for name, times in keys.items()}
    assert len(window["cam"]) >= 3, keys
    assert window["cam_180p"] == window["cam"] and window["cam_90p"] == window["cam"], keys
    seen_90p = watching["cam_90p"][0].video()
    span = (seen_90p[-1].timestamp - seen_90p[0].timestamp) / 1000
    assert 12 <= (len(seen_90p) - 1) / span <= 17, (len(seen_90p), span)  # thinned to about 15 a second


def stream_infs(playlist: str) -> dict[str, dict[str, str]]:
    """URI -> the attributes of its EXT-X-STREAM-INF."""
    lines = playlist.splitlines()
    out = {}
    for i, line in enumerate(lines):
        if line.startswith("#EXT-X-STREAM-INF:"):
            attributes = dict(re.findall(r'([A-Z-]+)=("[^"]*"|[^,]*)', line.split(":", 1)[1]))
            out[lines[i + 1]] = {k: v.strip('"') for k, v in attributes.items()}
    return out


def test_multivariant_playlist_lists_the_source_and_renditions(ladder) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while True:  # the 90p frame rate is measured at the origin: about a second after the first pictures
        response = http_get(ladder.hls("cam"))
        body = response.read().decode()
        variants = stream_infs(body)
        if variants.get("cam_90p.m3u8", {}).get("FRAME-RATE") == "15.000" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status == 200 and body.startswith("#EXTM3U"), body
    assert sorted(variants) == ["cam.m3u8?rendition=source", "cam_180p.m3u8", "cam_90p.m3u8"], body
    bandwidths = [int(attributes["BANDWIDTH"]) for attributes in variants.values()]
    assert bandwidths == sorted(bandwidths, reverse=True), body  # highest first
    expected = {"cam.m3u8?rendition=source": ("320x180", "30.000"), "cam_180p.m3u8": ("320x180", "30.000"),
                "cam_90p.m3u8": ("160x90", "15.000")}
    for uri, (resolution, rate) in expected.items():
        attributes = variants[uri]
        assert attributes["RESOLUTION"] == resolution and attributes["FRAME-RATE"] == rate, (uri, attributes)
        codecs = attributes["CODECS"].split(",")
        assert codecs[0].startswith("avc1.") and len(codecs[0]) == 11 and codecs[1] == "mp4a.40.2", attributes
        assert int(attributes["BANDWIDTH"]) > 50_000, attributes
    assert int(variants["cam_180p.m3u8"]["BANDWIDTH"]) > int(variants["cam_90p.m3u8"]["BANDWIDTH"])
    # each rendition's media playlist plays on its own, and the source's too
    base = ladder.hls("cam").rsplit("/", 1)[0]
    for uri in variants:
        counts, errors = _decode_hls(f"{base}/{uri}")
        assert counts.get(0, 0) > 10 and not errors, (uri, counts, errors)


def _decode_hls(url: str) -> tuple[dict[int, int], str]:
    from tests.integration.harness import decode

    return decode(url, seconds=1)


def test_llhls_playlists_carry_rendition_reports(ladder) -> None:  # type: ignore[no-untyped-def]
    assert http_get(ladder.hls("cam", "llhls")).read().decode().count("#EXT-X-STREAM-INF") == 3
    url = ladder.hls("cam_90p", "llhls")
    deadline = time.monotonic() + 10
    while True:  # the other renditions' muxers start with this one: their reports follow their first parts
        reports = re.findall(r'#EXT-X-RENDITION-REPORT:URI="([^"]+)",LAST-MSN=(\d+),LAST-PART=(-?\d+)',
                             http_get(url).read().decode())
        if len(reports) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert sorted(uri for uri, _, _ in reports) == ["cam.m3u8?rendition=source&format=llhls",
                                                    "cam_180p.m3u8?format=llhls"], reports


def test_rendition_streams_are_listed_with_the_source(ladder) -> None:  # type: ignore[no-untyped-def]
    import json

    listed = {s["stream"]: s for s in json.loads(http_get(
        f"http://127.0.0.1:{ladder.http_port}/api/v1/streams").read())["streams"]}
    assert {"cam", "cam_180p", "cam_90p"} <= set(listed), listed
    assert (listed["cam_90p"]["width"], listed["cam_90p"]["height"]) == (160, 90)




def test_ladders_through_the_api_start_list_and_stop(ladder) -> None:  # type: ignore[no-untyped-def]
    import json

    api = f"http://127.0.0.1:{ladder.http_port}/api/v1"
    studio = publish(f"rtmp://127.0.0.1:{ladder.rtmp_port}/studio/desk", 20, size="320x180", gop=30)
    try:
        wait_live(f"http://127.0.0.1:{ladder.http_port}/studio/desk.flv")
        assert _call("POST", f"{api}/streams/studio/desk/abr", {"ladder": "90p:x90:vp9"})[0] == 400
        assert _call("POST", f"{api}/streams/studio/nobody/abr", {"ladder": "90p:x90:100k"})[0] == 404
        status, answer = _call("POST", f"{api}/streams/studio/desk/abr", {"ladder": "90p:x90:100k"})
        assert status == 201 and answer["job"]["ladder"] == "90p:x90:100k", answer
        wait_live(f"http://127.0.0.1:{ladder.http_port}/studio/desk_90p.flv", timeout=15)
        sizes, _, errors = decoded_sizes(f"http://127.0.0.1:{ladder.http_port}/studio/desk_90p.flv", 1)
        assert sizes == {"160x90"} and not errors, (sizes, errors)
        jobs = {j["stream"]: j for j in json.loads(http_get(f"{api}/jobs").read())["jobs"]}
        assert jobs["desk"]["state"] == "running" and jobs["desk"]["outputs"] == ["desk_90p"], jobs
        assert jobs["desk"]["source"] == "api" and jobs["cam"]["source"] == "rule:live", jobs
        deadline = time.monotonic() + 5
        while True:  # listings are a second old at most
            listed = {s["stream"]: s for s in json.loads(http_get(f"{api}/streams").read())["streams"]}
            if listed.get("desk", {}).get("renditions") or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert listed["desk"]["renditions"] == ["desk_90p"] and listed["desk_90p"]["rendition_of"] == "desk"
        assert _call("DELETE", f"{api}/streams/studio/desk/abr")[0] == 200
        assert _call("DELETE", f"{api}/streams/studio/desk/abr")[0] == 404
        deadline = time.monotonic() + 5
        while http_get(f"http://127.0.0.1:{ladder.http_port}/studio/desk_90p.flv").status == 200:
            assert time.monotonic() < deadline, "the rendition outlived its ladder"
            time.sleep(0.2)
    finally:
        studio.kill()
        studio.wait()


def _call(method: str, url: str, body: object = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    import http.client
    import json

    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(*host.split(":"), timeout=10)  # type: ignore[arg-type]
    conn.request(method, "/" + rest, json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else {}


def test_chromium_plays_the_ladder_with_hls_js_and_switches_rendition(ladder) -> None:  # type: ignore[no-untyped-def]
    import json

    from tests.integration.harness import ROOT

    result = subprocess.run(["node", str(ROOT / "tests" / "browser" / "abr.mjs"),
                             f"http://127.0.0.1:{ladder.http_port}/", "live/cam"],
                            capture_output=True, text=True, timeout=150, check=False)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["consoleErrors"] == [] and seen["errors"] == [], seen
    assert sorted(map(tuple, seen["levels"])) == [(160, 90), (320, 180), (320, 180)], seen  # source, 180p, 90p
    assert seen["menu"][0] == "auto" and len(seen["menu"]) == 4, seen
    for switch in seen["switches"]:  # lowest, then highest: the picture changes size and plays on
        assert switch["switched"] and switch["size"] == switch["wanted"] and switch["played"] > 0.8, seen


def test_bad_input_rules_sources_that_change_size_and_sources_without_video(ladder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import json
    import threading

    from castmesh.media.flv import FlvReader
    from castmesh.mesh.rtmp_client import RtmpClient
    from tests.integration.harness import ROOT

    # a rule that cannot be met is refused at start, with the reason
    checked = subprocess.run([sys.executable, "-m", "services.cli", "serve", "dispatch", "--check-config", "--abr",
                              "live=90p:x90:100k:vp9"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert checked.returncode != 0 and "codec 'vp9' is not one a worker encodes" in checked.stderr, checked.stderr
    # the rendition above the source was skipped, and the job says so
    jobs = {j["stream"]: j for j in json.loads(http_get(
        f"http://127.0.0.1:{ladder.http_port}/api/v1/jobs").read())["jobs"]}
    assert "skipped 720p: 720 lines is above the source's 320x180" in jobs["cam"]["detail"], jobs["cam"]
    assert jobs["cam"]["outputs"] == ["cam_180p", "cam_90p"] and http_get(ladder.flv("cam_720p")).status == 404

    # a source whose picture goes from 16:9 to 4:3 mid-stream: the ladder's child is replaced at the first
    # keyframe of the new size, and the 90p rendition follows the new aspect ratio, on the same stream
    clips = []
    for size, seconds in (("320x180", 5), ("240x180", 7)):
        path = tmp_path / f"{size}.flv"
        subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate=30:duration={seconds}", "-f", "lavfi", "-i",
                        f"sine=frequency=440:sample_rate=44100:duration={seconds}", "-c:v", "libx264", "-preset",
                        "veryfast", "-g", "30", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "flv", str(path)],
                       check=True, timeout=60)
        clips.append(FlvReader().feed(path.read_bytes()))

    async def send() -> None:
        client = await RtmpClient.open("127.0.0.1", ladder.rtmp_port, "live", "resize")
        start, offset = time.monotonic(), 0
        for tags in clips:
            for tag in tags:
                delay = (offset + tag.timestamp) / 1000 - (time.monotonic() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                client.send_media(tag.kind, offset + tag.timestamp, tag.payload)
            offset += tags[-1].timestamp + 33
        await client.drain()
        await client.close()

    sender = threading.Thread(target=asyncio.run, args=(send(),))
    sender.start()
    try:
        wait_live(ladder.flv("resize_90p"), timeout=15)
        sizes, pictures, errors = decoded_sizes(ladder.flv("resize_90p"), seconds=8)
        assert sizes == {"160x90", "120x90"} and pictures > 60 and not errors, (sizes, pictures, errors)
    finally:
        sender.join(30)
    assert "why=\"new codec configuration\"" in ladder.process.log()

    # a source without video: the job waits and says why; its thumbnail is a clear 404
    tone = publish(ladder.rtmp("radio"), 12, video=None)
    try:
        wait_live(ladder.flv("radio"))
        deadline = time.monotonic() + 10
        while True:
            jobs = {j["stream"]: j for j in json.loads(http_get(
                f"http://127.0.0.1:{ladder.http_port}/api/v1/jobs").read())["jobs"]}
            if jobs.get("radio", {}).get("state") == "waiting" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert jobs["radio"]["state"] == "waiting" and "no video" in jobs["radio"]["detail"], jobs.get("radio")
        assert http_get(ladder.flv("radio_90p")).status == 404
        picture = http_get(f"http://127.0.0.1:{ladder.http_port}/live/radio.jpg", timeout=15)
        assert picture.status == 404 and b"no video" in picture.read()
        assert http_get(ladder.flv("cam_90p")).status == 200  # the others play on
    finally:
        tone.kill()
        tone.wait()
