"""Serve the PPO critic over PyTriton (see conf/gpt_ppo_critic.yaml and docs/ppo.md).

    python examples/nlp/gpt/serve_ppo_critic.py pretrained_checkpoint.restore_from_path=results/training_rm/final_model
    torchrun --nproc-per-node 2 examples/nlp/gpt/serve_ppo_critic.py ... model.tensor_model_parallel_size=2

Endpoints critic_infer, critic_train and critic_save on 127.0.0.1:trainer.ppo.port unless
trainer.ppo.host says otherwise; Ctrl-C or SIGTERM stops every rank. The PPO actor reaches it
through remote_critic_rm.critic.{ip, port}.
"""

from nemo_aligner.utils.entry import report_user_errors
from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="gpt_ppo_critic")
def main(cfg) -> None:
    from nemo_aligner.servers.critic import build_critic_server
    from nemo_aligner.utils import distributed

    with report_user_errors():
        server = build_critic_server(cfg)
    server.serve()
    distributed.destroy()


if __name__ == "__main__":
    main()
