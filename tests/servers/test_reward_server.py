"""The reward-model server against real PyTriton servers on loopback, started and stopped
(by process group) by the tests.

- a REINFORCE step with rewards from the server equals one with the same reward computed in
  the actor's process (a trained reward model, and a rule-based reward);
- a server killed mid-run: the actor stops with one line naming host:port and the endpoint
  within the inference timeout, the last checkpoint is intact, and a rerun resumes from it;
- a wrong port: one line naming host:port within the init timeout, nothing written.
"""

import sys
import time

import pytest

from helpers import (
    REINFORCE_SCRIPT, RM_SCRIPT, SERVE_RM_SCRIPT, TINY_SFT, background, free_port, read_metrics, rl_args, run,
    wait_for_port,
)

pytestmark = pytest.mark.slow
RULE = "nemo_aligner.rewards.quickstart:exact_match"
ONE_STEP = ["trainer.reinforce.max_steps=1", "trainer.reinforce.val_check_interval=0"]


@pytest.fixture(scope="module")
def reward_model(tiny_policy, tmp_path_factory):
    """A tiny Bradley-Terry reward model fine-tuned for a few steps from the policy."""
    log_dir = tmp_path_factory.mktemp("rm")
    arch = [a for a in TINY_SFT if a.startswith("model.") and "batch_size" not in a]
    run(RM_SCRIPT, [*arch, f"pretrained_checkpoint.restore_from_path={tiny_policy}", "model.tokenizer.model=null",
                    f"exp_manager.explicit_log_dir={log_dir}", "trainer.rm.max_steps=4", "trainer.rm.val_check_interval=0",
                    "model.micro_batch_size=4", "model.global_batch_size=8"])
    return log_dir / "final_model"


def server_cmd(port, *args, nproc=1):
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    return [*launch, str(SERVE_RM_SCRIPT), f"inference.port={port}", "inference.exit_timeout_s=1", *args]


def remote(port, *extra):
    return ["reward.function=null", "remote_rm.reward_model.ip=127.0.0.1", f"remote_rm.reward_model.port={port}",
            "remote_rm.init_timeout_s=30", "remote_rm.inference_timeout_s=10", *extra]


def error_lines(stderr):
    return [l for l in stderr.splitlines() if l.startswith("error:")]


SERVERS = {  # kind: (served, nproc, server layout)
    "reward_model": ("model", 1, []),
    "reward_model_tp2": ("model", 2, ["model.tensor_model_parallel_size=2"]),
    "reward_model_dp2": ("model", 2, []),  # rank 0 broadcasts each batch, the two ranks split it
    "rule": ("rule", 1, []),
}


@pytest.mark.parametrize("kind", list(SERVERS))
def test_remote_step_equals_in_process(kind, tiny_policy, reward_model, tmp_path):
    port = free_port()
    what, nproc, layout = SERVERS[kind]
    served = [f"rm_model_file={reward_model}", *layout] if what == "model" else [f"reward.function={RULE}"]
    local = [f"reward.model_path={reward_model}", "reward.function=null"] if what == "model" else []
    with background(server_cmd(port, *served, nproc=nproc), tmp_path / "server.log") as server:
        wait_for_port(port, server)
        run(REINFORCE_SCRIPT, rl_args("reinforce", tiny_policy, tmp_path / "remote", *ONE_STEP, *remote(port)))
    run(REINFORCE_SCRIPT, rl_args("reinforce", tiny_policy, tmp_path / "local", *ONE_STEP, *local))
    a, b = read_metrics(tmp_path / "remote")[-1], read_metrics(tmp_path / "local")[-1]
    assert a["train_rollouts/rewards"] == pytest.approx(b["train_rollouts/rewards"], abs=1e-5)
    assert a["train_rollouts/rewards_with_kl"] == pytest.approx(b["train_rollouts/rewards_with_kl"], abs=1e-5)
    assert a["train_optim/loss"] == pytest.approx(b["train_optim/loss"], abs=1e-5)
    assert a["train_optim/grad_norm"] == pytest.approx(b["train_optim/grad_norm"], rel=1e-4)
    if kind == "rule":
        assert a["train_rollouts/rewards"] == b["train_rollouts/rewards"]


def test_server_killed_mid_run(tiny_policy, tmp_path, dist_world_of_one):
    port = free_port()
    log_dir = tmp_path / "actor"
    actor_args = rl_args("reinforce", tiny_policy, log_dir, "trainer.reinforce.max_steps=200",
                         "trainer.reinforce.val_check_interval=0", "trainer.reinforce.save_interval=2", *remote(port))
    actor_cmd = [sys.executable, str(REINFORCE_SCRIPT), *actor_args]
    with background(server_cmd(port, f"reward.function={RULE}"), tmp_path / "server.log") as server:
        wait_for_port(port, server)
        with background(actor_cmd, tmp_path / "actor.log") as actor:
            deadline = time.monotonic() + 120
            while not list((log_dir / "checkpoints").glob("step=0000002*")) and time.monotonic() < deadline:
                assert actor.poll() is None, (tmp_path / "actor.log").read_text()[-3000:]
                time.sleep(0.2)
            from helpers import stop_group

            stop_group(server, grace=0)  # SIGKILL: the server dies without a goodbye
            killed_at = time.monotonic()
            actor.wait(timeout=60)
            waited = time.monotonic() - killed_at
    out = (tmp_path / "actor.log").read_text()
    assert actor.returncode == 1, out[-3000:]
    errors = error_lines(out)
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "reward_model" in errors[0], out[-2000:]
    assert waited < 10 + 5  # within remote_rm.inference_timeout_s (a refused connection fails at once)

    # The last checkpoint is intact and the run resumes from it with the server back.
    from megatron.core.dist_checkpointing import load_plain_tensors

    from nemo_aligner.checkpoint.distributed import CheckpointManager, read_trainer_state

    latest = CheckpointManager(log_dir / "checkpoints").latest()
    step = read_trainer_state(latest)["step"]
    assert step >= 2 and load_plain_tensors(str(latest))
    port2 = free_port()
    resume_args = [a for a in actor_args if "max_steps" not in a and "port" not in a]
    with background(server_cmd(port2, f"reward.function={RULE}"), tmp_path / "server2.log") as server:
        wait_for_port(port2, server)
        proc = run(REINFORCE_SCRIPT, [*resume_args, f"trainer.reinforce.max_steps={step + 1}",
                                      f"remote_rm.reward_model.port={port2}"])
    assert f"resumed from {latest}" in proc.stdout
    assert read_metrics(log_dir)[-1]["step"] == step + 1


def test_wrong_port_names_host_and_port(tiny_policy, tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = run(REINFORCE_SCRIPT, rl_args("reinforce", tiny_policy, tmp_path / "logs", *ONE_STEP,
                                         *remote(port), "remote_rm.init_timeout_s=2"), check=False)
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "'reward_model'" in errors[0], proc.stderr[-2000:]
    assert "init_timeout_s" in errors[0]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "logs").exists()
