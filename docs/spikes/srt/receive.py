"""Spike: how fast one Python thread takes SRT in through castmesh/srt/libsrt.py (ctypes over Debian's
libsrt 1.5). A listener; one thread waits in srt_epoll_uwait (the GIL released) and reads every message
non-blocking until EASYNCRCV; it hands nothing on (the cost of handing batches to the event loop is
measured separately). ffmpeg callers send a TS file as fast as SRT lets them (maxbw unlimited).

Usage: python docs/spikes/srt/receive.py CLIP.ts CALLERS SECONDS
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import time

import imageio_ffmpeg

from castmesh.srt import libsrt as s


def main() -> None:
    clip, callers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    srt = s.lib()
    listener = s.check("srt_create_socket", srt.srt_create_socket())
    s.set_int(listener, s.SRTO_RCVSYN, 0)
    s.set_int(listener, s.SRTO_TRANSTYPE, s.SRTT_LIVE)
    address = s.sockaddr("127.0.0.1", 0)
    s.check("srt_bind", srt.srt_bind(listener, address, len(address)))
    buffer = ctypes.create_string_buffer(128)
    size = ctypes.c_int(128)
    srt.srt_getsockname(listener, buffer, ctypes.byref(size))
    port = int(s.parse_sockaddr(ctypes.addressof(buffer)).rpartition(":")[2])
    s.check("srt_listen", srt.srt_listen(listener, 64))
    eid = srt.srt_epoll_create()
    events = ctypes.c_int(s.EPOLL_IN | s.EPOLL_ERR)
    srt.srt_epoll_add_usock(eid, listener, ctypes.byref(events))
    counts = {"messages": 0, "bytes": 0, "wakeups": 0, "accepted": 0}
    stop = threading.Event()
    cpu = {}

    def loop() -> None:
        ready = (s.EpollEvent * 256)()
        data = ctypes.create_string_buffer(1500)
        start = time.thread_time()
        while not stop.is_set():
            n = srt.srt_epoll_uwait(eid, ready, 256, 100)
            if n <= 0:
                continue
            counts["wakeups"] += 1
            for i in range(n):
                fd, ev = ready[i].fd, ready[i].events
                if fd == listener:
                    sock = srt.srt_accept(listener, None, None)
                    if sock != s.INVALID_SOCK:
                        s.set_int(sock, s.SRTO_RCVSYN, 0)
                        srt.srt_epoll_add_usock(eid, sock, ctypes.byref(events))
                        counts["accepted"] += 1
                    continue
                while True:
                    got = srt.srt_recvmsg(fd, data, 1500)
                    if got <= 0:
                        if got < 0 and srt.srt_getlasterror(None) != s.EASYNCRCV:
                            srt.srt_epoll_remove_usock(eid, fd)
                            srt.srt_close(fd)
                        srt.srt_clearlasterror()
                        break
                    counts["messages"] += 1
                    counts["bytes"] += got
        cpu["thread"] = time.thread_time() - start

    def reader_cpu() -> float:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))  # type: ignore[arg-type]

    thread = threading.Thread(target=loop)
    thread.start()
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    procs = [subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", clip,
                               "-c", "copy", "-f", "mpegts",
                               f"srt://127.0.0.1:{port}?mode=caller&streamid=publish:live/s{i}&latency=200000"])
             for i in range(callers)]
    time.sleep(2)
    first = dict(counts)
    t0, c0, r0 = time.monotonic(), time.process_time(), reader_cpu()
    time.sleep(seconds)
    elapsed, process, reader = time.monotonic() - t0, time.process_time() - c0, reader_cpu() - r0
    last = dict(counts)
    for p in procs:
        p.terminate()
    stop.set()
    thread.join()
    msgs = last["messages"] - first["messages"]
    print(f"callers {callers}: {msgs / elapsed:.0f} messages/s, {8 * (last['bytes'] - first['bytes']) / elapsed / 1e6:.1f}"
          f" Mbit/s, wakeups/s {(last['wakeups'] - first['wakeups']) / elapsed:.0f}, process CPU {100 * process / elapsed:.1f}%"
          f" (libsrt's threads and the reader), of which the reader {100 * reader / elapsed:.1f}%,"
          f" accepted {last['accepted']}")


if __name__ == "__main__":
    main()
