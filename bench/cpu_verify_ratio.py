"""The CPU verify's cost in decode steps: dense_attention at Qn = γ+1 over Qn = 1, interleaved.

    python bench/cpu_verify_ratio.py                          # SmolLM2 shapes, 8K keys, fp32 + bf16
    python bench/cpu_verify_ratio.py --contexts 1024,8192 --qn 10 --reps 31 --threads 2

Shapes default to SmolLM2-135M's attention (9 query heads, 3 KV heads, head_dim 64), batch 1,
a cache with spare capacity. Each repetition times one Qn = 1 call and one Qn = γ+1 call back to
back (order alternating), so load on a shared machine hits both alike; the report gives the
median of the per-repetition ratios beside the median times (wall time, or with ``--clock cpu`` the process's CPU time: on a loaded
machine that is the steadier measure of one thread's work). Each call is a batch of
``--inner`` calls, so that timer overhead stays negligible.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import std_ext


def time_call(fn, inner: int, clock=time.perf_counter) -> float:
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / inner


def measure(ctx: int, dtype: torch.dtype, qn: int, args) -> dict:
    g = torch.Generator().manual_seed(ctx * 131 + qn)
    cap = ctx + 256
    k = torch.randn(1, args.kv_heads, cap, args.head_dim, generator=g).to(dtype)
    v = torch.randn(1, args.kv_heads, cap, args.head_dim, generator=g).to(dtype)
    kv_len = torch.full((1,), ctx, dtype=torch.int32)
    scale = args.head_dim ** -0.5

    def query(n):  # HF's [B, H, Q, D], passed as the [B, Q, H, D] view
        return torch.randn(1, args.heads, n, args.head_dim, generator=g).to(dtype).transpose(1, 2)

    q1, qv = query(1), query(qn)
    one = lambda: std_ext.dense_attention(q1, k, v, kv_len, scale)  # noqa: E731
    many = lambda: std_ext.dense_attention(qv, k, v, kv_len, scale)  # noqa: E731
    for _ in range(3):
        one(), many()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t1, tn, ratios = [], [], []
    for rep in range(args.reps):
        if rep % 2:
            b, a = time_call(many, args.inner, clock), time_call(one, args.inner, clock)
        else:
            a, b = time_call(one, args.inner, clock), time_call(many, args.inner, clock)
        t1.append(a), tn.append(b), ratios.append(b / a)
    return dict(one=statistics.median(t1), many=statistics.median(tn), ratio=statistics.median(ratios))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="8192")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--qn", type=int, default=10, help="γ + 1 of the verify (default 10)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time, steadier on a loaded machine with --threads 1 "
                        "(with more threads it adds up their time, spinning included)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"dense_attention, {args.heads} query / {args.kv_heads} KV heads, head_dim {args.head_dim}, "
          f"{torch.get_num_threads()} threads, {args.reps} interleaved repetitions x {args.inner} calls, "
          f"{args.clock} time")
    for dtype_name in args.dtypes.split(","):
        for ctx in (int(c) for c in args.contexts.split(",")):
            r = measure(ctx, getattr(torch, dtype_name), args.qn, args)
            print(f"{dtype_name:<9} ctx {ctx:>6}: Qn=1 {r['one'] * 1e3:7.3f} ms, Qn={args.qn} {r['many'] * 1e3:7.3f} ms, "
                  f"Qn={args.qn} / Qn=1 = {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
