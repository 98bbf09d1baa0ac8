"""CPU dense_attention / sparse_attention: a verify's rows in the register-tiled kernel.

The CPU kernels compute all Qn x G rows of a KV head against each K/V block together, in
register tiles of up to 4 rows (the last tile of a head takes the 1-3 rows left over), and
dense_attention splits long contexts into 1,024-position tasks spread over the threads.
A row's arithmetic must not depend on any of that: row i of a Qn-query call equals a
single-query call at its position bit for bit, whatever tile the row falls in for either
call, and the result is the same on one thread as on two. Values are checked against the
float64 reference, at head dims that take each tile width and the scalar tail.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FLOAT_DTYPES, assert_attention_output, ints, make_cache, make_indices, make_q
from reference import dense_attention_ref, sparse_attention_ref

import std_ext

pytestmark = pytest.mark.std_ops("dense_attention", "sparse_attention")


def one_thread(fn):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def assert_rows_match_single_queries(op, q, kv_len, *args):
    """Row i of op(q) == op(q[:, i:i+1]) with kv_len - Qn + 1 + i keys, bit for bit."""
    qn = q.shape[1]
    full = op(q, *args, ints(kv_len, "cpu"))
    for i in range(qn):
        one = op(q[:, i : i + 1], *args, ints([n - qn + 1 + i for n in kv_len], "cpu"))
        assert torch.equal(full[:, i : i + 1], one), f"row {i} differs from its single-query call"
    return full


def dense(q, k, v, kv_len):
    return std_ext.ops.dense_attention(q, k, v, kv_len, scale=0.9 * q.shape[-1] ** -0.5)


# (H_kv, G, D): SmolLM2-135M's attention (3 KV heads of 3 query heads, head_dim 64), then
# groups whose Qn = 1 and Qn = 10 row counts end in every remainder tile (1-3 rows), and
# head dims that end in a narrower tile (40, 80, 128 = 24k + 16 / 8) or a scalar tail (68, 36).
SHAPES = [(3, 3, 64), (2, 1, 80), (1, 2, 40), (2, 5, 68), (1, 7, 128), (1, 6, 36)]


@pytest.mark.parametrize("Qn", [10, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_verify_rows_are_decode_rows(gen, dtype, shape, Qn):
    hkv, group, d = shape
    # Past two 1,024-position tasks, one short of a task, and a context shorter than one block.
    kv_len = [2 * 1024 + 77, 1023, Qn + 40]
    q = make_q(len(kv_len), Qn, hkv * group, d, dtype, "cpu", gen)
    k = make_cache(len(kv_len), hkv, max(kv_len) + 5, d, kv_len, dtype, "cpu", gen)
    v = make_cache(len(kv_len), hkv, max(kv_len) + 5, d, kv_len, dtype, "cpu", gen)
    full = assert_rows_match_single_queries(dense, q, kv_len, k, v)
    assert_attention_output(full, q, dense_attention_ref(q, k, v, ints(kv_len, "cpu"), 0.9 * d**-0.5))
    assert torch.equal(full, one_thread(lambda: dense(q, k, v, ints(kv_len, "cpu"))))


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"hkv{s[0]}-g{s[1]}-d{s[2]}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sparse_verify_rows_are_decode_rows(gen, dtype, shape):
    hkv, group, d = shape
    qn, kv_len = 10, [1500, 300]
    tail = [n - qn + 1 - 64 for n in kv_len]  # every single-query call keeps a tail
    q = make_q(len(kv_len), qn, hkv * group, d, dtype, "cpu", gen)
    k = make_cache(len(kv_len), hkv, max(kv_len) + 3, d, kv_len, dtype, "cpu", gen)
    v = make_cache(len(kv_len), hkv, max(kv_len) + 3, d, kv_len, dtype, "cpu", gen)
    idx, ts = make_indices(tail, hkv, 200, gen, "cpu"), ints(tail, "cpu")
    scale = 1.1 * d**-0.5

    def sparse(q, k, v, idx, ts, kv):
        return std_ext.ops.sparse_attention(q, k, v, idx, ts, kv, scale=scale)

    full = assert_rows_match_single_queries(sparse, q, kv_len, k, v, idx, ts)
    assert_attention_output(full, q, sparse_attention_ref(q, k, v, idx, ts, ints(kv_len, "cpu"), scale))


def test_dense_rows_see_exactly_their_prefix(gen):
    """A verify's rows see different numbers of keys in the same last block. A key moved past
    row i's position must not change row i (nor any earlier row), and must change the rows that
    see it: the per-row masks inside a block, checked without tolerances."""
    qn, n, group, d = 10, 200, 3, 64
    q = make_q(1, qn, 3 * group, d, torch.float32, "cpu", gen)
    k = make_cache(1, 3, n, d, [n], torch.float32, "cpu", gen)
    v = make_cache(1, 3, n, d, [n], torch.float32, "cpu", gen)
    base = dense(q, k, v, ints([n], "cpu"))
    for i in (0, 4, 9):
        pos = n - qn + i + 1  # the first key row i does not see
        if pos >= n:
            continue
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos] += 3.0
        v2[:, :, pos] -= 5.0
        out = dense(q, k2, v2, ints([n], "cpu"))
        assert torch.equal(out[:, : i + 1], base[:, : i + 1]), f"rows <= {i} saw position {pos}"
        assert not torch.equal(out[:, i + 1 :], base[:, i + 1 :]), f"rows > {i} ignored position {pos}"


@pytest.mark.skipif(bool(os.environ.get("STD_EXT_CPU_BASELINE")), reason="already the baseline build")
def test_baseline_build_in_a_subprocess():
    """The block primitives' baseline x86-64 build (what a CPU without AVX2 + FMA runs; this
    machine runs the AVX2 one): the tests above again in a process that selects it."""
    env = dict(os.environ, STD_EXT_CPU_BASELINE="1")
    here = Path(__file__).resolve()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(here), "-q", "-x", "-p", "no:cacheprovider",
         "-k", "not baseline and (float32 or bfloat16)"],
        cwd=here.parent, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # ...and the variable did select the other build: it rounds without FMA contraction.
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 10, 9, 64), torch.randn(1, 3, 3000, 64), torch.randn(1, 3, 3000, 64)
    kv_len = ints([3000], "cpu")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "io.pt"
        torch.save((q, k, v, kv_len), path)
        script = (f"import torch, std_ext; q, k, v, n = torch.load({str(path)!r}); "
                  f"torch.save(std_ext.ops.dense_attention(q, k, v, n), {str(path)!r})")
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
        baseline = torch.load(path)
    here_out = std_ext.ops.dense_attention(q, k, v, kv_len)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # this process runs the AVX2 build
        assert not torch.equal(baseline, here_out), "STD_EXT_CPU_BASELINE=1 did not change the build"
    torch.testing.assert_close(baseline, here_out, atol=1e-5, rtol=1e-4)
