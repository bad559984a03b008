"""Clients of our PyTriton servers: futures, timeouts, and errors that say where.

:class:`TritonClient` talks to one endpoint (``host:port``, model name). Creating it waits
for the endpoint to be ready for up to ``init_timeout_s``, saying every few seconds which
``host:port`` it is waiting for; requests run in a small thread pool and return futures;
a request that fails (connection refused, server gone, no answer within
``inference_timeout_s``) raises :class:`ServerError`, one line naming ``host:port`` and the
endpoint. ``close()`` (also at interpreter exit) stops the pool, so nothing is left waiting.
"""

import atexit
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nemo_aligner.utils.errors import RunError
from nemo_aligner.utils.logging import get_logger

WAIT_MESSAGE_EVERY_S = 5.0
REQUESTS_IN_FLIGHT = 4
WATCHDOG_MARGIN_S = 30.0


class ServerError(RunError, ConnectionError):
    """A server that cannot be reached, died, or did not answer in time."""


def _quiet_pytriton_warnings():
    import warnings

    warnings.filterwarnings("ignore", message=".*timeout.*", module="pytriton")
    try:
        from pytriton.client.warnings import NotSupportedTimeoutWarning

        warnings.filterwarnings("ignore", category=NotSupportedTimeoutWarning)
    except ImportError:
        pass


def _require_pytriton():
    try:
        import pytriton.client  # noqa: F401  (present?)
    except ImportError:
        from nemo_aligner.generation.engine import MissingDependencyError

        raise MissingDependencyError(
            "remote reward models and servers need PyTriton: pip install nvidia-pytriton "
            "(or pip install -e '.[serve]')"
        ) from None


class TritonClient:
    """One endpoint of a PyTriton server (see the module docstring). ``key`` names the
    config section users fix (e.g. ``remote_rm``) in error messages."""

    def __init__(self, host: str, port: int, endpoint: str, *, init_timeout_s: float = 60.0,
                 inference_timeout_s: float = 60.0, key: str = "", what: str = "server"):
        _require_pytriton()
        _quiet_pytriton_warnings()
        self.host, self.port, self.endpoint = host, int(port), endpoint
        self.init_timeout_s = float(init_timeout_s)
        self.inference_timeout_s = float(inference_timeout_s)
        self.key, self.what = key, what
        self._local = threading.local()
        self._clients = []
        self._pool = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self.max_batch_size = self._wait_ready()
        # A few requests in flight keep the server's queue fed while it computes.
        self._pool = ThreadPoolExecutor(max_workers=REQUESTS_IN_FLIGHT, thread_name_prefix=f"triton-{endpoint}")
        atexit.register(self.close)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port} (endpoint '{self.endpoint}')"

    def _hint(self) -> str:
        return "; check that the server is running" + (f" and the {self.key} settings" if self.key else "")

    def _wait_ready(self) -> int:
        """Poll until the endpoint is ready; returns its max batch size (0: no batching)."""
        from pytriton.client.utils import create_client_from_url

        start = time.monotonic()
        deadline = start + self.init_timeout_s
        last_message = start
        log = get_logger()
        client = create_client_from_url(f"http://{self.host}:{self.port}", network_timeout_s=min(5.0, self.init_timeout_s))
        try:
            while True:
                try:
                    if client.is_server_live() and client.is_model_ready(self.endpoint):
                        config = client.get_model_config(self.endpoint)
                        return int(config.get("max_batch_size", 0) or 0)
                except Exception:  # noqa: BLE001 -- not up yet (refused, reset, not ready)
                    pass
                now = time.monotonic()
                if now >= deadline:
                    raise ServerError(
                        f"no {self.what} answered at {self.where} within {self.init_timeout_s:g} s "
                        f"(init_timeout_s){self._hint()}"
                    )
                if now - last_message >= WAIT_MESSAGE_EVERY_S:
                    log.info(f"waiting for the {self.what} at {self.where}: {now - start:.0f} s of {self.init_timeout_s:g} s")
                    last_message = now
                time.sleep(min(0.5, max(deadline - now, 0.0)))
        finally:
            client.close()

    def _model_client(self):
        """This pool thread's own client (PyTriton's clients are not thread-safe)."""
        from pytriton.client import ModelClient

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = ModelClient(
                f"http://{self.host}:{self.port}", self.endpoint, lazy_init=True,
                init_timeout_s=self.init_timeout_s, inference_timeout_s=self.inference_timeout_s,
            )
            self._clients.append(client)
        return client

    def _infer(self, inputs: dict) -> dict:
        try:
            client = self._model_client()
            return client.infer_batch(**inputs) if self.max_batch_size else client.infer_sample(**inputs)
        except Exception as e:  # noqa: BLE001 -- every transport failure becomes one line
            self._local.client = None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ServerError(
                f"the {self.what} at {self.where} failed: {reason[:300]}{self._hint()}"
            ) from None

    def submit(self, inputs: dict) -> "_Request":
        """A future of the endpoint's outputs for ``inputs`` (numpy arrays, batch first)."""
        if self._pool is None:
            raise ServerError(f"the client of {self.where} is closed")
        with self._lock:
            ahead = self._in_flight
            self._in_flight += 1
        future = self._pool.submit(self._infer, inputs)
        future.add_done_callback(self._finished)
        # Once sent, PyTriton bounds a request by init_timeout_s + inference_timeout_s; those ahead
        # of it in this client's queue add theirs. Past that (and a margin), something is stuck.
        rounds = 1 + ahead // REQUESTS_IN_FLIGHT
        limit = self.init_timeout_s + rounds * self.inference_timeout_s + WATCHDOG_MARGIN_S
        return _Request(future, self, limit)

    def _finished(self, _future) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        while self._clients:
            try:
                self._clients.pop().close()
            except Exception:  # noqa: BLE001 -- closing a broken connection
                pass


class _Request:
    """A request's future whose ``result()`` waits at most until its deadline: a server that
    stops answering, or a connection that hangs, fails the run in one line instead of stalling
    it."""

    def __init__(self, future, client: TritonClient, limit_s: float):
        self.future, self.client, self.limit_s = future, client, limit_s
        self.deadline = time.monotonic() + limit_s

    def result(self):
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            return self.future.result(timeout=max(self.deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            raise ServerError(
                f"the {self.client.what} at {self.client.where} did not answer within {self.limit_s:.0f} s "
                f"(init_timeout_s + inference_timeout_s per request, for the requests queued){self.client._hint()}"
            ) from None

    def done(self) -> bool:
        return self.future.done()


def sequence_requests(sequences: list[list[int]], max_batch_size: int, pad_to_length, pad_id: int):
    """``(start, inputs)`` per request of at most ``max_batch_size`` sequences (all in one when
    0): ``tokens`` int64 ``[b, W]`` right-padded to the longest sequence (or ``pad_to_length``)
    and ``sequence_lengths`` int64 ``[b, 1]``, as our servers take them."""
    width = max(max(len(s) for s in sequences), int(pad_to_length or 0))
    chunk = max_batch_size or len(sequences)
    for start in range(0, len(sequences), chunk):
        part = sequences[start : start + chunk]
        tokens = np.full((len(part), width), pad_id, dtype=np.int64)
        for i, seq in enumerate(part):
            tokens[i, : len(seq)] = seq
        yield start, {"tokens": tokens, "sequence_lengths": np.array([[len(s)] for s in part], dtype=np.int64)}


class _Gathered:
    """Futures of several requests, concatenated at ``result()``: one value per sequence (the
    first output), or with ``all_outputs`` a list of every output per sequence."""

    def __init__(self, futures, key: str, all_outputs: bool = False):
        self.futures, self.key, self.all_outputs = futures, key, all_outputs

    def result(self) -> list:
        out = []
        for future in self.futures:
            values = np.asarray(future.result()[self.key])
            values = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
            out.extend(values.tolist() if self.all_outputs else values[:, 0].tolist())
        return out


class RewardClient(TritonClient):
    """The reward-model server's client (NeMo-Aligner's ``reward_model`` endpoint): inputs
    ``tokens`` int64 ``[B, L]``, ``sequence_lengths`` int64 ``[B, 1]``, ``sentences`` bytes
    ``[B, 1]``; output ``rewards`` float32 ``[B, k]`` (RL reads the first; SteerLM annotation
    every attribute, ``all_outputs=True``)."""

    def __init__(self, host, port, endpoint="reward_model", **kwargs):
        kwargs.setdefault("what", "reward model server")
        super().__init__(host, port, endpoint, **kwargs)

    def submit_rewards(self, sequences: list[list[int]], sentences: list[bytes] | None = None, *,
                       pad_to_length: int | None = None, pad_id: int = 0, all_outputs: bool = False) -> _Gathered:
        futures = []
        for start, inputs in sequence_requests(sequences, self.max_batch_size, pad_to_length, pad_id):
            if sentences is not None:
                inputs["sentences"] = np.array([[s] for s in sentences[start : start + len(inputs["tokens"])]],
                                               dtype=np.object_)
            futures.append(self.submit(inputs))
        return _Gathered(futures, "rewards", all_outputs)




class _CriticValues:
    """Futures of ``critic_infer`` chunks; ``result()`` -> ``(values [N, W], rewards [N] or None)``."""

    def __init__(self, futures, width: int):
        self.futures, self.width = futures, width

    def result(self):
        values, rewards = [], []
        for future in self.futures:
            out = future.result()
            v = np.asarray(out["values"], dtype=np.float32)
            values.append(v[:, : self.width])
            if "rewards" in out:
                rewards.extend(np.asarray(out["rewards"]).reshape(-1).tolist())
        return np.concatenate(values), (rewards or None)


class CriticClient:
    """The PPO critic server's client: NeMo-Aligner's ``critic_infer`` / ``critic_train`` /
    ``critic_save`` endpoints (names from ``remote_critic_rm.critic.name``), plus ``critic_info``
    (the critic's vocabulary, checked against the actor's tokenizer at start)."""

    def __init__(self, host, port, names: dict, **kwargs):
        kwargs.setdefault("what", "critic server")
        self.infer = TritonClient(host, port, names.get("infer", "critic_infer"), **kwargs)
        self.train = TritonClient(host, port, names.get("train", "critic_train"), **kwargs)
        self.save = TritonClient(host, port, names.get("save", "critic_save"), **kwargs)
        self.info = TritonClient(host, port, "critic_info", **kwargs)
        self.max_batch_size = self.infer.max_batch_size
        self.where = f"{host}:{port}"

    def submit_values(self, sequences: list[list[int]], *, pad_to_length: int | None = None, pad_id: int = 0):
        futures = [self.infer.submit(inputs)
                   for _, inputs in sequence_requests(sequences, self.max_batch_size, pad_to_length, pad_id)]
        return _CriticValues(futures, max(len(s) for s in sequences))

    def submit_train(self, tokens, returns, prev_values, mask):
        return self.train.submit({"tokens": np.asarray(tokens, dtype=np.int64),
                                  "returns": np.asarray(returns, dtype=np.float32),
                                  "prev_values": np.asarray(prev_values, dtype=np.float32),
                                  "mask": np.asarray(mask, dtype=np.float32)})

    def submit_save(self, actor_step: int = 0):
        """``critic_save``; ``dummy_var`` carries the actor's step, kept with the critic's checkpoint."""
        return self.save.submit({"dummy_var": np.array([actor_step], dtype=np.int64)})

    def _info(self) -> dict:
        return self.info.submit({"dummy_var": np.zeros(1, dtype=np.int64)}).result()

    def vocabulary(self) -> tuple[int, list[int]]:
        """``(vocab_size, probe_ids)`` of the critic's tokenizer (see ``servers/critic.py``)."""
        out = self._info()
        return int(np.asarray(out["vocab_size"]).reshape(-1)[0]), np.asarray(out["probe_ids"]).reshape(-1).tolist()

    def saved_actor_step(self) -> int:
        """The actor step of the checkpoint the critic resumed from or last saved (-1: none)."""
        return int(np.asarray(self._info()["actor_step"]).reshape(-1)[0])

    def close(self) -> None:
        for client in (self.infer, self.train, self.save, self.info):
            client.close()
