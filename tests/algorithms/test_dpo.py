"""DPO/KTO machinery in one process: step-0 identities, packed = unpacked, swap = precompute,
padding groups, and the KTO loss through the trainer's loss function."""

import math
from functools import partial

import pytest
import torch

from helpers import ROOT
from nemo_aligner.algorithms.dpo import DPOSettings, KTOSettings, dpo_loss_fn, kto_loss_fn
from nemo_aligner.algorithms.reference import (
    ReferenceWeights,
    attach_reference_logps,
    precompute_reference_logps,
    reference_token_budget,
    sequence_logps,
)
from nemo_aligner.data.preference import (
    KTODataset,
    PackedGroupDataset,
    PreferenceDataset,
    group_collate,
    merged_length,
    micro_batch_collate,
    padding_group,
)
from nemo_aligner.data.tokenizers import load_tokenizer
from nemo_aligner.losses.preference import kto_kl_estimate, kto_loss, preference_loss
from nemo_aligner.models.forward import forward_batch
from nemo_aligner.models.gpt import build_gpt_model

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, encoder_seq_length=64)
N = 8


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ROOT / "data/quickstart/tokenizer.json"))


@pytest.fixture
def pairs(tok, tmp_path):
    """The first N bundled pairs (varied lengths), with fresh reference slots."""
    lines = (ROOT / "data/quickstart/preference_train.jsonl").read_text().splitlines()[:N]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return PreferenceDataset(path, tok, 64)


def collate(tok, groups, **kw):
    return group_collate(groups, pad_id=tok.pad_id, **kw)


def model(seed):
    return build_gpt_model(TINY, 512, seed=seed)


def dpo_terms(m, batch, settings):
    loss_sum, count, sums = dpo_loss_fn(batch, settings)(forward_batch(m, batch))
    return loss_sum, int(count), {k: float(v) for k, v in sums.items()}


def test_step_zero_rewards_are_zero_and_dpo_loss_is_log_2(tok, pairs, dist_world_of_one):
    m = model(1)
    coll = partial(collate, tok)
    precompute_reference_logps([m], pairs, pairs, coll, micro_batch_size=3)
    assert not torch.isnan(pairs.ref_logps).any() and (pairs.ref_logps < 0).all()
    batch = coll([pairs[i] for i in range(N)])
    settings = DPOSettings(loss_type="dpo", beta=0.1)
    loss_sum, count, sums = dpo_terms(m, batch, settings)
    assert count == N
    assert loss_sum.item() / N == pytest.approx(math.log(2), abs=1e-6)
    # precomputed in other batches (other padding): equal up to float32 rounding
    assert abs(sums["rewards_chosen_sum"]) / N < 1e-5 and abs(sums["rewards_rejected_sum"]) / N < 1e-5

    # swap mode: the reference forward runs on the very same batch, so rewards are exactly 0
    ref = ReferenceWeights([m])
    batch = coll([pairs[i] for i in range(N)])
    attach_reference_logps(ref, [m], [batch])
    loss_sum, _, sums = dpo_terms(m, batch, settings)
    assert sums["rewards_chosen_sum"] == 0.0 and sums["rewards_rejected_sum"] == 0.0
    assert loss_sum.item() / N == pytest.approx(math.log(2), abs=1e-7)


def test_swap_restores_weights_and_matches_precompute(tok, pairs, dist_world_of_one):
    policy, initial = model(2), model(3)
    coll = partial(collate, tok)
    precompute_reference_logps([initial], pairs, pairs, coll, micro_batch_size=4)
    precomputed = pairs.ref_logps.clone()

    # Swap mode on the policy model holding the *initial* model's weights as reference.
    ref = ReferenceWeights([policy])
    ref.cpu = [p.detach().clone() for p in initial.parameters()]
    before = [p.detach().clone() for p in policy.parameters()]
    batch = coll([pairs[i] for i in range(N)])
    attach_reference_logps(ref, [policy], [batch])
    for p, b in zip(policy.parameters(), before):
        assert torch.equal(p, b)  # the policy is back, bit for bit
    torch.testing.assert_close(batch["ref_logps"].view(-1, 2), precomputed, rtol=0, atol=2e-5)


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_packed_dpo_equals_unpacked(tok, pairs, share_prompt, position, dist_world_of_one):
    """Per-sequence log-probs, every metric and the gradients agree (fp32, to 1e-5), with
    each pair's prompt in both sequences or computed once (``share_prompt``)."""
    coll = partial(collate, tok)
    build = lambda seed: build_gpt_model(dict(TINY, position_embedding_type=position), 512, seed=seed)  # noqa: E731
    precompute_reference_logps([build(5)], pairs, pairs, coll, micro_batch_size=N)  # reference != policy
    policy = build(4)
    for loss_type in ("dpo", "ipo", "rpo_fwd_kl"):
        settings = DPOSettings(loss_type=loss_type, beta=0.5, sft_loss_weight=0.3, gt_reward_scale=2.0)
        unpacked = coll([pairs[i] for i in range(N)])
        packed_ds = PackedGroupDataset.from_bins(pairs, [[3, 0, 5], [1, 7], [2, 6, 4]], pack_size=256,
                                                 share_prefix=share_prompt)
        packed = coll([packed_ds[j] for j in range(3)], pad_to=256)
        assert "cu_seqlens" in packed
        tokens = int(packed["seq_ids"].ge(0).sum())
        if share_prompt:  # every rejected sequence continues its chosen one's prompt
            assert (packed["prefix_lens"] > 0).sum() == N
            assert tokens == sum(pairs.lengths) - sum(pairs.shared) < sum(pairs.lengths)
        else:
            assert "prefix_lens" not in packed and tokens == sum(pairs.lengths)

        results = {}
        for name, batch in (("unpacked", unpacked), ("packed", packed)):
            policy.zero_grad()
            logits = forward_batch(policy, batch)
            seq_logps = sequence_logps(logits, batch)[0].detach().view(-1, 2)
            order = batch["sample_ids"].argsort()
            loss_sum, count, sums = dpo_loss_fn(batch, settings)(forward_batch(policy, batch))
            loss_sum.backward()
            results[name] = (seq_logps[order], loss_sum.detach(), sums,
                             [p.grad.clone() for p in policy.parameters()])
        (lu, su, mu, gu), (lp, sp, mp, gp) = results["unpacked"], results["packed"]
        torch.testing.assert_close(lp, lu, rtol=0, atol=1e-5)
        assert sp.item() / N == pytest.approx(su.item() / N, abs=1e-5)
        for key in mu:
            assert float(mp[key]) == pytest.approx(float(mu[key]), abs=1e-5), key
        for a, b in zip(gp, gu):  # the same gradient up to float32 rounding (other attention shapes)
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7, ((a - b).abs().max(), b.abs().max())
        assert su.item() / N != pytest.approx(math.log(2), abs=1e-3)  # a real margin was tested


def test_padding_groups_change_nothing(tok, pairs, dist_world_of_one):
    coll = partial(collate, tok)
    m = model(6)
    precompute_reference_logps([model(7)], pairs, pairs, coll, micro_batch_size=N)
    settings = DPOSettings(loss_type="dpo", beta=0.3)
    groups = [pairs[i] for i in range(3)]
    plain = dpo_terms(m, coll(groups), settings)
    padded = dpo_terms(m, coll(groups + [padding_group(pairs[4]), padding_group(pairs[5])]), settings)
    assert padded[1] == plain[1] == 3
    assert padded[0].item() == pytest.approx(plain[0].item(), abs=1e-6)
    for key in plain[2]:
        assert padded[2][key] == pytest.approx(plain[2][key], abs=1e-5)


def test_dpo_loss_fn_matches_preference_loss_by_hand(tok, pairs, dist_world_of_one):
    """The trainer's loss = preference loss of the per-sequence sums + the chosen NLL per token."""
    coll = partial(collate, tok)
    precompute_reference_logps([model(9)], pairs, pairs, coll, micro_batch_size=N)
    m = model(8)
    batch = coll([pairs[i] for i in range(N)])
    with torch.no_grad():
        sums, counts = sequence_logps(forward_batch(m, batch), batch)
    ref = batch["ref_logps"]
    for avg in (False, True):
        s = DPOSettings(loss_type="rpo_sq", beta=0.2, sft_loss_weight=0.5, preference_loss_weight=0.7,
                        preference_average_log_probs=avg, gt_reward_scale=0.5)
        div = counts if avg else torch.ones_like(counts)
        pref = preference_loss(sums[0::2] / div[0::2], sums[1::2] / div[1::2], ref[0::2] / div[0::2],
                               ref[1::2] / div[1::2], loss_type="rpo_sq", beta=0.2,
                               chosen_gt_rewards=batch["gt_rewards"][0::2],
                               rejected_gt_rewards=batch["gt_rewards"][1::2], gt_reward_scale=0.5)
        want = (0.7 * pref + 0.5 * (-sums[0::2] / counts[0::2])).sum()
        with torch.no_grad():
            got, _, metrics = dpo_terms(m, batch, s)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert metrics["num_pairs"] == N


def test_kto_loss_fn_matches_hand_formula(tok, tmp_path, dist_world_of_one):
    lines = (ROOT / "data/quickstart/kto_train.jsonl").read_text().splitlines()[:6]
    (tmp_path / "k.jsonl").write_text("\n".join(lines) + "\n")
    ds = KTODataset(tmp_path / "k.jsonl", tok, 64, seed=1)
    coll = partial(collate, tok)
    precompute_reference_logps([model(11)], ds, ds, coll, micro_batch_size=6)
    m = model(10)
    batch = coll([ds[i] for i in range(6)])
    with torch.no_grad():
        sums, _ = sequence_logps(forward_batch(m, batch), batch)
        ref = batch["ref_logps"]
        z0 = kto_kl_estimate(sums[1::2], ref[1::2])
        want = kto_loss(sums[0::2], ref[0::2], batch["desirable"] > 0, z0, beta=0.2,
                        desirable_weight=1.0, undesirable_weight=1.5).sum()
        got, count, metrics = kto_loss_fn(batch, KTOSettings(beta=0.2, undesirable_weight=1.5))(forward_batch(m, batch))
    assert int(count) == 6
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert float(metrics["kl_sum"]) / 6 == pytest.approx(z0.item(), abs=1e-6)


def test_packed_kto_with_shared_prompts_equals_unpacked(tok, tmp_path, dist_world_of_one):
    """A KTO sample and its mismatched KL sequence share the prompt: packed once, the
    log-probs of both are those of the unpacked sequences."""
    lines = (ROOT / "data/quickstart/kto_train.jsonl").read_text().splitlines()[:6]
    (tmp_path / "k.jsonl").write_text("\n".join(lines) + "\n")
    ds = KTODataset(tmp_path / "k.jsonl", tok, 64, seed=1)
    assert all(n > 0 for n in ds.shared)
    m = model(12)
    coll = partial(collate, tok)
    unpacked = coll([ds[i] for i in range(6)])
    packs = PackedGroupDataset.from_bins(ds, [[4, 1, 0], [2, 5, 3]], pack_size=256, share_prefix=True)
    packed = coll([packs[0], packs[1]], pad_to=256)
    assert packed["seq_ids"].ge(0).sum() == sum(ds.lengths) - sum(ds.shared)
    with torch.no_grad():
        want = sequence_logps(forward_batch(m, unpacked), unpacked)[0].view(-1, 2)
        got = sequence_logps(forward_batch(m, packed), packed)[0].view(-1, 2)
    torch.testing.assert_close(got[packed["sample_ids"].argsort()], want, rtol=0, atol=1e-5)


def test_sequence_logps_of_an_imported_hf_model_match_transformers(tmp_path, dist_world_of_one):
    """What DPO sees of a Hugging Face model (imported) equals transformers' own log-probs."""
    from hf_models import make_hf_model

    from nemo_aligner.checkpoint.hf import import_hf_model
    from nemo_aligner.data.preference import make_sequence

    hf = make_hf_model("llama", tmp_path / "hf", seed=3)
    ours, _ = import_hf_model(tmp_path / "hf")
    g = torch.Generator().manual_seed(0)
    groups = []
    for n_prompt, n_c, n_r in ((5, 7, 3), (9, 2, 11)):
        prompt = torch.randint(3, 300, (n_prompt,), generator=g)
        seqs = []
        for n in (n_c, n_r):
            ids = torch.cat([prompt, torch.randint(3, 300, (n,), generator=g)])
            mask = torch.cat([torch.zeros(n_prompt, dtype=torch.long), torch.ones(n, dtype=torch.long)])
            seqs.append(make_sequence(ids, mask, shift=True))
        groups.append({"sequences": seqs, "sample_ids": torch.tensor([len(groups)])})
    batch = group_collate(groups, pad_id=0)
    with torch.no_grad():
        got = sequence_logps(forward_batch(ours, batch), batch)[0]
        want = []
        for g_ in groups:
            for s in g_["sequences"]:
                ids = torch.cat([s["tokens"], s["labels"][-1:]])
                logp = torch.log_softmax(hf(ids[None]).logits[0, :-1].float(), -1)
                token = logp.gather(-1, s["labels"][:, None])[:, 0]
                want.append((token * s["loss_mask"]).sum())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-4)


def test_reference_budget_is_twice_the_training_one_and_four_times_a_small_one():
    assert reference_token_budget(4096) == 8192 and reference_token_budget(3000) == 6000
    assert reference_token_budget(2048) == 4096  # 4x would pass the small-budget ceiling
    assert reference_token_budget(1024) == 4096 and reference_token_budget(512) == 2048
    assert reference_token_budget(100) == 400
    assert reference_token_budget(512, small=1536) == 1536


def test_reference_logps_do_not_depend_on_the_token_budget(tok, pairs, dist_world_of_one):
    """One-row micro-batches of 1 pair, of a few, or of all of them: the same sums."""
    m = model(3)
    coll = partial(micro_batch_collate, pad_id=tok.pad_id, share_prefix=True)
    row = partial(merged_length, share_prefix=True)
    widths = [row([pairs[i]]) for i in range(N)]
    got = []
    for budget in (1, 2 * max(widths), sum(widths)):
        precompute_reference_logps([m], pairs, pairs, coll, micro_batch_size=1, row_length=row, token_budget=budget)
        got.append(pairs.ref_logps.clone())
    assert not torch.isnan(got[0]).any()
    for other in got[1:]:
        torch.testing.assert_close(other, got[0], rtol=1e-5, atol=1e-5)
