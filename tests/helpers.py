"""Helpers for tests: run the real entry points in their own processes (torchrun, or a child
of the fork server that runs the script as ``python`` would); a character-level tokenizer
for data tests."""

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from nemo_aligner.data.tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SFT_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_sft.py"
DPO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_dpo.py"
KTO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_kto.py"
GRPO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_grpo.py"
REINFORCE_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_reinforce_actor.py"
RM_SCRIPT = ROOT / "examples/nlp/gpt/train_reward_model.py"
SERVE_RM_SCRIPT = ROOT / "examples/nlp/gpt/serve_reward_model.py"
PPO_SCRIPT = ROOT / "examples/nlp/gpt/train_gpt_ppo_actor.py"
CRITIC_SCRIPT = ROOT / "examples/nlp/gpt/serve_ppo_critic.py"
LAUNCH_PPO_SCRIPT = ROOT / "examples/nlp/gpt/launch_ppo.py"

# A tiny Llama-style GPT (4 layers, so PP=2 splits it) on the bundled quickstart data.
TINY_SFT = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.encoder_seq_length=64",
    "model.micro_batch_size=2", "model.global_batch_size=8",
    "trainer.sft.val_check_interval=0", "trainer.sft.save_interval=0",
    "exp_manager.checkpoint_callback_params.save_final_model=false",
]


# The tiny model, fine-tuned long enough (2 epochs) to count words about half the time: the
# starting policy of the online-RL tests (see the tiny_policy fixture).
TINY_POLICY_SFT = [
    *(a for a in TINY_SFT if not a.startswith(("model.micro_batch_size", "model.global_batch_size", "exp_manager."))),
    "model.micro_batch_size=16", "model.global_batch_size=32", "trainer.sft.max_epochs=2",
]


def rl_args(algo: str, policy, log_dir, *extra) -> list[str]:
    """Overrides for a short online-RL run (``algo``: grpo or reinforce) from ``policy``."""
    return [
        f"pretrained_checkpoint.restore_from_path={policy}", f"exp_manager.explicit_log_dir={log_dir}",
        f"trainer.{algo}.save_interval=0", "exp_manager.checkpoint_callback_params.save_final_model=false",
        *extra,
    ]


def _free_port() -> int:
    from nemo_aligner.utils.ports import free_port as pick

    return pick()


def _env(extra=None):
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class _ForkServer:
    """The client of ``forkserver.py``: single-process runs forked from one interpreter that
    has done their imports (see there). ``NEMO_TEST_FORKSERVER=0`` runs every script as its
    own ``python`` process instead."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py"))], cwd=ROOT, env=_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
        )
        self._pending = b""
        self._reply()  # ready
        atexit.register(self.proc.kill)

    def _reply(self, timeout=None) -> dict:
        """The server's next JSON line; TimeoutError after ``timeout`` seconds without one."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the test fork server exited")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd, timeout, env=None):
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"script": cmd[1], "args": cmd[2:], "stdout": str(out), "stderr": str(err),
                       "cwd": str(ROOT), "env": _env(env)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._reply()["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply()
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(cmd, returncode, out.read_text(), err.read_text())


_fork_server = None


def own_process(cmd, timeout=None, env=None):
    """``cmd`` as its own process from the repository root, output captured (``env``: extra
    environment variables)."""
    return subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=timeout)


def _single_process(cmd, timeout, env=None):
    global _fork_server
    if os.environ.get("NEMO_TEST_FORKSERVER", "1") == "0":
        return own_process(cmd, timeout, env)
    if _fork_server is None or _fork_server.proc.poll() is not None:
        _fork_server = _ForkServer()
    return _fork_server.run(cmd, timeout, env)


def run(script, args, nproc: int = 1, timeout: int = 600, check: bool = True, env=None):
    """Run ``script`` with ``args`` (torchrun when ``nproc > 1``, else as ``python script``
    through the fork server); returns CompletedProcess. ``env``: extra environment variables."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", str(script), *args]
        proc = own_process(cmd, timeout, env)
    else:
        cmd = [sys.executable, str(script), *args]
        proc = _single_process(cmd, timeout, env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    return _free_port()


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


@contextlib.contextmanager
def background(cmd, log_path, env=None):
    """``cmd`` in its own process group, output to ``log_path``; the whole group is stopped
    (SIGTERM, then SIGKILL) when the block ends, also when the test fails."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        stop_group(proc)


def stop_group(proc, grace: float = 15.0) -> None:
    """Stop ``proc``'s process group and every process it started (see
    :func:`nemo_aligner.utils.processes.stop_process_tree`)."""
    from nemo_aligner.utils.processes import stop_process_tree

    stop_process_tree(proc, grace)


def wait_for_port(port: int, proc, timeout: float = 90.0, host: str = "127.0.0.1") -> None:
    """Until ``host:port`` accepts connections; fails early when ``proc`` exits."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before listening on {host}:{port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on {host}:{port} within {timeout} s")
