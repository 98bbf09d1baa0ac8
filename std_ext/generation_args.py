"""Generation arguments resolved as ``transformers``' ``generate`` resolves them.

``std_ext.generate`` promises ``generate``'s tokens for the same arguments, so it reads
them the same way: the call's keyword arguments over ``generation_config=`` (or the
model's ``generation_config``) over ``transformers``' global defaults, through the
model's own ``_prepare_generation_config``. What comes out is then held to that
promise: a field std_ext implements is used; any other field that would change the
tokens (beam search, repetition penalty, min length, stop strings, ...) is refused by
name unless it has its neutral value; a leftover keyword argument must be an input the
model's forward takes, else it is a ``TypeError`` naming it (a typo never silently
becomes a different answer).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

# The fields std_ext.generate implements exactly (and reads from the resolved config).
IMPLEMENTED = frozenset({
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "repetition_penalty",
})

# Fields that do not change which tokens are produced (bookkeeping, output format, cache
# and compile settings, beam-only knobs that are inert with one beam, assistant-model
# settings that only act when an assistant model is passed, which std_ext refuses).
_INERT = frozenset({
    "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "use_cache",
    "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "continuous_batching_config", "prefill_chunk_size", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "renormalize_logits", "early_stopping",
    "length_penalty", "low_memory", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "prompt_lookup_num_tokens", "max_matching_ngram_size",
    "assistant_early_exit", "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight",
    "speculation_type",
})

# Inputs std_ext.generate sets itself; a caller passing one would be silently overridden.
_ENGINE_INPUTS = frozenset({
    "position_ids", "past_key_values", "use_cache", "cache_position", "logits_to_keep", "labels", "inputs_embeds",
    "output_attentions", "output_hidden_states", "return_dict", "rope_deltas", "std_ext_step",
})


@dataclass
class GenerationArguments:
    """What a generation will do, resolved.

    max_new_tokens : tokens to emit per sequence (>= 1)
    do_sample, temperature, top_k, top_p : the token choice (warping applies only when sampling)
    repetition_penalty : ``generate``'s repetition penalty (None: off), applied greedy or sampled
    eos_ids : stop tokens (``[-1]`` when there are none); pad_id : fills after a sequence's end
    model_inputs : the remaining prefill inputs, each one the model's forward takes
    """

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    eos_ids: list[int]
    pad_id: int
    model_inputs: dict


def resolve(model: torch.nn.Module, forward_inputs: frozenset[str], width: int, generation_config,
            explicit: dict, kwargs: dict) -> GenerationArguments:
    """Resolve the generation arguments of a prompt ``width`` tokens wide.

    ``explicit`` holds std_ext.generate's own generation arguments that the caller set
    (not None); ``kwargs`` every other keyword argument.
    """
    for name in kwargs:
        if name in _ENGINE_INPUTS:
            raise TypeError(f"std_ext.generate: {name} is set by std_ext.generate itself; do not pass it")
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is None:
        raise TypeError(f"std_ext.generate: model: {type(model).__name__} is not a transformers generation model "
                        "(it has no _prepare_generation_config)")
    if generation_config is not None and not _is_generation_config(generation_config):
        raise TypeError(f"std_ext.generate: generation_config must be a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    config, leftover = prepare(generation_config, **explicit, **kwargs)
    leftover = {k: v for k, v in leftover.items() if k not in ("output_attentions", "output_hidden_states")}
    unknown = [name for name in leftover if name not in forward_inputs]
    if unknown:
        raise TypeError(_unknown_argument_message(unknown[0], forward_inputs))
    _refuse_unimplemented(config)
    return GenerationArguments(
        max_new_tokens=_max_new_tokens(config, width),
        do_sample=bool(config.do_sample),
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=_repetition_penalty(config.repetition_penalty),
        eos_ids=_token_list(config.eos_token_id, "eos_token_id"),
        pad_id=_pad_id(config),
        model_inputs=leftover,
    )


def _is_generation_config(value) -> bool:
    from transformers import GenerationConfig

    return isinstance(value, GenerationConfig)


def _unknown_argument_message(name: str, forward_inputs: frozenset[str]) -> str:
    from transformers import GenerationConfig

    known = sorted(set(GenerationConfig().to_dict()) | forward_inputs | _STD_ARGUMENTS)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"std_ext.generate: got an unexpected keyword argument {name!r}{hint}: it is neither a generation "
            "argument nor an input the model's forward takes")


_STD_ARGUMENTS = frozenset({
    "mode", "gamma", "gamma_max", "budget", "window", "selection", "candidate_mask", "generator", "progress",
    "generation_config", "attention_mask", "input_ids", "draft_weights", "cuda_graphs",
})


def _neutral_values() -> dict:
    """Each generation field's value when unset: ``transformers``' global defaults, else None."""
    from transformers import GenerationConfig

    neutral = {name: None for name in GenerationConfig().to_dict()}
    neutral.update(GenerationConfig._get_default_generation_params())
    return neutral


def _refuse_unimplemented(config) -> None:
    neutral = _neutral_values()
    for name, value in config.to_dict().items():
        if name in IMPLEMENTED or name in _INERT or name not in neutral:
            continue
        if value != neutral[name]:
            raise TypeError(
                f"std_ext.generate: {name}={value!r} is not implemented (std_ext returns generate's tokens exactly, "
                f"and does not reproduce {name}); remove it, or set it to {neutral[name]!r} in the generation_config"
                " (the model's own generation_config may set it: pass "
                f"{name}={neutral[name]!r} to override)"
            )


def _repetition_penalty(value) -> float | None:
    if value is None or value == 1.0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"std_ext.generate: repetition_penalty must be a number > 0, got {value!r}")
    return float(value)


def _max_new_tokens(config, width: int) -> int:
    """New tokens per sequence, as ``generate`` counts them (``max_length`` includes the prompt)."""
    if config.max_new_tokens is not None:
        value, source = config.max_new_tokens, "max_new_tokens"
    else:
        value, source = config.max_length - width, f"max_length ({config.max_length}) minus the prompt width ({width})"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"std_ext.generate: max_new_tokens must be an integer >= 1, got {value!r} from {source}; "
            "pass max_new_tokens"
        )
    return value


def _token_list(value, name: str) -> list[int]:
    if value is None:
        return [-1]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    values = [value] if isinstance(value, int) else list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"std_ext.generate: {name} must be an int or a list of ints, got {value!r}")
    return values


def _pad_id(config) -> int:
    """``pad_token_id``, else the first EOS id (as ``generate`` falls back), else 0."""
    pad = config.pad_token_id
    if isinstance(pad, torch.Tensor):
        pad = pad.tolist()
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    if pad is None:
        eos = _token_list(config.eos_token_id, "eos_token_id")
        pad = eos[0] if eos != [-1] else 0
    return int(pad)


def infer_attention_mask(input_ids: torch.Tensor, pad_id: int | None, eos_ids: list[int]) -> torch.Tensor:
    """The mask ``generate`` infers when none is passed: pad tokens masked out, unless pad is
    an EOS id (then ``generate`` attends to every token, and a left pad is refused here:
    ``generate`` would attend to it, which no caller wants)."""
    ones = torch.ones_like(input_ids)
    if pad_id is None or not bool((input_ids == pad_id).any()):
        return ones
    if pad_id in eos_ids:
        if bool((input_ids[:, 0] == pad_id).any()):
            raise ValueError(
                f"std_ext.generate: attention_mask: input_ids holds pad_token_id {pad_id} but no attention_mask was "
                "passed, and the pad id is also an EOS id, so the mask cannot be inferred (generate would attend to "
                "the padding); pass the tokenizer's attention_mask"
            )
        return ones
    return (input_ids != pad_id).long()
