"""Builder pieces shared by the trainers whose data are groups of sequences (DPO, KTO,
reward models): data settings, packing and step loaders."""

from functools import partial

from nemo_aligner.data.loader import StepLoader
from nemo_aligner.data.preference import (
    PackedGroupDataset,
    group_collate,
    group_length,
    merged_length,
    micro_batch_collate,
    padding_group,
)
from nemo_aligner.data.samplers import MegatronBatchSampler
from nemo_aligner.utils import setup
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.utils.logging import get_logger


def data_settings(cfg, model_cfg) -> dict:
    """``max_seq_length`` (per sequence), ``truncation``, ``add_bos``, ``add_eos`` from ``model.data``."""
    data = cfg_get(cfg, "model.data")
    max_len = int(data.get("max_seq_length") or model_cfg["encoder_seq_length"])
    limit = int(model_cfg.get("max_position_embeddings") or model_cfg["encoder_seq_length"])
    if max_len > limit:
        raise ValueError(
            f"model.data.max_seq_length={max_len} exceeds what the model takes "
            f"(max_position_embeddings={limit}); lower it"
        )
    return {
        "max_seq_length": max_len,
        "truncation": data.get("truncation", "error"),
        "add_bos": bool(data.get("add_bos", False)),
        "add_eos": bool(data.get("add_eos", True)),
    }


def data_paths(cfg) -> tuple[str, str | None]:
    from nemo_aligner.data.datasets import data_prefix

    prefix = data_prefix(cfg)
    if not prefix.get("train"):
        raise ValueError("set model.data.data_prefix.train to a JSONL file")
    return prefix["train"], prefix.get("validation")


def log_dataset(name: str, dataset) -> None:
    log = get_logger()
    log.info(
        f"{name}: {len(dataset)} samples from {dataset.path} "
        f"(truncated {dataset.num_truncated}, dropped {dataset.num_dropped} as longer than "
        f"max_seq_length {dataset.max_seq_length}, policy '{dataset.truncation}')"
    )
    identical = getattr(dataset, "num_identical", 0)
    if identical:
        log.warning(
            f"{name}: {identical} of {len(dataset)} pairs in {dataset.path} have the same chosen and rejected response; "
            "they carry no preference (their DPO loss stays at ln 2) - check the data"
        )


def maybe_pack(cfg, dataset, max_seq_length: int, use_packed_file: bool = True, pack_size: int | None = None):
    """``dataset`` packed per ``model.data.packing`` (or as is when packing is off).

    ``packing.packed_file`` (precomputed bins) describes the training file; other datasets
    (``use_packed_file=False``) are packed with ``packing.algorithm``, into packs of
    ``pack_size`` when given (the training packs' size).

    A pack must hold the largest group (a pair is two sequences of up to
    ``max_seq_length``), so ``pack_size`` defaults to, and must be at least, twice
    ``max_seq_length``.
    """
    packing = cfg_get(cfg, "model.data.packing", {}) or {}
    if not packing.get("enabled", False):
        return dataset
    pack_size = int(pack_size or packing.get("pack_size") or 2 * max_seq_length)
    if pack_size < 2 * max_seq_length:
        raise ValueError(
            f"model.data.packing.pack_size={pack_size} is less than twice max_seq_length ({max_seq_length}); "
            f"a pair may not fit: set pack_size >= {2 * max_seq_length}"
        )
    share = share_prompt(cfg)
    if packing.get("packed_file") and use_packed_file:
        packed = PackedGroupDataset.from_file(dataset, packing["packed_file"], share_prefix=share)
    else:
        packed = PackedGroupDataset(
            dataset, pack_size, algorithm=packing.get("algorithm", "first_fit_shuffle"),
            seed=int(cfg_get(cfg, "seed", 1234)), share_prefix=share,
        )
    saved = sum(dataset.lengths) - sum(packed.lengths)
    shared = f"; shared prompts save {saved} of {sum(dataset.lengths)} tokens" if saved else ""
    get_logger().info(
        f"packed {len(dataset)} samples into {len(packed)} packs of {packed.pack_size} tokens "
        f"(efficiency {packed.packing_efficiency:.3f}{shared})"
    )
    return packed


def share_prompt(cfg) -> bool:
    """``model.data.packing.share_prompt`` (default true): a pair's prompt computed once per
    pack. It needs this package's packed attention, so it is off (with a log line) where the
    layer spec is Transformer Engine's."""
    if not bool(cfg_get(cfg, "model.data.packing.share_prompt", True)):
        return False
    from nemo_aligner.models.gpt import uses_transformer_engine

    if uses_transformer_engine():
        get_logger().info("model.data.packing.share_prompt is off: Transformer Engine attention cannot share a prompt")
        return False
    return True


def padding_free(cfg) -> bool:
    """``model.data.padding_free`` (default true): each micro-batch's sequences in one row, no
    padding between them (``global_batch_size`` still counts groups); off with dataset-level
    packing, which already leaves no padding."""
    packing = cfg_get(cfg, "model.data.packing", {}) or {}
    return bool(cfg_get(cfg, "model.data.padding_free", True)) and not packing.get("enabled", False)


def micro_batch_collation(cfg, pad_id: int):
    """``(collate, row_length)`` for micro-batches of groups: padding-free (one row per
    micro-batch, prompts shared) by default, else one row per sequence; ``row_length(groups)``
    is None in the second case (the longest group's sequence is the width)."""
    if padding_free(cfg):
        share = share_prompt(cfg)
        return partial(micro_batch_collate, pad_id=pad_id, share_prefix=share), partial(merged_length, share_prefix=share)
    return partial(group_collate, pad_id=pad_id), None


def micro_batch_tokens(cfg, model_cfg, dataset) -> int | None:
    """Tokens a padding-free micro-batch may hold (``model.data.micro_batch_tokens``).

    Default: what ``micro_batch_size`` padded groups would take, ``micro_batch_size`` x
    sequences per group x ``max_seq_length``, so memory stays bounded by the same number while
    short groups share a micro-batch. ``0``: exactly ``micro_batch_size`` groups per
    micro-batch. The losses are sums over the global batch, so results do not depend on it.
    """
    value = cfg_get(cfg, "model.data.micro_batch_tokens", None)
    if value is None:
        mbs = int(model_cfg["micro_batch_size"])
        return mbs * len(dataset[0]["sequences"]) * data_settings(cfg, model_cfg)["max_seq_length"]
    try:
        value = int(value)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise ValueError(f"model.data.micro_batch_tokens={cfg_get(cfg, 'model.data.micro_batch_tokens')!r}; "
                         "give a number of tokens, 0 (micro_batch_size groups per micro-batch) or null (the default)")
    return value or None


def group_loaders(cfg, model_cfg, train_ds, val_ds, pad_id: int):
    """Step loaders over group datasets (packed or not), and their collate function."""
    dp_rank, dp_size = setup.data_parallel_info()
    data = cfg_get(cfg, "model.data")
    gbs, mbs = int(model_cfg["global_batch_size"]), int(model_cfg["micro_batch_size"])
    seed = int(cfg_get(cfg, "seed", 1234))
    multiple = 8 * int(model_cfg.get("tensor_model_parallel_size", 1))
    collate, row_length = micro_batch_collation(cfg, pad_id)
    budget = micro_batch_tokens(cfg, model_cfg, train_ds) if row_length is not None else None

    def loader(ds, shuffle, drop_last):
        sampler = MegatronBatchSampler(
            len(ds), 0, gbs, dp_rank, dp_size, drop_last=drop_last, shuffle=shuffle, seed=seed
        )
        return StepLoader(ds, sampler, mbs, collate, pad_to_multiple_of=multiple, sample_length=group_length,
                          padding_sample=padding_group, row_length=row_length, token_budget=budget,
                          uniform_width=setup.uniform_micro_batch_width())

    train = loader(train_ds, bool(data.get("shuffle", True)), bool(data.get("drop_last", True)))
    val = loader(val_ds, False, False) if val_ds is not None else None
    return train, val, collate
