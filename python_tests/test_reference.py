"""Sanity checks of the float64 references themselves (hand cases and independent
vectorized formulations), so that the kernel tests compare against something right."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_indices
from reference import attention_scores_ref, dense_attention_ref, sparse_attention_ref, topk_indices_ref


def rand_inputs(B, Qn, Hq, Hkv, S, D, gen):
    q = torch.randn(B, Qn, Hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
    return q, k, v


def masked_sdpa(q, k, v, allowed, scale):
    """allowed [B, Hkv, Qn, S] bool -> SDPA in float64 with GQA by repeating KV heads;
    rows with nothing allowed are zero."""
    G = q.shape[2] // k.shape[1]
    mask = allowed.repeat_interleave(G, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
        attn_mask=torch.where(mask, 0.0, -math.inf).double(), scale=scale,
    )
    return torch.nan_to_num(out.transpose(1, 2) * mask.any(-1).transpose(1, 2)[..., None], nan=0.0)


def test_dense_ref_matches_masked_sdpa(gen):
    q, k, v = rand_inputs(3, 5, 6, 2, 40, 16, gen)
    kv_len = torch.tensor([5, 40, 17])
    pos = kv_len[:, None] - 5 + torch.arange(5)  # [B, Qn]
    allowed = (torch.arange(40)[None, None, :] <= pos[..., None])[:, None].expand(3, 2, 5, 40)
    torch.testing.assert_close(dense_attention_ref(q, k, v, kv_len, 0.3), masked_sdpa(q, k, v, allowed, 0.3))


def test_sparse_ref_matches_masked_sdpa(gen):
    B, Qn, Hkv, S = 3, 4, 2, 50
    q, k, v = rand_inputs(B, Qn, 8, Hkv, S, 16, gen)
    kv_len, tail = torch.tensor([50, 4, 30]), [20, 4, 28]
    idx = make_indices(tail, Hkv, 12, gen, "cpu")
    idx[2, 0] = -1  # a head with no kept positions
    allowed = torch.zeros(B, Hkv, Qn, S, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for i in range(Qn):
                allowed[b, h, i, [s for s in idx[b, h].tolist() if s >= 0]] = True
                allowed[b, h, i, tail[b] : int(kv_len[b]) - Qn + i + 1] = True
    ref = sparse_attention_ref(q, k, v, idx, torch.tensor(tail), kv_len, 0.25)
    torch.testing.assert_close(ref, masked_sdpa(q, k, v, allowed, 0.25))
    assert not ref[2, :2, :4].any()  # KV head 0 of seq 2 kept nothing; queries 0-1 precede the tail

def test_sparse_ref_reduces_to_dense(gen):
    q, k, v = rand_inputs(2, 3, 4, 2, 30, 8, gen)
    kv_len = torch.tensor([30, 11])
    dense = dense_attention_ref(q, k, v, kv_len, 0.5)
    all_below = torch.tensor([[list(range(20))] * 2, [list(range(8)) + [-1] * 12] * 2])
    torch.testing.assert_close(sparse_attention_ref(q, k, v, all_below, torch.tensor([20, 8]), kv_len, 0.5), dense)
    none = torch.full((2, 2, 5), -1)
    torch.testing.assert_close(sparse_attention_ref(q, k, v, none, torch.tensor([0, 0]), kv_len, 0.5), dense)


def test_attention_scores_ref_hand_case():
    # one head, D = 1, scale 1, q = 1: logits = keys = [0, log 3] -> softmax over 2 keys = [1/4, 3/4]
    q = torch.ones(1, 3, 1, 1)
    k = torch.tensor([0.0, math.log(3.0), 7.0, 7.0]).view(1, 1, 4, 1)
    out = attention_scores_ref(q, k, torch.tensor([[0, -1, 1]]), 1.0)
    torch.testing.assert_close(out, torch.tensor([[[(1 + 0.25) / 2, 0.75 / 2, 0.0, 0.0]]], dtype=torch.float64))
    assert not attention_scores_ref(q, k, torch.tensor([[-1, -1, -1]]), 1.0).any()


def test_attention_scores_ref_matches_vectorized(gen):
    B, T, Hq, Hkv, S, D = 2, 5, 6, 2, 25, 8
    q, k, _ = rand_inputs(B, T, Hq, Hkv, S, D, gen)
    q_pos = torch.tensor([[3, -1, 24, 0, 10], [-1, -1, 7, 7, -1]])
    G = Hq // Hkv
    logits = 0.4 * torch.einsum("bthd,bhsd->bhts", q, k.repeat_interleave(G, 1))  # [B, Hq, T, S]
    seen = torch.arange(S)[None, None, :] <= q_pos[..., None]  # [B, T, S]
    probs = torch.softmax(logits.masked_fill(~seen[:, None], -math.inf), -1)
    probs = probs.nan_to_num(0.0) * (q_pos >= 0)[:, None, :, None]  # padding rows were all -inf
    expect = probs.view(B, Hkv, G, T, S).sum((2, 3)) / ((q_pos >= 0).sum(1) * G)[:, None, None]
    torch.testing.assert_close(attention_scores_ref(q, k, q_pos, 0.4), expect)


def topk_by_stable_sorts(scores, candidates, k):
    """Independent formulation: successive stable sorts (last key sorted last is primary)."""
    B, H, S = scores.shape
    out = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            x = scores[b, h].double()
            order = torch.arange(S)
            for key, desc in ((x.nan_to_num(nan=-math.inf), True), (x.isnan().int(), False),
                              ((~candidates[b]).int(), False)):
                order = order[torch.sort(key[order], descending=desc, stable=True).indices]
            n = min(k, int(candidates[b].sum()))
            out[b, h, :n] = order[:n].sort().values.int()
    return out


@pytest.mark.parametrize("k", [0, 1, 5, 40, 64])
def test_topk_ref_matches_stable_sorts(gen, k):
    pool = torch.tensor([-math.inf, -1.0, 0.0, -0.0, 2.0, math.inf, math.nan, 0.5])
    scores = pool[torch.randint(0, 8, (3, 2, 64), generator=gen)]
    scores[0, 0] = torch.randn(64, generator=gen)
    candidates = torch.rand(3, 64, generator=gen) < torch.tensor([[0.9], [0.3], [0.0]])
    assert torch.equal(topk_indices_ref(scores, candidates, k), topk_by_stable_sorts(scores, candidates, k))


def test_topk_ref_hand_case():
    nan = float("nan")
    scores = torch.tensor([[[1.0, 3.0, 3.0, nan, 2.0, 3.0, nan, 5.0]]])
    cand = torch.tensor([[True, True, False, True, True, True, True, True]])
    assert topk_indices_ref(scores, cand, 3).tolist() == [[[1, 5, 7]]]
    assert topk_indices_ref(scores, cand, 8).tolist() == [[[0, 1, 3, 4, 5, 6, 7, -1]]]
    assert topk_indices_ref(scores, cand, 0).shape == (1, 1, 0)
