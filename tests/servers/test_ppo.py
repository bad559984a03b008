"""PPO end to end, with real critic (and reward) PyTriton servers on loopback started by the
tests and stopped with their whole process trees, also when a test fails.

- launch_ppo.py from the tiny SFT model, the critic initialised from a reward model trained on
  the bundled counting preference pairs (combined critic + reward server): that reward model's
  held-out reward rises; through a reward server serving the exact-answer rule (critic from the
  causal LM, value head at zero) the held-out exact-answer rate rises;
- the critic server at TP2 returns the values, rewards and training losses of TP1;
- the actor's first step at TP2, PP2 and DP2 equals TP1 against the same (frozen) critic, and
  turning the overlap off changes nothing;
- faults: the critic killed mid-run (one line naming host:port, the checkpoint intact, the
  restarted pair resumes) and a wrong port (one line naming host:port within init_timeout_s).
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    CRITIC_SCRIPT, LAUNCH_PPO_SCRIPT, PPO_SCRIPT, RM_SCRIPT, TINY_SFT, _env, background, free_port, read_metrics,
    run, stop_group, wait_for_port,
)

pytestmark = pytest.mark.slow
RULE = "nemo_aligner.rewards.quickstart:exact_match"
PAIRS = ["model.data.data_prefix.train=data/quickstart/count_preference_train.jsonl",
         "model.data.data_prefix.validation=data/quickstart/count_preference_val.jsonl"]
FRESH = ["exp_manager.resume_if_exists=false", "exp_manager.overwrite=true"]


@pytest.fixture(scope="module")
def count_rm(tiny_policy, tmp_path_factory):
    """A reward model from the tiny policy on the counting pairs (right count chosen): 2 epochs."""
    log_dir = tmp_path_factory.mktemp("count_rm")
    arch = [a for a in TINY_SFT if a.startswith("model.") and "batch_size" not in a]
    run(RM_SCRIPT, [*arch, f"pretrained_checkpoint.restore_from_path={tiny_policy}", "model.tokenizer.model=null",
                    f"exp_manager.explicit_log_dir={log_dir}", "trainer.rm.max_epochs=2", *PAIRS,
                    "model.optim.lr=5e-4", "model.optim.sched.min_lr=5e-5", "trainer.rm.val_check_interval=0"])
    return log_dir / "final_model"


def critic_cmd(port, rm, log_dir, *extra, nproc=1):
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    return [*launch, str(CRITIC_SCRIPT), f"trainer.ppo.port={port}", "trainer.ppo.exit_timeout_s=1",
            f"pretrained_checkpoint.restore_from_path={rm}", f"exp_manager.explicit_log_dir={log_dir}",
            "model.global_batch_size=16", "model.micro_batch_size=8", *extra]


def actor_args(policy, log_dir, port, *extra):
    return [f"pretrained_checkpoint.restore_from_path={policy}", f"exp_manager.explicit_log_dir={log_dir}",
            f"remote_critic_rm.critic.ip=127.0.0.1", f"remote_critic_rm.critic.port={port}",
            "remote_critic_rm.init_timeout_s=60", "remote_critic_rm.inference_timeout_s=30",
            "model.ppo.num_rollout_samples=32", "model.global_batch_size=16", "model.micro_batch_size=16",
            "model.ppo.rollout_micro_batch_size=16", "model.ppo.forward_micro_batch_size=16",
            "trainer.ppo.save_interval=0", "exp_manager.checkpoint_callback_params.save_final_model=false", *extra]


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def launch(log_dir, *args, timeout=900):
    """launch_ppo.py in its own session; its tree is stopped whatever happens. Its output goes to
    ``<log_dir>/launch.out`` (appended), so a run that hangs still shows where it was."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / "launch.out"
    start = out_path.stat().st_size if out_path.exists() else 0
    with open(out_path, "a") as out:
        proc = subprocess.Popen([sys.executable, str(LAUNCH_PPO_SCRIPT), "--log-dir", str(log_dir), *args],
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (out_path, log_dir / "critic.log", log_dir / "rm.log")
                if p.exists()}
        raise AssertionError(f"launch_ppo.py ran past {timeout} s; the ends of its logs:\n" +
                             "\n".join(f"--- {name}\n{text}" for name, text in logs.items())) from None
    finally:
        stop_group(proc, grace=5)
    return proc.returncode, out_path.read_text(errors="replace")[start:]


def assert_released(port):
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def val_rewards(log_dir):
    return [(m["step"], m["val_rollouts/rewards"]) for m in read_metrics(log_dir) if "val_rollouts/rewards" in m]


# PPO at this size is noisy from one seed to the next: the reward tests average three runs
# (the configs' seed 1234, then 1 and 2). Measured per seed (train: first vs last quarter of the
# run; held-out: greedy, 64 prompts) with the fixtures of one build:
# - reward model, 32 steps at lr 3e-4: train -0.11, +0.44, +0.61; held-out -0.14, +0.71, -0.13
#   (seeds 3 and 4: train +0.29, +0.58; held-out +0.82, +0.67);
# - rule reward, 24 steps at lr 5e-4: train +0.07, +0.01, +0.15; held-out +0.25, -0.05, +0.06
#   (seeds 3 and 4: train +0.04, +0.09; held-out +0.06, +0.06).
# A build whose rounding differed (fixtures trained with other micro-batch widths) had passed a
# single-seed test that this one failed: single runs cannot carry the claim.
SEEDS = (1234, 1, 2)


def reward_rises(log_dirs, quarter):
    """Mean over runs of the train reward's rise (first vs last ``quarter`` steps) and of the
    held-out reward's rise (step 0 vs the end)."""
    train_rises, val_rises = [], []
    for log_dir in log_dirs:
        train = [m["train_rollouts/rewards"] for m in read_metrics(log_dir) if "train_rollouts/rewards" in m]
        train_rises.append(np.mean(train[-quarter:]) - np.mean(train[:quarter]))
        (_, before), (_, after) = val_rewards(log_dir)
        val_rises.append(after - before)
    return float(np.mean(train_rises)), float(np.mean(val_rises)), (train_rises, val_rises)


def test_ppo_raises_the_reward_models_held_out_reward(tiny_policy, count_rm, tmp_path):
    runs = []
    for seed in SEEDS:
        port = free_port()
        code, out = launch(tmp_path / str(seed), f"critic.pretrained_checkpoint.restore_from_path={count_rm}",
                           f"critic.trainer.ppo.port={port}", "critic.model.global_batch_size=32",
                           f"actor.pretrained_checkpoint.restore_from_path={tiny_policy}", "actor.trainer.ppo.max_steps=32",
                           "actor.trainer.ppo.max_epochs=2", "actor.trainer.ppo.val_check_interval=32",
                           "actor.model.ppo.num_val_samples=64", "actor.model.optim.lr=3e-4",
                           "actor.model.optim.sched.min_lr=3e-4", f"actor.seed={seed}")
        assert code == 0, out[-4000:]
        assert "[launch] stopped critic server" in out
        assert_released(port)
        runs.append(tmp_path / str(seed) / "actor")
    train_rise, val_rise, each = reward_rises(runs, quarter=4)
    assert train_rise > 0.1 and val_rise > 0.0, each  # measured +0.31 and +0.15 (see SEEDS)
    first = tmp_path / str(SEEDS[0])
    assert [s for s, _ in val_rewards(first / "actor")] == [0, 32]
    last = read_metrics(first / "actor")[-1]
    for key in ("train_optim/loss", "train_optim/ppo_ratio", "train_optim/ppo_ratio_clamped", "train_rollouts/rewards",
                "train_rollouts/init_policy_kl", "train_rollouts/advantages_mean", "critic/loss", "timers/generate",
                "timers/logprobs", "timers/init_logprobs", "timers/critic_wait", "timers/train"):
        assert key in last, key
    assert 1.0 <= last["train_rollouts/token_mult_prob_error"] <= 1.01
    # The critic saved with the actor (at the end): 32 steps x 64 samples / 32 per critic step.
    from nemo_aligner.checkpoint.distributed import CheckpointManager, read_trainer_state

    critic_ckpt = CheckpointManager(first / "critic" / "checkpoints").latest()
    state = read_trainer_state(critic_ckpt)
    assert (critic_ckpt.name, state["actor_step"], state["optimizer_step"]) == ("step=0000032", 32, 64)


def test_ppo_through_a_rule_reward_server_rises(tiny_policy, tmp_path):
    runs = []
    for seed in SEEDS:
        log_dir = tmp_path / str(seed)
        code, out = launch(log_dir, "--reward-server", f"rm.reward.function={RULE}",
                           f"critic.pretrained_checkpoint.restore_from_path={tiny_policy}",  # a causal LM: value head at 0
                           "critic.model.global_batch_size=32",
                           f"actor.pretrained_checkpoint.restore_from_path={tiny_policy}", "actor.trainer.ppo.max_steps=24",
                           "actor.trainer.ppo.max_epochs=2", "actor.trainer.ppo.val_check_interval=24",
                           "actor.model.ppo.num_val_samples=64", "actor.trainer.ppo.gae_lambda=1.0",
                           "actor.trainer.ppo.critic_warmup_steps=2", f"actor.seed={seed}",
                           # Half the config's lr: with two epochs over each rollout, 1e-3 overshot after ~15
                           # steps on an AVX-512 machine (train 0.45 at step 14, then 0.2; held-out 0.45 ->
                           # 0.30).
                           "actor.model.optim.lr=5e-4", "actor.model.optim.sched.min_lr=5e-4")
        assert code == 0, out[-4000:]
        assert "value head zeroed" in (log_dir / "critic.log").read_text()
        assert "critic warm-up rollout 1" in out
        runs.append(log_dir / "actor")
    from nemo_aligner.checkpoint.distributed import CheckpointManager, read_trainer_state

    # Warm-up: one extra rollout trains the critic alone first, so (24 + 1) x 64 / 32 critic steps.
    state = read_trainer_state(CheckpointManager(tmp_path / str(SEEDS[0]) / "critic" / "checkpoints").latest())
    assert (state["actor_step"], state["optimizer_step"]) == (24, 50)
    assert all(len([m for m in read_metrics(run) if "train_rollouts/rewards" in m]) == 24 for run in runs)
    # Sampled rewards are 0/1 per prompt: the first and last quarters of each run, and the greedy
    # held-out rate, averaged over the seeds.
    train_rise, val_rise, each = reward_rises(runs, quarter=6)
    assert train_rise > 0.03 and val_rise > 0.0, each  # measured +0.08 and +0.09 (see SEEDS)


def _critic_numbers(port, rm, log_dir, nproc, layout, log):
    from nemo_aligner.servers.client import CriticClient

    rng = np.random.default_rng(0)
    sequences = [rng.integers(3, 200, size=n).tolist() for n in (9, 14, 6, 11)]
    with background(critic_cmd(port, rm, log_dir, "model.global_batch_size=4", "model.micro_batch_size=2", *layout,
                               nproc=nproc), log) as server:
        wait_for_port(port, server)
        client = CriticClient("127.0.0.1", port, {}, init_timeout_s=60, inference_timeout_s=60)
        try:
            values, rewards = client.submit_values(sequences, pad_to_length=16).result()
            width = values.shape[1]
            tokens = np.zeros((8, width), dtype=np.int64)
            mask = np.zeros((8, width), dtype=np.float32)
            for i, seq in enumerate(sequences * 2):
                tokens[i, : len(seq)] = seq
                mask[i, 2 : len(seq) - 1] = 1
            returns = rng.normal(size=mask.shape).astype(np.float32)
            prev = np.concatenate([values, values])
            losses = [float(client.submit_train(tokens, returns, prev, mask).result()["loss_mean"][0]) for _ in range(2)]
            after, _ = client.submit_values(sequences).result()
        finally:
            client.close()
    return values, rewards, losses, after


def test_critic_server_tp2_matches_tp1(count_rm, tmp_path):
    tp1 = _critic_numbers(free_port(), count_rm, tmp_path / "tp1", 1, [], tmp_path / "tp1.log")
    tp2 = _critic_numbers(free_port(), count_rm, tmp_path / "tp2", 2, ["model.tensor_model_parallel_size=2"],
                          tmp_path / "tp2.log")
    values1, rewards1, losses1, after1 = tp1
    values2, rewards2, losses2, after2 = tp2
    assert np.abs(values1).max() > 0.01  # a trained reward model's values, not zeros
    np.testing.assert_allclose(values2, values1, atol=1e-5)
    np.testing.assert_allclose(rewards2, rewards1, atol=1e-5)
    assert losses2 == pytest.approx(losses1, rel=1e-4)
    assert losses1[1] < losses1[0]  # two optimizer steps on the same batch lower the loss
    np.testing.assert_allclose(after2, after1, atol=1e-4)


@pytest.fixture(scope="module")
def frozen_critic(count_rm, tmp_path_factory):
    """A critic server that never changes (trainer.ppo.max_steps=0), shared by the parity runs."""
    port = free_port()
    log_dir = tmp_path_factory.mktemp("frozen_critic")
    with background(critic_cmd(port, count_rm, log_dir / "critic", "trainer.ppo.max_steps=0"), log_dir / "critic.log") as server:
        wait_for_port(port, server)
        yield port


LAYOUTS = {"tp2": (2, ["model.tensor_model_parallel_size=2"]), "pp2": (2, ["model.pipeline_model_parallel_size=2"]),
           "dp2": (2, ["model.micro_batch_size=8"]),  # each rank generates and scores its own prompts
           "no_overlap": (1, ["trainer.ppo.overlap_critic=false"])}
ONE_STEP = ["trainer.ppo.max_steps=1", "trainer.ppo.val_check_interval=0"]
ENTROPY = ["model.ppo.entropy_bonus=0.01"]  # the vocab-parallel entropy in the loss, at every layout


@pytest.fixture(scope="module")
def tp1_step(tiny_policy, frozen_critic, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tp1")
    run(PPO_SCRIPT, actor_args(tiny_policy, log_dir, frozen_critic, *ONE_STEP, *ENTROPY))
    return read_metrics(log_dir)[-1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_actor_first_step_matches_tp1(layout, tiny_policy, frozen_critic, tp1_step, tmp_path):
    nproc, extra = LAYOUTS[layout]
    run(PPO_SCRIPT, actor_args(tiny_policy, tmp_path, frozen_critic, *ONE_STEP, *ENTROPY, *extra), nproc=nproc)
    got = read_metrics(tmp_path)[-1]
    assert tp1_step["train_optim/optim_step"] == 2  # 32 samples, 16 per optimizer step
    assert tp1_step["train_optim/scaled_entropy"] > 0
    for key in ("train_rollouts/rewards", "train_rollouts/generation_length"):
        assert got[key] == tp1_step[key], key  # the same samples
    for key in ("train_rollouts/values_mean", "train_rollouts/advantages_mean", "train_rollouts/returns_mean",
                "train_rollouts/init_policy_kl", "train_optim/loss", "train_optim/scaled_entropy"):
        assert got[key] == pytest.approx(tp1_step[key], abs=1e-5), key
    assert got["train_optim/grad_norm"] == pytest.approx(tp1_step["train_optim/grad_norm"], rel=1e-4, abs=1e-5)


def test_critic_killed_mid_run_then_the_pair_resumes(tiny_policy, count_rm, tmp_path):
    port = free_port()
    actor_dir, critic_dir = tmp_path / "actor", tmp_path / "critic"
    args = actor_args(tiny_policy, actor_dir, port, "trainer.ppo.max_steps=50", "trainer.ppo.val_check_interval=0",
                      "trainer.ppo.save_interval=2", "remote_critic_rm.inference_timeout_s=10")
    with background(critic_cmd(port, count_rm, critic_dir), tmp_path / "critic.log") as critic:
        wait_for_port(port, critic)
        with background([sys.executable, str(PPO_SCRIPT), *args], tmp_path / "actor.log") as actor:
            deadline = time.monotonic() + 180
            while not list((actor_dir / "checkpoints").glob("step=0000002*")) and time.monotonic() < deadline:
                assert actor.poll() is None, (tmp_path / "actor.log").read_text()[-3000:]
                time.sleep(0.2)
            stop_group(critic, grace=0)  # SIGKILL: the critic dies without a goodbye
            killed_at = time.monotonic()
            actor.wait(timeout=60)
            waited = time.monotonic() - killed_at
    out = (tmp_path / "actor.log").read_text()
    assert actor.returncode == 1, out[-3000:]
    errors = error_lines(out)
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "critic" in errors[0], out[-2000:]
    assert waited < 10 + 10

    from nemo_aligner.checkpoint.distributed import CheckpointManager, read_trainer_state
    from nemo_aligner.checkpoint.verify import verify_checkpoint

    latest = CheckpointManager(actor_dir / "checkpoints").latest()
    verify_checkpoint(latest)
    step = read_trainer_state(latest)["step"]
    critic_latest = CheckpointManager(critic_dir / "checkpoints").latest()
    state = read_trainer_state(critic_latest)  # saved with the actor's: 2 critic steps per actor step
    assert (state["actor_step"], state["optimizer_step"]) == (step, 2 * step)

    port2 = free_port()
    resume = [a for a in args if "max_steps" not in a and ".port=" not in a]
    with background(critic_cmd(port2, count_rm, critic_dir), tmp_path / "critic2.log") as critic:
        wait_for_port(port2, critic)
        proc = run(PPO_SCRIPT, [*resume, f"trainer.ppo.max_steps={step + 1}", f"remote_critic_rm.critic.port={port2}"])
    assert f"resumed from {latest}" in proc.stdout + proc.stderr
    assert f"resumed the critic from {critic_latest}" in (tmp_path / "critic2.log").read_text()
    assert read_metrics(actor_dir)[-1]["step"] == step + 1

    # A critic that did not resume with the actor (a fresh log directory) is refused in one line.
    port3 = free_port()
    with background(critic_cmd(port3, count_rm, tmp_path / "fresh_critic"), tmp_path / "critic3.log") as critic:
        wait_for_port(port3, critic)
        proc = run(PPO_SCRIPT, [*resume, f"trainer.ppo.max_steps={step + 2}", f"remote_critic_rm.critic.port={port3}"],
                   check=False)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(errors) == 1 and f"actor resumed from step {step + 1}" in errors[0], proc.stderr[-2000:]


def test_wrong_port_names_host_and_port(tiny_policy, tmp_path):
    port = free_port()  # nothing listens there
    proc = run(PPO_SCRIPT, actor_args(tiny_policy, tmp_path / "logs", port, *ONE_STEP, "remote_critic_rm.init_timeout_s=2"),
               check=False)
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "critic_" in errors[0], proc.stderr[-2000:]
    assert "init_timeout_s" in errors[0]
    assert not (tmp_path / "logs" / "checkpoints").exists()
