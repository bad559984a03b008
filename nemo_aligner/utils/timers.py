"""Wall-clock timers for the training loop (reported as ``timers/<name>``)."""

import time
from collections import defaultdict
from contextlib import contextmanager


class Timers:
    def __init__(self):
        self._elapsed = defaultdict(float)

    @contextmanager
    def time(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._elapsed[name] += time.perf_counter() - start

    def pop(self) -> dict:
        """Seconds spent under each name since the last pop, as ``timers/<name>``."""
        out = {f"timers/{k}": v for k, v in self._elapsed.items()}
        self._elapsed.clear()
        return out
