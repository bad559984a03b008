"""Generate responses for JSONL prompts with a trained checkpoint or a Hugging Face model.

    python examples/nlp/gpt/generate.py pretrained_checkpoint.restore_from_path=DIR \
        input_file=prompts.jsonl output_file=responses.jsonl \
        sampling.greedy=true sampling.max_new_tokens=128 sampling.min_new_tokens=0
    torchrun --nproc-per-node 2 examples/nlp/gpt/generate.py model.tensor_model_parallel_size=2 ...

Each input line ``{"text": prompt}`` gives an output line with the same fields plus
``"response"`` and ``"response_ids"``. Options: conf/gpt_generate.yaml.
"""

import sys

from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="gpt_generate")
def main(cfg) -> None:
    from nemo_aligner.checkpoint.distributed import CheckpointError
    from nemo_aligner.generation.jsonl_generate import generate_jsonl
    from nemo_aligner.utils import distributed
    from nemo_aligner.utils.entry import USER_ERRORS
    from nemo_aligner.utils.logging import get_logger

    try:
        count = generate_jsonl(cfg)
    except (*USER_ERRORS, CheckpointError, ImportError) as e:
        rank = distributed.get_rank()
        prefix = f"[rank {rank}] " if rank else ""
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    if distributed.is_global_rank_zero():
        get_logger().info(f"wrote {count} responses to {cfg.output_file}")
    distributed.destroy()


if __name__ == "__main__":  # dist_checkpointing's reader processes re-import this file
    main()
