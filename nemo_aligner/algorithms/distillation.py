"""Knowledge distillation from a teacher's top-k logits (NeMo-Aligner's recipe).

The data are top-k logits files (:mod:`nemo_aligner.data.distillation`); the loss is
:mod:`nemo_aligner.losses.distillation` per response token, averaged over the response tokens
of the global batch. Metrics: ``loss``, ``kd_loss``, ``sft_loss`` (the student's next-token
cross-entropy, reported even with ``sft_loss_weight: 0``), ``num_tokens``.
"""

from dataclasses import dataclass

from nemo_aligner.algorithms.supervised import SupervisedTrainer, token_loaders
from nemo_aligner.losses.distillation import KD_LOSSES, distillation_token_loss, topk_kl
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.models.logprobs import token_logprobs, vocab_parallel_gather
from nemo_aligner.utils.config import cfg_get


@dataclass(frozen=True)
class DistillationSettings:
    """``model.knowledge_distillation.*``."""

    kd_loss: str = "fwd_kl"
    kd_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    logits_scale: float = 1.0
    target_logits_scale: float = 1.0
    top_k: int | None = None  # checked against the data files' k when set

    @classmethod
    def from_cfg(cls, cfg) -> "DistillationSettings":
        d = cfg_get(cfg, "model.knowledge_distillation", None) or {}
        top_k = d.get("top_k", None)
        if top_k is None:
            top_k = cfg_get(cfg, "model.data.top_k", None)  # NeMo-Aligner's place for it
        s = cls(kd_loss=str(d.get("kd_loss", "fwd_kl")), kd_loss_weight=float(d.get("kd_loss_weight", 1.0)),
                sft_loss_weight=float(d.get("sft_loss_weight", 0.0)), logits_scale=float(d.get("logits_scale", 1.0)),
                target_logits_scale=float(d.get("target_logits_scale", 1.0)),
                top_k=None if top_k is None else int(top_k))
        if s.kd_loss not in KD_LOSSES:
            raise ValueError(f"model.knowledge_distillation.kd_loss={s.kd_loss!r}; choose one of {KD_LOSSES}")
        if s.kd_loss_weight == 0 and s.sft_loss_weight == 0:
            raise ValueError("model.knowledge_distillation.kd_loss_weight and sft_loss_weight are both 0: nothing "
                             "to train; set kd_loss_weight (and optionally sft_loss_weight) above 0")
        if s.kd_loss_weight < 0 or s.sft_loss_weight < 0:
            raise ValueError("model.knowledge_distillation.kd_loss_weight and sft_loss_weight must be >= 0")
        if s.top_k is not None and s.top_k < 1:
            raise ValueError(f"model.knowledge_distillation.top_k={s.top_k}; give k >= 1 (the files' k)")
        return s


def distillation_loss_fn(batch, s: DistillationSettings):
    """Loss function over the final stage's vocab-parallel logits for one micro-batch."""

    def loss_fn(logits):
        mask = batch["loss_mask"].float()
        student = vocab_parallel_gather(logits, batch["topk_token_ids"])
        kd = topk_kl(student, batch["topk_logits"], s.kd_loss, s.logits_scale, s.target_logits_scale)
        scaled = logits if s.logits_scale == 1.0 else logits * s.logits_scale
        sft = -token_logprobs(scaled, batch["labels"])
        per_token = distillation_token_loss(kd, sft if s.sft_loss_weight else sft.detach(), s.kd_loss_weight,
                                            s.sft_loss_weight)
        loss_sum = (per_token * mask).sum()
        num_tokens = batch["loss_mask"].sum()
        sums = {"loss_sum": loss_sum.detach(), "kd_loss_sum": (kd * mask).sum().detach(),
                "sft_loss_sum": (sft * mask).sum().detach(), "num_tokens": num_tokens.detach()}
        return loss_sum, num_tokens.int(), sums

    return loss_fn


class DistillationTrainer(SupervisedTrainer):
    """SFT's loop with the distillation loss."""

    algo = "knowledge_distillation"

    def __init__(self, *args, settings: DistillationSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings

    def forward_step(self, batch, model):
        return forward_batch(model, batch), distillation_loss_fn(batch, self.settings)

    def finalize_metrics(self, sums: dict) -> dict:
        tokens = max(sums["num_tokens"], 1.0)
        return {"loss": sums["loss_sum"] / tokens, "kd_loss": sums["kd_loss_sum"] / tokens,
                "sft_loss": sums["sft_loss_sum"] / tokens, "num_tokens": sums["num_tokens"]}


def build_distillation_trainer(cfg) -> DistillationTrainer:
    """Everything a distillation run needs (see ``conf/gpt_knowledge_distillation.yaml``)."""
    from functools import partial

    from nemo_aligner.data.datasets import data_prefix
    from nemo_aligner.data.distillation import TopKDataset, topk_collate
    from nemo_aligner.utils import setup

    setup.init_distributed(cfg)
    settings = DistillationSettings.from_cfg(cfg)
    model_cfg = setup.resolve_model_cfg(cfg)
    tokenizer, tokenizer_src = setup.build_tokenizer(cfg)
    vocab_size = setup.set_vocab_size(model_cfg, tokenizer)
    prefix = data_prefix(cfg)
    if not prefix.get("train"):
        raise ValueError("set model.data.data_prefix.train to a top-k logits file (compute_topk_logits.py)")
    max_len = int(model_cfg["encoder_seq_length"])
    train_ds = TopKDataset(prefix["train"], tokenizer, settings.top_k, max_len)
    val_ds = TopKDataset(prefix["validation"], tokenizer, train_ds.k, max_len) if prefix.get("validation") else None
    train_loader, val_loader = token_loaders(cfg, model_cfg, train_ds, val_ds,
                                             partial(topk_collate, pad_id=tokenizer.pad_id))
    model = setup.build_model(cfg, model_cfg, vocab_size)
    trainer = DistillationTrainer(
        cfg, model, None, None, train_loader, val_loader, checkpoint_manager=setup.checkpoint_manager(cfg),
        model_cfg_to_save=model_cfg, tokenizer_dir=tokenizer_src, settings=settings,
    )
    return setup.finish_build(cfg, trainer, model_cfg, model)
