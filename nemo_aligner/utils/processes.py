"""Stopping the processes a launcher (or a test) started, with everything they started.

torchrun starts its workers in sessions of their own and Triton starts backend stubs under
them, so a process group alone misses some: the tree is also found through parents.
"""

import os
import signal
import subprocess

import psutil


def _tree(pid: int) -> list:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_process_tree(proc: subprocess.Popen, grace: float = 15.0, first_signal=signal.SIGTERM) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``), its process group and every
    descendant: ``first_signal``, up to ``grace`` seconds, then SIGKILL for whatever is left."""
    members = _tree(proc.pid)
    for sig, wait in ((first_signal, grace), (signal.SIGKILL, 5.0)):
        members = list({p.pid: p for p in members + _tree(proc.pid)}.values())
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        break
    for p in members + _tree(proc.pid):  # stragglers of the group and of the tree
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(members, timeout=5)
