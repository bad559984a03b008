"""Knowledge distillation from a teacher's top-k logits (see conf/gpt_knowledge_distillation.yaml
and docs/distillation.md).

    python examples/nlp/gpt/train_gpt_knowledge_distillation.py \
        model.data.data_prefix.train=results/topk/train.jsonl model.data.data_prefix.validation=results/topk/validation.jsonl
"""

from nemo_aligner.utils.entry import exit_without_teardown, run_training
from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="gpt_knowledge_distillation")
def main(cfg) -> None:
    from nemo_aligner.algorithms.distillation import build_distillation_trainer

    run_training(cfg, build_distillation_trainer)


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
    main()
    exit_without_teardown()
