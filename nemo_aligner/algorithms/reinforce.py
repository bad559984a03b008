"""REINFORCE with NeMo-Aligner's leave-one-out (RLOO) baseline, on the shared online loop.

Each step draws ``num_rollouts_per_prompt`` samples per prompt (``num_rollout_samples`` in
all). The reward is penalized by the sequence-level KL to the initial policy, and the
baseline is the mean of the other samples of the same prompt that ended properly
(:func:`~nemo_aligner.losses.policy.rloo_baseline`)::

    kl_i   = mean_t (logp_it - logp_init_it)            (|.| with use_absolute_kl)
    r'_i   = r_i - initial_policy_kl_penalty * kl_i     (rewards_with_kl)
    A_i    = r'_i - rloo_baseline(r')_i
    l_t    = -A_i logp_t                                (every response token of sample i)

averaged over all response tokens of the optimizer step's global batch. (NeMo-Aligner
averages per micro-batch and skips a micro-batch without a sample that ended; the global
token mean here makes the loss independent of the micro-batch size and the parallel layout.)
``ppo_ratio`` reports ``exp(logp - logp_old)``, 1 on a rollout's first optimizer step.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.algorithms.online import OnlineSettings, OnlineTrainer, build_online_trainer, old_logprobs
from nemo_aligner.losses.policy import reinforce_loss, rloo_baseline, sequence_kl_penalty
from nemo_aligner.utils.config import cfg_get


@dataclass
class ReinforceSettings(OnlineSettings):
    use_absolute_kl: bool = True

    @classmethod
    def from_cfg(cls, cfg) -> "ReinforceSettings":
        r = cfg_get(cfg, "model.reinforce", {}) or {}
        loop = cfg_get(cfg, "trainer.reinforce", {}) or {}
        per_prompt = int(loop.get("num_rollouts_per_prompt", 4))
        samples = int(r.get("num_rollout_samples", 512))
        if per_prompt < 1:
            raise ValueError(f"trainer.reinforce.num_rollouts_per_prompt={per_prompt}; it must be >= 1")
        if samples % per_prompt:
            raise ValueError(
                f"model.reinforce.num_rollout_samples={samples} is not divisible by "
                f"trainer.reinforce.num_rollouts_per_prompt={per_prompt}"
            )
        s = cls(
            **cls.common_fields(r, loop, "model.reinforce"),
            prompts_per_step=samples // per_prompt,
            samples_per_prompt=per_prompt,
            use_absolute_kl=bool(loop.get("use_absolute_kl", True)),
        )
        return s


class ReinforceTrainer(OnlineTrainer):
    algo = "reinforce"

    @property
    def needs_policy_logprobs(self) -> bool:  # the KL penalty goes into the reward, before training
        return super().needs_policy_logprobs or self.settings.initial_policy_kl_penalty != 0

    def prepare(self, rollout):
        s = self.settings
        mask = rollout.mask
        if rollout.init_logprobs is not None:
            kl = sequence_kl_penalty(rollout.logprobs.double(), rollout.init_logprobs.double(), mask, s.use_absolute_kl)
        else:
            kl = torch.zeros_like(rollout.rewards)
        rewards_with_kl = rollout.rewards - s.initial_policy_kl_penalty * kl
        baseline = rloo_baseline(rewards_with_kl, rollout.group_ids, rollout.is_end)
        adv = (rewards_with_kl - baseline).float()
        per_token = {"advantages": adv.unsqueeze(1) * mask}
        if rollout.logprobs is not None:
            per_token["old_logprobs"] = rollout.logprobs
        metrics = {"init_policy_kl": float(kl.mean()), "rewards_with_kl": float(rewards_with_kl.mean()),
                   "baseline": float(baseline.mean())}
        return per_token, metrics

    def policy_loss(self, logp, batch):
        mask = batch["loss_mask"].to(logp.dtype)
        ratio = torch.exp(logp.detach() - old_logprobs(batch, logp))
        loss = reinforce_loss(logp, batch["advantages"].to(logp.device))
        return loss, {"ppo_ratio_sum": (ratio * mask).sum(), "ppo_ratio_clamped_sum": (ratio * mask).sum()}


def build_reinforce_trainer(cfg) -> ReinforceTrainer:
    """Everything a REINFORCE run needs, from its config (see ``conf/gpt_reinforce_actor.yaml``)."""
    settings = ReinforceSettings.from_cfg(cfg)
    return build_online_trainer(cfg, ReinforceTrainer, settings, "model.reinforce.num_rollout_samples")
