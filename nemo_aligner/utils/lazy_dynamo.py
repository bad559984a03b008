"""Run torch's optimizers without importing TorchDynamo when nothing is compiled.

``torch.optim`` imports TorchDynamo (~0.5 s of a training process, ~40k objects) for two
things that mean nothing while no frame is being traced:

- every ``Optimizer.step`` calls ``torch._dynamo.graph_break()``, a no-op outside tracing;
- ``add_param_group``, ``zero_grad``, ``state_dict``, ``load_state_dict`` and the
  Adam/SGD update functions are wrapped in ``torch._disable_dynamo``, which on first call
  builds ``torch._dynamo.disable(fn)``; outside tracing that just calls ``fn``.

Nothing can be tracing until TorchDynamo is imported (``torch.compile`` imports it). Inside
:func:`dynamo_not_imported`, when TorchDynamo has not been imported yet, ``torch._dynamo``
is a stand-in that answers those two calls the same way, and imports the real module the
moment anything else is asked of it. A ``disable`` wrapper it hands out (torch caches it on
the function) calls the function directly until TorchDynamo is imported, and torch's own
wrapper from then on.
"""

import contextlib
import functools
import importlib
import sys
import threading
import types

_NAME = "torch._dynamo"
_lock = threading.Lock()


def _real_module():
    with _lock:
        if isinstance(sys.modules.get(_NAME), _StandIn):
            del sys.modules[_NAME]
    return importlib.import_module(_NAME)


def _disabled_once_imported(fn, recursive: bool, kwargs: dict):
    """``fn`` itself while TorchDynamo is not imported, ``torch._dynamo.disable(fn)`` after."""

    @functools.wraps(fn)
    def call(*args, **kw):
        module = sys.modules.get(_NAME)
        if module is None or isinstance(module, _StandIn):
            return fn(*args, **kw)
        if not hasattr(call, "real"):
            call.real = module.disable(fn, recursive, **kwargs)
        return call.real(*args, **kw)

    return call


class _StandIn(types.ModuleType):
    """``torch._dynamo`` as far as ``torch.optim`` needs it outside tracing."""

    @staticmethod
    def graph_break(msg: str = "") -> None:
        return None

    @staticmethod
    def disable(fn=None, recursive: bool = True, **kwargs):
        if fn is None:
            return lambda f: _disabled_once_imported(f, recursive, kwargs)
        return _disabled_once_imported(fn, recursive, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") and name != "__path__":
            # probes such as inspect.getmodule's __file__ are not uses of TorchDynamo
            raise AttributeError(name)
        return getattr(_real_module(), name)


@contextlib.contextmanager
def dynamo_not_imported():
    """Within this block torch.optim does not import TorchDynamo for its no-op uses (see the
    module docstring). If TorchDynamo is already imported this changes nothing."""
    stand_in = None
    with _lock:
        if _NAME not in sys.modules:
            stand_in = sys.modules[_NAME] = _StandIn(_NAME)
    try:
        yield
    finally:
        with _lock:
            if stand_in is not None and sys.modules.get(_NAME) is stand_in:
                del sys.modules[_NAME]
