"""Reward-model training: Bradley-Terry family or regression (see conf/training_rm.yaml and
docs/reward_models.md).

    python examples/nlp/gpt/train_reward_model.py [hydra overrides]
    torchrun --nproc-per-node 8 examples/nlp/gpt/train_reward_model.py \
        model.tensor_model_parallel_size=2 model.pipeline_model_parallel_size=2
"""

from nemo_aligner.utils.entry import exit_without_teardown, run_training
from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="training_rm")
def main(cfg) -> None:
    from nemo_aligner.algorithms.reward import build_rm_trainer

    run_training(cfg, build_rm_trainer)


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
    main()
    exit_without_teardown()
