"""REINFORCE (RLOO) actor training (see conf/gpt_reinforce_actor.yaml and docs/rl.md).

    python examples/nlp/gpt/train_gpt_reinforce_actor.py pretrained_checkpoint.restore_from_path=SFT_MODEL [hydra overrides]
    torchrun --nproc-per-node 8 examples/nlp/gpt/train_gpt_reinforce_actor.py \
        model.tensor_model_parallel_size=2 model.pipeline_model_parallel_size=2
"""

from nemo_aligner.utils.entry import exit_without_teardown, run_training
from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="gpt_reinforce_actor")
def main(cfg) -> None:
    from nemo_aligner.algorithms.reinforce import build_reinforce_trainer

    run_training(cfg, build_reinforce_trainer)


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
    main()
    exit_without_teardown()
