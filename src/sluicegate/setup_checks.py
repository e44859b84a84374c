"""Setup checks made before connecting to anything: an address to listen on that is bad or taken is one line."""

from __future__ import annotations

import errno
import socket

from sluicegate.errors import InvalidInput


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port); a malformed one raises InvalidInput naming `what`."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text:
        raise InvalidInput(f"{what} {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidInput(f"{what} {address!r}: write an IPv6 address in brackets, e.g. [::1]:50051")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidInput(f"{what} {address!r} has no port between 0 and 65535")
    return host, int(port_text)


def check_free(host: str, port: int, what: str) -> None:
    """Bind `host:port` for a moment (as a server would, without SO_REUSEPORT): taken or foreign is an error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise InvalidInput(f"cannot listen on {what} {host}:{port}: the host name does not resolve") from err
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as err:
            raise InvalidInput(f"cannot listen on {what} {host}:{port}: {_why(err)}") from err


def check_listen(address: str, what: str = "the address") -> tuple[str, int]:
    """A listen address that parses, resolves and is free (port 0: any free port)."""
    host, port = split_host_port(address, what)
    check_free(host, port, what)
    return host, port


def _why(err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return "the port is taken (is another instance running?)"
    if err.errno == errno.EADDRNOTAVAIL:
        return "that is not an address of this machine"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return err.strerror or type(err).__name__
