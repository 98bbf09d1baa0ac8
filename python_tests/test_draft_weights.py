"""``draft_weights``: the draft runs a quantized copy of the weights; the tokens stay the model's.

* Each quantized layer against a float64 product with independently dequantized weights
  (the int4 nibble order, zero points and scales, the int8 / fp8 scales).
* For every supported family of ``tiny_families``: StD greedy tokens with each precision
  the CPU runs == ``transformers`` ``generate`` == vanilla; the agreement per precision is
  printed (``pytest -s``).
* The draft steps really run the copy and the verify / dense steps the model's own
  weights (the LM head's outputs are checked against both, step by step).
* The copy is made once per model, re-made after an in-place weight edit, and what it
  costs is in ``stats``; an unknown precision or one the device cannot run is refused
  before any module runs, and so is a linear layer sharded in a way the copy cannot
  reproduce (the tensor-parallel runs themselves: ``test_draft_weights_tp.py``).
"""

import pytest
import torch

import std_ext
import std_ext.draft_weights as dw
from test_generate import assert_same_tokens, new_tokens
from test_model_families import GAMMA, budget_between, model_of, run, single_prompt
from tiny_families import FAMILIES, make_prompts

PRECISIONS = dw.PRECISIONS  # the CPU runs all four (fp8 in its reference form)


# ---- the layers ----------------------------------------------------------------------------


def reference_weight(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """float64 ``[N, K]``: the weight as the precision represents it, computed here independently."""
    w = weight.double()
    if precision == "bf16":
        return weight.bfloat16().double()
    if precision == "int8":
        scale = (w.abs().amax(1, keepdim=True) / 127).to(torch.bfloat16).double()  # the kernel reads bf16 scales
        return (w / (w.abs().amax(1, keepdim=True) / 127)).round().clamp(-127, 127) * scale
    if precision == "fp8":
        scale = (weight.float().abs().amax(1, keepdim=True) / 448.0)
        return (weight.float() / scale).to(torch.float8_e4m3fn).double() * scale.double()
    group = dw.group_size(weight.shape[1])
    g = w.reshape(w.shape[0], -1, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (high - low) / 15
    codes = ((g - low) / step).round().clamp(0, 15)
    return (codes * step + low).reshape(w.shape)


def reference_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "fp8":  # one per-tensor activation scale
        scale = x.abs().amax() / 448.0
        return (x / scale).to(torch.float8_e4m3fn).double() * scale.double()
    return x.bfloat16().double()  # bf16 / int8 / int4 multiply bfloat16 activations


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(32, 64), (256, 64), (48, 96), (64, 384)])
def test_quantized_linear_matches_a_float64_product(precision, shape):
    torch.manual_seed(0)
    n, k = shape
    layer = torch.nn.Linear(k, n, bias=True)
    x = torch.randn(2, 3, k).transpose(0, 1)  # not contiguous: the layer must cope
    got = dw._quantize_linear(layer, precision)(x)
    assert got.dtype == x.dtype and got.shape == (3, 2, n)
    weight = layer.weight.detach()
    expected = reference_input(x, precision) @ reference_weight(weight, precision).T + layer.bias.detach().double()
    # bf16 / int8 / int4 round their bfloat16 output (2^-8 relative); fp8 computes in float32
    tolerance = 1e-5 if precision == "fp8" else 1.5e-2
    error = float((got.double() - expected).abs().max() / expected.abs().max())
    assert error < tolerance, error
    # ... and the layer really is quantized: its output differs from the float32 one
    assert not torch.equal(got, layer(x))


def test_int4_groups_clip_to_the_layer_width():
    assert dw.DEFAULT_GROUP_SIZE == 128
    assert [dw.group_size(k) for k in (576, 64, 96, 1536, 40)] == [64, 64, 32, 128, None]
    layer = torch.nn.Linear(40, 16)
    with pytest.raises(ValueError, match=r"draft_weights: 'int4'.*40"):
        dw._quantize_linear(layer, "int4")


# ---- lossless on every family --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_precision_is_lossless(family):
    model, row, width, budget, expected = single_prompt(family)
    vanilla = run(model, family, row, mode="vanilla", draft_weights="int4")  # vanilla runs no draft: checked only
    assert vanilla.stats.draft_weights is None
    assert_same_tokens(model, row, expected, new_tokens(vanilla.sequences, width)[0], f"{family} vanilla")
    agreement = {}
    for precision in PRECISIONS:
        out = run(model, family, row, gamma=GAMMA, budget=budget, draft_weights=precision)
        assert_same_tokens(model, row, expected, new_tokens(out.sequences, width)[0], f"{family} {precision}")
        assert out.stats.draft_weights == precision and out.stats.draft_steps > 0
        agreement[precision] = round(out.stats.draft_agreement, 3)
    print(f"{family}: draft agreement per precision {agreement}")


# ---- which weights each step runs ----------------------------------------------------------


@pytest.mark.parametrize("precision", ["int4", "fp8"])
def test_draft_steps_run_the_copy_and_verify_steps_the_model(precision):
    """The LM head's output in each forward is either exactly the float32 head's (prefill,
    verify) or not (draft): counted against the steps the stats say ran."""
    family = "qwen3"
    model = model_of(family)
    (row,) = make_prompts(model, family, 1, seed=1)
    head = model.get_output_embeddings()
    calls = []

    def record(module, inputs, output):
        own = torch.nn.functional.linear(inputs[0], module.weight, module.bias)
        calls.append((inputs[0].shape[1], torch.equal(output, own)))

    handle = head.register_forward_hook(record)
    try:
        out = run(model, family, row, gamma=GAMMA, budget=budget_between(model, family, row), draft_weights=precision)
    finally:
        handle.remove()
    stats = out.stats
    assert stats.rounds > 1
    assert calls[0][1]  # the prefill (its last position's logits only): the model's weights
    drafts = [own for width, own in calls[1:] if width == 1]
    verifies = [own for width, own in calls[1:] if width == GAMMA + 1]
    assert len(drafts) == stats.draft_steps and not any(drafts), calls  # every draft step: the copy
    assert len(verifies) == stats.rounds and all(verifies), calls  # every verify: the model's weights
    assert "forward" not in head.__dict__  # the swap is undone after each draft step


def test_quantized_drafts_agree_less_and_stay_lossless():
    """int4 changes the draft (its agreement moves) but not the tokens."""
    family = "mistral"
    model = model_of(family)
    (row,) = make_prompts(model, family, 1, seed=1)
    budget = budget_between(model, family, row)
    own = run(model, family, row, gamma=GAMMA, budget=budget, max_new_tokens=24)
    int4 = run(model, family, row, gamma=GAMMA, budget=budget, max_new_tokens=24, draft_weights="int4")
    assert own.sequences.tolist() == int4.sequences.tolist()
    assert own.stats.acceptance_by_position != int4.stats.acceptance_by_position, (own.stats, int4.stats)


# ---- the copy: once per model, what it costs ------------------------------------------------


def test_the_copy_is_cached_per_model_and_remade_after_an_edit():
    family = "my_qwen2"
    model = model_of(family)
    decoder = std_ext.models.ModelAdapter.for_model(model).decoder
    first = dw.draft_weights_for(model, decoder, "int8")
    assert dw.draft_weights_for(model, decoder, "int8") is first
    n_linear = sum(isinstance(m, torch.nn.Linear) for layer in decoder.layers for m in layer.modules()) + 1
    assert len(first.layers) == n_linear  # every decoder linear and the LM head
    # int8: one byte per weight plus a bf16 scale per output row, against four bytes
    rows = sum(m.weight.shape[0] for m, _ in first.layers)
    assert first.nbytes == first.original_bytes // 4 + 2 * rows
    (row,) = make_prompts(model, family, 1, seed=1)
    out = run(model, family, row, gamma=GAMMA, budget=budget_between(model, family, row), draft_weights="int8")
    assert (out.stats.draft_weights_bytes, out.stats.dense_weight_read_bytes) == (first.nbytes, first.original_bytes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            first.layers[0][0].weight.add_(torch.randn_like(first.layers[0][0].weight))
        again = dw.draft_weights_for(model, decoder, "int8")
        assert again is not first and not torch.equal(again.layers[0][1].q, first.layers[0][1].q)
    finally:
        model.load_state_dict(state)


def test_bf16_of_a_bf16_model_shares_its_weights():
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    quantized = dw._quantize_linear(layer, "bf16")
    assert quantized.weight is not None and quantized.nbytes == 0
    assert quantized.weight.data_ptr() == layer.weight.data_ptr()


# ---- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["int3", "fp16", 8, "auto-ish"])
def test_an_unknown_precision_is_refused_before_any_work(value):
    family = "qwen3"
    model = model_of(family)
    (row,) = make_prompts(model, family, 1, seed=1)
    ran = []
    hooks = [m.register_forward_pre_hook(lambda module, _: ran.append(module)) for m in model.modules()]
    try:
        with pytest.raises(ValueError, match=r"draft_weights: must be None or one of 'bf16', 'fp8', 'int8', 'int4'"):
            run(model, family, row, gamma=GAMMA, budget=8, draft_weights=value)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == []


def test_a_precision_the_gpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"draft_weights: 'fp8' .*8\.9.*NVIDIA A100 is 8\.0"):
        dw.check_draft_weights("fp8", cuda)
    dw.check_draft_weights("int4", cuda)  # sm_80 runs the rest
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match=r"draft_weights: 'int4' needs bfloat16"):
        dw.check_draft_weights("int4", cuda)
    dw.check_draft_weights("int8", cuda)


def test_an_unknown_tensor_parallel_sharding_is_refused():
    """A sharded weight whose layer does not run transformers' column- or row-parallel forward:
    quantizing it without the plan's collectives would compute another function on each rank."""
    from torch.distributed.tensor import Shard

    class Mesh:
        ndim = 1

    layer = torch.nn.Linear(64, 32)
    layer.weight.device_mesh = Mesh()  # the DTensor interface the copy reads
    layer.weight.placements = (Shard(0),)
    with pytest.raises(ValueError, match=r"draft_weights: 'int8': a tensor-parallel Linear .* does not reproduce"):
        dw._quantize_linear(layer, "int8")
