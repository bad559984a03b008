"""Policy-gradient math for online RL (REINFORCE/RLOO, GRPO, PPO): pure tensor functions.

Shapes: per-token tensors are ``[B, T]`` (``T`` label positions: position ``t`` scores the
token at ``t + 1``), per-sequence tensors ``[B]``; masks are 0/1 of the values' shape.
Every function computes in the dtype it is given (float64 in, float64 out) and is
differentiable where a gradient makes sense.

Definitions follow NeMo-Aligner (REINFORCE, PPO, whitening) and NeMo-RL (GRPO advantages,
KL estimators and their clamps, the clipped surrogate with dual clip), so configs and
numbers carry over.
"""

import torch

KL_TYPES = ("k1", "k2", "k3")


# ----------------------------------------------------------------------------- reductions
def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """``sum(values * mask)`` (over ``dim``, or everything)."""
    prod = values * mask
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """``sum(values * mask) / sum(mask)``; 0 where the mask is empty (not NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_mean_var(values: torch.Tensor, mask: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over the masked entries (NeMo-Aligner's uncorrected
    ``masked_global_mean_var``)::

        mean = sum(m x) / sum(m),     var = sum(m (x - mean)^2) / sum(m)

    With a process ``group`` (e.g. the data-parallel group) the sums run over every rank's
    entries: ``sum(m x)`` and ``sum(m)`` are all-reduced, then ``sum(m (x - mean)^2)``, so
    each rank gets the statistics of all ranks' values put together.
    """
    if group is None:
        mean = masked_mean(values, mask)
        return mean, masked_mean((values - mean) ** 2, mask)
    import torch.distributed as dist

    totals = torch.stack([masked_sum(values, mask), mask.sum().to(values.dtype)])
    dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1)
    mean = totals[0] / count
    square = masked_sum((values - mean) ** 2, mask)
    dist.all_reduce(square, group=group)
    return mean, square / count


def masked_whiten(values, mask, mean=None, var=None, eps: float = 1e-8, group=None) -> torch.Tensor:
    """NeMo-Aligner's advantage whitening (``normalize_tensor``)::

        whiten(x) = (x - mean) / sqrt(var + eps)

    with ``mean`` / ``var`` from :func:`masked_mean_var` (over ``group``'s ranks when given)
    unless passed in. Masked-out entries are whitened too; callers keep masking them.
    """
    if mean is None or var is None:
        mean, var = masked_mean_var(values, mask, group)
    return (values - mean) * torch.rsqrt(var + eps)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, token_level: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, count)`` whose ratio is the loss; sums and counts add up over
    micro-batches and ranks (Megatron's per-token loss mode divides by the global count):

    - token level: ``loss_sum = sum_{i,t} m_it l_it``, ``count = sum m`` (every token of the
      global batch weighs the same);
    - sequence level: ``loss_sum = sum_i mean_t(l_i)`` over sequences with any token,
      ``count`` = their number (every sequence weighs the same).
    """
    if token_level:
        return masked_sum(per_token, mask), mask.sum()
    per_sequence = masked_mean(per_token, mask, dim=-1)
    has_tokens = (mask.sum(-1) > 0).to(per_token.dtype)
    return (per_sequence * has_tokens).sum(), has_tokens.sum()


# ------------------------------------------------------------------------------------- KL
def kl_estimate(logp, ref_logp, kind: str = "k3", input_clamp: float | None = 20.0,
                output_clamp: float | None = 10.0) -> torch.Tensor:
    """Per-token estimators of KL(π || π_ref) from samples of π (Schulman, "Approximating KL
    divergence"), with NeMo-RL's definitions and clamps::

        logr = clamp(ref_logp - logp, -input_clamp, input_clamp)
        k1 = -logr,    k2 = logr^2 / 2,    k3 = exp(logr) - 1 - logr
        kl = clamp(k, -output_clamp, output_clamp)

    A clamp of ``None`` is not applied.
    """
    if kind not in KL_TYPES:
        raise ValueError(f"kl_type={kind!r}; choose one of {KL_TYPES}")
    logr = ref_logp - logp
    if input_clamp is not None:
        logr = logr.clamp(-input_clamp, input_clamp)
    if kind == "k1":
        kl = -logr
    elif kind == "k2":
        kl = logr.square() / 2
    else:
        kl = torch.exp(logr) - 1 - logr
    if output_clamp is not None:
        kl = kl.clamp(-output_clamp, output_clamp)
    return kl


def sequence_kl_penalty(logp, init_logp, mask, use_absolute_kl: bool = True) -> torch.Tensor:
    """NeMo-Aligner's REINFORCE KL, one value per sequence: the mean over its response tokens of
    ``logp - init_logp`` (``|logp - init_logp|`` with ``use_absolute_kl``)::

        kl_i = mean_t m_it d_it,    d = logp - init_logp  (or |d|)
    """
    diff = logp - init_logp
    if use_absolute_kl:
        diff = diff.abs()
    return masked_mean(diff, mask, dim=-1)


# ----------------------------------------------------------------------------- baselines
def rloo_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """NeMo-Aligner's REINFORCE leave-one-out baseline, ``[B]``.

    Within each group (the samples of one prompt), with ``v`` the valid mask (samples that
    ended properly) and ``M = sum_j v_j``::

        b_i = sum_{j != i} v_j r_j / (M - 1)      when M > 1
        b_i = r_i                                 when M <= 1 (advantage 0: nothing to compare)

    Note ``M - 1`` is the divisor for every sample, valid or not (so a sample that did not
    end is compared with ``sum_valid r / (M - 1)``), exactly as NeMo-Aligner computes it.
    """
    baseline = torch.empty_like(rewards)
    v = valid.to(rewards.dtype)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero().squeeze(1)
        r, m = rewards[idx], v[idx]
        count = m.sum()
        if count <= 1:
            baseline[idx] = r
        else:
            baseline[idx] = ((r * m).sum() - r * m) / (count - 1)
    return baseline


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, leave_one_out: bool = True,
                     normalize: bool = True, valid: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """NeMo-RL's GRPO advantage, ``[B]``.

    Per group, over its valid samples ``V`` (all samples when ``valid`` is None), for a valid
    sample ``i`` the comparison set ``S_i`` is ``V \\ {i}`` (leave-one-out) or ``V``::

        b_i   = mean_{j in S_i} r_j
        std_i = sqrt( sum_{j in S_i} (r_j - b_i)^2 / (|S_i| - 1) )      (0 when |S_i| <= 1)
        A_i   = (r_i - b_i) / (std_i + eps)  if normalize and std_i > 0,  else  r_i - b_i

    A group with at most one valid sample gets ``A = 0``, and so does every invalid sample
    (it is excluded from the statistics and from learning).
    """
    adv = torch.zeros_like(rewards)
    v = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    for g in torch.unique(group_ids):
        idx = ((group_ids == g) & v).nonzero().squeeze(1)
        n = idx.numel()
        if n <= 1:
            continue
        r = rewards[idx]
        # others[i, j] = 1 when sample j is in sample i's comparison set. The variance comes
        # from pairwise differences, sum_{j,l in S} (r_j - r_l)^2 / (2 k (k - 1)) (equal to the
        # Bessel-corrected variance), which is exactly 0 for tied rewards; E[r^2] - E[r]^2 or
        # deviations from a rounded mean leave noise that the division would blow up.
        others = torch.ones(n, n, dtype=r.dtype, device=r.device)
        if leave_one_out:
            others.fill_diagonal_(0)
        k = others.sum(1)
        baseline = (others @ r) / k
        pair_sq = (r.unsqueeze(0) - r.unsqueeze(1)).square()
        var = ((others @ pair_sq) * others).sum(1) / (2 * k * (k - 1)).clamp(min=1)
        std = var.sqrt()
        a = r - baseline
        if normalize:
            a = torch.where(std > 0, a / (std + eps), a)
        adv[idx] = a
    return adv


# ------------------------------------------------------------------------ policy losses
def clipped_surrogate(logp, old_logp, advantages, eps_low: float, eps_high: float | None = None,
                      dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PPO / GRPO clipped surrogate, per token, to be minimized::

        r       = exp(logp - old_logp)
        r_clip  = clip(r, 1 - eps_low, 1 + eps_high)           (eps_high defaults to eps_low)
        loss    = max(-A r, -A r_clip)
        loss    = min(loss, -A c)   where A < 0                 (dual clip, c = dual_clip > 1)

    Returns ``(loss, r, r_clip)``; ``r`` and ``r_clip`` are for the ``ppo_ratio`` metrics.
    """
    if eps_high is None:
        eps_high = eps_low
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"ratio_clip_c={dual_clip}; the dual clip must be > 1 (usually 3)")
    ratio = torch.exp(logp - old_logp)
    ratio_clamped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.max(-advantages * ratio, -advantages * ratio_clamped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -advantages * dual_clip), loss)
    return loss, ratio, ratio_clamped


def reinforce_loss(logp, advantages) -> torch.Tensor:
    """NeMo-Aligner's REINFORCE loss per token (advantage broadcast over the response)::

        l_t = -A logp_t
    """
    return -advantages * logp


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (NeMo-Aligner's), per token.

    Rewards and values are masked first; the value after the last position is 0::

        δ_t = r_t + γ V_{t+1} - V_t,    A_t = δ_t + γ λ A_{t+1},    returns = A + V
    """
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values



# ------------------------------------------------------------------------------------ PPO
def kl_penalty(logp, init_logp, use_absolute_kl: bool = True) -> torch.Tensor:
    """NeMo-Aligner's per-token KL estimate for the PPO reward (``calculate_kl_penalty``)::

        kl_t = logp_t - init_logp_t        (|logp_t - init_logp_t| with use_absolute_kl)
    """
    diff = logp - init_logp
    return diff.abs() if use_absolute_kl else diff


def ppo_token_rewards(rewards, mask, kl=None, penalty: float = 0.0) -> torch.Tensor:
    """NeMo-Aligner's PPO reward per token (``calculate_ppo_rewards``): the sequence reward
    ``r_i`` sits on the last response position of row ``i`` (its last masked entry, the label
    position of the last generated token) and the KL penalty is taken at every position::

        R_it = r_i [t = last_i] - penalty * kl_it

    ``rewards`` ``[B]``, ``mask`` and ``kl`` ``[B, T]``. A row with an empty mask gets its
    reward at position 0, as NeMo-Aligner's ``clamp(min=0)`` does.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.zeros_like(positions)).amax(dim=1)
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = rewards
    if kl is not None and penalty:
        out = out - penalty * kl
    return out


def clipped_value_loss(values, prev_values, returns, clip_val: float) -> torch.Tensor:
    """NeMo-Aligner's critic loss per token (the caller takes the masked mean)::

        v_clip = prev + clip(values - prev, -c, c)
        l_t    = 0.5 * max((values - returns)^2, (v_clip - returns)^2)      (c > 0)
        l_t    = 0.5 * (values - returns)^2                                  (c <= 0: no clip)
    """
    loss = (values - returns).square()
    if clip_val > 0:
        clipped = prev_values + (values - prev_values).clamp(-clip_val, clip_val)
        loss = torch.max(loss, (clipped - returns).square())
    return 0.5 * loss
