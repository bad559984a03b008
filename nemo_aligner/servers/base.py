"""The PyTriton shell every server of ours runs in (the reward model, the PPO critic).

:class:`InferenceServer` owns no math. It takes a ``compute(inputs) -> outputs`` callable
per endpoint that every rank runs together (a forward over the batch at the server's own
TP/PP/DP layout, or a training step), and:

- global rank 0 runs a PyTriton server bound to ``host`` (127.0.0.1 unless configured)
  on ``port``, one PyTriton model per :class:`Endpoint`, batched ones with dynamic batching
  (``max_batch_size``, ``max_queue_delay_microseconds``);
- each request is broadcast from rank 0 to every other rank, and one lock keeps requests
  from interleaving, so all ranks run the same ``compute`` calls in the same order;
- the other ranks wait for broadcasts until rank 0 says stop (when the server ends: Ctrl-C,
  SIGTERM, or an error), so the whole job exits together;
- PyTriton's Python backend needs the running interpreter's own ``libpython`` first on
  ``LD_LIBRARY_PATH`` (see PLATFORM_NOTES): set here, so users never have to.

``validate(inputs)`` runs on rank 0 before a request is broadcast; an error it raises
goes back to the client alone (the other ranks never see that request).
"""

import os
import signal
import sysconfig
import threading
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

    # ---------------------------------------------------------------- rank 0
    def _run(self, endpoint: Endpoint, inputs: dict) -> dict:
        if endpoint.validate is not None:
            endpoint.validate(inputs)
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
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            with Triton(config=config) as triton:
                for e in self.endpoints.values():
                    model_config = (ModelConfig(batching=True, max_batch_size=e.max_batch_size,
                                                batcher=DynamicBatcher(max_queue_delay_microseconds=e.max_queue_delay_microseconds))
                                    if e.batching else ModelConfig(batching=False))
                    triton.bind(model_name=e.name, infer_func=self._callable(e), inputs=e.inputs,
                                outputs=e.outputs, config=model_config, strict=False)
                triton.run()
                self.log.info(f"serving '{self.name}' at {self.host}:{self.port} (Ctrl-C or SIGTERM stops it)")
                triton.serve()
        except KeyboardInterrupt:
            self.log.info(f"stopping '{self.name}' at {self.host}:{self.port}")
        finally:
            signal.signal(signal.SIGTERM, previous)
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


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
