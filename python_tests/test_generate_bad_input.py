"""std_ext.generate rejects bad inputs and parameters with errors that name them, before any work."""

import pytest
import torch
import transformers

import std_ext
from tiny_models import make_inputs, make_model


@pytest.fixture(scope="module")
def model():
    return make_model("qwen2")


@pytest.fixture
def inputs(model):
    return make_inputs(model, "qwen2", [30], seed=0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(gamma=0), "gamma must be an integer >= 1"),
        (dict(gamma=2.5), "gamma must be an integer"),
        (dict(budget=-1), "budget must be an integer >= 0"),
        (dict(window=0), "window must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(mode="greedy"), "mode must be 'std' or 'vanilla'"),
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, top_k=-2), "top_k must be an integer >= 0"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(selection="oracle"), "selection: unknown policy"),
        (dict(selection=7), "selection: expected a policy name or a callable"),
        (dict(max_new_tokens=5000), "does not fit the model's 4096 positions"),
    ],
)
def test_bad_parameters(model, inputs, kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        std_ext.generate(model, **inputs, **{"max_new_tokens": 4, **kwargs})


def test_bad_inputs(model, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        std_ext.generate(model, ids[0])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        std_ext.generate(model, ids.float())
    with pytest.raises(ValueError, match="attention_mask .* must match input_ids"):
        std_ext.generate(model, ids, mask[:, 1:], max_new_tokens=2)
    right_padded = mask.clone()
    right_padded[0, -3:] = 0
    with pytest.raises(ValueError, match="only left padding"):
        std_ext.generate(model, ids, right_padded)
    with pytest.raises(ValueError, match="only 0 and 1"):
        std_ext.generate(model, ids, mask * 2)
    with pytest.raises(ValueError, match="only 0 and 1"):  # not cast to 0 first (a padding token)
        std_ext.generate(model, ids, mask * 0.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="candidate_mask must be bool"):
        std_ext.generate(model, ids, mask, candidate_mask=mask)
    with pytest.raises(ValueError, match="candidate_mask must be bool"):
        std_ext.generate(model, ids, mask, candidate_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_ids is on meta"):
        std_ext.generate(model, ids.to("meta"))


def test_model_without_decoder_layers_is_refused_by_what_it_is():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(std_ext.UnsupportedModelError, match="cannot find the text decoder layers of GPT2LMHeadModel"):
        std_ext.generate(gpt2, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)


def test_attention_outside_generate_is_an_error(model, inputs):
    from std_ext.attention import std_ext_attention

    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="only works inside std_ext.generate"):
        std_ext_attention(model.model.layers[0].self_attn, q, q[:, :2], q[:, :2], None)


def test_attention_implementation_is_restored(model, inputs):
    before = model.config._attn_implementation
    std_ext.generate(model, **inputs, max_new_tokens=2, eos_token_id=-1)
    assert model.config._attn_implementation == before
    candidates = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    candidates[:, 5:20] = True
    with pytest.raises(ValueError, match="the callable must return"):  # fails inside the std attention block
        std_ext.generate(model, **inputs, max_new_tokens=2, budget=20, candidate_mask=candidates,
                         selection=lambda i: torch.tensor([1]))
    assert model.config._attn_implementation == before


def test_missing_kernels_are_named(model, inputs, monkeypatch):
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: op != "std::sparse_attention" and has_kernel(op, key))
    with pytest.raises(RuntimeError, match="no CPU kernel for std::sparse_attention"):
        std_ext.generate(model, **inputs, max_new_tokens=2)
    std_ext.generate(model, **inputs, mode="vanilla", max_new_tokens=1)  # vanilla needs only dense_attention
