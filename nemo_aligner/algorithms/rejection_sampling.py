"""Rejection sampling (NeMo-Aligner's RS actor) on the shared online loop.

Each step draws ``num_rollouts_per_prompt`` responses for each of ``num_rollout_samples``
prompts, scores them with the run's reward (rule, in-process reward model or reward server),
keeps the ``top_n_rollouts`` best of every prompt (:func:`select_top_n`) and trains on the kept
responses with the SFT loss::

    l = - sum_{kept i, t} logp_it / (number of kept response tokens)

over the optimizer step's global batch. Every response of the rollout goes through the
training forward (those not kept carry no loss), so ``model.global_batch_size`` counts
responses of the rollout, as in the other online methods. Metrics: NeMo-Aligner's rollout
metrics (``rewards``: all responses) plus ``rewards_selected`` (the kept ones) and
``fraction_selected_ended``.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.algorithms.online import OnlineSettings, OnlineTrainer, build_online_trainer
from nemo_aligner.utils.config import cfg_get


def select_top_n(rewards: torch.Tensor, group_ids: torch.Tensor, n: int) -> torch.Tensor:
    """``[N]`` bool: the ``n`` highest-reward samples of every group (prompt). As NeMo-Aligner's
    ``select_topk``: each group's samples sorted by reward in a stable ascending sort and the
    last ``n`` taken, so among equal rewards the later samples are kept."""
    keep = torch.zeros(len(rewards), dtype=torch.bool)
    for group in torch.unique(group_ids):
        members = torch.nonzero(group_ids == group).flatten()
        order = torch.sort(rewards[members].double(), stable=True).indices
        keep[members[order[-n:]]] = True
    return keep


@dataclass
class RSSettings(OnlineSettings):
    top_n_rollouts: int = 1

    @classmethod
    def from_cfg(cls, cfg) -> "RSSettings":
        r = cfg_get(cfg, "model.rs", {}) or {}
        loop = cfg_get(cfg, "trainer.rs", {}) or {}
        s = cls(
            **cls.common_fields(r, loop, "model.rs"),
            prompts_per_step=int(r.get("num_rollout_samples", 64)),
            samples_per_prompt=int(r.get("num_rollouts_per_prompt", 4)),
            top_n_rollouts=int(r.get("top_n_rollouts", 1)),
        )
        if s.prompts_per_step < 1 or s.samples_per_prompt < 1:
            raise ValueError("model.rs.num_rollout_samples and num_rollouts_per_prompt must be >= 1")
        if not 1 <= s.top_n_rollouts <= s.samples_per_prompt:
            raise ValueError(f"model.rs.top_n_rollouts={s.top_n_rollouts} must be between 1 and "
                             f"model.rs.num_rollouts_per_prompt={s.samples_per_prompt} (the responses kept per prompt)")
        if s.initial_policy_kl_penalty != 0:
            raise ValueError("trainer.rs.initial_policy_kl_penalty: rejection sampling has no KL term; set it to 0")
        return s


class RSTrainer(OnlineTrainer):
    algo = "rs"

    def prepare(self, rollout):
        keep = select_top_n(rollout.rewards, rollout.group_ids, self.settings.top_n_rollouts)
        kept = keep.to(rollout.rewards.dtype)
        ended = rollout.is_end.to(kept.dtype)
        metrics = {"rewards_selected": float((rollout.rewards * kept).sum() / kept.sum()),
                   "fraction_selected_ended": float((ended * kept).sum() / kept.sum())}
        return {"loss_mask": rollout.mask * keep.unsqueeze(1).to(rollout.mask.dtype)}, metrics

    def policy_loss(self, logp, batch):
        return -logp, {}


def build_rs_trainer(cfg) -> RSTrainer:
    """Everything a rejection-sampling run needs (see ``conf/gpt_rs_actor.yaml``)."""
    settings = RSSettings.from_cfg(cfg)
    return build_online_trainer(cfg, RSTrainer, settings, "model.rs.num_rollout_samples x num_rollouts_per_prompt")
