"""Generation at a given TP size (torchrun, gloo): greedy and seeded sampling with both
decoders, an own-weights engine refit in place, and the log-prob consistency metric.

    torchrun --nproc-per-node 2 generation_worker.py OUT_PREFIX TP
Each rank saves its results to OUT_PREFIX.<rank>.pt.
"""

import sys

import torch


def main():
    out, tp = sys.argv[1], int(sys.argv[2])
    from nemo_aligner.generation import SamplingParams
    from nemo_aligner.generation.consistency import token_mult_prob_error, trainer_logprobs
    from nemo_aligner.generation.megatron_engine import MegatronEngine
    from nemo_aligner.models.gpt import build_gpt_model, init_weights_layout_invariant
    from nemo_aligner.utils import distributed

    distributed.initialize(tensor_model_parallel_size=tp)
    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
               num_query_groups=2, encoder_seq_length=64, tensor_model_parallel_size=tp)
    model = build_gpt_model(cfg, 300, seed=1)  # the same weights at every layout
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
    greedy = SamplingParams(greedy=True, max_new_tokens=10)
    sampled = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=10)
    result = {}
    for decoder in ("lean", "megatron"):
        eng = MegatronEngine(model, vocab_size=300, decoder=decoder)
        g_out = eng.generate(prompts, greedy)
        s_out = eng.generate(prompts, sampled, seeds=[3, 4, 5, 6])
        result[decoder] = dict(greedy=g_out.response_ids, greedy_logprobs=g_out.logprobs,
                               sampled=s_out.response_ids, sampled_logprobs=s_out.logprobs)
        result[decoder]["error"] = token_mult_prob_error(
            s_out.logprobs, trainer_logprobs(model, s_out), s_out.response_lengths
        )

    own = MegatronEngine.with_own_weights(cfg, model, vocab_size=300)
    pointers = [p.data_ptr() for p in own.model.parameters()]
    # New weights, in place and the same at every layout (as if an optimizer had stepped).
    init_weights_layout_invariant(model, 2, model.config)
    own.refit(model)
    result["refit_in_place"] = pointers == [p.data_ptr() for p in own.model.parameters()]
    result["refit"] = own.generate(prompts, sampled, seeds=[3, 4, 5, 6]).response_ids
    result["changed"] = result["refit"] != result["lean"]["sampled"]
    result["fresh"] = MegatronEngine(model, vocab_size=300).generate(prompts, sampled, seeds=[3, 4, 5, 6]).response_ids
    torch.save(result, f"{out}.{torch.distributed.get_rank()}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
