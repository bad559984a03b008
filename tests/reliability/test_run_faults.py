"""Runs that fail loudly and stop cleanly (real runs of the entry points).

Each case asserts the exit status, the one line (naming the key or file) and what is on disk.
"""

import json
import signal
import sys
import time

import pytest

from helpers import DPO_SCRIPT, SFT_SCRIPT, background, free_port, read_metrics
from reliability.common import TINY, checkpoints, one_error_line, read_rows, sft

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------- divergence
def test_divergence_stops_with_one_line_and_only_finite_checkpoints(tmp_path, dist_world_of_one):
    log_dir = tmp_path / "logs"
    proc = sft(log_dir, "model.optim.lr=1e10", "model.optim.sched.warmup_steps=0", "trainer.sft.max_steps=20",
               "trainer.sft.save_interval=1", "exp_manager.checkpoint_callback_params.save_top_k=-1", check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "training diverged" in line and "trainer.sft.max_nonfinite_steps" in line
    assert "the update was skipped" in proc.stdout
    rows = read_metrics(log_dir)
    skipped = [r for r in rows if r["train/grad_norm"] != r["train/grad_norm"] or r["train/grad_norm"] == "nan"]
    assert skipped  # logged, not applied
    assert not (log_dir / "final_model").exists()
    from megatron.core.dist_checkpointing import load_plain_tensors

    import torch

    names = checkpoints(log_dir)
    assert names
    for name in names:
        for key, value in load_plain_tensors(str(log_dir / "checkpoints" / name)).items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), (name, key)


# ----------------------------------------------------------------- start over / logs
def test_starting_over_in_a_used_log_dir_is_refused_then_moved_aside(tmp_path):
    log_dir = tmp_path / "logs"
    sft(log_dir, "trainer.sft.max_steps=2")
    before = checkpoints(log_dir)
    proc = sft(log_dir, "trainer.sft.max_steps=2", "exp_manager.resume_if_exists=false", check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert str(log_dir) in line and "exp_manager.overwrite=true" in line
    assert checkpoints(log_dir) == before
    sft(log_dir, "trainer.sft.max_steps=3", "exp_manager.resume_if_exists=false", "exp_manager.overwrite=true")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("logs.old-")]
    assert len(aside) == 1 and checkpoints(aside[0]) == before  # the old run, whole
    assert [r["step"] for r in read_metrics(log_dir)] == [1, 2, 3]  # the new run alone


def test_explicit_log_dir_that_is_a_file(tmp_path):
    f = tmp_path / "logs"
    f.write_text("not a directory")
    proc = sft(f, "trainer.sft.max_steps=1", check=False)
    assert proc.returncode == 1 and "is a file" in one_error_line(proc) and f.read_text() == "not a directory"


def test_resume_keeps_one_metrics_row_per_step_and_applies_a_new_lr(tmp_path):
    log_dir = tmp_path / "logs"
    common = ["model.optim.sched.name=Constant", "model.optim.sched.warmup_steps=0", "trainer.sft.save_interval=2"]
    sft(log_dir, *common, "trainer.sft.max_steps=3", "model.optim.lr=1e-3")
    # A row for step 3 exists but the checkpoint is at step 2 (as after a kill): step 3 is redone.
    import shutil

    shutil.rmtree(log_dir / "checkpoints/step=0000003")
    proc = sft(log_dir, *common, "trainer.sft.max_steps=5", "model.optim.lr=2e-3")
    assert "model.optim differs from the checkpoint's" in proc.stdout
    rows = read_metrics(log_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["train/lr"] for r in rows] == [1e-3, 1e-3, 2e-3, 2e-3, 2e-3]


# -------------------------------------------------------------------- one-line config
@pytest.mark.parametrize("override,needle", [
    ("model.micro_batch_size=abc", "model.micro_batch_size='abc'; it must be a whole number"),
    ("model.micro_batch_size=0", "model.micro_batch_size=0; it must be at least 1"),
    ("model.global_batch_size=2.5", "model.global_batch_size=2.5; it must be a whole number"),
    ("trainer.sft.max_time_per_run=abc", "trainer.sft.max_time_per_run='abc'; use seconds or DD:HH:MM:SS"),
    ("trainer.sft.val_check_interval=x", "trainer.sft.val_check_interval='x'"),
    ("trainer.sft.max_steps=ten", "trainer.sft.max_steps='ten'"),
    ("model.num_query_groups=3", "model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
    ("model.hidden_size=66", "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
    ("model.num_layers=two", "model.num_layers='two'"),
], ids=["mbs-text", "mbs-zero", "gbs-float", "max-time", "val-interval", "max-steps", "groups", "hidden", "layers"])
def test_bad_config_value_is_one_line(tmp_path, override, needle):
    proc = sft(tmp_path / "logs", "trainer.sft.max_steps=1", override, check=False)
    assert proc.returncode == 1
    assert needle in one_error_line(proc)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content,name,needle", [
    ('{"not": "a tokenizer"}', "tok.json", "is not a Hugging Face tokenizer file"),
    ("garbage", "tok.model", "is not a SentencePiece model"),
], ids=["json", "sentencepiece"])
def test_unreadable_tokenizer_file(tmp_path, content, name, needle):
    f = tmp_path / name
    f.write_text(content)
    proc = sft(tmp_path / "logs", "trainer.sft.max_steps=1", f"model.tokenizer.model={f}", check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert str(f) in line and needle in line
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------ silent-data fixes
def test_sft_reports_truncated_samples(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"input": "q", "output": "word " * 100}] + [{"input": "q", "output": "a"}] * 9
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = sft(tmp_path / "logs", "trainer.sft.max_steps=1", f"model.data.data_prefix.train={data}",
               "model.data.data_prefix.validation=null", "model.data.truncation=truncate")
    assert "train: 10 samples" in proc.stdout and "truncated 1, dropped 0" in proc.stdout


def test_dpo_warns_about_pairs_without_a_preference(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p\n\n", "chosen_response": "same", "rejected_response": "same"}] * 3
    rows += [{"prompt": "p\n\n", "chosen_response": "good", "rejected_response": "bad"}] * 5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from helpers import run

    model = [a for a in TINY if a.startswith("model.")]
    proc = run(DPO_SCRIPT, [*model, f"exp_manager.explicit_log_dir={tmp_path / 'logs'}", "trainer.dpo.max_steps=1",
                            "trainer.dpo.val_check_interval=0", "trainer.dpo.save_interval=0",
                            f"model.data.data_prefix.train={data}", "model.data.data_prefix.validation=null"])
    assert "3 of 8 pairs" in proc.stdout and "same chosen and rejected response" in proc.stdout


def test_a_checkpoint_name_with_equals_signs_restores_when_quoted(tmp_path):
    log_dir = tmp_path / "logs"
    sft(log_dir, "trainer.sft.max_steps=2", "trainer.sft.save_interval=2")
    ckpt = log_dir / "checkpoints" / checkpoints(log_dir)[0]
    assert "=" in ckpt.name
    proc = sft(tmp_path / "next", "trainer.sft.max_steps=1", f'pretrained_checkpoint.restore_from_path="{ckpt}"')
    assert proc.returncode == 0


# ---------------------------------------------------------------------------- signals
def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the condition"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("nproc", [1, 2], ids=["single", "torchrun-dp2"])
def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path, nproc):
    log_dir = tmp_path / "logs"
    args = [*TINY, f"exp_manager.explicit_log_dir={log_dir}", "trainer.sft.max_steps=100000"]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                  f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    with background([*launch, str(SFT_SCRIPT), *args], tmp_path / "run.log") as proc:
        _wait_for(lambda: (log_dir / "metrics.jsonl").exists() and len(read_rows(log_dir / "metrics.jsonl")) >= 3, proc)
        if nproc == 1:
            proc.send_signal(signal.SIGTERM)
        else:  # as Slurm does: every rank gets the signal (at slightly different times)
            import os

            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    out = (tmp_path / "run.log").read_text()
    # One process exits 128 + SIGTERM; torchrun reports its workers' exit as a failure.
    assert proc.returncode == 143 if nproc == 1 else proc.returncode != 0, out[-2000:]
    import re

    stopped = set(re.findall(r"stopped by SIGTERM after step (\d+)", out))
    assert len(stopped) == 1, out[-3000:]  # every rank stopped after the same step
    step = read_metrics(log_dir)[-1]["step"]
    assert stopped == {str(step)}
    assert checkpoints(log_dir) == [f"step={step:07d}"]  # saved at the step it stopped after
    from nemo_aligner.checkpoint.verify import verify_checkpoint

    verify_checkpoint(log_dir / f"checkpoints/step={step:07d}")


def test_divergence_at_tp2_stops_every_rank(tmp_path):
    from helpers import run

    log_dir = tmp_path / "logs"
    proc = run(SFT_SCRIPT, [*TINY, f"exp_manager.explicit_log_dir={log_dir}", "model.tensor_model_parallel_size=2",
                            "model.optim.lr=1e10", "model.optim.sched.warmup_steps=0", "trainer.sft.max_steps=20"],
               nproc=2, check=False)
    assert proc.returncode != 0
    lines = {l.split("error:", 1)[1] for l in proc.stderr.splitlines() if "error:" in l}
    assert len(lines) == 1 and "training diverged" in lines.pop()  # the same line from both ranks
    assert not (log_dir / "final_model").exists()
