"""Free ports for servers, rendezvous and tests to listen on."""

import random
import socket

LOWEST = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, picked below the kernel's ephemeral range when there is room.

    A port is chosen here and bound later by another process. A port from the ephemeral range
    (what ``bind(host, 0)`` returns) can be taken in between by any outgoing connection or
    ``bind(0)`` on the machine, and a server or rendezvous then fails with "address in use" (seen
    under parallel tests). Below that range only another explicit choice can take it."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64 if low - LOWEST > 1000 else 0):
        port = rng.randrange(LOWEST, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
