"""Supervised fine-tuning (SFT) on Megatron-Core GPT.

Also the base for SteerLM's attribute-conditioned SFT, which differs only in its data.
"""

from nemo_aligner.algorithms.trainer import BaseTrainer
from nemo_aligner.utils.config import cfg_get
from nemo_aligner.losses.supervised import masked_token_nll
from nemo_aligner.models.forward import forward_batch, rows_of_logits
from nemo_aligner.models.logprobs import token_logprobs


def sft_loss_fn(batch):
    """Loss function over the final stage's logits for one micro-batch: ``[b, s, V/tp]``, or
    ``[K, V/tp]`` at :func:`~nemo_aligner.models.forward.loss_positions` only."""

    def loss_fn(logits):
        labels, loss_mask = rows_of_logits(logits, batch, "labels", "loss_mask")
        logprobs = token_logprobs(logits, labels, inplace=True)
        loss_sum, num_tokens = masked_token_nll(logprobs, loss_mask)
        sums = {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach()}
        return loss_sum, num_tokens.int(), sums

    return loss_fn


class SupervisedTrainer(BaseTrainer):
    """Next-token loss on the response tokens; reports ``loss`` (per token) and ``num_tokens``."""

    algo = "sft"

    def forward_step(self, batch, model):
        return forward_batch(model, batch), sft_loss_fn(batch)

    def finalize_metrics(self, sums: dict) -> dict:
        tokens = max(sums["num_tokens"], 1.0)
        return {"loss": sums["loss_sum"] / tokens, "num_tokens": sums["num_tokens"]}


def build_sft_datasets(cfg, model_cfg, tokenizer):
    """Train and validation datasets (packed when ``model.data.packing.enabled``)."""
    from functools import partial

    from nemo_aligner.data.datasets import DEFAULT_PROMPT_TEMPLATE, SFTDataset, data_prefix, sft_collate
    from nemo_aligner.data.packing import PackedDataset
    from nemo_aligner.data.steerlm_template import chat_prompt_tokens

    data = cfg_get(cfg, "model.data")
    max_len = int(data.get("max_seq_length") or model_cfg["encoder_seq_length"])
    if max_len > int(model_cfg.get("max_position_embeddings") or model_cfg["encoder_seq_length"]):
        raise ValueError(
            f"model.data.max_seq_length={max_len} exceeds what the model takes "
            f"(max_position_embeddings={model_cfg.get('max_position_embeddings')}); lower it"
        )

    special = data.get("chat_prompt_tokens")
    special = chat_prompt_tokens(special) if special is not None else None

    def make(path):
        return SFTDataset(
            path, tokenizer, max_len,
            prompt_template=data.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE,
            truncation=data.get("truncation", "error"),
            add_bos=bool(data.get("add_bos", False)),
            add_eos=bool(data.get("add_eos", True)),
            chat_prompt_tokens=special,
        )

    prefix = data_prefix(cfg)
    if not prefix.get("train"):
        raise ValueError("set model.data.data_prefix.train to a JSONL file")
    from nemo_aligner.algorithms.group_data import log_dataset

    train = make(prefix["train"])
    log_dataset("train", train)
    val = make(prefix["validation"]) if prefix.get("validation") else None
    if val is not None:
        log_dataset("validation", val)
    packing = data.get("packing") or {}
    if packing.get("enabled", False):
        pack_size = int(packing.get("pack_size") or model_cfg["encoder_seq_length"])
        if packing.get("packed_file"):
            train = PackedDataset.from_file(train, packing["packed_file"])
        else:
            train = PackedDataset(
                train, pack_size, algorithm=packing.get("algorithm", "first_fit_shuffle"),
                seed=int(cfg_get(cfg, "seed", 1234)),
            )
    collate = partial(sft_collate, pad_id=tokenizer.pad_id)
    return train, val, collate


def token_loaders(cfg, model_cfg, train_ds, val_ds, collate):
    """``(train, validation)`` step loaders over per-sample datasets (SFT, distillation): global
    batches of ``model.global_batch_size`` samples split over data-parallel ranks, micro-batches
    padded to a multiple of 8 x TP; the validation loader is None without a dataset."""
    from nemo_aligner.data.loader import StepLoader
    from nemo_aligner.data.samplers import MegatronBatchSampler
    from nemo_aligner.utils import setup

    dp_rank, dp_size = setup.data_parallel_info()
    data = cfg_get(cfg, "model.data")
    gbs, mbs = int(model_cfg["global_batch_size"]), int(model_cfg["micro_batch_size"])
    seed = int(cfg_get(cfg, "seed", 1234))
    multiple = 8 * int(model_cfg.get("tensor_model_parallel_size", 1))

    def loader(ds, shuffle, drop_last):
        sampler = MegatronBatchSampler(
            len(ds), 0, gbs, dp_rank, dp_size, drop_last=drop_last, shuffle=shuffle, seed=seed
        )
        return StepLoader(ds, sampler, mbs, collate, pad_to_multiple_of=multiple,
                          uniform_width=setup.uniform_micro_batch_width())

    train_loader = loader(train_ds, bool(data.get("shuffle", True)), bool(data.get("drop_last", True)))
    val_loader = loader(val_ds, False, False) if val_ds is not None else None
    return train_loader, val_loader


def build_sft_trainer(cfg) -> SupervisedTrainer:
    """Everything an SFT run needs, from its config (see ``conf/gpt_sft.yaml``)."""
    from nemo_aligner.utils import setup

    setup.init_distributed(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    train_ds, val_ds, collate = build_sft_datasets(cfg, model_cfg, tokenizer)
    train_loader, val_loader = token_loaders(cfg, model_cfg, train_ds, val_ds, collate)
    model = setup.build_model(cfg, model_cfg, vocab_size)
    trainer = SupervisedTrainer(
        cfg, model, None, None, train_loader, val_loader,
        checkpoint_manager=setup.checkpoint_manager(cfg),
        model_cfg_to_save=model_cfg, tokenizer_dir=tokenizer_src,
    )
    return setup.finish_build(cfg, trainer, model_cfg, model)
