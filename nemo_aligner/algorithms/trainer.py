"""BaseTrainer: the training loop every algorithm shares.

A subclass supplies the math of one micro-batch:

- :meth:`forward_step` ``(batch, model) -> (output, loss_fn)``, where
  ``loss_fn(output) -> (loss_sum, num_tokens, sums)``: the loss summed over the
  micro-batch, the count it is normalized by (Megatron's per-token loss mode: gradients
  are divided by the count summed over the global batch), and a dict of float sums to
  report;
- :meth:`finalize_metrics` ``(sums) -> metrics``: turns the global sums into metrics
  (for example ``loss = loss_sum / num_tokens``).

The base class owns everything else: Megatron's forward-backward schedule over the
micro-batches of a global batch, the optimizer and LR schedule steps, validation every
``val_check_interval`` steps, checkpoints every ``save_interval`` steps (and at the end,
and when ``max_time_per_run`` runs out), resuming, metrics (TensorBoard, metrics.jsonl),
timers and a progress bar.
"""

import contextlib
import signal
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from tqdm import tqdm

from nemo_aligner.checkpoint.distributed import load_checkpoint, save_checkpoint
from nemo_aligner.models.lora import has_lora, merge_lora
from nemo_aligner.utils.config import cfg_get, cfg_int
from nemo_aligner.utils.cpu_support import cuda_on_cpu, native_torch
from nemo_aligner.utils.distributed import is_global_rank_zero
from nemo_aligner.utils.errors import RunError
from nemo_aligner.utils.signals import GracefulStop, StoppedBySignal
from nemo_aligner.utils.logging import get_logger
from nemo_aligner.utils.optim import optimizer_step
from nemo_aligner.utils.timers import Timers


class DivergenceError(RunError):
    """The loss diverged: too many optimizer steps in a row had a non-finite gradient norm."""


def parse_duration(value, key: str = "max_time_per_run") -> float | None:
    """Seconds from a number or ``"DD:HH:MM:SS"`` (NeMo's ``max_time_per_run``)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        parts = [float(p) for p in str(value).split(":")]
    except ValueError:
        parts = []
    if not parts or len(parts) > 4:
        raise ValueError(f"{key}={value!r}; use seconds or DD:HH:MM:SS")
    seconds = 0.0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += part * unit
    return seconds


def _pipeline_broadcast(obj):
    """Send ``obj`` from the last pipeline stage to every stage of this pipeline."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(
        holder,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return holder[0]


class BaseTrainer:
    algo = "base"  # the trainer.<algo> section this loop reads
    progress_keys = ("train/loss", "val/loss", "train/lr")  # shown on the progress bar and in the summary
    validate_at_start = False  # validate once before the first step (a "before" score)
    optimizer_steps_per_step = 1  # optimizer (and LR schedule) steps per trainer step

    def __init__(
        self,
        cfg,
        model,
        optimizer,
        scheduler,
        train_loader,
        val_loader=None,
        metrics_logger=None,
        checkpoint_manager=None,
        model_cfg_to_save=None,
        tokenizer_dir=None,
    ):
        self.cfg = cfg
        self.loop_cfg = cfg_get(cfg, f"trainer.{self.algo}", {}) or {}
        self.model = model if isinstance(model, list) else [model]
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.metrics_logger = metrics_logger
        self.checkpoint_manager = checkpoint_manager
        self.model_cfg_to_save = model_cfg_to_save
        self.tokenizer_dir = tokenizer_dir
        self.micro_batch_size = cfg_int(cfg, "model.micro_batch_size", minimum=1)
        self.timers = Timers()
        self.log = get_logger()

        self.step = 0
        self.consumed_samples = 0
        self.epoch = 0
        self.best_metrics = {}
        self.max_steps = self._resolve_max_steps()
        self.val_check_interval = self._interval("val_check_interval")
        self.save_interval = self._interval("save_interval")
        key = f"trainer.{self.algo}"
        self.limit_val_batches = (None if self.loop_cfg.get("limit_val_batches") is None else
                                  cfg_int(self.loop_cfg, "limit_val_batches", minimum=0, name=f"{key}.limit_val_batches"))
        self.max_time = parse_duration(self.loop_cfg.get("max_time_per_run", None), f"{key}.max_time_per_run")
        self.max_nonfinite_steps = cfg_int(self.loop_cfg, "max_nonfinite_steps", 3, minimum=1,
                                           name=f"{key}.max_nonfinite_steps")
        self.skipped_in_a_row = 0

    # ---- configuration -------------------------------------------------------------
    def _resolve_max_steps(self) -> int:
        key = f"trainer.{self.algo}"
        max_steps = cfg_int(self.loop_cfg, "max_steps", -1, name=f"{key}.max_steps")
        max_epochs = self.loop_cfg.get("max_epochs", None)
        if max_epochs is not None:
            max_epochs = cfg_int(self.loop_cfg, "max_epochs", name=f"{key}.max_epochs")
        steps_per_epoch = self.train_loader.sampler.steps_per_epoch
        candidates = []
        if max_steps >= 0:
            candidates.append(max_steps)
        if max_epochs is not None and max_epochs >= 0:
            candidates.append(max_epochs * steps_per_epoch)
        if not candidates:
            raise ValueError(
                f"set trainer.{self.algo}.max_steps or trainer.{self.algo}.max_epochs to bound the run"
            )
        return min(candidates)

    def _interval(self, key) -> int:
        value = self.loop_cfg.get(key, 0) or 0
        if isinstance(value, float) and 0 < value <= 1.0:  # a fraction of an epoch
            return max(1, int(value * self.train_loader.sampler.steps_per_epoch))
        return cfg_int(self.loop_cfg, key, 0, minimum=0, name=f"trainer.{self.algo}.{key}")

    # ---- hooks for subclasses --------------------------------------------------------
    def forward_step(self, batch, model):
        raise NotImplementedError

    def finalize_metrics(self, sums: dict) -> dict:
        raise NotImplementedError

    # ---- one global batch ------------------------------------------------------------
    def run_global_batch(self, step_batch, forward_only: bool) -> dict:
        """Forward (and backward) over one global batch; returns the global metric sums."""
        micro = step_batch.micro_batches
        # The pipeline schedule needs the activation shape: taken from the batch itself, as
        # a micro-batch may hold more rows than micro_batch_size samples (DPO puts chosen and
        # rejected side by side). A packed micro-batch runs as one row (see forward_batch).
        rows, width = micro[0]["tokens"].shape
        packed = "cu_seqlens" in micro[0]
        seq_length, rows_per_micro_batch = (rows * width, 1) if packed else (width, rows)
        fwd_bwd = get_forward_backward_func()

        def forward_step_func(data_iterator, model):
            with native_torch():
                return self.forward_step(next(data_iterator), model)

        with cuda_on_cpu():
            outputs = fwd_bwd(
                forward_step_func=forward_step_func,
                data_iterator=iter(micro),
                model=self.model,
                num_microbatches=len(micro),
                seq_length=seq_length,
                micro_batch_size=rows_per_micro_batch,
                forward_only=forward_only,
            )
        return self._reduce_sums(outputs)

    def _reduce_sums(self, outputs) -> dict:
        sums = None
        if parallel_state.is_pipeline_last_stage():
            keys = sorted(outputs[0].keys()) if outputs else []
            values = torch.tensor(
                [sum(float(o[k]) for o in outputs) for k in keys], dtype=torch.float64
            )
            if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
                dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
            sums = dict(zip(keys, values.tolist()))
        return _pipeline_broadcast(sums)

    def optimize(self, step_batch) -> dict:
        """Forward, backward and one optimizer step over ``step_batch``; the finalized metrics
        plus ``grad_norm`` and ``lr`` (unprefixed)."""
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self.run_global_batch(step_batch, forward_only=False)
        grad_norm, lr, stepped = optimizer_step(self.optimizer, self.scheduler)
        self._check_divergence(stepped, grad_norm)
        return {**self.finalize_metrics(sums), "grad_norm": grad_norm, "lr": lr}

    def _check_divergence(self, stepped: bool, grad_norm: float) -> None:
        """Count updates skipped for a non-finite gradient norm; stop after too many in a row."""
        if stepped:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        limit = self.max_nonfinite_steps
        self.log.warning(f"step {self.step + 1}: the gradient norm is {grad_norm}; the update was skipped "
                         f"({self.skipped_in_a_row} in a row, the run stops at {limit})")
        if self.skipped_in_a_row >= limit:
            raise DivergenceError(
                f"training diverged: the gradient norm was not finite for {limit} optimizer steps in a row "
                f"(trainer.{self.algo}.max_nonfinite_steps) at step {self.step + 1}; lower model.optim.lr or check the "
                "data, and restart from the last checkpoint (all checkpoints hold finite weights)"
            )

    def train_step(self, step_batch) -> dict:
        return {f"train/{k}": v for k, v in self.optimize(step_batch).items()}

    def checkpoint_metrics(self, val: dict) -> dict:
        """The validation metrics checkpoints are ranked by (``monitor`` names one)."""
        return {"val_loss": val["val/loss"]} if "val/loss" in val else {}

    def close(self) -> None:
        """Release what the trainer holds besides the model (clients, engines)."""

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_loader is None:
            return {}
        for chunk in self.model:
            chunk.eval()
        total = {}
        for step_batch in self.val_loader.epoch(0, self.limit_val_batches):
            for k, v in self.run_global_batch(step_batch, forward_only=True).items():
                total[k] = total.get(k, 0.0) + v
        for chunk in self.model:
            chunk.train()
        return {f"val/{k}": v for k, v in self.finalize_metrics(total).items()} if total else {}

    # ---- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "scheduler": self.scheduler.state_dict(),
            "metrics": dict(self.best_metrics),
        }

    def extra_checkpoint_state(self) -> dict | None:
        """Sharded state a training checkpoint stores beside the model's (``{name: sharded
        dict}``), restored by the subclass's :meth:`restore`; None: nothing."""
        return None

    def restore(self, path) -> None:
        """Resume from a training checkpoint: weights, optimizer, RNG, schedule position, data
        position. The learning-rate schedule is the config's (``model.optim``): a changed
        ``lr`` / ``min_lr`` / schedule applies from the resumed step on, and the change is logged."""
        configured = [(g.get("max_lr"), g.get("min_lr")) for g in self.optimizer.param_groups]
        state = load_checkpoint(path, self.model, self.optimizer)
        saved = [(g.get("max_lr"), g.get("min_lr")) for g in self.optimizer.param_groups]
        for group, (max_lr, min_lr) in zip(self.optimizer.param_groups, configured):
            group["max_lr"], group["min_lr"] = max_lr, min_lr  # the checkpoint's would win otherwise
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.epoch = int(state.get("epoch", 0))
        self.scheduler.load_state_dict(state["scheduler"])
        if saved != configured:
            self.log.info(f"model.optim differs from the checkpoint's (max/min lr {saved[0]} -> {configured[0]}); the "
                          f"config's schedule applies from step {self.step}")
        self.best_metrics = dict(state.get("metrics") or {})
        self.train_loader.sampler.consumed_samples = self.consumed_samples
        self.log.info(f"resumed from {path} at step {self.step} ({self.consumed_samples} samples)")

    def save(self) -> None:
        if self.checkpoint_manager is None:
            return
        with self.timers.time("checkpoint"):
            path = self.checkpoint_manager.save(
                self.model, self.model_cfg_to_save, self.optimizer, self.state_dict(), self.tokenizer_dir,
                extra=self.extra_checkpoint_state(),
            )
        self.log.info(f"saved checkpoint {path}")

    def export_final_model(self, path) -> None:
        """Weights only (no optimizer state): what a later run restores from. A LoRA model's
        adapters are merged first, so the final model is a plain one that any run, the
        generation scripts and the Hugging Face export take as it is."""
        model_cfg = self.model_cfg_to_save
        if has_lora(self.model):
            merge_lora(self.model)
            model_cfg = dict(model_cfg, peft={"peft_scheme": "none", "merged_from": dict(model_cfg.get("peft") or {})})
        save_checkpoint(path, self.model, model_cfg, None, self.state_dict(), self.tokenizer_dir)
        self.log.info(f"saved final model to {path}")

    # ---- the loop --------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until ``max_steps`` (or ``max_time_per_run``); returns the last metrics."""
        start = time.monotonic()
        sampler = self.train_loader.sampler
        bar = tqdm(
            total=self.max_steps, initial=self.step, desc=f"{self.algo} training",
            disable=not is_global_rank_zero(), dynamic_ncols=True,
        )
        metrics = {}
        saved_at = None
        if self.metrics_logger is not None:
            self.metrics_logger.discard_after(self.step)
        data_iter = iter(self.train_loader)
        if self.validate_at_start and self.step == 0 and self.val_check_interval:
            with self.timers.time("validation"):
                val = self.validate()
            if self.metrics_logger is not None and val:
                self.metrics_logger.log({**val, **self.timers.pop()}, 0)
        with GracefulStop() as stop, contextlib.closing(bar):
            while self.step < self.max_steps:
                step_start = time.monotonic()
                with self.timers.time("data"):
                    step_batch = next(data_iter)
                with self.timers.time("train_step"):
                    metrics = self.train_step(step_batch)
                self.step += 1
                self.consumed_samples = sampler.consumed_samples
                self.epoch = self.consumed_samples // sampler.samples_per_epoch
                metrics.update(
                    consumed_samples=self.consumed_samples, epoch=self.epoch,
                    step_time=time.monotonic() - step_start,
                )
                last = self.step >= self.max_steps
                if self.val_check_interval and (self.step % self.val_check_interval == 0 or last):
                    with self.timers.time("validation"):
                        val = self.validate()
                    metrics.update(val)
                    self.best_metrics.update(self.checkpoint_metrics(val))
                # Every rank stops after the same step (clocks and signals differ between ranks).
                out_of_time, signum = stop.agreed(self.max_time is not None and time.monotonic() - start > self.max_time)
                metrics.update(self.timers.pop())
                if self.metrics_logger is not None:
                    self.metrics_logger.log(metrics, self.step)
                # The bar redraws at most every 0.1 s (tqdm's mininterval), not at every step.
                bar.set_postfix({k.replace("_rollouts", "").replace("/", "_").removeprefix("train_"): f"{v:.4g}"
                                 for k, v in metrics.items() if k in self.progress_keys}, refresh=False)
                bar.update(1)
                if (self.save_interval and self.step % self.save_interval == 0) or last or out_of_time or signum:
                    self.save()
                    saved_at = self.step
                if signum:
                    raise StoppedBySignal(signum, f"stopped by {signal.Signals(signum).name} after step {self.step}; "
                                                  "the checkpoint is saved: rerun the same command to resume")
                if out_of_time:
                    self.log.info(f"max_time_per_run reached after step {self.step}; stopping")
                    break
        bar.close()
        if saved_at != self.step and self.step > 0:
            self.save()
        return metrics

    @property
    def finished(self) -> bool:
        return self.step >= self.max_steps

