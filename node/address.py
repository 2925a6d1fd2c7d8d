"""The address a node tells the coordinator and its peers to dial.

A node that listens on one address advertises it. One that listens on every interface
(``--listen 0.0.0.0:N``) must not advertise ``0.0.0.0``, which no peer can dial: it
advertises the address its own machine uses to reach the coordinator, the interface that
faces the run's network, or refuses with a message that names ``--advertise``.
"""

from __future__ import annotations

import socket

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


def split_host_port(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def route_source(coordinator: str) -> str:
    """The local address the kernel would use to reach `coordinator` (a UDP connect sends nothing)."""
    host, port = split_host_port(coordinator, "--coordinator")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, target = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(target)
        return str(probe.getsockname()[0])


def advertised_address(listen: str, bound_port: int, advertise: str, coordinator: str) -> str:
    """What peers dial: `advertise` as given, else the listen host, else (wildcard) the route's source."""
    if advertise:
        host, port = split_host_port(advertise, "--advertise")
        if host in WILDCARD_HOSTS or port == 0:
            raise ValueError(f"--advertise {advertise!r}: give an address and port peers can dial")
        return _join(host, port)
    host, _ = split_host_port(listen, "--listen")
    if host not in WILDCARD_HOSTS:
        return _join(host, bound_port)
    try:
        source = route_source(coordinator)
    except OSError as exc:
        raise ValueError(f"--listen {listen} binds every interface and the address peers should dial could not "
                         f"be found from the route to the coordinator ({exc}); give --advertise HOST:PORT") from exc
    if source in WILDCARD_HOSTS:
        raise ValueError(f"--listen {listen} binds every interface and no route to the coordinator names one; "
                         "give --advertise HOST:PORT")
    return _join(source, bound_port)
