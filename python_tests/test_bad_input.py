"""Every documented argument check: a RuntimeError naming the op and the argument, and
the failing call leaves its inputs unmodified.

Static checks (dtype, device, rank, shapes, heads, k, last-dim stride) run on every
device. Value checks (contents of the int tensors) run on CPU, and on CUDA only when
the environment sets STD_EXT_DEBUG=1. Device mismatches use a "meta" tensor on CPU
(dispatches to the fake kernel) and a CPU tensor on CUDA.
"""

import os

import pytest
import torch
from conftest import assert_raises_naming, work_dtype

B, QN, HQ, HKV, S, D = 2, 3, 4, 2, 16, 64
INT_ARGS = {
    "attention_scores": ["q_pos"],
    "sparse_attention": ["indices", "tail_start", "kv_len"],
    "dense_attention": ["kv_len"],
}


def valid_args(op, device):
    """A valid call of op, as {argument name: value} in schema order."""
    g = torch.Generator().manual_seed(0)
    if op == "topk_indices":
        scores = torch.randn(B, 3, S, generator=g)
        return {"scores": scores.to(device), "candidates": (torch.rand(B, S, generator=g) < 0.5).to(device), "k": 4}
    dtype = work_dtype(device)
    q = torch.randn(B, QN, HQ, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, HKV, S, D, generator=g).to(device, dtype) for _ in range(2))
    ints = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    if op == "attention_scores":
        return {"q": q, "k_cache": k, "q_pos": ints([[3, -1, 9], [0, 15, 15]]), "scale": 0.125}
    if op == "dense_attention":
        return {"q": q, "k_cache": k, "v_cache": v, "kv_len": ints([12, 3]), "scale": 0.125}
    idx = ints([[[1, 4, -1], [0, -1, -1]], [[-1, -1, -1], [-1, -1, -1]]])
    return {"q": q, "k_cache": k, "v_cache": v, "indices": idx, "tail_start": ints([8, 0]),
            "kv_len": ints([12, 3]), "scale": 0.125}


def setter(name, fn):
    def mutate(args):
        args[name] = fn(args[name])
    return mutate


def at(index, value):
    """Int tensor with one element replaced."""
    def fn(t):
        t = t.clone()
        t[index] = value
        return t
    return fn


def strided_last_dim(t):
    """Same values and shape, last-dim stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def all_to(dtype, *names):
    def mutate(args):
        for n in names:
            args[n] = args[n].to(dtype)
    return mutate


def static_cases(op):
    """(id, mutate, names) for the checks that always run. names: 'a|b' = either."""
    if op == "topk_indices":
        return [
            ("scores_float64", setter("scores", lambda t: t.double()), ["scores"]),
            ("scores_float16", setter("scores", lambda t: t.half()), ["scores"]),
            ("candidates_uint8", setter("candidates", lambda t: t.to(torch.uint8)), ["candidates"]),
            ("candidates_int32", setter("candidates", lambda t: t.int()), ["candidates"]),
            ("scores_rank2", setter("scores", lambda t: t[0]), ["scores"]),
            ("candidates_rank1", setter("candidates", lambda t: t[0]), ["candidates"]),
            ("candidates_rank3", setter("candidates", lambda t: t[:, None]), ["candidates"]),
            ("candidates_batch", setter("candidates", lambda t: t[:1]), ["candidates"]),
            ("candidates_length", setter("candidates", lambda t: t[:, :-1]), ["candidates"]),
            ("k_gt_S", setter("k", lambda k: S + 1), ["k"]),
            ("k_negative", setter("k", lambda k: -1), ["k"]),
            ("scores_last_dim_stride", setter("scores", strided_last_dim), ["scores"]),
        ]
    caches = ["k_cache"] if op == "attention_scores" else ["k_cache", "v_cache"]
    cases = [
        ("q_float64", setter("q", lambda t: t.double()), ["q"]),
        ("q_float16", setter("q", lambda t: t.half()), ["q"]),
        ("all_float64", all_to(torch.float64, "q", *caches), ["q|k_cache"]),
        ("k_cache_bfloat16", setter("k_cache", lambda t: t.bfloat16()), ["k_cache"]),
        ("q_rank3", setter("q", lambda t: t[0]), ["q"]),
        ("q_rank5", setter("q", lambda t: t[None]), ["q"]),
        ("k_cache_rank3", setter("k_cache", lambda t: t[0]), ["k_cache"]),
        ("heads_not_multiple", setter("q", lambda t: t[:, :, :3]), ["q", "k_cache"]),
        ("q_batch", setter("q", lambda t: t[:1]), ["q"]),
        ("q_head_dim", setter("q", lambda t: t[..., :32]), ["q"]),
        ("q_last_dim_stride", setter("q", strided_last_dim), ["q"]),
        ("k_cache_last_dim_stride", setter("k_cache", strided_last_dim), ["k_cache"]),
    ]
    if "v_cache" in caches:
        cases += [
            ("v_cache_float16", setter("v_cache", lambda t: t.half()), ["v_cache"]),
            ("v_cache_rank3", setter("v_cache", lambda t: t[0]), ["v_cache"]),
            ("v_cache_batch", setter("v_cache", lambda t: t[:1]), ["v_cache"]),
            ("v_cache_heads", setter("v_cache", lambda t: t[:, :1]), ["v_cache"]),
            ("v_cache_capacity", setter("v_cache", lambda t: t[:, :, :8]), ["v_cache"]),
            ("v_cache_head_dim", setter("v_cache", lambda t: t[..., :32]), ["v_cache"]),
            ("v_cache_last_dim_stride", setter("v_cache", strided_last_dim), ["v_cache"]),
        ]
    for name in INT_ARGS[op]:
        cases += [
            (f"{name}_int64", setter(name, lambda t: t.long()), [name]),
            (f"{name}_float", setter(name, lambda t: t.float()), [name]),
            (f"{name}_rank_plus1", setter(name, lambda t: t[None]), [name]),
            (f"{name}_batch", setter(name, lambda t: t[:1]), [name]),
        ]
    if op == "attention_scores":
        cases.append(("q_pos_length", setter("q_pos", lambda t: t[:, :2]), ["q_pos"]))
    if op == "sparse_attention":
        cases.append(("indices_heads", setter("indices", lambda t: t[:, :1]), ["indices"]))
    return cases


def value_cases(op):
    """(id, mutate, names) for the int-tensor value checks (CPU; CUDA with STD_EXT_DEBUG=1)."""
    if op == "topk_indices":
        return []
    if op == "attention_scores":
        return [
            ("q_pos_eq_S", setter("q_pos", at((1, 0), S)), ["q_pos"]),
            ("q_pos_lt_minus1", setter("q_pos", at((0, 1), -2)), ["q_pos"]),
        ]
    cases = [
        ("kv_len_gt_S", setter("kv_len", at(0, S + 1)), ["kv_len"]),
        ("kv_len_lt_Qn", setter("kv_len", at(1, QN - 1)), ["kv_len"]),
    ]
    if op == "dense_attention":  # (for sparse_attention a negative kv_len also breaks tail_start <= kv_len)
        cases.append(("kv_len_negative", setter("kv_len", at(1, -1)), ["kv_len"]))
    if op == "sparse_attention":  # valid: tail_start [8, 0], kv_len [12, 3], indices[0] = [[1, 4, -1], [0, -1, -1]]
        cases += [
            ("tail_start_gt_kv_len", setter("tail_start", at(1, 4)), ["tail_start"]),
            ("tail_start_negative", setter("tail_start", at(0, -1)), ["tail_start"]),
            ("index_eq_tail_start", setter("indices", at((0, 0, 2), 8)), ["indices"]),
            ("index_past_tail_start", setter("indices", at((0, 0, 2), 10)), ["indices"]),
            ("index_past_capacity", setter("indices", at((0, 1, 1), S + 3)), ["indices"]),
            ("index_with_empty_tail", setter("indices", at((1, 1, 0), 0)), ["indices"]),
            ("indices_descending", setter("indices", at((0, 0, 0), 5)), ["indices"]),
            ("indices_duplicate", setter("indices", at((0, 0, 1), 1)), ["indices"]),
            ("minus1_in_middle", setter("indices", at((0, 1, 2), 5)), ["indices"]),
            ("minus1_first", setter("indices", at((0, 0, 0), -1)), ["indices"]),
        ]
    return cases


OPS = ["attention_scores", "topk_indices", "sparse_attention", "dense_attention"]
STATIC = [pytest.param(op, *c, id=f"{op}-{c[0]}") for op in OPS for c in static_cases(op)]
VALUES = [pytest.param(op, *c, id=f"{op}-{c[0]}") for op in OPS for c in value_cases(op)]


def assert_fails_cleanly(op, args, names):
    before = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"}
    assert_raises_naming(lambda: getattr(torch.ops.std, op)(*args.values()), op, *names)
    for n, t in before.items():
        assert torch.equal(args[n], t), f"failing call modified {n}"


@pytest.mark.parametrize("op, case, mutate, names", STATIC)
def test_static_check(device, op, case, mutate, names):
    args = valid_args(op, device)
    getattr(torch.ops.std, op)(*args.values())  # the unmodified call is valid
    mutate(args)
    assert_fails_cleanly(op, args, names)


@pytest.mark.parametrize("op, case, mutate, names", VALUES)
def test_value_check(device, op, case, mutate, names):
    if device == "cuda" and os.environ.get("STD_EXT_DEBUG") != "1":
        pytest.skip("value checks run on CUDA only with STD_EXT_DEBUG=1 in the environment")
    args = valid_args(op, device)
    getattr(torch.ops.std, op)(*args.values())  # the unmodified call is valid
    mutate(args)
    assert_fails_cleanly(op, args, names)


DEVICE_CASES = [(op, n) for op in OPS for n in (["candidates"] if op == "topk_indices" else
                                               ["q", *INT_ARGS[op]] + ([] if op == "attention_scores" else ["v_cache"]))]


@pytest.mark.parametrize("op, name", DEVICE_CASES, ids=[f"{op}-{n}" for op, n in DEVICE_CASES])
def test_device_mismatch(device, op, name):
    """One argument on another device than k_cache / scores: meta on CPU runs, CPU on CUDA runs."""
    args = valid_args(op, device)
    args[name] = args[name].to("meta" if device == "cpu" else "cpu")
    assert_fails_cleanly(op, args, [name])
