"""The PyTriton shell every server of ours runs in (the reward model, the PPO critic).

:class:`InferenceServer` owns no math. It takes a ``compute(inputs) -> outputs`` callable
per endpoint that every rank runs together (a forward over the batch at the server's own
TP/PP/DP layout, or a training step), and:

- global rank 0 runs a PyTriton server bound to ``host`` (127.0.0.1 unless configured)
  on ``port``, one PyTriton model per :class:`Endpoint`, batched ones with dynamic batching
  (``max_batch_size``, ``max_queue_delay_microseconds``);
- each request is broadcast from rank 0 to every other rank, and one lock keeps requests
  from interleaving, so all ranks run the same ``compute`` calls in the same order;
- ``compute`` runs on the main thread (PyTriton's threads hand it over and wait): the
  thread that built the model owns the process's OpenMP pool, and a second thread running
  parallel ops gets a pool of its own, with more pooled threads than cores libgomp stops
  spin-waiting and every parallel op waits for its threads to wake (measured: a small
  model's forward 1.5x slower off the main thread on 2 cores). A stop signal that arrives
  during a request takes effect once it is answered, so every rank ends in step;
- the other ranks wait for broadcasts until rank 0 says stop (when the server ends: Ctrl-C,
  SIGTERM, or an error), so the whole job exits together;
- PyTriton's Python backend needs the running interpreter's own ``libpython`` first on
  ``LD_LIBRARY_PATH`` (see PLATFORM_NOTES): set here, so users never have to.

``validate(inputs)`` runs on rank 0 before a request is broadcast; an error it raises
goes back to the client alone (the other ranks never see that request).
"""

import os
import queue
import signal
import sysconfig
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch.distributed as dist

from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.ports import free_port

STOP = "\x00stop"  # no endpoint has this name


def prepare_pytriton_environment() -> None:
    """Put this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH`` (idempotent), so the
    Triton Python backend stub loads the same libpython as the running interpreter."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if paths[:1] != [libdir]:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + [p for p in paths if p != libdir])


def _broadcast(obj):
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@dataclass
class Endpoint:
    """One PyTriton model of a server. ``compute`` maps a dict of numpy arrays (optional
    inputs absent when not sent) to a dict of numpy arrays; every rank runs it. Batched
    endpoints get arrays with the batch first (requests grouped by the dynamic batcher);
    unbatched ones (``batching=False``) get one request's arrays as sent. ``validate`` runs
    on rank 0 before a request is broadcast; an error it raises goes back to the client alone."""

    name: str
    compute: Callable
    inputs: Sequence
    outputs: Sequence
    batching: bool = True
    max_batch_size: int = 4
    max_queue_delay_microseconds: int = 0
    validate: Callable | None = None


class InferenceServer:
    """See the module docstring. Either ``endpoints`` (a list of :class:`Endpoint`) or the
    fields of one batched endpoint (``name``, ``compute``, ``inputs``, ``outputs``, ...)."""

    def __init__(self, name: str = "", compute=None, inputs=(), outputs=(), *, host: str = "127.0.0.1",
                 port: int = 5555, max_batch_size: int = 4, max_queue_delay_microseconds: int = 0,
                 exit_timeout_s: int = 5, validate=None, endpoints: list | None = None):
        if endpoints is None:
            endpoints = [Endpoint(name, compute, inputs, outputs, True, max_batch_size,
                                  max_queue_delay_microseconds, validate)]
        self.endpoints = {e.name: e for e in endpoints}
        self.name = ", ".join(self.endpoints)
        self.host, self.port = host, int(port)
        self.exit_timeout_s = int(exit_timeout_s)
        self.lock = threading.Lock()
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.log = get_logger()
        self._jobs: queue.Queue | None = None  # set while serve() runs requests on the main thread
        self._busy = False  # the main thread is answering a request
        self._stop_requested = False

    # ------------------------------------------------------- the main thread
    def _on_main_thread(self, fn, *args):
        """``fn(*args)`` run by the main thread (serving in :meth:`_serve_jobs`); called from
        PyTriton's threads, it waits for the result or the exception."""
        jobs = self._jobs
        if jobs is None or threading.current_thread() is threading.main_thread():
            return fn(*args)
        done = Future()
        jobs.put((fn, args, done))
        while True:
            try:
                return done.result(timeout=1.0)
            except FutureTimeout:
                if self._jobs is jobs or not done.cancel():  # still serving, or it is running
                    continue
            except CancelledError:  # serving ended before it was taken
                pass
            raise RuntimeError(f"the server '{self.name}' is stopping")

    def _serve_jobs(self, alive) -> None:
        """Answer handed-over requests until a stop signal arrives or ``alive()`` (asked at
        most once a second: PyTriton checks its processes) is false."""
        try:
            next_check = 0.0
            while not self._stop_requested:
                if time.monotonic() >= next_check:
                    if not alive():
                        return
                    next_check = time.monotonic() + 1.0
                try:
                    fn, args, done = self._jobs.get(timeout=1.0)
                except queue.Empty:
                    continue
                self._busy = True
                try:
                    if done.set_running_or_notify_cancel():
                        try:
                            done.set_result(fn(*args))
                        except Exception as e:  # noqa: BLE001 -- goes back to the request's thread
                            done.set_exception(e)
                finally:
                    self._busy = False
        finally:
            jobs, self._jobs = self._jobs, None
            while not jobs.empty():
                jobs.get_nowait()[2].cancel()  # its thread says the server is stopping

    def _stop_signal(self, signum, frame):
        """Stop serving: at once when idle, after the request in progress otherwise."""
        self._stop_requested = True
        if not self._busy:
            raise KeyboardInterrupt

    # ---------------------------------------------------------------- rank 0
    def _run(self, endpoint: Endpoint, inputs: dict) -> dict:
        if endpoint.validate is not None:
            endpoint.validate(inputs)
        return self._on_main_thread(self._compute, endpoint, inputs)

    def _compute(self, endpoint: Endpoint, inputs: dict) -> dict:
        with self.lock:
            if self.distributed:
                _broadcast((endpoint.name, inputs))
            return endpoint.compute(inputs)

    def _callable(self, endpoint: Endpoint):
        """PyTriton's callable for ``endpoint``: batched requests the dynamic batcher grouped
        run as one batch where their shapes allow, answered request by request; unbatched
        ones run one at a time."""

        def infer(requests):
            requests = [{k: np.asarray(v) for k, v in r.items()} for r in requests]
            if not endpoint.batching:
                return [self._run(endpoint, r) for r in requests]
            outputs = [None] * len(requests)
            for group in _stackable_groups(requests):
                inputs = {k: np.concatenate([requests[i][k] for i in group]) for k in requests[group[0]]}
                result = self._run(endpoint, inputs)
                start = 0
                for i in group:
                    n = len(next(iter(requests[i].values())))
                    outputs[i] = {k: v[start : start + n] for k, v in result.items()}
                    start += n
            return outputs

        return infer

    def serve(self) -> None:
        """Serve until interrupted; collective (every rank calls it)."""
        if self.distributed and dist.get_rank() != 0:
            self._follow()
            return
        prepare_pytriton_environment()
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig

        config = TritonConfig(
            http_address=self.host, http_port=self.port, grpc_address=self.host, grpc_port=free_port(self.host),
            allow_metrics=False, exit_timeout_secs=self.exit_timeout_s, log_verbose=0,
        )
        previous = {sig: signal.signal(sig, self._stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._stop_requested = False
        try:
            with Triton(config=config) as triton:
                for e in self.endpoints.values():
                    model_config = (ModelConfig(batching=True, max_batch_size=e.max_batch_size,
                                                batcher=DynamicBatcher(max_queue_delay_microseconds=e.max_queue_delay_microseconds))
                                    if e.batching else ModelConfig(batching=False))
                    triton.bind(model_name=e.name, infer_func=self._callable(e), inputs=e.inputs,
                                outputs=e.outputs, config=model_config, strict=False)
                self._jobs = queue.Queue()
                triton.run()
                self.log.info(f"serving '{self.name}' at {self.host}:{self.port} (Ctrl-C or SIGTERM stops it)")
                self._serve_jobs(triton.is_alive)
            self.log.info(f"stopped '{self.name}' at {self.host}:{self.port}")
        except KeyboardInterrupt:
            self.log.info(f"stopping '{self.name}' at {self.host}:{self.port}")
        finally:
            self._jobs = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.distributed:
                with self.lock:
                    _broadcast((STOP, None))

    # ---------------------------------------------------------- other ranks
    def _follow(self) -> None:
        while True:
            command, inputs = _broadcast(None)
            if command == STOP:
                return
            self.endpoints[command].compute(inputs)


def _stackable_groups(requests) -> list[list[int]]:
    """Indices of requests with the same inputs and trailing shapes (concatenable), in order."""
    groups = {}
    for i, r in enumerate(requests):
        key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in r.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())

