"""Which IP addresses an image may be fetched from (the SSRF fence).

A host is fetched only when every address it resolves to is public unicast, or the operator
allowed it in ``CATALOG_FETCH_ALLOW_HOSTS``. IPv6 forms that embed an IPv4 address
(IPv4-mapped, 6to4, Teredo, NAT64) are judged by the IPv4 address inside.
"""

from __future__ import annotations

import ipaddress

from worker.config import Settings, parse_allow_entry

_CGNAT = ipaddress.ip_network("100.64.0.0/10")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            v4, kind = embedded
            inner = blocked_reason(v4)
            if inner is not None:
                return f"an {kind} form of {v4}, {inner}"
            return None
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip in _METADATA:
        return "a link-local address (the cloud metadata service)"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a shared (CGNAT 100.64.0.0/10) address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def allow_entries(settings: Settings) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]]:
    return [parse_allow_entry(entry) for entry in settings.fetch_allow_hosts]


def is_allowed(ip: IPAddress, port: int, entries) -> bool:
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
            candidates = [ip]
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
    for network, allowed_port in entries:
        if allowed_port is not None and allowed_port != port:
            continue
        for candidate in candidates:
            if candidate.version == network.version and candidate in network:
                return True
    return False
