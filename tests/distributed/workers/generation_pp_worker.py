"""An own-weights engine under a pipeline-parallel trainer (stages folded into data
parallelism): generation before and after an in-place weight update, both decoders.

    torchrun --nproc-per-node N generation_pp_worker.py OUT_PREFIX TP PP
Each rank saves its results to OUT_PREFIX.<rank>.pt.
"""

import sys

import torch


def main():
    out, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from nemo_aligner.generation import SamplingParams
    from nemo_aligner.generation.megatron_engine import MegatronEngine
    from nemo_aligner.models.gpt import build_gpt_model, init_weights_layout_invariant
    from nemo_aligner.utils import distributed

    distributed.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    cfg = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
               encoder_seq_length=64, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = build_gpt_model(cfg, 300, seed=1)  # this stage's layers; the same weights at every layout
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10)
    result = {}
    engines = {d: MegatronEngine.with_own_weights(cfg, model, vocab_size=300, decoder=d) for d in ("lean", "megatron")}
    result["layers"] = len(engines["lean"].model.decoder.layers)
    pointers = [p.data_ptr() for p in engines["lean"].model.parameters()]
    for d, eng in engines.items():
        result[f"before_{d}"] = eng.generate(prompts, params, seeds=[1, 2, 3, 4]).response_ids
    init_weights_layout_invariant(model, 2, model.config)  # an in-place update on every stage
    for d, eng in engines.items():
        eng.refit(model)
        result[f"after_{d}"] = eng.generate(prompts, params, seeds=[1, 2, 3, 4]).response_ids
    result["in_place"] = pointers == [p.data_ptr() for p in engines["lean"].model.parameters()]
    torch.save(result, f"{out}.{torch.distributed.get_rank()}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
