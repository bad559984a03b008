"""GRPO (group relative policy optimization), NeMo-RL's formulation, on the shared online loop.

Each step draws ``num_generations_per_prompt`` samples for each of ``num_prompts_per_step``
prompts. Advantages are per group (:func:`~nemo_aligner.losses.policy.group_advantages`:
leave-one-out baseline, divided by the group's std where it is > 0) and apply to every
response token. The loss per token, with ``r = exp(logp - logp_old)`` (``logp_old`` from the
rollout's training forward)::

    l_t = max(-A r, -A clip(r, 1 - ratio_clip_min, 1 + ratio_clip_max))   (dual clip with ratio_clip_c)
        + initial_policy_kl_penalty * kl(logp_t, logp_init_t)             (k1 | k2 | k3, clamped)

averaged over all response tokens of the optimizer step's global batch (``token_level_loss``)
or per sequence and then over sequences.
"""

from dataclasses import dataclass

from nemo_aligner.algorithms.online import OnlineSettings, OnlineTrainer, build_online_trainer, old_logprobs
from nemo_aligner.losses.policy import KL_TYPES, clipped_surrogate, group_advantages, kl_estimate, masked_mean
from nemo_aligner.utils.config import cfg_get


@dataclass
class GRPOSettings(OnlineSettings):
    normalize_rewards: bool = True
    use_leave_one_out_baseline: bool = True
    kl_type: str = "k3"
    kl_input_clamp_value: float | None = 20.0
    kl_output_clamp_value: float | None = 10.0
    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.2
    ratio_clip_c: float | None = None
    token_level_loss: bool = True

    @classmethod
    def from_cfg(cls, cfg) -> "GRPOSettings":
        g = cfg_get(cfg, "model.grpo", {}) or {}
        loop = cfg_get(cfg, "trainer.grpo", {}) or {}
        s = cls(
            **cls.common_fields(g, loop, "model.grpo"),
            prompts_per_step=int(g.get("num_prompts_per_step", 8)),
            samples_per_prompt=int(g.get("num_generations_per_prompt", 8)),
            normalize_rewards=bool(g.get("normalize_rewards", True)),
            use_leave_one_out_baseline=bool(g.get("use_leave_one_out_baseline", True)),
            kl_type=str(g.get("kl_type", "k3")),
            kl_input_clamp_value=g.get("kl_input_clamp_value", 20.0),
            kl_output_clamp_value=g.get("kl_output_clamp_value", 10.0),
            ratio_clip_min=float(g.get("ratio_clip_min", 0.2)),
            ratio_clip_max=float(g.get("ratio_clip_max", 0.2)),
            ratio_clip_c=None if g.get("ratio_clip_c") is None else float(g["ratio_clip_c"]),
            token_level_loss=bool(g.get("token_level_loss", True)),
        )
        if s.prompts_per_step < 1 or s.samples_per_prompt < 1:
            raise ValueError("model.grpo.num_prompts_per_step and num_generations_per_prompt must be >= 1")
        if s.kl_type not in KL_TYPES:
            raise ValueError(f"model.grpo.kl_type={s.kl_type!r}; choose one of {KL_TYPES}")
        if s.ratio_clip_c is not None and s.ratio_clip_c <= 1:
            raise ValueError(f"model.grpo.ratio_clip_c={s.ratio_clip_c}; the dual clip must be > 1 (or null)")
        if s.initial_policy_kl_penalty < 0:
            raise ValueError(f"trainer.grpo.initial_policy_kl_penalty={s.initial_policy_kl_penalty}; it must be >= 0")
        return s


class GRPOTrainer(OnlineTrainer):
    algo = "grpo"

    @property
    def token_level_loss(self) -> bool:
        return self.settings.token_level_loss

    def kl(self, logp, init_logp):
        s = self.settings
        return kl_estimate(logp, init_logp, s.kl_type, s.kl_input_clamp_value, s.kl_output_clamp_value)

    def prepare(self, rollout):
        s = self.settings
        adv = group_advantages(rollout.rewards, rollout.group_ids, leave_one_out=s.use_leave_one_out_baseline,
                               normalize=s.normalize_rewards)
        mask = rollout.mask
        per_token = {"advantages": adv.float().unsqueeze(1) * mask}
        if rollout.logprobs is not None:
            per_token["old_logprobs"] = rollout.logprobs
        metrics = {"advantages_abs_mean": float(adv.abs().mean())}
        if rollout.init_logprobs is not None:
            per_token["init_logprobs"] = rollout.init_logprobs
            policy = rollout.logprobs if rollout.logprobs is not None else rollout.gen_logprobs
            metrics["init_policy_kl"] = float(masked_mean(self.kl(policy, rollout.init_logprobs), mask))
        return per_token, metrics

    def policy_loss(self, logp, batch):
        s = self.settings
        mask = batch["loss_mask"].to(logp.dtype)
        loss, ratio, clamped = clipped_surrogate(logp, old_logprobs(batch, logp), batch["advantages"].to(logp.device),
                                                 s.ratio_clip_min, s.ratio_clip_max, s.ratio_clip_c)
        sums = {"ppo_ratio_sum": (ratio * mask).sum(), "ppo_ratio_clamped_sum": (clamped * mask).sum()}
        if "init_logprobs" in batch and s.initial_policy_kl_penalty:
            kl = self.kl(logp, batch["init_logprobs"].to(logp.device))
            loss = loss + s.initial_policy_kl_penalty * kl
            sums["kl_sum"] = (kl * mask).sum()
        return loss, sums


def build_grpo_trainer(cfg) -> GRPOTrainer:
    """Everything a GRPO run needs, from its config (see ``conf/gpt_grpo.yaml``)."""
    settings = GRPOSettings.from_cfg(cfg)
    return build_online_trainer(cfg, GRPOTrainer, settings,
                                "model.grpo.num_prompts_per_step x model.grpo.num_generations_per_prompt")
