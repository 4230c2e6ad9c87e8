"""Where a webhook may point: a public address, never the service's own network.

A requester chooses the URL and the worker POSTs to it, so without this rule a requester could
make the worker reach the cloud metadata endpoint (169.254.169.254), the database, or anything
else on its network (SSRF). Every address the host resolves to is checked, at registration and
again right before each delivery, and the worker then connects to the checked address itself:
a DNS answer that changes between the check and the connection (rebinding) cannot redirect
it. Networks the operator lists in ``LETHE_WEBHOOK_ALLOWED_NETWORKS`` are exempt."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(Exception):
    """The URL may not be a webhook target (policy: retrying cannot change it)."""


class TargetUnresolvable(Exception):
    """The host does not resolve: refused at registration, retried at delivery (a DNS
    failure may pass)."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL, pinned to the address that was checked."""

    url: str  # the registered URL with its host replaced by the checked address
    host_header: str  # the registered host (and port), sent as ``Host``
    server_name: str | None  # for https: the TLS server name (SNI, certificate check)


def check(url: str, *, allowed_networks: Sequence[IPNetwork] = ()) -> Target:
    """The URL pinned to a checked address of its host; raises ``TargetRefused`` when it is
    not http(s) or any address of its host is non-public and not in ``allowed_networks``,
    ``TargetUnresolvable`` when its host does not resolve."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise TargetRefused("is not an http or https URL with a host")
    host = parsed.raw_host.decode("ascii")
    addresses = resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    for address in addresses:
        reason = refusal(address, allowed_networks)
        if reason is not None:
            raise TargetRefused(f"resolves to {address}, {reason}")
    authority = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        authority += f":{parsed.port}"
    return Target(url=str(parsed.copy_with(host=str(addresses[0]))), host_header=authority,
                  server_name=host if parsed.scheme == "https" else None)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host resolves to (an address literal resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise TargetUnresolvable(f"host {host!r} does not resolve ({error})") from None
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        # An IPv6 sockaddr may carry a zone ("fe80::1%eth0"): the address is before it.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise TargetUnresolvable(f"host {host!r} has no address")
    return addresses


def refusal(address: IPAddress, allowed_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why a webhook may not be sent to the address, or None when it may."""
    # An IPv6 address that carries an IPv4 one (::ffff:a.b.c.d, 6to4) reaches that one.
    embedded = (address.ipv4_mapped or address.sixtofour) if address.version == 6 else None
    effective = embedded or address
    if any(candidate in network for candidate in {address, effective}
           for network in allowed_networks if network.version == candidate.version):
        return None
    described = f"an IPv6 form of {effective}, " if embedded else ""
    for kind, applies in (("a loopback", effective.is_loopback),
                          ("a link-local", effective.is_link_local),
                          ("a multicast", effective.is_multicast),
                          ("an unspecified", effective.is_unspecified),
                          ("a private", effective.is_private),
                          ("a reserved", effective.is_reserved),
                          ("a non-global", not effective.is_global)):
        if applies:
            return f"{described}{kind} address"
    return None
