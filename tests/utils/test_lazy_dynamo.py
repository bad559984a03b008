"""Training does not import TorchDynamo when nothing is compiled, and computes the same thing
(see nemo_aligner/utils/lazy_dynamo.py). Each case runs in a fresh interpreter: in this one
another test may already have imported TorchDynamo."""

import subprocess
import sys

from helpers import ROOT

TRAIN = """
import sys, tempfile, torch
if sys.argv[1] == "imported":
    import torch._dynamo
from nemo_aligner.utils import distributed
from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.utils.optim import build_optimizer, build_scheduler, optimizer_step, wrap_ddp
from nemo_aligner.checkpoint.distributed import load_checkpoint, save_checkpoint

distributed.initialize()
TINY = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
            encoder_seq_length=16)
OPTIM = {"optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "sched": {"name": "Constant", "warmup_steps": 0}}}

def steps(model, optimizer, scheduler, n):
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        model(tokens, torch.arange(16).expand(2, -1), attention_mask=None).float().logsumexp(-1).sum().backward()
        model.finish_grad_sync()
        optimizer_step(optimizer, scheduler)

model = wrap_ddp(build_gpt_model(TINY, 64, seed=3), {})
optimizer = build_optimizer([model], OPTIM, gradient_clip_val=0.5)
scheduler = build_scheduler(optimizer, OPTIM, max_steps=4)
steps(model, optimizer, scheduler, 2)
with tempfile.TemporaryDirectory() as tmp:
    save_checkpoint(tmp + "/ck", [model], TINY, optimizer, {"step": 2})
    model = wrap_ddp(build_gpt_model(TINY, 64, seed=4), {})
    optimizer = build_optimizer([model], OPTIM, gradient_clip_val=0.5)
    scheduler = build_scheduler(optimizer, OPTIM, max_steps=4)
    load_checkpoint(tmp + "/ck", [model], optimizer)
steps(model, optimizer, scheduler, 2)
print("dynamo imported:", "torch._dynamo" in sys.modules)
print("weights:", " ".join(f"{p.double().sum().item():.17g}" for p in model.parameters()))
"""


def _run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_training_and_resume_do_not_import_dynamo_and_match_a_run_that_did():
    lazy = _run(TRAIN, "lazy").splitlines()
    imported = _run(TRAIN, "imported").splitlines()
    assert lazy[-2] == "dynamo imported: False"
    assert imported[-2] == "dynamo imported: True"
    assert lazy[-1] == imported[-1]  # bit-identical weights after steps, save, load, steps


STAND_IN = """
import sys, torch
from nemo_aligner.utils.lazy_dynamo import dynamo_not_imported
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
with dynamo_not_imported():
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(model.parameters(), foreach=True)]
    for opt in optimizers:
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.load_state_dict(opt.state_dict())
        opt.zero_grad()
    import inspect
    inspect.getmodule(inspect)  # a probe of every module's __file__ is not a use of TorchDynamo
    assert "torch._dynamo" in sys.modules and type(sys.modules["torch._dynamo"]).__name__ == "_StandIn"
assert "torch._dynamo" not in sys.modules  # the stand-in leaves with the block

with dynamo_not_imported():
    import torch._dynamo.config  # anything beyond the two no-ops imports the real module
    assert type(sys.modules["torch._dynamo"]).__name__ == "module"
    assert torch._dynamo.config.cache_size_limit > 0

# the wrappers handed out meanwhile now defer to torch's own
optimizers[0].zero_grad()
wrapper = torch.optim.Optimizer.zero_grad.__wrapped__.__dynamo_disable
assert wrapper.real.__module__.startswith("torch._dynamo"), wrapper.real
print("ok")
"""


def test_the_stand_in_answers_only_no_ops_and_gives_way_to_the_real_module():
    assert _run(STAND_IN).strip() == "ok"
