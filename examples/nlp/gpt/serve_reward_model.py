"""Serve a reward model (or a rule-based reward) over PyTriton (see conf/inference_rm.yaml).

    python examples/nlp/gpt/serve_reward_model.py rm_model_file=results/training_rm/final_model inference.port=5555
    python examples/nlp/gpt/serve_reward_model.py reward.function=nemo_aligner.rewards.quickstart:exact_match
    torchrun --nproc-per-node 2 examples/nlp/gpt/serve_reward_model.py rm_model_file=... model.tensor_model_parallel_size=2

Rank 0 serves on 127.0.0.1 unless inference.host says otherwise; Ctrl-C or SIGTERM stops
every rank. RL actors reach it through remote_rm.reward_model.{ip, port}.
"""

from nemo_aligner.utils.entry import report_user_errors
from nemo_aligner.utils.hydra_runner import hydra_runner


@hydra_runner(config_path="../../../conf", config_name="inference_rm")
def main(cfg) -> None:
    from nemo_aligner.servers.reward_model import build_reward_server
    from nemo_aligner.utils import distributed

    with report_user_errors():
        server = build_reward_server(cfg)
    server.serve()
    distributed.destroy()


if __name__ == "__main__":
    main()
