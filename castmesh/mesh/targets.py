"""Where a forward job pushes a stream, as its URL says: rtmp://host[:port]/app/key and rtmps:// (ports 1935
and 443 by default), the key being the last path segment with any query string (YouTube- and Twitch-style keys
may carry one) and the app what comes before it; RTMPS checks the server's certificate unless the URL has
`insecure=1` in its query (taken out of the key). srt://host:port?streamid=...&passphrase=...&latency=MS: the
latency in milliseconds (SRT's unit, as srt-live-transmit; ffmpeg's URLs give microseconds, so a value over
MAX_LATENCY_MS is refused with that hint). Dispatch checks a forward's URLs with parse_target before any
worker is given it; the worker reads them with it.

Stream keys, passphrases and stream ids are secrets: logs, errors and the API show masked(url).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443}
SRT_OPTIONS = ("streamid", "passphrase", "latency", "mode")
MAX_LATENCY_MS = 20_000
MAX_STREAMID = 512  # libsrt's own limit on the stream id
MASK = "****"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a target forwards to, read from its URL."""

    scheme: str  # "rtmp", "rtmps" or "srt"
    host: str
    port: int
    app: str = ""  # RTMP: the application, what comes before the key in the path
    key: str = ""  # RTMP: the stream key, with its query string
    verify: bool = True  # RTMPS: check the server's certificate
    stream_id: str = ""  # SRT
    passphrase: str = ""  # SRT: 10 to 79 characters
    latency_ms: int | None = None  # SRT: None for libsrt's default (120 ms)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def secrets(self) -> list[str]:
        """What must not be shown, longest first (a far end may quote the key without its query)."""
        return sorted({v for v in (self.key, self.key.partition("?")[0], self.passphrase, self.stream_id) if v},
                      key=len, reverse=True)


def parse_target(url: str) -> Destination:
    """A target URL read; ValueError saying what is wrong (with the URL masked) if it cannot be forwarded to."""
    try:
        parts = urlsplit(url.strip(), allow_fragments=False)  # a '#' belongs to a key or a stream id
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{masked(url)}: not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("rtmp", "rtmps", "srt"):
        raise ValueError(f"{masked(url)}: unknown scheme {scheme + '://' if scheme else '(none)'}: forward targets "
                         "are rtmp://, rtmps:// or srt:// URLs")
    host = parts.hostname
    if not host:
        raise ValueError(f"{masked(url)}: no host")
    if port == 0:
        raise ValueError(f"{masked(url)}: port 0")
    if parts.username is not None or parts.password is not None:
        where = "the stream key" if scheme != "srt" else "passphrase="
        raise ValueError(f"{masked(url)}: user:password@ in the URL is not supported: put credentials in {where}")
    if scheme == "srt":
        return _srt(url, host, port, parts.path, parts.query)
    path, query = parts.path, parts.query
    verify = True
    if scheme == "rtmps" and query:
        kept = []
        for item in query.split("&"):
            name, _, value = item.partition("=")
            if name == "insecure":
                verify = value.lower() not in ("1", "true", "yes")
            else:
                kept.append(item)
        query = "&".join(kept)
    app, _, key = path.strip("/").rpartition("/")
    if not app or not key:
        raise ValueError(f"{masked(url)}: an {scheme} URL names an application and a stream key: "
                         f"{scheme}://host[:port]/app/key")
    key += f"?{query}" if query else ""
    return Destination(scheme, host, DEFAULT_PORTS[scheme] if port is None else port, app=app, key=key, verify=verify)


def _srt(url: str, host: str, port: int | None, path: str, query: str) -> Destination:
    if not port:
        raise ValueError(f"{masked(url)}: an srt URL needs a port: srt://host:port?streamid=...")
    if path.strip("/"):
        raise ValueError(f"{masked(url)}: an srt URL has no path: the stream goes in ?streamid=")
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in SRT_OPTIONS:
            raise ValueError(f"{masked(url)}: unknown SRT option {name!r} (known: {', '.join(SRT_OPTIONS)})")
        options[name] = value
    if options.get("mode", "caller") != "caller":
        raise ValueError(f"{masked(url)}: a forward target is called: mode=caller, not {options['mode']!r}")
    stream_id, passphrase = options.get("streamid", ""), options.get("passphrase", "")
    if len(stream_id.encode()) > MAX_STREAMID:
        raise ValueError(f"{masked(url)}: the streamid is over SRT's {MAX_STREAMID} bytes")
    if passphrase and not 10 <= len(passphrase) <= 79:
        raise ValueError(f"{masked(url)}: an SRT passphrase is 10 to 79 characters")
    latency = None
    if "latency" in options:
        text = options["latency"]
        if not text.isdigit():
            raise ValueError(f"{masked(url)}: latency is a number of milliseconds, not {text!r}")
        latency = int(text)
        if latency > MAX_LATENCY_MS:
            raise ValueError(f"{masked(url)}: latency is in milliseconds, at most {MAX_LATENCY_MS}: {latency} looks "
                             "like microseconds, as ffmpeg's srt:// URLs give it")
    return Destination("srt", host, port, stream_id=stream_id, passphrase=passphrase, latency_ms=latency)


def masked(url: str) -> str:
    """`url` with what may be secret replaced by ****: the stream key (an RTMP URL's last path segment and
    its query), SRT's streamid and passphrase, any user:password. Never raises: also for bad URLs."""
    try:
        parts = urlsplit(url.strip(), allow_fragments=False)
    except ValueError:
        return MASK
    if not parts.scheme or not parts.netloc:
        return MASK  # not a URL at all (a bare key pasted by mistake?): nothing of it is shown
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    head = f"{parts.scheme}://{netloc}"
    folder, slash, last = parts.path.rpartition("/")
    srt = parts.scheme.lower() == "srt"
    if slash and (last or (parts.query and not srt)):
        path = f"{folder}/{MASK}"  # an RTMP key with its query; in an SRT URL, no path is expected
    else:
        path = parts.path + (f"?{MASK}" if parts.query and not srt else "")
    if not srt:
        return head + path
    items = []
    for item in parts.query.split("&") if parts.query else []:
        name, equals, value = item.partition("=")
        shown = unquote(name).lower() in ("latency", "mode")
        items.append(f"{name}{equals}{value if shown or not equals else MASK}")
    return head + path + (f"?{'&'.join(items)}" if items else "")
