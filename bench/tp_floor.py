"""Per-rank bytes of decode steps under tensor parallelism, and the StD speedup they imply (computed).

    python bench/tp_floor.py [--out tp_floor.md]

A bandwidth floor model, not a measurement: every step reads its weights and its KV
bytes once, on each of ``tp`` ranks at once, so a step's time is its per-rank bytes over
one GPU's bandwidth (which cancels in the speedup). Under ``transformers``' tensor-
parallel plan every linear layer and the LM head are split over the ranks, the norms are
replicated and the input embedding reads only its tokens' rows; K/V heads split evenly.
A step all-reduces its hidden states twice per layer (after the attention and the MLP
output projections) and gathers the logits; those bytes are listed, and a second
speedup column charges each collective a fixed latency, the term that bytes alone miss.

Shape: a 72B video LLM's decoder (Qwen2-VL-72B / Qwen2.5-VL-72B / LLaVA-OneVision-72B:
80 layers, hidden 8192, 64 query / 8 KV heads, head_dim 128, MLP 29568, vocab 152064),
bf16; a draft step reads the keep set (budget 1024) + the generated tail (64 on average
over 128 new tokens); vanilla and verify steps read the whole context.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from std_ext import gamma as gm  # noqa: E402  (the cost model the engine's γ controller uses)

SHAPE_72B = dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, mlp=29568, vocab=152064)
ELEMENT = 2  # bf16
BUDGET, TAIL = 1024, 64
GAMMA_MAX = 12
AGREEMENTS = (0.9, 0.95)
COLLECTIVE_LATENCY_S = 10e-6  # an assumed cost per all-reduce / all-gather on NVLink, for the second column
BANDWIDTH = 4.8e12  # bytes/s, H200 datasheet: only for the latency column (the bytes-only speedup needs none)


@dataclass
class StepBytes:
    """One rank's bytes for one step kind: what it reads, and what its collectives move."""

    weights: float
    kv: float
    collective: float  # bytes of all-reduce / all-gather messages (message size, per rank)
    collectives: int  # number of collective calls

    @property
    def total(self) -> float:
        return self.weights + self.kv


def weight_bytes_per_rank(shape: dict, tp: int) -> float:
    """Linear layers and the LM head split over ``tp``; the norms replicated; no input embedding."""
    h, d = shape["hidden"], shape["head_dim"]
    attention = h * shape["heads"] * d * 2 + h * shape["kv_heads"] * d * 2  # q, o; k, v
    biases = (shape["heads"] + 2 * shape["kv_heads"]) * d  # q/k/v biases (Qwen2)
    mlp = 3 * h * shape["mlp"]
    per_layer = (attention + biases + mlp) / tp + 2 * h  # two RMSNorms replicated
    return (shape["layers"] * per_layer + h + shape["vocab"] * h / tp) * ELEMENT


def kv_bytes_per_rank(shape: dict, tp: int, batch: int, positions: float) -> float:
    return 2 * shape["layers"] * batch * (shape["kv_heads"] / tp) * positions * shape["head_dim"] * ELEMENT


def step_bytes(shape: dict, tp: int, batch: int, context: int, kind: str, gamma: int = 9) -> StepBytes:
    queries = gamma + 1 if kind == "verify" else 1
    positions = BUDGET + TAIL if kind == "draft" else context + TAIL
    weights = weight_bytes_per_rank(shape, tp)
    kv = kv_bytes_per_rank(shape, tp, batch, positions)
    if tp == 1:
        return StepBytes(weights, kv, 0.0, 0)
    hidden_messages = 2 * shape["layers"] * batch * queries * shape["hidden"] * ELEMENT
    logits = batch * queries * shape["vocab"] * ELEMENT
    return StepBytes(weights, kv, hidden_messages + logits, 2 * shape["layers"] + 1)


def speedup(agreement: float, draft: StepBytes, verify: StepBytes, vanilla: StepBytes,
            latency: float = 0.0) -> tuple[int, float]:
    """Best γ and its speedup over vanilla, step times = bytes / bandwidth (+ collectives × latency)."""
    def seconds(step: StepBytes) -> float:
        return step.total / BANDWIDTH + step.collectives * latency

    return gm.best_gamma(agreement, seconds(draft), seconds(verify), seconds(vanilla), GAMMA_MAX)


def table(shape: dict = SHAPE_72B) -> str:
    head = ("| TP | batch × context | weights / rank GiB | vanilla step GiB / rank | draft step GiB / rank | "
            "verify (γ=9) step GiB / rank | collective bytes / step (vanilla, draft; verify) | "
            + " | ".join(f"speedup @ {a} (best γ)" for a in AGREEMENTS) + " | "
            + " | ".join(f"@ {a}, {COLLECTIVE_LATENCY_S * 1e6:.0f} µs/collective" for a in AGREEMENTS) + " |")
    lines = [head, "|" + "---|" * (7 + 2 * len(AGREEMENTS))]
    gib, mib = 2**30, 2**20
    for tp in (1, 2, 4, 8):
        for batch, context in ((1, 32768), (1, 131072), (8, 32768), (8, 131072)):
            vanilla = step_bytes(shape, tp, batch, context, "vanilla")
            draft = step_bytes(shape, tp, batch, context, "draft")
            verify = step_bytes(shape, tp, batch, context, "verify")
            bytes_only = [speedup(a, draft, verify, vanilla) for a in AGREEMENTS]
            with_latency = [speedup(a, draft, verify, vanilla, COLLECTIVE_LATENCY_S) for a in AGREEMENTS]
            collective = (f"{vanilla.collective / mib:.2f} MiB; {verify.collective / mib:.2f} MiB"
                          f" in {vanilla.collectives} calls" if tp > 1 else "none")
            lines.append(
                f"| {tp} | {batch} × {context // 1024}K | {vanilla.weights / gib:.1f} | {vanilla.total / gib:.1f} | "
                f"{draft.total / gib:.1f} | {verify.total / gib:.1f} | {collective} | "
                + " | ".join(f"{s:.2f} ({g})" for g, s in bytes_only) + " | "
                + " | ".join(f"{s:.2f} ({g})" for g, s in with_latency) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    text = ("Computed from the floor model of bench/tp_floor.py (not measured): 72B-shaped decoder, bf16, "
            f"budget {BUDGET}, tail {TAIL}; speedups from std_ext.gamma's cost model at the best γ in 1-{GAMMA_MAX}.\n\n"
            + table() + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
