"""Listening sockets for `tunelab web` and `tunelab serve`: bound before the (slow) model load, so a port in use
is one clear line, not a server library's exit after a minute of loading."""

from __future__ import annotations

import errno
import socket

from tunelab.errors import TunelabError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a TunelabError that says why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise TunelabError(f"cannot listen on {host}:{port}: unknown address ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # SO_REUSEADDR lets a port in TIME_WAIT be reused; a port some program listens on still fails.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise TunelabError(f"port {port} on {host} is already in use; stop the program using it or pass "
                               "--port with another number") from None
        raise TunelabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def ensure_port_free(host: str, port: int) -> None:
    """Raise TunelabError (one clear line) if host:port cannot be bound."""
    bind(host, port).close()
