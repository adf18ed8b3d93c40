"""The private-address guard: address classification, the resolver wrapper, and end to end."""
from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from pipeline.fetch import GuardedResolver, PrivateAddressError, check_literal_host, is_public_ip, netguard

try:
    from httpfixtures import LocalServer, fetch_all, fetch_one, make_cfg, server  # noqa: F401  (fixture)
except ImportError:  # tests/ became a package
    from tests.httpfixtures import LocalServer, fetch_all, fetch_one, make_cfg, server  # noqa: F401

NOT_PUBLIC = [
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "127.0.0.1", "127.8.9.10",
    "169.254.169.254", "0.0.0.0", "100.64.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "192.0.2.1", "198.18.0.1", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.1.2.3", "::ffff:169.254.169.254", "2002:7f00:1::1", "64:ff9b::a00:1",
    "2001:db8::1", "not-an-ip", "",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "2001:4860::8888", "2606:4700:4700::1111",
          "::ffff:8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("ip", NOT_PUBLIC)
def test_not_public(ip: str) -> None:
    assert not is_public_ip(ip)


@pytest.mark.parametrize("ip", PUBLIC)
def test_public(ip: str) -> None:
    assert is_public_ip(ip)


def test_check_literal_host() -> None:
    check_literal_host("example.org")  # names are checked after resolution, not here
    check_literal_host("8.8.8.8")
    for host in ("127.0.0.1", "::1", "10.0.0.7"):
        with pytest.raises(PrivateAddressError):
            check_literal_host(host)


class _StaticDNS(AbstractResolver):
    def __init__(self, *ips: str) -> None:
        self.ips = ips

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host=ip, port=port, family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                              proto=0, flags=0) for ip in self.ips]

    async def close(self) -> None:
        pass


def test_guarded_resolver_filters_and_refuses() -> None:
    async def go() -> None:
        mixed = GuardedResolver(_StaticDNS("10.0.0.1", "8.8.8.8", "::1", "2001:4860::8888"))
        assert [r["host"] for r in await mixed.resolve("a.example", 80)] == ["8.8.8.8", "2001:4860::8888"]
        with pytest.raises(PrivateAddressError) as err:
            await GuardedResolver(_StaticDNS("127.0.0.1", "::ffff:127.0.0.1")).resolve("evil.example", 80)
        assert err.value.host == "evil.example" and "127.0.0.1" in str(err.value)

    asyncio.run(go())


def test_loopback_literal_refused_without_any_request(server: LocalServer) -> None:
    results, made = asyncio.run(fetch_all(make_cfg(allow_private_addresses=False), [server.url("/img.jpg")]))
    r = results[0]
    assert r.status == "private_address" and r.attempts == 0 and made == 0
    assert server.total == 0


@pytest.mark.parametrize("host", ["localhost", "rebind.example"])
def test_name_resolving_to_loopback_refused(server: LocalServer, host: str) -> None:
    resolver = _StaticDNS("127.0.0.1") if host == "rebind.example" else None
    cfg = make_cfg(allow_private_addresses=False)
    results, made = asyncio.run(fetch_all(cfg, [server.url("/img.jpg", host=host), server.url("/b.jpg", host=host)], resolver=resolver))
    assert [r.status for r in results] == ["private_address"] * 2
    assert all(r.attempts == 0 for r in results) and made == 0
    assert server.total == 0


def test_name_resolving_to_loopback_refused_without_robots(server: LocalServer) -> None:
    cfg = make_cfg(allow_private_addresses=False, respect_robots=False, retries=3)
    results, made = asyncio.run(fetch_all(cfg, [server.url("/img.jpg", host="rebind.example")], resolver=_StaticDNS("127.0.0.1")))
    assert results[0].status == "private_address" and results[0].attempts == 0 and server.total == 0


@pytest.mark.parametrize("target", ["127.0.0.2", "internal.example"])
def test_redirect_hop_to_private_address_refused(server: LocalServer, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    # Pretend 127.0.0.1 is public so the test server is reachable with the guard on; every other
    # address (here 127.0.0.2, literal or behind a name) stays private. The redirect hop must be refused.
    monkeypatch.setattr(netguard, "is_public_ip", lambda ip: ip == "127.0.0.1")
    resolver = _StaticDNS("127.0.0.2")
    hop = f"http://{target}:{server.port}/img.jpg"
    cfg = make_cfg(allow_private_addresses=False)
    results, made = asyncio.run(fetch_all(cfg, [server.url(f"/goto?to={hop}"), server.url("/img.jpg")], resolver=resolver))
    assert [r.status for r in results] == ["private_address", "ok"]
    assert results[0].final_url == hop and results[0].attempts == 1
    assert server.counts["/goto"] == 1 and server.counts["/img.jpg"] == 1 and made == 3  # robots, goto, img
