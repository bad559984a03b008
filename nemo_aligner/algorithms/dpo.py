"""DPO family (DPO, IPO, hinge, SimPO, RPO) and KTO on Megatron-Core GPT.

One forward pass per micro-batch scores both responses of every pair: the chosen and
rejected sequences are rows of one batch (or segments of packed rows), and per-sequence
log-prob sums come from segment sums of the response tokens' log-probs
(:func:`~nemo_aligner.algorithms.reference.sequence_logps`). Under Megatron's per-token
loss mode a micro-batch returns ``(sum of per-pair losses, number of pairs)``, so the loss
is the mean over the pairs of the whole global batch, whatever the parallel layout.

Per pair (see :mod:`nemo_aligner.losses.preference`)::

    loss = preference_loss_weight * preference_loss(π_c, π_r, ref_c, ref_r)
         + sft_loss_weight * (-π_c / n_c)            (chosen response NLL, per token)

with log-probs averaged per token when ``preference_average_log_probs``. The implicit
rewards reported are ``β (log π - log π_ref)`` (``β log π`` for the reference-free SimPO).

Metrics: ``loss``, ``preference_loss``, ``sft_loss``, ``acc`` (fraction of pairs with
``reward_chosen > reward_rejected``; ties count as wrong), ``rewards_chosen_mean``,
``rewards_rejected_mean``, ``rewards_all_mean``, ``rewards_all_std`` (population std over
the chosen and rejected rewards), ``num_pairs``.
"""

import math
from dataclasses import dataclass

import torch

from nemo_aligner.algorithms.reference import (
    REFERENCE_MODES,
    ReferenceWeights,
    attach_reference_logps,
    reference_for,
    items_used,
    precompute_reference_logps,
    reference_token_budget,
    sequence_logps,
)
from nemo_aligner.algorithms.trainer import BaseTrainer
from nemo_aligner.losses.preference import (
    GT_REWARD_LOSSES,
    PAIRED_LOSSES,
    REFERENCE_FREE_LOSSES,
    kto_kl_estimate,
    kto_loss,
    preference_loss,
)
from nemo_aligner.models.forward import forward_batch, loss_positions
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.cpu_support import native_torch


@dataclass
class DPOSettings:
    """``model.dpo.*``."""

    loss_type: str = "dpo"
    beta: float = 0.1
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = True
    gt_reward_scale: float = 1.0
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ref_logprobs: str = "precompute"

    @classmethod
    def from_cfg(cls, cfg) -> "DPOSettings":
        d = cfg_get(cfg, "model.dpo", {}) or {}
        s = cls(
            loss_type=str(d.get("preference_loss", "dpo")),
            beta=float(d.get("ref_policy_kl_penalty", 0.1)),
            preference_loss_weight=float(d.get("preference_loss_weight", 1.0)),
            sft_loss_weight=float(d.get("sft_loss_weight", 0.0)),
            preference_average_log_probs=bool(d.get("preference_average_log_probs", False)),
            sft_average_log_probs=bool(d.get("sft_average_log_probs", True)),
            gt_reward_scale=float(d.get("gt_reward_scale", 1.0)),
            label_smoothing=float(d.get("label_smoothing", 0.0)),
            simpo_gamma=float(d.get("simpo_gamma", 0.5)),
            ref_logprobs=str(d.get("ref_logprobs", "precompute")),
        )
        if s.loss_type not in PAIRED_LOSSES:
            raise ValueError(f"model.dpo.preference_loss={s.loss_type!r}; choose one of {PAIRED_LOSSES}")
        if s.ref_logprobs not in REFERENCE_MODES:
            raise ValueError(f"model.dpo.ref_logprobs={s.ref_logprobs!r}; choose one of {REFERENCE_MODES}")
        if s.beta <= 0:
            raise ValueError(f"model.dpo.ref_policy_kl_penalty={s.beta}; it must be > 0")
        return s

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE_LOSSES


def dpo_loss_fn(batch: dict, s: DPOSettings):
    """The loss function over the last stage's logits for one micro-batch of pairs."""

    def loss_fn(logits):
        with native_torch():
            return _dpo_loss(logits, batch, s)

    return loss_fn


def _dpo_loss(logits, batch, s: DPOSettings):
    sums, counts = sequence_logps(logits, batch)
    counts = counts.clamp(min=1)
    pol_c, pol_r = sums[0::2], sums[1::2]
    if s.needs_reference:
        ref = batch["ref_logps"].to(sums.device, sums.dtype)
        ref_c, ref_r = ref[0::2], ref[1::2]
    else:
        ref_c = ref_r = None
    if s.preference_average_log_probs:
        pol_c, pol_r = pol_c / counts[0::2], pol_r / counts[1::2]
        if ref_c is not None:
            ref_c, ref_r = ref_c / counts[0::2], ref_r / counts[1::2]
    gt = batch.get("gt_rewards")
    gt = gt.to(sums.device, sums.dtype) if gt is not None else None
    pref = preference_loss(
        pol_c, pol_r, ref_c, ref_r, loss_type=s.loss_type, beta=s.beta,
        chosen_gt_rewards=gt[0::2] if gt is not None else None,
        rejected_gt_rewards=gt[1::2] if gt is not None else None,
        gt_reward_scale=s.gt_reward_scale, label_smoothing=s.label_smoothing, simpo_gamma=s.simpo_gamma,
    )
    sft = -sums[0::2] / (counts[0::2] if s.sft_average_log_probs else 1.0)
    per_pair = s.preference_loss_weight * pref + s.sft_loss_weight * sft
    real = batch["weight"].to(sums.device) > 0
    zero = torch.zeros_like(per_pair)
    loss_sum = torch.where(real, per_pair, zero).sum()

    with torch.no_grad():
        reward_c = s.beta * (pol_c - ref_c) if ref_c is not None else s.beta * pol_c
        reward_r = s.beta * (pol_r - ref_r) if ref_r is not None else s.beta * pol_r
        metrics = pair_metric_sums(real, loss_sum, pref, sft, reward_c, reward_r)
    return loss_sum, real.sum().int(), metrics


def pair_metric_sums(real, loss_sum, preference_loss, sft_loss, reward_c, reward_r) -> dict:
    """A micro-batch's sums for :func:`pair_metrics` over the real pairs (``real`` [P] bool;
    the per-pair tensors are [P]); ``loss_sum`` is already summed."""
    zero = torch.zeros_like(reward_c)
    masked = lambda x: torch.where(real, x, zero).sum()  # noqa: E731
    return {
        "loss_sum": loss_sum.detach(),
        "preference_loss_sum": masked(preference_loss),
        "sft_loss_sum": masked(sft_loss),
        "acc_sum": masked((reward_c > reward_r).to(zero.dtype)),
        "rewards_chosen_sum": masked(reward_c),
        "rewards_rejected_sum": masked(reward_r),
        "rewards_sq_sum": masked(reward_c**2 + reward_r**2),
        "num_pairs": real.sum(),
    }


def pair_metrics(sums: dict) -> dict:
    n = max(sums["num_pairs"], 1.0)
    mean_all = (sums["rewards_chosen_sum"] + sums["rewards_rejected_sum"]) / (2 * n)
    var_all = max(sums["rewards_sq_sum"] / (2 * n) - mean_all**2, 0.0)
    return {
        "loss": sums["loss_sum"] / n,
        "preference_loss": sums["preference_loss_sum"] / n,
        "sft_loss": sums["sft_loss_sum"] / n,
        "acc": sums["acc_sum"] / n,
        "rewards_chosen_mean": sums["rewards_chosen_sum"] / n,
        "rewards_rejected_mean": sums["rewards_rejected_sum"] / n,
        "rewards_all_mean": mean_all,
        "rewards_all_std": math.sqrt(var_all),
        "num_pairs": sums["num_pairs"],
    }


class DPOTrainer(BaseTrainer):
    """DPO-family loop; ``reference`` is set (a :class:`ReferenceWeights`) in swap mode,
    otherwise the batches carry precomputed reference log-probs (or none are needed)."""

    algo = "dpo"

    def __init__(self, *args, settings: DPOSettings, reference: ReferenceWeights | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.reference = reference

    def run_global_batch(self, step_batch, forward_only: bool) -> dict:
        if self.reference is not None:
            attach_reference_logps(self.reference, self.model, step_batch.micro_batches)
        return super().run_global_batch(step_batch, forward_only)

    def forward_step(self, batch, model):
        return forward_batch(model, batch, logits_at=loss_positions(batch)), dpo_loss_fn(batch, self.settings)

    def finalize_metrics(self, sums: dict) -> dict:
        return pair_metrics(sums)


# ------------------------------------------------------------------------------------ KTO
@dataclass
class KTOSettings:
    """``model.kto.*``."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    average_log_probs: bool = False
    ref_logprobs: str = "precompute"

    @classmethod
    def from_cfg(cls, cfg) -> "KTOSettings":
        d = cfg_get(cfg, "model.kto", {}) or {}
        s = cls(
            beta=float(d.get("ref_policy_kl_penalty", 0.1)),
            desirable_weight=float(d.get("desirable_loss_weight", 1.0)),
            undesirable_weight=float(d.get("undesirable_loss_weight", 1.0)),
            average_log_probs=bool(d.get("average_log_probs", False)),
            ref_logprobs=str(d.get("ref_logprobs", "precompute")),
        )
        if s.ref_logprobs not in REFERENCE_MODES:
            raise ValueError(f"model.kto.ref_logprobs={s.ref_logprobs!r}; choose one of {REFERENCE_MODES}")
        if s.beta <= 0:
            raise ValueError(f"model.kto.ref_policy_kl_penalty={s.beta}; it must be > 0")
        return s

    needs_reference = True


def kto_loss_fn(batch: dict, s: KTOSettings):
    """Loss over one micro-batch of KTO samples (each: its sequence and a mismatched one).

    The KL reference point ``z0`` is estimated from the micro-batch's mismatched sequences
    (:func:`~nemo_aligner.losses.preference.kto_kl_estimate`); micro-batches are formed the
    same way at every parallel layout, so the estimate does not depend on the layout.
    """

    def loss_fn(logits):
        with native_torch():
            return _kto_loss(logits, batch, s)

    return loss_fn


def _kto_loss(logits, batch, s: KTOSettings):
    sums, counts = sequence_logps(logits, batch)
    ref = batch["ref_logps"].to(sums.device, sums.dtype)
    if s.average_log_probs:
        counts = counts.clamp(min=1)
        sums, ref = sums / counts, ref / counts
    pol, pol_kl = sums[0::2], sums[1::2]
    ref_pol, ref_kl = ref[0::2], ref[1::2]
    weight = batch["weight"].to(sums.device, sums.dtype)
    real = weight > 0
    z0 = kto_kl_estimate(pol_kl, ref_kl, weight)
    desirable = batch["desirable"].to(sums.device) > 0
    per_sample = kto_loss(pol, ref_pol, desirable, z0, beta=s.beta,
                          desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight)
    zero = torch.zeros_like(per_sample)
    loss_sum = torch.where(real, per_sample, zero).sum()
    with torch.no_grad():
        reward = s.beta * (pol - ref_pol)
        good, bad = real & desirable, real & ~desirable
        metrics = {
            "loss_sum": loss_sum.detach(),
            "kl_sum": z0 * real.sum(),
            "rewards_chosen_sum": torch.where(good, reward, zero).sum(),
            "rewards_rejected_sum": torch.where(bad, reward, zero).sum(),
            "num_desirable": good.sum(),
            "num_undesirable": bad.sum(),
            "num_samples": real.sum(),
        }
    return loss_sum, real.sum().int(), metrics


class KTOTrainer(DPOTrainer):
    """KTO loop (unpaired data); reference handling as :class:`DPOTrainer`.

    Metrics: ``loss``, ``kl`` (the reference point ``z0``, sample-weighted mean over
    micro-batches), ``rewards_chosen_mean`` / ``rewards_rejected_mean`` (mean implicit reward
    of desirable / undesirable samples), ``num_samples``.
    """

    algo = "kto"

    def forward_step(self, batch, model):
        return forward_batch(model, batch, logits_at=loss_positions(batch)), kto_loss_fn(batch, self.settings)

    def finalize_metrics(self, sums: dict) -> dict:
        n = max(sums["num_samples"], 1.0)
        return {
            "loss": sums["loss_sum"] / n,
            "kl": sums["kl_sum"] / n,
            "rewards_chosen_mean": sums["rewards_chosen_sum"] / max(sums["num_desirable"], 1.0),
            "rewards_rejected_mean": sums["rewards_rejected_sum"] / max(sums["num_undesirable"], 1.0),
            "num_samples": sums["num_samples"],
        }


# ------------------------------------------------------------------------------- builders
def _setup_reference(trainer, settings, model, datasets, collate, micro_batch_size):
    """Precompute reference log-probs into the datasets, or keep the weights for swapping.

    Only what the run reads is precomputed: the training samples of its ``max_steps`` global
    batches, and the validation samples of ``limit_val_batches`` batches."""
    if not settings.needs_reference:
        return None
    if settings.ref_logprobs == "swap":
        return reference_for(model)
    loaders = {"train": trainer.train_loader, "validation": trainer.val_loader}
    for name, (ds, base) in datasets.items():
        sampler = loaders[name].sampler
        if name == "train":
            items = items_used(sampler, trainer.max_steps)
        else:
            batches = sampler.steps_per_epoch if trainer.limit_val_batches is None else trainer.limit_val_batches
            items = [i for n, b in enumerate(sampler._global_batches(0, 0)) if n < batches for i in b]
        budget = loaders[name].token_budget
        precompute_reference_logps(model, ds, base, collate, micro_batch_size, desc=f"reference log-probs ({name})",
                                   items=items, row_length=loaders[name].row_length,
                                   token_budget=reference_token_budget(budget) if budget else None)
    return None


def _build(cfg, trainer_cls, settings, make_dataset):
    from nemo_aligner.algorithms import group_data
    from nemo_aligner.utils import setup

    setup.init_distributed(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    opts = group_data.data_settings(cfg, model_cfg)
    train_path, val_path = group_data.data_paths(cfg)
    base_train = make_dataset(train_path, tokenizer, opts)
    group_data.log_dataset("train", base_train)
    base_val = make_dataset(val_path, tokenizer, opts) if val_path else None
    if base_val is not None:
        group_data.log_dataset("validation", base_val)
    train_ds = group_data.maybe_pack(cfg, base_train, opts["max_seq_length"])
    val_ds = group_data.maybe_pack(cfg, base_val, opts["max_seq_length"], use_packed_file=False,
                                     pack_size=getattr(train_ds, "pack_size", None)) if base_val is not None else None
    train_loader, val_loader, collate = group_data.group_loaders(cfg, model_cfg, train_ds, val_ds, tokenizer.pad_id)
    model = setup.build_model(cfg, model_cfg, vocab_size)
    datasets = {"train": (train_ds, base_train)}
    if base_val is not None:
        datasets["validation"] = (val_ds, base_val)
    trainer = trainer_cls(
        cfg, model, None, None, train_loader, val_loader,
        checkpoint_manager=setup.checkpoint_manager(cfg), model_cfg_to_save=model_cfg,
        tokenizer_dir=tokenizer_src, settings=settings,
    )
    # The initial weights (before any resume): the reference a resumed run must keep using.
    trainer.reference = _setup_reference(trainer, settings, model, datasets, collate, int(model_cfg["micro_batch_size"]))
    return setup.finish_build(cfg, trainer, model_cfg, model)


def build_dpo_trainer(cfg) -> DPOTrainer:
    """Everything a DPO-family run needs, from its config (see ``conf/gpt_dpo.yaml``)."""
    from nemo_aligner.data.preference import PreferenceDataset

    settings = DPOSettings.from_cfg(cfg)

    def make(path, tokenizer, opts):
        return PreferenceDataset(path, tokenizer, opts["max_seq_length"], truncation=opts["truncation"],
                                 add_bos=opts["add_bos"], add_eos=opts["add_eos"], shift=True,
                                 require_gt_rewards=settings.loss_type in GT_REWARD_LOSSES)

    return _build(cfg, DPOTrainer, settings, make)


def build_kto_trainer(cfg) -> KTOTrainer:
    """Everything a KTO run needs, from its config (see ``conf/gpt_kto.yaml``)."""
    from nemo_aligner.data.preference import KTODataset

    settings = KTOSettings.from_cfg(cfg)
    seed = int(cfg_get(cfg, "seed", 1234))

    def make(path, tokenizer, opts):
        return KTODataset(path, tokenizer, opts["max_seq_length"], truncation=opts["truncation"],
                          add_bos=opts["add_bos"], add_eos=opts["add_eos"], seed=seed)

    return _build(cfg, KTOTrainer, settings, make)
