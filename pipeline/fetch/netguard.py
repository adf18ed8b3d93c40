"""Refuse non-public network addresses, checked after DNS resolution.

``GuardedResolver`` wraps an aiohttp resolver and drops every resolved address that is not
public, so the connector only ever connects to addresses that passed the check (no gap
between checking a name and connecting to it, i.e. no DNS rebinding). aiohttp never asks the
resolver about literal IP hosts, so callers check those with ``check_literal_host``.
"""
from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = ["GuardedResolver", "PrivateAddressError", "check_literal_host", "is_public_ip"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class PrivateAddressError(Exception):
    """A host resolved only to (or is) a private/loopback/link-local/... address.

    Deliberately not an ``OSError``: aiohttp then lets it propagate unwrapped.
    """

    def __init__(self, host: str, addresses: list[str]) -> None:
        self.host = host
        self.addresses = addresses
        super().__init__(f"{host} resolves only to non-public addresses: {', '.join(addresses) or '-'}")


def _v4_is_public(ip: ipaddress.IPv4Address) -> bool:
    return not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified or not ip.is_global
    )


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried by an IPv4-mapped, 6to4 or NAT64 IPv6 address, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _parse_ip(ip: str) -> _IPAddress | None:
    text = ip.strip().strip("[]").split("%", 1)[0]  # drop an IPv6 zone id
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_public_ip(ip: str) -> bool:
    """True for a globally routable unicast address; False for anything else or non-IPs."""
    addr = _parse_ip(ip)
    if addr is None:
        return False
    if isinstance(addr, ipaddress.IPv4Address):
        return _v4_is_public(addr)
    embedded = _embedded_v4(addr)
    if embedded is not None:
        return _v4_is_public(embedded)
    return not (
        addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_site_local
        or addr.is_multicast or addr.is_reserved or addr.is_unspecified or not addr.is_global
    )


def check_literal_host(host: str) -> None:
    """Raise ``PrivateAddressError`` if ``host`` is a literal IP that is not public."""
    if _parse_ip(host) is not None and not is_public_ip(host):
        raise PrivateAddressError(host, [host])


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that returns only public addresses of the wrapped resolver."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner
        self._owns_inner = inner is None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if is_public_ip(r["host"])]
        if not public:
            raise PrivateAddressError(host, [r["host"] for r in results])
        return public

    async def close(self) -> None:
        """Close the wrapped resolver if this object created it (a caller's resolver stays open)."""
        if self._owns_inner and self._inner is not None:
            await self._inner.close()
