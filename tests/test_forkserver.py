"""The test fork server runs a script as ``python script`` would (see tests/forkserver.py):
the same output, exit status and package state as a fresh interpreter."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT, own_process, run

pytestmark = pytest.mark.slow  # starts the fork server (its imports) if no test has yet

SCRIPT = """
import json, os, sys, warnings
import nemo_aligner
import torch
from megatron.core import jit
print(json.dumps({
    "argv": sys.argv, "path0": sys.path[0], "name": __name__, "cwd": os.getcwd(), "stdin": sys.stdin.read(),
    "omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(),
    "compile_deferred": jit.jit_fuser is not torch.compile,
    "filters": sorted(f[1].pattern for f in warnings.filters if f[1] is not None),
}))
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "raise":
    raise RuntimeError("boom")
if mode == "sleep":
    import time
    time.sleep(60)
sys.exit(int(mode))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def fresh_python(script, args):
    return own_process([sys.executable, str(script), *args])


def test_child_sees_what_a_fresh_python_sees(script):
    forked, fresh = run(script, ["3", "x=1"], check=False), fresh_python(script, ["3", "x=1"])
    assert forked.returncode == fresh.returncode == 3
    assert forked.stderr == fresh.stderr == "to stderr\n"
    seen = json.loads(forked.stdout)
    assert seen == json.loads(fresh.stdout)
    assert seen["argv"] == [str(script), "3", "x=1"] and seen["path0"] == str(script.parent)
    assert seen["name"] == "__main__" and seen["cwd"] == str(ROOT) and seen["stdin"] == ""
    assert seen["compile_deferred"] and seen["threads"] == 1
    assert run(script, ["0"]).returncode == 0


def test_exceptions_and_timeouts_end_the_child_not_the_server(script):
    proc = run(script, ["raise"], check=False)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("RuntimeError: boom")
    with pytest.raises(subprocess.TimeoutExpired):
        run(script, ["sleep"], timeout=2)
    assert run(script, ["5"], check=False).returncode == 5  # the server goes on
