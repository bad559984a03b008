"""Reward-model losses: pure tensor functions, per pair / per sample.

Pairwise (chosen reward ``r_c``, rejected reward ``r_r``, both ``[B]``):

- :func:`bradley_terry_loss`: ``-log σ(r_c - r_r)``, the negative log-likelihood of the
  preference under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022).
- :func:`margin_bt_loss`: ``-log σ(r_c - r_r - m)`` with a per-pair margin ``m >= 0`` that
  grows with the preference strength (Llama 2, Touvron et al. 2023).
- :func:`scaled_bt_loss`: ``-m log σ(r_c - r_r)``: each pair's Bradley-Terry term weighted
  by its preference magnitude ``m`` (HelpSteer2-Preference, Wang et al. 2024).

Regression (SteerLM attribute rating, Dong et al. 2023; HelpSteer):
:func:`regression_loss` gives each sample's sum of squared errors over the attributes that
are labelled, skipping the ones marked ``MISSING_LABEL`` (-100), and how many there were.
"""

import torch
import torch.nn.functional as F

MISSING_LABEL = -100
PAIRWISE_LOSSES = ("bt", "margin_bt", "scaled_bt")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """``-log σ(r_c - r_r)`` per pair, ``[B]``."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def margin_bt_loss(chosen_rewards, rejected_rewards, margin) -> torch.Tensor:
    """``-log σ(r_c - r_r - m)`` per pair, ``[B]``; ``margin`` is ``[B]`` (or a scalar)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def scaled_bt_loss(chosen_rewards, rejected_rewards, magnitude) -> torch.Tensor:
    """``-m log σ(r_c - r_r)`` per pair, ``[B]``; ``magnitude`` is ``[B]`` (or a scalar)."""
    return -magnitude * F.logsigmoid(chosen_rewards - rejected_rewards)


def pairwise_reward_loss(loss_type: str, chosen_rewards, rejected_rewards, margin=None) -> torch.Tensor:
    """Dispatch by name (``bt``, ``margin_bt``, ``scaled_bt``); ``margin`` feeds the last two."""
    if loss_type == "bt":
        return bradley_terry_loss(chosen_rewards, rejected_rewards)
    if loss_type not in PAIRWISE_LOSSES:
        raise ValueError(f"reward loss {loss_type!r} is unknown; choose one of {PAIRWISE_LOSSES}")
    if margin is None:
        raise ValueError(f"reward loss {loss_type!r} needs a per-pair margin")
    if loss_type == "margin_bt":
        return margin_bt_loss(chosen_rewards, rejected_rewards, margin)
    return scaled_bt_loss(chosen_rewards, rejected_rewards, margin)


def regression_loss(predictions: torch.Tensor, labels: torch.Tensor, missing_value: float = MISSING_LABEL):
    """Masked squared error over attributes.

        present_{ia} = [labels_{ia} != missing_value]
        sse_i        = sum_a present_{ia} (pred_{ia} - labels_{ia})²
        n_i          = sum_a present_{ia}

    ``predictions`` and ``labels`` are ``[B, A]``. Returns ``(sse [B], n [B])``; the mean
    squared error over a batch is ``sse.sum() / n.sum()``, which is how the trainer
    normalizes (over the whole global batch, independent of the parallel layout).
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    present = labels != missing_value
    diff = torch.where(present, predictions - labels.to(predictions.dtype), torch.zeros_like(predictions))
    return (diff**2).sum(dim=-1), present.sum(dim=-1)
