"""Random tiny Hugging Face models built with ``transformers`` (no downloads), for parity tests."""

import torch

ARCHS = ("llama", "mistral", "qwen2", "gpt2")

_COMMON = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)


def hf_config(arch: str):
    import transformers as tf

    if arch == "llama":  # Llama 3 RoPE scaling with a short original context, so it matters
        return tf.LlamaConfig(**_COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=64)
    if arch == "qwen2":  # QKV biases, tied embeddings
        return tf.Qwen2Config(**_COMMON, tie_word_embeddings=True)
    if arch == "gpt2":  # an odd vocabulary: padded (and masked) to 384 inside our model
        return tf.GPT2Config(vocab_size=301, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def hf_class(arch: str):
    import transformers as tf

    return {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
            "qwen2": tf.Qwen2ForCausalLM, "gpt2": tf.GPT2LMHeadModel}[arch]


def make_hf_model(arch: str, out_dir, seed: int = 0, dtype=torch.float32, **save_kwargs):
    """Save a random ``arch`` model to ``out_dir``; returns the ``transformers`` model (eval).

    Every weight is perturbed, so norm weights and biases are not their constant inits.
    """
    torch.manual_seed(seed)
    model = hf_class(arch)(hf_config(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(dtype)
    model.save_pretrained(out_dir, **save_kwargs)
    return model


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()
