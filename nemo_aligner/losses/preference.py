"""Preference-optimization losses (the DPO family and KTO): pure tensor functions.

Notation, per pair ``i`` (chosen ``c``, rejected ``r``), with log-probs that are sums (or
per-token means, the caller's choice) over each response's tokens:

    Δπ   = log π(y_c|x) - log π(y_r|x)                 (policy log-ratio)
    Δref = log π_ref(y_c|x) - log π_ref(y_r|x)         (reference log-ratio)
    h    = Δπ - Δref                                   (log-ratio margin)
    m    = β h                                         (implicit reward margin)
    g    = η (r*_c - r*_r)                             (ground-truth reward margin, η = gt_reward_scale)

Paired losses (``loss_type`` of :func:`preference_loss`), each ``[B]``:

- ``dpo``: ``-(1-ε) log σ(m) - ε log σ(-m)``; ``ε = label_smoothing`` (0 gives plain DPO).
  Rafailov et al. 2023, "Direct Preference Optimization"; the ε term is the "conservative
  DPO" of Mitchell 2023.
- ``ipo``: ``(h - 1/(2β))²``. Azar et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences" (β plays the role of the paper's τ).
- ``hinge``: ``max(0, 1 - m)``. Zhao et al. 2023, "SLiC-HF" (the calibration loss with the
  reference log-ratio subtracted, as in the DPO paper's comparison).
- ``simpo``: ``-log σ(β Δπ - γ)``, reference-free, meant for per-token mean log-probs;
  ``γ = simpo_gamma``. Meng et al. 2024, "SimPO". The reference log-probs are ignored.
- ``rpo_sq``: ``(m - g)²``. Nemotron-4 340B technical report (NVIDIA 2024), "Reward-aware
  Preference Optimization" with the squared distance.
- ``rpo_bwd_kl``: ``KL(Bern(σ(g)) || Bern(σ(m)))
  = σ(g)(log σ(g) - log σ(m)) + σ(-g)(log σ(-g) - log σ(-m))``, KL(target || model): the
  distance of the Nemotron-4 report, fitting the model's preference probability σ(m) to the
  target σ(g). NeMo-Aligner's name and definition.
- ``rpo_fwd_kl``: ``KL(Bern(σ(m)) || Bern(σ(g)))
  = σ(m)(log σ(m) - log σ(g)) + σ(-m)(log σ(-m) - log σ(-g))``, KL(model || target)
  (NeMo-Aligner's ``rpo_fwd_kl``).

  (Before 2026-12 these two names were the other way round here; configs written for this
  toolkit before then that name ``rpo_fwd_kl`` now get the other loss. NeMo-Aligner configs
  carry over unchanged.)
- ``scale``: ``|r*_c - r*_r| · (-log σ(m))``: the DPO loss of each pair weighted by its
  ground-truth reward margin (NeMo-Aligner's ``scale``; its code multiplies the margins by the
  batch-mean DPO loss, an operator-precedence slip; the per-pair product is what it means).

Unpaired: :func:`kto_loss` (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization").

Every function works in the dtype of its inputs (float64 for ``gradcheck``) and uses
``logsigmoid`` so extreme margins neither overflow nor lose their gradient.
"""

import torch
import torch.nn.functional as F

PAIRED_LOSSES = ("dpo", "ipo", "hinge", "simpo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "scale")
GT_REWARD_LOSSES = ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "scale")
REFERENCE_FREE_LOSSES = ("simpo",)


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(σ(logit_p)) || Bern(σ(logit_q)))``, computed from log-sigmoids (stable)."""
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_type: str,
    beta: float,
    chosen_gt_rewards: torch.Tensor | None = None,
    rejected_gt_rewards: torch.Tensor | None = None,
    gt_reward_scale: float = 1.0,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss ``[B]`` of ``loss_type`` (see the module docstring for the formulas).

    All log-prob arguments are ``[B]``. The reference log-probs may be ``None`` only for the
    reference-free ``simpo``; the ground-truth rewards are required by the ``rpo_*`` losses and
    ``scale``.
    """
    if loss_type not in PAIRED_LOSSES:
        raise ValueError(f"preference loss {loss_type!r} is unknown; choose one of {PAIRED_LOSSES}")
    if beta <= 0:
        raise ValueError(f"beta (model.dpo.ref_policy_kl_penalty) must be > 0, got {beta}")
    policy_margin = policy_chosen_logps - policy_rejected_logps
    if loss_type == "simpo":
        return -F.logsigmoid(beta * policy_margin - simpo_gamma)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss {loss_type!r} needs reference log-probs")
    h = policy_margin - (ref_chosen_logps - ref_rejected_logps)
    m = beta * h
    if loss_type == "dpo":
        loss = -F.logsigmoid(m)
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-m)
        return loss
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1.0 - m)
    if chosen_gt_rewards is None or rejected_gt_rewards is None:
        raise ValueError(f"loss {loss_type!r} needs chosen_gt_rewards and rejected_gt_rewards")
    if loss_type == "scale":
        return (chosen_gt_rewards - rejected_gt_rewards).to(m.dtype).abs() * -F.logsigmoid(m)
    g = gt_reward_scale * (chosen_gt_rewards - rejected_gt_rewards).to(m.dtype)
    if loss_type == "rpo_sq":
        return (m - g) ** 2
    if loss_type == "rpo_bwd_kl":  # KL(target || model)
        return _bernoulli_kl(g, m)
    return _bernoulli_kl(m, g)  # rpo_fwd_kl: KL(model || target)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, weights=None) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean_j [log π(y'_j|x_j) - log π_ref(y'_j|x_j)])``.

    ``y'_j`` is a response that does not belong to prompt ``x_j`` (a mismatched pair), so the
    mean estimates ``KL(π || π_ref)`` without a separate sample. The result is detached: the
    paper treats the reference point as a constant, not something to optimize. ``weights``
    (0/1, ``[B]``) leaves out padding samples; with no weight the estimate is 0.
    """
    diff = (policy_kl_logps - ref_kl_logps).detach()
    if weights is None:
        weights = torch.ones_like(diff)
    total = (diff * weights).sum()
    count = weights.sum()
    mean = total / count.clamp(min=1)
    return mean.clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_estimate: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample KTO loss ``[B]`` (Ethayarajh et al. 2024):

        r   = log π(y|x) - log π_ref(y|x)
        v   = λ_D σ(β (r - z0))   if y is desirable
              λ_U σ(β (z0 - r))   if y is undesirable
        L   = λ_y - v

    ``desirable`` is a boolean (or 0/1) tensor ``[B]``; ``kl_estimate`` is ``z0`` (see
    :func:`kto_kl_estimate`), a constant.
    """
    if beta <= 0:
        raise ValueError(f"beta (model.kto.ref_policy_kl_penalty) must be > 0, got {beta}")
    desirable = desirable.bool()
    z = beta * (policy_logps - ref_logps - kl_estimate)
    loss_desirable = desirable_weight * (1.0 - torch.sigmoid(z))
    loss_undesirable = undesirable_weight * (1.0 - torch.sigmoid(-z))
    return torch.where(desirable, loss_desirable, loss_undesirable)
