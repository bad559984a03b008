"""Do the engine's log-probs agree with the trainer's? (``token_mult_prob_error``)

PPO's importance ratio divides the trainer's probability of each generated token by the
generation-time probability; if the two computations disagree (another dtype, another
kernel, a bug) the ratio is biased before any learning happens. The metric, per token of
every response:

    token_mult_prob_error = mean_t exp(|logp_gen(t) - logp_train(t)|)   (1.0 = identical)

The trainer side is a full forward of prompt + response without a KV cache, then
:func:`nemo_aligner.models.logprobs.token_logprobs` on the vocab-parallel logits. Both sides
normalize over the real vocabulary: models from ``build_gpt_model`` mask the embedding
table's padding ids out of their logits, and the engine samples from ids below
``vocab_size`` only.
"""

import torch

from nemo_aligner.generation.engine import GenerationError, GenerationOutput
from nemo_aligner.generation.refit import unwrap_model
from nemo_aligner.models.logprobs import token_logprobs


@torch.no_grad()
def trainer_logprobs(model, output: GenerationOutput) -> torch.Tensor:
    """``log p(response token)`` ``[B, T]`` from a cache-free forward of prompt + response
    (0 after each response's length). ``model``: the training model (PP=1 chunk, any TP)."""
    model = unwrap_model(model)
    if not (model.pre_process and model.post_process):
        raise GenerationError(
            "trainer_logprobs needs the whole model (pipeline_model_parallel_size=1); under "
            "pipeline parallelism compute the trainer's log-probs through its pipeline schedule"
        )
    was_training = model.training
    model.eval()
    sequences = output.sequences()
    width = max(len(s) for s in sequences)
    device = next(model.parameters()).device
    tokens = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = torch.tensor(seq, device=device)
    positions = torch.arange(width, device=device).unsqueeze(0).expand_as(tokens)
    try:
        logits = model(tokens, positions, attention_mask=None)  # causal: right padding is inert
    finally:
        model.train(was_training)
    # Position j predicts token j + 1.
    logp = token_logprobs(logits[:, :-1].float(), tokens[:, 1:])
    result = torch.zeros_like(output.logprobs)
    for i, (prompt, n) in enumerate(zip(output.prompt_ids, output.response_lengths.tolist())):
        p = len(prompt)
        result[i, :n] = logp[i, p - 1 : p - 1 + n].cpu()
    return result


def token_mult_prob_error(gen_logprobs: torch.Tensor, train_logprobs: torch.Tensor, lengths: torch.Tensor) -> float:
    """``mean exp(|gen - train|)`` over the first ``lengths[i]`` tokens of each row."""
    width = gen_logprobs.shape[1]
    valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    diff = (gen_logprobs.double() - train_logprobs.double()).abs()
    return float(diff.exp()[valid].mean())
