"""The test fork server runs a script as ``python script`` would (see tests/forkserver.py)."""

import subprocess

import pytest

from helpers import ROOT, run

pytestmark = pytest.mark.slow  # starts the fork server (its imports) if no test has yet

SCRIPT = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "name": __name__, "cwd": os.getcwd(),
                  "stdin": sys.stdin.read(), "omp": os.environ.get("OMP_NUM_THREADS")}))
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


def test_child_sees_what_python_script_sees(script):
    import json

    proc = run(script, ["3", "x=1"], check=False)
    assert proc.returncode == 3 and proc.stderr.strip() == "to stderr"
    seen = json.loads(proc.stdout)
    assert seen == {"argv": [str(script), "3", "x=1"], "path0": str(script.parent), "name": "__main__",
                    "cwd": str(ROOT), "stdin": "", "omp": "1"}
    assert run(script, ["0"]).returncode == 0


def test_exceptions_and_timeouts_end_the_child_not_the_server(script):
    proc = run(script, ["raise"], check=False)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("RuntimeError: boom")
    with pytest.raises(subprocess.TimeoutExpired):
        run(script, ["sleep"], timeout=2)
    assert run(script, ["5"], check=False).returncode == 5  # the server goes on
