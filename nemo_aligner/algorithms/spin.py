"""SPIN: self-play fine-tuning (Chen et al. 2024) as NeMo-Aligner runs it.

The data are SFT samples. Each is split at its first trained token into a prompt and the
*actual* response (everything after the prompt, as NeMo-Aligner's chat data splits it). Every
step, the reference policy (the weights at the end of the previous iteration; the initial ones
in iteration 0) generates a response to each prompt of the step, and the policy is trained with
the DPO loss on the pair (actual = chosen, generated = rejected)::

    r_a = β (log π(actual) - log π_ref(actual)),   r_g = β (log π(generated) - log π_ref(generated))
    loss = mean over the pairs of the global batch of  -log σ(r_a - r_g)

with per-sequence log-prob sums over the response tokens and β =
``model.spin.ref_policy_kl_penalty`` (a number, or a list: one per iteration). An iteration is
``trainer.spin.max_epochs`` epochs; the reference is refreshed to the current weights only at
its end, so it is fixed while the iteration's pairs are generated and scored. Run length:
``steps_per_epoch x max_epochs x max_iterations``, capped by ``trainer.spin.max_steps``.

Generation and the reference log-probs of both responses happen with the reference weights
swapped in from CPU (:class:`~nemo_aligner.algorithms.reference.ReferenceWeights`); sample
``i`` of step ``t`` is drawn with the seed of (run seed, t, i), so a resumed run and another
parallel layout draw the same responses. Training checkpoints carry the reference weights
(``reference_policy``), so a run resumes mid-iteration with the reference it had.

Metrics (``train/``): NeMo-Aligner's ``loss``, ``acc`` (fraction of pairs with r_a > r_g),
``rewards_actual_mean``, ``rewards_generated_mean``, ``rewards_all_mean``, ``rewards_all_std``,
``avg_generated_lengths`` (response tokens), ``iteration``, plus ``grad_norm``, ``lr``.
Validation is the SFT loss on the validation set (``val/loss``). A few prompt / actual /
generated rows per step go to ``<log_dir>/generations.jsonl``.
"""

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import ListConfig

from nemo_aligner.algorithms.dpo import DPOSettings, dpo_loss_fn, pair_metrics
from nemo_aligner.algorithms.online import sampling_from_cfg
from nemo_aligner.algorithms.reference import attach_logps
from nemo_aligner.algorithms.supervised import sft_loss_fn
from nemo_aligner.algorithms.trainer import BaseTrainer
from nemo_aligner.data.loader import StepBatch
from nemo_aligner.data.preference import make_sequence
from nemo_aligner.generation.engine import SamplingParams
from nemo_aligner.models.forward import forward_batch, loss_positions
from nemo_aligner.utils.config import cfg_get, cfg_int

GENERATION_ROWS_LOGGED = 4


@dataclass
class SPINSettings:
    """``model.spin.*`` and ``trainer.spin.max_iterations``."""

    max_iterations: int
    kl_penalties: tuple  # β of each iteration
    rollout_micro_batch_size: int
    sampling: SamplingParams

    @classmethod
    def from_cfg(cls, cfg) -> "SPINSettings":
        section = cfg_get(cfg, "model.spin", {}) or {}
        loop = cfg_get(cfg, "trainer.spin", {}) or {}
        iterations = cfg_int(loop, "max_iterations", 1, minimum=1, name="trainer.spin.max_iterations")
        kl = section.get("ref_policy_kl_penalty", 0.2)
        key = "model.spin.ref_policy_kl_penalty"
        if isinstance(kl, (list, tuple, ListConfig)):
            if len(kl) < iterations:
                raise ValueError(f"{key} has {len(kl)} values but trainer.spin.max_iterations={iterations}; "
                                 "give one per iteration (or a single number)")
            penalties = tuple(kl)[:iterations]
        else:
            penalties = (kl,) * iterations
        try:
            penalties = tuple(float(b) for b in penalties)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={kl!r}; it must be a number or a list of numbers (one per iteration)") from None
        if any(b <= 0 for b in penalties):
            raise ValueError(f"{key}={kl!r}; every value must be > 0")
        rollout_mbs = cfg_int(section, "rollout_micro_batch_size", 8, minimum=1,
                              name="model.spin.rollout_micro_batch_size")
        return cls(iterations, penalties, rollout_mbs, sampling_from_cfg(section, "model.spin"))


class SPINPrompts:
    """SFT samples split at their first trained token: ``dataset[i]`` is ``{"index",
    "prompt_ids", "actual_ids" (the whole sample), "text" (the prompt), "sample"}``, the shape
    :class:`~nemo_aligner.algorithms.rollout.RolloutGenerator` takes."""

    def __init__(self, sft_dataset, tokenizer):
        self.path = sft_dataset.path
        self.items = []
        for i in range(len(sft_dataset)):
            ids, mask = sft_dataset.sequence(i)
            first = int(torch.nonzero(mask[1:])[0]) + 1  # SFTDataset guarantees a trained token after the first
            prompt = ids[:first].tolist()
            self.items.append({"index": i, "prompt_ids": prompt, "actual_ids": ids,
                               "text": tokenizer.ids_to_text(prompt), "sample": {}})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def spin_pair(actual_ids: torch.Tensor, generated_ids: torch.Tensor, prompt_length: int, index: int) -> dict:
    """One DPO group (actual first, as chosen; generated second): both responses score every
    token after the prompt; the generated sequence shares the prompt with the actual one."""
    def sequence(ids, shared):
        mask = torch.zeros(len(ids), dtype=torch.long)
        mask[prompt_length:] = 1
        return make_sequence(ids, mask, shift=True, shared_prefix=shared)

    return {
        "sequences": [sequence(actual_ids, 0), sequence(generated_ids, max(prompt_length - 1, 0))],
        "weight": torch.ones(1),
        "sample_ids": torch.tensor([index]),
        "ref_logps": torch.zeros(2),
    }


class SPINTrainer(BaseTrainer):
    """See the module docstring. ``train_loader`` yields ``(global_offset, items)`` of
    :class:`SPINPrompts`; ``val_loader`` SFT batches; ``generator`` a
    :class:`~nemo_aligner.algorithms.rollout.RolloutGenerator` without a reward;
    ``reference`` the :class:`~nemo_aligner.algorithms.reference.ReferenceWeights`."""

    algo = "spin"
    progress_keys = ("train/loss", "train/acc", "val/loss")

    def __init__(self, *args, settings: SPINSettings, generator, reference, collate, row_length=None,
                 pad_to_multiple_of: int = 8, max_sequence_length: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.generator = generator
        self.generator.timers = self.timers
        self.reference = reference
        self.collate = collate
        self.row_length = row_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_sequence_length = max_sequence_length
        self.loss_settings = DPOSettings(loss_type="dpo", beta=settings.kl_penalties[0])

    def _resolve_max_steps(self) -> int:
        key = "trainer.spin"
        max_epochs = cfg_int(self.loop_cfg, "max_epochs", 1, minimum=1, name=f"{key}.max_epochs")
        iterations = cfg_int(self.loop_cfg, "max_iterations", 1, minimum=1, name=f"{key}.max_iterations")
        self.steps_per_iteration = self.train_loader.sampler.steps_per_epoch * max_epochs
        total = self.steps_per_iteration * iterations
        max_steps = cfg_int(self.loop_cfg, "max_steps", -1, name=f"{key}.max_steps")
        return total if max_steps < 0 else min(total, max_steps)

    @property
    def iteration(self) -> int:
        """The iteration the next step belongs to."""
        return self.step // self.steps_per_iteration

    # ------------------------------------------------------------------ the step
    def train_step(self, step_input) -> dict:
        offset, items = step_input
        iteration = self.iteration
        self.loss_settings = replace(self.loss_settings, beta=self.settings.kl_penalties[iteration])
        step_batch, generated_lengths = self.make_pairs(offset, items)
        metrics = {f"train/{k}": v for k, v in self.optimize(step_batch).items()}
        metrics["train/avg_generated_lengths"] = generated_lengths
        metrics["train/iteration"] = iteration
        if (self.step + 1) % self.steps_per_iteration == 0:
            self.reference.refresh()
            self.log.info(f"step {self.step + 1}: iteration {iteration} done; its weights are the new reference")
        return metrics

    @torch.no_grad()
    def make_pairs(self, offset: int, items: list[dict]) -> tuple[StepBatch, float]:
        """This rank's micro-batches of (actual, generated) pairs with the reference's log-prob
        sums, and the mean generated length over the global batch."""
        longest = torch.tensor([max(len(it["prompt_ids"]) for it in items)])
        if dist.is_initialized():
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        # As NeMo-Aligner: fewer new tokens when the longest prompt leaves less room.
        room = self.max_sequence_length - int(longest)
        self.generator.settings.sampling = replace(
            self.settings.sampling, max_new_tokens=min(self.settings.sampling.max_new_tokens, room))
        with self.reference.swapped():
            rollout = self.generator.run(items, offset, self.step, policy_logprobs=False)
            groups = []
            for j, item in enumerate(items):
                row = offset + j
                generated = rollout.tokens[row, : int(rollout.sequence_lengths[row])]
                groups.append(spin_pair(item["actual_ids"], generated, len(item["prompt_ids"]), item["index"]))
            step_batch = self._step_batch(groups, len(items))
            with self.timers.time("ref_logprobs"):
                attach_logps(self.model, step_batch.micro_batches)
        self._log_generations(rollout, items, offset)
        return step_batch, float(rollout.response_lengths.float().mean())

    def _step_batch(self, groups: list[dict], num_samples: int) -> StepBatch:
        mbs = self.micro_batch_size
        chunks = [groups[i : i + mbs] for i in range(0, len(groups), mbs)]
        if self.row_length is not None:
            longest = max(self.row_length(chunk) for chunk in chunks)
        else:
            longest = max(len(s["tokens"]) for g in groups for s in g["sequences"])
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m
        return StepBatch([self.collate(chunk, pad_to=width) for chunk in chunks], width, num_samples)

    def forward_step(self, batch, model):
        logits = forward_batch(model, batch, logits_at=loss_positions(batch))
        if "ref_logps" in batch:
            return logits, dpo_loss_fn(batch, self.loss_settings)
        return logits, sft_loss_fn(batch)  # validation: the SFT loss

    def finalize_metrics(self, sums: dict) -> dict:
        if "num_tokens" in sums:
            return {"loss": sums["loss_sum"] / max(sums["num_tokens"], 1.0), "num_tokens": sums["num_tokens"]}
        m = pair_metrics(sums)
        return {
            "loss": m["loss"], "acc": m["acc"],
            "rewards_actual_mean": m["rewards_chosen_mean"], "rewards_generated_mean": m["rewards_rejected_mean"],
            "rewards_all_mean": m["rewards_all_mean"], "rewards_all_std": m["rewards_all_std"],
        }

    def _log_generations(self, rollout, items, offset) -> None:
        if self.metrics_logger is None:
            return
        tokenizer = self.generator.tokenizer
        rows = []
        for j, item in enumerate(items[:GENERATION_ROWS_LOGGED]):
            prompt_length = len(item["prompt_ids"])
            rows.append({"step": self.step, "iteration": self.iteration, "prompt": item["text"],
                         "actual": tokenizer.ids_to_text(item["actual_ids"][prompt_length:].tolist()),
                         "generated": rollout.responses[offset + j]})
        self.metrics_logger.append_rows("generations.jsonl", rows)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "iteration": self.iteration}

    def extra_checkpoint_state(self) -> dict:
        return {"reference_policy": self.reference.sharded_state_dict(self.model)}

    def restore(self, path) -> None:
        super().restore(path)
        self.reference.load(path, self.model)
        self.log.info(f"resumed in iteration {self.iteration} with the reference stored in {path}")


def build_spin_trainer(cfg) -> SPINTrainer:
    """Everything a SPIN run needs, from its config (see ``conf/gpt_spin.yaml``)."""
    from nemo_aligner.algorithms.group_data import micro_batch_collation
    from nemo_aligner.algorithms.online import build_engine
    from nemo_aligner.algorithms.reference import ReferenceWeights
    from nemo_aligner.algorithms.rollout import RolloutGenerator, RolloutSettings
    from nemo_aligner.algorithms.supervised import build_sft_datasets, token_loaders
    from nemo_aligner.data.prompts import PromptLoader
    from nemo_aligner.data.samplers import MegatronBatchSampler
    from nemo_aligner.utils import setup

    settings = SPINSettings.from_cfg(cfg)
    if (cfg_get(cfg, "model.data.packing", {}) or {}).get("enabled", False):
        raise ValueError("model.data.packing.enabled: SPIN makes its pairs every step, so a packed dataset does not "
                         "apply; set it to false (micro-batches are padding-free by default, model.data.padding_free)")
    setup.init_distributed(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    context = int(model_cfg["encoder_seq_length"])
    if settings.sampling.max_new_tokens >= context:
        raise ValueError(f"model.spin.length_params.max_length={settings.sampling.max_new_tokens} leaves no room for a "
                         f"prompt in model.encoder_seq_length={context}; lower it")
    train_sft, val_sft, sft_collate = build_sft_datasets(cfg, model_cfg, tokenizer)
    train = SPINPrompts(train_sft, tokenizer)
    dp_rank, dp = setup.data_parallel_info()
    gbs, mbs = int(model_cfg["global_batch_size"]), int(model_cfg["micro_batch_size"])
    if gbs % (dp * mbs):
        raise ValueError(f"model.global_batch_size={gbs} is not divisible by data-parallel size {dp} x "
                         f"model.micro_batch_size={mbs}")
    if len(train) < gbs:
        raise ValueError(f"{train.path} has {len(train)} samples, fewer than model.global_batch_size={gbs}; "
                         "add samples or lower it")
    seed = int(cfg_get(cfg, "seed", 1234))
    sampler = MegatronBatchSampler(len(train), 0, gbs, dp_rank, dp, drop_last=True,
                                   shuffle=bool(cfg_get(cfg, "model.data.shuffle", True)), seed=seed)
    _, val_loader = token_loaders(cfg, model_cfg, train_sft, val_sft, sft_collate)
    model = setup.build_model(cfg, model_cfg, vocab_size)
    # Always a full copy (also with LoRA): after iteration 0 the reference is trained weights.
    reference = ReferenceWeights(model)
    engine = build_engine(model, model_cfg, tokenizer, vocab_size, settings.rollout_micro_batch_size)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    generator = RolloutGenerator(
        model, engine, tokenizer, None,
        RolloutSettings(1, settings.sampling, settings.sampling, mbs, seed, pad_multiple=tp,
                        generation_batch_size=settings.rollout_micro_batch_size),
    )
    collate, row_length = micro_batch_collation(cfg, tokenizer.pad_id)
    trainer = SPINTrainer(
        cfg, model, None, None, PromptLoader(train, sampler), val_loader,
        checkpoint_manager=setup.checkpoint_manager(cfg), model_cfg_to_save=model_cfg, tokenizer_dir=tokenizer_src,
        settings=settings, generator=generator, reference=reference, collate=collate, row_length=row_length,
        pad_to_multiple_of=8 * tp, max_sequence_length=context,
    )
    return setup.finish_build(cfg, trainer, model_cfg, model)
