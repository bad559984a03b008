"""Score a JSONL file with a trained reward model (see conf/score_reward_model.yaml).

    python examples/nlp/gpt/score_reward_model.py \
        pretrained_checkpoint.restore_from_path=results/training_rm/final_model \
        input_file=pairs.jsonl output_file=scored.jsonl
    (restore_from_path may also be a Hugging Face *ForSequenceClassification directory)
    torchrun --nproc-per-node 2 examples/nlp/gpt/score_reward_model.py tensor_model_parallel_size=2 ...

Every input line is validated before the model is loaded; the output is written to a
temporary file and renamed into place. The raw rewards' mean and standard deviation are
printed (what ``model.reward_standardization`` would need to center them).
"""

import os
import sys

from nemo_aligner.utils.hydra_runner import hydra_runner


def score(cfg) -> None:
    from nemo_aligner.data.preference import RewardScoringDataset, group_collate
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.models.reward_model import (
        read_reward_model_config, reward_model_from_checkpoint, reward_settings, standardization,
    )
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.config import cfg_get
    from nemo_aligner.utils.logging import get_logger

    path = cfg_get(cfg, "pretrained_checkpoint.restore_from_path", None)
    for key, value in (("pretrained_checkpoint.restore_from_path", path), ("input_file", cfg.input_file),
                       ("output_file", cfg.output_file)):
        if value is None:
            raise ValueError(f"set {key}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pretrained_checkpoint.restore_from_path={path} does not exist")
    if not os.path.isfile(cfg.input_file):
        raise FileNotFoundError(
            f"input_file={cfg.input_file} not found; give a JSONL file with one sample per line "
            '({"text"}, {"prompt", "response"} or a preference pair)'
        )
    saved = read_reward_model_config(path)
    settings = reward_settings(saved)
    data = saved.get("data") or {}
    pick = lambda key, default: cfg_get(cfg, key, None) if cfg_get(cfg, key, None) is not None else data.get(key, default)  # noqa: E731
    # Our checkpoints keep the tokenizer in tokenizer/; a Hugging Face directory holds it itself.
    tokenizer_dir = os.path.join(path, "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir if os.path.isdir(tokenizer_dir) else path)
    dataset = RewardScoringDataset(
        cfg.input_file, tokenizer,
        int(pick("max_seq_length", None) or saved["encoder_seq_length"]),
        truncation=pick("truncation", "error"), add_bos=bool(pick("add_bos", False)), add_eos=bool(pick("add_eos", True)),
    )
    overrides = dict(cfg_get(cfg, "reward_standardization", {}) or {})
    shift = standardization(saved, overrides)

    distributed.initialize(
        tensor_model_parallel_size=int(cfg.tensor_model_parallel_size),
        pipeline_model_parallel_size=int(cfg.pipeline_model_parallel_size),
        seed=int(cfg.seed), num_layers=int(saved["num_layers"]),
    )
    from functools import partial

    from nemo_aligner.models.reward_model import score_groups

    model, _ = reward_model_from_checkpoint(path)
    groups = [dataset[i] for i in range(len(dataset))]
    collate = partial(group_collate, pad_id=tokenizer.pad_id)
    raw = score_groups([model], groups, collate, int(cfg.micro_batch_size), settings["reduction"])
    rewards = raw if shift is None else (raw - shift[0]) / shift[1]
    log = get_logger()
    if distributed.is_global_rank_zero():
        write_scores(cfg.output_file, dataset, rewards)
        log.info(f"scored {len(dataset)} lines ({raw.shape[0]} sequences; truncated {dataset.num_truncated}, "
                 f"dropped {dataset.num_dropped}) -> {cfg.output_file}")
        log.info(f"raw rewards: mean {raw.mean(0).tolist()}, std {raw.std(0, unbiased=False).tolist()}"
                 + ("" if shift is None else f"; standardized with mean {shift[0].tolist()}, std {shift[1].tolist()}"))
    distributed.destroy()


def write_scores(path, dataset, rewards) -> None:
    from nemo_aligner.data.datasets import write_jsonl

    values = iter(row[0] if len(row) == 1 else row for row in rewards.tolist())
    records = []
    for line, kind in zip(dataset.lines, dataset.kinds):
        out = dict(line)
        if kind == "pair":
            out["reward_chosen"], out["reward_rejected"] = next(values), next(values)
        else:
            out["reward"] = next(values)
        records.append(out)
    write_jsonl(path, records)


@hydra_runner(config_path="../../../conf", config_name="score_reward_model")
def main(cfg) -> None:
    from nemo_aligner.checkpoint.distributed import CheckpointError
    from nemo_aligner.utils.entry import USER_ERRORS

    try:
        score(cfg)
    except (*USER_ERRORS, CheckpointError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
