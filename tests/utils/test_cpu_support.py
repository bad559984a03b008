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


@pytest.fixture
def gloo_calls(monkeypatch):
    """The collectives that reach gloo, by name."""
    from torch.distributed import ProcessGroup

    calls = []
    for name in ("allreduce", "allgather", "broadcast", "gather", "scatter", "reduce"):
        original = getattr(ProcessGroup, name)
        monkeypatch.setattr(ProcessGroup, name, lambda self, *a, _f=original, _n=name, **k: calls.append(_n) or _f(self, *a, **k))
    return calls


def _threads() -> set:
    import os

    return set(os.listdir("/proc/self/task"))


def test_one_rank_collectives_run_in_place_under_the_redirect(dist_world_of_one, gloo_calls):
    """Megatron's collectives over a group of one (checkpoint save and load, gradient norm)
    give what gloo gives, without gloo: its gathers copy on a worker thread, which then keeps
    an OpenMP pool that slows every later parallel op (see ``all_gather_objects``)."""
    import torch.distributed as dist

    group = dist.new_group([0], backend="gloo")  # fresh worker threads, no pools yet
    big = torch.randn(1 << 18)  # large enough for ATen to copy it on several threads
    (big * 2).sum()  # this thread's own OpenMP pool, made at its first parallel op
    threads = _threads()
    with cpu_support.cuda_on_cpu():
        x = big.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        dist.broadcast(x, 0, group=group)
        dist.reduce(x, 0, group=group)
        assert torch.equal(x, big)
        out = [torch.empty_like(big)]
        dist.all_gather(out, big, group=group)
        gathered = [torch.empty_like(big)]
        dist.gather(big, gathered, dst=0, group=group)
        scattered = torch.empty_like(big)
        dist.scatter(scattered, [2 * big], src=0, group=group)
        objects = [None]
        dist.all_gather_object(objects, {"payload": big}, group=group)
        assert torch.equal(out[0], big) and torch.equal(gathered[0], big) and torch.equal(scattered, 2 * big)
        assert torch.equal(objects[0]["payload"], big)
        assert gloo_calls == []
        assert _threads() <= threads
        dist.all_reduce(x, group=group, async_op=True).wait()  # asynchronous: the real collective
        assert gloo_calls == ["allreduce"]


def test_all_gather_objects_over_one_rank_is_local(dist_world_of_one, gloo_calls):
    from nemo_aligner.utils.distributed import all_gather_objects

    payload = {"rows": list(range(100000))}
    assert all_gather_objects(payload) == [payload]
    assert gloo_calls == []
