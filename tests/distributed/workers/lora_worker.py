"""A LoRA model's log-probs and adapter gradients at this TP size, in global (TP-independent) form.

    torchrun --nproc-per-node 2 lora_worker.py OUT TP
Every adapter (A and B random: ``row_init_method=normal``) on a GQA swiglu model; rank 0 saves
the token log-probs of fixed tokens, the loss, and each adapter matrix's gradient with the
tensor-parallel shards put back together (Megatron's gate/up layout for ``linear_fc1``).
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
           encoder_seq_length=32, peft={"peft_scheme": "lora", "lora_tuning": {
               "target_modules": ["all"], "adapter_dim": 4, "alpha": 8, "row_init_method": "normal"}})


def _global(name, grad, adapter, tp):
    """The full gradient of one adapter matrix from this rank's shard (collective over TP)."""
    if tp == 1:
        return grad
    shards = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(shards, grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    sharded_dim = {("column", "linear_out"): 0, ("row", "linear_in"): 1}.get((adapter.kind, name))
    if sharded_dim is None:  # replicated: every rank holds the whole gradient
        for s in shards[1:]:
            torch.testing.assert_close(s, shards[0], rtol=0, atol=0)
        return shards[0]
    if adapter.gated:  # each rank holds [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(shards, dim=sharded_dim)


def main():
    out, tp = sys.argv[1], int(sys.argv[2])
    from nemo_aligner.models.gpt import build_gpt_model
    from nemo_aligner.models.logprobs import token_logprobs
    from nemo_aligner.models.lora import LoRASettings, adapted_linears, apply_lora
    from nemo_aligner.utils import distributed

    distributed.initialize(tensor_model_parallel_size=tp)
    cfg = dict(CFG, tensor_model_parallel_size=tp)
    model = apply_lora(build_gpt_model(cfg, 300, seed=5), LoRASettings.from_model_cfg(cfg), seed=7)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 17), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    logits = model(inputs, position_ids, attention_mask=None)
    logp = token_logprobs(logits, targets)
    loss = -(logp * torch.linspace(0.5, 1.5, 16)).sum()
    loss.backward()
    grads = {}
    for _, adapter in adapted_linears(model):
        layer = next(n for n, m in model.named_modules() if m is adapter)
        for name in ("linear_in", "linear_out"):
            grads[f"{layer}.{name}"] = _global(name, getattr(adapter, name).weight.grad, adapter, tp)
    frozen = [p.grad for n, p in model.named_parameters() if ".lora." not in n]
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"logp": logp.detach(), "loss": loss.detach(), "grads": grads,
                    "frozen_grads": sum(g is not None for g in frozen)}, f"{out}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
