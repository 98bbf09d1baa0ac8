"""The paper's central claim on a real model: does a keep set chosen by the question let
the sparse draft agree with the dense model?

SmolLM2-135M-Instruct (``std_ext.smollm2``) reads six real documents (Debian's license
texts, trimmed to the same length) with a question after each; the document span is the
selection pool. For every selection policy, budget and γ, :func:`std_ext.agreement.measure_agreement`
reports the per-token draft agreement (sparse vs dense next token), the mean accepted
drafts per round and the acceptance rate (accepted / γ); ``oracle`` (each draft query's
own top-K, recomputed every step) is the ceiling. Greedy decoding, CPU, float32.

Run (about an hour on 2 CPU cores for the full grid)::

    PYTHONPATH=. python bench/agreement.py --out bench/agreement.md

``--quick`` runs a small grid (2 pairs, 512-token documents) in a few minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

from std_ext import smollm2
from std_ext.agreement import POLICIES, AgreementRecord, measure_agreement

# (document, question): questions about the part of each document that survives the trim
PAIRS = (
    ("GPL-2", "What must you do when you distribute the program in object code or executable form? Explain briefly."),
    ("GPL-3", "What is the purpose of this license according to its preamble? Explain briefly."),
    ("LGPL-2.1", "How does this license differ from the ordinary GPL? Explain briefly."),
    ("MPL-1.1", "What must a contributor make available when distributing modifications? Explain briefly."),
    ("MPL-2.0", "What happens to your rights under this license if you fail to comply with it? Explain briefly."),
    ("GFDL-1.3", "What conditions apply when you publish more than 100 printed copies of the document? Explain briefly."),
)


def build_batch(tokenizer, pairs, doc_tokens: int):
    """Left-padded batch of the document prompts: input_ids, attention_mask, candidate_mask ``[B, T]``."""
    prompts = [smollm2.document_prompt(tokenizer, smollm2.license_text(name), question, doc_tokens)
               for name, question in pairs]
    width = max(ids.shape[1] for ids, _ in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    candidate_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (ids, candidates) in enumerate(prompts):
        length = ids.shape[1]
        input_ids[row, width - length :] = ids[0]
        attention_mask[row, width - length :] = 1
        candidate_mask[row, width - length :] = candidates[0]
    return input_ids, attention_mask, candidate_mask


def table(records: list[AgreementRecord], gammas: list[int]) -> str:
    """Markdown: one row per (policy, budget); agreement, then mean accepted per round for each γ."""
    by_config = defaultdict(dict)
    for record in records:
        by_config[(record.policy, record.budget)][record.gamma] = record
    head = "| policy | budget | agreement | " + " | ".join(f"γ={g}" for g in gammas) + " |"
    lines = [head, "|" + "---|" * (3 + len(gammas))]
    for (policy, budget), row in by_config.items():
        # for "refresh" the keep set follows the rounds, so its agreement is the γ=1 first-draft acceptance
        agreement = row[min(row)].agreement
        cells = " | ".join(f"{row[g].mean_accepted:.2f}" for g in gammas)
        lines.append(f"| {policy} | {budget} | {agreement:.3f} | {cells} |")
    return "\n".join(lines)


def rates(records: list[AgreementRecord], gamma: int) -> str:
    """Markdown: acceptance rate (accepted / γ) at one γ, policies as columns."""
    by_budget = defaultdict(dict)
    for record in records:
        if record.gamma == gamma:
            by_budget[record.budget][record.policy] = record.acceptance_rate
    policies = [p for p in POLICIES if any(p in row for row in by_budget.values())]
    lines = ["| budget | " + " | ".join(policies) + " |", "|" + "---|" * (1 + len(policies))]
    for budget, row in sorted(by_budget.items()):
        lines.append(f"| {budget} | " + " | ".join(f"{row[p]:.2f}" for p in policies) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--gammas", type=int, nargs="+", default=list(range(1, 13)))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help="how many (document, question) pairs")
    parser.add_argument("--doc-tokens", type=int, default=3584, help="document length after trimming")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a small grid (2 pairs, 512-token documents)")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.gammas, args.pairs, args.doc_tokens, args.max_new_tokens = [64, 256], [1, 4, 9], 2, 512, 16
    if not 1 <= args.pairs <= len(PAIRS):
        parser.error(f"--pairs must be in 1..{len(PAIRS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()
    pairs = PAIRS[: args.pairs]
    input_ids, attention_mask, candidate_mask = build_batch(tokenizer, pairs, args.doc_tokens)
    records = measure_agreement(
        model, input_ids, attention_mask, candidate_mask=candidate_mask, budgets=args.budgets, gammas=args.gammas,
        policies=args.policies, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, progress=True,
    )
    elapsed = time.perf_counter() - began
    gammas = sorted(set(args.gammas))
    rate_gamma = 9 if 9 in gammas else gammas[-1]
    report = "\n\n".join([
        f"SmolLM2-135M-Instruct, float32 CPU ({torch.get_num_threads()} threads), greedy; {len(pairs)} documents "
        f"({', '.join(name for name, _ in pairs)}) trimmed to {args.doc_tokens} tokens, prompts "
        f"{int(attention_mask.sum(1).min())}-{int(attention_mask.sum(1).max())} tokens; {args.max_new_tokens} "
        f"answer tokens at most ({records[0].answer_tokens} in all); budget counts the ~{input_ids.shape[1] - args.doc_tokens} "
        f"non-document tokens too; {elapsed / 60:.1f} min.",
        "Mean accepted drafts per round (a round emits that + 1 tokens); agreement = share of answer positions "
        "whose first sparse draft equals the dense next token:",
        table(records, gammas),
        f"Acceptance rate (accepted / γ) at γ = {rate_gamma}:",
        rates(records, rate_gamma),
    ])
    print(report)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
