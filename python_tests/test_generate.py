"""Decode engine exactness (DESIGN.md §5) on tiny random models of every supported class.

StD greedy tokens == vanilla greedy tokens == ``transformers`` ``generate`` tokens, for
batch 1 and ragged batches with EOS; wherever two differ, the dense model's top-2 logit
margin at that step must be a near-tie (< 1e-3).
"""

import pytest
import torch

import std_ext
from tiny_models import KINDS, PAD_ID, VL_KINDS, make_inputs, make_model

MAX_NEW = 12
NEAR_TIE = 1e-3
_models: dict = {}


def model_of(kind: str):
    if kind not in _models:
        _models[kind] = make_model(kind)
    return _models[kind]


def candidate_mask_of(kind: str, inputs: dict) -> torch.Tensor | None:
    """VL models detect their visual tokens; for text models a middle span is the pool."""
    if kind in VL_KINDS:
        return None
    mask = inputs["attention_mask"].bool().clone()
    width = mask.shape[1]
    first_real = mask.long().argmax(1)
    columns = torch.arange(width)
    return mask & (columns[None] >= first_real[:, None] + 6) & (columns[None] < width - 12)


def row_inputs(kind: str, inputs: dict, b: int) -> dict:
    """Row ``b`` of a left-padded batch as a batch of one, padding stripped."""
    real = inputs["attention_mask"][b].bool()
    row = {"input_ids": inputs["input_ids"][b : b + 1, real], "attention_mask": inputs["attention_mask"][b : b + 1, real]}
    if "mm_token_type_ids" in inputs:
        row["mm_token_type_ids"] = inputs["mm_token_type_ids"][b : b + 1, real]
    if kind == "qwen2_vl":
        for pixels, grid in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
            if grid in inputs:
                sizes = inputs[grid].prod(1).tolist()
                start = sum(sizes[:b])
                row[pixels] = inputs[pixels][start : start + sizes[b]]
                row[grid] = inputs[grid][b : b + 1]
    elif kind == "llava_onevision":
        row["pixel_values_videos"] = inputs["pixel_values_videos"][b : b + 1]
    return row


def new_tokens(sequences: torch.Tensor, width: int) -> list[list[int]]:
    """Emitted tokens per row, padding after the end stripped."""
    rows = []
    for row in sequences[:, width:].tolist():
        while row and row[-1] == PAD_ID:
            row.pop()
        rows.append(row)
    return rows


@torch.no_grad()
def top2_margin(model, inputs: dict, prefix: list[int]) -> float:
    """Dense model's top-2 logit gap for the token after prompt + ``prefix`` (batch of one)."""
    extended = dict(inputs)
    extra = torch.tensor([prefix], dtype=torch.long)
    extended["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    top2 = model(**extended).logits[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


def assert_same_tokens(model, inputs: dict, expected: list[int], got: list[int], what: str) -> None:
    """Equal, or the first difference is a near-tie of the dense model (then the rest may differ)."""
    if got == expected:
        return
    first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    margin = top2_margin(model, inputs, expected[:first])
    assert margin < NEAR_TIE, f"{what}: token {first} differs ({expected} vs {got}) with top-2 margin {margin:.3g}"


def run(model, inputs, kind, **kwargs):
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    kwargs.setdefault("eos_token_id", -1)  # tiny models never emit their EOS; tests choose their own
    return std_ext.generate(model, **inputs, candidate_mask=candidate_mask_of(kind, inputs), **kwargs)


def hf_generate(model, inputs, eos_token_id=None, max_new_tokens=MAX_NEW):
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=PAD_ID)
    return new_tokens(out, inputs["input_ids"].shape[1])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_std_equals_vanilla_equals_transformers(kind):
    model = model_of(kind)
    inputs = make_inputs(model, kind, [100], n_visual=64, seed=1)
    width = inputs["input_ids"].shape[1]
    expected = hf_generate(model, inputs)[0]
    vanilla = run(model, inputs, kind, mode="vanilla")
    std = run(model, inputs, kind, gamma=4, budget=48)
    assert_same_tokens(model, inputs, expected, new_tokens(vanilla.sequences, width)[0], "vanilla vs generate")
    assert_same_tokens(model, inputs, expected, new_tokens(std.sequences, width)[0], "std vs generate")
    assert len(expected) == MAX_NEW
    # the sparse draft really is sparse and really is checked: some drafts rejected, some accepted
    assert 0 < std.stats.mean_accepted < 4, std.stats
    assert std.stats.keep_size <= 48
    assert vanilla.stats.rounds == MAX_NEW - 1 and vanilla.stats.mean_accepted == 0


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_batch_with_eos_equals_each_row_alone(kind):
    model = model_of(kind)
    inputs = make_inputs(model, kind, [100, 70, 86], n_visual=40, seed=2)
    rows = [row_inputs(kind, inputs, b) for b in range(3)]
    alone = [hf_generate(model, row)[0] for row in rows]
    # an EOS that stops row 1 after 4 tokens (the first time it emits that token)
    eos = alone[1][3]
    assert eos not in alone[1][:3]
    width = inputs["input_ids"].shape[1]
    for mode in ("vanilla", "std"):
        out = run(model, inputs, kind, mode=mode, gamma=3, budget=40, eos_token_id=eos)
        got = new_tokens(out.sequences, width)
        for b, row in enumerate(rows):
            expected = hf_generate(model, row, eos_token_id=eos)[0]
            assert_same_tokens(model, row, expected, got[b], f"{mode} row {b}")
            single = run(model, row, kind, mode=mode, gamma=3, budget=40, eos_token_id=eos)
            assert got[b] == new_tokens(single.sequences, row["input_ids"].shape[1])[0], f"{mode} row {b} vs alone"
        assert got[1][-1] == eos and len(got[1]) == 4
        assert out.stats.new_tokens[1] == 4


def test_qwen2_vl_image_input():
    model = model_of("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [90], n_visual=48, modality="image", seed=3)
    expected = hf_generate(model, inputs)[0]
    std = run(model, inputs, "qwen2_vl", gamma=4, budget=40)
    assert_same_tokens(model, inputs, expected, new_tokens(std.sequences, inputs["input_ids"].shape[1])[0], "image")


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
def test_budget_zero_keeps_only_text(kind):
    model = model_of(kind)
    inputs = make_inputs(model, kind, [100], n_visual=64, seed=4)
    candidates = candidate_mask_of(kind, inputs)
    if candidates is None:
        candidates = inputs["input_ids"] == model.config.video_token_id
    expected = hf_generate(model, inputs)[0]
    std = run(model, inputs, kind, gamma=4, budget=0)
    assert std.stats.keep_size == int((inputs["attention_mask"].bool() & ~candidates).sum())
    assert_same_tokens(model, inputs, expected, new_tokens(std.sequences, inputs["input_ids"].shape[1])[0], "budget 0")


@pytest.mark.parametrize("kind", ["llama", "llava_onevision"])
def test_budget_covering_the_prompt_accepts_every_draft(kind):
    model = model_of(kind)
    inputs = make_inputs(model, kind, [100], n_visual=64, seed=5)
    width = inputs["input_ids"].shape[1]
    expected = hf_generate(model, inputs)[0]
    std = run(model, inputs, kind, gamma=4, budget=10_000)
    got = new_tokens(std.sequences, width)[0]
    assert_same_tokens(model, inputs, expected, got, "full budget")
    assert std.stats.keep_size == width
    if std.stats.acceptance_by_position != [1.0] * 4:  # only a near-tie may reject
        margins = [top2_margin(model, inputs, got[:i]) for i in range(len(got))]
        assert min(margins) < NEAR_TIE, (std.stats, margins)


def test_text_prompt_without_candidates_keeps_everything():
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [60], seed=6)
    std = std_ext.generate(model, **inputs, max_new_tokens=MAX_NEW, gamma=3, budget=8, eos_token_id=-1)
    assert std.stats.keep_size == 60
    assert std.stats.acceptance_by_position == [1.0] * 3


@pytest.mark.parametrize("selection", ["recent", "refresh", "callable"])
def test_every_selection_policy_is_lossless(selection):
    model = model_of("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [300], n_visual=256, seed=7)
    width = inputs["input_ids"].shape[1]
    non_visual = int((inputs["input_ids"] != model.config.video_token_id).sum())
    calls = []

    def every_other(selection_inputs):  # a user policy: every other candidate, at most k
        calls.append(selection_inputs.layer)
        positions = selection_inputs.candidates[0].nonzero().flatten()[::2][: selection_inputs.k_max]
        heads = selection_inputs.k_cache.shape[1]
        return positions.to(torch.int32)[None, None].expand(1, heads, -1)

    policy = every_other if selection == "callable" else selection
    expected = hf_generate(model, inputs)[0]
    std = run(model, inputs, "qwen2_vl", gamma=4, budget=non_visual + 160, selection=policy)
    assert_same_tokens(model, inputs, expected, new_tokens(std.sequences, width)[0], selection)
    kept = 128 if selection == "callable" else 160  # the callable offers only every other candidate
    assert std.stats.keep_size == non_visual + kept
    if selection == "callable":
        assert calls == list(range(model.config.text_config.num_hidden_layers))


def test_window_limits_observation_queries():
    model = model_of("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [100], n_visual=64, seed=8)
    seen = []

    def record(selection_inputs):
        seen.append(int((selection_inputs.query_pos >= 0).sum()))
        return selection_inputs.candidates.nonzero()[:1, 1].to(torch.int32)[None, None].expand(1, 2, -1)

    run(model, inputs, "qwen2_vl", budget=40, window=3, selection=record, max_new_tokens=2)
    question = int((inputs["input_ids"][0] != model.config.video_token_id).flip(0).long().cumprod(0).sum())
    run(model, inputs, "qwen2_vl", budget=40, selection=record, max_new_tokens=2)
    assert seen == [3, 3, question, question]


def test_stats_are_consistent():
    model = model_of("llama")
    inputs = make_inputs(model, "llama", [100, 80], seed=9)
    out = run(model, inputs, "llama", gamma=3, budget=40, max_new_tokens=20)
    stats = out.stats
    assert stats.new_tokens == [20, 20] and stats.rounds >= 1
    assert len(stats.acceptance_by_position) == 3
    rates = stats.acceptance_by_position
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # draft j+1 needs draft j accepted
    assert stats.mean_accepted == pytest.approx(sum(rates))
    # rounds emit mean_accepted + 1 tokens each, the last one possibly truncated
    per_row_rounds = stats.rounds
    assert 19 <= per_row_rounds * (stats.mean_accepted + 1) < 19 + 4
    assert min(stats.prefill_s, stats.selection_s, stats.draft_s, stats.verify_s) > 0


def test_sampling_is_reproducible_with_a_generator():
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [50], seed=10)

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        out = run(model, inputs, "qwen2", do_sample=True, temperature=1.5, top_k=20, generator=gen, budget=20)
        return out.sequences

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_chunked_prefill_attention_matches_reference(monkeypatch):
    """Left-padded prefill attention, built chunk by chunk, against an explicit float64 softmax."""
    from std_ext import attention

    monkeypatch.setattr(attention, "PREFILL_QUERY_CHUNK", 8)
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, width, dim = 2, 4, 2, 37, 8
    q = torch.randn(batch, heads, width, dim, generator=gen)
    k = torch.randn(batch, kv_heads, width, dim, generator=gen)
    v = torch.randn(batch, kv_heads, width, dim, generator=gen)
    real = torch.ones(batch, width, dtype=torch.bool)
    real[1, :9] = False
    out = attention._prefill_attention(q, k, v, real, 0.3)  # [B, T, H, D]
    for b in range(batch):
        for h in range(heads):
            for t in range(width):
                if not real[b, t]:
                    continue
                keys = [s for s in range(t + 1) if real[b, s]]
                logits = 0.3 * k[b, h // 2, keys].double() @ q[b, h, t].double()
                expected = torch.softmax(logits, 0) @ v[b, h // 2, keys].double()
                torch.testing.assert_close(out[b, t, h].double(), expected, rtol=1e-5, atol=1e-5)
