"""The rollout engine interface shared by every generation backend.

PPO, REINFORCE/GRPO, SPIN and SteerLM generate through a :class:`RolloutEngine`:

- ``generate(prompts, sampling_params, seeds=None) -> GenerationOutput``: one response per
  prompt (token ids, text, lengths, per-token log-probs of the sampled tokens, ``is_end``);
- ``refit(model)``: make the engine generate with ``model``'s current weights, without
  rebuilding the engine;
- ``free()``: release the engine's memory (KV cache, its own weight copy).

Collective semantics: under tensor parallelism every rank of a tensor-parallel group calls
``generate`` with the same prompts and seeds and receives the same output; data-parallel
replicas generate their own prompts independently.
"""

import abc
from dataclasses import dataclass, field

import torch


class GenerationError(ValueError):
    """A request the engine cannot serve (a prompt too long, empty, bad parameters)."""


class MissingDependencyError(ImportError):
    """An optional package the requested backend needs is not installed (the message names
    it and how to install it, or what to use instead)."""


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    - ``greedy``: take the arg-max (``temperature``, ``top_k``, ``top_p`` are ignored).
    - ``temperature``: logits are divided by it before ``top_k`` / ``top_p``.
    - ``top_k``: keep the ``k`` most probable tokens (0: all).
    - ``top_p``: keep the smallest set of most probable tokens whose probability sums to at
      least ``top_p`` (1.0: all).
    - ``max_new_tokens``: at most this many tokens per response (EOS included).
    - ``min_new_tokens``: EOS and ``stop_token_ids`` cannot be drawn, and stop strings do not
      end a response, before the response has this many tokens.
    - ``seed``: base seed; sample ``i`` of a call uses ``seed + i`` unless ``generate`` is
      given explicit per-sample seeds (see :meth:`RolloutEngine.generate`).
    - ``stop_strings``: a response ends at the first token whose decoded response text
      contains one of them (the string stays in the response).
    - ``stop_token_ids``: extra token ids that end a response like EOS does (kept in it).
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        self.stop_strings = tuple(self.stop_strings or ())
        self.stop_token_ids = tuple(int(i) for i in (self.stop_token_ids or ()))
        if self.max_new_tokens < 1:
            raise GenerationError(f"sampling.max_new_tokens={self.max_new_tokens}; it must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise GenerationError(
                f"sampling.min_new_tokens={self.min_new_tokens} must be between 0 and "
                f"sampling.max_new_tokens={self.max_new_tokens}"
            )
        if not self.greedy:
            if self.temperature <= 0:
                raise GenerationError(
                    f"sampling.temperature={self.temperature} must be > 0; "
                    "use sampling.greedy=true for arg-max decoding"
                )
            if self.top_k < 0:
                raise GenerationError(f"sampling.top_k={self.top_k} must be >= 0 (0 keeps every token)")
            if not 0.0 < self.top_p <= 1.0:
                raise GenerationError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop_strings):
            raise GenerationError("sampling.stop_strings contains an empty string; remove it")

    @property
    def modifies_distribution(self) -> bool:
        """True when tokens are drawn from something other than the model's distribution."""
        return self.greedy or self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0


@dataclass
class GenerationOutput:
    """Responses to a batch of prompts, in prompt order.

    Tensors are right-padded to the longest response ``T``:

    - ``response_tokens`` ``[B, T]`` long: generated ids (EOS / stop token included when it
      ended the response), ``pad_id`` after ``response_lengths``;
    - ``response_lengths`` ``[B]`` long: number of generated tokens;
    - ``logprobs`` ``[B, T]`` float32: ``log p(token)`` under the model's own next-token
      distribution (softmax of the raw logits over the tokenizer's vocabulary: temperature 1,
      no top-k / top-p, no min-length masking). These are PPO's "generation log-probs" and
      equal what the trainer computes for the same tokens; 0 after the length;
    - ``sampling_logprobs`` ``[B, T]`` float32: ``log q(token)`` under the distribution the
      token was actually drawn from (after temperature, top-k, top-p and min-length masking;
      0 for greedy decoding, where ``q`` is a point mass); 0 after the length;
    - ``is_end`` ``[B]`` bool: the response ended by itself (EOS, a stop token or a stop
      string) rather than by running into ``max_new_tokens``.

    ``prompt_ids`` are the prompts as token ids and ``texts`` the decoded responses
    (special tokens dropped).
    """

    prompt_ids: list[list[int]]
    response_tokens: torch.Tensor
    response_lengths: torch.Tensor
    logprobs: torch.Tensor
    sampling_logprobs: torch.Tensor
    is_end: torch.Tensor
    texts: list[str] = field(default_factory=list)

    @property
    def response_ids(self) -> list[list[int]]:
        return [
            row[:n].tolist() for row, n in zip(self.response_tokens, self.response_lengths.tolist())
        ]

    def sequences(self) -> list[list[int]]:
        """Prompt followed by response, per sample (what a trainer scores)."""
        return [p + r for p, r in zip(self.prompt_ids, self.response_ids)]

    def __len__(self) -> int:
        return len(self.prompt_ids)


class RolloutEngine(abc.ABC):
    """A generation backend; see the module docstring for the contract."""

    @abc.abstractmethod
    def generate(self, prompts, sampling_params: SamplingParams, seeds=None) -> GenerationOutput:
        """Generate one response per prompt.

        ``prompts``: strings (tokenized with the engine's tokenizer, no BOS/EOS added unless
        the engine is configured to add BOS) or token-id sequences. ``seeds``: one int per
        prompt; a sample's tokens depend only on its prompt, its seed and the weights, not on
        the other prompts in the call. Without ``seeds``, sample ``i`` uses
        ``sampling_params.seed + i``.
        """

    @abc.abstractmethod
    def refit(self, model) -> None:
        """Generate with ``model``'s current weights from now on (no rebuild)."""

    @abc.abstractmethod
    def free(self) -> None:
        """Release the engine's memory; ``refit`` must not be called afterwards."""
