"""What the reliability tests share: a tiny SFT run, its checkpoints, one-line errors."""

import json
from pathlib import Path

from helpers import SFT_SCRIPT, run

# Two layers keep every run a few seconds.
TINY = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.encoder_seq_length=64", "model.micro_batch_size=2", "model.global_batch_size=8",
    "trainer.sft.val_check_interval=0", "trainer.sft.save_interval=0",
]


def sft(log_dir, *overrides, check=True, env=None, script=SFT_SCRIPT):
    return run(script, [*TINY, f"exp_manager.explicit_log_dir={log_dir}", *overrides], check=check, env=env)


def one_error_line(proc) -> str:
    """The run's single ``error:`` line (asserts there is exactly one and no traceback)."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def checkpoints(log_dir) -> list[str]:
    d = Path(log_dir) / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
