"""The shared rollout step (nemo_aligner.algorithms.rollout) in one process, tiny random model."""

import pytest
import torch

from nemo_aligner.algorithms.reference import ReferenceWeights
from nemo_aligner.algorithms.reward_sources import RuleReward
from nemo_aligner.algorithms.rollout import RolloutGenerator, RolloutSettings, sample_seed, training_micro_batch
from nemo_aligner.data.prompts import PromptDataset
from nemo_aligner.data.tokenizers import load_tokenizer
from nemo_aligner.generation.engine import SamplingParams
from nemo_aligner.generation.megatron_engine import MegatronEngine
from nemo_aligner.models.gpt import build_gpt_model
from nemo_aligner.rewards.quickstart import exact_match

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            encoder_seq_length=64)


@pytest.fixture
def setup(dist_world_of_one):
    tokenizer = load_tokenizer("data/quickstart/tokenizer.json")
    model = build_gpt_model(TINY, tokenizer.vocab_size, seed=3)
    prompts = PromptDataset("data/quickstart/rl_val.jsonl", tokenizer, max_prompt_length=48)

    def generator(k=3, reference=None, seed=7):
        sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
        settings = RolloutSettings(k, sampling, SamplingParams(greedy=True, max_new_tokens=8), 4, seed)
        engine = MegatronEngine(model, tokenizer, max_batch_size=16)
        return RolloutGenerator(model, engine, tokenizer, RuleReward("nemo_aligner.rewards.quickstart:exact_match"),
                                settings, reference=reference)

    return tokenizer, model, prompts, generator


def test_sample_seed_is_a_function_of_seed_step_and_index():
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    seeds = {sample_seed(s, t, i) for s in (0, 1) for t in (0, 1, 2) for i in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_rollout_layout_logprobs_and_rewards(setup):
    tokenizer, model, prompts, generator = setup
    items = [prompts[i] for i in range(4)]
    gen = generator(reference=ReferenceWeights(model))
    r = gen.run(items, global_offset=0, step=0)
    assert len(r) == 12
    assert r.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    mask = r.mask
    assert mask.sum(1).tolist() == r.response_lengths.tolist()
    for i in range(len(r)):
        p, n = int(r.prompt_lengths[i]), int(r.response_lengths[i])
        assert r.tokens[i, :p].tolist() == items[i // 3]["prompt_ids"]
        assert (r.tokens[i, p + n:] == tokenizer.pad_id).all()
        # Label position p - 1 + j scores response token j; nothing outside the response.
        assert mask[i, p - 1 : p - 1 + n].eq(1).all() and mask[i].sum() == n
    # The training forward agrees with the engine on every sampled token, and the initial
    # policy is the current one before any update.
    assert torch.allclose(r.logprobs, r.gen_logprobs, atol=1e-4)
    assert torch.equal(r.init_logprobs, r.logprobs)
    assert ((r.logprobs != 0) <= (mask > 0)).all()
    assert r.rewards.tolist() == exact_match(r.prompts, r.responses, r.samples)
    assert r.samples[0] is items[0]["sample"] and r.prompts[3] == items[1]["text"]


def test_a_sample_depends_on_seed_step_and_global_index_only(setup):
    _, _, prompts, generator = setup
    gen = generator()
    a, b = prompts[0], prompts[1]
    both = gen.run([a, b], global_offset=0, step=5)
    alone = gen.run([b], global_offset=1, step=5)  # as a second data-parallel rank would see it
    assert both.responses[3:] == alone.responses
    assert torch.allclose(both.gen_logprobs[3:, : alone.gen_logprobs.shape[1]], alone.gen_logprobs, atol=1e-5)
    other_step = gen.run([a, b], global_offset=0, step=6)
    assert other_step.responses != both.responses
    validation = gen.run([a, b], global_offset=0, step=5, validation=True)
    assert len(validation) == 2 and validation.logprobs is None  # greedy, one each, no log-prob pass


def test_init_logprobs_come_from_the_initial_weights(setup):
    _, model, prompts, generator = setup
    reference = ReferenceWeights(model)
    gen = generator(reference=reference)
    items = [prompts[0], prompts[1]]
    before = gen.run(items, 0, step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = gen.logprobs(before)  # the same samples under the changed weights
    assert not torch.allclose(after, before.logprobs, atol=1e-3)
    with reference.swapped():
        init = gen.logprobs(before)
    assert torch.allclose(init, before.logprobs, atol=1e-6)


def test_training_micro_batch(setup):
    _, _, prompts, generator = setup
    r = generator().run([prompts[0]], 0, step=0)
    extra = torch.arange(r.tokens.numel(), dtype=torch.float32).reshape(r.tokens.shape)
    batch = training_micro_batch(r, [2, 0], {"advantages": extra})
    assert torch.equal(batch["tokens"], r.tokens[[2, 0]])
    assert torch.equal(batch["labels"][:, :-1], r.tokens[[2, 0], 1:])
    assert torch.equal(batch["loss_mask"], r.mask[[2, 0]])
    assert torch.equal(batch["advantages"], extra[[2, 0]])
    assert batch["position_ids"][1].tolist() == list(range(r.tokens.shape[1]))
