"""The paper's central claim on a real model: does a keep set chosen by the question let
the sparse draft agree with the dense model?

SmolLM2-135M-Instruct (``std_ext.smollm2``) reads six real documents (Debian's license
texts, trimmed to the same length) with a question after each; the document span is the
selection pool. For every selection policy, budget and γ, :func:`std_ext.agreement.measure_agreement`
reports the per-token draft agreement (sparse vs dense next token), the mean accepted
drafts per round and the acceptance rate (accepted / γ); ``oracle`` (each draft query's
own top-K, recomputed every step) is the ceiling. Greedy decoding, CPU, float32.

Every configuration is also placed on the *bytes axis*: the cache bytes one draft step
reads for its keep set, scoring reads included (``AgreementRecord.draft_kv_bytes``), so
that policies that read more to choose better are compared at equal cost. ``--plot``
draws agreement and accepted drafts at γ = 9 against those bytes, one line per policy
(needs matplotlib). The report also gives what ``budget="auto"`` chooses for this batch
and, computed from the same cost model (:mod:`std_ext.budget`), for a Qwen2-7B-shaped
video LLM at batch 1 and 8 over 16K-128K contexts.

Run (the full grid takes about an hour on 2 CPU cores)::

    PYTHONPATH=. python bench/agreement.py --out bench/agreement.md --plot bench/agreement_bytes.png

``--quick`` runs a small grid (2 pairs, 512-token documents) in a few minutes.

The precision axis (issue 22): ``--draft-weights`` runs every configuration with the draft's
linear layers at each precision, after the one prefill. The report adds the grid (precision x
budget: agreement / accepted drafts per verify) and the same configurations against the draft
step's total bytes (weights at the precision + the batch's keep-set reads), with the speedup
``std_ext.budget.predicted_speedup`` gives for those bytes at the measured agreement (the
bandwidth floor; it ranks precisions, a CPU's compute-bound verify keeps it from being a
prediction of CPU time). The grid of ``bench/RESULTS.md`` (about 25 minutes on the shared
2-core machine; fp8 is the CPU's dequantize-then-matmul reference, half of the time)::

    PYTHONPATH=. python bench/agreement.py --pairs 2 --doc-tokens 1024 --budgets 128 256 512 --gammas 4 \
        --policies question --draft-weights model bf16 fp8 int8 int4 --max-new-tokens 24 --threads 1 \
        --precision-plot bench/agreement_precision_grid.png
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict

import torch

from std_ext import budget as budget_model
from std_ext import draft_weights as dw
from std_ext import smollm2
from std_ext.agreement import POLICIES, AgreementRecord, measure_agreement
from std_ext.selection import make_policy

MB = 1e6

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


def budget_arg(text: str) -> int | str:
    """A budget on the command line: an integer or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is an integer or 'auto', got {text!r}") from None


def _budget_order(budget: int | str) -> tuple:
    """Integer budgets ascending, then "auto"."""
    return (isinstance(budget, str), budget if isinstance(budget, int) else 0)


def _configs(records: list[AgreementRecord]) -> dict:
    """(policy, budget) -> {γ: record}, in measurement order."""
    by_config = defaultdict(dict)
    for record in records:
        by_config[(record.policy, record.budget)][record.gamma] = record
    return by_config


def bytes_table(records: list[AgreementRecord], gammas: list[int]) -> str:
    """Markdown: every (policy, budget) on the bytes axis, sorted by policy then bytes.

    kept = positions per KV head (non-candidates included); read = positions a draft step
    reads per KV head and layer, scoring included; MB = those bytes over all layers, per
    sequence and draft step (at the largest γ for the policies whose scoring is per round).
    """
    rate_gamma = max(gammas)
    head = ("| policy | budget | kept | read | draft-step KV MB | agreement | "
            + " | ".join(f"accepted γ={g}" for g in gammas) + " |")
    lines = [head, "|" + "---|" * (6 + len(gammas))]
    rows = sorted(_configs(records).items(), key=lambda item: (POLICIES.index(item[0][0]), item[1][rate_gamma].draft_kv_bytes))
    for (policy, budget), row in rows:
        last = row[rate_gamma]
        cells = " | ".join(f"{row[g].mean_accepted:.2f}" for g in gammas)
        lines.append(f"| {policy} | {budget} | {last.kept:.0f} | {last.draft_positions:.0f} | "
                     f"{last.draft_kv_bytes / MB:.1f} | {row[min(row)].agreement:.3f} | {cells} |")
    return "\n".join(lines)


def at_bytes(records: list[AgreementRecord], reference: tuple[str, int], gamma: int) -> str:
    """Markdown: each policy's agreement and accepted drafts (at ``gamma``) at the draft-step
    bytes of the ``reference`` configuration, interpolated linearly in log-bytes between
    the integer budgets measured on either side (blank where the grid does not reach)."""
    import math

    configs = _configs(records)
    if reference not in configs or gamma not in configs[reference]:
        return ""
    target = configs[reference][gamma].draft_kv_bytes
    lines = [f"| policy | agreement | accepted γ={gamma} | between budgets |", "|---|---|---|---|"]
    for policy in POLICIES:
        points = sorted((row[gamma].draft_kv_bytes, row[min(row)].agreement, row[gamma].mean_accepted, budget)
                        for (p, budget), row in configs.items() if p == policy and isinstance(budget, int) and gamma in row)
        below = [pt for pt in points if pt[0] <= target]
        above = [pt for pt in points if pt[0] >= target]
        if not below or not above:
            continue
        low, high = below[-1], above[0]
        t = 0.0 if high[0] == low[0] else (math.log(target) - math.log(low[0])) / (math.log(high[0]) - math.log(low[0]))
        agreement, accepted = (low[i] + t * (high[i] - low[i]) for i in (1, 2))
        lines.append(f"| {policy} | {agreement:.3f} | {accepted:.2f} | {low[3]}-{high[3]} |")
    return "\n".join(lines)


def plot(records: list[AgreementRecord], gamma: int, path: str, title: str) -> None:
    """PNG: agreement and accepted drafts at ``gamma`` against draft-step KV MB, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = _configs(records)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in POLICIES:
        points = sorted((row[gamma].draft_kv_bytes / MB, row[min(row)].agreement, row[gamma].mean_accepted)
                        for (p, budget), row in configs.items() if p == policy and isinstance(budget, int) and gamma in row)
        if not points:
            continue
        style = dict(marker="o", label=policy, zorder=3 if policy == "oracle" else 2)
        if policy == "oracle":
            style.update(color="black", linestyle="--", label="oracle (scoring not charged)")
        xs = [pt[0] for pt in points]
        axes[0].plot(xs, [pt[1] for pt in points], **style)
        axes[1].plot(xs, [pt[2] for pt in points], **style)
        auto = configs.get((policy, "auto"))
        if auto is not None and gamma in auto:  # budget="auto" as a star on its policy's line
            color = axes[0].get_lines()[-1].get_color()
            axes[0].plot(auto[gamma].draft_kv_bytes / MB, auto[min(auto)].agreement, "*", color=color, markersize=13)
            axes[1].plot(auto[gamma].draft_kv_bytes / MB, auto[gamma].mean_accepted, "*", color=color, markersize=13)
    _finish(figure, axes, gamma, "draft-step KV MB per sequence (keep set + scoring reads)",
            title + "  (stars: budget='auto')", path)


def _finish(figure, axes, gamma: int, xlabel: str, title: str, path: str) -> None:
    """The two panels' axes (agreement, accepted drafts; log bytes), legend and title; save as PNG."""
    for axis, label in zip(axes, ["per-token agreement", f"accepted drafts per round, γ = {gamma}"]):
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def precision_table(records: list[AgreementRecord], gamma: int, floor=None) -> str:
    """Per (policy, budget, draft precision): agreement and accepted drafts against the draft
    step's *total* bytes (weights at the precision + the batch's keep-set reads).

    With ``floor`` (a record -> (γ, speedup) function, see :func:`speedup_floor`) a last column
    gives the speedup the engine's cost model predicts from those bytes and the measured agreement.
    """
    head = ("| policy | budget | draft weights | weights MB | KV MB (batch) | total MB | agreement | "
            f"accepted / round (γ {gamma}) |")
    lines = [head + (" bandwidth floor (best γ) |" if floor else ""), "|" + "---|" * (9 if floor else 8)]
    for r in records:
        if r.gamma != gamma:
            continue
        first = next(x for x in records if (x.policy, x.budget, x.draft_weights) == (r.policy, r.budget, r.draft_weights))
        line = (f"| {r.policy} | {r.budget} | {r.draft_weights or 'model'} | {r.draft_weight_bytes / MB:.1f} | "
                f"{r.batch * r.draft_kv_bytes / MB:.1f} | {r.draft_total_bytes / MB:.1f} | {first.agreement:.3f} | "
                f"{r.mean_accepted:.2f} |")
        if floor:
            best, speedup = floor(dataclasses.replace(r, agreement=first.agreement))
            line += f" {speedup:.2f}x (γ {best}) |"
        lines.append(line)
    return "\n".join(lines)


def precision_grid(records: list[AgreementRecord], gamma: int) -> str:
    """Markdown: draft precision x keep budget, per policy; each cell the agreement and the
    accepted drafts per verify at ``gamma`` (the grid the precision table lists by bytes)."""
    budgets = sorted({r.budget for r in records}, key=_budget_order)
    lines = ["| policy | draft weights | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "|" + "---|" * (2 + len(budgets))]
    cells = {}
    for r in records:
        if r.gamma == gamma:
            first = next(x for x in records if (x.policy, x.budget, x.draft_weights) == (r.policy, r.budget, r.draft_weights))
            cells[(r.policy, r.draft_weights or "model", r.budget)] = f"{first.agreement:.3f} / {r.mean_accepted:.2f}"
    for policy, precision in dict.fromkeys((p, w) for p, w, _ in cells):
        lines.append(f"| {policy} | {precision} | "
                     + " | ".join(cells.get((policy, precision, b), "-") for b in budgets) + " |")
    return "\n".join(lines)


def speedup_floor(cost: budget_model.DraftCost, context: float, max_new_tokens: int, gamma_max: int = 12):
    """record -> (best γ, speedup): :func:`std_ext.budget.predicted_speedup` (the prices of
    ``budget="auto"``) for the record's draft weights, keep-set reads and measured agreement,
    every step costing its bytes. A bandwidth floor: on the CPU the verify's attention is
    compute-bound (see RESULTS), so it ranks precisions by bytes and agreement, not by measured time."""

    def floor(record: AgreementRecord) -> tuple[int, float]:
        draft = dataclasses.replace(cost, draft_weight_bytes=int(record.draft_weight_bytes))
        return budget_model.predicted_speedup(draft, batch=record.batch, context=int(context),
                                              keep=int(round(record.draft_positions)), max_new_tokens=max_new_tokens,
                                              agreement=record.agreement, gamma_max=gamma_max)

    return floor


def precision_plot(records: list[AgreementRecord], gamma: int, path: str, title: str) -> None:
    """PNG: agreement and accepted drafts at ``gamma`` against the draft step's total MB, one line per
    (policy, precision) over the budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = dict.fromkeys((r.policy, r.draft_weights) for r in records)
    for policy, precision in series:
        points = sorted((r.draft_total_bytes / MB, r.agreement, r.mean_accepted) for r in records
                        if (r.policy, r.draft_weights, r.gamma) == (policy, precision, gamma)
                        and isinstance(r.budget, int))
        if not points:
            continue
        label = f"{policy}, {precision or 'model'} weights"
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axes[1].plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    _finish(figure, axes, gamma, "draft-step MB, batch (weights + keep sets)", title, path)


# Qwen2-7B's text decoder (bench/e2e.py's shape), bf16: what a draft step reads per forward
QWEN2_7B = dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064)


def qwen2_7b_cost() -> budget_model.DraftCost:
    """Weights a Qwen2-7B draft step reads (decoder layers with biases, final norm, LM head) in bf16."""
    s = QWEN2_7B
    kv = s["kv_heads"] * s["head_dim"]
    attention = 2 * s["hidden"] * s["hidden"] + s["hidden"] + 2 * (s["hidden"] * kv + kv)  # q/o, q bias, k/v
    layer = attention + 3 * s["hidden"] * s["intermediate"] + 2 * s["hidden"]
    parameters = s["layers"] * layer + s["hidden"] + s["vocab"] * s["hidden"]
    return budget_model.shape_cost(parameters, s["layers"], s["kv_heads"], s["head_dim"], 2)


def qwen_auto_table(policies: list[str], max_new_tokens: int = 256, text_tokens: int = 64) -> str:
    """Markdown: budget="auto" for a Qwen2-7B-shaped video LLM (computed, no model run).

    Each prompt is ``context`` tokens of which ``text_tokens`` are text (non-candidates),
    the rest video; γ = 9 and ``gamma="auto"`` (priced at the best γ for the prior agreement).
    """
    cost = qwen2_7b_cost()
    lines = ["| policy | γ | batch | context | kept per KV head | share of candidates | keep-set bytes / (weights + tails) |",
             "|---|---|---|---|---|---|---|"]
    for policy in policies:
        reads = make_policy(policy).draft_reads
        for gamma in (9, None):
            for batch in (1, 8):
                for context in (16_384, 32_768, 65_536, 131_072):
                    chosen = budget_model.auto_budget(
                        cost, prompt_len=[context] * batch, n_candidates=[context - text_tokens] * batch,
                        n_always=[text_tokens] * batch, max_new_tokens=max_new_tokens, gamma=gamma, reads=reads)
                    label = str(gamma) if gamma is not None else f"auto ({chosen.gamma})"
                    lines.append(f"| {policy} | {label} | {batch} | {context // 1024}K | {chosen.budgets[0]} | "
                                 f"{chosen.k[0] / (context - text_tokens):.1%} | {chosen.fraction:.1%} |")
    return "\n".join(lines)


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
    for budget, row in sorted(by_budget.items(), key=lambda item: _budget_order(item[0])):
        lines.append(f"| {budget} | " + " | ".join(f"{row[p]:.2f}" if p in row else "-" for p in policies) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=budget_arg, nargs="+", default=[128, 256, 512, 1024, 2048, "auto"])
    parser.add_argument("--gammas", type=int, nargs="+", default=[3, 5, 9])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help="how many (document, question) pairs")
    parser.add_argument("--doc-tokens", type=int, default=3584, help="document length after trimming")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a small grid (2 pairs, 512-token documents)")
    parser.add_argument("--out", help="also write the markdown report here")
    parser.add_argument("--plot", help="also draw agreement / accepted drafts against draft-step bytes (PNG)")
    parser.add_argument("--draft-weights", nargs="+", default=["model"], choices=["model", *dw.PRECISIONS],
                        help="draft precisions measured (the precision axis; 'model': the model's own weights)")
    parser.add_argument("--precision-plot", help="also draw agreement / accepted drafts against the draft step's "
                                                 "total bytes (weights + KV), per precision (PNG)")
    parser.add_argument("--grid", nargs="+", metavar="POLICY=B,B,...",
                        help="per-policy budgets (e.g. question=512,1024,auto oracle=256) instead of policies x budgets")
    args = parser.parse_args(argv)
    if args.quick:
        args.budgets, args.gammas, args.pairs, args.doc_tokens, args.max_new_tokens = [64, 256, "auto"], [3, 9], 2, 512, 16
    if not 1 <= args.pairs <= len(PAIRS):
        parser.error(f"--pairs must be in 1..{len(PAIRS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()
    pairs = PAIRS[: args.pairs]
    input_ids, attention_mask, candidate_mask = build_batch(tokenizer, pairs, args.doc_tokens)
    configs = None
    if args.grid:
        configs = [(policy, budget_arg(b)) for entry in args.grid for policy, budgets in [entry.split("=", 1)]
                   for b in budgets.split(",")]
        args.policies = list(dict.fromkeys(policy for policy, _ in configs))
    records = measure_agreement(
        model, input_ids, attention_mask, candidate_mask=candidate_mask, budgets=args.budgets, gammas=args.gammas,
        policies=args.policies, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, progress=True,
        configs=configs, draft_weights=[None if p == "model" else p for p in args.draft_weights],
    )
    elapsed = time.perf_counter() - began
    all_records = records
    records = [r for r in all_records if r.draft_weights == all_records[0].draft_weights]  # the first precision
    gammas = sorted(set(args.gammas))
    rate_gamma = 9 if 9 in gammas else gammas[-1]
    heading = (
        f"SmolLM2-135M-Instruct, float32 CPU ({torch.get_num_threads()} threads), greedy; {len(pairs)} documents "
        f"({', '.join(name for name, _ in pairs)}) trimmed to {args.doc_tokens} tokens, prompts "
        f"{int(attention_mask.sum(1).min())}-{int(attention_mask.sum(1).max())} tokens; {args.max_new_tokens} "
        f"answer tokens at most ({records[0].answer_tokens} in all); budget counts the ~{input_ids.shape[1] - args.doc_tokens} "
        f"non-document tokens too; 'auto' is priced for this batch of {len(pairs)} at γ = {max(gammas)}; "
        f"{elapsed / 60:.1f} min.")
    parts = [
        heading,
        "Mean accepted drafts per round (a round emits that + 1 tokens); agreement = share of answer positions "
        "whose first sparse draft equals the dense next token:",
        table(records, gammas),
        f"Acceptance rate (accepted / γ) at γ = {rate_gamma}:",
        rates(records, rate_gamma),
        "On the bytes axis (kept: positions per KV head; read: positions a draft step reads per KV head and layer, "
        "keys of scoring reads counting half; MB: per sequence and draft step over all layers; the oracle is "
        "charged its keep set only):",
        bytes_table(records, gammas),
    ]
    reference = ("question", 1024)
    matched = at_bytes(records, reference, rate_gamma)
    if matched:
        parts += [f"At the draft-step bytes of question / budget 1024 (γ = {rate_gamma}):", matched]
    policies = [p for p in args.policies if p in ("question", "refresh", "follow")]
    if policies:
        parts += ["budget='auto' for a Qwen2-7B-shaped video LLM (bf16, 64 text tokens, 256 new tokens), computed "
                  "from std_ext.budget's cost model (no model run):", qwen_auto_table(policies)]
    if len(args.draft_weights) > 1:
        from std_ext.models import ModelAdapter

        cost = budget_model.model_cost(ModelAdapter.for_model(model), model.dtype)
        floor = speedup_floor(cost, float(attention_mask.sum(1).float().mean()), args.max_new_tokens)
        parts += [f"The precision axis (γ = {rate_gamma}): agreement / accepted drafts per verify, draft precision x "
                  "budget:", precision_grid(all_records, rate_gamma),
                  "The same against the draft step's total bytes over the batch (weights read once + keep-set "
                  "reads); the bandwidth floor is std_ext.budget.predicted_speedup with the measured agreement "
                  "(verify and vanilla read the model's weights and every cached position):",
                  precision_table(all_records, rate_gamma, floor)]
    report = "\n\n".join(parts)
    print(report)
    if args.plot:
        plot(records, rate_gamma, args.plot, heading.split(";")[0] + f"; {len(pairs)} documents")
    if args.precision_plot:
        precision_plot(all_records, rate_gamma, args.precision_plot,
                       heading.split(";")[0] + f"; {len(pairs)} documents")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
