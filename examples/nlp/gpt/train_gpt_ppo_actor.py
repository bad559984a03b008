"""PPO actor training against a critic server (see conf/gpt_ppo_actor.yaml and docs/ppo.md).

    python examples/nlp/gpt/serve_ppo_critic.py pretrained_checkpoint.restore_from_path=RM &   # the critic
    python examples/nlp/gpt/train_gpt_ppo_actor.py pretrained_checkpoint.restore_from_path=SFT_MODEL
    python examples/nlp/gpt/launch_ppo.py ...   # both, started and stopped together

Under torchrun the actor takes any TP/PP/DP layout; the critic server has its own.
"""

from nemo_aligner.utils.entry import exit_without_teardown, run_training
from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="gpt_ppo_actor")
def main(cfg) -> None:
    from nemo_aligner.algorithms.ppo import build_ppo_trainer

    run_training(cfg, build_ppo_trainer)


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
    main()
    exit_without_teardown()
