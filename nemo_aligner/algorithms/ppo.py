"""PPO (NeMo-Aligner's): the actor's loop, with the critic (and the reward model) behind
PyTriton servers.

One step: a rollout of ``num_rollout_samples`` prompts (one sample each) through the shared
:mod:`~nemo_aligner.algorithms.rollout`; each generated micro-batch goes to ``critic_infer``
at once (values, and rewards when the reward model is combined into the critic server, or a
reward server / rule alongside) and is awaited only after the policy and initial-policy
log-prob passes. Then, with NeMo-Aligner's definitions (:mod:`nemo_aligner.losses.policy`)::

    kl_t   = logp_t - logp_init_t                 (|.| with use_absolute_kl)
    R_t    = r [t = last] - initial_policy_kl_penalty * kl_t
    A, G   = gae(R, V, mask, discount_factor, gae_lambda)        (G = A + V: the critic's returns)
    A      = (A - mean) / sqrt(var + 1e-8)        (normalize_advantages; over the whole rollout,
                                                  every data-parallel rank's samples)
    l_t    = max(-A r, -A clip(r, 1 - ratio_eps, 1 + ratio_eps)) - entropy_bonus * H_t

averaged over the response tokens of samples that ended properly (``is_end``) in each
optimizer step's global batch. ``critic_train`` gets the rollout's tokens, returns, values and
response mask as soon as the advantages exist, and trains while the actor does; its answer is
awaited before the next rollout asks the critic anything (so a critic failure surfaces within
a step) and before each save. Saves go together: ``critic_save`` and the actor's checkpoint.

Critic warm-up: on the first step of a run, ``critic_warmup_steps - 1`` extra rollouts of the
step's prompts (with their own seeds) train the critic alone before the actor's first update
(NeMo-Aligner trains the critic on ``critic_warmup_steps`` rollouts and the actor on the last).

``trainer.ppo.overlap_critic: false`` awaits each critic call as soon as it is made (no
overlap), so the overlap's gain can be measured (``benchmarks/ppo_step.py``).
"""

from dataclasses import dataclass

import torch

from nemo_aligner.algorithms.online import OnlineSettings, OnlineTrainer, build_online_trainer, old_logprobs
from nemo_aligner.losses.policy import (
    clipped_surrogate, gae, kl_penalty, masked_mean, masked_mean_var, masked_whiten, ppo_token_rewards,
)
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.distributed import run_on_global_rank_zero, run_on_model_parallel_source
from nemo_aligner.utils.errors import RunError


@dataclass
class PPOSettings(OnlineSettings):
    entropy_bonus: float = 0.0
    ratio_eps: float = 0.2
    discount_factor: float = 1.0
    gae_lambda: float = 0.95
    normalize_advantages: bool = True
    use_absolute_kl: bool = True
    critic_warmup_steps: int = 0
    overlap_critic: bool = True

    @classmethod
    def from_cfg(cls, cfg) -> "PPOSettings":
        p = cfg_get(cfg, "model.ppo", {}) or {}
        loop = cfg_get(cfg, "trainer.ppo", {}) or {}
        s = cls(
            **cls.common_fields(p, loop, "model.ppo"),
            prompts_per_step=int(p.get("num_rollout_samples", 64)),
            samples_per_prompt=1,
            entropy_bonus=float(p.get("entropy_bonus", 0.0) or 0.0),
            ratio_eps=float(p.get("ratio_eps", 0.2)),
            discount_factor=float(loop.get("discount_factor", 1.0)),
            gae_lambda=float(loop.get("gae_lambda", 0.95)),
            normalize_advantages=bool(loop.get("normalize_advantages", True)),
            use_absolute_kl=bool(loop.get("use_absolute_kl", True)),
            critic_warmup_steps=int(loop.get("critic_warmup_steps", 0) or 0),
            overlap_critic=bool(loop.get("overlap_critic", True)),
        )
        if not 0 < s.ratio_eps < 1:
            raise ValueError(f"model.ppo.ratio_eps={s.ratio_eps}; it must be in (0, 1)")
        if s.entropy_bonus < 0:
            raise ValueError(f"model.ppo.entropy_bonus={s.entropy_bonus}; it must be >= 0")
        for key in ("discount_factor", "gae_lambda"):
            if not 0 <= getattr(s, key) <= 1:
                raise ValueError(f"trainer.ppo.{key}={getattr(s, key)}; it must be in [0, 1]")
        if s.critic_warmup_steps < 0:
            raise ValueError(f"trainer.ppo.critic_warmup_steps={s.critic_warmup_steps}; it must be >= 0")
        return s


class RemoteCritic:
    """The critic server as the rollout's value source: each model-parallel group's first rank
    sends ``critic_infer`` at ``submit``; ``result()`` gives ``(values [n, W] float32, rewards
    [n] float64 or None)`` on every rank of the group."""

    def __init__(self, client, pad_to_length, pad_id: int, overlap: bool = True):
        self.client = client
        self.pad_to_length = pad_to_length
        self.pad_id = pad_id
        self.overlap = overlap

    def submit(self, rollout):
        from nemo_aligner.algorithms.reward_sources import sent_from_model_parallel_source

        def send():
            pending = self.client.submit_values(rollout.sequences(), pad_to_length=self.pad_to_length, pad_id=self.pad_id)
            return pending if self.overlap else _Done(pending.result())

        wait = sent_from_model_parallel_source(send)

        def result():
            values, rewards = wait()
            values = _label_aligned_values(torch.from_numpy(values), rollout)
            return values, None if rewards is None else torch.tensor(rewards, dtype=torch.float64)

        return result

    def close(self):
        if self.client is not None:
            self.client.close()


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _label_aligned_values(values: torch.Tensor, rollout) -> torch.Tensor:
    """The critic's value at each token position, kept on the rollout's response positions.
    ``V_t`` (after token ``t``) is the value of the state whose next token is label ``t``."""
    width = rollout.tokens.shape[1]
    if values.shape[1] < width:
        values = torch.nn.functional.pad(values, (0, width - values.shape[1]))
    return values[:, :width].float() * rollout.mask


class PPOTrainer(OnlineTrainer):
    algo = "ppo"

    def __init__(self, *args, critic=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.critic = critic
        self.critic_train_pending = None
        self.critic_metrics = {}
        self.needs_entropy = self.settings.entropy_bonus > 0

    @property
    def needs_policy_logprobs(self) -> bool:  # the KL penalty goes into the reward, before training
        return super().needs_policy_logprobs or self.settings.initial_policy_kl_penalty != 0

    # ---------------------------------------------------------------- the critic
    def send_critic_train(self, rollout, returns) -> None:
        mask = rollout.mask

        def send():
            return self.critic.submit_train(rollout.tokens.numpy(), (returns.float() * mask).numpy(),
                                            rollout.values.numpy(), mask.numpy())

        pending = None
        if _is_global_rank_zero():
            try:
                pending = send()
            except Exception as e:  # noqa: BLE001 -- surfaced when awaited, on every rank
                pending = e
        # Every rank records that a call is out (only rank 0 holds it): awaiting is collective.
        self.critic_train_pending = [pending if self.settings.overlap_critic else _Done(self._resolve(pending))]

    @staticmethod
    def _resolve(pending):
        if pending is None or isinstance(pending, Exception):
            return pending
        try:
            return pending.result()
        except Exception as e:  # noqa: BLE001
            return e

    def await_critic_train(self) -> None:
        """Wait for the last ``critic_train`` (collective): its loss, or its error on every rank."""
        if self.critic_train_pending is None:
            return
        (pending,), self.critic_train_pending = self.critic_train_pending, None

        def collect():
            out = self._resolve(pending)
            if isinstance(out, Exception):
                raise out
            return float(out["loss_mean"].reshape(-1)[0])

        with self.timers.time("critic_train_wait"):
            self.critic_metrics["critic/loss"] = run_on_global_rank_zero(collect)

    # ------------------------------------------------------------------ the step
    def train_step(self, step_input) -> dict:
        offset, prompts = step_input
        self.await_critic_train()
        # critic/loss: the critic's training on the previous step's rollout (awaited now, or,
        # without overlap, at the end of that step), so both modes log the same numbers.
        critic_metrics, self.critic_metrics = self.critic_metrics, {}
        if self.step == 0:
            for i in range(max(self.settings.critic_warmup_steps - 1, 0)):
                rollout = self.generator.run(prompts, offset, -(i + 1), policy_logprobs=self.needs_policy_logprobs)
                _, _, returns = self.advantages(rollout)
                self.send_critic_train(rollout, returns)
                self.await_critic_train()
                self.log.info(f"critic warm-up rollout {i + 1}: critic loss {self.critic_metrics['critic/loss']:.4f}")
        rollout = self.generator.run(prompts, offset, self.step, policy_logprobs=self.needs_policy_logprobs)
        per_token, metrics = self.prepare(rollout)
        metrics = self.learn(rollout, per_token, metrics)
        if not self.settings.overlap_critic:
            self.await_critic_train()
        metrics.update(critic_metrics)
        return metrics

    def advantages(self, rollout):
        """``(token_rewards, advantages, returns)`` (float64, ``[N, W]``) before whitening."""
        s = self.settings
        mask = rollout.mask.double()
        kl = None
        if rollout.init_logprobs is not None:
            kl = kl_penalty(rollout.logprobs.double(), rollout.init_logprobs.double(), s.use_absolute_kl)
        token_rewards = ppo_token_rewards(rollout.rewards, mask, kl, s.initial_policy_kl_penalty)
        adv, returns = gae(token_rewards, rollout.values.double(), mask, s.discount_factor, s.gae_lambda)
        return token_rewards, adv, returns

    def prepare(self, rollout):
        s = self.settings
        mask = rollout.mask.double()
        token_rewards, adv, returns = self.advantages(rollout)
        self.send_critic_train(rollout, returns)  # the critic trains while the actor does
        metrics = {"rewards_with_kl": float(masked_mean(token_rewards, mask, dim=-1).mean())}
        if rollout.init_logprobs is not None:
            kl = kl_penalty(rollout.logprobs.double(), rollout.init_logprobs.double(), s.use_absolute_kl)
            metrics["init_policy_kl"] = float(masked_mean(kl, mask, dim=-1).mean())
        for key, value in (("advantages", adv), ("returns", returns), ("values", rollout.values.double())):
            mean, var = masked_mean_var(value, mask)
            metrics[f"{key}_mean"], metrics[f"{key}_std"] = float(mean), float(var.sqrt())
        if s.normalize_advantages:
            adv = masked_whiten(adv, mask)
        per_token = {"advantages": (adv * mask).float(), "loss_mask": rollout.mask * rollout.is_end.float().unsqueeze(1)}
        if rollout.logprobs is not None:
            per_token["old_logprobs"] = rollout.logprobs
        return per_token, metrics

    def policy_loss(self, logp, batch):
        mask = batch["loss_mask"].to(logp.dtype)
        loss, ratio, clamped = clipped_surrogate(logp, old_logprobs(batch, logp), batch["advantages"].to(logp.device),
                                                 self.settings.ratio_eps)
        sums = {"ppo_ratio_sum": (ratio.detach() * mask).sum(), "ppo_ratio_clamped_sum": (clamped.detach() * mask).sum(),
                "scaled_entropy_sum": torch.zeros((), dtype=logp.dtype, device=logp.device)}
        if self.needs_entropy:
            scaled = self.settings.entropy_bonus * batch["entropy"]
            loss = loss - scaled
            sums["scaled_entropy_sum"] = (scaled.detach() * mask).sum()
        return loss, sums

    # -------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """The actor's checkpoint and ``critic_save`` together (after the critic's training)."""
        if self.checkpoint_manager is None:
            return
        self.await_critic_train()

        def critic_save():
            return self.critic.submit_save(self.step).result()

        # The critic first: the actor's checkpoint is written only once the critic's is, so the
        # newest actor checkpoint always has its critic (a failure leaves both at the last pair).
        with self.timers.time("critic_save"):
            run_on_global_rank_zero(critic_save)
        super().save()

    def fit(self) -> dict:
        self.check_critic_step()
        return super().fit()

    def check_critic_step(self) -> None:
        """Refuse, when the actor resumed, a critic that did not resume from the checkpoint saved
        with the actor's (collective). A fresh actor takes any critic (e.g. one trained before)."""
        def check():
            theirs = self.critic.saved_actor_step()
            if self.step > 0 and theirs != self.step:
                raise CriticMismatchError(
                    f"the critic at {self.critic.where} resumed from its checkpoint of actor step {theirs} but the actor "
                    f"resumed from step {self.step}; restart the critic with the checkpoint saved with this one "
                    "(or both from scratch)"
                )
            return True

        run_on_global_rank_zero(check)

def _is_global_rank_zero() -> bool:
    from nemo_aligner.utils.distributed import is_global_rank_zero

    return is_global_rank_zero()


class CriticMismatchError(RunError):
    """The actor and the critic server cannot work together (tokenizer, batch sizes)."""


def ppo_sources(cfg, tokenizer, settings: PPOSettings):
    """The critic client (and, unless combined, the reward source) from ``remote_critic_rm``;
    refuses a critic with another tokenizer or an incompatible batch size, before training."""
    from nemo_aligner.algorithms.reward_sources import RemoteReward, RuleReward
    from nemo_aligner.servers.client import RewardClient
    from nemo_aligner.servers.critic import tokenizer_fingerprint

    remote = cfg_get(cfg, "remote_critic_rm", {}) or {}
    timeouts = dict(init_timeout_s=float(remote.get("init_timeout_s", 60) or 60),
                    inference_timeout_s=float(remote.get("inference_timeout_s", 600) or 600))
    combined = bool(remote.get("combine_rm_and_critic_server", True))
    function = cfg_get(cfg, "reward.function", None)
    critic_cfg = remote.get("critic") or {}
    pad_id = int(tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    pad_to = remote.get("pad_to_length")
    if function and combined:
        raise ValueError("reward.function is set and remote_critic_rm.combine_rm_and_critic_server=true; "
                         "set combine_rm_and_critic_server=false to score with the rule (and the critic for values only)")
    clients = {}

    def connect():  # on each model-parallel group's first rank; an error reaches every rank
        critic = clients["critic"] = _critic_client(critic_cfg, timeouts)
        theirs, ours = critic.vocabulary(), tokenizer_fingerprint(tokenizer)
        if theirs != ours:
            raise CriticMismatchError(
                f"the critic at {critic.where} uses another tokenizer (vocabulary {theirs[0]} vs the actor's {ours[0]}, "
                "or other ids for the same text); start both from models with the same tokenizer"
            )
        if critic.max_batch_size and settings.rollout_micro_batch_size % critic.max_batch_size:
            raise CriticMismatchError(
                f"model.ppo.rollout_micro_batch_size={settings.rollout_micro_batch_size} is not a multiple of the critic's "
                f"inference_micro_batch_size x data-parallel size ({critic.max_batch_size}) at {critic.where}; "
                "make it a multiple so each request fills the critic's ranks"
            )
        if not combined and not function:
            server = remote.get("reward_model") or {}
            clients["rm"] = RewardClient(
                host=str(server.get("ip", "localhost")), port=int(server.get("port", 5555)),
                endpoint=str(server.get("name", "reward_model")), key="remote_critic_rm.reward_model", **timeouts)
        return True

    try:
        run_on_model_parallel_source(connect)
    except Exception:
        for c in clients.values():
            c.close()
        raise
    client = clients.get("critic")
    reward_source = None
    if function:
        reward_source = RuleReward(str(function))
    elif not combined:
        reward_source = RemoteReward(clients.get("rm"), pad_to, pad_id)
    value_source = RemoteCritic(client, pad_to, pad_id, overlap=settings.overlap_critic)
    return reward_source, value_source, {"critic": client}


def _critic_client(critic_cfg: dict, timeouts: dict):
    from nemo_aligner.servers.client import CriticClient

    names = dict(critic_cfg.get("name") or {})
    return CriticClient(str(critic_cfg.get("ip", "localhost")), int(critic_cfg.get("port", 5556)), names,
                        key="remote_critic_rm.critic", **timeouts)


def build_ppo_trainer(cfg) -> PPOTrainer:
    """Everything the PPO actor needs, from its config (see ``conf/gpt_ppo_actor.yaml``)."""
    settings = PPOSettings.from_cfg(cfg)
    return build_online_trainer(cfg, PPOTrainer, settings, "model.ppo.num_rollout_samples", sources=ppo_sources)
