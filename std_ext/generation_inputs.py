"""What ``std_ext.generate`` checks before any work, beside :mod:`std_ext.generation_args`.

Every argument and input of a generation is checked here, in one pass, before the
prefill: tensors (shapes, dtypes, devices, mask values), the StD parameters, the
sampling arguments, the kernels this build has, the model's dtype, the agreement of
tensor-parallel ranks and whether the cache fits. An error names the argument; nothing
the engine cannot reproduce exactly reaches the decode loop (DESIGN.md §5).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import generation_args
from .distributed import RankAgreement
from .generation_args import GenerationArguments
from .models import ModelAdapter
from .selection import SelectionPolicy, make_policy

if TYPE_CHECKING:
    from .generate import GenerationStats


@dataclass
class CheckedCall:
    """A generation's inputs, checked and resolved.

    input_ids long ``[B, T]``; attention_mask long ``[B, T]`` (passed or inferred);
    candidate_mask bool ``[B, T]``: the selection pool inside the prompt; prompt_len long ``[B]``;
    args : the resolved generation arguments (``args.model_inputs``: the other prefill inputs);
    dtype : the model's; gamma : the most drafts a round may run (0 in vanilla mode);
    gamma_auto : γ chosen per round; capacity : cache positions per sequence;
    policy : the selection policy (None in vanilla mode)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    candidate_mask: torch.Tensor
    prompt_len: torch.Tensor
    args: GenerationArguments
    dtype: torch.dtype
    gamma: int
    gamma_auto: bool
    capacity: int
    policy: SelectionPolicy | None


def check_call(model, adapter: ModelAdapter, ranks: RankAgreement, input_ids, attention_mask, candidate_mask, *,
               mode, gamma, gamma_max, budget, window, selection, generation_config, explicit: dict,
               max_length, model_inputs: dict) -> CheckedCall:
    """Check and resolve one :func:`std_ext.generate` call, in the order its errors are promised.

    ``explicit`` holds the generation arguments the caller set (not None), ``max_length`` included.
    """
    check_input_ids(input_ids, model)
    _check_std_parameters(mode, gamma, gamma_max, budget, window)
    if attention_mask is not None:  # the caller's tensors first; an inferred mask is checked once formed
        input_ids, attention_mask, candidate_mask = check_inputs(input_ids, attention_mask, candidate_mask, model)
    _check_sampling(explicit.get("max_new_tokens", 1), explicit.get("do_sample", True), explicit.get("temperature", 1.0),
                    explicit.get("top_k"), explicit.get("top_p"))
    if max_length is not None:
        _integer(max_length, "max_length", 1)
    args = generation_args.resolve(model, adapter.forward_inputs, input_ids.shape[1], generation_config, explicit,
                                   model_inputs)
    if attention_mask is None:
        attention_mask = generation_args.infer_attention_mask(input_ids, args.pad_id, args.eos_ids)
        input_ids, attention_mask, candidate_mask = check_inputs(input_ids, attention_mask, candidate_mask, model)
    _check_model_inputs(args.model_inputs, input_ids.device)
    _check_kernels(input_ids.device, mode)
    dtype = next(model.parameters()).dtype
    _check_dtype(dtype, input_ids.device)
    _check_sampling(args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p)
    adapter.check_rope_inputs(args.model_inputs)
    auto = mode == "std" and gamma == "auto"
    gamma = (gamma_max if auto else gamma) if mode == "std" else 0  # the most drafts a round may run
    policy = make_policy(selection) if mode == "std" else None

    device = input_ids.device
    batch, width = input_ids.shape
    max_new_tokens = args.max_new_tokens
    adapter.check_length(width + max_new_tokens)
    prompt_len = attention_mask.sum(1)  # [B] long
    capacity = width + max_new_tokens + gamma + 1
    _check_same_on_every_rank(ranks, input_ids, attention_mask, max_new_tokens, gamma, budget, mode)
    _check_capacity(adapter, capacity, width, max_new_tokens, batch, dtype, device, ranks)
    if candidate_mask is None:
        candidate_mask = adapter.visual_mask(input_ids)
    candidate_mask = candidate_mask & attention_mask.bool()
    return CheckedCall(input_ids=input_ids, attention_mask=attention_mask, candidate_mask=candidate_mask,
                       prompt_len=prompt_len, args=args, dtype=dtype, gamma=gamma, gamma_auto=auto,
                       capacity=capacity, policy=policy)


def check_input_ids(input_ids, model) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"std_ext.generate: input_ids must be an integer tensor [B, T], got "
                         f"{getattr(input_ids, 'dtype', '')} {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError("std_ext.generate: input_ids is empty")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise ValueError(f"std_ext.generate: input_ids is on {input_ids.device} but the model is on {device}")


def check_inputs(input_ids, attention_mask, candidate_mask, model):
    device = input_ids.device
    input_ids = input_ids.long()
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"std_ext.generate: attention_mask {tuple(getattr(attention_mask, 'shape', ()))} must match "
                         f"input_ids {tuple(input_ids.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"std_ext.generate: attention_mask is on {attention_mask.device} but the model is on {device}")
    # the values are checked before any cast: 0.5 must not become 0 (a padding token)
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("std_ext.generate: attention_mask must hold only 0 and 1 (1: a token, 0: left padding), "
                         f"got values such as {attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()}")
    attention_mask = attention_mask.to(dtype=torch.long)
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("std_ext.generate: attention_mask: only left padding is supported "
                         "(a 0 after a 1); pad on the left, e.g. tokenizer.padding_side = 'left'")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("std_ext.generate: attention_mask: every sequence needs at least one token "
                         "(a row is all padding)")
    if candidate_mask is not None:
        if (not isinstance(candidate_mask, torch.Tensor) or candidate_mask.shape != input_ids.shape
                or candidate_mask.dtype != torch.bool):
            raise ValueError(f"std_ext.generate: candidate_mask must be bool with the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {getattr(candidate_mask, 'dtype', type(candidate_mask))} "
                             f"{tuple(getattr(candidate_mask, 'shape', ()))}")
        if candidate_mask.device != device:
            raise ValueError(f"std_ext.generate: candidate_mask is on {candidate_mask.device} but the model is on "
                             f"{device}")
    return input_ids, attention_mask, candidate_mask


def _check_model_inputs(model_inputs: dict, device: torch.device) -> None:
    """Every tensor input on the model's device, before the prefill (not deep inside the model)."""
    for name, value in model_inputs.items():
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"std_ext.generate: {name} is on {tensor.device} but the model is on {device}; "
                                 f"move it with .to({str(device)!r})")


def _check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    kernels = (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32, torch.float16, torch.bfloat16)
    if dtype not in kernels:
        names = ", ".join(str(d).replace("torch.", "") for d in kernels)
        raise ValueError(f"std_ext.generate: model: its parameters are {str(dtype).replace('torch.', '')}, but "
                         f"std_ext's {device.type.upper()} kernels take {names}; load the model with one of them "
                         "(from_pretrained(..., dtype=torch.bfloat16) or model.to(torch.bfloat16))")


def warn_on_budget(candidate_mask: torch.Tensor, prompt_len: torch.Tensor, budget: int | str,
                   stats: GenerationStats) -> None:
    """A budget at or below the non-candidate count keeps no candidate: say so, do not run silently dense-free."""
    if budget == "auto":  # chosen at selection, which warns then
        return
    n_candidates = candidate_mask.sum(1)  # [B]
    room = budget - (prompt_len - n_candidates)  # [B] candidates the budget can keep
    starved = (n_candidates > 0) & (room <= 0)
    if bool(starved.any()):
        fixed = int((prompt_len - n_candidates)[starved].max())
        message = (f"budget={budget} keeps no candidate (visual) token in {int(starved.sum())} of "
                   f"{starved.numel()} sequences: their {fixed} non-candidate prompt tokens already fill it, "
                   "so the draft attends to no candidate; raise budget above the non-candidate count")
        warnings.warn(f"std_ext.generate: {message}", stacklevel=4)
        stats.warnings.append(message)


def _check_kernels(device: torch.device, mode: str) -> None:
    needed = ("dense_attention",) if mode == "vanilla" else ("dense_attention", "sparse_attention", "attention_scores", "topk_indices")
    key = "CUDA" if device.type == "cuda" else "CPU"
    missing = [op for op in needed if not torch._C._dispatch_has_kernel_for_dispatch_key(f"std::{op}", key)]
    if missing:
        raise RuntimeError(
            f"std_ext.generate: this build of std_ext has no {key} kernel for {', '.join('std::' + op for op in missing)} "
            f"(the model is on {device}); rebuild with CUDA (STD_EXT_CUDA=1 pip install --no-build-isolation .) "
            "or run the model on the CPU"
        )


def _integer(value, name, low, alternative=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"std_ext.generate: {name} must be an integer >= {low}{alternative}, got {value!r}")


def _check_std_parameters(mode, gamma, gamma_max, budget, window) -> None:
    if mode not in ("std", "vanilla"):
        raise ValueError(f"std_ext.generate: mode must be 'std' or 'vanilla', got {mode!r}")
    if gamma != "auto":
        _integer(gamma, "gamma", 1, " or 'auto'")
    _integer(gamma_max, "gamma_max", 1)
    if budget != "auto":
        _integer(budget, "budget", 0, " or 'auto'")
    if window is not None:
        _integer(window, "window", 1)


def _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    _integer(max_new_tokens, "max_new_tokens", 1)
    integer = _integer
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"std_ext.generate: temperature must be > 0 when sampling, got {temperature!r}")
        if top_k is not None:
            integer(top_k, "top_k", 0)
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"std_ext.generate: top_p must be in (0, 1], got {top_p!r}")


def _check_same_on_every_rank(ranks: RankAgreement, input_ids, attention_mask, max_new_tokens, gamma, budget,
                              mode) -> None:
    """Tensor-parallel ranks must decode the same batch with the same settings, or their
    collectives stop matching: checked once, before the prefill."""
    if not ranks.active:
        return
    checksum = torch.stack([input_ids.sum(), (input_ids * torch.arange(input_ids.shape[1], device=input_ids.device)).sum(),
                            attention_mask.sum()]).tolist()
    values = [*input_ids.shape, *checksum, max_new_tokens, gamma, budget if isinstance(budget, int) else -1,
              float(mode == "std")]
    if not ranks.same([float(v) for v in values]):
        raise ValueError("std_ext.generate: the tensor-parallel ranks were given different inputs or settings "
                         "(input_ids, attention_mask, max_new_tokens, gamma, budget or mode); every rank must "
                         "call generate with the same ones")


def _check_capacity(adapter: ModelAdapter, capacity: int, width: int, max_new_tokens: int, batch: int,
                    dtype: torch.dtype, device: torch.device, ranks: RankAgreement | None = None) -> None:
    """A prompt that cannot fit is an error before any work: positions, then cache memory."""
    limit = getattr(adapter.decoder.config, "max_position_embeddings", None)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(
            f"std_ext.generate: the prompt ({width} tokens) plus max_new_tokens ({max_new_tokens}) does not fit the "
            f"model's {limit} positions (max_position_embeddings); shorten the prompt or max_new_tokens"
        )
    if device.type == "cuda":
        element = torch.empty((), dtype=dtype).element_size()
        needed = 2 * adapter.num_layers * batch * adapter.num_kv_heads * (capacity + 1) * adapter.head_dim * element
        free, _ = torch.cuda.mem_get_info(device)
        fits = needed <= free
        if ranks is not None and not ranks.all(fits):  # every rank stops, or none: a lone stop would hang the rest
            fits = False
        if not fits:
            raise ValueError(
                f"std_ext.generate: the KV cache for batch {batch} x {capacity} positions needs "
                f"{needed / 2**30:.2f} GiB but {free / 2**30:.2f} GiB is free on {device}; "
                "lower the batch size, the prompt length or max_new_tokens"
            )
