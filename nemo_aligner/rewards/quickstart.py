"""Reward functions for tasks with a known answer (the bundled RL task and its kind).

Each follows the rule-based reward contract (:mod:`nemo_aligner.rewards.functions`) and
reads the expected answer from the prompt row's ``answer`` field::

    {"text": "Count the words: cat sun owl\\n\\n", "answer": "3"}

- :func:`exact_match`: 1 when the response, stripped of surrounding white space, is the
  answer; else 0.
- :func:`numeric_answer`: 1 when the first number in the response equals the answer
  (a number); else 0.
- :func:`format_check`: 1 when the response is one non-empty line of at most
  ``len(answer words) + 2`` words; else 0 (it rewards the shape, not the content).
- :func:`answer_score`: ``exact_match`` plus a tenth of ``format_check``, so a correct
  answer scores 1.1, a well-formed wrong one 0.1 and a rambling one 0 (the default of the
  bundled GRPO/REINFORCE configs).
"""

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _answer(sample: dict, i: int) -> str:
    answer = sample.get("answer")
    if answer is None:
        raise ValueError(f"prompt row {i} has no 'answer' field; these rewards need {{\"text\", \"answer\"}} rows")
    return str(answer).strip()


def exact_match(prompts, responses, samples):
    return [float(r.strip() == _answer(s, i)) for i, (r, s) in enumerate(zip(responses, samples))]


def numeric_answer(prompts, responses, samples):
    scores = []
    for i, (response, sample) in enumerate(zip(responses, samples)):
        found = _NUMBER.search(response)
        try:
            target = float(_answer(sample, i))
        except ValueError:
            raise ValueError(f"prompt row {i}: answer {sample.get('answer')!r} is not a number") from None
        scores.append(float(found is not None and float(found.group()) == target))
    return scores


def format_check(prompts, responses, samples):
    scores = []
    for i, (response, sample) in enumerate(zip(responses, samples)):
        text = response.strip()
        words = text.split()
        limit = len(_answer(sample, i).split()) + 2
        scores.append(float(bool(words) and "\n" not in text and len(words) <= limit))
    return scores


def answer_score(prompts, responses, samples):
    exact = exact_match(prompts, responses, samples)
    shape = format_check(prompts, responses, samples)
    return [e + 0.1 * f for e, f in zip(exact, shape)]
