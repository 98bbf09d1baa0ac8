"""StD sampling on a real (tiny) model emits the target model's distribution.

Many copies of one prompt are sampled in one batch; the empirical distribution of the
first three emitted tokens (the prefill's token, then tokens from accepted drafts,
residual samples and bonus samples) is compared by a chi-square test with the exact
distribution computed from dense forwards of the same model.
"""


import pytest
import torch

import std_ext
import std_ext.sampling
from test_sampling import chi_square_pvalue
from tiny_models import make_inputs, make_model

ROWS = 3000
WARP = dict(temperature=1.5, top_k=4)  # support of 4 tokens per step: 64 sequences of 3


@pytest.fixture(scope="module")
def setting():
    model = make_model("qwen2", seed=3)
    inputs = make_inputs(model, "qwen2", [48], seed=11)
    candidates = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    candidates[:, 4:40] = True  # budget 0: the draft sees 12 of 48 prompt tokens
    return model, inputs, candidates


@torch.no_grad()
def exact_joint(model, prompt: torch.Tensor) -> dict[tuple, float]:
    """P(x1, x2, x3) under the dense model with the same warping."""
    def next_probs(prefixes):
        ids = torch.cat([prompt.expand(len(prefixes), -1), torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), -1)], 1)
        return std_ext.sampling.warp_probs(model(input_ids=ids).logits[:, -1], **WARP)

    joint = {(): 1.0}
    for _ in range(3):
        prefixes = list(joint)
        probs = next_probs(prefixes)
        joint = {
            prefix + (token,): weight * float(probs[i, token])
            for i, (prefix, weight) in enumerate(joint.items())
            for token in probs[i].nonzero().flatten().tolist()
        }
    return joint


def sampled_triples(model, inputs, candidates, seed, draft_weights=None):
    batch = {key: value.expand(ROWS, -1) for key, value in inputs.items()}
    out = std_ext.generate(
        model, **batch, candidate_mask=candidates.expand(ROWS, -1), budget=0, gamma=2, max_new_tokens=3,
        do_sample=True, generator=torch.Generator().manual_seed(seed), eos_token_id=-1, draft_weights=draft_weights,
        **WARP,
    )
    return out.sequences[:, -3:], out.stats


def pvalue(triples, joint):
    cells = sorted(joint)
    index = {cell: i for i, cell in enumerate(cells)}
    counts = torch.zeros(len(cells))
    for triple in map(tuple, triples.tolist()):
        assert triple in index, f"sampled {triple}, which the target gives probability 0"
        counts[index[triple]] += 1
    return chi_square_pvalue(counts, torch.tensor([joint[c] for c in cells]))


@pytest.mark.parametrize("draft_weights", [None, "int4"])  # int4: a draft further from the target
def test_std_sampling_matches_the_target_distribution(setting, draft_weights):
    model, inputs, candidates = setting
    joint = exact_joint(model, inputs["input_ids"])
    triples, stats = sampled_triples(model, inputs, candidates, seed=0, draft_weights=draft_weights)
    assert stats.draft_weights == draft_weights
    # the draft is genuinely different from the target: rejections happen, and so do acceptances
    assert 0.05 < stats.acceptance_by_position[0] < 0.95, stats
    p = pvalue(triples, joint)
    print(f"chi-square p-value {p:.3g}, draft-1 acceptance {stats.acceptance_by_position[0]:.2f}")
    assert p > 1e-3


def test_a_wrong_residual_is_caught(setting, monkeypatch):
    model, inputs, candidates = setting
    joint = exact_joint(model, inputs["input_ids"])
    monkeypatch.setattr(std_ext.sampling, "residual_probs", lambda p, q: p)  # resample p instead of max(0, p - q)
    triples, _ = sampled_triples(model, inputs, candidates, seed=0)
    assert pvalue(triples, joint) < 1e-6
