"""Importing the package does not pay for TorchDynamo/Inductor (see nemo_aligner/__init__.py)."""

import subprocess
import sys

from helpers import ROOT


def _prints_ok(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_import_defers_torch_compile_and_restores_it():
    code = (
        "import sys, torch; real = torch.compile\n"
        "import nemo_aligner.algorithms.supervised, nemo_aligner.algorithms.dpo\n"
        "from megatron.core import jit\n"
        "assert 'torch._dynamo' not in sys.modules, 'TorchDynamo was imported at start-up'\n"
        "assert torch.compile is real, 'torch.compile was not restored'\n"
        "assert jit.jit_fuser is not real  # Megatron kept the deferred wrapper for its fusions\n"
        "print('ok')\n"
    )
    _prints_ok(code)


def test_import_runs_no_collection_and_freezes_what_it_made():
    """Importing the package does not spend start-up in the cyclic garbage collector, and
    leaves the collector as it found it (on, or off)."""
    code = (
        "import gc, sys\n"
        "enabled = sys.argv[1] == 'on'\n"
        "if not enabled: gc.disable()\n"
        "before = [s['collections'] for s in gc.get_stats()]\n"
        "import nemo_aligner\n"
        "after = [s['collections'] for s in gc.get_stats()]\n"
        "assert 'megatron.core' in sys.modules and 'torch' in sys.modules\n"
        "# none while torch and Megatron-Core import (unpaused: ~600, six of them full)\n"
        "assert after[1:] == before[1:] and after[0] - before[0] <= 2, (before, after)\n"
        "assert gc.isenabled() == enabled\n"
        "assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()\n"
        "assert len(gc.get_objects()) < 50_000, len(gc.get_objects())  # later collections skip the frozen\n"
        "print('ok')\n"
    )
    for state in ("on", "off"):
        _prints_ok(code, state)


def test_jinja_is_imported_only_for_a_chat_template():
    """Jinja (~16 ms of start-up) loads when a chat template is compiled, not with the package."""
    code = (
        "import sys\n"
        "import nemo_aligner.algorithms.supervised, nemo_aligner.algorithms.dpo\n"
        "assert 'jinja2' not in sys.modules, 'Jinja was imported at start-up'\n"
        "from nemo_aligner.data.chat_template import ChatTemplate\n"
        "t = ChatTemplate(\"{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}\")\n"
        "assert 'jinja2' in sys.modules and t.render([{'role': 'user', 'content': 'hi'}]) == '[hi]'\n"
        "print('ok')\n"
    )
    _prints_ok(code)
