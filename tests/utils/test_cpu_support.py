"""The CPU support layer answers Megatron's CUDA requests on CPU, and only inside its scope."""

import pytest
import torch

from nemo_aligner.utils import cpu_support

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_cuda_requests_become_cpu_inside_scope_only():
    with cpu_support.cuda_on_cpu():
        z = torch.zeros(3, device="cuda")
        e = torch.empty(2, 2, device=torch.device("cuda", 0))
        t = torch.ones(2).cuda()
        moved = torch.ones(2).to("cuda")
        assert z.device.type == e.device.type == t.device.type == moved.device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_install_answers_current_device_and_synchronize():
    cpu_support.install()
    assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.synchronize() is None
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
