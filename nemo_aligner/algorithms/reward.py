"""Reward-model training: Bradley-Terry family (pairs) and regression (rated texts).

``model.reward_model_type``:

- ``binary_ranking``: each micro-batch holds pairs (chosen and rejected side by side, or
  packed); per pair ``model.rm.loss_type`` of ``bt`` (``-log σ(r_c - r_r)``), ``margin_bt``
  or ``scaled_bt`` (see :mod:`nemo_aligner.losses.reward`). The loss is the mean over the
  pairs of the global batch. Metrics: ``loss``, ``acc`` (``r_c > r_r``), ``rewards_chosen_mean``,
  ``rewards_rejected_mean``, ``rewards_all_mean``, ``rewards_all_std``, ``num_pairs``.
- ``regression``: masked squared error over the rated attributes; the loss is the mean
  over every rated attribute of the global batch. Metrics: ``loss`` (that mean squared
  error), ``num_labels``.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.algorithms.dpo import pair_metric_sums, pair_metrics
from nemo_aligner.algorithms.trainer import BaseTrainer
from nemo_aligner.losses.reward import PAIRWISE_LOSSES, pairwise_reward_loss, regression_loss
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.models.heads import sequence_rewards
from nemo_aligner.models.reward_model import reward_settings
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.cpu_support import native_torch


@dataclass
class RMSettings:
    model_type: str = "binary_ranking"
    loss_type: str = "bt"
    reduction: str = "last"

    @classmethod
    def from_cfg(cls, cfg, model_cfg) -> "RMSettings":
        s = reward_settings(model_cfg)
        loss_type = str(cfg_get(cfg, "model.rm.loss_type", "bt"))
        if loss_type not in PAIRWISE_LOSSES:
            raise ValueError(f"model.rm.loss_type={loss_type!r}; choose one of {PAIRWISE_LOSSES}")
        return cls(model_type=s["type"], loss_type=loss_type, reduction=s["reduction"])


def _ranking_loss(token_rewards, batch, s: RMSettings):
    rewards = sequence_rewards(token_rewards, batch, s.reduction)[:, 0]
    r_c, r_r = rewards[0::2], rewards[1::2]
    margin = batch["margin"].to(rewards.device, rewards.dtype) if s.loss_type != "bt" else None
    per_pair = pairwise_reward_loss(s.loss_type, r_c, r_r, margin)
    real = batch["weight"].to(rewards.device) > 0
    zero = torch.zeros_like(per_pair)
    loss_sum = torch.where(real, per_pair, zero).sum()
    with torch.no_grad():
        metrics = pair_metric_sums(real, loss_sum, per_pair, zero, r_c, r_r)
    return loss_sum, real.sum().int(), metrics


def _regression_loss(token_rewards, batch, s: RMSettings):
    predictions = sequence_rewards(token_rewards, batch, s.reduction)
    labels = batch["attribute_labels"].to(predictions.device)
    sse, count = regression_loss(predictions, labels)
    real = batch["weight"].to(predictions.device) > 0
    loss_sum = torch.where(real, sse, torch.zeros_like(sse)).sum()
    num_labels = torch.where(real, count, torch.zeros_like(count)).sum()
    return loss_sum, num_labels.int(), {"loss_sum": loss_sum.detach(), "num_labels": num_labels.detach()}


def rm_loss_fn(batch: dict, s: RMSettings):
    """The loss function over the last stage's per-token rewards for one micro-batch."""
    compute = _ranking_loss if s.model_type == "binary_ranking" else _regression_loss

    def loss_fn(token_rewards):
        with native_torch():
            return compute(token_rewards, batch, s)

    return loss_fn


class RewardModelTrainer(BaseTrainer):
    algo = "rm"

    def __init__(self, *args, settings: RMSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings

    def forward_step(self, batch, model):
        return forward_batch(model, batch), rm_loss_fn(batch, self.settings)

    def finalize_metrics(self, sums: dict) -> dict:
        if self.settings.model_type == "binary_ranking":
            metrics = pair_metrics(sums)
            for key in ("preference_loss", "sft_loss"):
                metrics.pop(key)
            return metrics
        n = max(sums["num_labels"], 1.0)
        return {"loss": sums["loss_sum"] / n, "num_labels": sums["num_labels"]}


def build_rm_model(cfg, model_cfg, vocab_size: int):
    """This rank's reward model, restored from ``pretrained_checkpoint.restore_from_path``
    when set (see :func:`~nemo_aligner.models.reward_model.restore_reward_model`), DDP-wrapped."""
    from nemo_aligner.models.reward_model import build_reward_model, restore_reward_model
    from nemo_aligner.utils.logging import get_logger
    from nemo_aligner.utils.optim import wrap_ddp

    model = build_reward_model(model_cfg, vocab_size, seed=int(cfg_get(cfg, "seed", 1234)))
    path = cfg_get(cfg, "pretrained_checkpoint.restore_from_path", None)
    if path is not None:
        what = restore_reward_model(model, path)
        get_logger().info(f"restored the {what} from {path}")
    from nemo_aligner.models.reward_model import HEAD_PREFIX
    from nemo_aligner.utils import setup

    setup.attach_peft(cfg, model_cfg, model, also_train=(HEAD_PREFIX,))  # LoRA trains the new head too
    return wrap_ddp(model, model_cfg)


def build_rm_trainer(cfg) -> RewardModelTrainer:
    """Everything a reward-model run needs, from its config (see ``conf/training_rm.yaml``)."""
    from nemo_aligner.algorithms import group_data
    from nemo_aligner.data.preference import PreferenceDataset, RegressionRewardDataset
    from nemo_aligner.utils import setup

    from nemo_aligner.checkpoint.distributed import read_model_config
    from nemo_aligner.models.reward_model import is_reward_checkpoint, reward_settings

    setup.init_distributed(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    path = cfg_get(cfg, "pretrained_checkpoint.restore_from_path", None)
    if path is not None and is_reward_checkpoint(path):
        saved = read_model_config(path)  # the head's shape comes with its weights
        model_cfg.update({k: saved[k] for k in ("reward_model_type", "num_attributes") if k in saved})
    model_cfg["num_attributes"] = reward_settings(model_cfg)["num_attributes"]  # checkpoints record the number
    settings = RMSettings.from_cfg(cfg, model_cfg)
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    opts = group_data.data_settings(cfg, model_cfg)
    common = dict(truncation=opts["truncation"], add_bos=opts["add_bos"], add_eos=opts["add_eos"])

    def make(path):
        if settings.model_type == "regression":
            outputs = reward_settings(model_cfg)["num_attributes"]
            return RegressionRewardDataset(path, tokenizer, opts["max_seq_length"], outputs, **common)
        return PreferenceDataset(path, tokenizer, opts["max_seq_length"], shift=False,
                                 require_margin=settings.loss_type != "bt", **common)

    train_path, val_path = group_data.data_paths(cfg)
    train_ds = make(train_path)
    group_data.log_dataset("train", train_ds)
    val_ds = make(val_path) if val_path else None
    if val_ds is not None:
        group_data.log_dataset("validation", val_ds)
    train_ds = group_data.maybe_pack(cfg, train_ds, opts["max_seq_length"])
    val_ds = group_data.maybe_pack(cfg, val_ds, opts["max_seq_length"], use_packed_file=False,
                                     pack_size=getattr(train_ds, "pack_size", None)) if val_ds is not None else None
    train_loader, val_loader, _ = group_data.group_loaders(cfg, model_cfg, train_ds, val_ds, tokenizer.pad_id)
    model = build_rm_model(cfg, model_cfg, vocab_size)
    trainer = RewardModelTrainer(
        cfg, model, None, None, train_loader, val_loader,
        checkpoint_manager=setup.checkpoint_manager(cfg), model_cfg_to_save=model_cfg,
        tokenizer_dir=tokenizer_src, settings=settings,
    )
    return setup.finish_build(cfg, trainer, model_cfg, model)
