"""Write a teacher's top-k logits over SFT data, for knowledge distillation.

    python examples/nlp/synthetic_data_gen/compute_topk_logits.py \
        pretrained_checkpoint.restore_from_path=results/gpt_sft/final_model \
        data.file_path=data/quickstart/sft_train.jsonl output_path=results/topk/train.jsonl top_k=4
    torchrun --nproc-per-node 2 examples/nlp/synthetic_data_gen/compute_topk_logits.py model.tensor_model_parallel_size=2 ...

Each line holds a sample's tokens, labels and loss mask (as SFT renders them) with, per
position, the teacher's top-k logits (descending), their token ids and the log-sum-exp of all
its logits; ``OUTPUT.meta.json`` holds k and the tokenizer's fingerprint. An interrupted run
resumes by index. Options: conf/compute_topk_logits.yaml; format: nemo_aligner/data/distillation.py.
"""

from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="compute_topk_logits")
def main(cfg) -> None:
    from functools import partial

    from nemo_aligner.algorithms.topk_logits import write_topk_logits
    from nemo_aligner.data.datasets import SFTDataset, sft_collate
    from nemo_aligner.utils import distributed, setup
    from nemo_aligner.utils.config import cfg_get, cfg_int
    from nemo_aligner.utils.entry import report_user_errors
    from nemo_aligner.utils.logging import get_logger

    with report_user_errors():
        for key in ("pretrained_checkpoint.restore_from_path", "data.file_path", "output_path"):
            if cfg_get(cfg, key, None) is None:
                raise ValueError(f"set {key}")
        if cfg_int(cfg, "model.pipeline_model_parallel_size", 1) != 1:
            raise ValueError("model.pipeline_model_parallel_size must be 1 here (tensor and data parallelism only)")
        top_k = cfg_int(cfg, "top_k", minimum=1)
        setup.init_distributed(cfg)
        model_cfg = setup.resolve_model_cfg(cfg)
        tokenizer, _ = setup.build_tokenizer(cfg)
        vocab = setup.set_vocab_size(model_cfg, tokenizer)
        if top_k > vocab:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary ({vocab} ids)")
        model = setup.build_model(cfg, model_cfg, vocab, wrap=False)
        data = cfg.data
        dataset = SFTDataset(
            data.file_path, tokenizer, int(data.max_seq_length or model_cfg["encoder_seq_length"]),
            prompt_template=data.prompt_template, truncation=data.truncation,
            add_bos=bool(data.add_bos), add_eos=bool(data.add_eos),
        )
        count = write_topk_logits(
            model, dataset, partial(sft_collate, pad_id=tokenizer.pad_id), cfg.output_path, top_k, tokenizer,
            str(cfg.pretrained_checkpoint.restore_from_path), cfg_int(cfg, "model.micro_batch_size", minimum=1),
            start=int(cfg.start_from_idx), end=None if cfg.end_at_idx is None else int(cfg.end_at_idx) + 1,
        )
    if distributed.is_global_rank_zero():
        get_logger().info(f"wrote the top-{top_k} logits of {count} samples to {cfg.output_path}")
    distributed.destroy()


if __name__ == "__main__":  # dist_checkpointing's reader processes re-import this file
    main()
