"""Policy and reference per-sequence log-probs of the DPO machinery at a TP size.

    torchrun --nproc-per-node TP dpo_logps_worker.py OUT_PREFIX TP DATA TOKENIZER
Saves, from each rank, the reference log-probs precomputed with one model (seed 21), the
policy log-probs of another (seed 22), and the DPO loss when policy = reference.
"""

import sys
from functools import partial

import torch
from megatron.core import parallel_state


def main():
    out, tp, data, tokenizer = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from nemo_aligner.algorithms.dpo import DPOSettings, dpo_loss_fn
    from nemo_aligner.algorithms.reference import precompute_reference_logps, sequence_logps
    from nemo_aligner.data.preference import PreferenceDataset, group_collate
    from nemo_aligner.data.tokenizers import load_tokenizer
    from nemo_aligner.models.forward import forward_batch
    from nemo_aligner.models.gpt import build_gpt_model
    from nemo_aligner.utils import distributed

    distributed.initialize(tensor_model_parallel_size=tp)
    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
               encoder_seq_length=64, tensor_model_parallel_size=tp)
    tok = load_tokenizer(tokenizer)
    ds = PreferenceDataset(data, tok, 64)
    collate = partial(group_collate, pad_id=tok.pad_id)
    reference, policy = build_gpt_model(cfg, tok.vocab_size, seed=21), build_gpt_model(cfg, tok.vocab_size, seed=22)
    precompute_reference_logps([reference], ds, ds, collate, micro_batch_size=3)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        policy_logps = sequence_logps(forward_batch(policy, batch), batch)[0].view(-1, 2)
        loss_sum, count, _ = dpo_loss_fn(batch, DPOSettings(beta=0.1))(forward_batch(reference, batch))
    torch.save({"ref": ds.ref_logps.clone(), "policy": policy_logps, "step0_loss": loss_sum / count},
               f"{out}.{parallel_state.get_tensor_model_parallel_rank()}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
