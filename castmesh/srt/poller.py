"""libsrt's sockets on an asyncio loop. libsrt sockets are not file descriptors, so one thread per process
waits in srt_epoll_uwait (ctypes lets go of the GIL there) and reads every ready socket until it would
block, each socket's messages one after another into one buffer (one bytes object per socket per wake-up,
never one per packet); what it read goes to the loop in one call_soon_threadsafe per wake-up, and
then it lets GATHER pass before it looks again: each hand-over wakes the loop, whatever it carries, and
at 100 publishers waiting 5 ms cut ingest's CPU per SRT publisher from 0.76 to 0.57% of a core (10 ms:
0.55%), for at most 5 ms more on the way in.

Bounded: at most MAX_READS messages per socket per wake-up, and while more than MAX_PENDING bytes wait
for the loop the thread reads nothing (libsrt then holds, and past its buffer drops, the late packets:
SRT's own answer to a receiver that cannot keep up).
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass

from castmesh.srt import libsrt as s

MESSAGE = 1500  # a live-mode SRT message is at most 1456 bytes
MAX_READS = 64
MAX_PENDING = 32 << 20
WAIT_MS = 100
GATHER = 0.005  # seconds the thread lets messages gather after a hand-over (docs/BENCHMARKS.md, bench ingest)


@dataclass
class Accepted:
    sock: int
    peer: str
    stream_id: str


@dataclass
class Watch:
    on_data: Callable[[bytes], None]  # on the loop: the messages read, one after another
    on_closed: Callable[[str], None]  # on the loop, once: why


class SrtPoller:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.srt = s.lib()
        self.eid = s.check("srt_epoll_create", self.srt.srt_epoll_create())
        self.listeners: dict[int, Callable[[Accepted], None]] = {}
        self.watches: dict[int, Watch] = {}
        self.pending = 0  # bytes handed to the loop, not yet delivered
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="srt-poller", daemon=True)
        self.thread.start()

    def listen(self, sock: int, on_accept: Callable[[Accepted], None]) -> None:
        self.listeners[sock] = on_accept
        self._add(sock)

    def watch(self, sock: int, on_data: Callable[[bytes], None], on_closed: Callable[[str], None]) -> None:
        self.watches[sock] = Watch(on_data, on_closed)
        self._add(sock)

    def forget(self, sock: int) -> None:
        """Stop watching `sock` (the caller closes it)."""
        self.srt.srt_epoll_remove_usock(self.eid, sock)
        self.watches.pop(sock, None)
        self.listeners.pop(sock, None)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(1 + WAIT_MS / 1000)
        self.srt.srt_epoll_release(self.eid)

    def _add(self, sock: int) -> None:
        events = ctypes.c_int(s.EPOLL_IN | s.EPOLL_ERR)
        s.check("srt_epoll_add_usock", self.srt.srt_epoll_add_usock(self.eid, sock, ctypes.byref(events)))

    # The thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        ready = (s.EpollEvent * 256)()
        buffer = ctypes.create_string_buffer(MESSAGE * MAX_READS)
        base = ctypes.addressof(buffer)
        srt = self.srt
        recvmsg, string_at = srt.srt_recvmsg, ctypes.string_at
        while not self.stopped.is_set():
            if self.pending > MAX_PENDING:
                self.stopped.wait(0.01)
                continue
            count = srt.srt_epoll_uwait(self.eid, ready, 256, WAIT_MS)
            if count <= 0:
                srt.srt_clearlasterror()
                continue
            accepted: list[tuple[Callable[[Accepted], None], Accepted]] = []
            data: list[tuple[Watch, bytes]] = []
            closed: list[tuple[int, Watch, str]] = []
            size = 0
            for i in range(count):
                sock = ready[i].fd
                on_accept = self.listeners.get(sock)
                if on_accept is not None:
                    new = srt.srt_accept(sock, None, None)
                    if new != s.INVALID_SOCK:
                        accepted.append((on_accept, self._accepted(new)))
                    srt.srt_clearlasterror()
                    continue
                watch = self.watches.get(sock)
                if watch is None:
                    continue
                filled = 0
                reason = ""
                for _ in range(MAX_READS):
                    got = recvmsg(sock, base + filled, MESSAGE)
                    if got > 0:
                        filled += got
                        continue
                    if got < 0 and srt.srt_getlasterror(None) != s.EASYNCRCV:
                        reason = "the connection broke or the caller closed it"
                    srt.srt_clearlasterror()
                    break
                if filled:
                    data.append((watch, string_at(base, filled)))
                    size += filled
                if reason or ready[i].events & s.EPOLL_ERR:
                    srt.srt_epoll_remove_usock(self.eid, sock)
                    closed.append((sock, watch, reason or "the connection broke or the caller closed it"))
            if accepted or data or closed:
                with self.lock:
                    self.pending += size
                self.loop.call_soon_threadsafe(self._deliver, accepted, data, closed, size)
                self.stopped.wait(GATHER)  # fewer, larger hand-overs: each wakes the loop, whatever it carries

    def _accepted(self, sock: int) -> Accepted:
        try:
            stream_id = s.get_bytes(sock, s.SRTO_STREAMID).decode("utf-8", "replace")
        except s.SrtError:
            stream_id = ""
        return Accepted(sock, s.peer_of(sock), stream_id)

    # The loop --------------------------------------------------------------------------------------------

    def _deliver(self, accepted: list[tuple[Callable[[Accepted], None], Accepted]],
                 data: list[tuple[Watch, bytes]], closed: list[tuple[int, Watch, str]], size: int) -> None:
        with self.lock:
            self.pending -= size
        for on_accept, new in accepted:
            on_accept(new)
        for watch, received in data:
            watch.on_data(received)
        for sock, watch, reason in closed:
            if self.watches.get(sock) is watch:
                del self.watches[sock]
                watch.on_closed(reason)
