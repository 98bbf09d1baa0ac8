"""The CPU emulator of the SIMT machine (csrc/emulator/) checked on its own small kernels
(csrc/emulator/self_test.cpp, behind torch.ops.std_emulated.emu_self_test): the fragment
layouts of mma.m16n8k16 and ldmatrix against float64 and the PTX ISA's rules, cp.async
delivered only at its wait_group, shared-memory poison, faults reported with their source
line (never a hang), launch limits, occupancy, the schedules and the dependent launch.
Then a first smoke test of an emulated op against the float64 reference.

Builds the emulated library on first use (python_tests/emulated_cuda.py, about 2 minutes
on 2 cores, then cached in build/emulated/).
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from emulated_cuda import load_emulated_ops
from reference import dense_attention_ref

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ops():
    return load_emulated_ops()


@pytest.fixture
def schedule(monkeypatch):
    def set_schedule(value):
        monkeypatch.setenv("STD_EXT_EMULATOR_SCHEDULE", value)

    return set_schedule


def run(ops, name, *inputs):
    return ops.emu_self_test(name, list(inputs) or [torch.zeros(1)])


def bits(t):
    return t.contiguous().view(torch.int16)


# ----------------------------------------------------------------------------- mma / ldmatrix


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_matches_float64_matmul(ops, dtype):
    """c + a.b through the documented fragment layouts: any swapped register, row or
    column of the emulator's mma would show here."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        a = torch.randn(16, 16, generator=gen).to(dtype)
        b = torch.randn(16, 8, generator=gen).to(dtype)
        c = torch.randn(16, 8, generator=gen)
        (d,) = run(ops, "mma_bf16" if dtype == torch.bfloat16 else "mma_f16", bits(a), bits(b), c)
        expected = c.double() + a.double() @ b.double()
        # 16 exact products summed in fp32: a few ulps of the largest partial sum
        torch.testing.assert_close(d.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item() + 1e-6)


def expected_ldmatrix(matrices, trans):
    """The PTX ISA rule: register m of lane l holds row l/4 of matrix m, elements 2(l%4)
    and +1 (transposed: column l/4, rows 2(l%4) and +1), low half first."""
    m16 = matrices.view(4, 8, 8).to(torch.int64) & 0xFFFF
    out = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for m in range(4):
            mat = m16[m].T if trans else m16[m]
            lo, hi = mat[g, 2 * t], mat[g, 2 * t + 1]
            out[lane, m] = lo | (hi << 16)
    return out


@pytest.mark.parametrize("name", ["ldmatrix", "ldmatrix_trans"])
def test_ldmatrix_x4_layout(ops, name):
    matrices = torch.arange(256, dtype=torch.int16) * 7 + 3
    (regs,) = run(ops, name, matrices)
    got = regs.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, expected_ldmatrix(matrices, name.endswith("trans")))


# ----------------------------------------------------------------------------- cp.async


def test_cp_async_data_arrives_only_at_its_wait_group(ops):
    src = torch.arange(1, 11, dtype=torch.float32)
    (snap,) = run(ops, "cp_async", src)
    # [0:4] group 0 (16 B), [4:8] group 1, [8:12] group 1 zero-fill, [12:14] group 2 (8 B)
    assert snap[0].isnan().all(), "nothing may arrive before a wait"
    assert torch.equal(snap[1, :4], src[:4]) and snap[1, 4:].isnan().all(), "wait_group 2 retires group 0 only"
    assert torch.equal(snap[2, 4:8], src[4:8]) and torch.equal(snap[2, 8:12], torch.zeros(4))
    assert snap[2, 12:].isnan().all(), "wait_group 1 leaves the newest group in flight"
    assert torch.equal(snap[3, 12:14], src[8:10])


# ----------------------------------------------------------------------------- shared memory


def test_shared_memory_is_poisoned_at_every_block_start(ops, schedule):
    for value in ("forward", "reverse"):
        schedule(value)
        (words,) = run(ops, "poison")
        # every block (blocks reuse a worker's memory) sees 0xFFFFFFFF, dynamic and static
        assert (words == -1).all(), words


def test_write_past_dynamic_shared_memory_is_reported(ops):
    with pytest.raises(RuntimeError, match=r"write past the end of the 1000 bytes of dynamic shared memory"):
        run(ops, "smem_overrun")


# ----------------------------------------------------------------------------- faults


def source_line(marker):
    """Line number of the first line of self_test.cpp containing `marker`."""
    lines = (HERE.parent / "csrc" / "emulator" / "self_test.cpp").read_text().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if marker in line)


def test_lane_skipping_a_shuffle_is_a_deadlock_with_its_line(ops):
    line = source_line("line of the deadlock")
    with pytest.raises(RuntimeError) as info:
        run(ops, "skipped_shuffle")
    message = str(info.value)
    assert "deadlock" in message and "skipped_shuffle_kernel" in message
    assert f"__shfl_xor_sync (self_test.cpp:{line}) waiting for lanes 5" in message
    assert re.search(r"lanes 5 at __syncthreads \(self_test\.cpp:\d+\)", message)


def test_barrier_in_divergent_code_is_reported(ops):
    line = source_line("line of the fault")
    with pytest.raises(RuntimeError) as info:
        run(ops, "divergent_barrier")
    message = str(info.value)
    assert "exits while 64 threads wait at __syncthreads" in message
    assert f"self_test.cpp:{line}" in message and "divergent_barrier_kernel" in message


def test_mask_mismatch_is_reported(ops, schedule):
    line = source_line("__shfl_sync(mask, lane")
    for value in ("forward", "reverse"):
        schedule(value)
        # forward: the two masks meet; reverse: lanes 16-31 finish their (valid) shuffle
        # and exit first, and lanes 0-15 then wait for exited lanes
        expected = "while lanes .* with mask 0xffffffff" if value == "forward" else "waits for lanes 16[-0-9]* that have exited"
        with pytest.raises(RuntimeError, match=rf"__shfl_sync with mask 0x[0-9a-f]{{8}} {expected} at self_test\.cpp:{line}"):
            run(ops, "mask_mismatch")


def test_ops_work_again_after_a_fault(ops):
    with pytest.raises(RuntimeError):
        run(ops, "skipped_shuffle")
    (d,) = run(ops, "order")
    assert sorted(d.tolist()) == list(range(64)) + list(range(100, 164))


@pytest.mark.parametrize("value", ["forward", "reverse", "warp", "random:3"])
def test_activemask_answers_the_converged_lanes(ops, schedule, value):
    schedule(value)
    (answers,) = run(ops, "activemask")
    # 40 positions over 32 lanes: lanes 0-7 run a second round alone
    assert answers.tolist() == [0xFF] * 8 + [-1] * 24


# ----------------------------------------------------------------------------- launches


def test_dynamic_shared_memory_over_48_kb_needs_the_opt_in(ops):
    errors, out = run(ops, "big_smem")
    invalid_value = 1
    assert errors.tolist() == [invalid_value, 0, invalid_value]
    assert out.item() == 1  # the opted-in launch ran


def test_occupancy_from_the_h100_limits(ops):
    configs = torch.tensor([[128, 101376], [128, 68864], [128, 50000], [1024, 0], [32, 0], [256, 0]])
    (blocks,) = run(ops, "occupancy", configs)
    # smem: (dyn + 1 KB reserved) rounded to 128 B against 228 KB; threads: 2048; regs:
    # 64 a thread (the documented default) against 65536; at most 32 blocks
    assert blocks[0].tolist() == [0, 0, 0, 1, 32, 4]  # without the opt-in nothing over 48 KB fits
    assert blocks[1].tolist() == [2, 3, 4, 1, 32, 4]


# ----------------------------------------------------------------------------- schedules


def order(ops):
    (o,) = run(ops, "order")
    return o.tolist()


def test_schedules_order_threads_as_documented(ops, schedule):
    schedule("forward")
    forward = order(ops)
    assert [x for x in forward if x < 100] == list(range(64))
    schedule("reverse")
    assert [x for x in order(ops) if x < 100] == list(range(63, -1, -1))
    schedule("warp")
    warp = order(ops)
    # warp 0 runs (both phases) until it is done before warp 1 starts
    first_warp1 = next(i for i, x in enumerate(warp) if x % 100 >= 32)
    assert sorted(warp[:first_warp1]) == list(range(32)) + list(range(100, 132))
    schedule("random:1")
    random1 = order(ops)
    assert random1 == order(ops), "a seed gives one order"
    schedule("random:2")
    assert random1 != order(ops) and random1 != forward
    schedule("bogus")
    with pytest.raises(RuntimeError, match="STD_EXT_EMULATOR_SCHEDULE must be"):
        order(ops)


# ----------------------------------------------------------------------------- dependent launch


def test_dependent_launch_starts_before_its_primary(ops):
    """arch 90 (the default): the dependent grid's first blocks run before the primary;
    with griddepcontrol.wait they see its writes, without it they do not."""
    (seen,) = run(ops, "dependent")
    assert (seen == 1).all()
    (seen,) = run(ops, "dependent_no_wait")
    assert (seen[:32] != 1).all(), "block 0 ran before the primary wrote"


def test_arch_80_serializes_the_dependent_launch():
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import torch\nfrom emulated_cuda import load_emulated_ops\n"
        "(seen,) = load_emulated_ops().emu_self_test('dependent_no_wait', [torch.zeros(1)])\n"
        "assert (seen == 1).all(), seen\n"
    ) % str(HERE)
    env = dict(os.environ, STD_EXT_EMULATOR_ARCH="80")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=HERE, timeout=600)


# ----------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_len", [1, 4])
def test_emulated_dense_attention_smoke(ops, dtype, head_dim, q_len):
    gen = torch.Generator().manual_seed(head_dim + q_len)
    B, H_kv, G, S = 2, 2, 4, 300
    q = torch.randn(B, q_len, H_kv * G, head_dim, generator=gen).to(dtype)
    k = torch.randn(B, H_kv, S, head_dim, generator=gen).to(dtype)
    v = torch.randn(B, H_kv, S, head_dim, generator=gen).to(dtype)
    kv_len = torch.tensor([S, 137], dtype=torch.int32)
    start = time.perf_counter()
    out = ops.dense_attention(q, k, v, kv_len, head_dim**-0.5)
    elapsed = time.perf_counter() - start
    ref = dense_attention_ref(q, k, v, kv_len, head_dim**-0.5)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    assert elapsed < 2.0, f"an emulated decode call took {elapsed:.2f} s"
