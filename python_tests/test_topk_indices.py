"""topk_indices: exact equality with the reference."""

import pytest
import torch
from reference import topk_indices_ref

import std_ext

pytestmark = pytest.mark.std_ops("topk_indices")


def make_scores(shape, dist, gen):
    B, H, S = shape
    if dist == "distinct":
        return torch.randn(B, H, S, generator=gen)
    if dist == "ties":  # a handful of values: almost every score is tied
        return torch.randint(-2, 3, (B, H, S), generator=gen).float()
    x = torch.randn(B, H, S, generator=gen)
    if dist == "nan":
        return x.masked_fill(torch.rand(B, H, S, generator=gen) < 0.3, float("nan"))
    if dist == "ties_nan_inf":  # {-inf, -1, 0, -0.0, 1, inf, nan}
        pool = torch.tensor([-float("inf"), -1.0, 0.0, -0.0, 1.0, float("inf"), float("nan")])
        return pool[torch.randint(0, len(pool), (B, H, S), generator=gen)]
    if dist == "all_nan":
        return torch.full((B, H, S), float("nan"))
    raise ValueError(dist)


def make_candidates(B, S, density, gen):
    if density == "all":
        return torch.ones(B, S, dtype=torch.bool)
    if density == "none":
        return torch.zeros(B, S, dtype=torch.bool)
    p = {"half": 0.5, "few": 3.0 / S}[density]
    cand = torch.rand(B, S, generator=gen) < p
    if B > 1:
        cand[-1] = False  # the last row has no candidates at all
    return cand


K_CHOICES = {"0": lambda S: 0, "1": lambda S: 1, "16": lambda S: 16, "half": lambda S: S // 2, "S": lambda S: S}


def check(scores, cand, k):
    out = std_ext.ops.topk_indices(scores, cand, k)
    ref = topk_indices_ref(scores, cand, k)
    assert out.dtype == torch.int32 and out.device == scores.device and out.shape == ref.shape
    assert torch.equal(out.cpu(), ref), f"first mismatch at {(out.cpu() != ref).nonzero()[:1].tolist()}"


@pytest.mark.parametrize("k", K_CHOICES)
@pytest.mark.parametrize("density", ["all", "half", "few", "none"])
@pytest.mark.parametrize("dist", ["distinct", "ties", "nan", "ties_nan_inf", "all_nan"])
@pytest.mark.parametrize("shape", [(1, 1, 37), (2, 3, 130), (3, 4, 1000)], ids=str)
def test_topk_matches_reference(device, gen, shape, dist, density, k):
    B, H, S = shape
    scores = make_scores(shape, dist, gen).to(device)
    cand = make_candidates(B, S, density, gen).to(device)
    check(scores, cand, K_CHOICES[k](S))


def test_topk_hand_case(device):
    """Ties -> lower position; NaN last; -1 padding; output ascending."""
    nan = float("nan")
    scores = torch.tensor([[[1.0, 3.0, 3.0, nan, 2.0, 3.0, nan, 5.0]]], device=device)
    cand = torch.tensor([[True, True, False, True, True, True, True, True]], device=device)
    assert std_ext.ops.topk_indices(scores, cand, 3).tolist() == [[[1, 5, 7]]]
    assert std_ext.ops.topk_indices(scores, cand, 6).tolist() == [[[0, 1, 3, 4, 5, 7]]]
    assert std_ext.ops.topk_indices(scores, cand, 8).tolist() == [[[0, 1, 3, 4, 5, 6, 7, -1]]]


def test_topk_matches_torch_topk_on_distinct_scores(device, gen):
    """Independent cross-check: no ties, all candidates -> sorted torch.topk indices."""
    scores = torch.randn(2, 3, 300, generator=gen).to(device)
    out = std_ext.ops.topk_indices(scores, torch.ones(2, 300, dtype=torch.bool, device=device), 40)
    assert torch.equal(out.long(), scores.topk(40, dim=-1).indices.sort(dim=-1).values)


def test_topk_reexport(device, gen):
    scores = torch.randn(2, 2, 64, generator=gen).to(device)
    cand = (torch.rand(2, 64, generator=gen) < 0.5).to(device)
    assert std_ext.topk_indices is std_ext.ops.topk_indices
    assert torch.equal(std_ext.topk_indices(scores, cand, 20), torch.ops.std.topk_indices(scores, cand, 20))
    check(scores, cand, 20)
