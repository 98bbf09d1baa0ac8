"""Every full-attention model family decodes exactly; every inexact one is refused.

For each family of ``tiny_families`` (text decoders, a user's subclass, and video / image
LLMs with their processors' prompt layouts): StD greedy tokens == vanilla greedy tokens
== ``transformers`` ``generate(do_sample=False)`` tokens, for one prompt and for a
left-padded ragged batch (each row against ``generate`` on that row alone), with a
budget that keeps some but not all candidates. Wherever two differ, the dense model's
top-2 logit margin at the first difference must be a near-tie (DESIGN.md §5).

Models std_ext cannot reproduce exactly (sliding windows, soft-capping, sinks,
bidirectional image masks, recurrent-state layers) must raise
``std_ext.UnsupportedModelError`` before any forward, naming the feature and the class;
each such test first shows that the feature really changes ``generate``'s output.
"""

import re

import pytest
import torch
import transformers

import std_ext
from test_generate import assert_same_tokens, hf_generate, new_tokens
from tiny_families import (
    BOS_ID,
    FAMILIES,
    FAMILY_TEXT_VOCAB,
    REFUSED_CLASSES,
    TEXT_FAMILIES,
    batch_prompts,
    make_family_model,
    make_gemma3_prompt,
    make_prompts,
    make_refused_model,
    placeholder_mask,
)

MAX_NEW = 10
GAMMA = 3
_models: dict = {}


def model_of(family: str):
    if family not in _models:
        _models[family] = make_family_model(family)
    return _models[family]


def text_candidates(inputs: dict) -> torch.Tensor:
    """bool ``[B, T]``: a middle span of each row (6 tokens in, 12 before the end) as the pool."""
    real = inputs["attention_mask"].bool()
    columns = torch.arange(real.shape[1])
    first_real = real.long().argmax(1)
    return real & (columns[None] >= first_real[:, None] + 6) & (columns[None] < real.shape[1] - 12)


def candidates_of(model, family: str, inputs: dict) -> torch.Tensor:
    """bool ``[B, T]``: the positions StD may drop -- visual placeholders, or the text pool."""
    if family in TEXT_FAMILIES:
        return text_candidates(inputs)
    return placeholder_mask(model, inputs["input_ids"]) & inputs["attention_mask"].bool()


def run(model, family: str, inputs: dict, **kwargs):
    """std_ext.generate; VL families find their visual tokens themselves, text ones get a pool."""
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    kwargs.setdefault("eos_token_id", -1)  # the tiny models never emit EOS
    if family in TEXT_FAMILIES:
        kwargs["candidate_mask"] = text_candidates(inputs)
    return std_ext.generate(model, **inputs, **kwargs)


def budget_between(model, family: str, inputs: dict) -> int:
    """A budget that keeps some but not all of every row's candidates.

    Each row keeps its non-candidates plus ``clamp(budget - non_candidates, 0, candidates)``
    of its candidates (DESIGN.md §1). Of the rows' half-way budgets (non-candidates + half
    the candidates) this picks the one that leaves the most rows partly kept, and asserts
    that it is every row (``make_prompts`` sizes rows so it can be): then every row keeps
    exactly ``budget`` positions.
    """
    cand = candidates_of(model, family, inputs)
    real = inputs["attention_mask"].bool()
    non = (real & ~cand).sum(1).tolist()
    n_cand = cand.sum(1).tolist()

    def partial_rows(budget: int) -> int:
        return sum(n < budget < n + c for n, c in zip(non, n_cand))

    budget = max((n + c // 2 for n, c in zip(non, n_cand)), key=partial_rows)
    assert partial_rows(budget) == len(non), f"{family}: no budget keeps part of every row ({non}, {n_cand})"
    return budget


def check_keep_size(stats, budget: int) -> None:
    """Every row's draft kept ``budget`` positions: its non-candidates and some of its candidates."""
    assert stats.keep_size == pytest.approx(budget), (stats.keep_size, budget)


def single_prompt(family: str):
    """``(model, row, width, budget, expected)``: the family's model, one prompt, its width, a
    budget keeping part of its candidates, and ``transformers``' greedy tokens for it."""
    model = model_of(family)
    (row,) = make_prompts(model, family, 1, seed=1)
    expected = hf_generate(model, row, max_new_tokens=MAX_NEW)[0]
    assert len(expected) == MAX_NEW
    return model, row, row["input_ids"].shape[1], budget_between(model, family, row), expected


@pytest.mark.parametrize("family", FAMILIES)
def test_single_prompt_std_equals_vanilla_equals_transformers(family):
    model, row, width, budget, expected = single_prompt(family)
    vanilla = run(model, family, row, mode="vanilla")
    std = run(model, family, row, gamma=GAMMA, budget=budget)
    assert_same_tokens(model, row, expected, new_tokens(vanilla.sequences, width)[0], f"{family} vanilla")
    assert_same_tokens(model, row, expected, new_tokens(std.sequences, width)[0], f"{family} std")
    check_keep_size(std.stats, budget)
    # the sparse draft ran and was checked: some drafts accepted, some rejected
    assert 0 < std.stats.mean_accepted < GAMMA, std.stats
    assert std.stats.gammas == [GAMMA] * std.stats.rounds


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_batch_equals_each_row_alone(family):
    model = model_of(family)
    rows = make_prompts(model, family, 3, seed=2)
    batch = batch_prompts(rows)
    assert len({r["input_ids"].shape[1] for r in rows}) == 3  # really ragged
    width = batch["input_ids"].shape[1]
    budget = budget_between(model, family, batch)
    alone = [hf_generate(model, row, max_new_tokens=MAX_NEW)[0] for row in rows]
    for mode in ("vanilla", "std"):
        out = run(model, family, batch, mode=mode, gamma=GAMMA, budget=budget)
        got = new_tokens(out.sequences, width)
        for b, row in enumerate(rows):
            assert_same_tokens(model, row, alone[b], got[b], f"{family} {mode} row {b}")
        if mode == "std":
            check_keep_size(out.stats, budget)
            assert 0 < out.stats.mean_accepted < GAMMA, out.stats


def test_qwen2_5_vl_second_per_grid_ts_is_used():
    """The video's seconds per temporal patch set its temporal RoPE positions: the engine must
    pass it on. Neither value is the 1.0 that ``get_rope_index`` assumes without it."""
    model = model_of("qwen2_5_vl")
    (row,) = make_prompts(model, "qwen2_5_vl", 1, seed=1)
    assert row["second_per_grid_ts"].tolist() == [0.5]
    faster = dict(row, second_per_grid_ts=torch.tensor([0.25]))
    default = {k: v for k, v in row.items() if k != "second_per_grid_ts"}
    tokens = [hf_generate(model, inputs, max_new_tokens=MAX_NEW)[0] for inputs in (row, faster, default)]
    assert len({tuple(t) for t in tokens}) == 3, tokens
    budget = budget_between(model, "qwen2_5_vl", faster)
    std = run(model, "qwen2_5_vl", faster, gamma=GAMMA, budget=budget)
    assert_same_tokens(model, faster, tokens[1], new_tokens(std.sequences, row["input_ids"].shape[1])[0], "0.25 s/grid")


def test_idefics3_pixel_attention_mask_is_used():
    """The padded rows of a wide image's global tile are masked out of the vision tower."""
    model = model_of("idefics3")
    (row,) = make_prompts(model, "idefics3", 1, seed=1)
    assert not row["pixel_attention_mask"].all()
    unmasked = {k: v for k, v in row.items() if k != "pixel_attention_mask"}
    assert hf_generate(model, unmasked, max_new_tokens=MAX_NEW)[0] != hf_generate(model, row, max_new_tokens=MAX_NEW)[0]


# ---- refusals ----------------------------------------------------------------------------


def text_prompt(length: int, seed: int) -> dict:
    """A random text prompt ``[1, length]`` (BOS first)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([BOS_ID]), torch.randint(0, FAMILY_TEXT_VOCAB, (length - 1,), generator=gen)])
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, length, dtype=torch.long)}


def logits_of(model, inputs: dict, tokens: list[int]) -> torch.Tensor:
    """Dense next-token logits ``[len(tokens) + 1, V]`` along prompt + ``tokens`` (batch of one)."""
    extra = torch.tensor([tokens], dtype=torch.long)
    extended = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1))
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    for key in ("token_type_ids", "mm_token_type_ids"):  # generated tokens are text
        if key in inputs:
            extended[key] = torch.cat([inputs[key], torch.zeros_like(extra)], 1)
    with torch.no_grad():
        out = model(**extended)
    return out.logits[0, inputs["input_ids"].shape[1] - 1 :]


def assert_changes_generate(with_feature, without_feature, inputs: dict, inputs_without: dict | None = None) -> None:
    """The feature is load-bearing: greedy tokens differ, or (if they agree) the logits along them."""
    inputs_without = inputs if inputs_without is None else inputs_without
    on = hf_generate(with_feature, inputs, max_new_tokens=MAX_NEW)[0]
    off = hf_generate(without_feature, inputs_without, max_new_tokens=MAX_NEW)[0]
    if on == off:
        gap = (logits_of(with_feature, inputs, on) - logits_of(without_feature, inputs_without, on)).abs().max()
        assert gap > 1e-4, f"the feature changes nothing (tokens {on}, logit gap {gap:.2g})"


def assert_refused(model, inputs: dict, phrase: str, **kwargs) -> None:
    """std_ext refuses ``model`` in both modes, naming ``phrase`` and the class, before any
    module of it (embeddings, vision tower, a layer) runs."""
    name = type(model).__name__
    ran = []
    hooks = [m.register_forward_pre_hook(lambda module, _: ran.append(type(module).__name__)) for m in model.modules()]
    try:
        for mode in ("std", "vanilla"):
            pattern = rf"(?s)(?=.*{re.escape(phrase)})(?=.*\b{re.escape(name)}\b)"
            with pytest.raises(std_ext.UnsupportedModelError, match=pattern):
                std_ext.generate(model, **inputs, mode=mode, max_new_tokens=MAX_NEW, gamma=GAMMA, budget=24,
                                 eos_token_id=-1, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert not ran, f"{sorted(set(ran))} ran before the refusal"


def test_unsupported_model_error_is_a_value_error():
    assert issubclass(std_ext.UnsupportedModelError, ValueError)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


PROMPT = 48  # refusal prompts: longer than the short windows below


@pytest.mark.parametrize("window", [16, PROMPT + 3], ids=["shorter-than-prompt", "shorter-than-prompt+new"])
def test_mistral_sliding_window_is_refused(window):
    inputs = text_prompt(PROMPT, seed=20)
    windowed = make_family_model("mistral", sliding_window=window)
    full = model_of("mistral")
    assert same_weights(windowed, full)
    assert_changes_generate(windowed, full, inputs)
    assert_refused(windowed, inputs, "sliding-window attention", candidate_mask=text_candidates(inputs))


@pytest.mark.parametrize("window", [4096, "prompt+new"])
def test_mistral_window_covering_prompt_and_new_tokens_is_exact(window):
    """A window the generation does not outgrow binds nothing: accepted, and exact. 4096 is
    Mistral-7B-v0.1's; "prompt+new" is exactly prompt + max_new_tokens positions (the last
    token is even predicted from position prompt + max_new_tokens - 2)."""
    probe = model_of("mistral")
    (row,) = make_prompts(probe, "mistral", 1, seed=21)
    width = row["input_ids"].shape[1]
    model = make_family_model("mistral", sliding_window=width + MAX_NEW if window == "prompt+new" else window)
    assert model.config.sliding_window >= width + MAX_NEW
    budget = budget_between(model, "mistral", row)
    expected = hf_generate(model, row, max_new_tokens=MAX_NEW)[0]
    assert expected == hf_generate(probe, row, max_new_tokens=MAX_NEW)[0]  # the window changes nothing
    for mode in ("vanilla", "std"):
        out = run(model, "mistral", row, mode=mode, gamma=GAMMA, budget=budget)
        assert_same_tokens(model, row, expected, new_tokens(out.sequences, width)[0], f"window {window} {mode}")
    check_keep_size(out.stats, budget)


@pytest.mark.parametrize(
    "overrides",
    [dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
     dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16, use_sliding_window=True)],
    ids=["use_sliding_window", "layer_types"],
)
def test_qwen2_sliding_window_is_refused(overrides):
    inputs = text_prompt(PROMPT, seed=22)
    windowed = make_family_model("my_qwen2", **overrides)
    assert "sliding_attention" in windowed.config.layer_types
    full = model_of("my_qwen2")
    assert same_weights(windowed, full)
    assert_changes_generate(windowed, full, inputs)
    assert_refused(windowed, inputs, "sliding-window attention", candidate_mask=text_candidates(inputs))


def _require(name: str) -> None:
    if getattr(transformers, REFUSED_CLASSES[name], None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {REFUSED_CLASSES[name]}")


def test_gemma2_attention_soft_capping_is_refused():
    _require("gemma2")
    inputs = text_prompt(PROMPT, seed=23)
    capped = make_refused_model("gemma2")
    assert set(capped.config.layer_types) == {"full_attention"}  # soft-capping is the only obstacle
    uncapped = make_refused_model("gemma2", attn_logit_softcapping=None)
    assert same_weights(capped, uncapped)
    assert_changes_generate(capped, uncapped, inputs)
    assert_refused(capped, inputs, "soft-capping", candidate_mask=text_candidates(inputs))


def test_gpt_oss_attention_sinks_are_refused():
    _require("gpt_oss")
    inputs = text_prompt(PROMPT, seed=24)
    model = make_refused_model("gpt_oss")
    assert set(model.config.layer_types) == {"full_attention"}
    sinkless = make_refused_model("gpt_oss")
    with torch.no_grad():
        for layer in sinkless.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # exp(sink) = 0: plain softmax
    assert_changes_generate(model, sinkless, inputs)
    assert_refused(model, inputs, "attention sinks", candidate_mask=text_candidates(inputs))


def test_gemma3_bidirectional_image_mask_is_refused():
    _require("gemma3")
    model = make_refused_model("gemma3")
    inputs = make_gemma3_prompt(seed=25)
    causal = {k: v for k, v in inputs.items() if k != "token_type_ids"}  # no block mask: plain causal
    assert_changes_generate(model, model, inputs, causal)
    assert_refused(model, inputs, "bidirectional")


def _zero_recurrent_outputs(model) -> None:
    """Silence every recurrent layer (its output projection := 0): the model no longer carries state."""
    with torch.no_grad():
        for layer, kind in zip(model.model.layers, model.config.layer_types):
            if kind == "linear_attention":
                layer.linear_attn.out_proj.weight.zero_()
            elif kind == "conv":
                layer.conv.out_proj.weight.zero_()


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5", "lfm2"])
def test_recurrent_state_layers_are_refused(name):
    _require(name)
    inputs = text_prompt(PROMPT, seed=26)
    model = make_refused_model(name)
    assert set(model.config.layer_types) - {"full_attention"}  # a recurrent layer is there
    stateless = make_refused_model(name)
    _zero_recurrent_outputs(stateless)
    assert_changes_generate(model, stateless, inputs)
    assert_refused(model, inputs, "recurrent state", candidate_mask=text_candidates(inputs))
