"""``draft_weights`` under ``transformers``' tensor parallelism: each rank quantizes its own shard.

Two gloo ranks load tiny saved Qwen2 and Qwen2-VL checkpoints with ``tp_plan="auto"`` and
decode with every precision the CPU runs. Checked on every rank:

* the greedy tokens equal ``transformers`` ``generate``'s on one process (lossless), and a
  seeded sampled run with a bf16 draft equals single-process std_ext's with the same draft
  (a bf16 shard is the slice of the full bf16 copy, so the draft is the same function up to
  the reduction order, as for the model's own weights in ``test_tensor_parallel``);
* each quantized layer is the quantization of this rank's slice of the full weight, computed
  here from the single-process model, and the copy holds about half the bytes of the
  single-process copy;
* the draft steps run the copy and the verify steps the model's own shard (the LM head's
  local slice of the gathered logits, step by step);
* different ``draft_weights`` on the two ranks are an error on both, not a hang.
"""

from __future__ import annotations

import pytest
import torch

import std_ext
import std_ext.budget
import std_ext.draft_weights as dw
from test_generate import new_tokens
from test_tensor_parallel import _inputs, _settings, _spawn, saved_checkpoints
from tiny_models import make_model

KINDS = ("qwen2", "qwen2_vl")
PRECISIONS = dw.PRECISIONS  # the CPU runs all four (fp8 in its reference form)
GAMMA = 3
SAMPLED = dict(gamma=GAMMA, do_sample=True, top_k=20, draft_weights="bf16")


def _sharded_slice(full: torch.Tensor, local_weight) -> torch.Tensor:
    """This rank's slice of a full weight, as the DTensor's placement cuts it (dim 0: columns, 1: rows)."""
    dim = local_weight.placements[0].dim % 2
    rank = torch.distributed.get_rank()
    return full.chunk(torch.distributed.get_world_size(), dim)[rank]


def _same_quantization(ours, reference) -> bool:
    """The stored tensors of two quantized layers are bitwise equal."""
    fields = {dw._Int8Linear: ("q", "scale"), dw._Int4Linear: ("packed", "scales_and_zeros")}[type(ours)]
    return all(torch.equal(getattr(ours, f), getattr(reference, f)) for f in fields)


def _copy_checks(model, kind: str) -> dict:
    """Per precision: whether every layer is its own shard quantized, and the bytes against one process's copy."""
    adapter = std_ext.models.ModelAdapter.for_model(model)
    single = make_model(kind)  # the saved checkpoint's weights, on one process
    full = dict(single.named_modules())
    checks = {}
    for precision in ("int8", "int4"):
        copy = dw.draft_weights_for(model, adapter.decoder, precision)
        names = {id(m): name for name, m in model.named_modules()}
        own_shard = []
        for module, quantized in copy.layers:
            reference_module = full[names[id(module)]]
            weight = _sharded_slice(reference_module.weight.detach(), module.weight)
            own_shard.append(_same_quantization(quantized, dw._quantize(reference_module, weight, None, precision)))
        whole = dw.draft_weights_for(single, std_ext.models.ModelAdapter.for_model(single).decoder, precision)
        checks[precision] = (all(own_shard), len(own_shard), copy.nbytes / whole.nbytes,
                             copy.original_bytes / whole.original_bytes)
    # budget="auto" prices one rank's draft step: its shards, its quantized copy (of them)
    ours, theirs = std_ext.budget.model_cost(adapter, torch.float32, copy), \
        std_ext.budget.model_cost(std_ext.models.ModelAdapter.for_model(single), torch.float32, whole)
    checks["cost"] = (ours.weight_bytes / theirs.weight_bytes, ours.draft_weights_read / theirs.draft_weights_read,
                      ours.position_bytes / theirs.position_bytes)
    return checks


def _which_weights(model, inputs: dict, kwargs: dict) -> tuple[list, list, object]:
    """Runs one int4 generation, recording per LM-head call whether this rank's slice of the
    logits is exactly its own float32 shard's product (verify) or not (a quantized draft)."""
    head = model.get_output_embeddings()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    calls = []

    def record(module, args, output):
        local = module.weight.to_local()
        own = torch.nn.functional.linear(args[0], local)
        width = local.shape[0]
        calls.append((args[0].shape[1], torch.equal(output[..., rank * width:(rank + 1) * width], own)))

    handle = head.register_forward_hook(record)
    try:
        out = std_ext.generate(model, **inputs, **kwargs, draft_weights="int4")
    finally:
        handle.remove()
    assert world * head.weight.to_local().shape[0] == head.weight.shape[0]
    return calls, out.stats, "forward" in head.__dict__ and head.__dict__["forward"].__qualname__


def _rank_main(rank: int, models: dict, device: str) -> tuple[None, dict]:
    results = {}
    for kind, model in models.items():
        inputs = _inputs(kind)
        width = inputs["input_ids"].shape[1]
        for precision in PRECISIONS:
            out = std_ext.generate(model, **inputs, **_settings(kind, inputs, dict(gamma=GAMMA)),
                                   draft_weights=precision)
            results[(kind, precision)] = (new_tokens(out.sequences, width), out.stats.draft_weights,
                                          out.stats.draft_steps, round(out.stats.draft_agreement, 3))
        kwargs = _settings(kind, inputs, SAMPLED)
        kwargs["generator"] = torch.Generator().manual_seed(5)
        results[(kind, "sampled")] = new_tokens(std_ext.generate(model, **inputs, **kwargs).sequences, width)
        results[(kind, "copy")] = _copy_checks(model, kind)
    model, inputs = models["qwen2"], _inputs("qwen2")
    settings = _settings("qwen2", inputs, dict(gamma=GAMMA))
    results["which"] = _which_weights(model, inputs, settings)
    try:  # rank 0 drafts with int4, rank 1 with the model's weights
        std_ext.generate(model, **inputs, **dict(settings, max_new_tokens=2),
                         draft_weights="int4" if rank == 0 else None)
        results["mismatch"] = "accepted"
    except ValueError as error:
        results["mismatch"] = str(error)
    return None, results


@pytest.fixture(scope="module")
def checkpoints():
    yield from saved_checkpoints(KINDS)


def test_two_cpu_ranks_quantize_their_own_shards_and_stay_lossless(checkpoints):
    reports = _spawn(checkpoints, "gloo", body=_rank_main)
    greedy, sampled = {}, {}
    for kind in KINDS:
        model = make_model(kind)
        inputs = _inputs(kind)
        width = inputs["input_ids"].shape[1]
        greedy[kind] = new_tokens(model.generate(**inputs, do_sample=False, max_new_tokens=10), width)
        kwargs = _settings(kind, inputs, SAMPLED)
        kwargs["generator"] = torch.Generator().manual_seed(5)
        sampled[kind] = new_tokens(std_ext.generate(model, **inputs, **kwargs).sequences, width)
    for rank, _, results, _ in reports:
        assert "different draft_weights" in results.pop("mismatch"), rank
        calls, stats, forward_left = results.pop("which")
        assert forward_left.endswith("tp_forward"), forward_left  # the plan's own forward is back after each draft
        assert calls[0][1]  # the prefill: the model's own shard
        drafts = [own for w, own in calls[1:] if w == 1]
        verifies = [own for w, own in calls[1:] if w == GAMMA + 1]
        assert len(drafts) == stats.draft_steps > 0 and not any(drafts), (rank, calls)
        assert len(verifies) == stats.rounds and all(verifies), (rank, calls)
        agreement = {}
        for kind in KINDS:
            assert results[(kind, "sampled")] == sampled[kind], (rank, kind)
            copy_checks = dict(results[(kind, "copy")])
            weights, draft, positions = copy_checks.pop("cost")
            # replicated norms keep the weights a little above half; the KV heads are split exactly
            assert 0.5 <= weights < 0.51 and 0.49 < draft < 0.53 and positions == 0.5, (rank, kind, weights, draft)
            for precision, (own_shard, layers, held, original) in copy_checks.items():
                assert own_shard and layers == 2 * 7 + 1, (rank, kind, precision)
                assert original == 0.5, (rank, kind, precision)  # every decoder linear and the head are sharded
                assert 0.49 < held < 0.52, (rank, kind, precision, held)  # + a row-parallel layer's own scales
            for precision in PRECISIONS:
                tokens, ran, steps, agreed = results[(kind, precision)]
                assert tokens == greedy[kind], f"rank {rank}, {kind}, {precision}: {tokens} != {greedy[kind]}"
                assert ran == precision and steps > 0
                agreement[(kind, precision)] = agreed
        print(f"rank {rank}: draft agreement {agreement}")
    # the ranks drafted the same tokens (else their collectives would not have matched)
    assert reports[0][2] == reports[1][2]
