"""Helpers for tests: run the real entry points as subprocesses (python or torchrun); a
character-level tokenizer for data tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from nemo_aligner.data.tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SFT_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_sft.py"

# A tiny Llama-style GPT (4 layers, so PP=2 splits it) on the bundled quickstart data.
TINY_SFT = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.encoder_seq_length=64",
    "model.micro_batch_size=2", "model.global_batch_size=8",
    "trainer.sft.val_check_interval=0", "trainer.sft.save_interval=0",
    "exp_manager.checkpoint_callback_params.save_final_model=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(script, args, nproc: int = 1, timeout: int = 600, check: bool = True):
    """Run ``script`` with ``args`` (torchrun when ``nproc > 1``); returns CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(log_dir) -> list[dict]:
    with open(Path(log_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


class CharTokenizer(Tokenizer):
    """One id per character (``ord(c) + 3``); pad=0, bos=1, eos=2."""

    bos_id, eos_id, _pad_id = 1, 2, 0

    def text_to_ids(self, text):
        return [ord(c) + 3 for c in text]

    def _decode(self, ids):
        return "".join(chr(i - 3) for i in ids)

    @property
    def vocab_size(self):
        return 256 + 3
