"""Stop a run cleanly on SIGTERM / SIGINT (Slurm pre-emption, ``scancel``, Ctrl-C).

Inside :class:`GracefulStop` the first SIGTERM or SIGINT only sets a flag; the training loop
checks it between steps (:meth:`GracefulStop.agreed`, which all ranks call together, so every
rank stops after the same step), saves a checkpoint and exits with ``128 + signal``, the exit
status of a process killed by that signal, so schedulers see a pre-empted job and requeue it.
A second Ctrl-C interrupts at once.
"""

import signal
import threading

import torch
import torch.distributed as dist

from nemo_aligner.utils.logging import get_logger

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):
    """The run stopped after a checkpoint because it was asked to (``signum``)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class GracefulStop:
    def __init__(self):
        self.received = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.received:
            self.received = signum
            get_logger().warning(f"received {signal.Signals(signum).name}: finishing the current step, then "
                                 "saving a checkpoint and stopping (Ctrl-C again to interrupt at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def agreed(self, out_of_time: bool = False) -> tuple[bool, int]:
        """``(out_of_time, signum)`` agreed by every rank (collective): the largest of the ranks'."""
        flags = torch.tensor([int(out_of_time), self.received], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), int(flags[1])
