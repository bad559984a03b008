"""Run a job made of servers and one foreground trainer on one machine (``launch_ppo.py``).

The servers start first, each in a session of its own with its output in a log file; the
trainer starts once every server listens on its port, in the launcher's process group, so a
Ctrl-C in the terminal reaches it (and it saves and stops as it does alone) while the servers
keep answering its last calls. When the trainer exits, on success, failure or a signal, every
server is stopped with its whole process tree (SIGTERM, then SIGKILL), so no process stays
behind and no port stays bound. A server that exits before it is ready ends the job with one
line and the last lines of its log.
"""

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nemo_aligner.utils.ports import free_port
from nemo_aligner.utils.processes import stop_process_tree

LOG_TAIL_LINES = 15


@dataclass
class Server:
    name: str
    cmd: list
    host: str
    port: int
    log: Path
    proc: subprocess.Popen | None = None


def python_cmd(script, nproc: int, args: list) -> list:
    """``python script args`` or its torchrun form for ``nproc`` > 1 processes."""
    if nproc <= 1:
        return [sys.executable, str(script), *args]
    master = free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={master}",
            str(script), *args]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LaunchError(RuntimeError):
    pass


def start(server: Server, env=None) -> None:
    server.log.parent.mkdir(parents=True, exist_ok=True)
    with open(server.log, "w") as log:
        server.proc = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env=env)


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.proc.poll()
        if code is not None:
            raise LaunchError(f"the {server.name} exited with code {code} before listening on "
                              f"{server.host}:{server.port}; the end of {server.log}:\n{tail(server.log)}")
        if _listening(server.host, server.port):
            return
        time.sleep(0.25)
    raise LaunchError(f"the {server.name} did not listen on {server.host}:{server.port} within {timeout_s:g} s; "
                      f"see {server.log}")


def run_job(servers: list[Server], trainer_cmd: list, ready_timeout_s: float = 600.0, env=None) -> int:
    """Start ``servers``, run ``trainer_cmd`` once they listen, stop everything; the trainer's
    exit code (1 when a server failed to start, 128 + signal when stopped by one)."""
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        if trainer is not None and trainer.poll() is None and signum == signal.SIGTERM:
            trainer.send_signal(signal.SIGTERM)  # Ctrl-C reaches the trainer through the terminal itself

    trainer = None
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for server in servers:
            start(server, env)
            print(f"[launch] {server.name}: {server.host}:{server.port}, log {server.log}", flush=True)
        for server in servers:
            wait_ready(server, ready_timeout_s)
            if received:
                return 128 + received[0]
        print(f"[launch] trainer: {' '.join(map(str, trainer_cmd))}", flush=True)
        trainer = subprocess.Popen(trainer_cmd, env=env)
        while True:
            try:
                code = trainer.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover -- the handler above takes SIGINT
                continue
        return code
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.terminate()
            try:
                trainer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                trainer.kill()
        for server in reversed(servers):
            if server.proc is not None:
                stop_process_tree(server.proc, grace=15.0)
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("[launch] stopped " + ", ".join(s.name for s in servers), flush=True)
