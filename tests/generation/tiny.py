"""Tiny GPT configs, prompts and a cache-free reference decoder for the generation tests."""

import torch


VOCAB = 300  # padded to 384: the padding ids must never be generated
LLAMA = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, encoder_seq_length=64)
GPT2 = dict(LLAMA, normalization="layernorm", activation="gelu", num_query_groups=4,
            position_embedding_type="learned_absolute", bias=True,
            share_embeddings_and_output_weights=True)


def random_prompts(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def recompute_greedy(model, prompt, steps, vocab=VOCAB):
    """Greedy tokens and their log-probs by a full forward over the whole sequence at
    every step (no KV cache): the reference the engine must match."""
    model.eval()
    seq, tokens, logprobs = list(prompt), [], []
    for _ in range(steps):
        x = torch.tensor([seq])
        logits = model(x, torch.arange(len(seq)).unsqueeze(0), attention_mask=None)[0, -1, :vocab]
        tok = int(logits.argmax())
        tokens.append(tok)
        logprobs.append(float(torch.log_softmax(logits.float(), -1)[tok]))
        seq.append(tok)
    return tokens, torch.tensor(logprobs)
