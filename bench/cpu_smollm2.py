"""End to end on the CPU: SmolLM2-135M-Instruct on a 7-8K token document, vanilla vs StD.

    python bench/cpu_smollm2.py                       # the default grid, 3 interleaved repetitions
    python bench/cpu_smollm2.py --configs 6/256/int4,6/256 --reps 5 --out table.md
    python bench/e2e.py --cpu-smollm2 ...             # the same script

Every configuration (``gamma/budget/draft_weights``) decodes the same prompt (a license
text from ``/usr/share/common-licenses`` trimmed to ``--doc-tokens`` tokens, and a
question about it) with ``std_ext.generate``; vanilla is the same engine with
``mode="vanilla"``. Repetitions are interleaved (vanilla, each StD setting, vanilla, ...)
because these machines are shared and noisy: each StD run is divided by the vanilla run
of the same repetition, and the report gives the median of those ratios beside the
median milliseconds per decoded token (decode time only: draft + verify, the prefill
reported apart). It checks that every StD run's tokens equal vanilla's, and reports the
draft agreement and accepted drafts per round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

import std_ext
from std_ext import smollm2

DOCUMENT = "GPL-3"
QUESTION = "What is the purpose of this license according to its preamble? Explain briefly."
DEFAULT_CONFIGS = "6/256,6/256/int8,6/256/int4,9/512/int4,6/1024/int4"


@dataclass
class Config:
    """A StD setting: γ, keep-set budget, draft weights (None: the model's own)."""

    gamma: int | str
    budget: int | str
    draft_weights: str | None = None

    @property
    def name(self) -> str:
        return f"γ {self.gamma}, budget {self.budget}, draft {self.draft_weights or 'model'}"


@dataclass
class Measured:
    ms_per_token: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # vanilla ms / this ms, same repetition
    prefill_s: list[float] = field(default_factory=list)
    agreement: float = 0.0
    accepted: float = 0.0
    gamma: int = 0
    identical: bool = True
    draft_ms: float = 0.0
    verify_ms: float = 0.0


def parse_config(text: str) -> Config:
    parts = text.split("/")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected GAMMA/BUDGET[/DRAFT_WEIGHTS], got {text!r}")

    def number(value: str):
        return value if value == "auto" else int(value)

    return Config(number(parts[0]), number(parts[1]), parts[2] if len(parts) == 3 else None)


def decode_ms_per_token(out) -> float:
    """Decode wall time (draft + verify) per token after the prefill's."""
    emitted = out.stats.new_tokens[0] - 1
    return 1000.0 * out.stats.decode_s / max(emitted, 1)


def run(model, input_ids, candidates, eos, new_tokens: int, config: Config | None):
    kwargs = dict(mode="vanilla") if config is None else dict(
        gamma=config.gamma, budget=config.budget, draft_weights=config.draft_weights)
    return std_ext.generate(model, input_ids, candidate_mask=candidates, max_new_tokens=new_tokens,
                            do_sample=False, eos_token_id=eos, **kwargs)


def measure(args) -> tuple[dict[str, Measured], dict]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = getattr(torch, args.dtype)
    model, tokenizer = smollm2.load_smollm2("cpu", dtype)
    input_ids, candidates = smollm2.document_prompt(tokenizer, smollm2.license_text(args.document), args.question,
                                                    args.doc_tokens)
    eos = -1 if args.no_eos else tokenizer.eos_token_id
    configs = [parse_config(c) for c in args.configs.split(",")]
    results = {"vanilla": Measured()}
    results.update({c.name: Measured() for c in configs})
    # one short warm-up of every path (first calls build the quantized copies and warm caches)
    for config in [None, *configs]:
        run(model, input_ids[:, -512:], candidates[:, -512:], eos, 4, config)
    reference = None
    for rep in range(args.reps):
        order = [None, *configs] if rep % 2 == 0 else [None, *reversed(configs)]
        vanilla_ms = None
        for config in order:
            began = time.perf_counter()
            out = run(model, input_ids, candidates, eos, args.new_tokens, config)
            wall = time.perf_counter() - began
            tokens = out.sequences[0, input_ids.shape[1]:].tolist()
            key = "vanilla" if config is None else config.name
            m = results[key]
            ms = decode_ms_per_token(out)
            m.ms_per_token.append(ms)
            m.prefill_s.append(out.stats.prefill_s)
            if config is None:
                vanilla_ms = ms
                reference = tokens if reference is None else reference
                m.identical &= tokens == reference
            else:
                m.ratios.append(vanilla_ms / ms)
                m.identical &= tokens == reference
                m.agreement, m.accepted, m.gamma = (out.stats.draft_agreement, out.stats.mean_accepted,
                                                    out.stats.gamma)
                m.draft_ms = 1000.0 * out.stats.draft_s / max(out.stats.draft_steps, 1)
                m.verify_ms = 1000.0 * out.stats.verify_s / max(out.stats.rounds, 1)
            print(f"rep {rep} {key:40s} {ms:7.1f} ms/token  (wall {wall:5.1f} s, prefill {out.stats.prefill_s:5.1f} s)",
                  flush=True)
    context = dict(prompt=input_ids.shape[1], document=int(candidates.sum()), new_tokens=args.new_tokens,
                   answer=tokenizer.decode(reference, skip_special_tokens=True).strip(), dtype=args.dtype,
                   threads=torch.get_num_threads(), reps=args.reps)
    return results, context


def report(results: dict[str, Measured], context: dict) -> str:
    vanilla = statistics.median(results["vanilla"].ms_per_token)
    lines = [
        f"SmolLM2-135M-Instruct ({context['dtype']}), CPU {platform.processor() or platform.machine()}, "
        f"{context['threads']} threads; prompt {context['prompt']} tokens (document {context['document']}), "
        f"{context['new_tokens']} new tokens, {context['reps']} interleaved repetitions; median of each.",
        "",
        "| decoding | ms / token | speedup over vanilla (same rep) | draft step ms | verify step ms | "
        "draft agreement | accepted / round | tokens == vanilla |",
        "|---|---|---|---|---|---|---|---|",
        f"| vanilla | {vanilla:.1f} | 1.00x | | {vanilla:.1f} | | | yes |",
    ]
    for name, m in results.items():
        if name == "vanilla":
            continue
        lines.append(
            f"| StD {name} | {statistics.median(m.ms_per_token):.1f} | {statistics.median(m.ratios):.2f}x "
            f"({min(m.ratios):.2f}-{max(m.ratios):.2f}) | {m.draft_ms:.1f} | {m.verify_ms:.1f} | {m.agreement:.3f} | "
            f"{m.accepted:.2f} of {m.gamma} | {'yes' if m.identical else 'NO'} |")
    prefill = statistics.median(results["vanilla"].prefill_s)
    lines += ["", f"Prefill (not in ms / token): {prefill:.1f} s. Answer: {context['answer']!r}"]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated GAMMA/BUDGET[/DRAFT_WEIGHTS] StD settings (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: %(default)s)")
    parser.add_argument("--doc-tokens", type=int, default=7500, help="document tokens kept (default: %(default)s)")
    parser.add_argument("--document", default=DOCUMENT, help="a file of /usr/share/common-licenses")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per run (default: %(default)s)")
    parser.add_argument("--no-eos", action="store_true", help="decode all --new-tokens (ignore EOS)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="also write the markdown table here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results, context = measure(args)
    text = report(results, context)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    return 0 if all(m.identical for m in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
