"""The server shell hands each request to the main thread (the thread that built the model
owns the OpenMP pool; see nemo_aligner/servers/base.py) and stops in step with it."""

import os
import queue
import signal
import threading
import time

import numpy as np
import pytest

from nemo_aligner.servers.base import InferenceServer

pytestmark = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                reason="signal handlers and the hand-over need the main thread")


def serving(compute, client, stop_signal=False):
    """Serve ``compute`` on this (main) thread while ``client(server, endpoint)`` runs on another."""
    server = InferenceServer("m", compute, inputs=(), outputs=())
    endpoint = server.endpoints["m"]
    server._jobs = queue.Queue()
    out = {}

    def run_client():
        try:
            out["result"] = client(server, endpoint)
        except Exception as e:  # noqa: BLE001 -- checked by the test
            out["error"] = e
        finally:
            server._stop_requested = True

    previous = signal.signal(signal.SIGTERM, server._stop_signal) if stop_signal else None
    thread = threading.Thread(target=run_client)
    thread.start()
    try:
        server._serve_jobs(lambda: True)
    finally:
        thread.join(timeout=30)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    assert not thread.is_alive()
    return server, out


def test_requests_run_on_the_main_thread_and_errors_go_back():
    ran_on = []

    def compute(inputs):
        ran_on.append(threading.current_thread() is threading.main_thread())
        if "bad" in inputs:
            raise ValueError("a bad request")
        return {"y": inputs["x"] * 2}

    def client(server, endpoint):
        first = server._run(endpoint, {"x": np.array([1, 2])})
        with pytest.raises(ValueError, match="a bad request"):
            server._run(endpoint, {"x": np.array([1]), "bad": np.array([0])})
        return first

    server, out = serving(compute, client)
    assert "error" not in out, out
    assert out["result"]["y"].tolist() == [2, 4]
    assert ran_on == [True, True]
    assert server._jobs is None


def test_a_stop_signal_during_a_request_takes_effect_once_it_is_answered():
    def compute(inputs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the request is being answered
        return {"y": inputs["x"] + 1}

    def client(server, endpoint):
        answer = server._run(endpoint, {"x": np.array([1])})
        server._stop_requested = False  # only the signal may end the loop now
        return answer

    server, out = serving(compute, client, stop_signal=True)
    assert out["result"]["y"].tolist() == [2]
    assert server._stop_requested and server._jobs is None


def test_a_request_left_when_serving_ends_is_told_the_server_is_stopping():
    server = InferenceServer("m", lambda inputs: {"y": inputs["x"]}, inputs=(), outputs=())
    server._jobs = queue.Queue()
    errors = []

    def late_client():
        try:
            server._run(server.endpoints["m"], {"x": np.array([1])})
        except RuntimeError as e:
            errors.append(str(e))

    client = threading.Thread(target=late_client)
    client.start()
    deadline = time.monotonic() + 10
    while server._jobs.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    server._stop_requested = True  # serving ends before the queued request is taken
    server._serve_jobs(lambda: True)
    client.join(timeout=30)
    assert errors == ["the server 'm' is stopping"]
