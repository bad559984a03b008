"""The PPO critic: its model, its value inference, and its training step (run behind
``servers/critic.py``; the server owns no math).

The critic is a :class:`~nemo_aligner.models.heads.GPTRewardModel` with one output, read at
every position: ``V_t = W h_t + b`` is the value of the state after token ``t``, which lines
up with label position ``t`` of the actor's per-token tensors (see
:mod:`~nemo_aligner.algorithms.rollout`). It starts from ``pretrained_checkpoint.restore_from_path``:

- a reward model (ours, or a Hugging Face sequence classifier): everything is loaded;
- a plain causal LM (ours, or a Hugging Face directory): the backbone is loaded and the value
  head starts at zero (every value is 0 at first).

Values are reported, and learned, in the standardized space of ``model.reward_standardization``
(the reward model's unless overridden), as NeMo-Aligner's critic does: ``V' = (V - mean) / std``.

Training (``critic_train``) takes a whole rollout, ``tokens`` ``[N, W]`` and label-aligned
``returns``, ``prev_values`` (the values the rollout was scored with) and ``mask`` ``[N, W]``,
and runs ``N / model.global_batch_size`` optimizer steps over it in order, each data-parallel
rank taking its contiguous share of each global batch. The loss is NeMo-Aligner's clipped value
loss (:func:`~nemo_aligner.losses.policy.clipped_value_loss`, ``c = model.loss_clip_val``),
averaged over the masked tokens of the global batch. After ``trainer.ppo.max_steps`` optimizer
steps (-1: no limit) the critic stops learning: requests still answer with the loss, unchanged
weights.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.algorithms.reward_sources import sequence_batch
from nemo_aligner.algorithms.trainer import BaseTrainer
from nemo_aligner.checkpoint.distributed import read_trainer_state
from nemo_aligner.data.loader import StepBatch
from nemo_aligner.losses.policy import aggregate_loss, clipped_value_loss
from nemo_aligner.models.collect import forward_only_collect
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.utils.config import cfg_get, cfg_int
from nemo_aligner.utils.cpu_support import native_torch
from nemo_aligner.utils.distributed import broadcast_within_pipeline

UNBOUNDED_STEPS = 10**9  # trainer.ppo.max_steps=-1: the schedule's horizon


@dataclass
class CriticSettings:
    loss_clip_val: float
    forward_micro_batch_size: int
    pad_multiple: int  # request widths are padded up to a multiple of this


def sequence_rows(tokens: np.ndarray, lengths) -> list[list[int]]:
    return [tokens[i, : int(n)].tolist() for i, n in enumerate(np.asarray(lengths).reshape(-1))]


@torch.no_grad()
def dp_split_values(model_chunks, sequences: list[list[int]], width: int, pad_id: int, micro_batch_size: int,
                    reduce_fn, columns: int) -> torch.Tensor:
    """``reduce_fn(output, batch)`` (``[rows, columns]`` per micro-batch) for every sequence, on
    every rank: data-parallel ranks split the sequences, pipeline stages share the last
    stage's result, data-parallel ranks sum their parts."""
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    n = len(sequences)
    share = -(-n // dp)
    mine = list(range(min(rank * share, n), min((rank + 1) * share, n)))
    out = torch.zeros(n, columns, dtype=torch.float32)
    if mine:
        rows = mine + [mine[-1]] * (-len(mine) % micro_batch_size)  # the pipeline needs equal micro-batches
        micro = [sequence_batch([sequences[i] for i in rows[s : s + micro_batch_size]], pad_id, width)
                 for s in range(0, len(rows), micro_batch_size)]
        parts = forward_only_collect(model_chunks, micro, reduce_fn)
        values = broadcast_within_pipeline(torch.cat(parts)[: len(mine)] if parts is not None else None)
        out[mine] = values
    if dp > 1:
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
    return out


def standardized(values: torch.Tensor, shift) -> torch.Tensor:
    if shift is None:
        return values
    return (values - shift[0].reshape(-1)[0]) / shift[1].reshape(-1)[0]


class CriticTrainer(BaseTrainer):
    """The critic's optimizer steps, inference and saves (see the module docstring)."""

    algo = "ppo"

    def __init__(self, cfg, model, *, settings: CriticSettings, shift=None, pad_id: int = 0, **kwargs):
        self.settings = settings
        super().__init__(cfg, model, None, None, None, **kwargs)
        self.shift = shift
        self.pad_id = pad_id
        self.global_batch_size = cfg_int(cfg, "model.global_batch_size", minimum=1)
        self.actor_step = -1  # the actor's step at the last critic_save (or the resumed checkpoint's)

    def _resolve_max_steps(self) -> int:
        steps = cfg_int(self.loop_cfg, "max_steps", -1, name="trainer.ppo.max_steps")
        return steps if steps >= 0 else UNBOUNDED_STEPS

    # ----------------------------------------------------------------- inference
    def values(self, sequences: list[list[int]], width: int) -> np.ndarray:
        """``[N, width]`` standardized values, 0 past each sequence's end."""
        def per_token(output, batch):
            return standardized(output[..., 0].float(), self.shift).cpu()

        values = dp_split_values(self.model, sequences, width, self.pad_id, self.settings.forward_micro_batch_size,
                                 per_token, width)
        lengths = torch.tensor([len(s) for s in sequences])
        values *= (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
        return values.numpy()

    def sequence_rewards(self, sequences: list[list[int]], width: int, reduction: str, shift) -> np.ndarray:
        """``[N]`` rewards of the weights now loaded (the reward model's, swapped in)."""
        from nemo_aligner.models.heads import sequence_rewards

        def per_sequence(output, batch):
            return standardized(sequence_rewards(output, batch, reduction)[:, :1].float(), shift).cpu()

        return dp_split_values(self.model, sequences, width, self.pad_id, self.settings.forward_micro_batch_size,
                               per_sequence, 1)[:, 0].numpy()

    # ------------------------------------------------------------------ training
    def forward_step(self, batch, model):
        output = forward_batch(model, batch)

        def loss_fn(values):
            with native_torch():
                v = standardized(values[..., 0].float(), self.shift)
                mask = batch["loss_mask"].to(v.device, v.dtype)
                per_token = clipped_value_loss(v, batch["prev_values"].to(v.device), batch["returns"].to(v.device),
                                               self.settings.loss_clip_val)
                loss_sum, count = aggregate_loss(per_token, mask, True)
                return loss_sum, count.int(), {"loss_sum": loss_sum.detach(), "count": count.detach()}

        return output, loss_fn

    def finalize_metrics(self, sums: dict) -> dict:
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}

    def train_on(self, tokens: np.ndarray, returns: np.ndarray, prev_values: np.ndarray, mask: np.ndarray) -> dict:
        """Optimizer steps over one rollout (collective); the mean loss over them."""
        n, width = tokens.shape
        gbs = self.global_batch_size
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        share, mbs = gbs // dp, self.micro_batch_size
        data = {"tokens": torch.as_tensor(tokens, dtype=torch.long),
                "returns": torch.as_tensor(returns, dtype=torch.float32),
                "prev_values": torch.as_tensor(prev_values, dtype=torch.float32),
                "loss_mask": torch.as_tensor(mask, dtype=torch.float32)}
        positions = torch.arange(width).unsqueeze(0)
        losses = []
        for k in range(n // gbs):
            start = k * gbs + rank * share
            micro = []
            for s in range(start, start + share, mbs):
                batch = {key: value[s : s + mbs] for key, value in data.items()}
                batch["position_ids"] = positions.expand(batch["tokens"].shape[0], -1)
                micro.append(batch)
            step_batch = StepBatch(micro_batches=micro, seq_length=width, num_samples=share)
            if self.step < self.max_steps:
                metrics = self.optimize(step_batch)
                self.step += 1
            else:
                metrics = self.finalize_metrics(self.run_global_batch(step_batch, forward_only=True))
            losses.append(metrics["loss"])
        self.consumed_samples += n
        loss = float(np.mean(losses))
        if self.metrics_logger is not None:
            self.metrics_logger.log({"train/loss": loss, "train/optimizer_steps": self.step,
                                     "consumed_samples": self.consumed_samples}, self.step)
        return {"loss": loss}

    def check_rollout(self, n: int, width: int, max_length: int) -> None:
        if n % self.global_batch_size:
            raise ValueError(f"critic_train got {n} samples, not divisible by the critic's model.global_batch_size="
                             f"{self.global_batch_size}; make the actor's num_rollout_samples a multiple of it")
        if width > max_length:
            raise ValueError(f"critic_train got sequences of {width} tokens; the critic takes at most {max_length}")

    def state_dict(self) -> dict:
        """Checkpoints are named by the actor's step (``step``), so a critic checkpoint and the
        actor's it was saved with have the same name; ``optimizer_step`` is the critic's own."""
        return {**super().state_dict(), "step": max(self.actor_step, 0), "actor_step": self.actor_step,
                "optimizer_step": self.step}

    def save(self) -> None:
        """A checkpoint (none again for one already saved: the same actor step and optimizer step)."""
        latest = self.checkpoint_manager.latest() if self.checkpoint_manager is not None else None
        if latest is not None:
            saved = read_trainer_state(latest)
            if int(saved.get("actor_step", -1)) == self.actor_step and int(saved.get("optimizer_step", -1)) == self.step:
                self.log.info(f"critic step {self.step} is already saved in {latest}")
                return
        if self.step > 0:
            super().save()
            return
        # Before its first optimizer step the optimizer holds no state to save: weights only.
        path = self.checkpoint_manager.save(self.model, self.model_cfg_to_save, None, self.state_dict(), self.tokenizer_dir)
        self.log.info(f"saved checkpoint {path} (no optimizer step yet)")

    def restore(self, path) -> None:
        from nemo_aligner.checkpoint.distributed import load_checkpoint

        from nemo_aligner.checkpoint.distributed import has_optimizer_state

        state = load_checkpoint(path, self.model, self.optimizer if has_optimizer_state(path) else None)
        self.step = int(state.get("optimizer_step", state["step"]))
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.actor_step = int(state.get("actor_step", -1))
        self.scheduler.load_state_dict(state["scheduler"])
        self.log.info(f"resumed the critic from {path} at optimizer step {self.step}")


def build_critic_model(cfg, model_cfg, vocab_size: int, zero_head: bool):
    """``(model, loaded)``: this rank's critic, DDP-wrapped, with
    ``pretrained_checkpoint.restore_from_path`` loaded (``loaded``: ``reward model`` or
    ``backbone``); ``zero_head`` (the source is a causal LM, not a reward model) starts the
    value head at zero."""
    from nemo_aligner.models.reward_model import build_reward_model, restore_reward_model
    from nemo_aligner.utils.optim import wrap_ddp

    model = build_reward_model(model_cfg, vocab_size, seed=int(cfg_get(cfg, "seed", 1234)))
    path = cfg_get(cfg, "pretrained_checkpoint.restore_from_path", None)
    loaded = None
    if path is not None:
        loaded = restore_reward_model(model, path)
        if zero_head and model.post_process:
            with torch.no_grad():
                for p in model.reward_head.parameters():
                    p.zero_()
    return wrap_ddp(model, model_cfg), loaded
