"""One PPO job on one machine: the critic server (and a reward-model server when asked), then
the actor once they are ready; everything is stopped when the actor exits, fails or is
interrupted (Ctrl-C saves a checkpoint first, as the actor alone does). See docs/ppo.md.

    python examples/nlp/gpt/launch_ppo.py \\
        critic.pretrained_checkpoint.restore_from_path=results/training_rm/final_model \\
        actor.pretrained_checkpoint.restore_from_path=results/sft/final_model actor.trainer.ppo.max_steps=50

Overrides go to one role by their prefix: ``actor.``, ``critic.``, ``rm.`` (the reward server,
with --reward-server: the critic then serves values only). Ports are picked free unless given
(``critic.trainer.ppo.port``, ``rm.inference.port``) and passed to the actor; logs and
checkpoints go under --log-dir (actor/, critic/, critic.log, rm.log) unless given.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from nemo_aligner.utils.launcher import Server, free_port, python_cmd, run_job  # noqa: E402

GPT = Path(__file__).resolve().parent
PREFIXES = ("actor.", "critic.", "rm.")


def split_overrides(overrides):
    roles = {p[:-1]: [] for p in PREFIXES}
    for item in overrides:
        prefix = next((p for p in PREFIXES if item.lstrip("+~").startswith(p)), None)
        if prefix is None or "=" not in item:
            sys.exit(f"error: {item!r}: prefix each override with actor., critic. or rm. (e.g. actor.trainer.ppo.max_steps=10)")
        sign = item[: len(item) - len(item.lstrip("+~"))]
        roles[prefix[:-1]].append(sign + item.lstrip("+~")[len(prefix):])
    return roles


def value(overrides, key, default=None):
    for item in overrides:
        if item.split("=", 1)[0].lstrip("+~") == key:
            return item.split("=", 1)[1]
    return default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="results/ppo", help="where each role's logs and checkpoints go")
    parser.add_argument("--actor-nproc", type=int, default=1, help="actor processes (torchrun when > 1)")
    parser.add_argument("--critic-nproc", type=int, default=1, help="critic server processes")
    parser.add_argument("--reward-server", action="store_true", help="also start serve_reward_model.py (rm. overrides)")
    parser.add_argument("--rm-nproc", type=int, default=1, help="reward server processes")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for each server")
    parser.add_argument("overrides", nargs="*", help="actor.KEY=VALUE, critic.KEY=VALUE, rm.KEY=VALUE")
    args = parser.parse_args(argv)
    roles = split_overrides(args.overrides)
    log_dir = Path(args.log_dir)
    host = "127.0.0.1"

    critic_port = int(value(roles["critic"], "trainer.ppo.port") or free_port())
    critic_args = [f"trainer.ppo.port={critic_port}", f"trainer.ppo.host={host}"]
    actor_args = [f"remote_critic_rm.critic.ip={host}", f"remote_critic_rm.critic.port={critic_port}"]
    if value(roles["critic"], "exp_manager.explicit_log_dir") is None:
        critic_args.append(f"exp_manager.explicit_log_dir={log_dir / 'critic'}")
    if value(roles["actor"], "exp_manager.explicit_log_dir") is None:
        actor_args.append(f"exp_manager.explicit_log_dir={log_dir / 'actor'}")
    servers = []
    if args.reward_server:
        rm_port = int(value(roles["rm"], "inference.port") or free_port())
        rm_args = [f"inference.port={rm_port}", f"inference.host={host}"]
        servers.append(Server("reward model server", python_cmd(GPT / "serve_reward_model.py", args.rm_nproc,
                                                                 rm_args + roles["rm"]), host, rm_port, log_dir / "rm.log"))
        critic_args.append("trainer.ppo.combine_rm_and_critic_server=false")
        actor_args += ["remote_critic_rm.combine_rm_and_critic_server=false", f"remote_critic_rm.reward_model.ip={host}",
                       f"remote_critic_rm.reward_model.port={rm_port}"]
    elif roles["rm"]:
        sys.exit("error: rm. overrides need --reward-server")
    servers.insert(0, Server("critic server", python_cmd(GPT / "serve_ppo_critic.py", args.critic_nproc,
                                                         critic_args + roles["critic"]), host, critic_port,
                             log_dir / "critic.log"))
    actor = python_cmd(GPT / "train_gpt_ppo_actor.py", args.actor_nproc, actor_args + roles["actor"])
    return run_job(servers, actor, ready_timeout_s=args.ready_timeout)


if __name__ == "__main__":
    sys.exit(main())
