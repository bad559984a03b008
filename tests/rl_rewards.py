"""Reward functions the online-RL tests name in ``reward.function`` (``rl_rewards:...``;
tests/ is on the scripts' PYTHONPATH)."""

import os
import signal

from nemo_aligner.rewards.quickstart import exact_match

_calls = {"n": 0}


def exact_match_then_die(prompts, responses, samples):
    """``exact_match``, but the process kills itself (SIGKILL) at call ``$KILL_AT_CALL``."""
    _calls["n"] += 1
    if _calls["n"] == int(os.environ.get("KILL_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return exact_match(prompts, responses, samples)


def wrong_count(prompts, responses, samples):
    return [1.0] * (len(responses) - 1)


def not_a_number(prompts, responses, samples):
    return ["abc"] * len(responses)
