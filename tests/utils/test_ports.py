"""Ports chosen for servers and rendezvous lie below the kernel's ephemeral range, where no
outgoing connection or bind(0) elsewhere can take them before their listener binds."""

import socket

from nemo_aligner.utils.ports import LOWEST, _ephemeral_range, free_port


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    low, high = _ephemeral_range()
    assert LOWEST < low <= high
    ports = {free_port() for _ in range(50)}
    assert all(LOWEST <= p < low for p in ports) and len(ports) > 40
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))
        s.listen()


def test_a_port_in_use_is_skipped(monkeypatch):
    import random

    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        taken = held.getsockname()[1]
        original = random.SystemRandom.randrange
        picks = iter([taken, taken])  # the first two candidates are the busy port
        monkeypatch.setattr(random.SystemRandom, "randrange", lambda self, a, b: next(picks, None) or original(self, a, b))
        port = free_port()
    assert port != taken and LOWEST <= port < _ephemeral_range()[0]
