"""Where a rollout's rewards come from: a rule-based function, a reward model in this
process, or a reward model (or rule) behind a PyTriton server.

Every source has ``submit(rollout) -> result``, where ``rollout`` is this data-parallel
rank's :class:`~nemo_aligner.algorithms.rollout.Rollout` (before gathering) and ``result()``
returns its rewards ``[N]`` (float64) on every rank of the model-parallel group. ``submit``
is called right after generation and ``result`` after the log-prob passes, so a remote
server scores while the actor computes. A source that fails raises the same error on every
rank of the group (a :class:`~nemo_aligner.utils.errors.RunError` for the ones a user can fix).

Exactly one source is configured: ``reward.function`` (rule), ``reward.model_path``
(in-process reward model) or, with both unset, the server at
``remote_rm.reward_model.{ip, port}`` (NeMo-Aligner's default).
"""

import json

import torch

from nemo_aligner.models.collect import forward_only_collect
from nemo_aligner.models.heads import sequence_rewards
from nemo_aligner.rewards.functions import call_reward_function, load_reward_function
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.distributed import broadcast_within_pipeline, is_model_parallel_source, run_on_model_parallel_source


class RuleReward:
    """``reward.function``: computed once per model-parallel group, on its first rank."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_reward_function(spec)

    def score(self, prompts, responses, samples) -> list[float]:
        return call_reward_function(self.fn, prompts, responses, samples, self.spec)

    def submit(self, rollout):
        values = run_on_model_parallel_source(lambda: self.score(rollout.prompts, rollout.responses, rollout.samples))
        return lambda: torch.tensor(values, dtype=torch.float64)


def sequence_batch(sequences: list[list[int]], pad_id: int, width: int) -> dict:
    """Right-padded sequences with what :func:`~nemo_aligner.models.heads.sequence_rewards`
    reads (``last_index``, ``seq_ids``)."""
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    seq_ids = torch.full((len(sequences), width), -1, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        seq_ids[i, : len(seq)] = i
    lengths = torch.tensor([len(s) for s in sequences])
    return {
        "tokens": tokens,
        "position_ids": torch.arange(width).unsqueeze(0).expand_as(tokens),
        "seq_ids": seq_ids,
        "last_index": torch.arange(len(sequences)) * width + lengths - 1,
    }


@torch.no_grad()
def score_sequences(model_chunks, sequences: list[list[int]], pad_id: int, micro_batch_size: int,
                    reduction: str = "last") -> torch.Tensor:
    """Raw rewards ``[len(sequences), num_attributes]`` (float32) of a reward model, on every
    rank of this model-parallel group (no data-parallel split: each replica scores its own)."""
    n = len(sequences)
    longest = max(len(s) for s in sequences)
    width = -(-longest // 8) * 8
    rows = list(range(n)) + [n - 1] * (-n % micro_batch_size)
    micro = [sequence_batch([sequences[i] for i in rows[s : s + micro_batch_size]], pad_id, width)
             for s in range(0, len(rows), micro_batch_size)]
    parts = forward_only_collect(
        model_chunks, micro, lambda output, batch: sequence_rewards(output, batch, reduction).detach().float().cpu()
    )
    values = torch.cat(parts)[:n] if parts is not None else None
    return broadcast_within_pipeline(values)


class ModelReward:
    """``reward.model_path``: a reward model (ours, or a Hugging Face sequence classifier)
    built at the actor's parallel layout and run in this process."""

    def __init__(self, path: str, pad_id: int, vocab_size: int, micro_batch_size: int, standardization_overrides=None):
        from nemo_aligner.models.reward_model import reward_model_from_checkpoint, reward_settings, standardization

        self.model, model_cfg = reward_model_from_checkpoint(path)
        settings = reward_settings(model_cfg)
        if settings["num_attributes"] != 1:
            raise ValueError(
                f"reward.model_path={path} has {settings['num_attributes']} outputs; online RL needs a "
                "reward model with one (a binary_ranking model)"
            )
        if int(model_cfg["vocab_size"]) < vocab_size:
            raise ValueError(
                f"reward.model_path={path} has a vocabulary of {model_cfg['vocab_size']} ids but the policy's "
                f"tokenizer has {vocab_size}; use a reward model trained with the policy's tokenizer"
            )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.reduction = settings["reduction"]
        self.shift = standardization(model_cfg, standardization_overrides)
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size
        self.max_length = int(model_cfg.get("encoder_seq_length") or model_cfg["max_position_embeddings"])

    def submit(self, rollout):
        def result():
            sequences = rollout.sequences()
            longest = max(len(s) for s in sequences)
            if longest > self.max_length:
                raise ValueError(
                    f"a rollout sequence has {longest} tokens but reward.model_path takes at most "
                    f"{self.max_length}; lower the response length"
                )
            raw = score_sequences([self.model], sequences, self.pad_id, self.micro_batch_size, self.reduction)[:, 0]
            if self.shift is not None:
                raw = (raw - self.shift[0].reshape(-1)[0]) / self.shift[1].reshape(-1)[0]
            return raw.double()

        return result


def sent_from_model_parallel_source(send):
    """Call ``send()`` (which returns a future) now on each model-parallel group's first rank;
    returns ``wait()``, which gives the future's result on every rank of the group, or raises
    its error (or ``send``'s) on every rank."""
    pending = None
    if is_model_parallel_source():
        try:
            pending = send()
        except Exception as e:  # noqa: BLE001 -- surfaced at wait(), on every rank
            pending = e

    def wait():
        def collect():
            if isinstance(pending, Exception):
                raise pending
            return pending.result()

        return run_on_model_parallel_source(collect)

    return wait


def sentences_payload(prompts, responses, samples) -> list[bytes]:
    """What a client sends as ``sentences``: one JSON object per sample with its prompt,
    response and prompt row, so a server serving a rule-based reward can call it."""
    return [json.dumps({"prompt": p, "response": r, "sample": s}).encode() for p, r, s in zip(prompts, responses, samples)]


class RemoteReward:
    """A reward server (``serve_reward_model.py``), asked by each model-parallel group's first
    rank; requests go out at ``submit`` and are awaited at ``result``."""

    def __init__(self, client, pad_to_length: int | None, pad_id: int):
        self.client = client
        self.pad_to_length = pad_to_length
        self.pad_id = pad_id

    def submit(self, rollout):
        wait = sent_from_model_parallel_source(lambda: self.client.submit_rewards(
            rollout.sequences(), sentences_payload(rollout.prompts, rollout.responses, rollout.samples),
            pad_to_length=self.pad_to_length, pad_id=self.pad_id,
        ))
        return lambda: torch.tensor(wait(), dtype=torch.float64)

    def close(self):
        if self.client is not None:  # only each model-parallel group's first rank holds one
            self.client.close()


def build_reward_source(cfg, tokenizer, vocab_size: int, micro_batch_size: int):
    """The source ``cfg`` names (see the module docstring)."""
    function = cfg_get(cfg, "reward.function", None)
    model_path = cfg_get(cfg, "reward.model_path", None)
    if function and model_path:
        raise ValueError("set only one of reward.function and reward.model_path (or neither, for remote_rm)")
    pad_id = int(tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    if function:
        return RuleReward(str(function))
    if model_path:
        return ModelReward(str(model_path), pad_id, vocab_size, micro_batch_size)
    from nemo_aligner.servers.client import RewardClient

    remote = cfg_get(cfg, "remote_rm", {}) or {}
    server = remote.get("reward_model") or {}
    client = RewardClient(
        host=str(server.get("ip", "localhost")), port=int(server.get("port", 5555)),
        endpoint=str(server.get("name", "reward_model")),
        init_timeout_s=float(remote.get("init_timeout_s", 60) or 60),
        inference_timeout_s=float(remote.get("inference_timeout_s", 60) or 60),
        key="remote_rm",
    )
    return RemoteReward(client, remote.get("pad_to_length"), pad_id)
