"""Importing the package does not pay for TorchDynamo/Inductor (see nemo_aligner/__init__.py)."""

import subprocess
import sys

from helpers import ROOT


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
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
