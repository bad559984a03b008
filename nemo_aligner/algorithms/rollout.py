"""One rollout step, shared by every online method (REINFORCE, GRPO, PPO, rejection sampling).

:meth:`RolloutGenerator.run` takes this data-parallel rank's prompts for the step and:

1. repeats each prompt ``samples_per_prompt`` times and generates with the
   :class:`~nemo_aligner.generation.engine.RolloutEngine` (refit to the policy first). Sample
   ``i`` of the step's global batch (prompt-major: the ``g``-th sample of global prompt ``p``
   is ``i = p * samples_per_prompt + g``) is drawn with seed :func:`sample_seed`
   ``(seed, step, i)``, so a sample depends on the run's seed, the step and its place in the
   global batch only: not on the data-parallel layout, and a resumed run draws the same
   samples;
2. generates in micro-batches of ``rollout_micro_batch_size`` prompts and asks the reward
   source (and, for PPO, the critic) to score each one as soon as it is generated; a remote
   server computes while the next micro-batch is generated and step 3 runs;
3. recomputes the policy's log-probs of the sampled tokens with the training forward
   (``logprobs``) and, when a reference is given, the initial policy's (``init_logprobs``) by
   swapping in its CPU copy of the weights;
4. gathers the samples of every data-parallel rank, so every rank holds the whole step's
   :class:`Rollout` in global order (what the losses normalize over, and what makes the
   optimizer's mini-batches independent of the layout).

Per-token tensors are aligned with label positions: entry ``t`` of a row is about token
``t + 1`` of ``tokens`` (the response's ``j``-th token sits at label position
``prompt_length - 1 + j``). Under pipeline parallelism the engine holds every layer on every
stage ("folded", see :mod:`nemo_aligner.generation.refit`): the stages of a data-parallel
replica split its samples for generation and share the results.
"""

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from megatron.core import parallel_state

from nemo_aligner.generation.engine import GenerationOutput, SamplingParams
from nemo_aligner.models.collect import forward_only_collect
from nemo_aligner.models.logprobs import token_logprobs
from nemo_aligner.utils.distributed import all_gather_data_parallel, all_gather_objects, broadcast_within_pipeline
from nemo_aligner.utils.timers import Timers


def sample_seed(seed: int, step: int, index: int) -> int:
    """The generation seed of sample ``index`` of step ``step`` (a 63-bit hash of the three)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step) % 2**32, int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass
class Rollout:
    """A step's samples, in global order (every rank holds all of them).

    ``tokens`` ``[N, W]``: prompt + response, right-padded with ``pad_id``; ``group_ids``:
    the global index of each sample's prompt; per-token tensors ``[N, W]`` (label-aligned,
    0 outside the response): ``gen_logprobs`` (the engine's), ``logprobs`` and
    ``init_logprobs`` (training forward with the policy / initial weights; None when not
    computed), ``values`` (the critic's, PPO only); ``rewards`` ``[N]`` float64.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    is_end: torch.Tensor
    group_ids: torch.Tensor
    gen_logprobs: torch.Tensor
    rewards: torch.Tensor
    logprobs: torch.Tensor | None = None
    init_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    prompts: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    samples: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """``[N, W]`` float32: 1 at the label positions of response tokens."""
        pos = torch.arange(self.tokens.shape[1]).unsqueeze(0)
        start = (self.prompt_lengths - 1).unsqueeze(1)
        return ((pos >= start) & (pos < start + self.response_lengths.unsqueeze(1))).float()

    @property
    def sequence_lengths(self) -> torch.Tensor:
        return self.prompt_lengths + self.response_lengths

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.sequence_lengths.tolist())]


def _pad_width(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    if tensor.shape[1] >= width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """The rollouts one after the other, padded to the widest."""
    width = max(p.tokens.shape[1] for p in parts)
    out = {}
    for f in fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], list):
            out[f.name] = [v for part in values for v in part]
        elif values[0] is None:
            out[f.name] = None
        elif values[0].dim() == 2:
            fill = pad_id if f.name == "tokens" else 0.0
            out[f.name] = torch.cat([_pad_width(v, width, fill) for v in values])
        else:
            out[f.name] = torch.cat(values)
    return Rollout(**out)


def label_aligned(values: torch.Tensor, prompt_lengths: list[int], lengths: list[int], width: int) -> torch.Tensor:
    """``[B, T]`` response-aligned values -> ``[B, width]`` label-aligned (see the module docstring)."""
    out = torch.zeros(values.shape[0], width, dtype=values.dtype)
    for i, (p, n) in enumerate(zip(prompt_lengths, lengths)):
        out[i, p - 1 : p - 1 + n] = values[i, :n]
    return out


def training_micro_batch(rollout: Rollout, rows, per_token: dict) -> dict:
    """A collated micro-batch of ``rollout``'s ``rows`` for the training forward: tokens,
    positions, labels (the next token), ``loss_mask`` (response label positions) and the
    given ``[N, W]`` tensors (e.g. advantages, old log-probs) for those rows."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    tokens = rollout.tokens[rows]
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens),
        "labels": labels,
        "loss_mask": rollout.mask[rows],
    }
    for key, value in per_token.items():
        batch[key] = value[rows]
    return batch


@dataclass
class RolloutSettings:
    samples_per_prompt: int
    sampling: SamplingParams
    val_sampling: SamplingParams
    forward_micro_batch_size: int
    seed: int
    pad_multiple: int = 1  # sequence widths are rounded up to a multiple of this (TP for sequence parallelism)
    generation_batch_size: int | None = None  # prompts per engine batch (None: the engine's own)
    val_generation_batch_size: int | None = None


class RolloutGenerator:
    """Generates, scores and log-probs one step's samples (see the module docstring).

    ``reference``: a :class:`~nemo_aligner.algorithms.reference.ReferenceWeights` holding the
    initial policy, or None to skip ``init_logprobs``. ``reward_source``: one of
    :mod:`nemo_aligner.algorithms.reward_sources` (None: the rewards come with the values).
    ``value_source`` (PPO): ``submit(rollout) -> result`` with ``result() -> (values [n, W]
    label-aligned float32, rewards [n] or None)``, from the critic server.
    """

    def __init__(self, model_chunks, engine, tokenizer, reward_source, settings: RolloutSettings,
                 reference=None, timers: Timers | None = None, value_source=None):
        self.model = model_chunks if isinstance(model_chunks, list) else [model_chunks]
        self.engine = engine
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        self.reward_source = reward_source
        self.value_source = value_source
        self.settings = settings
        self.reference = reference
        self.timers = timers or Timers()

    # ------------------------------------------------------------------ public
    def run(self, prompts: list[dict], global_offset: int, step: int, validation: bool = False,
            policy_logprobs: bool = True) -> Rollout:
        """The whole step's :class:`Rollout`; collective over every rank.

        ``prompts``: this rank's prompt items (:class:`~nemo_aligner.data.prompts.PromptDataset`),
        ``global_offset``: the global index of the first. Validation draws one greedy sample per
        prompt and computes no log-probs. ``policy_logprobs=False`` skips the policy's log-prob
        pass (a caller that trains once on the rollout gets the same values from its training
        forward).
        """
        k = 1 if validation else self.settings.samples_per_prompt
        params = self.settings.val_sampling if validation else self.settings.sampling
        items = [item for item in prompts for _ in range(k)]
        group_ids = [global_offset + j for j in range(len(prompts)) for _ in range(k)]
        seeds = [sample_seed(self.settings.seed, step, (global_offset + j) * k + g)
                 for j in range(len(prompts)) for g in range(k)]
        batch_size = self.settings.val_generation_batch_size if validation else self.settings.generation_batch_size
        if batch_size:
            self.engine.max_batch_size = batch_size
        chunk = batch_size or max(len(items), 1)
        parts, rewards, values = [], [], []
        with self.timers.time("generate"):
            self.engine.refit(self.model[0])
        for start in range(0, len(items), chunk):
            sl = slice(start, start + chunk)
            with self.timers.time("generate"):
                out = self._generate([it["prompt_ids"] for it in items[sl]], params, seeds[sl])
            part = self._local_rollout(items[sl], group_ids[sl], out)
            # Scoring starts as soon as a micro-batch is generated; it is awaited only when needed.
            if self.reward_source is not None:
                with self.timers.time("reward"):
                    rewards.append(self.reward_source.submit(part))
            if self.value_source is not None:
                values.append(self.value_source.submit(part))
            parts.append(part)
        if not items:  # a validation share can be empty on the last data-parallel ranks
            return concat_rollouts(all_gather_data_parallel(self._local_rollout([], [], _as_lists(None))), self.pad_id)
        local = concat_rollouts(parts, self.pad_id)
        if not validation:
            if policy_logprobs:
                with self.timers.time("logprobs"):
                    local.logprobs = self.logprobs(local)
            if self.reference is not None:
                with self.timers.time("init_logprobs"), self.reference.swapped():
                    local.init_logprobs = self.logprobs(local)
        if values:
            with self.timers.time("critic_wait"):
                got = [pending() for pending in values]
            width = local.tokens.shape[1]
            local.values = torch.cat([_pad_width(v, width, 0.0)[:, :width] for v, _ in got])
            if self.reward_source is None:
                local.rewards = torch.cat([r for _, r in got]).to(torch.float64)
        if rewards:
            with self.timers.time("reward"):
                local.rewards = torch.cat([pending() for pending in rewards]).to(torch.float64)
        return concat_rollouts(all_gather_data_parallel(local), self.pad_id)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``[N, W]`` log-probs of every next token under the current weights, through the
        training forward (any TP/PP), on every rank; 0 outside the responses."""
        n = len(rollout)
        mbs = self.settings.forward_micro_batch_size
        rows = list(range(n)) + [n - 1] * (-n % mbs)  # the pipeline needs equal micro-batches
        empty = {}
        micro = [training_micro_batch(rollout, rows[s : s + mbs], empty) for s in range(0, len(rows), mbs)]
        parts = forward_only_collect(
            self.model, micro, lambda logits, batch: token_logprobs(logits, batch["labels"]).detach().float().cpu()
        )
        values = torch.cat(parts)[:n] * rollout.mask if parts is not None else None
        return broadcast_within_pipeline(values)

    # ----------------------------------------------------------------- helpers
    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int]) -> dict:
        """Responses for ``prompt_ids`` as plain lists; pipeline stages split the work."""
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        stage = parallel_state.get_pipeline_model_parallel_rank()
        n = len(prompt_ids)
        share = -(-n // pp)
        lo, hi = min(stage * share, n), min((stage + 1) * share, n)
        mine = _as_lists(self.engine.generate(prompt_ids[lo:hi], params, seeds=seeds[lo:hi])) if hi > lo else _as_lists(None)
        if pp == 1:
            return mine
        parts = all_gather_objects(mine, group=parallel_state.get_pipeline_model_parallel_group())
        return {key: [v for part in parts for v in part[key]] for key in mine}

    def _local_rollout(self, items, group_ids, out: dict) -> Rollout:
        prompt_lengths = [len(it["prompt_ids"]) for it in items]
        lengths = [len(r) for r in out["response_ids"]]
        longest = max((p + n for p, n in zip(prompt_lengths, lengths)), default=1)
        m = self.settings.pad_multiple
        width = -(-longest // m) * m
        tokens = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        gen = torch.zeros(len(items), width)
        for i, (it, resp, lp) in enumerate(zip(items, out["response_ids"], out["logprobs"])):
            seq = it["prompt_ids"] + resp
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            p = len(it["prompt_ids"])
            gen[i, p - 1 : p - 1 + len(resp)] = torch.tensor(lp, dtype=torch.float32)
        return Rollout(
            tokens=tokens,
            prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long),
            response_lengths=torch.tensor(lengths, dtype=torch.long),
            is_end=torch.tensor(out["is_end"], dtype=torch.bool),
            group_ids=torch.tensor(group_ids, dtype=torch.long),
            gen_logprobs=gen,
            rewards=torch.zeros(len(items), dtype=torch.float64),
            prompts=[it["text"] for it in items],
            responses=list(out["texts"]),
            samples=[it["sample"] for it in items],
        )


def _as_lists(out: GenerationOutput | None) -> dict:
    if out is None:
        return {"response_ids": [], "logprobs": [], "is_end": [], "texts": []}
    lengths = out.response_lengths.tolist()
    return {
        "response_ids": out.response_ids,
        "logprobs": [row[:n].tolist() for row, n in zip(out.logprobs, lengths)],
        "is_end": out.is_end.tolist(),
        "texts": list(out.texts),
    }
