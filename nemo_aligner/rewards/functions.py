"""Rule-based reward functions named in a config (``reward.function: "package.module:callable"``).

The contract every RL entry point and ``serve_reward_model.py`` use::

    fn(prompts: list[str], responses: list[str], samples: list[dict]) -> list[float]

``samples`` are the prompt file's JSONL rows (the ``text`` field and whatever else the
function reads, such as an ``answer``). A function that cannot be imported, or that returns
the wrong number of values or a value that is not a finite number, is reported in one line
naming ``reward.function``.
"""

import importlib
import math
import numbers

from nemo_aligner.utils.errors import RunError

KEY = "reward.function"


class RewardFunctionError(RunError, ValueError):
    """A reward function that cannot be loaded or returned something unusable."""


def load_reward_function(spec: str, key: str = KEY):
    """The callable named by ``spec`` (``"package.module:callable"``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardFunctionError(f"{key}={spec!r}; name it as 'package.module:callable'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardFunctionError(f"{key}={spec!r}: cannot import {module_name!r} ({e}); "
                                  "check the module path and that it is on PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardFunctionError(f"{key}={spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise RewardFunctionError(f"{key}={spec!r} is a {type(fn).__name__}, not a function")
    return fn


def call_reward_function(fn, prompts: list[str], responses: list[str], samples: list[dict],
                         spec: str = "", key: str = KEY) -> list[float]:
    """``fn(prompts, responses, samples)`` checked: one finite number per response."""
    name = f"{key}={spec!r}" if spec else key
    values = fn(list(prompts), list(responses), list(samples))
    try:
        values = list(values)
    except TypeError:
        raise RewardFunctionError(f"{name} returned a {type(values).__name__}; it must return a list of numbers") from None
    if len(values) != len(responses):
        raise RewardFunctionError(
            f"{name} returned {len(values)} rewards for {len(responses)} responses; return one number per response"
        )
    out = []
    for i, v in enumerate(values):
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise RewardFunctionError(
                f"{name} returned {v!r} for response {i}; every reward must be a finite number"
            )
        out.append(float(v))
    return out
