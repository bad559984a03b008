"""keep_freed_memory: glibc accepts the settings, and freed memory is then reused rather
than faulted in again."""

import ctypes.util
import subprocess
import sys

import pytest
import torch

# Run in a fresh interpreter: page faults are counted per process, and after hundreds of
# tests in the pytest process other threads and a fragmented heap add thousands of them.
_COUNT_FAULTS = """
import resource
import torch
from nemo_aligner.utils.host_memory import keep_freed_memory

def training_like_step():
    # activation-sized buffers (2-11 MiB) allocated, touched and freed, as a step does
    buffers = [torch.empty(n << 20, dtype=torch.uint8).fill_(1) for n in (3, 11, 2, 6, 11, 4)]
    del buffers

assert keep_freed_memory()
training_like_step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    training_like_step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_with_the_settings() -> int:
    run = subprocess.run([sys.executable, "-c", _COUNT_FAULTS], capture_output=True, text=True, check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    # Measured in fresh processes: glibc's defaults fault in 10,000-62,000 pages (4 KiB)
    # over the 10 steps (how much of each step's 37 MiB depends on its adaptive mmap
    # threshold); with the settings 0-1,024. One step is ~9,500 pages.
    assert faults_with_the_settings() < 3000


class _Applied(Exception):
    pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="the settings are for CPU runs")
def test_training_and_generation_entry_points_apply_the_settings_first(monkeypatch):
    from omegaconf import OmegaConf

    from nemo_aligner.generation.jsonl_generate import generate_jsonl
    from nemo_aligner.utils import setup

    def applied():
        raise _Applied

    monkeypatch.setattr(setup, "keep_freed_memory", applied)
    cfg = OmegaConf.create({"input_file": "in.jsonl", "output_file": "out.jsonl", "model": {"num_layers": 2}})
    with pytest.raises(_Applied):
        setup.init_distributed(cfg)  # the trainers' setup
    with pytest.raises(_Applied):
        generate_jsonl(cfg)  # before the model and its activations are allocated
