"""Build the pieces of a training run from its Hydra config.

Every entry point follows the same order, so that bad input fails before anything is
written: distributed init and layout checks, tokenizer, datasets (validated eagerly),
model (restored when ``pretrained_checkpoint.restore_from_path`` is set), optimizer;
only then the log directory, metrics and checkpoints.
"""

import os
from pathlib import Path

from megatron.core import parallel_state
from omegaconf import OmegaConf

from nemo_aligner.checkpoint.distributed import (
    CheckpointError,
    CheckpointManager,
    is_checkpoint,
    load_checkpoint,
    read_model_config,
)
from nemo_aligner.checkpoint.hf import is_hf_dir, load_hf_weights, model_cfg_from_hf_dir
from nemo_aligner.data.tokenizers import load_tokenizer
from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.utils import distributed
from nemo_aligner.utils.config import cfg_get, cfg_int
from nemo_aligner.utils.cpu_support import needs_cpu_support
from nemo_aligner.utils.host_memory import keep_freed_memory
from nemo_aligner.utils.optim import build_optimizer, build_scheduler, wrap_ddp

# Keys that describe the network itself: taken from a checkpoint being restored, so a
# run's config cannot silently build a different architecture than the weights.
ARCHITECTURE_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "layernorm_epsilon", "activation", "bias", "qkv_bias",
    "position_embedding_type", "rotary_base", "rotary_percent", "rope_scaling",
    "seq_len_interpolation_factor", "share_embeddings_and_output_weights",
    "max_position_embeddings", "make_vocab_size_divisible_by", "vocab_size", "sliding_window",
    "hf_config",
)


def restore_path(cfg):
    """``pretrained_checkpoint.restore_from_path`` as a Path (None when unset): one of our
    checkpoints or a Hugging Face model directory, told apart by their files."""
    path = cfg_get(cfg, "pretrained_checkpoint.restore_from_path", None)
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"pretrained_checkpoint.restore_from_path={path} does not exist; "
            "give a checkpoint directory written by training or a Hugging Face model directory"
        )
    if is_checkpoint(p) or is_hf_dir(p):
        return p
    raise CheckpointError(
        f"pretrained_checkpoint.restore_from_path={path} is neither one of our checkpoints "
        "(metadata.json + model_config.yaml) nor a Hugging Face directory (config.json)"
    )


def _saved_model_cfg(path) -> dict:
    return model_cfg_from_hf_dir(path) if is_hf_dir(path) and not is_checkpoint(path) else read_model_config(path)


def resolve_model_cfg(cfg):
    """The run's ``model.*`` config with the architecture of the restored checkpoint."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ckpt = restore_path(cfg)
    if ckpt is not None:
        saved = _saved_model_cfg(ckpt)
        for key in ARCHITECTURE_KEYS:
            if key in saved:
                model_cfg[key] = saved[key]
    # Whole numbers the loops divide by: checked here, each error naming its key.
    for key in ("micro_batch_size", "global_batch_size", "encoder_seq_length"):
        if key in model_cfg:
            model_cfg[key] = cfg_int(model_cfg, key, minimum=1, name=f"model.{key}")
    return model_cfg


def set_vocab_size(model_cfg: dict, tokenizer) -> int:
    """The model's vocabulary: the restored checkpoint's (an embedding may have more rows than
    the tokenizer has ids), else the tokenizer's. Stored in ``model_cfg["vocab_size"]``."""
    vocab = int(model_cfg.get("vocab_size") or tokenizer.vocab_size)
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {vocab}; "
            "use the tokenizer the checkpoint was trained with (model.tokenizer.model)"
        )
    model_cfg["vocab_size"] = vocab
    return vocab


def init_distributed(cfg) -> None:
    """Distributed state and model-parallel groups from ``cfg``'s layout (``model.num_layers``
    may be unset, as for a Hugging Face source whose depth is read later)."""
    if needs_cpu_support():
        keep_freed_memory()  # activations live in host memory: reuse it, don't page it in again
    num_layers = cfg_get(cfg, "model.num_layers", None)
    distributed.initialize(
        tensor_model_parallel_size=cfg_int(cfg, "model.tensor_model_parallel_size", 1, minimum=1),
        pipeline_model_parallel_size=cfg_int(cfg, "model.pipeline_model_parallel_size", 1, minimum=1),
        seed=cfg_int(cfg, "seed", 1234),
        num_layers=None if num_layers is None else cfg_int(cfg, "model.num_layers", minimum=1),
    )


# The quickstart tokenizer: the default only when neither the config nor the model provides one.
BUNDLED_TOKENIZER = Path(__file__).resolve().parents[2] / "data/quickstart/tokenizer.json"


def tokenizer_source(cfg) -> str:
    """The tokenizer a run uses, in this order: ``model.tokenizer.model`` when set; else the one
    saved with ``pretrained_checkpoint.restore_from_path`` (our checkpoint's ``tokenizer/``, or
    the Hugging Face directory's files); else the bundled quickstart tokenizer."""
    path = cfg_get(cfg, "model.tokenizer.model", None)
    if path is not None:
        return str(path)
    ckpt = restore_path(cfg)
    if ckpt is not None and (ckpt / "tokenizer").is_dir():
        return str(ckpt / "tokenizer")
    if ckpt is not None and is_hf_dir(ckpt) and any(
        (ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer.model")
    ):
        return str(ckpt)
    if ckpt is None and BUNDLED_TOKENIZER.is_file():
        return str(BUNDLED_TOKENIZER)
    raise ValueError(
        f"no tokenizer: {'the checkpoint ' + str(ckpt) + ' holds none; ' if ckpt is not None else ''}set "
        "model.tokenizer.model to a tokenizer.json, a SentencePiece .model file or a directory holding one"
    )


def build_tokenizer(cfg):
    source = tokenizer_source(cfg)
    return load_tokenizer(source), source


def build_model(cfg, model_cfg, vocab_size: int, wrap: bool = True):
    """This rank's model chunk, with the weights of ``pretrained_checkpoint.restore_from_path``
    when set (one of our checkpoints, a LoRA checkpoint of ours (merged on load), or a Hugging
    Face directory), with LoRA adapters when ``model.peft.peft_scheme=lora`` (see
    :func:`attach_peft`), DDP-wrapped unless ``wrap=False``."""
    ckpt = restore_path(cfg)
    seed = int(cfg_get(cfg, "seed", 1234))
    from_hf = ckpt is not None and not is_checkpoint(ckpt)
    model = build_gpt_model(model_cfg, vocab_size, seed=seed, initialize=not from_hf)
    if ckpt is not None:
        load_weights(model, ckpt, model_cfg)
    attach_peft(cfg, model_cfg, model)
    return wrap_ddp(model, model_cfg) if wrap else model


def is_adapter_checkpoint(path) -> bool:
    """A checkpoint of a LoRA run: its adapters, and the base model they apply to."""
    return is_checkpoint(path) and str(cfg_get(read_model_config(path), "peft.peft_scheme", "none")).lower() == "lora"


def load_weights(model, path, model_cfg) -> None:
    """Fill ``model`` from ``path``: a Hugging Face directory, a checkpoint of ours, or a LoRA
    checkpoint of ours (its base model, then its adapters, merged into plain weights)."""
    path = Path(path)
    if not is_checkpoint(path):
        load_hf_weights(model, path, model_cfg, progress=True)
        return
    if not is_adapter_checkpoint(path):
        load_checkpoint(path, [model])
        return
    from nemo_aligner.models.lora import LoRASettings, apply_lora, strip_lora

    saved = read_model_config(path)
    peft = saved["peft"]
    base = peft.get("base_model_path")
    if base is not None:
        if not Path(base).exists():
            raise CheckpointError(
                f"{path} holds LoRA adapters for the base model {base}, which does not exist any more; restore "
                "that base model, or start from a merged final_model"
            )
        load_weights(model, base, model_cfg)
    elif peft.get("base_model_seed") is not None:  # a base drawn at random: draw it again
        drawn = build_gpt_model(model_cfg, int(model_cfg["vocab_size"]), seed=int(peft["base_model_seed"]))
        model.load_state_dict(drawn.state_dict())
    apply_lora(model, LoRASettings.from_model_cfg(saved), seed=0)
    load_checkpoint(path, [model])
    strip_lora(model)


def attach_peft(cfg, model_cfg, model, also_train=()) -> None:
    """The one PEFT switch of every trainer: with ``model.peft.peft_scheme=lora`` add LoRA
    adapters (``model.peft.lora_tuning``), freeze the rest except the parameters whose names
    start with one of ``also_train`` (e.g. a reward head), continue from
    ``model.peft.restore_from_path`` when set, and record in ``model_cfg['peft']`` the base model
    (path, or seed when it was drawn) so that the run's adapter checkpoints describe themselves."""
    from nemo_aligner.models.lora import LoRASettings, apply_lora, trainable_fraction

    settings = LoRASettings.from_model_cfg(model_cfg)
    if settings is None:
        return
    ckpt = restore_path(cfg)
    seed = int(cfg_get(cfg, "seed", 1234))
    peft = model_cfg.setdefault("peft", {})
    peft["base_model_path"] = None if ckpt is None else str(ckpt.resolve())
    peft["base_model_seed"] = None if ckpt is not None else seed
    apply_lora(model, settings, seed=seed, also_train=also_train)
    if settings.restore_from_path is not None:
        load_adapters(model, settings.restore_from_path, model_cfg)
    from nemo_aligner.utils.logging import get_logger

    get_logger().info(f"LoRA on {', '.join(settings.target_modules)} (rank {settings.adapter_dim}, alpha "
                      f"{settings.alpha:g}): {100 * trainable_fraction(model):.2f}% of the parameters train")


def load_adapters(model, path, model_cfg) -> None:
    """``model.peft.restore_from_path``: continue from the adapters of a LoRA checkpoint, refused
    in one line when they were trained for another architecture or another adapter layout."""
    where = f"model.peft.restore_from_path={path}"
    if not is_adapter_checkpoint(path):
        raise CheckpointError(f"{where} is not a LoRA checkpoint of ours (its model_config.yaml has no "
                              "peft.peft_scheme: lora)")
    saved = read_model_config(path)
    for key in ARCHITECTURE_KEYS:
        if key not in ("hf_config",) and key in saved and key in model_cfg and saved[key] != model_cfg[key]:
            raise CheckpointError(f"{where}: its adapters were trained on a base model with {key}={saved[key]!r}, "
                                  f"this model has {key}={model_cfg[key]!r}; use the base model they were trained on")
    from nemo_aligner.models.lora import LoRASettings

    ours, theirs = LoRASettings.from_model_cfg(model_cfg), LoRASettings.from_model_cfg(saved)
    for key in ("target_modules", "adapter_dim", "layer_selection"):
        if getattr(ours, key) != getattr(theirs, key):
            raise CheckpointError(f"{where} has lora_tuning.{key}={getattr(theirs, key)!r}, this run "
                                  f"{getattr(ours, key)!r}; set model.peft.lora_tuning.{key} to match")
    load_checkpoint(path, [model])


def build_optimization(cfg, model_cfg, model, algo: str, max_steps: int):
    clip = float(cfg_get(cfg, f"trainer.{algo}.gradient_clip_val", 0.0) or 0.0)
    optimizer = build_optimizer([model], model_cfg, gradient_clip_val=clip)
    scheduler = build_scheduler(optimizer, model_cfg, max_steps)
    return optimizer, scheduler


def log_dir(cfg) -> Path:
    path = cfg_get(cfg, "exp_manager.explicit_log_dir", None)
    if path is None:
        raise ValueError("set exp_manager.explicit_log_dir to where logs and checkpoints go")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"exp_manager.explicit_log_dir={path} is a file; give a directory")
    return path


def check_same_architecture(path, model_cfg: dict) -> None:
    """Refuse to resume from a checkpoint of another network (one line naming the first key)."""
    saved = read_model_config(path)
    for key in ARCHITECTURE_KEYS:
        if key in ("hf_config", "vocab_size") or key not in saved or key not in model_cfg:
            continue
        if saved[key] != model_cfg[key]:
            raise CheckpointError(
                f"{path} was trained with model.{key}={saved[key]!r} but this run builds model.{key}={model_cfg[key]!r}; "
                "resume with the checkpoint's architecture, or start a new run in another exp_manager.explicit_log_dir"
            )


def start_over_guard(cfg, manager: CheckpointManager) -> None:
    """With ``exp_manager.resume_if_exists=false`` a log directory holding an earlier run is
    refused (its checkpoints would mix with the new run's, and a later plain rerun would resume
    the old one), unless ``exp_manager.overwrite=true``: then the old run is moved aside whole."""
    directory = log_dir(cfg)
    earlier = manager.checkpoints()
    final = directory / "final_model"
    metrics = directory / "metrics.jsonl"
    if not (earlier or final.exists() or metrics.exists()):
        return
    if not cfg_get(cfg, "exp_manager.overwrite", False):
        what = f"{len(earlier)} checkpoint(s)" if earlier else ("a final_model" if final.exists() else "metrics.jsonl")
        raise ValueError(
            f"exp_manager.explicit_log_dir={directory} holds an earlier run ({what}); continue it with "
            "exp_manager.resume_if_exists=true, pick a new explicit_log_dir, or set exp_manager.overwrite=true to "
            "move the earlier run aside and start over"
        )
    if distributed.is_global_rank_zero():
        import time

        aside = directory.with_name(f"{directory.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(directory, aside)
        from nemo_aligner.utils.logging import get_logger

        get_logger().info(f"moved the earlier run in {directory} to {aside}; starting over")
    distributed.barrier()


def checkpoint_manager(cfg) -> CheckpointManager:
    params = cfg_get(cfg, "exp_manager.checkpoint_callback_params", {}) or {}
    return CheckpointManager(
        log_dir(cfg) / "checkpoints",
        save_top_k=int(params.get("save_top_k", 1)),
        monitor=params.get("monitor", "val_loss"),
        mode=params.get("mode", "min"),
    )


def resolved_yaml(cfg) -> str:
    """``cfg`` as YAML with its interpolations resolved (as it ran), for ``config.yaml``."""
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 -- a plain dict, or an interpolation that cannot resolve
        return OmegaConf.to_yaml(OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg)


def data_parallel_info():
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def uniform_micro_batch_width() -> bool:
    """Whether a step's micro-batches must share one width: pipeline stages exchange
    activations of one shape per step (see :class:`~nemo_aligner.data.loader.StepLoader`)."""
    return parallel_state.get_pipeline_model_parallel_world_size() > 1


def model_from_checkpoint(path):
    """This rank's GPT chunk with the weights of checkpoint ``path`` (a LoRA checkpoint's merged
    into its base model), at the current layout.

    Distributed state must be initialized (any TP/PP); no optimizer, no DDP wrapper.
    """
    model_cfg = read_model_config(path)
    if "vocab_size" not in model_cfg:
        raise CheckpointError(f"{path}/model_config.yaml has no vocab_size; re-save the checkpoint")
    model_cfg["tensor_model_parallel_size"] = parallel_state.get_tensor_model_parallel_world_size()
    model_cfg["pipeline_model_parallel_size"] = parallel_state.get_pipeline_model_parallel_world_size()
    model = build_gpt_model(model_cfg, int(model_cfg["vocab_size"]), initialize=False)
    load_weights(model, path, model_cfg)  # a LoRA checkpoint: its base model with the adapters merged
    return model


def finish_build(cfg, trainer, model_cfg, model):
    """Optimizer and LR schedule, resume from the latest checkpoint, metrics logger."""
    from nemo_aligner.utils.logging import MetricsLogger, wandb_settings

    trainer.optimizer, trainer.scheduler = build_optimization(
        cfg, model_cfg, model, trainer.algo, trainer.max_steps * trainer.optimizer_steps_per_step
    )
    trainer.checkpoint_manager.remove_stale_temporaries()
    if cfg_get(cfg, "exp_manager.resume_if_exists", True):
        latest = trainer.checkpoint_manager.latest_intact()
        if latest is not None:
            check_same_architecture(latest, model_cfg)
            trainer.restore(latest)
    else:
        start_over_guard(cfg, trainer.checkpoint_manager)
    trainer.metrics_logger = MetricsLogger(log_dir(cfg), config_yaml=resolved_yaml(cfg), wandb_kwargs=wandb_settings(cfg))
    return trainer
