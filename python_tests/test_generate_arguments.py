"""std_ext.generate reads its arguments as ``generate`` does, and refuses what it cannot reproduce.

Every argument is either implemented with ``generate``'s result (checked against
``generate`` itself), or refused by name before any work: unknown keywords, typos,
generation features std_ext does not reproduce, inputs the engine sets itself, a dtype
the kernels do not take, tensors on the wrong device. The checks that need a long
generation use the tiny Qwen2 of ``tiny_models``.
"""

import copy

import pytest
import torch
import transformers

import std_ext
from test_generate import new_tokens
from tiny_models import PAD_ID, make_inputs, make_model


@pytest.fixture(scope="module")
def model():
    return make_model("qwen2")


@pytest.fixture
def inputs(model):
    return make_inputs(model, "qwen2", [30], seed=1)


def generate_tokens(model, inputs, **kwargs):
    out = model.generate(**inputs, do_sample=False, **kwargs)
    return new_tokens(out, inputs["input_ids"].shape[1])


def std_tokens(model, inputs, **kwargs):
    out = std_ext.generate(model, **inputs, gamma=3, **kwargs)
    return new_tokens(out.sequences, inputs["input_ids"].shape[1])


@pytest.mark.parametrize("typo, suggestion", [("max_new_token", "max_new_tokens"), ("temprature", "temperature")])
def test_a_typo_is_a_type_error_with_a_suggestion(model, inputs, typo, suggestion):
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{typo}' \(did you mean '{suggestion}'\?\)"):
        std_ext.generate(model, **inputs, max_new_tokens=4, **{typo: 4})


@pytest.mark.parametrize("name", ["num_beams", "min_new_tokens", "no_repeat_ngram_size",
                                  "suppress_tokens", "sequence_bias"])
def test_unimplemented_generation_arguments_are_refused_by_name(model, name):
    inputs = make_inputs(model, "qwen2", [30], seed=2)
    greedy = generate_tokens(model, inputs, max_new_tokens=12)[0]
    kwargs = {
        "num_beams": dict(num_beams=2),
        "min_new_tokens": dict(min_new_tokens=6, eos_token_id=greedy[2]),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=1),
        "suppress_tokens": dict(suppress_tokens=[greedy[0]]),
        "sequence_bias": dict(sequence_bias={(greedy[0],): -100.0}),
    }[name]
    # each really changes generate's answer here, so running without it would be a different answer
    base = {k: v for k, v in kwargs.items() if k == "eos_token_id"}
    assert generate_tokens(model, inputs, max_new_tokens=12, **kwargs) != generate_tokens(
        model, inputs, max_new_tokens=12, **base)
    with pytest.raises(TypeError, match=rf"{name}=.* is not implemented"):
        std_ext.generate(model, **inputs, max_new_tokens=12, **kwargs)


def test_stop_strings_are_refused(model, inputs):
    with pytest.raises(TypeError, match="stop_strings=.* is not implemented"):
        std_ext.generate(model, **inputs, max_new_tokens=8, stop_strings=["a"])


def test_neutral_values_of_unimplemented_arguments_are_accepted(model, inputs):
    expected = generate_tokens(model, inputs, max_new_tokens=8)
    assert std_tokens(model, inputs, max_new_tokens=8, num_beams=1, repetition_penalty=1.0,
                      no_repeat_ngram_size=0) == expected


@pytest.mark.parametrize("name", ["position_ids", "past_key_values", "inputs_embeds", "use_cache"])
def test_inputs_the_engine_sets_are_refused(model, inputs, name):
    with pytest.raises(TypeError, match=f"{name} is set by std_ext.generate itself"):
        std_ext.generate(model, **inputs, max_new_tokens=4, **{name: None})


def test_max_length_counts_the_prompt_as_in_generate(model, inputs):
    width = inputs["input_ids"].shape[1]
    expected = generate_tokens(model, inputs, max_length=width + 7)
    assert len(expected[0]) == 7
    assert std_tokens(model, inputs, max_length=width + 7) == expected
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1, got 0 from max_length \(30\)"):
        std_ext.generate(model, **inputs, max_length=width)


def test_defaults_come_from_the_models_generation_config(model, inputs):
    tuned = copy.deepcopy(model)
    tuned.generation_config.max_new_tokens = 6
    tuned.generation_config.eos_token_id = generate_tokens(model, inputs, max_new_tokens=6)[0][3]
    expected = generate_tokens(tuned, inputs)
    assert len(expected[0]) == 4  # stopped at the config's EOS
    assert std_tokens(tuned, inputs) == expected

    tuned.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(TypeError, match="no_repeat_ngram_size=2 is not implemented"):
        std_ext.generate(tuned, **inputs)
    assert std_tokens(tuned, inputs, no_repeat_ngram_size=0) == expected  # overridden per call, as in generate


def test_generation_config_argument(model, inputs):
    config = transformers.GenerationConfig(max_new_tokens=5, do_sample=False)
    expected = generate_tokens(model, inputs, generation_config=config)
    assert len(expected[0]) == 5
    assert std_tokens(model, inputs, generation_config=config) == expected
    with pytest.raises(TypeError, match="num_beams=3 is not implemented"):
        std_ext.generate(model, **inputs, generation_config=transformers.GenerationConfig(max_new_tokens=5, num_beams=3))
    with pytest.raises(TypeError, match="generation_config must be a transformers.GenerationConfig"):
        std_ext.generate(model, **inputs, generation_config={"max_new_tokens": 5})


def test_sampling_defaults_follow_generate(model, inputs):
    """Sampling without top_k applies generate's default top_k of 50: same tokens under one seed."""
    width = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    expected = model.generate(**inputs, do_sample=True, max_new_tokens=1)[:, width:]
    # a second draw under the same seed, from the same warped distribution: only one token is
    # sampled, so std_ext and generate consume the global generator identically
    torch.manual_seed(0)
    got = std_ext.generate(model, **inputs, do_sample=True, max_new_tokens=1, mode="vanilla").sequences[:, width:]
    assert torch.equal(got, expected)


def test_left_padded_batch_without_attention_mask_gets_generates_mask(model):
    batch = make_inputs(model, "qwen2", [20, 27, 30], seed=3)
    assert bool((batch["input_ids"] == PAD_ID).any())
    ids = batch["input_ids"]
    expected = generate_tokens(model, {"input_ids": ids}, max_new_tokens=6)
    assert expected == generate_tokens(model, batch, max_new_tokens=6)  # generate inferred the mask
    assert std_tokens(model, {"input_ids": ids}, max_new_tokens=6) == expected


def test_padding_that_cannot_be_inferred_is_an_error(model):
    batch = make_inputs(model, "qwen2", [20, 30], seed=3)
    tuned = copy.deepcopy(model)
    tuned.generation_config.eos_token_id = PAD_ID  # pad == eos: generate cannot tell padding from text
    with pytest.raises(ValueError, match="the mask cannot be inferred"):
        std_ext.generate(tuned, batch["input_ids"], max_new_tokens=4)


class _PrefillSpy:
    """Counts decoder-layer calls, to show a check fired before any work."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_decoder().layers[0].register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def test_float64_model_fails_before_the_prefill(inputs):
    model = make_model("qwen2").to(torch.float64)
    spy = _PrefillSpy(model)
    with pytest.raises(ValueError, match="parameters are float64, but std_ext's CPU kernels take float32"):
        std_ext.generate(model, **inputs, max_new_tokens=4)
    assert spy.calls == 0


@pytest.mark.parametrize("spoil, message", [
    (lambda batch: batch.update(pixel_values_videos=batch["pixel_values_videos"].to("meta")),
     "pixel_values_videos is on meta but the model is on cpu"),
    (lambda batch: batch.pop("mm_token_type_ids"),
     "mm_token_type_ids: Qwen2VLForConditionalGeneration places visual tokens"),
], ids=["pixels-on-the-wrong-device", "mrope-without-token-types"])
def test_bad_visual_inputs_fail_before_the_prefill(spoil, message):
    model = make_model("qwen2_vl")
    batch = make_inputs(model, "qwen2_vl", [90], n_visual=16)
    spoil(batch)
    spy = _PrefillSpy(model)
    with pytest.raises(ValueError, match=message):
        std_ext.generate(model, **batch, max_new_tokens=4)
    assert spy.calls == 0


def test_a_budget_with_no_room_for_candidates_warns_and_is_recorded(model, inputs):
    candidates = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    candidates[:, 4:20] = True  # 14 non-candidate prompt tokens
    with pytest.warns(UserWarning, match="budget=10 keeps no candidate"):
        out = std_ext.generate(model, **inputs, max_new_tokens=3, budget=10, candidate_mask=candidates)
    assert len(out.stats.warnings) == 1 and "budget=10" in out.stats.warnings[0]
    out = std_ext.generate(model, **inputs, max_new_tokens=3, budget=20, candidate_mask=candidates)
    assert out.stats.warnings == []


@pytest.mark.parametrize("mode", ["std", "vanilla"])
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_generate(model, mode, penalty):
    """Qwen2-VL / Qwen2.5-VL instruct checkpoints set repetition_penalty=1.05: reproduced exactly,
    drafts included in the penalized history of the tokens after them."""
    batch = make_inputs(model, "qwen2", [20, 27, 30], seed=3)
    width = batch["input_ids"].shape[1]
    expected = generate_tokens(model, batch, max_new_tokens=16, repetition_penalty=penalty)
    assert expected != generate_tokens(model, batch, max_new_tokens=16)  # the penalty matters here
    out = std_ext.generate(model, **batch, max_new_tokens=16, repetition_penalty=penalty, mode=mode, gamma=4)
    assert new_tokens(out.sequences, width) == expected
    if mode == "std":
        assert out.stats.mean_accepted > 0  # drafts were accepted under the penalty too


def test_repetition_penalty_with_deterministic_sampling_equals_generate(model):
    """The instruct checkpoints' own defaults: sampling with top_k=1 and a penalty (no seed needed)."""
    batch = make_inputs(model, "qwen2", [24, 30], seed=4)
    width = batch["input_ids"].shape[1]
    settings = dict(max_new_tokens=12, do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)
    expected = new_tokens(model.generate(**batch, **settings), width)
    out = std_ext.generate(model, **batch, gamma=4, **settings)
    assert new_tokens(out.sequences, width) == expected
