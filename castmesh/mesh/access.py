"""IP allow and deny lists for publishing and playing, per application, IPv4 and IPv6 (CIDR).

Four options, each "CIDR CIDR ..." (every application) or "live=CIDR CIDR,studio=CIDR" (per application;
"*=..." for the rest): --publish-allow, --publish-deny, --play-allow, --play-deny. A denied address is
refused; where an application has an allow list, only addresses on it are let in. Deny wins. "all" stands
for every address (0.0.0.0/0 and ::/0). An IPv4 client on an IPv6 socket (::ffff:a.b.c.d) is matched as
the IPv4 address.

Checked where signed URLs are, so every protocol (RTMP, RTMPS, HTTP-FLV, WebSocket-FLV, HLS, WHIP, WHEP,
SRT) obeys the same lists. Behind a reverse proxy the client's address comes from X-Forwarded-For, but
only when the connection comes from one of --trusted-proxies: the address used is the right-most one in
the header that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter

from castmesh.mesh.config import ConfigError

ANY_APP = "*"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
EVERYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
MAX_FORWARDED = 32  # addresses looked at in one X-Forwarded-For

REFUSED = Counter("castmesh_access_refused", "Publishes and plays refused by the IP lists", ["action"])


def parse_networks(text: str, option: str) -> tuple[Network, ...]:
    networks: list[Network] = []
    for word in text.replace(";", " ").split():
        if word == "all":
            networks += EVERYWHERE
            continue
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{option}: {word!r} is not an address or CIDR block ({exc})") from exc
    return tuple(networks)


def parse_per_app(text: str, option: str) -> dict[str, tuple[Network, ...]]:
    """"CIDRS" (every application) or "app=CIDRS,app2=CIDRS" -> {app: networks}."""
    text = text.strip()
    if not text:
        return {}
    if "=" not in text:
        return {ANY_APP: parse_networks(text, option)}
    lists: dict[str, tuple[Network, ...]] = {}
    for part in text.split(","):
        app, sep, cidrs = part.partition("=")
        if not sep or not app.strip():
            raise ConfigError(f"{option}: {part!r} is not app=CIDR ...")
        lists[app.strip()] = parse_networks(cidrs, option)
    return lists


def ip_of(peer: str) -> str:
    """The address in a peer as the services write it, "ip:port" (IPv6 too, unbracketed)."""
    return peer.rpartition(":")[0] or peer


def address_of(text: str) -> Address | None:
    """The IP address in "ip", "v6", "[v6]", "[v6]:port" or "v4:port" (as X-Forwarded-For may carry them),
    IPv4-mapped IPv6 as IPv4; None if there is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


@dataclass
class AccessLists:
    publish_allow: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    publish_deny: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    play_allow: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    play_deny: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    trusted_proxies: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, publish_allow: str = "", publish_deny: str = "", play_allow: str = "", play_deny: str = "",
              trusted_proxies: str = "") -> AccessLists:
        return cls(parse_per_app(publish_allow, "--publish-allow"), parse_per_app(publish_deny, "--publish-deny"),
                   parse_per_app(play_allow, "--play-allow"), parse_per_app(play_deny, "--play-deny"),
                   parse_networks(trusted_proxies, "--trusted-proxies"))

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> AccessLists:
        return cls.parse(*(str(cfg.get(name) or "") for name in (
            "publish_allow", "publish_deny", "play_allow", "play_deny", "trusted_proxies")))

    enabled: bool = field(init=False)  # any list at all: checked first, per request

    def __post_init__(self) -> None:
        self.enabled = bool(self.publish_allow or self.publish_deny or self.play_allow or self.play_deny)

    def client(self, ip: str, headers: Mapping[str, str] | None = None) -> str:
        """The client's address: the connection's (`ip`), or, when that is a trusted proxy, the right-most
        address in X-Forwarded-For (header names in lower case) that is not a trusted proxy itself."""
        address = address_of(ip)
        if address is None or not self.trusted_proxies or not _within(address, self.trusted_proxies):
            return ip
        forwarded = (headers or {}).get("x-forwarded-for", "")
        for hop in reversed(forwarded.split(",")[-MAX_FORWARDED:]):
            hop_address = address_of(hop)
            if hop_address is None:
                break  # a malformed entry: trust nothing before it
            if not _within(hop_address, self.trusted_proxies):
                return str(hop_address)
        return ip

    def refuse(self, action: str, app: str, ip: str, headers: Mapping[str, str] | None = None) -> str | None:
        """Why the client at `ip` (the connection's address, no port) may not `action` ("publish" or "play")
        in `app`, or None if it may."""
        if not self.enabled:
            return None
        allow, deny = (self.publish_allow, self.publish_deny) if action == "publish" else (
            self.play_allow, self.play_deny)
        denied, allowed = deny.get(app, deny.get(ANY_APP)), allow.get(app, allow.get(ANY_APP))
        if denied is None and allowed is None:
            return None
        client = self.client(ip, headers)
        address = address_of(client)
        reason = None
        if address is None:
            reason = f"cannot tell the client's address ({client!r}) to check --{action}-allow/deny"
        elif denied is not None and _within(address, denied):
            reason = f"address {address} may not {action} in {app!r} (--{action}-deny)"
        elif allowed is not None and not _within(address, allowed):
            reason = f"address {address} is not on the list of those who may {action} in {app!r} (--{action}-allow)"
        if reason is not None:
            REFUSED.labels(action).inc()
        return reason
