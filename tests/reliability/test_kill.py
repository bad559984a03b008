"""SIGKILL at random points of a run that saves every other step (mid-step, mid-save, in
between), each kill followed by a rerun of the same command: the run ends with the
uninterrupted run's final loss, and no process of a killed run survives its process group."""

import os
import random
import signal
import sys
import time

import pytest

from helpers import SFT_SCRIPT, own_process, read_metrics
from reliability.common import TINY

pytestmark = pytest.mark.slow
STEPS = 40
KILLS = 10


def command(log_dir):
    return [sys.executable, str(SFT_SCRIPT), *TINY, f"exp_manager.explicit_log_dir={log_dir}",
            f"trainer.sft.max_steps={STEPS}", "trainer.sft.save_interval=2", "model.optim.sched.max_steps=40"]


def live_members(pgid: int) -> list[str]:
    """Processes of group ``pgid`` that still run (zombies are dead: only their exit status is left
    for whoever reaps them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(f"{entry} {stat[:stat.rindex(')') + 1]}")
    return found


def test_runs_killed_at_random_points_end_like_the_uninterrupted_run(tmp_path):
    import subprocess

    from helpers import ROOT, _env

    # The uninterrupted run, timed from its first metrics row to its exit: the kills' random
    # delays scale with it (a fixed window let a faster build finish the run after four kills).
    straight = tmp_path / "straight"
    proc = subprocess.Popen(command(straight), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and not (straight / "metrics.jsonl").exists():
            time.sleep(0.02)
        first_row = time.monotonic()
        assert proc.wait(timeout=300) == 0
        training = time.monotonic() - first_row
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    expected = read_metrics(straight)[-1]
    window = max(2 * training / KILLS, 0.05)  # KILLS delays of window / 2 on average: the whole run

    log_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < KILLS:
        proc = subprocess.Popen(command(log_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        metrics = log_dir / "metrics.jsonl"
        started = metrics.read_text().count("\n") if metrics.exists() else 0
        deadline = time.monotonic() + 120
        # Once training is under way (a new metrics row), kill after a random delay.
        while proc.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") <= started):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, window))
        if proc.poll() is not None:  # it finished before the kill: the run is complete
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.2)
        assert not live_members(proc.pid)
        kills += 1
    assert kills >= KILLS // 2  # most kills landed in the middle of the run
    assert own_process(command(log_dir)).returncode == 0
    rows = read_metrics(log_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one row per step, redone steps once
    assert rows[-1]["train/loss"] == expected["train/loss"]
    assert rows[-1]["consumed_samples"] == expected["consumed_samples"]
    assert not list((log_dir / "checkpoints").glob("*.tmp-*"))
