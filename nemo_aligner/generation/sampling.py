"""Choosing the next token from a batch of next-token logits.

Pure tensor functions (no model): the same code serves every engine that produces logits.
Each row draws its randomness from its own ``torch.Generator`` -- one uniform number per
generated token, used to invert the cumulative distribution in vocabulary order; a row's
numbers for a whole response are drawn at once (:func:`row_uniforms`), the ``t``-th for its
``t``-th token -- so a sample's tokens depend on its own seed and logits only, never on the
other rows.

Order of the logit transforms (the usual one): min-length masking of end tokens,
temperature, top-k, top-p. For row ``r`` with processed candidate logits ``z`` (see
:func:`candidates`: sorted by probability when filtered, the vocabulary in id order when not):

    logprob_r          = log softmax(raw logits)[token]          (the model's distribution)
    sampling_logprob_r = log softmax(z)[token]                    (what was sampled from)
    token              = min{j : sum_{i<=j} softmax(z)_i > u_r}  (u_r ~ U[0, 1) from row r's generator)
"""

import torch

from nemo_aligner.generation.engine import SamplingParams

NEG_INF = float("-inf")


def mask_end_tokens(logits: torch.Tensor, rows: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` [B, V] where ``end_ids`` cannot be chosen in the rows flagged by
    ``rows`` [B] bool (responses shorter than ``min_new_tokens``)."""
    masked = logits.clone()
    masked[rows.nonzero().squeeze(1).unsqueeze(1), end_ids.unsqueeze(0)] = NEG_INF
    return masked


def candidates(z: torch.Tensor, top_k: int, top_p: float, temperature: float = 1.0):
    """The tokens that may be drawn: ``(logits / temperature [B, C], ids [B, C] or None)``.

    With top-k and/or top-p the candidates are sorted by logit, most probable first
    (``torch.topk`` keeps exactly ``k``; ties at the k-th value are broken by its order),
    and top-p then masks the tail to ``-inf``; so top-k + top-p sorts ``k`` values, not the
    vocabulary. Without either, the candidates are the whole vocabulary in id order
    (``ids`` is ``None``). Dividing by a positive temperature keeps the order, so it is
    applied to the kept values only: the numbers of cutting ``z / temperature`` (the same
    candidates, but for a tie that the division's rounding could create at the cut).
    """
    if 0 < top_k < z.shape[-1]:
        values, ids = torch.topk(z, top_k, dim=-1)
    elif top_p < 1.0:
        values, ids = torch.sort(z, dim=-1, descending=True)
    else:
        values, ids = z, None
    if temperature != 1.0:
        values = values / temperature
    if ids is not None and top_p < 1.0:
        values = nucleus(values, top_p)
    return values, ids


def nucleus(sorted_z: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p on logits sorted in descending order: keep the smallest prefix whose
    probability reaches ``p`` (a token is dropped when the tokens before it already hold
    ``>= p``; the first token always stays)."""
    probs = torch.softmax(sorted_z, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    return sorted_z.masked_fill(mass_before >= p, NEG_INF)


# From this vocabulary size on, :func:`first_argmax` reduces in two stages on CPU: torch's
# CPU argmax over a row is a scalar loop (16 x 32000 logits: ~640 us, against ~40 us for a
# vectorized max), while a few small kernels cost ~60 us whatever the size. (On GPUs the
# one-kernel argmax is the fast one.)
_TWO_STAGE_ARGMAX = 8192
_ARGMAX_CHUNK = 128


def first_argmax(z: torch.Tensor) -> torch.Tensor:
    """``z.argmax(dim=-1)`` for ``z`` [B, V] (the first index of each row's maximum), from
    vectorized maxima: each chunk of 128 logits' maximum, the first chunk holding the row's
    maximum, the first maximum inside it; the tail past the last whole chunk counts only when
    strictly larger (an earlier equal maximum comes first)."""
    b, v = z.shape
    if v < _TWO_STAGE_ARGMAX or z.device.type != "cpu":
        return z.argmax(dim=-1)
    n = v // _ARGMAX_CHUNK
    main = z[:, : n * _ARGMAX_CHUNK].reshape(b, n, _ARGMAX_CHUNK)
    chunk_max = main.amax(dim=-1)  # [B, n]
    chunk = chunk_max.argmax(dim=-1)
    rows = torch.arange(b, device=z.device)
    index = chunk * _ARGMAX_CHUNK + main[rows, chunk].argmax(dim=-1)
    if n * _ARGMAX_CHUNK < v:
        tail_max, tail_index = z[:, n * _ARGMAX_CHUNK:].max(dim=-1)
        index = torch.where(tail_max > chunk_max[rows, chunk], tail_index + n * _ARGMAX_CHUNK, index)
    return index


def row_uniforms(generators: list[torch.Generator], steps: int) -> torch.Tensor:
    """``[B, steps]`` ``U[0, 1)`` draws (float64): row ``r`` from ``generators[r]`` alone.

    Drawn once per batch instead of one ``torch.rand`` call per row and token (16 calls and
    a concatenation per step at batch 16, about a tenth of a sampling step's token choice)."""
    return torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in generators])


def inverse_cdf_sample(logq: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [B]: the first index whose cumulative probability exceeds ``u``.

    Tokens with zero probability are never chosen (their cumulative sum equals their
    predecessor's, which was already larger than ``u``).
    """
    cdf = logq.double().exp().cumsum(dim=-1)
    threshold = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, threshold, right=True).squeeze(1)
    return tokens.clamp_(max=logq.shape[-1] - 1)


def choose_next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    u: torch.Tensor | None,
    end_banned: torch.Tensor | None = None,
    end_ids: torch.Tensor | None = None,
):
    """Pick one token per row of ``logits`` [B, V] (float32, real vocabulary only).

    ``u`` [B] float64: each row's uniform draw for this token (from :func:`row_uniforms`;
    ``None`` when greedy). ``end_banned`` [B] bool marks rows where ``end_ids`` must not be
    chosen yet (``min_new_tokens``). Returns ``(tokens [B] long, logprobs [B],
    sampling_logprobs [B])``; see the module docstring for the two log-probabilities.
    """
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    z = logits
    if end_banned is not None and end_ids is not None and end_ids.numel() and bool(end_banned.any()):
        z = mask_end_tokens(z, end_banned, end_ids)
    if params.greedy:
        tokens = first_argmax(z)
        sampling_logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    else:
        values, ids = candidates(z, params.top_k, params.top_p, params.temperature)
        logq = torch.log_softmax(values, dim=-1)
        picked = inverse_cdf_sample(logq, u)
        sampling_logprobs = logq.gather(1, picked.unsqueeze(1)).squeeze(1)
        tokens = picked if ids is None else ids.gather(1, picked.unsqueeze(1)).squeeze(1)
    logprobs = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs, sampling_logprobs
