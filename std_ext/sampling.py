"""Token selection and verification for speculative decoding (pure torch).

Everything here works on CPU and CUDA tensors and is vectorised over the batch; no
function reads a tensor value on the host (no ``.item()``, no data-dependent Python
control flow), so none of them synchronises with the device. Randomness comes only from
the ``generator`` argument (``None``: torch's default generator for the device).

- :func:`warp_probs`: logits -> sampling distribution (temperature, top-k, top-p), as in
  Hugging Face ``transformers``.
- :func:`greedy_tokens`, :func:`sample_tokens`: pick one token per row.
- :func:`greedy_accept`: verify a draft against the target's argmax tokens.
- :func:`speculative_accept`: lossless speculative sampling (Leviathan et al. 2023,
  Chen et al. 2023), with :func:`residual_probs` as the rejection distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "warp_probs",
    "greedy_tokens",
    "sample_tokens",
    "greedy_accept",
    "residual_probs",
    "speculative_accept",
]


def _compute_float(x: Tensor) -> Tensor:
    """x as float32, or float64 if it already is float64."""
    return x if x.dtype == torch.float64 else x.float()


def warp_probs(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Sampling probabilities from logits: temperature, then top-k, then top-p, then softmax.

    Same result as ``transformers``' ``TemperatureLogitsWarper -> TopKLogitsWarper ->
    TopPLogitsWarper`` (``min_tokens_to_keep=1``) followed by a softmax, computed the same
    way, so ties are resolved the same: top-k keeps every token tied with the k-th largest
    logit; top-p drops the tokens in the same (ascending ``torch.sort``) order as HF.

    Parameters
    ----------
    logits : Tensor [..., V]
        Any floating dtype; computed in float32.
    temperature : float
        > 0. Logits are divided by it.
    top_k : int or None
        Keep the ``top_k`` largest logits (ties with the k-th included); ``None`` or 0: off.
    top_p : float or None
        In [0, 1]. Keep the smallest set of largest tokens whose probability reaches
        ``top_p`` (at least one token); ``None`` or 1.0: off.

    Returns
    -------
    Tensor [..., V], float32
        Rows sum to 1; exactly 0 for the filtered tokens.
    """
    if not temperature > 0:
        raise ValueError(f"warp_probs: temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"warp_probs: top_k must be >= 0 or None, got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"warp_probs: top_p must be in [0, 1] or None, got {top_p}")
    if logits.dim() < 1 or logits.size(-1) == 0:
        raise ValueError(f"warp_probs: logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")

    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, scores.size(-1))
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - top_p)
        sorted_remove[..., -1:] = False  # min_tokens_to_keep = 1: the largest stays
        remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def repetition_penalize(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """``transformers``' repetition penalty: every token already in the sequence has its logit
    divided by ``penalty`` when positive, multiplied when negative.

    Computed elementwise in float32 exactly as ``RepetitionPenaltyLogitsProcessor`` does
    on ``generate``'s float32 logits, so the result is bit-identical.

    Parameters
    ----------
    logits : Tensor [..., V]
    seen : Tensor [..., V], bool
        Whether each token occurs in the sequence so far (prompt, padding included, and
        every token after it).
    penalty : float
        > 0; 1.0 changes nothing.

    Returns
    -------
    Tensor [..., V], float32
    """
    scores = logits.float()
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def greedy_tokens(logits: Tensor) -> Tensor:
    """Greedy choice: the index of the largest logit (first one on ties).

    Parameters
    ----------
    logits : Tensor [..., V]

    Returns
    -------
    Tensor [...], long
    """
    return logits.argmax(dim=-1)


def sample_tokens(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row, drawn from ``probs`` (need not be normalised).

    Uses the exponential-race form ``argmax(probs / E)``, ``E ~ Exp(1)`` i.i.d. (what
    ``torch.multinomial`` does for one sample), which is exact and never picks a token
    of probability 0 in a row with positive mass.

    Parameters
    ----------
    probs : Tensor [..., V]
        Non-negative weights.
    generator : torch.Generator or None
        On ``probs``' device.

    Returns
    -------
    Tensor [...], long
    """
    weights = _compute_float(probs)
    race = torch.empty_like(weights).exponential_(1.0, generator=generator)
    race.clamp_min_(torch.finfo(race.dtype).tiny)  # E == 0 would turn p == 0 into 0/0 = NaN
    return (weights / race).argmax(dim=-1)


def greedy_accept(draft_tokens: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification: accept the longest draft prefix that matches the target's argmax.

    Parameters
    ----------
    draft_tokens : Tensor [B, γ], integer
    target_logits : Tensor [B, γ+1, V]
        Target logits at the γ drafted positions and one past them.

    Returns
    -------
    n : Tensor [B], long
        Number of accepted draft tokens, in [0, γ].
    next_token : Tensor [B], long
        ``argmax(target_logits[b, n_b])``: the correction, or the bonus token if n_b == γ.
    """
    if draft_tokens.dim() != 2 or target_logits.dim() != 3:
        raise ValueError("greedy_accept: expected draft_tokens [B, γ] and target_logits [B, γ+1, V]")
    B, gamma = draft_tokens.shape
    if target_logits.shape[:2] != (B, gamma + 1):
        raise ValueError(
            f"greedy_accept: target_logits {tuple(target_logits.shape)} does not match draft_tokens "
            f"{tuple(draft_tokens.shape)} (need [B, γ+1, V])"
        )
    y = target_logits.argmax(dim=-1)  # [B, γ+1]
    match = draft_tokens.long() == y[:, :gamma]
    n = match.long().cumprod(dim=1).sum(dim=1)
    next_token = y.gather(1, n.unsqueeze(1)).squeeze(1)
    return n, next_token


def residual_probs(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """Rejection distribution of speculative sampling: ``norm(max(0, p - q))``.

    Where the residual has no mass (``p <= q`` everywhere, i.e. ``p == q``), the row is
    ``p`` itself.

    Parameters
    ----------
    target_probs : Tensor [..., V]
        p.
    draft_probs : Tensor [..., V]
        q (broadcastable with p).

    Returns
    -------
    Tensor [..., V], float32 (float64 if an input is float64)
    """
    p = _compute_float(target_probs)
    q = _compute_float(draft_probs)
    residual = (p - q).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    has_mass = mass > 0
    normalised = residual / torch.where(has_mass, mass, torch.ones_like(mass))
    return torch.where(has_mass, normalised, p.expand_as(normalised))


def speculative_accept(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling: verify a sampled draft so the output follows the target exactly.

    Draft j is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))`` (tested as
    ``u * q < p``, ``u ~ U[0, 1)``); n is the number of leading acceptances. If n < γ the
    next token is drawn from ``residual_probs(p_n, q_n)``, otherwise (all accepted) from
    ``p_γ``. The tokens emitted, ``d_1..d_n`` then ``next_token``, are distributed as if
    sampled from the target one by one.

    Parameters
    ----------
    draft_tokens : Tensor [B, γ], integer
        Drafts, ``d_j`` sampled from ``draft_probs[:, j]``.
    draft_probs : Tensor [B, γ, V]
        q: the draft model's distributions the drafts were sampled from.
    target_probs : Tensor [B, γ+1, V]
        p: the target's distributions at the drafted positions and one past them.
    generator : torch.Generator or None
        On the tensors' device.

    Returns
    -------
    n : Tensor [B], long
        Accepted draft tokens, in [0, γ].
    next_token : Tensor [B], long
        Residual sample (n < γ) or bonus sample from ``p_γ`` (n == γ).
    """
    if draft_tokens.dim() != 2 or draft_probs.dim() != 3 or target_probs.dim() != 3:
        raise ValueError(
            "speculative_accept: expected draft_tokens [B, γ], draft_probs [B, γ, V], target_probs [B, γ+1, V]"
        )
    B, gamma = draft_tokens.shape
    V = target_probs.size(-1)
    if draft_probs.shape != (B, gamma, V) or target_probs.shape[:2] != (B, gamma + 1):
        raise ValueError(
            f"speculative_accept: shapes do not match: draft_tokens {tuple(draft_tokens.shape)}, "
            f"draft_probs {tuple(draft_probs.shape)}, target_probs {tuple(target_probs.shape)}"
        )
    p_all = _compute_float(target_probs)
    if gamma == 0:
        return (
            torch.zeros(B, dtype=torch.long, device=p_all.device),
            sample_tokens(p_all[:, 0], generator),
        )
    q_all = _compute_float(draft_probs)

    d = draft_tokens.long().unsqueeze(-1)  # [B, γ, 1]
    p_d = p_all[:, :gamma].gather(-1, d).squeeze(-1)  # [B, γ]
    q_d = q_all.gather(-1, d).squeeze(-1)
    u = torch.rand(B, gamma, dtype=p_d.dtype, device=p_d.device, generator=generator)
    accepted = u * q_d < p_d
    n = accepted.long().cumprod(dim=1).sum(dim=1)  # [B]

    rows = n.view(B, 1, 1).expand(B, 1, V)
    p_n = p_all.gather(1, rows).squeeze(1)  # [B, V]
    q_n = q_all.gather(1, rows.clamp(max=gamma - 1)).squeeze(1)  # unused where n == γ
    # A module global, looked up at call time: replacing std_ext.sampling.residual_probs
    # (as the tests do) changes what this uses.
    residual = residual_probs(p_n, q_n)
    next_probs = torch.where((n == gamma).unsqueeze(1), p_n, residual)
    return n, sample_tokens(next_probs, generator)
