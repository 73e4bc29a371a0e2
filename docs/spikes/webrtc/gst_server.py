"""Spike: one pre-encoded 2 Mbps H.264 stream to N WHEP-ish viewers with GStreamer's webrtcbin.

appsrc (AUs pushed from Python at 30 fps) -> h264parse -> rtph264pay pt=101 -> tee -> per viewer:
queue (leaky) -> webrtcbin. Packetized once per stream; SRTP and sending per viewer, in C.
"""
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

Gst.init(None)
PORT = int(sys.argv[1])

AUS = []
with open("aus.bin", "rb") as f:
    while head := f.read(5):
        size, key = struct.unpack("!I?", head)
        AUS.append(f.read(size))

pipe = Gst.parse_launch(
    "appsrc name=src is-live=true format=time do-timestamp=true "
    "caps=video/x-h264,stream-format=byte-stream,alignment=au,framerate=30/1 ! h264parse config-interval=-1 ! "
    "rtph264pay pt=101 config-interval=-1 aggregate-mode=zero-latency ! "
    "capssetter caps=\"application/x-rtp,profile-level-id=(string)42e01f,level-asymmetry-allowed=(string)1\" ! "
    "tee name=t allow-not-linked=true")
src = pipe.get_by_name("src")
tee = pipe.get_by_name("t")
pipe.set_state(Gst.State.PLAYING)


def feed() -> None:
    start = time.monotonic()
    i = 0
    while True:
        due = start + i / 30
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        src.emit("push-buffer", Gst.Buffer.new_wrapped(AUS[i % len(AUS)]))
        i += 1


def add_viewer(offer_sdp: str, done: threading.Event, out: list) -> bool:
    q = Gst.ElementFactory.make("queue")
    q.set_property("leaky", 2)
    q.set_property("max-size-time", 2 * Gst.SECOND)
    wb = Gst.ElementFactory.make("webrtcbin")
    wb.set_property("bundle-policy", GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE)
    pipe.add(q)
    pipe.add(wb)
    sinkpad = wb.request_pad_simple("sink_%u")
    transceiver = sinkpad.get_property("transceiver")
    transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
    transceiver.set_property("codec-preferences", Gst.Caps.from_string(
        "application/x-rtp,media=video,encoding-name=H264,payload=101,clock-rate=90000,"
        "packetization-mode=(string)1,profile-level-id=(string)42e01f,level-asymmetry-allowed=(string)1"))
    q.get_static_pad("src").link(sinkpad)
    q.sync_state_with_parent()
    wb.sync_state_with_parent()
    counter = [0]
    def probe(pad, info):
        counter[0] += 1
        if counter[0] in (1, 100):
            print("buffers into webrtcbin", counter[0], pad.get_current_caps().to_string() if pad.get_current_caps() else None, flush=True)
        return Gst.PadProbeReturn.OK
    q.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, probe)
    teepad = tee.request_pad_simple("src_%u")
    teepad.link(q.get_static_pad("sink"))

    _, sdp = GstSdp.SDPMessage.new_from_text(offer_sdp)
    offer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.OFFER, sdp)

    def gathered(element, _pspec) -> None:
        if element.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE and not done.is_set():
            out.append(element.get_property("local-description").sdp.as_text())
            done.set()

    wb.connect("notify::ice-gathering-state", gathered)

    def on_answer(promise, _data) -> None:
        reply = promise.get_reply()
        answer = reply.get_value("answer")
        if answer is None:
            print("no answer:", reply.to_string(), flush=True)
            return
        wb.emit("set-local-description", answer, Gst.Promise.new())

    def on_remote(promise, _data) -> None:
        wb.emit("create-answer", None, Gst.Promise.new_with_change_func(on_answer, None))

    wb.emit("set-remote-description", offer, Gst.Promise.new_with_change_func(on_remote, None))
    return False


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        done, out = threading.Event(), []
        GLib.idle_add(add_viewer, body, done, out)
        done.wait(10)
        answer = (out or [""])[0].encode()
        self.send_response(201 if out else 500)
        self.send_header("Content-Type", "application/sdp")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


threading.Thread(target=feed, daemon=True).start()
threading.Thread(target=ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever, daemon=True).start()
print("ready", flush=True)
GLib.MainLoop().run()
