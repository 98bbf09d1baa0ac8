"""End-to-end decoding speed of Sparse-to-Dense on a Qwen2-7B-shaped model (random weights).

The model is ``transformers.Qwen2ForCausalLM`` built from a config of Qwen2-7B's shape
(28 layers, hidden 3584, 28 query / 4 KV heads, head_dim 128, MLP 18944, vocab 152064)
with random bf16 weights drawn on the GPU (nothing is downloaded). Each prompt is random
token ids: 10% text, a "visual" span of 90% (the candidate mask, the keep-set pool), then
a 64-token question. For every (context, batch) that fits in memory, one run measures:

- decode-only time per token of vanilla decoding, StD at ``--gamma``, StD at the γ the
  measured step times say is best, StD with ``gamma="auto"``, and ``transformers``'
  ``generate`` (SDPA, static cache when it works), prefill excluded;
- the vanilla, draft and verify step times, each over its bandwidth floor: the bytes a
  step must read (weights + KV cache for vanilla and verify, weights + keep-set KV for a
  draft) over the device-to-device copy bandwidth measured in the same run;
- mean accepted drafts per round and the per-token draft agreement;
- the speedup StD *would* give at draft agreement 0.9 and 0.95 for γ = 2..12, computed
  from the measured step times (:mod:`std_ext.gamma`'s model), and the best γ;
- prefill and keep-set selection time; peak GPU memory of each run and what StD adds
  over vanilla decoding, against the KV cache's size (target: <= 2%);
- exactness: the share of sequences whose StD tokens equal the vanilla tokens and, at
  each divergence, the dense model's top-2 logit margin there (a near-tie: bf16 rounding
  differs between a one-token step and a γ+1-token verify pass).

Step times come from ``GenerationStats`` (CUDA events per phase): vanilla step =
``verify_s / rounds`` of the vanilla run, draft step = ``draft_s / draft_steps`` and verify
step = ``verify_s / rounds`` of the fixed-γ run. Decode-only time = the ``generate`` call's
wall time (synchronised) minus its prefill and selection, so it includes the loop's
bookkeeping and its one readback per round; for ``transformers``, the time from the first
logits (a logits processor records it) to the end, over the remaining tokens.

A configuration whose estimated peak (weights + KV cache + one prefill layer's activations
over the whole batch: std_ext prefills a batch in one forward) exceeds the GPU's memory is
skipped with a note, as is one that runs out of memory anyway. ``transformers`` runs
without ``torch.compile``, as std_ext does.

Run on a GPU (minutes per configuration; the prefills dominate)::

    python bench/e2e.py --out e2e.md

``--tiny`` shrinks the model (2 layers, hidden 64) and the contexts so that the whole
script runs on the CPU in well under a minute: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import std_ext
except ImportError:  # not installed: the source tree's (built in place), as `python bench/e2e.py` from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import std_ext
from std_ext import gamma as gm  # noqa: E402

from device_rates import copy_bandwidth  # noqa: E402  (bench/, this script's folder)

GiB, MiB = 2**30, 2**20

QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, rope_theta=1_000_000.0, init_std=0.02)
# std 0.2 as in python_tests/tiny_models.py: at hidden 64, std 0.02 would give near-flat logits (ties)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, rope_theta=10_000.0, init_std=0.2)
AGREEMENTS = (0.9, 0.95)
COMPUTED_GAMMAS = range(2, 13)
AUTO_TARGETS = (1.03, 1.05)  # auto / vanilla at most, auto / best fixed γ at most (where StD wins)


# --------------------------------------------------------------------------- set-up


@dataclass
class Settings:
    """What one invocation measures (see ``--help``)."""

    contexts: list[int]
    batches: list[int]
    gamma: int
    budget: int
    new_tokens: int
    question: int
    visual_share: float
    max_margins: int
    hf: bool
    seed: int
    tiny: bool
    device: torch.device
    dtype: torch.dtype
    shape: dict
    graphs: bool = True  # also run vanilla and StD with cuda_graphs=False
    tp: int = 1  # tensor-parallel ranks (under torchrun); byte counts and floors are per rank
    checkpoint: str | None = None  # with tp > 1: where the random model is saved for loading
    pairs: list[tuple[int, int]] | None = None  # (context, batch) to measure, instead of contexts × batches
    draft_weights: tuple[str, ...] = ()  # also run StD at --gamma with each of these draft precisions


def make_config(shape: dict, max_positions: int):
    """A ``Qwen2Config`` of ``shape`` (:data:`QWEN2_7B` or :data:`TINY`) with room for ``max_positions``."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
        max_position_embeddings=max_positions, rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
    )


def build_model(shape: dict, max_positions: int, device: torch.device, dtype: torch.dtype, seed: int):
    """``Qwen2ForCausalLM`` of ``shape`` with weights ~ normal(0, init_std) drawn on ``device``.

    The default initialisation is skipped (on a 7B model it is the slow part); norms get
    weight 1. SDPA is the model's own attention (``transformers`` ``generate`` uses it;
    std_ext swaps in its own while it decodes).
    """
    from transformers import Qwen2ForCausalLM

    config = make_config(shape, max_positions)
    with _no_default_init(), torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:
                param.fill_(1.0)
            else:
                param.normal_(0.0, shape["init_std"], generator=generator)
    model.eval()
    model.generation_config.eos_token_id = None  # every sequence decodes all its tokens
    model.generation_config.pad_token_id = 0
    return model


def _no_default_init():
    """``transformers``' switch that skips weight initialisation (a no-op context if absent)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts: initialise normally, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def make_prompts(settings: Settings, context: int, batch: int, vocab: int, seed: int):
    """Random prompts ``[B, T]``: text, a visual span of ``visual_share`` of T, the question.

    Returns ``(input_ids long [B, T], candidate_mask bool [B, T])``; the candidates are the
    visual span, the question is the last ``settings.question`` tokens.
    """
    span = round(settings.visual_share * context)
    prefix = context - span - settings.question
    if prefix < 0:
        raise ValueError(f"context {context} is too short for a {settings.visual_share:.0%} span and a "
                         f"{settings.question}-token question")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, context), generator=generator)
    candidate_mask = torch.zeros(batch, context, dtype=torch.bool)
    candidate_mask[:, prefix : prefix + span] = True
    return input_ids.to(settings.device), candidate_mask.to(settings.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- byte counts


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor-parallel parameter (the tensor itself when not sharded)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads on this rank: every parameter (its local shard
    under tensor parallelism) but the input embedding table (a step reads only its tokens' rows)."""
    embedding = model.get_input_embeddings().weight
    return sum(_local(p).numel() * p.element_size() for p in model.parameters() if p is not embedding)


def kv_bytes(config, batch: int, positions: float, element: int, tp: int = 1) -> float:
    """K and V bytes of ``positions`` cached tokens per sequence on one of ``tp`` ranks:
    2 × layers × B × H_kv / tp × positions × D × element."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads / tp * positions * head_dim * element


def estimate_peak_bytes(model, settings: Settings, context: int, batch: int) -> int:
    """Peak memory of the biggest run of a configuration, estimated before allocating.

    Weights + the KV cache + one prefill layer's activations over the whole batch (hidden
    states, Q and the GQA-expanded K/V for SDPA, the MLP's gate, up and product), + 1 GiB.
    """
    config = model.config
    element = torch.empty((), dtype=settings.dtype).element_size()
    capacity = context + settings.new_tokens + max(settings.gamma, 12) + 2
    hidden, inter = config.hidden_size, config.intermediate_size
    per_token = element * (6 * hidden + 4 * hidden + 3 * inter)  # [B·T, ·] tensors alive at once, by width
    embedding = _local(model.get_input_embeddings().weight)
    weights = weight_bytes(model) + embedding.numel() * embedding.element_size()
    return int(weights + kv_bytes(config, batch, capacity, element, settings.tp) + batch * context * per_token + GiB)


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One ``generate`` call: new tokens per sequence, its stats, and timings in seconds."""

    name: str
    tokens: list[list[int]] = field(default_factory=list)
    stats: std_ext.GenerationStats | None = None
    per_token_s: float = float("nan")  # decode-only, per token of a sequence
    prefill_s: float = float("nan")
    peak_bytes: int | None = None
    note: str = ""


class _PeakMemory:
    """Peak allocated bytes over a block (CUDA only), from a fresh peak."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)


def run_std(model, input_ids, candidate_mask, settings: Settings, name: str, **kwargs) -> Run:
    """``std_ext.generate`` with ``kwargs``; decode time = wall − prefill − selection."""
    device = settings.device
    with _PeakMemory(device) as memory:
        sync(device)
        began = time.perf_counter()
        out = std_ext.generate(model, input_ids, torch.ones_like(input_ids), candidate_mask=candidate_mask,
                               max_new_tokens=settings.new_tokens,
                               budget=settings.budget, eos_token_id=-1, **kwargs)
        sync(device)
        wall = time.perf_counter() - began
    stats = out.stats
    decode = wall - stats.prefill_s - stats.selection_s
    tokens = out.sequences[:, input_ids.shape[1]:].tolist()
    return Run(name, tokens, stats, decode / max(settings.new_tokens - 1, 1), stats.prefill_s, memory.peak)


class _FirstLogits:
    """A ``transformers`` logits processor that notes when the first logits arrive (prefill done)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            sync(self.device)
            self.at = time.perf_counter()
        return scores


def run_hf(model, input_ids, settings: Settings) -> Run:
    """``transformers`` ``generate`` (greedy, SDPA): static cache, or the default cache if that fails.

    Without ``torch.compile`` (which ``generate`` would otherwise switch on for a static
    cache on a GPU, compiling inside the timed decode and again for every cache size):
    std_ext's loop is not compiled either.
    """
    from transformers import LogitsProcessorList

    errors = []
    for cache in ("static", None):
        clock = _FirstLogits(settings.device)
        kwargs = dict(cache_implementation=cache) if cache else {}
        kwargs["disable_compile"] = True
        try:
            with _PeakMemory(settings.device) as memory:
                sync(settings.device)
                began = time.perf_counter()
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=settings.new_tokens, eos_token_id=None,
                                     logits_processor=LogitsProcessorList([clock]), pad_token_id=0, **kwargs)
                sync(settings.device)
                ended = time.perf_counter()
        except Exception as error:  # report it and try the next cache; the benchmark goes on
            errors.append(f"{cache or 'default'} cache: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        run = Run("transformers", out[:, input_ids.shape[1]:].tolist(), None,
                  (ended - clock.at) / max(settings.new_tokens - 1, 1), clock.at - began, memory.peak)
        run.note = f"{cache or 'default'} cache, no torch.compile" + (f" (after {errors[0]})" if errors else "")
        return run
    return Run("transformers", note="failed: " + "; ".join(errors))


@torch.no_grad()
def top2_margin(model, prompt: torch.Tensor, prefix: list[int]) -> float:
    """The dense model's top-2 logit gap for the token after ``prompt [T] + prefix`` (one forward)."""
    ids = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long, device=prompt.device)])[None]
    top2 = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


# --------------------------------------------------------------------------- one configuration


@dataclass
class Result:
    """Everything measured for one (context, batch)."""

    context: int
    batch: int
    runs: dict[str, Run]
    steps: dict[str, float]  # seconds: vanilla, draft, verify
    floors: dict[str, float]  # seconds at the copy bandwidth
    agreement: float
    best_gamma: int
    kv_cache_bytes: float
    exactness: dict[str, str]
    divergences: list[str]
    draft_weight_notes: list[str] = field(default_factory=list)  # precisions this device cannot run
    weight_bytes: float = 0.0  # what a vanilla step reads for its weights
    position_bytes: float = 0.0  # K/V bytes of one cached position of one sequence


def measure(model, settings: Settings, context: int, batch: int, bandwidth: float) -> Result:
    """Every run of one configuration, then the figures derived from them."""
    input_ids, candidates = make_prompts(settings, context, batch, model.config.vocab_size, settings.seed + context + batch)
    runs = {"vanilla": run_std(model, input_ids, candidates, settings, "vanilla", mode="vanilla")}
    runs["std"] = run_std(model, input_ids, candidates, settings, f"StD γ={settings.gamma}", gamma=settings.gamma)
    vanilla, std = runs["vanilla"].stats, runs["std"].stats
    steps = {"vanilla": vanilla.verify_s / max(vanilla.rounds, 1), "draft": std.draft_s / max(std.draft_steps, 1),
             "verify": std.verify_s / max(std.rounds, 1)}
    agreement = std.draft_agreement
    best, _ = gm.best_gamma(agreement, steps["draft"], steps["verify"], steps["vanilla"], 12)
    if best != settings.gamma:
        runs["best"] = run_std(model, input_ids, candidates, settings, f"StD γ={best}", gamma=best)
    runs["auto"] = run_std(model, input_ids, candidates, settings, "StD auto", gamma="auto", gamma_max=12)
    notes = []
    for precision in settings.draft_weights:  # the draft step at each precision: the floor table, measured
        try:
            std_ext.draft_weights.check_draft_weights(precision, settings.device)
        except ValueError as error:
            notes.append(str(error))
            continue
        runs[f"draft_{precision}"] = run_std(model, input_ids, candidates, settings,
                                             f"StD γ={settings.gamma}, {precision} draft", gamma=settings.gamma,
                                             draft_weights=precision)
    if settings.graphs:  # the same runs without CUDA graphs: what the captured steps save
        runs["vanilla_eager"] = run_std(model, input_ids, candidates, settings, "vanilla, no graphs", mode="vanilla",
                                        cuda_graphs=False)
        runs["std_eager"] = run_std(model, input_ids, candidates, settings, f"StD γ={settings.gamma}, no graphs",
                                    gamma=settings.gamma, cuda_graphs=False)
    if settings.hf:
        runs["hf"] = run_hf(model, input_ids, settings)
    element = torch.empty((), dtype=settings.dtype).element_size()
    weights = weight_bytes(model)
    mean_len = context + settings.new_tokens / 2  # cached tokens during decoding, on average
    tp = settings.tp
    floors = {"vanilla": weights + kv_bytes(model.config, batch, mean_len, element, tp),
              "draft": weights + kv_bytes(model.config, batch, settings.budget + settings.new_tokens / 2, element, tp),
              "verify": weights + kv_bytes(model.config, batch, mean_len, element, tp)}
    floors = {name: nbytes / bandwidth for name, nbytes in floors.items()}
    exactness, divergences = check_exactness(model, input_ids, runs, settings)
    kv_cache = kv_bytes(model.config, batch, context + settings.new_tokens + 1, element, tp)
    return Result(context, batch, runs, steps, floors, agreement, best, kv_cache, exactness, divergences, notes,
                  weights, kv_bytes(model.config, 1, 1, element, tp))


def check_exactness(model, input_ids, runs: dict[str, Run], settings: Settings) -> tuple[dict[str, str], list[str]]:
    """Identical sequences against vanilla per run; top-2 margins at StD's divergences."""
    reference = runs["vanilla"].tokens
    exactness, divergences, seen = {}, [], {}
    for key, run in runs.items():
        if key == "vanilla" or not run.tokens:
            continue
        same = sum(a == b for a, b in zip(run.tokens, reference))
        exactness[key] = f"{same}/{len(reference)}"
        if key == "hf":  # a different attention implementation: its divergences are not StD's
            continue
        for row, (expected, got) in enumerate(zip(reference, run.tokens)):
            if expected == got:
                continue
            at = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
            if (row, at) not in seen:
                seen[(row, at)] = (top2_margin(model, input_ids[row], expected[:at])
                                   if len(seen) < settings.max_margins else None)
            margin = seen[(row, at)]
            shown = "not computed" if margin is None else f"top-2 margin {margin:.4g}"
            divergences.append(f"{run.name}: row {row}, token {at}: {shown}")
    return exactness, divergences


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.2f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not (math.isfinite(a) and math.isfinite(b)) or b <= 0 else f"{a / b:.2f}"


def _s(seconds: float) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds:.3f}"


def _gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.2f}"


def speed_table(results: list[Result], gamma: int) -> str:
    head = ("| context | batch | vanilla ms/tok | StD γ=%d ms/tok | speedup | best fixed γ | ms/tok | auto ms/tok | "
            "auto / vanilla | auto / best fixed | auto γ (mean, dense rounds) | transformers ms/tok | "
            "StD speedup over transformers | accepted / round | agreement |" % gamma)
    lines = [head, "|" + "---|" * 15]
    for r in results:
        van, std, auto = r.runs["vanilla"], r.runs["std"], r.runs["auto"]
        fixed = min((r.runs[k] for k in ("std", "best") if k in r.runs), key=lambda run: run.per_token_s)
        hf = r.runs.get("hf", Run("transformers"))
        gammas = auto.stats.gammas
        auto_gamma = f"{sum(gammas) / max(len(gammas), 1):.1f}, {gammas.count(0)}/{len(gammas)}"
        lines.append(
            f"| {r.context} | {r.batch} | {_ms(van.per_token_s)} | {_ms(std.per_token_s)} | "
            f"{_ratio(van.per_token_s, std.per_token_s)} | {fixed.name.split('=')[-1]} | {_ms(fixed.per_token_s)} | "
            f"{_ms(auto.per_token_s)} | {_ratio(auto.per_token_s, van.per_token_s)} | "
            f"{_ratio(auto.per_token_s, fixed.per_token_s)} | {auto_gamma} | {_ms(hf.per_token_s)} | "
            f"{_ratio(hf.per_token_s, std.per_token_s)} | {std.stats.mean_accepted:.2f} | {r.agreement:.3f} |")
    return "\n".join(lines)


def step_table(results: list[Result]) -> str:
    lines = ["| context | batch | vanilla step ms | × floor | draft step ms | × floor | verify step ms | × floor | "
             "draft / vanilla | verify / vanilla |", "|" + "---|" * 10]
    for r in results:
        s, f = r.steps, r.floors
        lines.append(f"| {r.context} | {r.batch} | {_ms(s['vanilla'])} | {_ratio(s['vanilla'], f['vanilla'])} | "
                     f"{_ms(s['draft'])} | {_ratio(s['draft'], f['draft'])} | {_ms(s['verify'])} | "
                     f"{_ratio(s['verify'], f['verify'])} | {_ratio(s['draft'], s['vanilla'])} | "
                     f"{_ratio(s['verify'], s['vanilla'])} |")
    return "\n".join(lines)


def computed_table(results: list[Result]) -> str:
    gammas = list(COMPUTED_GAMMAS)
    lines = ["| context | batch | agreement | " + " | ".join(f"γ={g}" for g in gammas) + " | best γ (1-12) |",
             "|" + "---|" * (4 + len(gammas))]
    for r in results:
        t = (r.steps["draft"], r.steps["verify"], r.steps["vanilla"])
        for label, a in [(f"{a}", a) for a in AGREEMENTS] + [(f"measured {r.agreement:.3f}", r.agreement)]:
            cells = " | ".join(f"{gm.round_speedup(a, g, *t):.2f}" for g in gammas)
            best, speedup = gm.best_gamma(a, *t, 12)
            lines.append(f"| {r.context} | {r.batch} | {label} | {cells} | {best} ({speedup:.2f}) |")
    return "\n".join(lines)


def draft_weights_table(results: list[Result], settings: Settings) -> str:
    """Draft step time per draft precision (measured) beside its floor speedup (computed)."""
    from draft_floor import floor_speedups

    lines = ["| context | batch | draft weights | draft step ms | × model-weight draft step | agreement | "
             "accepted / round | StD ms/tok | speedup | identical | floor speedup (agreement 0.9) |",
             "|" + "---|" * 11]
    for r in results:
        vanilla = r.runs["vanilla"]
        element = torch.empty((), dtype=settings.dtype).element_size()
        floors = floor_speedups(weight_bytes=r.weight_bytes, position_bytes=r.position_bytes, element_bytes=element,
                                keep=settings.budget, max_new_tokens=settings.new_tokens, shapes=[(r.batch, r.context)],
                                precisions=(None, *settings.draft_weights))
        for precision in (None, *settings.draft_weights):
            run = r.runs.get("std" if precision is None else f"draft_{precision}")
            if run is None:
                continue
            stats = run.stats
            step = stats.draft_s / max(stats.draft_steps, 1)
            fraction = r.exactness.get("std" if precision is None else f"draft_{precision}", "0/1")
            same = "yes" if len(set(fraction.split("/"))) == 1 else f"NO ({fraction})"
            lines.append(
                f"| {r.context} | {r.batch} | {precision or 'model'} | {_ms(step)} | {_ratio(step, r.steps['draft'])} | "
                f"{stats.draft_agreement:.3f} | {stats.mean_accepted:.2f} | {_ms(run.per_token_s)} | "
                f"{_ratio(vanilla.per_token_s, run.per_token_s)} | {same} | "
                f"{floors[r.batch, r.context, precision][1]:.2f}× |")
    notes = sorted({note for r in results for note in r.draft_weight_notes})
    return "\n".join(lines + [""] + [f"- skipped: {note}" for note in notes])


def memory_table(results: list[Result]) -> str:
    lines = ["| context | batch | prefill s | selection s | transformers prefill s | peak vanilla GiB | peak StD GiB | "
             "peak auto GiB | peak transformers GiB | StD adds MiB | KV cache GiB | StD adds / KV |",
             "|" + "---|" * 12]
    for r in results:
        van, std, auto = r.runs["vanilla"], r.runs["std"], r.runs["auto"]
        hf = r.runs.get("hf", Run("transformers"))
        extra = None if std.peak_bytes is None else std.peak_bytes - van.peak_bytes
        lines.append(
            f"| {r.context} | {r.batch} | {_s(std.prefill_s)} | {_s(std.stats.selection_s)} | "
            f"{_s(hf.prefill_s)} | {_gib(van.peak_bytes)} | {_gib(std.peak_bytes)} | {_gib(auto.peak_bytes)} | "
            f"{_gib(hf.peak_bytes)} | {'-' if extra is None else f'{extra / MiB:.1f}'} | {_gib(r.kv_cache_bytes)} | "
            f"{'-' if extra is None else f'{extra / r.kv_cache_bytes:.2%}'} |")
    return "\n".join(lines)


def graphs_table(results: list[Result], gamma: int) -> str:
    lines = [f"| context | batch | vanilla ms/tok graphs | no graphs | no graphs / graphs | StD γ={gamma} ms/tok graphs | "
             "no graphs | no graphs / graphs | graphs captured (vanilla, StD) | graph memory MiB (StD) | "
             "same tokens as with graphs |", "|" + "---|" * 11]
    for r in results:
        if "std_eager" not in r.runs:
            continue
        van, std = r.runs["vanilla"], r.runs["std"]
        van_e, std_e = r.runs["vanilla_eager"], r.runs["std_eager"]
        same = all(a.tokens == b.tokens for a, b in ((van, van_e), (std, std_e)))
        lines.append(
            f"| {r.context} | {r.batch} | {_ms(van.per_token_s)} | {_ms(van_e.per_token_s)} | "
            f"{_ratio(van_e.per_token_s, van.per_token_s)} | {_ms(std.per_token_s)} | {_ms(std_e.per_token_s)} | "
            f"{_ratio(std_e.per_token_s, std.per_token_s)} | {van.stats.cuda_graphs}, {std.stats.cuda_graphs} | "
            f"{std.stats.graph_memory_bytes / MiB:.1f} | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def exactness_table(results: list[Result], gamma: int) -> str:
    lines = [f"| context | batch | StD γ={gamma} | StD best γ | StD auto | transformers | divergences |",
             "|" + "---|" * 7]
    for r in results:
        e = r.exactness
        shown = "; ".join(r.divergences) if r.divergences else "none"
        lines.append(f"| {r.context} | {r.batch} | {e.get('std', '-')} | {e.get('best', 'same γ')} | "
                     f"{e.get('auto', '-')} | {e.get('hf', '-')} | {shown} |")
    return "\n".join(lines)


def report(results: list[Result], skipped: list[str], settings: Settings, header: str) -> str:
    notes = [r.runs["hf"].note for r in results if "hf" in r.runs and r.runs["hf"].note]
    parts = [
        header,
        "## Decode speed (decode-only, per token of a sequence; measured)",
        "`speedup` = vanilla / StD time per token. `best fixed γ`: the faster of γ = --gamma and the γ the "
        "measured step times and agreement say is best. `agreement`: accepted over tried drafts (per token). "
        f"Targets for auto: at most {AUTO_TARGETS[0]:.2f}× vanilla; at most {AUTO_TARGETS[1]:.2f}× the best fixed γ "
        "where StD wins. `auto γ`: mean γ over its rounds, and how many rounds were dense steps.",
        speed_table(results, settings.gamma),
        "## Step times over their bandwidth floors (measured)",
        "Floor = bytes a step must read / copy bandwidth: weights (without the input embedding) + the KV cache at "
        "its mean decode length (vanilla, verify) or the keep set + generated tail (draft).",
        step_table(results),
        "## Speedup at draft agreement a (computed from the measured step times, not measured)",
        "`(E[accepted] + 1) · t_vanilla / (γ · t_draft + t_verify)` with `E[accepted] = a (1 − a^γ) / (1 − a)`.",
        computed_table(results),
        "## Draft weights (measured), beside the bandwidth-floor speedup of each (computed)",
        f"StD at γ = {settings.gamma} with the draft running a quantized copy of the weights "
        "(`draft_weights`); the verify runs the model's own, so the tokens must stay identical. "
        "`× model-weight draft step`: this draft step over the StD γ run's (model weights) draft step. "
        "Floor: `std_ext.budget.predicted_speedup` with `std_ext.draft_weights.read_bytes` (bench/draft_floor.py).",
        draft_weights_table(results, settings),
        "## Prefill, selection and memory (measured)",
        "`StD adds` = peak of the StD γ run − peak of the vanilla run (each from a reset peak; the model's weights "
        "are in both).",
        memory_table(results),
        "## CUDA graphs on and off (measured; off the GPU both run the same eager steps)",
        "Each decode step (draft, dense, verify of each width) captured once per generate call and replayed, "
        "against the same runs with `cuda_graphs=False`.",
        graphs_table(results, settings.gamma),
        "## Exactness (greedy, against vanilla decoding on the same model)",
        "Identical sequences; at each divergence, the dense model's top-2 logit margin there (a near-tie flipped by "
        f"rounding; at most {settings.max_margins} margins per configuration are computed, one prefill each).",
        exactness_table(results, settings.gamma),
    ]
    if notes:
        parts.append("transformers: " + "; ".join(sorted(set(notes))))
    if skipped:
        parts.append("## Skipped\n\n" + "\n".join(f"- {line}" for line in skipped))
    return "\n\n".join(parts) + "\n"


def header_line(model, settings: Settings, bandwidth: float) -> str:
    import transformers

    if settings.device.type == "cuda":
        where = f"{torch.cuda.get_device_name(settings.device)}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
    shape = "tiny Qwen2-shaped model (smoke test)" if settings.tiny else "Qwen2-7B-shaped model"
    if settings.tp > 1:
        shape += (f", tensor-parallel over {settings.tp} ranks (transformers' tp_plan='auto'; weights, KV bytes and "
                  "floors are per rank, times are rank 0's)")
    c = model.config
    return (
        f"# Sparse-to-Dense end to end: {shape}, random {str(settings.dtype).removeprefix('torch.')} weights\n\n"
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, std_ext CUDA kernels: "
        f"{'yes' if std_ext.cuda_kernels_built() else 'no'}. Model: {c.num_hidden_layers} layers, hidden "
        f"{c.hidden_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads, MLP {c.intermediate_size}, vocab "
        f"{c.vocab_size}; weights read per step {weight_bytes(model) / GiB:.2f} GiB. Copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s (bf16 copy_, read + write). γ = {settings.gamma}, budget = {settings.budget}, "
        f"{settings.new_tokens} new tokens per sequence (no EOS); prompt = text, a {settings.visual_share:.0%} visual "
        f"span (the candidates), a {settings.question}-token question; selection \"question\"."
    )


# --------------------------------------------------------------------------- main


def warm_up(model, settings: Settings) -> None:
    """One short run of each engine path: lazy CUDA module loading and allocator growth stay out of the figures."""
    short = Settings(**{**settings.__dict__, "new_tokens": 4, "question": 32, "visual_share": 0.9})
    input_ids, candidates = make_prompts(short, 1024, 1, model.config.vocab_size, 0)
    run_std(model, input_ids, candidates, short, "warm-up", mode="vanilla")
    run_std(model, input_ids, candidates, short, "warm-up", gamma=settings.gamma)
    if settings.hf:
        run_hf(model, input_ids, short)


def _pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"expected CONTEXTxBATCH,..., e.g. 65536x1,32768x8; got {text!r}")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--contexts", type=ints, default=None, help="prompt lengths (default 16384,65536,131072)")
    parser.add_argument("--batches", type=ints, default=None, help="batch sizes (default 1,8)")
    parser.add_argument("--gamma", type=int, default=None, help="fixed draft length (default 9)")
    parser.add_argument("--budget", type=int, default=None, help="keep-set budget (default 1024)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (default 128)")
    parser.add_argument("--question", type=int, default=64, help="question tokens after the visual span")
    parser.add_argument("--visual-share", type=float, default=0.9, help="share of the prompt in the visual span")
    parser.add_argument("--max-margins", type=int, default=4, help="top-2 margins computed per configuration")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
    parser.add_argument("--no-graphs-compare", dest="graphs", action="store_false",
                        help="skip the runs without CUDA graphs")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks: run under `torchrun --nproc_per_node N bench/e2e.py --tp N`; "
                             "the model is saved once and loaded with transformers' tp_plan='auto'")
    parser.add_argument("--checkpoint", default=None,
                        help="with --tp: where the random model is saved (default: a folder under /tmp)")
    parser.add_argument("--pairs", type=_pairs, default=None,
                        help="CONTEXTxBATCH,... to measure (e.g. 65536x1,32768x8), instead of --contexts x --batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda (the CPU only with --tiny)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; --tiny: 1, steadier on a shared machine)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short contexts: a CPU smoke test")
    parser.add_argument("--draft-weights", type=lambda text: tuple(v for v in text.split(",") if v), default=None,
                        help="draft precisions also run at --gamma, comma-separated (default: fp8,int8,int4; "
                             "--tiny: int8,int4); a precision the GPU cannot run is skipped with a note")
    parser.add_argument("--draft-floors", action="store_true",
                        help="print the computed bandwidth-floor table of bench/draft_floor.py and exit")
    parser.add_argument("--cpu-smollm2", action="store_true",
                        help="run bench/cpu_smollm2.py instead (SmolLM2 on a 7-8K document on the CPU, vanilla vs "
                             "StD with and without draft_weights); the other options are its own (see its --help)")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args(argv)
    tiny_defaults = dict(contexts=[1024, 2048], batches=[1, 2], gamma=4, budget=128, new_tokens=16, threads=1,
                         draft_weights=("int8", "int4"))
    full_defaults = dict(contexts=[16384, 65536, 131072], batches=[1, 8], gamma=9, budget=1024, new_tokens=128,
                         draft_weights=("fp8", "int8", "int4"))
    for name, value in (tiny_defaults if args.tiny else full_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return parser, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cpu-smollm2" in argv:  # a different benchmark with options of its own
        from cpu_smollm2 import main as cpu_smollm2_main

        return cpu_smollm2_main([a for a in argv if a != "--cpu-smollm2"])
    parser, args = parse_args(argv)
    if args.draft_floors:
        from draft_floor import main as draft_floor_main

        return draft_floor_main([])
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.tp > 1:
        device = _init_tensor_parallel(parser, args.tp, device)
    if device.type == "cuda" and not (torch.cuda.is_available() and std_ext.cuda_kernels_built()):
        print("bench/e2e.py needs a CUDA GPU and std_ext built with its CUDA kernels "
              f"(torch.cuda.is_available() = {torch.cuda.is_available()}, std_ext.cuda_kernels_built() = "
              f"{std_ext.cuda_kernels_built()}); without one, run the CPU smoke test: python bench/e2e.py --tiny",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        parser.error("the full benchmark runs on a GPU; on the CPU only --tiny")
    settings = Settings(
        contexts=args.contexts, batches=args.batches, gamma=args.gamma, budget=args.budget,
        new_tokens=args.new_tokens, question=args.question, visual_share=args.visual_share,
        max_margins=args.max_margins, hf=args.hf, seed=args.seed, tiny=args.tiny, device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, shape=TINY if args.tiny else QWEN2_7B,
        graphs=args.graphs, pairs=args.pairs, tp=args.tp, checkpoint=args.checkpoint,
        draft_weights=args.draft_weights,
    )
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        text = run_benchmark(settings)
    finally:
        torch.set_num_threads(threads)  # leave a calling process (pytest) as it was
    if _rank() == 0:  # every rank measured (each step is collective); one reports
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    if args.tp > 1:
        torch.distributed.destroy_process_group()
    return 0


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _init_tensor_parallel(parser, tp: int, device: torch.device) -> torch.device:
    """Join torchrun's process group: NCCL and one GPU per rank, or gloo on the CPU (--tiny)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        parser.error(f"--tp {tp} needs {tp} processes: torchrun --nproc_per_node {tp} bench/e2e.py --tp {tp} ... "
                     f"(WORLD_SIZE is {world})")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def build_tensor_parallel_model(settings: Settings, max_positions: int):
    """The random model, saved once by rank 0 and loaded by every rank with ``tp_plan="auto"``
    (``transformers`` shards a model as it loads it, so the weights go through a checkpoint)."""
    import tempfile

    from transformers import Qwen2ForCausalLM
    from transformers.distributed import DistributedConfig

    folder = settings.checkpoint or str(
        Path(tempfile.gettempdir()) / f"std_ext_e2e_{'tiny' if settings.tiny else 'qwen2_7b'}_{settings.seed}_{max_positions}")
    if _rank() == 0 and not (Path(folder) / "config.json").exists():
        model = build_model(settings.shape, max_positions, settings.device, settings.dtype, settings.seed)
        model.save_pretrained(folder)
        del model
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    torch.distributed.barrier()
    model = Qwen2ForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_plan="auto"),
                                             dtype=settings.dtype, attn_implementation="sdpa").eval()
    if settings.device.type == "cpu":
        model = model.to("cpu")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run_benchmark(settings: Settings) -> str:
    """Build the model, measure every configuration that fits; the markdown report."""
    began = time.perf_counter()
    device = settings.device
    pairs = settings.pairs or [(c, b) for c in settings.contexts for b in settings.batches]
    max_positions = max(c for c, _ in pairs) + settings.new_tokens + 64
    if settings.tp > 1:
        model = build_tensor_parallel_model(settings, max_positions)
    else:
        model = build_model(settings.shape, max_positions, device, settings.dtype, settings.seed)
    bandwidth = copy_bandwidth(device, GiB if device.type == "cuda" else 64 * MiB)
    warm_up(model, settings)
    results, skipped = [], []
    for context, batch in pairs:
        result, why = measure_or_skip(model, settings, context, batch, bandwidth)
        if result is not None:
            results.append(result)
            if _rank() == 0:
                print(f"[e2e] context {context} batch {batch}: done ({time.perf_counter() - began:.0f} s)",
                      file=sys.stderr)
        else:
            skipped.append(why)
            if _rank() == 0:
                print(f"[e2e] context {context} batch {batch}: skipped: {why}", file=sys.stderr)
    text = report(results, skipped, settings, header_line(model, settings, bandwidth))
    return text + f"\n{time.perf_counter() - began:.0f} s in all.\n"


def measure_or_skip(model, settings: Settings, context: int, batch: int, bandwidth: float):
    """``(Result, None)``, or ``(None, why)`` for a configuration that does not fit in memory."""
    name = f"context {context} × batch {batch}"
    if settings.device.type == "cuda":
        needed = estimate_peak_bytes(model, settings, context, batch)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(settings.device)
        free += torch.cuda.memory_allocated(settings.device)  # the weights are in the estimate
        too_big = torch.tensor([float(needed > free)], device=settings.device)
        if settings.tp > 1:  # every rank skips, or none: a lone skip would leave the others in a collective
            torch.distributed.all_reduce(too_big, op=torch.distributed.ReduceOp.MAX)
        if bool(too_big.item()):
            return None, (f"{name}: needs ~{needed / GiB:.0f} GiB (weights + KV cache + one prefill layer's "
                          f"activations over the batch) > {free / GiB:.0f} GiB")
    try:
        return measure(model, settings, context, batch, bandwidth), None
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return None, f"{name}: out of memory ({str(error).splitlines()[0][:120]})"


if __name__ == "__main__":
    sys.exit(main())
