"""topk_indices' CUDA kernel: bitwise equal to the CPU kernel (the definition) on the CPU
copies. Two backends (the conftest `kernels` fixture): "cuda" on a GPU (skips without one),
and "emulated", the same kernel and glue run by the CPU emulator of the SIMT machine, at
small shapes (rows of 17.5K-27K instead of 64K-256K, still split over several blocks) and on a
subset of the big grids.

Covers both launch shapes of the CUDA kernel: one block per row (many or short rows) and
several blocks per row (few rows of 16K+ positions, e.g. 112 rows x 128K; see
plan_topk_indices), rows whose length (and whose last slice) ends inside a warp, the early
exits of the radix selection (at most k candidates; a digit bin holding exactly what is
still needed) and the tie rules (equal scores and -0.0/+0.0 to the lower position, NaN
below -inf). The conftest autouse fixture fills fresh outputs with poison, so a slot the
kernel forgets to write fails the comparison.
"""

import pytest
import torch
from conftest import requires_cuda
from reference import topk_indices_ref

pytestmark = pytest.mark.std_ops("topk_indices")

NAN, INF = float("nan"), float("inf")
# S from 1 to 256K: short rows, a row one past the 4096 short-row block size, and rows
# long enough to be split over several blocks. On the emulator the long rows are shorter
# but still split (plan_topk_indices, 132 SMs): 20001 = two slices of 10240 / 9761 positions;
# 17508 = two slices of 9216 / 8292 (512 threads x 8 per round: the last round of the second
# slice stops inside a warp, lane 4 of warp 3); 27000 = three slices (the last stops inside
# warp 11).
LENGTHS = (1, 2, 7, 1000, 4097, 65536, 262144)
EMULATED_LONG = 20001
EMULATED_LONG_SPLIT_WARP = 17508
EMULATED_THREE_SLICES = 27000
KS = (1, 17, 1024, 4096)
DISTS = ("random", "ties", "all_equal", "signed_zeros", "nan_inf")
MASKS = ("all", "holes", "sparse")


def make_scores(shape, dist, gen):
    if dist == "random":
        return torch.randn(*shape, generator=gen)
    if dist == "ties":  # 8 values: huge tie groups straddle the k-th place
        return torch.randint(0, 8, shape, generator=gen).float()
    if dist == "all_equal":
        return torch.full(shape, 0.25)
    if dist == "signed_zeros":  # -0.0 == +0.0 for the CPU kernel: a tie, lower position wins
        zeros = torch.where(torch.rand(*shape, generator=gen) < 0.5, 0.0, -0.0)
        return torch.where(torch.rand(*shape, generator=gen) < 0.1, torch.randn(*shape, generator=gen), zeros)
    if dist == "nan_inf":  # NaN ranks below -inf; denormals are distinct from zero
        pool = torch.tensor([NAN, -INF, INF, -1.0, 0.0, -0.0, 1.0, 1e-45, -1e-45, 3.0])
        x = pool[torch.randint(0, len(pool), shape, generator=gen)]
        return torch.where(torch.rand(*shape, generator=gen) < 0.3, torch.randn(*shape, generator=gen), x)
    raise ValueError(dist)


def make_candidates(B, S, kind, gen):
    if kind == "all":
        return torch.ones(B, S, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(B, S, dtype=torch.bool)
    p = {"holes": 0.7, "sparse": min(1.0, 5.0 / S)}[kind]
    cand = torch.rand(B, S, generator=gen) < p
    if B > 1:
        cand[-1] = False  # a row with no candidates at all: k slots of -1
    return cand


def long_row(kernels, S):
    """A GPU length, or on the emulator the shorter length that still takes several blocks."""
    return kernels.pick(cuda=S, emulated=min(S, EMULATED_LONG))


def assert_matches_cpu(kernels, scores, cand, k):
    """The backend's output equals the CPU kernel's (and, for small inputs, the float64
    reference.topk_indices_ref's) bit for bit. Returns it."""
    out = kernels.ops.topk_indices(scores, cand, k)
    ref = torch.ops.std.topk_indices(scores.cpu(), cand.cpu(), k)
    B, H, _ = scores.shape
    assert out.device == scores.device and out.dtype == torch.int32 and out.shape == (B, H, k)
    assert out.is_contiguous()
    got = out.cpu()
    if not torch.equal(got, ref):
        where = (got != ref).nonzero()[0].tolist()
        b, h, _ = where
        raise AssertionError(
            f"first mismatch at {where}: {kernels.name} row {got[b, h, :12].tolist()}... cpu row {ref[b, h, :12].tolist()}..."
        )
    if scores.numel() <= 6000:
        assert torch.equal(got, topk_indices_ref(scores, cand, k)), "the CPU kernel and reference.py disagree"
    return out


def k_values(S):
    return sorted({k for k in KS if k <= S} | {S})


@pytest.mark.emulator_subset(S=(1, 2, 7, 1000, 4097, 65536))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("S", LENGTHS)
def test_matches_cpu(kernels, gen, S, dist, mask):
    """Emulated: S 65536 runs as 20001 (two slices per row)."""
    B, H, S = 2, 3, long_row(kernels, S)
    scores = make_scores((B, H, S), dist, gen).to(kernels.device)
    cand = make_candidates(B, S, mask, gen).to(kernels.device)
    for k in k_values(S):
        assert_matches_cpu(kernels, scores, cand, k)


@pytest.mark.parametrize("S", (7, 4097, 65536))
def test_fewer_candidates_than_k(kernels, gen, S):
    """k > #candidates: every candidate ascending, then -1; an all-False row is all -1
    (emulated: S 65536 runs as 17508, two slices, the last round inside a warp)."""
    B, H, S = 3, 2, kernels.pick(cuda=S, emulated=min(S, EMULATED_LONG_SPLIT_WARP))
    scores = make_scores((B, H, S), "random", gen).to(kernels.device)
    cand = torch.zeros(B, S, dtype=torch.bool)
    cand[0, torch.randperm(S, generator=gen)[: max(1, S // 3)]] = True
    cand[1, -1] = True  # one candidate, at the last position
    cand = cand.to(kernels.device)
    for k in sorted({S // 2 + 1, S}):
        out = assert_matches_cpu(kernels, scores, cand, k)
        assert (out[2] == -1).all()


@pytest.mark.parametrize("mask", ("all", "none"))
def test_k_equals_candidates(kernels, gen, mask):
    S = 4097
    scores = make_scores((2, 3, S), "ties", gen).to(kernels.device)
    cand = make_candidates(2, S, mask, gen).to(kernels.device)
    out = assert_matches_cpu(kernels, scores, cand, S)
    expected = torch.arange(S, dtype=torch.int32) if mask == "all" else torch.full((S,), -1, dtype=torch.int32)
    assert torch.equal(out.cpu(), expected.expand(2, 3, S))


@pytest.mark.parametrize("S", (1, 1000, 65536))
def test_k_zero(kernels, gen, S):
    S = long_row(kernels, S)
    scores = make_scores((2, 3, S), "random", gen).to(kernels.device)
    cand = make_candidates(2, S, "holes", gen).to(kernels.device)
    out = kernels.ops.topk_indices(scores, cand, 0)
    assert out.shape == (2, 3, 0) and out.dtype == torch.int32 and out.device == scores.device


@pytest.mark.emulator_subset(B=(1, 2))
@pytest.mark.parametrize("dist", ("random", "ties"))
@pytest.mark.parametrize("B,H", [(1, 1), (2, 3), (28, 4)], ids=lambda v: str(v))
def test_row_shapes_long(kernels, gen, B, H, dist):
    """112 rows x 128K with k = 1024 (the multi-block split at its intended size), and fewer
    rows; emulated: rows of 27000 (three slices, the last ending inside a warp)."""
    S = kernels.pick(cuda=131072, emulated=EMULATED_THREE_SLICES)
    scores = make_scores((B, H, S), dist, gen).to(kernels.device)
    cand = make_candidates(B, S, "holes", gen).to(kernels.device)
    assert_matches_cpu(kernels, scores, cand, 1024)


def test_many_long_rows_one_block_each(kernels, gen):
    """Enough rows that each gets one block (emulated: rows too short to split), with rows
    far longer than a block's chunk (1024 threads x 8 positions; emulated: the second round
    stops inside warp 31)."""
    B, H, S = kernels.pick(cuda=(75, 4, 40000), emulated=(2, 3, 9192))
    scores = make_scores((B, H, S), "random", gen).to(kernels.device)
    cand = make_candidates(B, S, "holes", gen).to(kernels.device)
    for k in (17, 4096):
        assert_matches_cpu(kernels, scores, cand, k)


def test_thousands_of_short_rows(kernels, gen):
    B, H, S = kernels.pick(cuda=(64, 64, 1000), emulated=(8, 64, 1000))
    scores = make_scores((B, H, S), "ties", gen).to(kernels.device)
    cand = make_candidates(B, S, "holes", gen).to(kernels.device)
    for k in (1, 17, 999):
        assert_matches_cpu(kernels, scores, cand, k)


@pytest.mark.parametrize("S", (1000, 65536))
def test_noncontiguous_scores(kernels, gen, S):
    """Views: a head slice of a bigger tensor with a start offset in the last dim (so the
    row is not 16-byte aligned), and a heads-major buffer transposed to [B, H, S]."""
    B, H, S = 2, 3, long_row(kernels, S)
    big = torch.full((B, H + 2, S + 5), NAN)
    big[:, 1 : 1 + H, 3 : 3 + S] = make_scores((B, H, S), "ties", gen)
    sliced = big.to(kernels.device)[:, 1 : 1 + H, 3 : 3 + S]
    heads_major = make_scores((H, B, S), "random", gen).to(kernels.device).transpose(0, 1)
    cand = make_candidates(B, S, "holes", gen).to(kernels.device)
    for scores in (sliced, heads_major):
        assert not scores.is_contiguous()
        for k in (17, min(S, 1024)):
            assert_matches_cpu(kernels, scores, cand, k)


def test_noncontiguous_candidates(kernels, gen):
    S = 5000
    scores = make_scores((2, 3, S), "random", gen).to(kernels.device)
    cand = make_candidates(S, 2, "holes", gen).to(kernels.device).t()  # [2, S] view of an [S, 2] tensor
    assert not cand.is_contiguous()
    assert_matches_cpu(kernels, scores, cand, 100)


def test_hand_case(kernels):
    """Ties -> lower position; NaN last; -0.0 ties +0.0; -1 padding; output ascending."""
    scores = torch.tensor([[[1.0, 3.0, 3.0, NAN, -0.0, 3.0, NAN, 5.0, 0.0]]], device=kernels.device)
    cand = torch.tensor([[True, True, False, True, True, True, True, True, True]], device=kernels.device)
    topk = kernels.ops.topk_indices
    assert topk(scores, cand, 3).tolist() == [[[1, 5, 7]]]
    assert topk(scores, cand, 5).tolist() == [[[0, 1, 4, 5, 7]]]
    assert topk(scores, cand, 6).tolist() == [[[0, 1, 4, 5, 7, 8]]]
    assert topk(scores, cand, 9).tolist() == [[[0, 1, 3, 4, 5, 6, 7, 8, -1]]]


@requires_cuda
def test_current_stream_and_graph_capture(gen):
    """The op runs on the current stream and, with no host sync, can be captured in a graph."""
    B, H, S, k = 2, 3, 65536, 1024
    scores = make_scores((B, H, S), "random", gen).cuda()
    cand = make_candidates(B, S, "holes", gen).cuda()
    expected = torch.ops.std.topk_indices(scores.cpu(), cand.cpu(), k)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = torch.ops.std.topk_indices(scores, cand, k)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(warm.cpu(), expected)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.std.topk_indices(scores, cand, k)
    new_scores = make_scores((B, H, S), "ties", gen)
    scores.copy_(new_scores)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.cpu(), torch.ops.std.topk_indices(new_scores, cand.cpu(), k))


def test_matches_torch_topk_on_distinct_scores(kernels, gen):
    """Independent cross-check at the multi-block size (emulated: 27000, three slices): no
    ties, all candidates."""
    S = kernels.pick(cuda=131072, emulated=EMULATED_THREE_SLICES)
    scores = torch.randn(4, 2, S, generator=gen).to(kernels.device)
    out = kernels.ops.topk_indices(scores, torch.ones(4, S, dtype=torch.bool, device=kernels.device), 4096)
    assert torch.equal(out.long(), scores.topk(4096, dim=-1).indices.sort(dim=-1).values)
