"""IP allow and deny lists (castmesh.mesh.access): per application, IPv4 and IPv6, deny over allow,
X-Forwarded-For only from trusted proxies, and clear errors for bad lists."""

from __future__ import annotations

import pytest

from castmesh.mesh.access import AccessLists, address_of, ip_of
from castmesh.mesh.config import ConfigError


def test_allow_and_deny_per_application_v4_and_v6() -> None:
    lists = AccessLists.parse(publish_allow="live=10.0.0.0/8 2001:db8::/32,*=127.0.0.1",
                              publish_deny="live=10.9.0.0/16", play_deny="studio=all")
    assert lists.refuse("publish", "live", "10.1.2.3") is None
    assert lists.refuse("publish", "live", "2001:db8::5") is None
    assert "not on the list" in (lists.refuse("publish", "live", "192.168.1.1") or "")
    assert "--publish-deny" in (lists.refuse("publish", "live", "10.9.1.1") or "")  # deny wins over allow
    assert lists.refuse("publish", "other", "127.0.0.1") is None  # "*": the rest of the applications
    assert lists.refuse("publish", "other", "10.1.2.3") is not None
    assert lists.refuse("play", "live", "192.168.1.1") is None  # no play lists for live
    assert lists.refuse("play", "studio", "::1") is not None and lists.refuse("play", "studio", "10.0.0.1") is not None
    assert lists.refuse("publish", "live", "::ffff:10.1.2.3") is None  # an IPv4 client on an IPv6 socket
    assert lists.refuse("publish", "live", "not an address") is not None  # cannot tell: refused, not let in


def test_x_forwarded_for_counts_only_from_trusted_proxies() -> None:
    lists = AccessLists.parse(play_deny="203.0.113.0/24", trusted_proxies="127.0.0.1 10.0.0.0/8")
    forwarded = {"x-forwarded-for": "203.0.113.7, 10.1.1.1"}  # client, then a second proxy of ours
    assert lists.refuse("play", "live", "127.0.0.1", forwarded) is not None
    assert lists.client("127.0.0.1", forwarded) == "203.0.113.7"
    assert lists.refuse("play", "live", "192.0.2.1", forwarded) is None  # not a proxy: its header is ignored
    spoofed = {"x-forwarded-for": "203.0.113.7, 198.51.100.1"}  # the client wrote the first entry itself
    assert lists.client("127.0.0.1", spoofed) == "198.51.100.1"
    assert lists.client("127.0.0.1", {"x-forwarded-for": "garbage, 10.1.1.1"}) == "127.0.0.1"
    assert lists.client("127.0.0.1", {"x-forwarded-for": "[2001:db8::1]:443"}) == "2001:db8::1"
    assert lists.client("127.0.0.1", {}) == "127.0.0.1"


def test_addresses_and_bad_lists() -> None:
    assert str(address_of("192.0.2.1:8080")) == "192.0.2.1" and str(address_of("[::1]:80")) == "::1"
    assert str(address_of("fe80::1%eth0")) == "fe80::1" and address_of("host.example") is None
    assert ip_of("::1:5555") == "::1" and ip_of("10.0.0.1:1935") == "10.0.0.1"
    assert not AccessLists.parse().enabled and AccessLists.parse().refuse("play", "live", "x") is None
    for bad in ("10.0.0.0/33", "live=nonsense", "=10.0.0.1", "live=10.0.0.1,10.0.0.2"):
        with pytest.raises(ConfigError):
            AccessLists.parse(play_allow=bad)
