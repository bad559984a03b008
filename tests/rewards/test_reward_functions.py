"""Rule-based reward functions: loading, the checks on what they return, the bundled ones."""

import math

import numpy as np
import pytest
import torch

from nemo_aligner.rewards import quickstart
from nemo_aligner.rewards.functions import RewardFunctionError, call_reward_function, load_reward_function


def test_load_reward_function():
    assert load_reward_function("nemo_aligner.rewards.quickstart:exact_match") is quickstart.exact_match
    for spec, needle in [("nemo_aligner.rewards.quickstart", "package.module:callable"),
                         ("nope_module:fn", "cannot import 'nope_module'"),
                         ("nemo_aligner.rewards.quickstart:nope", "has no 'nope'"),
                         ("nemo_aligner.rewards.quickstart:re", "is a module, not a function")]:
        with pytest.raises(RewardFunctionError, match="reward.function") as e:
            load_reward_function(spec)
        assert needle in str(e.value)


@pytest.mark.parametrize("values,needle", [
    ([1.0], "returned 1 rewards for 2 responses"),
    ([1.0, float("nan")], "returned nan for response 1"),
    ([1.0, "x"], "returned 'x' for response 1"),
    (3.0, "returned a float"),
])
def test_call_checks_what_comes_back(values, needle):
    with pytest.raises(RewardFunctionError) as e:
        call_reward_function(lambda p, r, s: values, ["a", "b"], ["x", "y"], [{}, {}], "m:f")
    assert needle in str(e.value) and "reward.function='m:f'" in str(e.value)


def test_call_accepts_numbers_of_any_kind():
    values = [True, np.float32(0.5), torch.tensor(2.0), 3]
    assert call_reward_function(lambda p, r, s: values, *[["."] * 4] * 2, [{}] * 4) == [1.0, 0.5, 2.0, 3.0]


def test_bundled_rewards():
    samples = [{"answer": "3"}, {"answer": "3"}, {"answer": "dog dog"}, {"answer": "4"}]
    responses = [" 3 ", "3 words", "dog dog", "three"]
    prompts = [""] * 4
    assert quickstart.exact_match(prompts, responses, samples) == [1.0, 0.0, 1.0, 0.0]
    assert quickstart.numeric_answer(prompts, responses[:2] + ["7"] + responses[3:], samples[:2] + [{"answer": 7}] + samples[3:]) == [1.0, 1.0, 1.0, 0.0]
    assert quickstart.format_check(prompts, responses + ["a\nb"], samples + [{"answer": "x"}]) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert quickstart.answer_score(prompts, responses, samples) == pytest.approx([1.1, 0.1, 1.1, 0.1])
    with pytest.raises(ValueError, match="no 'answer' field"):
        quickstart.exact_match([""], ["3"], [{}])
    assert not math.isnan(sum(quickstart.answer_score(prompts, responses, samples)))
