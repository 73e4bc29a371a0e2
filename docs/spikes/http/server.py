import asyncio, sys, os, resource, time
import uvloop
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
kind = sys.argv[1]; port = int(sys.argv[2])
BODY = b"x" * int(sys.argv[3])

if kind == "session":
    from services.playback.http import HttpSession
    def route(session, request):
        session.respond(200, BODY, [("Content-Type", "application/vnd.apple.mpegurl"), ("Cache-Control", "no-cache")])
    factory = lambda: HttpSession(route, lambda s: None)
else:
    import httptools
    HEAD = (b"HTTP/1.1 200 OK\r\nServer: castmesh\r\nAccess-Control-Allow-Origin: *\r\nContent-Type: application/vnd.apple.mpegurl\r\n"
            b"Cache-Control: no-cache\r\nContent-Length: %d\r\n\r\n" % len(BODY))
    class P(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t; self.p = httptools.HttpRequestParser(self); self.url = b""
        def on_url(self, url): self.url += url
        def on_message_complete(self):
            self.t.writelines([HEAD, BODY]); self.url = b""
        def data_received(self, data):
            self.p.feed_data(data)
    factory = P

async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(factory, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await asyncio.sleep(3600)
uvloop.run(main())
