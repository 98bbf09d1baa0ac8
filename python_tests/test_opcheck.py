"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) of the wrappers."""

import pytest
import torch
from conftest import ints, make_cache, make_indices, make_q, work_dtype

import std_ext

DT = [torch.float32, torch.bfloat16, torch.float16]


def attention_args(op, dtype, strided, device, gen):
    """Ragged B=2, GQA 7 (strided) or B=1, GQA 1 (contiguous) inputs for op."""
    kv_len, S, G, D, Qn = ([45, 10], 50, 7, 64, 4) if strided else ([9], 9, 1, 128, 9)
    q = make_q(len(kv_len), Qn, 2 * G, D, dtype, device, gen, strided)
    k = make_cache(len(kv_len), 2, S, D, kv_len, dtype, device, gen, strided)
    v = make_cache(len(kv_len), 2, S, D, kv_len, dtype, device, gen, strided)
    kv = ints(kv_len, device)
    if op == "dense_attention":
        return (q, k, v, kv, 0.2)
    if op == "sparse_attention":
        tail = [n - 2 for n in kv_len]
        return (q, k, v, make_indices(tail, 2, 6, gen, device), ints(tail, device), kv, 0.2)
    q_pos = [[n - Qn + i if (b + i) % 3 else -1 for i in range(Qn)] for b, n in enumerate(kv_len)]
    return (q, k, ints(q_pos, device), 0.2)


@pytest.mark.parametrize("strided", [True, False], ids=["strided", "contiguous"])
@pytest.mark.parametrize("dtype", DT, ids=str)
@pytest.mark.parametrize("op", ["attention_scores", "sparse_attention", "dense_attention"])
def test_opcheck_attention_ops(device, gen, op, dtype, strided):
    torch.library.opcheck(getattr(torch.ops.std, op).default, attention_args(op, dtype, strided, device, gen))


@pytest.mark.std_ops("topk_indices")
@pytest.mark.parametrize("k", [0, 5, 40])
def test_opcheck_topk(device, gen, k):
    scores = torch.randint(0, 3, (2, 3, 40), generator=gen).float()
    scores[0, 1, ::4] = float("nan")
    cand = torch.rand(2, 40, generator=gen) < 0.5
    torch.library.opcheck(torch.ops.std.topk_indices.default, (scores.to(device), cand.to(device), k))


def pipeline(q_obs, q_pos, q, k_cache, v_cache, candidates, tail_start, kv_len):
    scores = std_ext.ops.attention_scores(q_obs, k_cache, q_pos)
    keep = std_ext.ops.topk_indices(scores, candidates, 8)
    draft = std_ext.ops.sparse_attention(q, k_cache, v_cache, keep, tail_start, kv_len)
    verify = std_ext.ops.dense_attention(q, k_cache, v_cache, kv_len, scale=0.1)
    return scores, keep, draft, verify


def test_compile_fullgraph_matches_eager(device, gen):
    """Prefill score -> keep set -> draft -> verify, compiled with aot_eager and fullgraph."""
    kv_len, S, Qn = [40, 27], 48, 3
    prompt = [30, 20]  # candidates (the "visual" span) lie below the tail start = prompt length
    dtype = work_dtype(device)
    q_obs = make_q(2, 4, 8, 64, dtype, device, gen)
    q_pos = ints([[p - 4 + i for i in range(4)] for p in prompt], device)
    q = make_q(2, Qn, 8, 64, dtype, device, gen)
    k = make_cache(2, 2, S, 64, kv_len, dtype, device, gen)
    v = make_cache(2, 2, S, 64, kv_len, dtype, device, gen)
    cand = (torch.arange(S)[None] < torch.tensor(prompt)[:, None]) & (torch.arange(S) % 3 != 0)
    args = (q_obs, q_pos, q, k, v, cand.to(device), ints(prompt, device), ints(kv_len, device))
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    for kv in (kv_len, [33, 22]):  # new kv_len values, same shapes
        args = args[:-1] + (ints(kv, device),)
        for got, want in zip(compiled(*args), pipeline(*args)):
            assert torch.equal(got, want)
