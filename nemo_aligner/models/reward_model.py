"""Build, restore and run reward models (:class:`~nemo_aligner.models.heads.GPTRewardModel`).

Config keys (``model.*``, saved in every checkpoint's ``model_config.yaml``, which is how
a checkpoint is recognized as a reward model and rebuilt for scoring):

- ``reward_model_type``: ``binary_ranking`` (Bradley-Terry family, one output) or
  ``regression`` (one output per attribute, SteerLM style);
- ``num_attributes``: outputs of the head (1 for ``binary_ranking``; unset: 1, or for
  ``regression`` NeMo-Aligner's nine SteerLM attributes);
- ``reward_reduction``: ``last`` (the last real token's value) or ``mean`` (over tokens);
- ``reward_head_dtype``: ``null`` (the model's precision) or ``32``/``bf16``/``16``;
- ``reward_standardization``: ``{enable, mean, std}``, applied at inference:
  ``r' = (r - mean) / std`` (scalars, or one value per attribute).

A reward model starts from a GPT checkpoint of ours (the backbone is loaded, the head
keeps its initialization), from a reward-model checkpoint (everything is loaded), or from a
Hugging Face directory (the backbone's weights are imported).
"""

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from nemo_aligner.checkpoint.distributed import CheckpointError, is_checkpoint, load_checkpoint, read_model_config
from nemo_aligner.data.steerlm import ATTRIBUTES as STEERLM_ATTRIBUTES
from nemo_aligner.models.collect import forward_only_collect
from nemo_aligner.models.gpt import PRECISIONS, build_gpt_model, params_dtype
from nemo_aligner.models.heads import REDUCTIONS, GPTRewardModel, sequence_rewards
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.cpu_support import cuda_on_cpu

REWARD_MODEL_TYPES = ("binary_ranking", "regression")
HEAD_PREFIX = "reward_head."


def reward_settings(model_cfg) -> dict:
    """Validated reward-model keys of ``model_cfg`` (see the module docstring)."""
    kind = str(cfg_get(model_cfg, "reward_model_type", "binary_ranking"))
    if kind not in REWARD_MODEL_TYPES:
        raise ValueError(f"model.reward_model_type={kind!r}; choose one of {REWARD_MODEL_TYPES}")
    num = cfg_get(model_cfg, "num_attributes", None)
    # Unset: one output for ranking, NeMo-Aligner's nine SteerLM attributes for regression.
    num = int(num) if num is not None else (len(STEERLM_ATTRIBUTES) if kind == "regression" else 1)
    if kind == "binary_ranking" and num != 1:
        raise ValueError(f"model.num_attributes={num} with binary_ranking; a ranking reward model has one output: set it to 1")
    if num < 1:
        raise ValueError(f"model.num_attributes={num}; it must be at least 1")
    reduction = str(cfg_get(model_cfg, "reward_reduction", "last"))
    if reduction not in REDUCTIONS:
        raise ValueError(f"model.reward_reduction={reduction!r}; choose one of {REDUCTIONS}")
    head_dtype = cfg_get(model_cfg, "reward_head_dtype", None)
    if head_dtype is not None and str(head_dtype).lower() not in PRECISIONS:
        raise ValueError(f"model.reward_head_dtype={head_dtype!r}; choose one of {sorted(PRECISIONS)} or null")
    dtype = PRECISIONS[str(head_dtype).lower()] if head_dtype is not None else params_dtype(model_cfg)
    return {"type": kind, "num_attributes": num, "reduction": reduction, "head_dtype": dtype}


def build_reward_model(model_cfg, vocab_size: int, seed=None, initialize: bool = True) -> GPTRewardModel:
    """This rank's reward-model chunk (not restored, not DDP-wrapped)."""
    s = reward_settings(model_cfg)
    model = build_gpt_model(
        model_cfg, vocab_size, seed=seed, initialize=initialize, model_class=GPTRewardModel,
        num_attributes=s["num_attributes"], head_dtype=s["head_dtype"], head_bias=s["type"] == "regression",
    )
    if model.post_process:
        model.reward_head.to(dtype=s["head_dtype"])  # build_gpt_model casts every parameter to the model's dtype
    return model


def is_reward_checkpoint(path) -> bool:
    return is_checkpoint(path) and "reward_model_type" in read_model_config(path)


def load_backbone(model: GPTRewardModel, path) -> None:
    """Load a GPT checkpoint of ours into ``model``, except the head (which it lacks)."""
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith(HEAD_PREFIX)}
    with cuda_on_cpu():
        state = dist_checkpointing.load({"model": sharded}, str(path), strict="assume_ok_unexpected")
    result = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX) and not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} backbone tensors (first: {missing[0]}); is it a GPT checkpoint?")


def load_hf_backbone(model: GPTRewardModel, hf_dir) -> None:
    """Import a Hugging Face model into ``model``: a sequence classifier (a reward model) whole,
    its ``score`` as the head; a causal LM as the backbone only (its LM head is unused)."""
    from nemo_aligner.checkpoint.hf import load_hf_weights, read_hf_config
    from nemo_aligner.checkpoint.hf_arch import is_sequence_classifier

    head = getattr(model, "reward_head", None)
    if head is None or is_sequence_classifier(read_hf_config(hf_dir)):
        load_hf_weights(model, hf_dir)
        return
    # load_hf_weights fills every parameter it sees; the head has no counterpart there.
    del model.reward_head
    try:
        load_hf_weights(model, hf_dir)
    finally:
        model.reward_head = head


def restore_reward_model(model: GPTRewardModel, path) -> str:
    """Load ``path`` into ``model``; returns what was loaded (``reward model``, ``backbone``)."""
    p = Path(path)
    if is_reward_checkpoint(p):
        load_checkpoint(p, [model])
        return "reward model"
    if is_checkpoint(p):
        load_backbone(model, p)
        return "backbone"
    if (p / "config.json").is_file():
        load_hf_backbone(model, p)
        return "backbone"
    raise CheckpointError(f"{path} is neither one of our checkpoints nor a Hugging Face model directory")


def read_reward_model_config(path) -> dict:
    """The ``model.*`` config of a reward model: one of our reward-model checkpoints, or a
    Hugging Face ``*ForSequenceClassification`` directory."""
    from nemo_aligner.checkpoint.hf import is_hf_dir, model_cfg_from_hf_dir

    if is_reward_checkpoint(path):
        return read_model_config(path)
    if is_hf_dir(path) and not is_checkpoint(path):
        model_cfg = model_cfg_from_hf_dir(path)
        if "reward_model_type" in model_cfg:
            model_cfg.setdefault("encoder_seq_length", model_cfg["max_position_embeddings"])
            return model_cfg
    raise CheckpointError(
        f"{path} is not a reward model (neither a checkpoint whose model_config.yaml has reward_model_type "
        "nor a Hugging Face *ForSequenceClassification directory); give the final_model of "
        "train_reward_model.py or a sequence classifier"
    )


def reward_model_from_checkpoint(path):
    """``(model, model_cfg)``: a reward model (see :func:`read_reward_model_config`) at the
    current parallel layout."""
    model_cfg = read_reward_model_config(path)
    model_cfg["tensor_model_parallel_size"] = parallel_state.get_tensor_model_parallel_world_size()
    model_cfg["pipeline_model_parallel_size"] = parallel_state.get_pipeline_model_parallel_world_size()
    model = build_reward_model(model_cfg, int(model_cfg["vocab_size"]), initialize=False)
    if is_checkpoint(path):
        load_checkpoint(path, [model])
    else:
        load_hf_backbone(model, path)
    return model, model_cfg


def standardization(model_cfg, overrides: dict | None = None):
    """``(mean, std)`` tensors to apply, or ``None`` when standardization is off.

    ``overrides`` (``enable``/``mean``/``std``; ``None`` values keep the checkpoint's)
    take precedence over ``model.reward_standardization``."""
    saved = dict(cfg_get(model_cfg, "reward_standardization", {}) or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            saved[key] = value
    if not saved.get("enable", False):
        return None
    mean = torch.as_tensor(saved.get("mean", 0.0), dtype=torch.float32)
    std = torch.as_tensor(saved.get("std", 1.0), dtype=torch.float32)
    if (std <= 0).any():
        raise ValueError(f"reward_standardization.std={saved.get('std')}; it must be > 0")
    return mean, std


@torch.no_grad()
def score_groups(model_chunks, groups: list[dict], collate_fn, micro_batch_size: int, reduction: str = "last"):
    """Rewards ``[num_sequences, num_attributes]`` (float32, unstandardized) of every
    sequence of ``groups``, in order, on every rank. Data-parallel ranks split the groups;
    must be called by every rank."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + len(g["sequences"]))
    first = model_chunks[0] if isinstance(model_chunks, list) else model_chunks
    num_attributes = int(getattr(getattr(first, "module", first), "num_attributes", 1))
    out = torch.zeros(offsets[-1], num_attributes, dtype=torch.float64)
    mine = list(range(dp_rank, len(groups), dp_size))
    for start in range(0, len(mine), micro_batch_size):
        idx = mine[start : start + micro_batch_size]
        batch = collate_fn([groups[i] for i in idx])
        values = forward_only_collect(
            model_chunks, [batch], lambda output, b: sequence_rewards(output, b, reduction).detach().cpu()
        )
        if values is not None:
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in idx])
            out[rows] = values[0].double()
    if dist.is_initialized():
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(out, group=parallel_state.get_pipeline_model_parallel_group())
    return out.float()
