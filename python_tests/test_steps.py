"""Decode steps over static buffers (``std_ext.steps``) and CUDA graphs.

On the CPU: each (kind, width) step reuses its preallocated buffers across rounds, the
refresh policy rewrites keep sets in place (so a captured draft step reads them), a
round reads the device exactly once, and a step copies nothing from the host. On a GPU
(skipped without one): tokens are identical with and without graphs for every mode,
policy, sampling and ragged batches with EOS, and the memory the graphs add is reported.
"""

import contextlib

import pytest
import torch

import std_ext
from std_ext.generate import _Decoder
from test_generate import new_tokens
from tiny_models import KINDS, make_inputs, make_model

_models: dict = {}


def model_of(kind: str, device: str = "cpu", dtype=torch.float32):
    key = (kind, device, dtype)
    if key not in _models:
        _models[key] = make_model(kind).to(device=device, dtype=dtype)
    return _models[key]


def text_candidates(inputs: dict) -> torch.Tensor:
    mask = inputs["attention_mask"].bool().clone()
    mask[:, -12:] = False
    mask[:, :6] = False
    return mask


# Methods through which a tensor's value reaches the host: on CUDA each is a sync.
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@contextlib.contextmanager
def counting_host_reads():
    """Count host reads of tensor values inside :meth:`_Decoder.run` (the decode rounds)."""
    counts = {"reads": 0, "inside": False}
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if counts["inside"]:
                counts["reads"] += 1
            return original(self, *args, **kwargs)
        return counted

    run = _Decoder.run

    def counted_run(self, *args, **kwargs):
        counts["inside"] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            counts["inside"] = False

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, wrap(name))
        _Decoder.run = counted_run
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        _Decoder.run = run


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("settings", [
    dict(mode="std", gamma=3),
    dict(mode="std", gamma=3, selection="refresh", budget=40),
    dict(mode="std", gamma="auto", gamma_max=4),
    dict(mode="vanilla"),
    dict(mode="std", gamma=3, do_sample=True, top_k=20),
    dict(mode="std", gamma=3, repetition_penalty=1.2),
    dict(mode="std", gamma=3, selection="follow", budget=40),
], ids=["std", "refresh", "auto", "vanilla", "sampling", "penalty", "follow"])
def test_a_round_reads_the_device_once(settings):
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [40, 52, 60], seed=5)
    settings = {"budget": 30, **settings}
    if settings.get("do_sample"):
        settings["generator"] = torch.Generator().manual_seed(0)
    with counting_host_reads() as counts:
        out = std_ext.generate(model, **inputs, candidate_mask=text_candidates(inputs), max_new_tokens=10, **settings)
    # one readback per round, plus the one that sees every sequence finished; the end-of-run
    # statistics are read once more (four reads, after the last round)
    assert counts["reads"] == out.stats.rounds + 1 + 4, counts


def test_steps_reuse_their_buffers():
    """Each (kind, width) step is built once and fed through its own buffers in every round."""
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [40, 52], seed=6)
    built = []
    from std_ext import steps

    original = steps.StepRunner._build

    def spy(self, *key):
        step = original(self, *key)
        built.append((key, step.tokens.data_ptr(), step.positions.data_ptr()))
        return step

    steps.StepRunner._build = spy
    try:
        out = std_ext.generate(model, **inputs, candidate_mask=text_candidates(inputs), max_new_tokens=12, gamma=3,
                               budget=30)
    finally:
        steps.StepRunner._build = original
    kinds = sorted(key for key, *_ in built)
    assert kinds == [("dense", 4, False), ("sparse", 1, False)]  # one verify width, one draft step
    assert out.stats.rounds > 2  # so both were replayed through the same buffers
    assert out.stats.cuda_graphs == 0  # off CUDA, the buffers run eagerly


def test_refresh_rewrites_keep_sets_in_place():
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [400], n_visual=380, seed=7)  # refresh re-picks blocks of 64
    pointers = {}
    from std_ext.generate import _Decoder as decoder_class

    original = decoder_class._refresh

    def spy(self, *args):
        before = [t.data_ptr() for t in self.cache.keep.indices]
        snapshot = [t.clone() for t in self.cache.keep.indices]
        original(self, *args)
        after = [t.data_ptr() for t in self.cache.keep.indices]
        assert before == after
        pointers["changed"] = pointers.get("changed", False) or any(
            not torch.equal(a, b) for a, b in zip(snapshot, self.cache.keep.indices))

    decoder_class._refresh = spy
    try:
        candidates = inputs["attention_mask"].bool().clone()
        candidates[:, :4] = False
        candidates[:, -10:] = False
        std_ext.generate(model, **inputs, candidate_mask=candidates, max_new_tokens=12, gamma=3, budget=4 + 10 + 128,
                         selection="refresh")
    finally:
        decoder_class._refresh = original
    assert pointers.get("changed"), "the refresh policy never changed a keep set: the test cannot fail"


def test_cuda_graphs_flag_is_a_no_op_off_cuda():
    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [40], seed=8)
    kwargs = dict(candidate_mask=text_candidates(inputs), max_new_tokens=8, gamma=3, budget=30)
    a = std_ext.generate(model, **inputs, cuda_graphs=True, **kwargs)
    b = std_ext.generate(model, **inputs, cuda_graphs=False, **kwargs)
    assert torch.equal(a.sequences, b.sequences) and a.stats.cuda_graphs == 0


# --------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and std_ext.cuda_kernels_built()),
                          reason="needs a CUDA GPU and std_ext built with CUDA")


@cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", [
    dict(mode="std", gamma=4),
    dict(mode="std", gamma=4, selection="refresh"),
    dict(mode="std", gamma=4, selection="recent"),
    dict(mode="std", gamma="auto", gamma_max=6),
    dict(mode="vanilla"),
    dict(mode="std", gamma=4, do_sample=True, top_k=20),
], ids=["std", "refresh", "recent", "auto", "vanilla", "sampling"])
def test_graphs_give_the_same_tokens(kind, settings):
    model = model_of(kind, "cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in make_inputs(model, kind, [90, 120, 140], seed=9).items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(torch.bfloat16)
    eos = model.generation_config.eos_token_id
    runs = {}
    for graphs in (False, True):
        kwargs = dict(settings, max_new_tokens=24, budget=64, cuda_graphs=graphs)
        if kwargs.get("do_sample"):
            kwargs["generator"] = torch.Generator("cuda").manual_seed(1)
        out = std_ext.generate(model, **inputs, **kwargs)
        runs[graphs] = (new_tokens(out.sequences.cpu(), inputs["input_ids"].shape[1]), out.stats)
    assert runs[True][0] == runs[False][0]
    stats = runs[True][1]
    assert stats.cuda_graphs >= 1 and not stats.warnings, stats.warnings
    print(f"{kind} {settings}: {stats.cuda_graphs} graphs, {stats.graph_memory_bytes / 2**20:.1f} MiB")
    del eos


@cuda
def test_graphs_with_eos_in_a_ragged_batch():
    model = model_of("qwen2", "cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in make_inputs(model, "qwen2", [60, 90, 130], seed=10).items()}
    plain = std_ext.generate(model, **inputs, max_new_tokens=16, mode="vanilla", cuda_graphs=False)
    eos = int(plain.sequences[1, inputs["input_ids"].shape[1] + 5])  # row 1 stops early
    outs = [std_ext.generate(model, **inputs, max_new_tokens=16, gamma=4, budget=64, eos_token_id=eos,
                             candidate_mask=text_candidates(inputs), cuda_graphs=graphs) for graphs in (False, True)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[1].stats.new_tokens[1] < 16


def test_follow_rechooses_inside_every_draft_step_in_place():
    """selection='follow' re-picks each layer's keep set from each draft step's own query,
    into the same buffer (what a captured draft step reads), and stays lossless."""
    from std_ext.selection import StepKeepSets

    model = model_of("qwen2")
    inputs = make_inputs(model, "qwen2", [400], n_visual=380, seed=12)
    candidates = inputs["attention_mask"].bool().clone()
    candidates[:, :4] = False
    candidates[:, -10:] = False
    seen, original = {}, StepKeepSets.__getitem__

    def spy(self, layer):
        out = original(self, layer)
        if layer == 0:
            seen.setdefault("pointers", set()).add(out.data_ptr())
            seen.setdefault("sets", []).append(out.clone())
        return out

    StepKeepSets.__getitem__ = spy
    try:
        kwargs = dict(candidate_mask=candidates, max_new_tokens=12, budget=14 + 96)
        out = std_ext.generate(model, **inputs, gamma=4, selection="follow", **kwargs)
    finally:
        StepKeepSets.__getitem__ = original
    vanilla = std_ext.generate(model, **inputs, mode="vanilla", **kwargs)
    assert torch.equal(out.sequences, vanilla.sequences)
    assert len(seen["pointers"]) == 1  # always the same buffer
    distinct = {tuple(t.flatten().tolist()) for t in seen["sets"]}
    assert len(distinct) > 2, "the keep set never changed between draft steps: the test cannot fail"
