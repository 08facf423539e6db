"""A free TCP port on loopback."""
from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A port nobody holds right now. Another process may take it before the caller binds it, so callers that
    can retry on EADDRINUSE should."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
