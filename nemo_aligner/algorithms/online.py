"""The loop every critic-free online method shares (REINFORCE/RLOO, GRPO).

One trainer step is one rollout (:mod:`nemo_aligner.algorithms.rollout`) of the step's
prompts, then ``rollout size / model.global_batch_size`` optimizer steps over it, in order:
optimizer step ``k`` takes samples ``[k G, (k + 1) G)`` of the global rollout, each
data-parallel rank its contiguous share, cut into ``model.micro_batch_size`` micro-batches.
A subclass gives the method's math: :meth:`OnlineTrainer.prepare` (advantages and the
per-token tensors the loss reads, plus rollout metrics) and :meth:`OnlineTrainer.policy_loss`
(per-token loss of one micro-batch).

Metrics (NeMo-Aligner's names): ``train_rollouts/*`` (``rewards``, ``response_lengths`` =
prompt + response tokens as NeMo-Aligner counts them, ``prompt_lengths``,
``generation_length`` = response tokens, ``fraction_of_samples_properly_ended``,
``token_mult_prob_error``, ``init_policy_kl``, and the method's own), ``train_optim/*`` (the
mean over the step's optimizer steps of ``loss``, ``grad_norm``, ``ppo_ratio``,
``ppo_ratio_clamped``; the last ``lr``), ``timers/{generate, logprobs, init_logprobs, reward,
train}``, and greedy validation rollouts as ``val_rollouts/*`` (also before the first step,
logged at step 0). Checkpoints rank by ``val_rewards``. ``<log_dir>/rollouts.jsonl`` gets a few
prompt / response / reward rows per step.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.algorithms.rollout import Rollout, RolloutGenerator, RolloutSettings, training_micro_batch
from nemo_aligner.algorithms.trainer import BaseTrainer
from nemo_aligner.data.loader import StepBatch
from nemo_aligner.generation.engine import GenerationError, SamplingParams
from nemo_aligner.losses.policy import aggregate_loss
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.models.logprobs import token_entropy, token_logprobs
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.cpu_support import native_torch

ROLLOUT_ROWS_LOGGED = 4


def sampling_from_cfg(section: dict, key: str, greedy: bool | None = None) -> SamplingParams:
    """NeMo-Aligner's ``sampling_params`` / ``length_params`` as :class:`SamplingParams`."""
    sampling = section.get("sampling_params") or {}
    length = section.get("length_params") or {}
    if float(sampling.get("repetition_penalty", 1.0) or 1.0) != 1.0:
        raise ValueError(f"{key}.sampling_params.repetition_penalty is not supported; set it to 1.0")
    if length.get("max_length") is None:
        raise ValueError(f"set {key}.length_params.max_length (the largest number of new tokens)")
    try:
        return SamplingParams(
            greedy=bool(sampling.get("use_greedy", False)) if greedy is None else greedy,
            temperature=float(sampling.get("temperature", 1.0)),
            top_k=int(sampling.get("top_k", 0) or 0),
            top_p=float(sampling.get("top_p", 1.0)),
            max_new_tokens=int(length["max_length"]),
            min_new_tokens=int(length.get("min_length", 0) or 0),
            stop_strings=tuple(sampling.get("end_strings") or ()),
        )
    except GenerationError as e:
        raise ValueError(f"{key}: {e}".replace("sampling.max_new_tokens", "length_params.max_length")
                         .replace("sampling.min_new_tokens", "length_params.min_length")
                         .replace("sampling.", "sampling_params.")) from None


@dataclass
class OnlineSettings:
    """Rollout shape shared by the online methods (built by each method's settings)."""

    key: str  # the model.<algo> section, for messages
    prompts_per_step: int
    samples_per_prompt: int
    rollout_micro_batch_size: int
    forward_micro_batch_size: int
    val_rollout_micro_batch_size: int
    num_val_samples: int
    sampling: SamplingParams
    initial_policy_kl_penalty: float

    @staticmethod
    def common_fields(section: dict, loop: dict, key: str) -> dict:
        """The fields every method reads the same way from ``model.<algo>`` (``section``) and
        ``trainer.<algo>`` (``loop``)."""
        rollout_mbs = int(section.get("rollout_micro_batch_size", 8))
        return dict(
            key=key,
            rollout_micro_batch_size=rollout_mbs,
            forward_micro_batch_size=int(section.get("forward_micro_batch_size") or rollout_mbs),
            val_rollout_micro_batch_size=int(section.get("val_rollout_micro_batch_size") or rollout_mbs),
            num_val_samples=int(section.get("num_val_samples", 0) or 0),
            sampling=sampling_from_cfg(section, key),
            initial_policy_kl_penalty=float(loop.get("initial_policy_kl_penalty", 0.0) or 0.0),
        )

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def check(self, global_batch_size: int, micro_batch_size: int, dp: int, size_key: str) -> None:
        """Every divisibility the loop relies on, each error naming its key."""
        for name, value in (("rollout_micro_batch_size", self.rollout_micro_batch_size),
                            ("forward_micro_batch_size", self.forward_micro_batch_size),
                            ("val_rollout_micro_batch_size", self.val_rollout_micro_batch_size)):
            if value < 1:
                raise ValueError(f"{self.key}.{name}={value}; it must be >= 1")
        if self.rollout_size < 1:
            raise ValueError(f"{size_key}={self.rollout_size}; it must be >= 1")
        if self.rollout_size % global_batch_size:
            raise ValueError(
                f"{size_key}={self.rollout_size} is not divisible by model.global_batch_size={global_batch_size}; "
                "each rollout is split into whole optimizer steps"
            )
        if self.prompts_per_step % dp:
            raise ValueError(
                f"{size_key}={self.rollout_size} gives {self.prompts_per_step} prompts per step, not divisible "
                f"by the data-parallel size {dp}; every data-parallel rank generates its own prompts"
            )
        if global_batch_size % (dp * micro_batch_size):
            raise ValueError(
                f"model.global_batch_size={global_batch_size} is not divisible by data-parallel size {dp} x "
                f"model.micro_batch_size={micro_batch_size}"
            )


class OnlineTrainer(BaseTrainer):
    """See the module docstring. ``generator`` makes the rollouts; ``val_prompts`` is a
    :class:`~nemo_aligner.data.prompts.PromptDataset` (or None)."""

    progress_keys = ("train_rollouts/rewards", "val_rollouts/rewards", "train_optim/loss")
    validate_at_start = True

    def __init__(self, *args, settings: OnlineSettings, generator: RolloutGenerator, val_prompts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.generator = generator
        self.val_prompts = val_prompts
        self.global_batch_size = int(cfg_get(self.cfg, "model.global_batch_size"))
        self.optimizer_steps_per_step = settings.rollout_size // self.global_batch_size
        self.optim_step = 0
        self.generator.timers = self.timers
        self.initial_val_rewards = None

    # ------------------------------------------------------------- method hooks
    def prepare(self, rollout: Rollout) -> tuple[dict, dict]:
        """``(per_token, metrics)``: the ``[N, W]`` tensors the loss reads (by name) and the
        method's rollout metrics."""
        raise NotImplementedError

    def policy_loss(self, logp: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """``(per_token_loss, sums)`` for one micro-batch; ``logp`` are the current
        log-probs ``[b, W]``; ``sums`` are extra metric sums over the masked tokens."""
        raise NotImplementedError

    token_level_loss = True
    needs_entropy = False  # policy_loss reads batch["entropy"] (per token, differentiable)

    @property
    def needs_policy_logprobs(self) -> bool:
        """Whether the rollout needs the policy's log-probs before training. With one optimizer
        step per rollout the first (only) training forward runs on the rollout's weights, so
        it gives them exactly: the old log-probs are the current ones, detached."""
        return self.optimizer_steps_per_step > 1

    # ------------------------------------------------------------------ the step
    def train_step(self, step_input) -> dict:
        offset, prompts = step_input
        rollout = self.generator.run(prompts, offset, self.step, policy_logprobs=self.needs_policy_logprobs)
        per_token, method_metrics = self.prepare(rollout)
        return self.learn(rollout, per_token, method_metrics)

    def learn(self, rollout: Rollout, per_token: dict, method_metrics: dict) -> dict:
        """The optimizer steps over a prepared rollout; the step's metrics."""
        if rollout.logprobs is None:  # token_mult_prob_error from the training forward
            per_token["gen_logprobs"] = rollout.gen_logprobs
        metrics = {f"train_rollouts/{k}": v for k, v in {**rollout_metrics(rollout), **method_metrics}.items()}
        optim = []
        with self.timers.time("train"):
            for k in range(self.optimizer_steps_per_step):
                optim.append(self.optimize(self.minibatch(rollout, per_token, k)))
                self.optim_step += 1
        if "token_mult_prob_error" in optim[0]:
            metrics["train_rollouts/token_mult_prob_error"] = optim[0].pop("token_mult_prob_error")
        for key in optim[0]:
            values = [m[key] for m in optim]
            metrics[f"train_optim/{key}"] = values[-1] if key == "lr" else sum(values) / len(values)
        metrics["train_optim/optim_step"] = self.optim_step
        self.log_rollouts(rollout, "train")
        return metrics

    def minibatch(self, rollout: Rollout, per_token: dict, k: int) -> StepBatch:
        from megatron.core import parallel_state

        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        share = self.global_batch_size // dp
        start = k * self.global_batch_size + rank * share
        mbs = self.micro_batch_size
        micro = [training_micro_batch(rollout, range(s, s + mbs), per_token) for s in range(start, start + share, mbs)]
        return StepBatch(micro_batches=micro, seq_length=rollout.tokens.shape[1], num_samples=share)

    def forward_step(self, batch, model):
        def loss_fn(logits):
            with native_torch():
                if self.needs_entropy:  # before the log-probs, which shift the logits in place
                    batch["entropy"] = token_entropy(logits)
                logp = token_logprobs(logits, batch["labels"].to(logits.device), inplace=True)
                mask = batch["loss_mask"].to(logp.device, logp.dtype)
                per_token, sums = self.policy_loss(logp, batch)
                loss_sum, count = aggregate_loss(per_token, mask, self.token_level_loss)
                sums = {k: v.detach() for k, v in sums.items()}
                if "gen_logprobs" in batch:
                    error = (logp.detach() - batch["gen_logprobs"].to(logp.device)).abs().exp()
                    sums["token_mult_prob_error_sum"] = (error * mask).sum()
                sums.update(loss_sum=loss_sum.detach(), count=count.detach(), tokens=mask.sum())
                return loss_sum, count.int(), sums

        return forward_batch(model, batch), loss_fn

    def finalize_metrics(self, sums: dict) -> dict:
        tokens = max(sums.pop("tokens"), 1.0)
        count = max(sums.pop("count"), 1.0)
        out = {"loss": sums.pop("loss_sum") / count}
        out.update({k.removesuffix("_sum"): v / tokens for k, v in sums.items()})
        return out

    # ------------------------------------------------------------- validation
    def val_share(self) -> tuple[int, list]:
        from megatron.core import parallel_state

        n = min(self.settings.num_val_samples, len(self.val_prompts))
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        chunk = -(-n // dp)
        lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
        return lo, [self.val_prompts[i] for i in range(lo, hi)]

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_prompts is None or self.settings.num_val_samples <= 0:
            return {}
        offset, prompts = self.val_share()
        rollout = self.generator.run(prompts, offset, self.step, validation=True)
        self.log_rollouts(rollout, "val")
        metrics = {k: v for k, v in rollout_metrics(rollout).items() if k != "token_mult_prob_error"}
        if self.initial_val_rewards is None and self.step == 0:
            self.initial_val_rewards = metrics["rewards"]
        self.log.info(f"step {self.step}: held-out reward {metrics['rewards']:.4f} ({len(rollout)} prompts, greedy; "
                      f"{metrics['fraction_of_samples_properly_ended']:.0%} ended)")
        return {f"val_rollouts/{k}": v for k, v in metrics.items()}

    def checkpoint_metrics(self, val: dict) -> dict:
        return {"val_rewards": val["val_rollouts/rewards"]} if "val_rollouts/rewards" in val else {}

    # ------------------------------------------------------------------ output
    def log_rollouts(self, rollout: Rollout, split: str) -> None:
        if self.metrics_logger is None:
            return
        rows = [{"step": self.step, "split": split, "prompt": rollout.prompts[i], "response": rollout.responses[i],
                 "reward": float(rollout.rewards[i])} for i in range(min(ROLLOUT_ROWS_LOGGED, len(rollout)))]
        self.metrics_logger.append_rows("rollouts.jsonl", rows)

    def fit(self) -> dict:
        metrics = super().fit()
        if "val_rollouts/rewards" in metrics and self.initial_val_rewards is not None:
            self.log.info(
                f"held-out reward ({min(self.settings.num_val_samples, len(self.val_prompts))} prompts, greedy): "
                f"{self.initial_val_rewards:.4f} before training -> {metrics['val_rollouts/rewards']:.4f} at step {self.step}"
            )
        return metrics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "optim_step": self.optim_step}

    def restore(self, path) -> None:
        super().restore(path)
        from nemo_aligner.checkpoint.distributed import read_trainer_state

        self.optim_step = int(read_trainer_state(path).get("optim_step", self.step * self.optimizer_steps_per_step))

    def close(self) -> None:
        for source in (self.generator.reward_source, self.generator.value_source):
            close = getattr(source, "close", None)
            if close is not None:
                close()


def old_logprobs(batch: dict, logp: torch.Tensor) -> torch.Tensor:
    """The log-probs the rollout was drawn with (the policy's before this rollout's updates):
    the batch's ``old_logprobs``, or, when the rollout trains one optimizer step and they were
    not computed, ``logp`` itself, detached (the same weights)."""
    old = batch.get("old_logprobs")
    return logp.detach() if old is None else old.to(logp.device)


def rollout_metrics(rollout: Rollout) -> dict:
    """Means over the rollout's samples (response tokens for the per-token ones)."""
    mask = rollout.mask
    metrics = {
        "rewards": float(rollout.rewards.mean()),
        "response_lengths": float(rollout.sequence_lengths.float().mean()),
        "prompt_lengths": float(rollout.prompt_lengths.float().mean()),
        "generation_length": float(rollout.response_lengths.float().mean()),
        "fraction_of_samples_properly_ended": float(rollout.is_end.float().mean()),
    }
    if rollout.logprobs is not None:
        metrics["token_mult_prob_error"] = float(((rollout.gen_logprobs - rollout.logprobs).abs().exp() * mask).sum()
                                                 / mask.sum().clamp(min=1))
    return metrics



def build_online_trainer(cfg, trainer_cls, settings: OnlineSettings, size_key: str, sources=None):
    """Everything an online run needs (prompts, policy, initial-policy copy, engine, reward
    source), from its config; bad input fails here, before anything is written.

    ``sources(cfg, tokenizer, settings) -> (reward_source, value_source, trainer_kwargs)``
    replaces the default (the reward source ``cfg`` names, no values) for methods with a critic."""
    from megatron.core import parallel_state

    from nemo_aligner.algorithms.reference import reference_for
    from nemo_aligner.algorithms.reward_sources import build_reward_source
    from nemo_aligner.data.datasets import data_files, data_prefix
    from nemo_aligner.data.prompts import PromptDataset, PromptLoader
    from nemo_aligner.data.samplers import MegatronBatchSampler
    from nemo_aligner.utils import setup

    setup.init_distributed(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    dp_rank, dp = setup.data_parallel_info()
    settings.check(int(model_cfg["global_batch_size"]), int(model_cfg["micro_batch_size"]), dp, size_key)

    context = int(model_cfg["encoder_seq_length"])
    max_new = settings.sampling.max_new_tokens
    max_prompt = context - max_new
    if max_prompt < 1:
        raise ValueError(
            f"{settings.key}.length_params.max_length={max_new} leaves no room for a prompt in "
            f"model.encoder_seq_length={context}; lower it"
        )
    hint = f" (model.encoder_seq_length={context} minus {settings.key}.length_params.max_length={max_new})"
    data = cfg_get(cfg, "model.data", {}) or {}
    prefix = data_prefix(cfg)
    if not prefix.get("train"):
        raise ValueError("set model.data.data_prefix.train to a prompt JSONL file ({\"text\": ...} lines)")
    add_bos = bool(data.get("add_bos", False))
    train = PromptDataset(data_files(prefix["train"], "model.data.data_prefix.train"), tokenizer, max_prompt, add_bos, hint)
    val = None
    if prefix.get("validation"):
        val = PromptDataset(data_files(prefix["validation"], "model.data.data_prefix.validation"), tokenizer,
                            max_prompt, add_bos, hint)
    if len(train) < settings.prompts_per_step:
        raise ValueError(
            f"{train.path} has {len(train)} prompts, fewer than the {settings.prompts_per_step} one step takes "
            f"({size_key}); add prompts or lower it"
        )
    seed = int(cfg_get(cfg, "seed", 1234))
    sampler = MegatronBatchSampler(len(train), 0, settings.prompts_per_step, dp_rank, dp, drop_last=True,
                                   shuffle=bool(data.get("shuffle", True)), seed=seed)
    if sources is None:
        reward_source = build_reward_source(cfg, tokenizer, tokenizer.vocab_size, settings.forward_micro_batch_size)
        value_source, extra = None, {}
    else:
        reward_source, value_source, extra = sources(cfg, tokenizer, settings)
    model = setup.build_model(cfg, model_cfg, vocab_size)
    reference = reference_for(model) if settings.initial_policy_kl_penalty != 0 else None
    engine = build_engine(model, model_cfg, tokenizer, vocab_size, settings.rollout_micro_batch_size)
    val_sampling = SamplingParams(greedy=True, max_new_tokens=max_new, min_new_tokens=settings.sampling.min_new_tokens,
                                  stop_strings=settings.sampling.stop_strings)
    generator = RolloutGenerator(
        model, engine, tokenizer, reward_source,
        RolloutSettings(settings.samples_per_prompt, settings.sampling, val_sampling,
                        settings.forward_micro_batch_size, seed,
                        pad_multiple=parallel_state.get_tensor_model_parallel_world_size(),
                        generation_batch_size=settings.rollout_micro_batch_size,
                        val_generation_batch_size=settings.val_rollout_micro_batch_size),
        reference=reference, value_source=value_source,
    )
    trainer = trainer_cls(
        cfg, model, None, None, PromptLoader(train, sampler), None,
        checkpoint_manager=setup.checkpoint_manager(cfg), model_cfg_to_save=model_cfg,
        tokenizer_dir=tokenizer_src, settings=settings, generator=generator, val_prompts=val, **extra,
    )
    return setup.finish_build(cfg, trainer, model_cfg, model)


def build_engine(model, model_cfg, tokenizer, vocab_size: int, batch_size: int):
    """The rollout engine: on the training model itself (refit is free), or, under pipeline
    parallelism, a full-depth copy refit from the stages."""
    from megatron.core import parallel_state

    from nemo_aligner.generation.megatron_engine import MegatronEngine
    from nemo_aligner.models.lora import has_lora

    kwargs = dict(vocab_size=tokenizer.vocab_size, max_sequence_length=int(model_cfg["encoder_seq_length"]),
                  max_batch_size=batch_size)
    if has_lora(model):
        # The adapted layers would keep the lean decoder off; a plain copy refit with the
        # merged weights keeps it on (and the copy stays in the training model's layout).
        plain_cfg = dict(model_cfg, peft={"peft_scheme": "none"})
        return MegatronEngine.with_own_weights(plain_cfg, model, tokenizer, **kwargs)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        return MegatronEngine.with_own_weights(model_cfg, model, tokenizer, **kwargs)
    return MegatronEngine(model, tokenizer, **kwargs)
