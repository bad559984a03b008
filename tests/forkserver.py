"""Runs single-process entry points for the tests, each in a child forked from one
interpreter that has already imported what they all import (torch, Megatron-Core, Hydra,
the package): a case then costs its own work, not ~5 s of imports (most of a bad-input
test's time).

A child behaves as ``python SCRIPT ARGS`` would: its own process, ``sys.argv`` and
``sys.path[0]`` as Python sets them, the script run as ``__main__``, stdin from /dev/null,
stdout and stderr into the files the request names, and the interpreter's normal exit
(exit status, atexit handlers, tracebacks). It is forked while this process has one thread
and has run no tensor operation, so no lock or thread pool is carried over.

Protocol (one request at a time): a JSON line ``{"script", "args", "stdout", "stderr",
"cwd", "env"}`` on stdin; replies ``{"pid": ...}`` when the child starts and ``{"returncode": ...}`` when it
ends (negative: killed by that signal, as ``subprocess`` reports it).
"""

import importlib
import json
import os
import runpy
import sys
import threading

# The package first, as the entry points import it: it imports Megatron-Core its own way
# (torch.compile deferred) and sets its warning filters, which the children then inherit.
PRELOAD = (
    "nemo_aligner", "hydra", "omegaconf", "nemo_aligner.algorithms.supervised", "nemo_aligner.algorithms.dpo",
    "nemo_aligner.algorithms.reward", "nemo_aligner.utils.setup", "nemo_aligner.generation.megatron_engine",
    "nemo_aligner.checkpoint.hf", "transformers",
)


def _child(request) -> None:
    """Become ``python script args``; never returns to the server loop (the script's exit,
    or the exception it raises, ends this process through the interpreter's usual path)."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()  # the caller's environment now (what torch read at import stays)
    os.environ.update(request["env"])
    script = os.path.abspath(request["script"])
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def serve() -> None:
    for name in PRELOAD:  # (this process's stderr goes nowhere: import notices are dropped)
        importlib.import_module(name)
    tasks = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1  # native threads too
    if threading.active_count() != 1 or tasks != 1:
        raise SystemExit("forkserver: the preloaded imports started threads; forking is unsafe")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
