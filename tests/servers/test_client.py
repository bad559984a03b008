"""The server clients' watchdog: a request that never returns fails the run in one line, on
time, instead of stalling it."""

import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from nemo_aligner.servers.client import ServerError, _Request


def test_a_request_that_never_returns_fails_in_one_line_at_its_deadline():
    client = SimpleNamespace(what="critic server", where="127.0.0.1:5567", _hint=lambda: "; check that the server is running")
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"the critic server at 127.0.0.1:5567 did not answer within 1 s .*check that"):
        _Request(Future(), client, 1.0).result()
    assert 0.9 < time.monotonic() - start < 5


def test_an_answer_in_time_is_returned():
    client = SimpleNamespace(what="reward model server", where="h:1", _hint=lambda: "")
    future = Future()
    future.set_result({"rewards": [1.0]})
    request = _Request(future, client, 0.0)  # already answered: no wait even past the deadline
    assert request.done() and request.result() == {"rewards": [1.0]}
