"""The bandwidth-floor speedup of StD over vanilla for each draft precision (computed, not measured).

    python bench/draft_floor.py            # the Qwen2-7B table of bench/RESULTS.md
    python bench/e2e.py --draft-floors     # the same table

Every step is priced at its bytes, with the engine's own cost model
(:func:`std_ext.budget.predicted_speedup`, which :func:`std_ext.budget.auto_budget` also
uses): a draft step reads the decoder's weights at the draft's precision
(:func:`std_ext.draft_weights.read_bytes`: int4 with its bf16 scale and zero point per group
of 128) plus the keep set and the mean generated tail of every sequence; a verify pass and
a vanilla step read the bf16 weights plus every cached position. The best γ in 1..12 at
per-token agreement 0.9 for every precision (a quantized draft agrees somewhat less:
``bench/RESULTS.md`` has measured agreements).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import std_ext  # noqa: F401
except ImportError:  # the source tree, as `python bench/draft_floor.py` from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from std_ext import budget as budget_model  # noqa: E402
from std_ext import draft_weights as dw  # noqa: E402

# Qwen2-7B in bf16: 15.2 GB of weights read per step, 28 layers x 4 KV heads x 128 x (K, V) x 2 bytes
QWEN2_7B_WEIGHT_BYTES = 15.2e9
QWEN2_7B_POSITION_BYTES = 2 * 28 * 4 * 128 * 2  # 57,344 bytes per cached position
SHAPES = [(1, 16_384), (1, 65_536), (1, 131_072), (8, 16_384), (8, 65_536), (8, 131_072)]
PRECISIONS = (None, "fp8", "int8", "int4")


def floor_speedups(weight_bytes: float = QWEN2_7B_WEIGHT_BYTES, position_bytes: int = QWEN2_7B_POSITION_BYTES,
                   element_bytes: int = 2, keep: int = 1024, max_new_tokens: int = 256, agreement: float = 0.9,
                   shapes=SHAPES, precisions=PRECISIONS) -> dict[tuple[int, int, str | None], tuple[int, float]]:
    """``{(batch, context, precision): (best γ, speedup)}`` at the bandwidth floor."""
    table = {}
    for precision in precisions:
        cost = budget_model.DraftCost(int(weight_bytes), position_bytes,
                                      int(dw.read_bytes(weight_bytes, element_bytes, precision)))
        for batch, context in shapes:
            table[batch, context, precision] = budget_model.predicted_speedup(
                cost, batch=batch, context=context, keep=keep, max_new_tokens=max_new_tokens, agreement=agreement)
    return table


def floor_table(**kwargs) -> str:
    """The markdown table of :func:`floor_speedups`."""
    shapes, precisions = kwargs.get("shapes", SHAPES), kwargs.get("precisions", PRECISIONS)
    table = floor_speedups(**kwargs)
    names = [p or "bf16 (the model's own)" for p in precisions]
    lines = ["| batch × context | " + " | ".join(f"draft {n}" for n in names) + " |",
             "|---|" + "---|" * len(precisions)]
    for batch, context in shapes:
        cells = [f"{table[batch, context, p][1]:.2f}× (γ {table[batch, context, p][0]})" for p in precisions]
        lines.append(f"| {batch} × {context // 1024}K | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agreement", type=float, default=0.9)
    parser.add_argument("--keep", type=int, default=1024, help="keep-set positions per KV head")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    print(f"Qwen2-7B bf16 ({QWEN2_7B_WEIGHT_BYTES / 1e9:.1f} GB weights, {QWEN2_7B_POSITION_BYTES / 1e3:.1f} KB KV per "
          f"token), keep set {args.keep}, {args.max_new_tokens} new tokens, agreement {args.agreement}, best γ <= 12:")
    print(floor_table(agreement=args.agreement, keep=args.keep, max_new_tokens=args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
