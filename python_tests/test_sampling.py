"""Tests for std_ext.sampling: HF-equivalent warping, greedy verification, and exactness of
speculative sampling (chi-square tests against the target distribution, plus a negative
control showing the same test rejects a wrong residual)."""

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import std_ext.sampling as sampling

ALPHA = 1e-3  # chi-square tests of exact samplers must not reject at this level
REJECT = 1e-6  # ... and the negative controls must reject at this one


def chi_square_pvalue(counts, probs) -> float:
    """Pearson chi-square goodness-of-fit p-value of observed counts against probabilities.

    counts, probs: same number of cells (any shape; flattened). probs is normalised here.
    Cells with expected count < 5 are pooled (smallest first, into one cell that reaches 5).
    A count in a cell of probability 0 gives p-value 0. The survival function of chi2 with
    k dof at x is gammaincc(k/2, x/2), computed in float64.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten().cpu()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten().cpu()
    assert counts.shape == probs.shape
    probs = probs / probs.sum()
    if (counts[probs == 0] > 0).any():
        return 0.0
    total = counts.sum()
    keep = probs > 0
    expected = total * probs[keep]
    counts = counts[keep]
    order = torch.argsort(expected)
    expected, counts = expected[order], counts[order]
    n_small = int((expected < 5).sum())
    if n_small:
        cum = expected.cumsum(0)
        m = n_small
        while m < len(expected) and cum[m - 1] < 5:
            m += 1
        expected = torch.cat([expected[:m].sum().view(1), expected[m:]])
        counts = torch.cat([counts[:m].sum().view(1), counts[m:]])
    dof = len(expected) - 1
    if dof < 1:
        return 1.0
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def test_chi_square_pvalue_helper():
    # chi2(1) sf(3.841459) = 0.05; chi2(4) sf(9.487729) = 0.05
    assert chi_square_pvalue([60, 40], [0.5, 0.5]) == pytest.approx(0.0455003, rel=1e-5)  # stat 4, dof 1
    x4 = 9.487729036781154
    e = torch.full((5,), 100.0)  # stat x4 spread over cells: counts 100 + sqrt(x4*100/5)*(+-)
    d = (x4 * 100 / 4) ** 0.5
    counts = e + torch.tensor([d, -d, d, -d, 0.0])
    assert chi_square_pvalue(counts, e) == pytest.approx(0.05, rel=1e-6)
    assert chi_square_pvalue([5, 0], [1.0, 0.0]) == 1.0  # one cell: nothing to test
    assert chi_square_pvalue([5, 1], [1.0, 0.0]) == 0.0  # impossible event observed
    # tiny cells pooled: 3 cells of expected 1 merge into one of 3, then with the next (100) -> 103
    assert chi_square_pvalue([1, 1, 1, 100, 97], [1, 1, 1, 100, 97]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- warp_probs


def hf_probs(logits, temperature, top_k, top_p):
    """transformers' warpers in generate()'s order, then softmax; also the -inf mask."""
    scores = TemperatureLogitsWarper(float(temperature))(None, logits)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1), scores == float("-inf")


def random_logits(seed, rows=48, V=40):
    """Normal logits, plus rows full of ties: small integers, all-equal, and a tie at the top."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, V, generator=g) * 2
    logits[: rows // 4] = torch.randint(-3, 4, (rows // 4, V), generator=g).float()
    logits[rows // 4] = 0.5
    logits[rows // 4 + 1, :3] = logits[rows // 4 + 1].max() + 1  # three tied maxima
    logits[rows // 4 + 2] = torch.randint(0, 2, (V,), generator=g).float() * 3  # two levels
    return logits


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("top_k", [None, 1, 5])
@pytest.mark.parametrize("top_p", [None, 0.5, 0.9])
def test_warp_probs_matches_hf(temperature, top_k, top_p):
    seed = int(temperature * 10) * 100 + (top_k or 0) * 10 + int((top_p or 0) * 10)
    logits = random_logits(seed)
    ref, removed = hf_probs(logits.clone(), temperature, top_k, top_p)
    out = sampling.warp_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(out == 0, removed), "zeros must be exactly where HF gives -inf"
    torch.testing.assert_close(out.sum(-1), torch.ones(logits.shape[0]), rtol=0, atol=1e-5)
    assert not out.isnan().any()


def test_warp_probs_off_values_batch_dims_and_dtypes():
    logits = random_logits(7, rows=24, V=33)
    plain = logits.softmax(-1)
    torch.testing.assert_close(sampling.warp_probs(logits), plain)
    torch.testing.assert_close(sampling.warp_probs(logits, top_k=0, top_p=1.0), plain)
    torch.testing.assert_close(sampling.warp_probs(logits, top_k=1000), plain)  # k > V
    # [..., V]: same as row by row
    out2d = sampling.warp_probs(logits, 0.8, 5, 0.9)
    out3d = sampling.warp_probs(logits.view(4, 6, 33), 0.8, 5, 0.9)
    assert torch.equal(out3d.view(24, 33), out2d)
    # low-precision logits: computed in float32 from the upcast values
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = logits.to(dtype)
        out = sampling.warp_probs(low, 1.5, 5, 0.5)
        assert out.dtype == torch.float32
        ref, removed = hf_probs(low.float(), 1.5, 5, 0.5)
        torch.testing.assert_close(out, ref)
        assert torch.equal(out == 0, removed)
    for bad in ({"temperature": 0.0}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 1.5}, {"top_p": -0.1}):
        with pytest.raises(ValueError):
            sampling.warp_probs(logits, **bad)


# ----------------------------------------------------------------------------- greedy


def test_greedy_tokens():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 0.0, 5.0]])
    assert sampling.greedy_tokens(logits).tolist() == [1, 0]  # first maximum on ties
    x = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    out = sampling.greedy_tokens(x)
    assert out.dtype == torch.long and torch.equal(out, x.argmax(-1))


def greedy_accept_reference(draft_tokens, target_logits):
    y = target_logits.argmax(-1)
    ns, nexts = [], []
    for b in range(draft_tokens.shape[0]):
        n = 0
        while n < draft_tokens.shape[1] and int(draft_tokens[b, n]) == int(y[b, n]):
            n += 1
        ns.append(n)
        nexts.append(int(y[b, n]))
    return torch.tensor(ns), torch.tensor(nexts)


@pytest.mark.parametrize("gamma", [0, 1, 3, 6])
def test_greedy_accept_matches_loop(gamma):
    g = torch.Generator().manual_seed(100 + gamma)
    B, V = 64, 5
    logits = torch.randn(B, gamma + 1, V, generator=g)
    logits[:4] = torch.randint(0, 2, (4, gamma + 1, V), generator=g).float()  # ties
    y = logits.argmax(-1)
    # drafts agreeing with the target on a random prefix, then random
    agree = torch.randint(0, gamma + 1, (B, 1), generator=g)
    noise = torch.randint(0, V, (B, gamma), generator=g)
    draft = torch.where(torch.arange(gamma) < agree, y[:, :gamma], noise)
    if gamma:
        draft[-2] = y[-2, :gamma]  # all accepted
        draft[-1, 0] = (y[-1, 0] + 1) % V  # none accepted
    n, nxt = sampling.greedy_accept(draft, logits)
    n_ref, nxt_ref = greedy_accept_reference(draft, logits)
    assert n.dtype == torch.long and nxt.dtype == torch.long
    assert torch.equal(n, n_ref) and torch.equal(nxt, nxt_ref)
    if gamma:
        assert n[-2] == gamma and nxt[-2] == y[-2, gamma]
        assert n[-1] == 0 and nxt[-1] == y[-1, 0]
    assert {0, gamma} <= set(n.tolist())


def test_greedy_accept_all_and_none():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 4, 9, generator=g)
    y = logits.argmax(-1)
    n, nxt = sampling.greedy_accept(y[:, :3], logits)
    assert (n == 3).all() and torch.equal(nxt, y[:, 3])
    n, nxt = sampling.greedy_accept((y[:, :3] + 1) % 9, logits)
    assert (n == 0).all() and torch.equal(nxt, y[:, 0])


# ----------------------------------------------------------------------------- sample_tokens / residual


def test_sample_tokens_distribution_shape_and_generator():
    g = torch.Generator().manual_seed(11)
    p = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    probs = p.expand(4, 5000, 6)
    tokens = sampling.sample_tokens(probs, g)
    assert tokens.shape == (4, 5000) and tokens.dtype == torch.long
    counts = torch.bincount(tokens.flatten(), minlength=6)
    assert counts[1] == 0 and counts[4] == 0
    pv = chi_square_pvalue(counts, p)
    assert pv > ALPHA, pv
    # unnormalised weights are fine; the generator alone decides the result
    a = sampling.sample_tokens(probs[0] * 7, torch.Generator().manual_seed(3))
    b = sampling.sample_tokens(probs[0] * 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_residual_probs():
    g = torch.Generator().manual_seed(12)
    p = torch.rand(32, 10, generator=g).softmax(-1)
    q = torch.rand(32, 10, generator=g).pow(3).softmax(-1)
    out = sampling.residual_probs(p, q)
    ref = (p - q).clamp_min(0)
    ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out == 0, p <= q)
    torch.testing.assert_close(out.sum(-1), torch.ones(32))
    # fallback: no residual mass -> p itself (exactly), per row
    q[:5] = p[:5]
    out = sampling.residual_probs(p, q)
    assert torch.equal(out[:5], p[:5])
    torch.testing.assert_close(out[5:], ref[5:])
    assert out.dtype == torch.float32
    assert sampling.residual_probs(p.double(), q.double()).dtype == torch.float64
    assert sampling.residual_probs(p.half(), q.half()).dtype == torch.float32


# ----------------------------------------------------------------------------- speculative sampling

V = 6
BOS = V  # context state before the first token
ROWS = 20000


def markov_tables(seed, tv_min=0.3, p_min=0.03):
    """P, Q [V+1, V]: target / draft next-token distributions given the previous token
    (row BOS: the first token). Every row differs by total variation >= tv_min and has all
    probabilities >= p_min (so every cell of the chi-square tests is well populated)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.empty(V + 1, V, dtype=torch.float64)
    Q = torch.empty_like(P)
    for r in range(V + 1):
        while True:
            p = (torch.randn(V, generator=g, dtype=torch.float64) * 1.2).softmax(-1)
            q = (torch.randn(V, generator=g, dtype=torch.float64) * 1.2).softmax(-1)
            if 0.5 * (p - q).abs().sum() >= tv_min and min(p.min(), q.min()) >= p_min:
                break
        P[r], Q[r] = p, q
    return P.float(), Q.float()


def speculative_decode(P, Q, gamma, length, rows, gen):
    """rows independent speculative decodes of a Markov-chain target P with draft Q, run
    round after round (each row from its own last token) until every row has emitted at
    least `length` tokens. Returns the first `length` tokens [rows, length] and the
    acceptance counts of every round."""
    out = torch.full((rows, length), -1, dtype=torch.long)
    emitted_len = torch.zeros(rows, dtype=torch.long)
    ctx = torch.full((rows,), BOS, dtype=torch.long)
    all_n = []
    while (emitted_len < length).any():
        prev, drafts, q_rows, p_rows = ctx, [], [], []
        for _ in range(gamma):
            q = Q[prev]
            d = torch.multinomial(q, 1, generator=gen).squeeze(1)
            drafts.append(d)
            q_rows.append(q)
            p_rows.append(P[prev])
            prev = d
        p_rows.append(P[prev])
        draft_tokens = torch.stack(drafts, 1) if gamma else torch.empty(rows, 0, dtype=torch.long)
        draft_probs = torch.stack(q_rows, 1) if gamma else torch.empty(rows, 0, V)
        n, nxt = sampling.speculative_accept(draft_tokens, draft_probs, torch.stack(p_rows, 1), gen)
        assert n.shape == (rows,) and nxt.shape == (rows,)
        assert n.dtype == torch.long and nxt.dtype == torch.long
        assert ((n >= 0) & (n <= gamma)).all()
        all_n.append(n)
        # emitted this round: d_1 .. d_n, then next_token
        k = torch.arange(gamma + 1)
        tokens = torch.cat([draft_tokens, nxt[:, None]], 1)
        tokens = torch.where(k == n[:, None], nxt[:, None], tokens)
        for k in range(gamma + 1):
            pos = emitted_len + k
            mask = (k <= n) & (pos < length)
            out[mask, pos[mask]] = tokens[mask, k]
        ctx = nxt
        emitted_len += n + 1
    assert (out >= 0).all()
    return out, torch.stack(all_n)


def sequence_probs(P, length):
    """Exact joint target distribution of the first `length` tokens, shape [V] * length."""
    joint = P[BOS].double()
    for _ in range(length - 1):
        last = joint.shape[-1]
        joint = joint.unsqueeze(-1) * P[:last].double().view(*(1,) * (joint.dim() - 1), V, V)
    return joint


def sequence_pvalues(tokens, P):
    """Chi-square p-values of (first token, first two, first three) against the target."""
    pvalues = []
    for L in range(1, tokens.shape[1] + 1):
        flat = torch.zeros(tokens.shape[0], dtype=torch.long)
        for k in range(L):
            flat = flat * V + tokens[:, k]
        counts = torch.bincount(flat, minlength=V**L)
        pvalues.append(chi_square_pvalue(counts, sequence_probs(P, L)))
    return pvalues


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_speculative_sampling_is_exact(gamma):
    P, Q = markov_tables(seed=2024)
    gen = torch.Generator().manual_seed(31 + gamma)
    tokens, n = speculative_decode(P, Q, gamma, length=3, rows=ROWS, gen=gen)
    # the run exercises rejections at every position and the all-accepted bonus path
    assert set(n[0].tolist()) == set(range(gamma + 1))
    p1, p12, p123 = sequence_pvalues(tokens, P)
    print(f"gamma={gamma}: p-values first={p1:.4g} pair={p12:.4g} triple={p123:.4g}")
    assert p1 > ALPHA and p12 > ALPHA and p123 > ALPHA, (p1, p12, p123)


def test_speculative_sampling_negative_control(monkeypatch):
    """Same test with the residual replaced by plain p (q not subtracted): must reject."""
    monkeypatch.setattr(sampling, "residual_probs", lambda target_probs, draft_probs: target_probs)
    P, Q = markov_tables(seed=2024)
    gen = torch.Generator().manual_seed(31 + 2)
    tokens, _ = speculative_decode(P, Q, 2, length=3, rows=ROWS, gen=gen)
    p1, p12, p123 = sequence_pvalues(tokens, P)
    print(f"negative control: p-values first={p1:.4g} pair={p12:.4g} triple={p123:.4g}")
    assert p1 < REJECT and p12 < REJECT and p123 < REJECT, (p1, p12, p123)


def test_speculative_all_accepted_bonus_path():
    """q == p at every drafted position: every draft is accepted; the bonus ~ p_γ."""
    g = torch.Generator().manual_seed(41)
    B, gamma = ROWS, 3
    p_draft = torch.rand(gamma, V, generator=g).softmax(-1)
    p_bonus = torch.tensor([0.3, 0.0, 0.1, 0.25, 0.05, 0.3])
    draft_probs = p_draft.expand(B, gamma, V)
    draft_tokens = torch.multinomial(p_draft.repeat(B, 1), 1, generator=g).view(B, gamma)
    target_probs = torch.cat([p_draft, p_bonus[None]]).expand(B, gamma + 1, V)
    n, nxt = sampling.speculative_accept(draft_tokens, draft_probs, target_probs, g)
    assert (n == gamma).all()
    counts = torch.bincount(nxt, minlength=V)
    assert counts[1] == 0
    pv = chi_square_pvalue(counts, p_bonus)
    assert pv > ALPHA, pv


def test_speculative_rejection_samples_residual():
    """A draft token the target gives probability 0 is always rejected; the correction
    follows norm(max(0, p - q)) (zero wherever p <= q)."""
    g = torch.Generator().manual_seed(43)
    B = ROWS
    p = torch.tensor([0.0, 0.3, 0.2, 0.1, 0.25, 0.15])
    q = torch.tensor([0.4, 0.1, 0.3, 0.05, 0.05, 0.1])
    draft_tokens = torch.zeros(B, 1, dtype=torch.long)  # token 0: q = 0.4, p = 0
    target_probs = torch.stack([p, torch.full((V,), 1.0 / V)]).expand(B, 2, V)
    n, nxt = sampling.speculative_accept(draft_tokens, q.expand(B, 1, V), target_probs, g)
    assert (n == 0).all()
    residual = (p - q).clamp_min(0)
    counts = torch.bincount(nxt, minlength=V)
    assert torch.equal(counts == 0, residual == 0)
    pv = chi_square_pvalue(counts, residual)
    assert pv > ALPHA, pv


def test_speculative_accept_gamma0_determinism_and_low_precision():
    g = torch.Generator().manual_seed(44)
    p = torch.rand(8, 1, V, generator=g).softmax(-1)
    n, nxt = sampling.speculative_accept(torch.empty(8, 0, dtype=torch.long), torch.empty(8, 0, V), p, g)
    assert (n == 0).all() and nxt.shape == (8,)
    P, Q = markov_tables(seed=1)
    d = torch.randint(0, V, (64, 2), generator=g)
    q = Q[torch.cat([torch.full((64, 1), BOS), d[:, :1]], 1)]
    pt = P[torch.cat([torch.full((64, 1), BOS), d], 1)]
    a = sampling.speculative_accept(d, q, pt, torch.Generator().manual_seed(9))
    b = sampling.speculative_accept(d, q, pt, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n, nxt = sampling.speculative_accept(d.int(), q.bfloat16(), pt.half(), g)
    assert n.dtype == torch.long and nxt.dtype == torch.long
    with pytest.raises(ValueError):
        sampling.speculative_accept(d, q[:, :1], pt, g)
    with pytest.raises(ValueError):
        sampling.greedy_accept(d, pt[:, :2])


@pytest.mark.parametrize("penalty", [1.05, 1.5, 0.7])
def test_repetition_penalize_is_bitwise_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 50, generator=gen) * 4
    ids = torch.randint(0, 50, (3, 17), generator=gen)  # repeats included
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    got = sampling.repetition_penalize(logits, seen, penalty)
    assert torch.equal(got, expected)
    assert not torch.equal(got, logits)
